"""What many test modules need and is not a fixture: paths, a stage's environment, a port.

Fixtures live in `tests/conftest.py`; this module holds the plain values and functions they
and the tests share, so no test module imports another.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shared.store import Store

#: The repository root: `python -m ...` subprocesses run here.
ROOT = Path(__file__).resolve().parent.parent
#: Reference data shared by the team's machines (never copied into the repository).
REFERENCE = ROOT.parent / "shared" / "data"
ARGO = REFERENCE / "argo-workflows-v4.1.2"
#: The demo spec, what `make demo` runs.
TINY_SPEC = ROOT / "configs" / "tiny-cpu.yaml"
GOLDEN = ROOT / "tests" / "golden"


def stage_env(**extra: str) -> dict[str, str]:
    """The environment a stage subprocess gets: this checkout importable, and none of the
    variables that would make it report to a real Argo progress file or Pushgateway, or
    join a torch.distributed group, leaking in from the machine running the tests."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **extra}
    for var in ("ARGO_PROGRESS_FILE", "DRIFTLAB_PUSHGATEWAY", "WORLD_SIZE", "RANK"):
        env.pop(var, None)
    return env


@contextlib.contextmanager
def serving(argv: list[str], url: str, what: str, ready_within_s: float) -> Iterator[None]:
    """Run the server `argv` until the block ends, once its `{url}/-/ready` answers 200 (the
    Prometheus tools' readiness endpoint); one that exits or is not ready in time fails the
    test with the end of its log."""
    import pytest  # a test-time helper; support's plain values do not need pytest

    # A file, not a pipe: a pipe nobody reads would block the server once full.
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.monotonic() + ready_within_s
            while not _ready(url):
                if proc.poll() is not None:
                    log.seek(0)
                    pytest.fail(f"{what} exited at start:\n{log.read()[-2000:].strip()}")
                if time.monotonic() > deadline:
                    pytest.fail(f"{what} at {url} was not ready in time")
                time.sleep(0.05)
            yield
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/-/ready", timeout=1) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def free_port() -> int:
    """A TCP port on loopback nobody listens on (for a server a test starts)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_stage_here(definition: Any, argv: list[str]) -> subprocess.CompletedProcess[str]:
    """A stage's entry point (`stage_main`) run in this process, as a finished process.

    For tests of what a stage does with its inputs (clear errors, the artifacts it writes),
    where a subprocess only adds seconds of imports; tests of signals, kills and exit
    codes seen by a parent keep the real subprocess. An exception the stage does not turn
    into one line propagates and fails the test, as a traceback on stderr would.
    """
    from shared import stage_registry
    from shared.stage import StageDef, stage_main

    first = definition if isinstance(definition, StageDef) else definition[0]
    try:  # the program name its error lines start with, as `python -m` gives it
        prog = stage_registry.by_status(first.name).program
    except KeyError:
        prog = "stage"
    out, err = io.StringIO(), io.StringIO()
    handler = signal.getsignal(signal.SIGTERM)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = stage_main(definition, argv, prog=prog)
    finally:
        signal.signal(signal.SIGTERM, handler)
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def register_run(store: Store, overrides: Mapping[str, Any] | None = None, base: Any = None) -> str:
    """Register a run in `store`: `base` (a RunSpec; default every field's default) with the
    dotted `overrides` applied and validated as `--set` would; returns its run id."""
    from shared.registry import create_run
    from shared.spec import RunSpec, apply_overrides

    return create_run(store, apply_overrides(base or RunSpec(), dict(overrides or {})))


# -- PromQL of the generated dashboards -----------------------------------------------------

#: What in a PromQL expression is not a metric name: strings, label matchers, ranges,
#: grouping label lists, then function names (an identifier before "(") and keywords.
_PROMQL_NOISE = re.compile(
    r'"(?:[^"\\]|\\.)*"|\{[^}]*\}|\[[^\]]*\]'
    r"|\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)"
)
_IDENTIFIER = re.compile(r"(?<![A-Za-z0-9_:.])[A-Za-z_:][A-Za-z0-9_:]*")
_PROMQL_KEYWORDS = frozenset(
    {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
     "group_left", "group_right", "inf", "nan"}
)  # fmt: skip
_HISTOGRAM_SERIES = re.compile(r"_(?:bucket|count|sum)$")


def promql_metric_names(expr: str) -> set[str]:
    """The metric names an expression selects; a histogram's series by its family name."""
    bare = _PROMQL_NOISE.sub(" ", expr)
    return {
        _HISTOGRAM_SERIES.sub("", found.group())
        for found in _IDENTIFIER.finditer(bare)
        if found.group().lower() not in _PROMQL_KEYWORDS
        and not bare[found.end() :].lstrip().startswith("(")
    }


def dashboard_queries(board: Mapping[str, Any]) -> Iterator[str]:
    """Every PromQL expression of a Grafana dashboard: panel targets, then annotations."""
    for panel in board["panels"]:
        for target in panel.get("targets", ()):
            yield target["expr"]
    for annotation in board["annotations"]["list"]:
        if "expr" in annotation:
            yield annotation["expr"]


def queried_metrics(board: Mapping[str, Any]) -> set[str]:
    """The metric names a dashboard's panels and annotations query."""
    return {name for expr in dashboard_queries(board) for name in promql_metric_names(expr)}


#: A tiny `modular` run whose briefly trained model's sampled sums are right often enough
#: for both answer classes to occur: what the detect tests run, one checkpoint at the end.
TINY_DETECT_RUN: dict[str, Any] = {
    "data.dataset": "modular",
    "data.modular_p": 7,
    "data.train_fraction": 0.5,
    "data.eval_samples": 24,
    "data.max_length": 16,
    "extract.probe_samples": 24,
    "train.steps": 60,
    "train.checkpoint_every": 60,
    "sae.batch_size": 32,
    "detect.samples": 24,
    "detect.num_samples": 4,
    "detect.temperature": 1.0,
    "detect.max_new_tokens": 4,
}
