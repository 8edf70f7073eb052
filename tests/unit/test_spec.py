"""The run spec: every shipped config validates, and every mistake is one clear line."""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from shared import stage_registry
from shared.errors import SpecError
from shared.memory import parse_memory
from shared.spec import (
    MODEL_PRESETS,
    SECTIONS,
    ModelSizes,
    ResourcesSpec,
    RunSpec,
    apply_overrides,
    flatten_spec,
    load_spec,
    model_sizes,
    parse_overrides,
    parse_spec,
    section_digest,
    spec_from_dict,
    spec_to_dict,
    spec_to_yaml,
)
from tests.support import ROOT

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli", "spec", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )


def _error(text: str) -> str:
    with pytest.raises(SpecError) as info:
        parse_spec(text, "x.yaml")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("x.yaml: ")
    return message


# -- shipped configs ---------------------------------------------------------------------


def test_configs_exist():
    assert ROOT / "configs" / "tiny-cpu.yaml" in CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_config_validates_and_round_trips(path):
    spec = load_spec(path)
    assert parse_spec(spec_to_yaml(spec)) == spec


def test_tiny_cpu_is_tiny():
    spec = load_spec(ROOT / "configs" / "tiny-cpu.yaml")
    assert spec.run.name == "tiny-cpu"
    sizes = model_sizes(spec)
    assert (sizes.n_layer, sizes.n_embd) == (1, 128)  # one block: the demo learns in seconds
    assert spec.train.steps is not None and spec.train.steps <= 1000
    assert all(spec.resources.for_stage(s).gpus == 0 for s in stage_registry.STATUS_NAMES)


def test_defaults_are_valid_and_round_trip():
    spec = RunSpec()
    assert parse_spec(spec_to_yaml(spec)) == spec
    assert list(spec_to_dict(spec)) == list(SECTIONS)
    assert spec.train.steps == 200 and spec.train.epochs is None


def test_every_field_says_what_it_is_for():
    def models(model: type[BaseModel]) -> list[type[BaseModel]]:
        found = [model]
        for info in model.model_fields.values():
            if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
                found += models(info.annotation)
        return found

    undocumented = [
        f"{model.__name__}.{name}"
        for model in models(RunSpec)
        for name, info in model.model_fields.items()
        if not info.description
    ]
    assert undocumented == []


# -- the real CLI: one line, exit code 2, no traceback -----------------------------------

BAD_SPECS = {
    "unknown-key": (
        "train:\n  lr: 0.1\n",
        "train.lr: unknown key (did you mean train.learning_rate?)",
    ),
    "wrong-type": (
        "train:\n  batch_size: abc\n",
        "train.batch_size: expected an integer, got 'abc'",
    ),
    "out-of-range": ("train:\n  learning_rate: -1\n", "train.learning_rate: must be > 0, got -1"),
    "bad-enum": (
        "train:\n  schedule: cosin\n",
        "train.schedule: must be one of cosine, linear, constant; got 'cosin'",
    ),
    "malformed-yaml": ("train:\n  steps: [1,\n  x: 2\n", ": line 4, column 1: invalid YAML: "),
    "duplicate-key": (
        "train: {}\nmodel: {}\ntrain: {}\n",
        "duplicate key 'train' (first on line 1)",
    ),
    "empty": ("# nothing here yet\n", "is empty; start from configs/tiny-cpu.yaml"),
    "non-mapping": ("- train\n- model\n", "the top level must be a mapping of sections"),
    "section-not-mapping": ("train: 5\n", "train: expected a mapping, got 5"),
    "run-name": ("run:\n  name: My Run\n", "run.name: must be lower-case"),
    "cross-field": ("data:\n  max_length: 1000\n", "data.max_length: 1000 exceeds"),
    "several": ("train:\n  lr: 1\n  steps: x\nmodel:\n  arch: big\n", "(and 2 more)"),
}


@pytest.mark.parametrize("case", sorted(BAD_SPECS))
def test_cli_reports_bad_spec_in_one_line(tmp_path, case):
    text, expected = BAD_SPECS[case]
    path = tmp_path / f"{case}.yaml"
    path.write_text(text)
    out = _cli("validate", str(path))
    assert out.returncode == 2, out
    assert out.stdout == ""
    lines = out.stderr.splitlines()
    assert len(lines) == 1, out.stderr
    assert "Traceback" not in out.stderr
    assert lines[0].startswith(f"driftlab: error: {path}: ")
    assert expected in lines[0]


def test_cli_validates_every_file_past_a_bad_one(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  n_layer: -1\n")
    out = _cli("validate", str(bad), "configs/tiny-cpu.yaml")
    assert out.returncode == 2
    assert out.stdout == "configs/tiny-cpu.yaml: ok\n"
    (line,) = out.stderr.splitlines()
    assert line.startswith(f"driftlab: error: {bad}: model.n_layer")


@pytest.mark.parametrize("kind", ["missing", "directory"])
def test_cli_reports_unreadable_path(tmp_path, kind):
    path = tmp_path / "nope.yaml" if kind == "missing" else tmp_path
    out = _cli("validate", str(path))
    assert out.returncode == 2
    assert len(out.stderr.splitlines()) == 1 and "Traceback" not in out.stderr
    assert f"{path}: " in out.stderr
    assert ("no such file" if kind == "missing" else "is a directory") in out.stderr


def test_cli_custom_accepts_anything(tmp_path):
    path = tmp_path / "custom.yaml"
    path.write_text(
        "custom:\n  ablation: no-warmup\n  grid: {lr: [1e-3, 3e-4], depth: 2}\n"
        "  when: 2026-11-22\n  note: null\n"
    )
    out = _cli("validate", str(path))
    assert out.returncode == 0, out.stderr
    flat = flatten_spec(load_spec(path))
    assert flat["custom.grid.lr"] == [1e-3, 3e-4]
    assert flat["custom.when"] == "2026-11-22"
    assert flat["custom.ablation"] == "no-warmup"


def test_cli_show_round_trips(tmp_path):
    path = tmp_path / "show.yaml"
    path.write_text(
        "run:\n  name: show-me\n  seed: 3\n  tags: {sweep: lr, flag: true}\n"
        "  notes: \"Ünïcode, 'quotes' and: colons\"\n"
        "train:\n  epochs: 2\n  learning_rate: 3e-4\n"
        "sae:\n  layers: [2, 0, 2]\n"
        "custom:\n  as_text: '1e-3'\n  yes_text: 'yes'\n  nested: {a: [1, {b: 2}]}\n"
    )
    out = _cli("show", str(path))
    assert out.returncode == 0, out.stderr
    shown = parse_spec(out.stdout, "shown")
    assert shown == load_spec(path)
    assert spec_to_yaml(shown) == out.stdout
    assert shown.train.learning_rate == 3e-4 and shown.train.steps is None
    assert shown.sae.layers == [0, 2]
    assert shown.custom["as_text"] == "1e-3" and shown.custom["yes_text"] == "yes"
    assert shown.run.tags == {"sweep": "lr", "flag": "true"}


# -- messages, in process ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("training: {}\n", "training: unknown key (did you mean train?)"),
        ("learning_rate: 0.1\n", "learning_rate: unknown key (did you mean train.learning_rate?)"),
        (
            "model:\n  tokenizer: gpt2\n",
            "model.tokenizer: unknown key (did you mean data.tokenizer?)",
        ),
        ("train:\n  Learning-Rate: 1\n", "(did you mean train.learning_rate?)"),
        (
            "resources:\n  sae: {gpu: 1}\n",
            "resources.sae.gpu: unknown key (did you mean resources.sae.gpus?)",
        ),
        ("train:\n  zzz: 1\n", "train.zzz: unknown key (valid keys: steps, epochs,"),
        ("train:\n  steps: true\n", "train.steps: expected an integer, got true"),
        ("train:\n  steps: 1.5\n", "train.steps: expected an integer, got 1.5"),
        ("train:\n  learning_rate: .nan\n", "train.learning_rate: must be a finite number"),
        ("train:\n  betas: [0.9]\n", "train.betas: expected a list of two numbers"),
        ("train:\n  betas: [0.9, 1.5]\n", "train.betas[1]: must be < 1, got 1.5"),
        (
            "train:\n  steps: 5\n  epochs: 2\n",
            "train.epochs: set train.steps or train.epochs, not both",
        ),
        ("train:\n  resume_from: Other:3\n", "train.resume_from: must be RUN_ID, RUN_ID:STEP"),
        (
            "extract:\n  sites: [attn]\n",
            "extract.sites[0]: must be one of attn_out, mlp_out, resid_mid; got 'attn' (did you mean attn_out?)",
        ),
        ("extract:\n  steps: [0, -1]\n", "extract.steps: must be all or a non-empty list"),
        ("extract:\n  steps: [0, 300]\n", "extract.steps: 300 is after the last training step"),
        ("model:\n  arch: custom\n  n_layer: 2\n", "model.n_head: is required with arch: custom"),
        (
            "model:\n  n_embd: 100\n  n_head: 3\n",
            "model.n_embd: n_embd 100 is not divisible by n_head 3",
        ),
        ("model:\n  init: pretrained\n", "model.pretrained: init: pretrained needs the weights"),
        ("data:\n  tokenizer: bytes\n", "data.tokenizer: must be byte, numbers, gpt2 or a path"),
        ("data:\n  dataset: text\n", "data.path: dataset text needs data.path"),
        ("data:\n  path: x.txt\n", "data.path: dataset arithmetic is generated"),
        ("sae:\n  arch: topk\n", "sae.k: arch topk needs k"),
        ("sae:\n  arch: topk\n  k: 9999\n", "sae.k: 9999 exceeds the SAE's 320 features"),
        ("sae:\n  sparsity_loss: target_l0\n", "sae.target_l0: sparsity_loss target_l0 needs"),
        (
            "sae:\n  layers: [0, 3]\n",
            "sae.layers: layer 3 does not exist: hidden-state layers are 0..2",
        ),
        ("sae:\n  layers: [0]\ndetect:\n  layers: [1]\n", "detect.layers: layer 1 has no SAE"),
        ("detect:\n  num_samples: 4\n", "detect.temperature: num_samples > 1 with temperature 0"),
        ("ot:\n  pca_components: 65\n", "ot.pca_components: 65 exceeds the model's n_embd (64)"),
        ("resources:\n  train: {memory: 512m}\n", "(did you mean 512Mi?)"),
        (
            "resources:\n  train: {cpu: 2 cores}\n",
            "resources.train.cpu: must be a positive Kubernetes CPU quantity",
        ),
        ("resources:\n  train: {cpu: 0}\n", "resources.train.cpu: must be a positive"),
        ("run:\n  seed: -3\n", "run.seed: must be >= 0, got -3"),
        ("run:\n  tags: {a: [1]}\n", "run.tags.a: expected a string, got [1]"),
        ("run:\n  name: My_Run\n", "(did you mean my-run?)"),
        ("custom:\n  1: x\n", "custom: keys must be strings, got 1"),
        ("custom:\n  a: {2: x}\n", "custom.a: keys must be strings, got 2"),
        ("1: x\n", "top level: keys must be strings, got 1"),
        ("just text\n", "the top level must be a mapping of sections"),
    ],
)
def test_error_messages(text, expected):
    assert expected in _error(text)


def test_a_bad_run_seed_is_reported_once():
    assert _error("run:\n  seed: -3\n").endswith("got -3")


def test_load_spec_rejects_non_utf8(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("run:\n  notes: caf\xe9\n".encode("latin-1"))
    with pytest.raises(SpecError, match=r"latin1\.yaml: is not UTF-8 text"):
        load_spec(path)


def test_spec_from_dict_names_the_source():
    with pytest.raises(SpecError, match=r"^store://x/spec\.yaml: train\.lr: unknown key"):
        spec_from_dict({"train": {"lr": 1}}, "store://x/spec.yaml")


# -- meaning of values -------------------------------------------------------------------


def test_exponent_floats_and_empty_sections():
    spec = parse_spec("train:\n  learning_rate: 3e-4\nsae:\nhmm:\n")
    assert spec.train.learning_rate == pytest.approx(3e-4)
    assert spec.sae == RunSpec().sae and spec.hmm == RunSpec().hmm


def test_section_seeds_follow_run_seed_unless_pinned():
    spec = parse_spec("run:\n  seed: 7\ntrain:\n  seed: 1\n")
    assert spec.train.seed == 1
    assert spec.data.seed == spec.ot.seed == spec.hmm.seed == 7
    for written in ("'5'", "'+5'", "'5.0'", "5.0"):  # whatever pydantic makes 5 of
        assert parse_spec(f"run:\n  seed: {written}\n").data.seed == 5
    moved = apply_overrides(spec, {"run.seed": 9})
    assert moved.data.seed == moved.sae.seed == 9
    assert moved.train.seed == 1


def test_epochs_replace_the_default_steps():
    spec = parse_spec("train:\n  epochs: 3\n")
    assert spec.train.epochs == 3 and spec.train.steps is None
    swept = apply_overrides(RunSpec(), {"train.epochs": 2, "sae.tokens": 10_000})
    assert swept.train.steps is None and swept.train.epochs == 2
    assert swept.sae.epochs is None and swept.sae.tokens == 10_000


@pytest.mark.parametrize("arch", sorted(MODEL_PRESETS))
def test_model_presets(arch):
    assert model_sizes(parse_spec(f"model:\n  arch: {arch}\n")) == MODEL_PRESETS[arch]


def test_model_sizes_match_hugging_face_and_explicit_sizes_override():
    assert MODEL_PRESETS["gpt2"] == (12, 12, 768, 1024)
    assert MODEL_PRESETS["gpt2-medium"] == (24, 16, 1024, 1024)
    assert MODEL_PRESETS["gpt2-large"] == (36, 20, 1280, 1024)
    assert MODEL_PRESETS["gpt2-xl"] == (48, 25, 1600, 1024)
    spec = parse_spec("model:\n  arch: gpt2-medium\n  n_layer: 6\n")
    assert spec.model.resolved_sizes() == ModelSizes(6, 16, 1024, 1024)
    custom = parse_spec("model:\n  arch: custom\n  n_layer: 3\n  n_head: 4\n  n_embd: 32\n")
    assert model_sizes(custom) == (3, 4, 32, 1024)


def test_resume_point():
    def parse(value: str) -> tuple[str, int | None] | None:
        return parse_spec(f"train:\n  resume_from: {value}\n").train.resume_point()

    run = "base-20261122-103005-abcdef"
    assert parse(run) == (run, None)
    assert parse(f"{run}:400") == (run, 400)
    assert parse(f"runs/{run}/train/checkpoints/step-000400/") == (run, 400)
    assert RunSpec().train.resume_point() is None


def test_resources_cover_every_stage_and_take_k8s_quantities():
    assert set(ResourcesSpec.model_fields) == {*stage_registry.STATUS_NAMES, "gpu_budget"}
    spec = parse_spec("resources:\n  train: {cpu: 2, memory: 4Gi, gpus: 1}\n  ot: {cpu: 0.5}\n")
    assert spec.resources.for_stage("train").cpu == "2"
    assert spec.resources.for_stage("train").gpus == 1
    assert spec.resources.ot.cpu == "0.5"
    with pytest.raises(KeyError):
        spec.resources.for_stage("gpu_budget")  # a budget, not a stage


def test_fan_out_limits_follow_parallelism_then_the_gpu_budget():
    spec = parse_spec(
        "resources:\n  gpu_budget: 4\n  sae: {gpus: 2}\n  extract: {parallelism: 3}\n"
    )
    assert spec.resources.fan_out_limit("sae", on_gpu=True) == 2  # 4 GPUs, 2 a pod
    assert spec.resources.fan_out_limit("sae", on_gpu=False) is None
    assert spec.resources.fan_out_limit("extract", on_gpu=False) == 3
    assert RunSpec().resources.fan_out_limit("sae", on_gpu=True) == 1
    with pytest.raises(SpecError, match=r"resources\.sae\.parallelism"):
        parse_spec("resources:\n  sae: {parallelism: 0}\n")


def test_specs_are_frozen():
    spec = RunSpec()
    with pytest.raises(ValidationError):
        spec.train.steps = 5


# -- digests, flattening, overrides ------------------------------------------------------


def test_section_digest_is_stable_across_key_order_and_processes():
    data: dict[str, dict[str, Any]] = {
        "train": {"learning_rate": 1e-3, "steps": 50, "betas": [0.9, 0.99]},
        "run": {"seed": 1},
    }
    shuffled = {
        "run": {"seed": 1},
        "train": dict(reversed(list(data["train"].items()))),
    }
    a, b = spec_from_dict(data), spec_from_dict(shuffled)
    assert section_digest(a, "train") == section_digest(b, "train")
    assert len(section_digest(a, "train")) == 64
    assert section_digest(a, "train") != section_digest(RunSpec(), "train")
    assert section_digest(a, "ot") == section_digest(apply_overrides(a, {"train.steps": 60}), "ot")

    code = (
        "from shared.spec import load_spec, section_digest;"
        "print(section_digest(load_spec('configs/tiny-cpu.yaml'), 'sae'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert out.stdout.strip() == section_digest(load_spec(ROOT / "configs/tiny-cpu.yaml"), "sae")


def test_section_digest_rejects_unknown_section():
    with pytest.raises(ValueError, match="unknown spec section"):
        section_digest(RunSpec(), "trian")


def test_flatten_spec():
    spec = apply_overrides(RunSpec(), {"run.tags.sweep": "lr", "custom.grid.depth": 2})
    flat = flatten_spec(spec)
    assert flat["train.learning_rate"] == 1e-3
    assert flat["train.betas"] == [0.9, 0.95]
    assert flat["run.tags.sweep"] == "lr"
    assert flat["custom.grid.depth"] == 2
    assert flatten_spec(spec_to_dict(spec)) == flat


def test_apply_overrides_validates_and_leaves_the_original_alone():
    base = RunSpec()
    new = apply_overrides(
        base, {"train.learning_rate": "3e-4", "model.arch": "gpt2", "custom.x": 1}
    )
    assert new.train.learning_rate == pytest.approx(3e-4)
    assert new.model.arch == "gpt2" and new.custom == {"x": 1}
    assert base.model.arch == "tiny" and base.custom == {}


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            {"train.lr": 1e-3},
            "overrides: train.lr: unknown key (did you mean train.learning_rate?)",
        ),
        ({"trian.steps": 1}, "overrides: trian: unknown key (did you mean train?)"),
        ({"train.steps.x": 1}, "overrides: train.steps.x: train.steps is a value, not a section"),
        ({"train.learning_rate": -1}, "overrides: train.learning_rate: must be > 0, got -1"),
        ({"train.schedule": "cosin"}, "overrides: train.schedule: must be one of cosine"),
    ],
)
def test_apply_overrides_rejects(overrides, expected):
    with pytest.raises(SpecError) as info:
        apply_overrides(RunSpec(), overrides)
    assert expected in str(info.value)


def test_parse_overrides_reads_yaml_values_and_rejects_bad_pairs():
    pairs = ["train.steps=100", "train.betas=[0.9, 0.98]", "run.notes=a=b", "custom.lr=1e-3"]
    assert parse_overrides(pairs) == {
        "train.steps": 100,
        "train.betas": [0.9, 0.98],
        "run.notes": "a=b",
        "custom.lr": 0.001,  # a float, as in a spec file (plain YAML 1.1 reads a string)
    }
    with pytest.raises(SpecError, match="duplicate key"):
        parse_overrides(["custom.x={a: 1, a: 2}"])
    for bad, words in (("train.steps", "expected KEY=VALUE"), ("x=[1", "not valid YAML")):
        with pytest.raises(SpecError, match=words):
            parse_overrides([bad])


def _alias_bomb(levels: int = 9) -> str:
    """`levels` anchors, each a list of nine aliases of the one before: 9^levels values."""
    lines = ["run: {name: bomb}", "custom:", "  l0: &l0 [" + ",".join(['"lol"'] * 9) + "]"]
    for i in range(1, levels):
        lines.append(f"  l{i}: &l{i} [{','.join([f'*l{i - 1}'] * 9)}]")
    return "\n".join(lines) + "\n"


def test_an_alias_bomb_is_refused_at_once_in_one_line(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(_alias_bomb())
    assert len(path.read_bytes()) < 500  # 9^9 = 387 million values, as written
    start = time.monotonic()
    proc = _cli("validate", str(path))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "aliases expand to over 100,000 values" in proc.stderr
    assert time.monotonic() - start < 10  # minutes and gigabytes before the budget
    with pytest.raises(SpecError, match="alias bomb"):
        parse_spec(_alias_bomb(), "bomb.yaml")
    # A few aliases within the budget still read as before.
    spec = parse_spec("custom:\n  base: &b {lr: 1}\n  copy: *b\n", "ok.yaml")
    assert spec.custom == {"base": {"lr": 1}, "copy": {"lr": 1}}


def test_a_spec_over_one_megabyte_is_refused(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("run: {name: big}\ncustom:\n  notes: " + "x" * (1 << 20) + "\n")
    proc = _cli("validate", str(path))
    assert proc.returncode == 2 and "over the 1,048,576-byte limit" in proc.stderr, proc.stderr


def test_a_bomb_in_a_set_value_is_refused():
    value = _alias_bomb().split("custom:\n", 1)[1].replace("\n  ", ", ").strip()
    with pytest.raises(SpecError, match="alias bomb"):
        parse_overrides([f"custom.x={{{value}}}"])


@pytest.mark.parametrize(
    ("section", "stage"),
    [
        ("model: {arch: custom, n_layer: 100000, n_head: 1, n_embd: 1000000000}", "train"),
        ("train: {batch_size: 1000000000}", "train"),
        ("sae: {expansion: 1000000}", "sae"),
    ],
)
def test_absurd_sizes_are_one_line_before_any_work(tmp_path, section, stage):
    """A size no machine could hold is refused by `spec validate --memory`, and the absurd
    model size even without it (no machine has a PiB), in one line, in a second."""
    path = tmp_path / "absurd.yaml"
    path.write_text(f"run: {{name: absurd}}\n{section}\n")
    start = time.monotonic()
    proc = _cli("validate", str(path), "--memory", "24GiB")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"the {stage} stage needs at least" in proc.stderr and "24GiB" in proc.stderr
    assert time.monotonic() - start < 10
    assert _cli("validate", "configs/gpt2-medium.yaml", "--memory", "24GiB").returncode == 0
    if "n_embd: 1000000000" in section:
        assert "more than any one machine has" in _cli("validate", str(path)).stderr


def test_memory_sizes_read_as_people_write_them():
    assert parse_memory("24GiB") == 24 * 2**30 and parse_memory("80G") == 80 * 10**9
    assert parse_memory("512Mi") == 512 * 2**20 and parse_memory("1000") == 1000
    with pytest.raises(SpecError, match="--memory lots"):
        parse_memory("lots")
