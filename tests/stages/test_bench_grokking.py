"""benchmarks/bench_grokking.py: the grok step, the nearest boundaries and their offsets,
read back from real reports of two synthetic runs whose accuracy, drift and dynamics all
jump at the same step."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from services.evaluator import agreement
from shared import layout
from shared.store import open_store
from tests.evaluator_run import JUMP_AT, STEPS, make_run
from tests.support import ROOT


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location(
        "bench_grokking", ROOT / "benchmarks" / "bench_grokking.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_grokking"] = module
    spec.loader.exec_module(module)
    return module


def test_crossing_step_and_nearest_boundary():
    steps = [0, 100, 200, 300, 400]
    assert agreement.crossing_step(steps, [0.0, 0.1, None, 0.5, 0.9]) == 300
    assert agreement.crossing_step(steps, [0.0, 0.1, 0.2, 0.3, 0.49]) is None
    nearest = agreement.nearest_boundary
    assert nearest(steps, [100, 420], 300) == {"step": 420, "offset_checkpoints": 1}
    assert nearest(steps, [200, 400], 300) == {"step": 200, "offset_checkpoints": -1}
    assert nearest(steps, [], 300) is None


def test_analyse_two_runs_lines_up_accuracy_drift_and_hmm(bench, tmp_path, capsys):
    store = open_store(tmp_path / "store")
    run_ids = [make_run(store, seed=s, sae=False, detect=False) for s in (0, 1)]
    for run_id in run_ids:  # a change point within noise, which ot_significant leaves out
        phases = store.get_json(layout.ot_phases_key(run_id))
        points = phases["curves"]["mean"]["change_points"]
        points.insert(0, {**points[0], "step": 10, "interval": [0, 10], "exceeds_baseline": False})
        store.put_json(layout.ot_phases_key(run_id), phases)
    assert bench.main(["--store", store.url, "--runs", *run_ids]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    runs, summary = lines[:-1], lines[-1]
    assert [line["run_id"] for line in runs] == run_ids
    for line in runs:
        assert line["grok_step"] == JUMP_AT and line["checkpoints"] == len(STEPS)
        assert line["ot_nearest"] == {"step": JUMP_AT, "offset_checkpoints": 0}
        assert (
            line["ot_significant"] == [JUMP_AT]
            and line["ot_significant_nearest"]["step"] == JUMP_AT
        )
        assert line["hmm_nearest"]["offset_checkpoints"] == 0 and line["hmm_states"] >= 2
        assert line["loss_spikes"] == [JUMP_AT] and line["loss_spikes_nearest"]["step"] == JUMP_AT
        # The planted change point at 10 has no loss spike near it; the one at JUMP_AT has.
        assert line["ot_vs_loss_spikes"] == {
            "ot_matched": "1 of 2",
            "loss_spikes_matched": "1 of 1",
        }
        crossing = store.get_json(layout.evaluate_report_json_key(line["run_id"]))["phases"][
            "crossing"
        ]  # the report's own view of the same transition
        assert crossing["step"] == JUMP_AT
        assert crossing["nearest"]["ot_significant"] == line["ot_significant_nearest"]
        assert crossing["nearest"]["hmm"] == line["hmm_nearest"]
    assert summary["grokked"] == 2 and summary["ot_within_tolerance"] == 2
    assert summary["ot_significant_within_tolerance"] == 2
    assert summary["hmm_within_tolerance"] == 2 and summary["grok_steps"] == [JUMP_AT] * 2
    assert summary["loss_spikes_within_tolerance"] == 2


@pytest.mark.slow
def test_a_two_seed_sweep_runs_its_workflow_here_two_at_a_time(bench, tmp_path, capsys):
    """The real stages, as the sweep's Argo workflow runs them: a tiny modular task under two
    seeds at once; then the whole analysis of both. Slow (50 s): the local runner's
    parallel nested pipelines are in tests/unit/test_local_executor.py, and the e2e tests
    run the real stages through the graph."""
    sweep = tmp_path / "seeds.yaml"
    sweep.write_text("name: two-seeds\nmethod: grid\nparameters:\n  run.seed: [0, 1]\n")
    sets = {
        "data.modular_p": 7, "train.steps": 20, "train.batch_size": 20,
        "train.checkpoint_every": 10, "train.dynamics_every": 1, "model.n_embd": 32,
        "sae.layers": [1], "sae.epochs": 1, "ot.bootstrap": 5, "evaluate.bootstrap": 10,
        "hmm.max_components": 2, "hmm.restarts": 1, "extract.probe_samples": 16, "sae.batch_size": 32,
    }  # fmt: skip
    store = open_store(tmp_path / "store")
    args = ["--spec", str(ROOT / "configs" / "grokking-cpu.yaml"), "--sweep", str(sweep)]
    args += ["--store", store.url, "--parallel", "2"]
    args += [a for k, v in sets.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    assert bench.main(args) == 0, capsys.readouterr().err[-3000:]
    captured = capsys.readouterr()
    lines = [json.loads(x) for x in captured.out.splitlines()]
    assert [line["seed"] for line in lines[:-1]] == [0, 1]
    assert all(line["checkpoints"] == 3 for line in lines[:-1]) and lines[-1]["runs"] == 2
    assert "2 runs, 2 at a time" in captured.err
    for line in lines[:-1]:
        status = store.get_json(layout.status_key(line["run_id"], "workflow"))
        assert status["state"] == "succeeded"
        assert not store.exists(layout.detect_done_key(line["run_id"]))  # detect.enabled: false
