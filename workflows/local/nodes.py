"""What a local run reports: each task instance (a node) and how the workflow ended."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

PENDING = "Pending"
RUNNING = "Running"
SUCCEEDED = "Succeeded"
FAILED = "Failed"  # the command exited non-zero, or ran past its deadline
ERROR = "Error"  # killed by a signal, never started, or a task that could not be prepared
STOPPED = "Stopped"  # ended by the runner: another task failed, or driftlab was stopped
FINAL = (SUCCEEDED, FAILED, ERROR, STOPPED)
LOG_TAIL_LINES = 20


@dataclass
class Node:
    """One container task instance (one item of a fan-out), as the live table shows it."""

    name: str
    template: str
    state: str = PENDING
    attempts: int = 0
    started: float | None = None
    ended: float | None = None
    message: str = ""
    log: Path | None = None  # stderr of every attempt
    progress_file: Path | None = None  # $ARGO_PROGRESS_FILE, "N/M" written by the stage
    result: str = ""  # stdout of a succeeded task: Argo's `outputs.result`

    @property
    def seconds(self) -> float | None:
        if self.started is None:
            return None
        return (self.ended or time.monotonic()) - self.started

    def progress(self) -> str:
        if self.progress_file is None:
            return ""
        try:
            return self.progress_file.read_text().strip()
        except OSError:
            return ""

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        if self.log is None or not self.log.exists():
            return ""
        text = self.log.read_text(errors="replace").rstrip("\n").splitlines()
        return "\n".join(text[-lines:])


@dataclass
class RunResult:
    """How the workflow ended: its status, every node, and the failed one if any."""

    status: str
    nodes: list[Node]
    failed: Node | None
    log_dir: Path

    @property
    def ok(self) -> bool:
        return self.status == SUCCEEDED


Reporter = Callable[[Node], None]
