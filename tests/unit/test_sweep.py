"""Sweeps: grid and random expansion, sweep-file errors, registration and local runs."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from cli import main as cli
from cli import sweep as sweep_command
from shared import layout
from shared.errors import LayoutError, SpecError
from shared.registry import RegistryError, create_run, load_rows
from shared.spec import RunSpec, apply_overrides, load_spec, parse_spec, spec_to_yaml
from shared.store import open_store
from shared.sweep import (
    Choice,
    Distribution,
    SweepDef,
    expand,
    load_sweep,
    points,
    sweep_from_dict,
)
from tests.support import ROOT, TINY_SPEC

SWEEPS = sorted((ROOT / "configs" / "sweeps").glob("*.yaml"))


@pytest.fixture(scope="module")
def base() -> RunSpec:
    return load_spec(TINY_SPEC)


def _cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
    )


def _random(parameters: dict[str, Any], num_runs: int = 200, seed: int = 0) -> SweepDef:
    return sweep_from_dict(
        {
            "name": "r",
            "method": "random",
            "num_runs": num_runs,
            "seed": seed,
            "parameters": parameters,
        }
    )


# -- grid --------------------------------------------------------------------------------


def test_grid_is_the_product_in_file_order(base):
    sw = sweep_from_dict(
        {
            "name": "lr-seeds",
            "parameters": {
                "train.learning_rate": [1e-4, 1e-3],
                "run.seed": [0, 1, 2],
                "custom.width": [1, 2],
            },
        },
        "s.yaml",
    )
    assert sw.method == "grid" and sw.size == 12
    assert sw.describe_size() == "grid 2 x 3 x 2 = 12 runs"
    specs = expand(base, sw)
    got = [(s.train.learning_rate, s.run.seed, s.custom["width"]) for s in specs]
    assert got == [
        (lr, seed, width) for lr in (1e-4, 1e-3) for seed in (0, 1, 2) for width in (1, 2)
    ]
    for i, spec in enumerate(specs):
        assert spec.run.tags == {"purpose": "demo", "sweep": "lr-seeds", "sweep_index": str(i)}
        assert spec.run.name == base.run.name
        assert spec.train.seed == spec.run.seed  # section seeds follow the swept run.seed
        assert spec.train.batch_size == base.train.batch_size  # the rest is the base spec
    assert [p["run.seed"] for p in points(sw)] == [0, 0, 1, 1, 2, 2] * 2


def test_grid_values_may_be_lists_and_mappings(base):
    sw = sweep_from_dict(
        {
            "name": "g",
            "parameters": {
                "sae.layers": {"values": [[0, 1], [1]]},
                "custom.opt": [{"beta": 0.9}, {"beta": 0.99}],
            },
        }
    )
    specs = expand(base, sw)
    assert [(s.sae.layers, s.custom["opt"]["beta"]) for s in specs] == [
        ([0, 1], 0.9),
        ([0, 1], 0.99),
        ([1], 0.9),
        ([1], 0.99),
    ]


def test_an_invalid_point_is_named(base):
    sw = sweep_from_dict(
        {"name": "g", "parameters": {"run.seed": [0], "model.n_embd": [64, 65]}}, "s.yaml"
    )
    with pytest.raises(SpecError) as info:
        expand(base, sw)
    assert str(info.value).startswith(
        "s.yaml: run 1 (run.seed=0, model.n_embd=65): model.n_embd: n_embd 65 is not divisible"
    )


def test_size_guard(base):
    sw = sweep_from_dict({"name": "g", "parameters": {"run.seed": [0, 1, 2], "custom.a": [1, 2]}})
    with pytest.raises(SpecError, match=r"grid 3 x 2 = 6 runs is more than --max-runs 5"):
        expand(base, sw, max_runs=5)
    assert len(expand(base, sw, max_runs=6)) == 6
    with pytest.raises(SpecError, match="7 random runs is more than --max-runs 6"):
        points(_random({"run.seed": [0, 1]}, num_runs=7), max_runs=6)


# -- random ------------------------------------------------------------------------------


def test_random_is_reproducible_and_seeded():
    params = {
        "train.learning_rate": {"distribution": "log_uniform", "min": 1e-5, "max": 1e-2},
        "train.batch_size": {"values": [8, 16, 32]},
    }
    first = points(_random(params, num_runs=20, seed=7))
    assert first == points(_random(params, num_runs=20, seed=7))
    assert first != points(_random(params, num_runs=20, seed=8))
    assert len({p["train.learning_rate"] for p in first}) == 20
    # More runs keep the first ones; a new parameter leaves the others' values alone.
    assert points(_random(params, num_runs=30, seed=7))[:20] == first
    more = points(_random({**params, "custom.extra": [1, 2]}, num_runs=20, seed=7))
    assert [{k: p[k] for k in params} for p in more] == first


def test_random_distributions_respect_their_bounds():
    draws = points(
        _random(
            {
                "train.weight_decay": {"distribution": "uniform", "min": 0.0, "max": 0.2},
                "run.seed": {"distribution": "int_uniform", "min": 3, "max": 6},
                "train.learning_rate": {"distribution": "log_uniform", "min": 1e-6, "max": 1e-2},
                "train.batch_size": [8, 16, 32],
            },
            num_runs=400,
        )
    )
    wd = [p["train.weight_decay"] for p in draws]
    assert all(0.0 <= v <= 0.2 for v in wd) and max(wd) - min(wd) > 0.15
    seeds = [p["run.seed"] for p in draws]
    assert all(isinstance(s, int) for s in seeds) and set(seeds) == {3, 4, 5, 6}
    assert {p["train.batch_size"] for p in draws} == {8, 16, 32}
    lrs = [p["train.learning_rate"] for p in draws]
    assert all(1e-6 <= v <= 1e-2 for v in lrs)
    # Log-uniform: each of the four decades gets about a quarter (uniform would put ~90%
    # in the top one).
    decades = [sum(math.floor(math.log10(v)) == d for v in lrs) for d in (-6, -5, -4, -3)]
    assert all(60 <= n <= 140 for n in decades), decades


def test_random_points_expand_to_valid_specs(base):
    sw = _random(
        {
            "train.learning_rate": {"distribution": "log_uniform", "min": 1e-5, "max": 1e-2},
            "run.seed": {"distribution": "int_uniform", "min": 0, "max": 1000},
            "custom.width": [1, 2],
        },
        num_runs=8,
    )
    specs = expand(base, sw)
    assert [s.run.tags["sweep_index"] for s in specs] == [str(i) for i in range(8)]
    assert all(s.custom["width"] in (1, 2) for s in specs)


# -- sweep files -------------------------------------------------------------------------


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_shipped_sweeps_expand_against_tiny_cpu(path, base):
    sw = load_sweep(path)
    specs = expand(base, sw)
    assert len(specs) == sw.size > 1
    assert all(s.run.tags["sweep"] == sw.name == path.stem for s in specs)


def test_shipped_sweeps_are_the_documented_ones():
    assert {p.name for p in SWEEPS} >= {"lr-seeds.yaml", "grokking-seeds.yaml"}
    grokking = load_sweep(ROOT / "configs" / "sweeps" / "grokking-seeds.yaml")
    assert grokking.parameters == {"run.seed": Choice((0, 1, 2))}


def test_sweep_files_read_exponents_as_numbers(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(
        "name: s\nmethod: random\nnum_runs: 2\n"
        "parameters:\n  train.learning_rate: {distribution: log_uniform, min: 1e-5, max: 1e-2}\n"
    )
    assert load_sweep(path).parameters["train.learning_rate"] == Distribution(
        "log_uniform", 1e-5, 1e-2
    )


BAD_SWEEPS = [
    ("name: s\nmethod: bayes\nparameters: {run.seed: [1]}", "method: must be one of grid, random"),
    ("name: s\nmethod: grdi\nparameters: {run.seed: [1]}", "(did you mean grid?)"),
    (
        "name: s\nparameters: {train.lr: [1, 2]}",
        "parameters: train.lr: unknown key (did you mean train.learning_rate?)",
    ),
    ("name: s\nparameters: {run.seed: []}", "parameters: run.seed: has no values"),
    ("name: s\nparameters: {run.seed: {values: []}}", "parameters: run.seed: has no values"),
    ("name: s\nparameters: {run.seed: 3}", "parameters: run.seed: expected a list of values"),
    ("name: s\nparameters: {run.seed: [1, 1]}", "parameters: run.seed: lists 1 twice"),
    ("name: s\nparameters: {}", "parameters: is required"),
    ("name: s\nparamters: {run.seed: [1]}", "paramters: unknown key (did you mean parameters?)"),
    ("method: grid\nparameters: {run.seed: [1]}", "name: is required"),
    ("name: Big_Name\nparameters: {run.seed: [1]}", "name: must be lower-case letters"),
    ("name: s\nnum_runs: 3\nparameters: {run.seed: [1]}", "num_runs: only applies to method"),
    ("name: s\nmethod: random\nparameters: {run.seed: [1]}", "num_runs: is required"),
    ("name: s\nmethod: random\nnum_runs: true\nparameters: {run.seed: [1]}", "positive integer"),
    (
        "name: s\nparameters: {train.learning_rate: {distribution: uniform, min: 0, max: 1}}",
        "a distribution needs method: random",
    ),
    (
        "name: s\nmethod: random\nnum_runs: 2\n"
        "parameters: {train.learning_rate: {distribution: loguniform, min: 1, max: 2}}",
        "distribution: must be one of uniform, log_uniform, int_uniform; got 'loguniform' "
        "(did you mean log_uniform?)",
    ),
    (
        "name: s\nmethod: random\nnum_runs: 2\n"
        "parameters: {train.learning_rate: {distribution: log_uniform, min: 0, max: 1}}",
        "min: must be > 0 for log_uniform",
    ),
    (
        "name: s\nmethod: random\nnum_runs: 2\n"
        "parameters: {train.learning_rate: {distribution: uniform, min: 2, max: 1}}",
        "min (2) must be less than max (1)",
    ),
    (
        "name: s\nmethod: random\nnum_runs: 2\n"
        "parameters: {run.seed: {distribution: int_uniform, min: 0.5, max: 9}}",
        "min: expected an integer",
    ),
    (
        "name: s\nmethod: random\nnum_runs: 2\n"
        "parameters: {run.seed: {distribution: int_uniform, min: 0}}",
        "max: is required with distribution: int_uniform",
    ),
    (
        "name: s\nmethod: random\nnum_runs: 2\nparameters: {run.seed: {value: [1]}}",
        "parameters: run.seed: value: unknown key (did you mean values?)",
    ),
    ("name: s\nparameters: {run.tags.sweep: [a]}", "is set by the sweep itself"),
    ("name: s\nparameters: {custom: [{}], custom.a: [1]}", "custom.a: overlaps custom"),
    ("name: s\nname: t\nparameters: {run.seed: [1]}", "duplicate key 'name'"),
    ("", "is empty"),
    ("- 1\n", "the top level must be a mapping"),
]


@pytest.mark.parametrize(("text", "fragment"), BAD_SWEEPS, ids=[f[1][:40] for f in BAD_SWEEPS])
def test_bad_sweep_files_are_one_line(tmp_path, text, fragment):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SpecError) as info:
        load_sweep(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{path}: ")
    assert fragment in message


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("name: s\nmethod: bayes\nparameters: {run.seed: [1]}", "method: must be one of"),
        ("name: s\nparameters: {train.lr: [1]}", "did you mean train.learning_rate?"),
        ("name: s\nparameters: {run.seed: []}", "has no values"),
        (
            "name: s\nmethod: random\nnum_runs: 2\n"
            "parameters: {train.learning_rate: {distribution: normal, min: 0, max: 1}}",
            "distribution: must be one of",
        ),
        ("name: s\nparameters: {run.seed: [0, 1, 2], custom.a: [1, 2]}", "--max-runs 5"),
        ("name: s\nparameters: {model.n_embd: [64, 65]}", "run 1 (model.n_embd=65)"),
    ],
)
def test_cli_rejects_bad_sweeps_with_one_line(tmp_path, text, fragment):
    (tmp_path / "bad.yaml").write_text(text)
    out = _cli(
        "sweep", str(TINY_SPEC), "bad.yaml", "--store", "st", "--max-runs", "5", cwd=tmp_path
    )
    assert out.returncode == 2, out.stderr
    assert out.stdout == ""
    assert "Traceback" not in out.stderr
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("driftlab: error: bad.yaml: ")
    assert fragment in out.stderr
    assert not (tmp_path / "st").exists()


def test_cli_rejects_a_missing_sweep_file(tmp_path):
    out = _cli("sweep", str(TINY_SPEC), "nope.yaml", cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr == "driftlab: error: nope.yaml: no such file; check the path " + (
        "(examples are in configs/sweeps/)\n"
    )


# -- the command line --------------------------------------------------------------------


def _write_sweep(path: Path, name: str = "cli-sweep") -> Path:
    path.write_text(
        f"name: {name}\nparameters:\n  train.learning_rate: [1e-4, 1e-3]\n"
        "  custom.width_mult: [1, 2]\n"
    )
    return path


def test_cli_registers_runs_listed_by_sweep_name(tmp_path):
    sweep_file = _write_sweep(tmp_path / "s.yaml")
    store_dir = tmp_path / "store"
    out = _cli("sweep", str(TINY_SPEC), str(sweep_file), "--store", str(store_dir))
    assert out.returncode == 0, out.stderr
    run_ids = out.stdout.split()
    assert len(run_ids) == 4 and len(set(run_ids)) == 4
    assert all(layout.validate_run_id(r).startswith("tiny-cpu-") for r in run_ids)
    assert "grid 2 x 2 = 4 runs" in out.stderr
    assert "driftlab runs --filter run.tags.sweep=cli-sweep" in out.stderr

    listed = _cli(
        "runs",
        "--store",
        str(store_dir),
        "--filter",
        "run.tags.sweep=cli-sweep",
        "--sort-by",
        "run.tags.sweep_index",
        "--format",
        "json",
    )
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert [r["run_id"] for r in rows] == run_ids
    assert [(r["custom.width_mult"], r["run.tags.sweep_index"]) for r in rows] == [
        (1, "0"),
        (2, "1"),
        (1, "2"),
        (2, "3"),
    ]
    table = _cli("runs", "--store", str(store_dir), "--filter", "run.tags.sweep=cli-sweep")
    assert "custom.width_mult" in table.stdout.splitlines()[0]

    store = open_store(store_dir)
    specs = [parse_spec(store.get_text(layout.spec_key(r))) for r in run_ids]
    assert [s.train.learning_rate for s in specs] == [1e-4, 1e-4, 1e-3, 1e-3]

    again = _cli("sweep", str(TINY_SPEC), str(sweep_file), "--store", str(store_dir))
    assert again.returncode == 2 and again.stdout == ""
    assert "already has 4 run(s) of sweep cli-sweep" in again.stderr
    assert len(load_rows(store)) == 4


def test_dry_run_prints_the_points_and_writes_nothing(tmp_path):
    sweep_file = _write_sweep(tmp_path / "s.yaml")
    out = _cli(
        "sweep", str(TINY_SPEC), str(sweep_file), "--store", str(tmp_path / "st"), "--dry-run"
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["sweep_index", "train.learning_rate", "custom.width_mult"]
    assert [line.split() for line in lines[1:]] == [
        ["0", "0.0001", "1"],
        ["1", "0.0001", "2"],
        ["2", "0.001", "1"],
        ["3", "0.001", "2"],
    ]
    assert "dry run, nothing written" in out.stderr
    assert not (tmp_path / "st").exists()


def test_dry_run_and_local_exclude_each_other(tmp_path):
    out = _cli(
        "sweep", str(TINY_SPEC), str(_write_sweep(tmp_path / "s.yaml")), "--dry-run", "--local"
    )
    assert out.returncode == 2 and "not allowed with argument" in out.stderr


# -- create_run --------------------------------------------------------------------------


def test_create_run_writes_the_spec_once(tmp_path, base):
    store = open_store(tmp_path / "store")
    run_id = create_run(store, base)
    assert run_id.startswith("tiny-cpu-")
    assert store.get_text(layout.spec_key(run_id)) == spec_to_yaml(base)
    assert create_run(store, base, run_id) == run_id  # the same spec again: a no-op
    changed = apply_overrides(base, {"train.learning_rate": 3e-4})
    with pytest.raises(RegistryError) as info:
        create_run(store, changed, run_id)
    message = str(info.value)
    assert f"run {run_id} in {store.url} already has a different spec" in message
    assert "train.learning_rate is 0.003 there, 0.0003 here" in message
    assert parse_spec(store.get_text(layout.spec_key(run_id))) == base


def test_create_run_refuses_to_overwrite_an_unreadable_spec(tmp_path, base):
    store = open_store(tmp_path / "store")
    store.put_text(layout.spec_key("hand-made"), "train: [oops\n")
    with pytest.raises(RegistryError, match=r"its spec\.yaml is unreadable"):
        create_run(store, base, "hand-made")


def test_create_run_checks_the_given_id(tmp_path, base):
    with pytest.raises(LayoutError):
        create_run(open_store(tmp_path / "store"), base, "Not_A_Label")


def test_create_run_draws_a_taken_id_again(tmp_path, base, monkeypatch):
    store = open_store(tmp_path / "store")
    taken = create_run(store, base, "tiny-cpu-20260101-000000-aaaaaa")
    ids = iter([taken, "tiny-cpu-20260101-000000-bbbbbb"])
    monkeypatch.setattr(layout, "new_run_id", lambda name: next(ids))
    assert create_run(store, apply_overrides(base, {"run.seed": 5})) == (
        "tiny-cpu-20260101-000000-bbbbbb"
    )


# -- --local -----------------------------------------------------------------------------


def _fake_run_local(log: Path) -> Any:
    """A stand-in for the workflow executor: notes each run; the run with run.seed 1 fails."""

    def run_local(run_id: str, store_url: str) -> int:
        spec = yaml.safe_load(open_store(store_url).get_text(layout.spec_key(run_id)))
        seed = spec["run"]["seed"]
        with log.open("a") as out:
            out.write(f"{run_id}\n")
        return 1 if seed == 1 else 0

    return run_local


def test_local_runs_every_run_in_order_past_a_failure(tmp_path, monkeypatch, capfd):
    log = tmp_path / "log.txt"
    monkeypatch.setattr(sweep_command, "run_local", _fake_run_local(log))
    sweep_file = tmp_path / "s.yaml"
    sweep_file.write_text("name: local\nparameters: {run.seed: [0, 1, 2]}\n")
    store_dir = str(tmp_path / "store")
    code = cli.main(["sweep", str(TINY_SPEC), str(sweep_file), "--store", store_dir, "--local"])
    out, err = capfd.readouterr()
    assert code == 1
    run_ids = out.split()  # only run ids
    assert len(run_ids) == 3
    assert log.read_text().splitlines() == run_ids
    table = {line.split()[0]: line for line in err.splitlines() if line.startswith("tiny-cpu-")}
    assert "succeeded" in table[run_ids[0]] and "succeeded" in table[run_ids[2]]
    assert "failed" in table[run_ids[1]]
    assert "1 of 3 runs failed" in err


def test_run_local_runs_the_compiled_workflow(tmp_path, monkeypatch, capfd):
    """The sweep's local path is the workflow executor: a failing first stage is reported."""
    store_dir = str(tmp_path / "store")
    sweep_file = tmp_path / "s.yaml"
    sweep_file.write_text("name: exec\nparameters: {run.seed: [0]}\n")
    seen: list[list[str]] = []
    from workflows import local

    real = local.run_workflow

    def spy(workflow: Any, **kwargs: Any) -> Any:
        for template in workflow["spec"]["templates"]:
            if "container" in template:
                seen.append(template["container"]["command"])
                # Every stage fails at once, so no real training runs.
                template["container"]["command"] = ["python", "-c", "import sys; sys.exit(4)"]
        return real(workflow, **kwargs)

    monkeypatch.setattr(local, "run_workflow", spy)
    code = cli.main(["sweep", str(TINY_SPEC), str(sweep_file), "--store", store_dir, "--local"])
    _, err = capfd.readouterr()
    assert code == 1
    assert ["python", "-m", "services.trainer"] in seen
    assert "pipeline.train failed: exit code 4" in err
