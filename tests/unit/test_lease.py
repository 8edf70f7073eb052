"""One writer per run: the lease refuses a second writer, dies with a dead one, and steals
only what has expired."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from shared import layout, lease
from shared.lease import RunBusy, hold_lease, read_lease
from shared.store import Store, open_store
from tests.support import ROOT, register_run, stage_env


@pytest.fixture(params=["local", "s3"])
def any_store(request: pytest.FixtureRequest, tmp_path) -> Store:
    if request.param == "local":
        return open_store(tmp_path / "store")
    return open_store(request.getfixturevalue("s3_store_url"))


def _hold_once(store: Store, run_id: str, holder: str, steal: bool = False) -> None:
    with hold_lease(store, run_id, holder, steal=steal):
        pass


def test_a_second_writer_is_refused_naming_the_first(any_store):
    with hold_lease(any_store, "run-a", "driftlab run") as held:
        assert read_lease(any_store, "run-a") == held
        with pytest.raises(RunBusy, match=r"being written by driftlab run on .* \(pid \d+\)"):
            _hold_once(any_store, "run-a", "the train stage run by hand")
        with pytest.raises(RunBusy):  # --steal does not take a live lease
            _hold_once(any_store, "run-a", "driftlab run", steal=True)
    assert read_lease(any_store, "run-a") is None  # released
    _hold_once(any_store, "run-a", "driftlab run")


def test_an_expired_lease_of_another_machine_is_taken_only_with_steal(any_store):
    dead = {"holder": "driftlab run", "host": "elsewhere", "pid": 1, "token": "old",
            "expires_at": time.time() - 1}  # fmt: skip
    any_store.put_text(layout.lease_key("run-b"), json.dumps(dead))
    with pytest.raises(RunBusy, match=r"has expired.*--steal"):
        _hold_once(any_store, "run-b", "driftlab run")
    with hold_lease(any_store, "run-b", "driftlab run", steal=True) as taken:
        assert read_lease(any_store, "run-b") == taken and taken.token != "old"
    live = {**dead, "expires_at": time.time() + 60}
    any_store.put_text(layout.lease_key("run-b"), json.dumps(live))
    with pytest.raises(RunBusy, match="being written by driftlab run on elsewhere"):
        _hold_once(any_store, "run-b", "driftlab run", steal=True)


def test_the_lease_is_renewed_while_held(any_store, monkeypatch):
    monkeypatch.setattr(lease, "LEASE_SECONDS", 0.6)
    monkeypatch.setattr(lease, "RENEW_SECONDS", 0.1)
    with hold_lease(any_store, "run-c", "driftlab run") as held:
        time.sleep(1.0)  # past the first expiry: renewed meanwhile
        current = read_lease(any_store, "run-c")
        assert current is not None and current.token == held.token and not current.expired()


def test_a_sigkilled_writer_on_this_machine_is_taken_over_at_once(tmp_path):
    """A stage run by hand and SIGKILLed leaves its lease; the rerun sees its pid is gone."""
    store = open_store(tmp_path / "store")
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\nfrom shared.lease import hold_lease\nfrom shared.store import "
         "open_store\nwith hold_lease(open_store(sys.argv[1]), 'run-d', 'test'):\n"
         "    print('held', flush=True); time.sleep(60)\n", store.url],
        cwd=ROOT, env=stage_env(), stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    holder.kill()
    holder.wait()
    with hold_lease(store, "run-d", "the rerun") as taken:
        assert read_lease(store, "run-d") == taken


def test_a_stage_by_hand_is_refused_while_driftlab_run_holds_the_run(store):
    from services.ot.__main__ import OT
    from tests.support import run_stage_here

    run_id = register_run(store)
    with hold_lease(store, run_id, "driftlab run"):
        proc = run_stage_here(OT, ["--run", run_id, "--store", store.url])
    assert proc.returncode == RunBusy.exit_code
    assert "is being written by driftlab run" in proc.stderr.strip().splitlines()[-1]


def test_driftlab_runs_shows_a_run_whose_writer_died_as_stale(store):
    from shared.registry import load_rows

    run_id = register_run(store)
    store.put_json(layout.status_key(run_id, "train"), {"stage": "train", "state": "running"})
    gone = {"holder": "driftlab run", "host": "elsewhere", "pid": 1, "token": "t",
            "expires_at": time.time() - 5}  # fmt: skip
    store.put_text(layout.lease_key(run_id), json.dumps(gone))
    (row,) = load_rows(store)
    assert row["state"].startswith("stale (last seen ")
    store.put_text(layout.lease_key(run_id), json.dumps({**gone, "expires_at": time.time() + 60}))
    (row,) = load_rows(store)
    assert row["state"] == "running"  # a live writer elsewhere


def test_the_next_writer_removes_what_a_killed_write_left(store):
    store.put_text("runs/run-e/train/metrics.jsonl", "{}\n")
    leftover = store.root / "runs" / "run-e" / "train" / ".model.safetensors.tmp-0123456789abcdef"
    leftover.write_bytes(b"half a file")
    _hold_once(store, "run-e", "driftlab run")
    assert not leftover.exists()
    assert store.list("runs/run-e/") == ["runs/run-e/train/metrics.jsonl"]
