"""The pipeline's integration test: the tiny spec through the real graph, run locally.

`driftlab run` executes the compiled Argo workflow, every stage a real subprocess, once on
a folder store and once on S3 (moto); then a run killed during extraction is rerun and
finishes with the stages already done cached. It needs every stage (extract, ot, sae
train/detect, evaluate) to exist.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from shared import layout
from shared.spec import apply_overrides, load_spec, model_sizes, spec_to_yaml
from shared.store import Store, open_store
from tests.support import ROOT, TINY_SPEC

#: configs/tiny-cpu.yaml (what `make demo` runs) with fewer steps and SAE tokens, so the
#: runs below fit in CI's time; the graph and every stage are the same.
FASTER = {"train.steps": 40, "sae.tokens": 16384, "ot.bootstrap": 5}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("spec") / "tiny-ci.yaml"
    spec = apply_overrides(load_spec(TINY_SPEC), FASTER)
    path.write_text(spec_to_yaml(spec))
    return path


def _driftlab(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=ROOT,
        check=False,
    )


def _assert_complete(store: Store, run_id: str, tiny: Path) -> None:
    spec = load_spec(tiny)
    assert spec.train.steps is not None
    steps = list(range(0, spec.train.steps + 1, spec.train.checkpoint_every))
    layers = range(model_sizes(spec).n_layer + 1)
    keys = [
        layout.spec_key(run_id),
        layout.train_done_key(run_id),
        layout.train_metrics_key(run_id),
        *(layout.checkpoint_done_key(run_id, s) for s in steps),
        layout.probe_key(run_id),
        *(layout.extract_done_key(run_id, s) for s in steps),
        layout.ot_drift_key(run_id),
        layout.ot_phases_key(run_id),
        layout.ot_done_key(run_id),
        *(layout.sae_done_key(run_id, layer) for layer in layers),
        *(layout.sae_weights_key(run_id, layer) for layer in layers),
        *(
            (layout.detect_scores_key(run_id), layout.detect_done_key(run_id))
            if spec.detect.enabled
            else ()
        ),
        layout.evaluate_report_json_key(run_id),
        layout.evaluate_report_html_key(run_id),
        layout.evaluate_done_key(run_id),
        layout.status_key(run_id, "workflow"),
    ]
    missing = [k for k in keys if not store.exists(k)]
    assert missing == []
    assert store.get_json(layout.status_key(run_id, "workflow"))["state"] == "succeeded"


def _run_and_check(store_url: str, tiny: Path) -> str:
    done = _driftlab("run", str(tiny), "--store", store_url, "--workers", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    run_id = lines[0]
    layout.validate_run_id(run_id)
    stages = ["train", "list-checkpoints", "extract", "ot", "sae-train", "evaluate"]
    if load_spec(tiny).detect.enabled:
        stages.append("detect")
    for stage in stages:
        assert any(line.split()[0].startswith(stage) for line in lines[1:]), stage
    assert lines[-1].startswith("report: ") and lines[-1].endswith("evaluate/report.html")
    _assert_complete(open_store(store_url), run_id, tiny)
    return run_id


def _assert_the_demo_meets_its_goals(report: dict) -> None:
    """The demo's promise (README, "What the demo shows"), as the report states it."""
    accuracy = report["training"]["eval"]["eval_accuracy"]
    assert accuracy[-1] >= 0.9 and accuracy[0] < 0.1
    crossing = report["phases"]["crossing"]
    checkpoints = report["phases"]["checkpoints"]
    assert checkpoints.index(crossing["step"]) >= 2, "a transition, not a model good from the start"
    assert abs(crossing["nearest"]["ot_significant"]["offset_checkpoints"]) <= 1, crossing
    assert abs(crossing["nearest"]["hmm"]["offset_checkpoints"]) <= 2, crossing
    verdicts = {(c["stage"], c.get("shard"), c["check"]): c for c in report["quality"]}
    assert [key for key, c in verdicts.items() if c["verdict"] == "fail"] == []
    assert sorted(report["sae"]["layers"]) == ["0", "1"]  # embeddings and the one block
    for layer in report["sae"]["layers"]:
        shard = f"layer-{int(layer):02d}"
        assert verdicts[("sae", shard, "explained_variance")]["value"] >= 0.8
        assert verdicts[("sae", shard, "ce_loss_recovered")]["value"] >= 0.9
        assert verdicts[("sae", shard, "held_out_tokens")]["value"] >= 2000


def _demo_report(tmp_path: Path, seed: int) -> dict:
    """Run configs/tiny-cpu.yaml as shipped (seed 0) or with another seed; its report."""
    spec = TINY_SPEC
    if seed != 0:
        spec = tmp_path / f"tiny-cpu-seed-{seed}.yaml"
        spec.write_text(spec_to_yaml(apply_overrides(load_spec(TINY_SPEC), {"run.seed": seed})))
    store_url = str(tmp_path / "store")
    run_id = _run_and_check(store_url, spec)
    return open_store(store_url).get_json(layout.evaluate_report_json_key(run_id))


def test_the_demo_learns_through_a_transition_and_judges_itself_ok(tmp_path):
    """`make demo` as shipped: a model that learns, SAEs that reconstruct, no fail verdict."""
    _assert_the_demo_meets_its_goals(_demo_report(tmp_path, seed=0))


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
def test_the_demo_meets_its_goals_on_other_seeds(tmp_path, seed):
    """The same promise on seeds 1 and 2 (seed 0 is `make test`'s): three seeds in all."""
    _assert_the_demo_meets_its_goals(_demo_report(tmp_path, seed))


def test_tiny_spec_end_to_end_on_s3(s3_store_url, tiny):
    _run_and_check(s3_store_url, tiny)


# slow: two pipelines (50 s); the stage tests kill and resume each stage in `make test`,
# and the 20-seed fault-injection test below kills whole runs at random moments
@pytest.mark.slow
def test_a_run_killed_during_extraction_resumes_with_finished_stages_cached(tmp_path, tiny):
    store_url = str(tmp_path / "store")
    store = open_store(store_url)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cli",
            "run",
            str(tiny),
            "--store",
            store_url,
            "--workers",
            "2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert proc.stdout is not None
    run_id = proc.stdout.readline().strip()
    deadline = time.monotonic() + 480
    while not store.exists(layout.probe_key(run_id)) and proc.poll() is None:
        assert time.monotonic() < deadline, "extraction never started"
        time.sleep(0.2)
    # SIGTERM, not SIGINT: a CI job started in the background inherits SIGINT ignored.
    os.kill(proc.pid, signal.SIGTERM)
    proc.communicate(timeout=120)
    assert not store.exists(layout.evaluate_done_key(run_id))

    rerun = _driftlab("run", str(tiny), "--store", store_url, "--run", run_id)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert store.get_json(layout.status_key(run_id, "train"))["state"] == "cached"
    _assert_complete(store, run_id, tiny)
    again = _driftlab("run", str(tiny), "--store", store_url, "--run", run_id)
    assert again.returncode == 0
    statuses = [store.get_json(k) for k in store.list(layout.status_prefix(run_id))]
    stage_states = {s["state"] for s in statuses if s.get("stage") != "workflow"}
    assert stage_states == {"cached"}


def test_a_second_driftlab_run_of_one_run_is_refused_at_once(tmp_path, tiny):
    """Two `driftlab run` of one run id used to both proceed (the trainer ran twice)."""
    store_url = str(tmp_path / "store")
    store = open_store(store_url)
    first = subprocess.Popen(
        [sys.executable, "-m", "cli", "run", str(tiny), "--store", store_url],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT,
    )  # fmt: skip
    try:
        assert first.stdout is not None
        run_id = first.stdout.readline().strip()
        deadline = time.monotonic() + 60
        while not store.exists(layout.lease_key(run_id)):
            assert time.monotonic() < deadline and first.poll() is None, "never took the lease"
            time.sleep(0.1)
        start = time.monotonic()
        second = _driftlab("run", str(tiny), "--store", store_url, "--run", run_id)
        assert second.returncode == 3 and time.monotonic() - start < 30
        (line,) = [x for x in second.stderr.splitlines() if x.strip()]
        assert f"run {run_id} is being written by driftlab run" in line
    finally:
        first.terminate()
        first.wait(timeout=120)
    assert not store.exists(layout.lease_key(run_id))  # released on SIGTERM


def _artifact_contents(store: Store, run_id: str) -> dict[str, Any]:
    """The tensors and metadata of every safetensors file of the run: the checkpoints,
    extractions, probe, drift and SAEs (their bytes vary with the metadata's key order;
    JSON, logs and the report carry wall-clock times)."""
    prefix = layout.run_prefix(run_id)
    contents: dict[str, Any] = {}
    for key in store.list(prefix):
        if key.endswith(".safetensors"):
            tensors, meta = store.get_tensors(key)
            contents[key.removeprefix(prefix)] = (
                {k: v.numpy().tobytes() for k, v in sorted(tensors.items())},
                dict(sorted(meta.items())),
            )
    return contents


def _stage_processes(run_id: str) -> list[int]:
    """Processes of this machine whose command line names the run."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if run_id.encode() in cmdline.read_bytes():
                found.append(int(cmdline.parent.name))
        except OSError:
            continue
    return found


@pytest.mark.slow
@pytest.mark.timeout(3600)  # 20 kills and reruns of a whole pipeline: about 20 minutes
def test_driftlab_run_killed_at_random_moments_reruns_to_the_same_artifacts(tmp_path, tiny):
    """SIGKILL of `driftlab run` at 20 random moments: each time no stage outlives it, and
    the rerun ends with artifacts byte-identical to an uninterrupted run's."""
    import random

    reference = str(tmp_path / "reference")
    start = time.monotonic()
    run_id = _run_and_check(reference, tiny)  # every store below reuses the id: files
    want = _artifact_contents(open_store(reference), run_id)  # that name it compare equal
    seconds = time.monotonic() - start
    assert any(k.startswith("train/checkpoints/") for k in want)
    assert any(k.startswith("sae/") for k in want) and any(k.startswith("extract/") for k in want)
    rng = random.Random(0)
    for seed in range(int(os.environ.get("DRIFTLAB_FAULT_SEEDS", "20"))):
        store_url = str(tmp_path / f"killed-{seed}")
        proc = subprocess.Popen(
            [sys.executable, "-m", "cli", "run", str(tiny), "--store", store_url, "--run",
             run_id], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT,
        )  # fmt: skip
        time.sleep(rng.uniform(1.0, seconds))
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 10
        while _stage_processes(run_id) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _stage_processes(run_id) == [], f"seed {seed}: a stage outlived driftlab run"
        rerun = _driftlab("run", str(tiny), "--store", store_url, "--run", run_id)
        assert rerun.returncode == 0, (seed, rerun.stderr[-2000:])
        got = _artifact_contents(open_store(store_url), run_id)
        differ = sorted(k for k in want.keys() | got.keys() if got.get(k) != want.get(k))
        assert differ == [], f"seed {seed}: these differ from the uninterrupted run: {differ}"
