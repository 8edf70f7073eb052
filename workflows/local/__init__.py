"""Runs a compiled pipeline workflow on this machine: the same graph, without a cluster.

The input is the manifest Hera produces (`Workflow.to_dict()`), not a second description
of the pipeline, so what runs here is what Argo would run. Only what workflows/pipeline.py
emits is supported, and anything else is refused before a task starts (manifest.py):
DAGs whose `depends` joins task names with `&&`, `withItems` and `withParam` fan-outs,
`{{tasks.X.outputs.result}}`, `retryStrategy` (at once, no backoff),
`activeDeadlineSeconds`, DAG `parallelism` and the `onExit` handler. Each container task
is its `command + args` run as a subprocess (process.py) with the template's env on top
of this process's (secretKeyRef variables come from the local environment); a leading
`python` is this interpreter, so the venv that runs driftlab runs the stages.

A task ends Failed when its command exits non-zero (retried under `OnFailure`/`Always`)
and Error when a signal kills it (retried under `OnError`/`OnTransientError`/`Always`).
The first task that ends either way stops the run (scheduler.py): running stages get
SIGTERM, nothing pending starts, and the exit handler runs with `workflow.status` Failed.
Ctrl-C or a SIGTERM to this process does the same and then raises KeyboardInterrupt; a
SIGKILL takes the stages with it (Linux), so no stage outlives its `driftlab run`.

    result = run_workflow(compiled(build_workflow(spec, "cpu", store=url)), workers=4)
"""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import FrameType
from typing import Any

from workflows.local.display import LineReporter, LiveTable
from workflows.local.manifest import LocalRunError, read_workflow
from workflows.local.nodes import ERROR, FAILED, STOPPED, SUCCEEDED, Node, Reporter, RunResult
from workflows.local.scheduler import Scheduler

__all__ = [
    "ERROR",
    "FAILED",
    "STOPPED",
    "SUCCEEDED",
    "LineReporter",
    "LiveTable",
    "LocalRunError",
    "Node",
    "RunResult",
    "run_workflow",
]


def run_workflow(
    workflow: Mapping[str, Any],
    *,
    workers: int | None = None,
    reporter: Reporter | None = None,
    log_dir: Path | None = None,
) -> RunResult:
    """Execute `workflow` (a compiled manifest) here; returns when it and onExit are done.

    Raises LocalRunError for a manifest it refuses, before anything runs, and
    KeyboardInterrupt (after the exit handler) when Ctrl-C or SIGTERM stopped the run.
    """
    model = read_workflow(workflow)
    workers = workers or os.cpu_count() or 1
    if workers < 1:
        raise LocalRunError(f"--workers must be at least 1, got {workers}")
    log_dir = log_dir or Path(tempfile.mkdtemp(prefix=f"driftlab-{model.name}-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    scheduler = Scheduler(model, workers, reporter or (lambda _node: None), log_dir)
    with _signals_stop(scheduler) as signalled:
        status = scheduler.run(model.entrypoint, model.parameters, model.entrypoint)
        if model.on_exit:
            scheduler.globals["workflow.status"] = SUCCEEDED if status == SUCCEEDED else FAILED
            if scheduler.run(model.on_exit, {}, f"{model.name}.onExit") != SUCCEEDED:
                status = FAILED  # as in Argo: a failed exit handler fails the workflow
    if signalled:
        raise KeyboardInterrupt
    status = SUCCEEDED if status == SUCCEEDED else FAILED
    return RunResult(status, list(scheduler.nodes), scheduler.failed, log_dir)


@contextlib.contextmanager
def _signals_stop(scheduler: Scheduler) -> Iterator[list[str]]:
    """Ctrl-C and SIGTERM stop the running pass as a failure does; yields the signals seen.

    Stages run in their own sessions (a terminal's Ctrl-C must reach driftlab, not them),
    so driftlab itself stops them, and runs the exit handler, before it ends. Handlers can
    only be set from the main thread; elsewhere nothing changes.
    """
    signalled: list[str] = []
    if threading.current_thread() is not threading.main_thread():
        yield signalled
        return

    def stop(signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        signalled.append(name)
        scheduler.stop.set(f"stopped: driftlab got {name}")

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield signalled
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
