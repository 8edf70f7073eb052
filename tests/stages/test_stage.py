"""The stage contract, exercised through a real subprocess as Argo would run it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shared import layout
from shared.spec import RunSpec, apply_overrides, spec_to_yaml
from shared.store import open_store
from tests.support import ROOT

RUN = "toy-20261122-103005-abcdef"


@pytest.fixture
def env(tmp_path):
    store = open_store(tmp_path / "store")
    work_log = tmp_path / "work.log"
    work_log.touch()
    environ = {**os.environ, "TOY_WORK_LOG": str(work_log), "PYTHONPATH": str(ROOT)}
    environ.pop("ARGO_PROGRESS_FILE", None)
    environ.pop("DRIFTLAB_PUSHGATEWAY", None)
    return store, work_log, environ


def _spec(store, **overrides):
    spec = apply_overrides(RunSpec(), overrides) if overrides else RunSpec()
    store.put_text(layout.spec_key(RUN), spec_to_yaml(spec))


def _toy(store, environ, *extra, mode="ok", run=RUN, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "tests.toy_stage", "--run", run, "--store", store.url, *extra],
        env={**environ, "TOY_MODE": mode},
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def _works(work_log: Path) -> int:
    return work_log.read_text().count("worked")


def _one_clean_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


def test_missing_spec_is_one_line_exit_2(env):
    store, _, environ = env
    proc = _toy(store, environ)
    assert proc.returncode == 2
    line = _one_clean_line(proc.stderr)
    assert "has no spec" in line and "driftlab run" in line


def test_missing_input_names_what_to_run_first(env):
    store, work_log, environ = env
    _spec(store)
    proc = _toy(store, environ)
    assert proc.returncode == 2
    line = _one_clean_line(proc.stderr)
    assert layout.extract_done_key(RUN, 0) in line
    assert f"python -m services.extractor --run {RUN} --step 0" in line
    assert _works(work_log) == 0
    assert not store.exists(layout.status_key(RUN, "ot"))


def test_success_then_cached_then_invalidated(env):
    store, work_log, environ = env
    _spec(store)
    store.put_json(layout.extract_done_key(RUN, 0), {"v": 1})

    first = _toy(store, environ, "--device", "cpu")
    assert first.returncode == 0, first.stderr
    status = store.get_json(layout.status_key(RUN, "ot"))
    assert status["state"] == "succeeded" and status["headline"] == {"answer": 42}
    assert status["duration_seconds"] >= 0 and status["device"] == "cpu"
    done = store.get_json(layout.ot_done_key(RUN))
    assert set(done["inputs"]) == {layout.extract_done_key(RUN, 0)}
    assert set(done["spec"]) == {"ot"}

    cached = _toy(store, environ)
    assert cached.returncode == 0 and _works(work_log) == 1
    assert store.get_json(layout.status_key(RUN, "ot"))["state"] == "cached"

    # A changed input, a changed spec section and --force each redo the work...
    store.put_json(layout.extract_done_key(RUN, 0), {"v": 2})
    assert _toy(store, environ).returncode == 0 and _works(work_log) == 2
    _spec(store, **{"ot.reg": 0.123})
    assert _toy(store, environ).returncode == 0 and _works(work_log) == 3
    assert _toy(store, environ, "--force").returncode == 0 and _works(work_log) == 4
    # ...while a change to a section the stage does not read does not.
    _spec(store, **{"ot.reg": 0.123, "train.learning_rate": 0.5})
    assert _toy(store, environ).returncode == 0 and _works(work_log) == 4


def test_crash_writes_failed_status_and_leaves_no_done(env):
    store, _, environ = env
    _spec(store)
    store.put_json(layout.extract_done_key(RUN, 0), {"v": 1})
    assert _toy(store, environ).returncode == 0
    assert store.exists(layout.ot_done_key(RUN))

    proc = _toy(store, environ, "--force", mode="crash")
    assert proc.returncode == 1
    status = store.get_json(layout.status_key(RUN, "ot"))
    assert status["state"] == "failed"
    assert status["error"] == "RuntimeError: boom at step 3"
    # The old marker described other work: it must not survive a failed redo.
    assert not store.exists(layout.ot_done_key(RUN))


def test_refused_input_is_one_line(env):
    store, _, environ = env
    _spec(store)
    store.put_json(layout.extract_done_key(RUN, 0), {"v": 1})
    proc = _toy(store, environ, mode="refuse")
    assert proc.returncode == 1
    assert "layer 7 has NaN activations at step 3" in _one_clean_line(proc.stderr)
    assert store.get_json(layout.status_key(RUN, "ot"))["error"] == (
        "layer 7 has NaN activations at step 3"
    )


def _start_hanging(store, environ, stderr):
    """The toy stage mid-work: it has written a partial output and hangs."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.toy_stage", "--run", RUN, "--store", store.url],
        env={**environ, "TOY_MODE": "hang"},
        cwd=ROOT,
        stderr=stderr,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not store.exists(layout.ot_phases_key(RUN)):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    return proc


def test_killed_stage_leaves_no_done_and_rerun_completes(env):
    store, work_log, environ = env
    _spec(store)
    store.put_json(layout.extract_done_key(RUN, 0), {"v": 1})
    proc = _start_hanging(store, environ, stderr=subprocess.DEVNULL)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not store.exists(layout.ot_done_key(RUN))
    assert store.get_json(layout.status_key(RUN, "ot"))["state"] == "running"

    assert _toy(store, environ).returncode == 0
    assert store.get_json(layout.ot_phases_key(RUN)) == {"device": "cpu"}
    assert store.exists(layout.ot_done_key(RUN)) and _works(work_log) == 2


def test_sigterm_records_failure(env):
    store, _, environ = env
    _spec(store)
    store.put_json(layout.extract_done_key(RUN, 0), {"v": 1})
    proc = _start_hanging(store, environ, stderr=subprocess.PIPE)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 143
    assert "Traceback" not in stderr
    status = store.get_json(layout.status_key(RUN, "ot"))
    assert status["state"] == "failed" and status["error"] == "terminated by SIGTERM"


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--run", "../escape"], "DNS-1123"),
        (["--store", "ftp://nowhere/x"], "ftp"),
        (["--device", "cuda"], "CUDA"),
    ],
)
def test_bad_arguments_are_one_line(env, args, needle):
    store, _, environ = env
    _spec(store)
    store.put_json(layout.extract_done_key(RUN, 0), {"v": 1})
    opts = {"--run": RUN, "--store": store.url, **dict(zip(args[::2], args[1::2], strict=True))}
    argv = [part for pair in opts.items() for part in pair]
    proc = subprocess.run(
        [sys.executable, "-m", "tests.toy_stage", *argv],
        env={**environ, "TOY_MODE": "ok"},
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode != 0
    assert needle in _one_clean_line(proc.stderr)
