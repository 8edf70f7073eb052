"""`driftlab checkpoints` (the extract fan-out) and `driftlab finish` (the exit handler)."""

from __future__ import annotations

import json

from cli import main as cli
from shared import layout
from shared.registry import create_run
from shared.spec import load_spec
from shared.store import open_store
from shared.telemetry import push_metrics
from tests.support import TINY_SPEC, register_run


def _run_with_checkpoints(tmp_path, steps, **overrides):
    store = open_store(str(tmp_path / "store"))
    run_id = register_run(store, overrides, base=load_spec(TINY_SPEC))
    for step in steps:
        store.put_json(layout.checkpoint_done_key(run_id, step), {})
    store.put_json(
        layout.checkpoint_model_key(run_id, 99).replace("model.safetensors", "x.json"), {}
    )
    return store, run_id


def test_checkpoints_prints_the_selected_complete_steps(tmp_path, capsys):
    store, run_id = _run_with_checkpoints(tmp_path, [20, 0, 40])
    assert cli.main(["checkpoints", "--run", run_id, "--store", store.url]) == 0
    assert json.loads(capsys.readouterr().out) == [0, 20, 40]  # step 99 has no DONE

    store, run_id = _run_with_checkpoints(tmp_path / "b", [0, 20, 40], **{"extract.steps": [40, 0]})
    assert cli.main(["checkpoints", "--run", run_id, "--store", store.url]) == 0
    assert json.loads(capsys.readouterr().out) == [0, 40]


def test_checkpoints_fails_in_one_line_without_steps(tmp_path, capsys):
    store, run_id = _run_with_checkpoints(tmp_path, [])
    assert cli.main(["checkpoints", "--run", run_id, "--store", store.url]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and "no finished checkpoint" in err
    store, run_id = _run_with_checkpoints(tmp_path / "b", [0], **{"extract.steps": [0, 60]})
    assert cli.main(["checkpoints", "--run", run_id, "--store", store.url]) == 2
    assert "extract.steps [60] have no complete checkpoint" in capsys.readouterr().err


def test_finish_records_the_outcome_and_clears_only_this_runs_groups(
    tmp_path, pushgateway, monkeypatch
):
    monkeypatch.setenv("DRIFTLAB_PUSHGATEWAY", pushgateway.address)
    store = open_store(str(tmp_path / "store"))
    spec = load_spec(TINY_SPEC)
    run_id, other = create_run(store, spec), create_run(store, spec)
    for rid in (run_id, other):
        push_metrics("sae", rid, {"driftlab_stage_failed": 0}, shard="layer-01")
        push_metrics("train", rid, {"driftlab_stage_failed": 0})
    assert len(pushgateway.samples("driftlab_stage_failed", run_id=run_id)) == 2
    assert cli.main(["finish", "--run", run_id, "--store", store.url, "--status", "Failed"]) == 0
    status = store.get_json(layout.status_key(run_id, "workflow"))
    assert status["state"] == "failed" and status["argo_status"] == "Failed"
    assert pushgateway.samples("driftlab_stage_failed", run_id=run_id) == []
    assert len(pushgateway.samples("driftlab_stage_failed", run_id=other)) == 2
