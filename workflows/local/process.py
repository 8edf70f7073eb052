"""Stage processes: started so they never outlive the runner, retried, stopped as a group.

Each stage runs in its own session, so a terminal's Ctrl-C reaches only driftlab, which
then stops the stages with SIGTERM (their process groups: whatever a stage started too)
and runs the exit handler. A runner that dies without that chance (SIGKILL, the OOM
killer) takes its stages with it: on Linux each is started with PR_SET_PDEATHSIG, so
the kernel sends it SIGKILL when the runner's thread that started it ends. Without
this, a rerun raced the orphans of the run it replaces.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from workflows.local.manifest import Retry
from workflows.local.nodes import ERROR, FAILED, RUNNING, STOPPED, SUCCEEDED, Node, Reporter

TERM_GRACE_S = 15.0  # from SIGTERM to SIGKILL, as a pod's default grace period
_POLL_S = 0.1
_PR_SET_PDEATHSIG = 1


class StopSignal:
    """Set once, with why: every running stage ends, and nothing new starts."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason = ""

    def set(self, reason: str) -> None:
        if not self._event.is_set():
            self.reason = reason
            self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float) -> bool:
        return self._event.wait(timeout)


@dataclass(frozen=True)
class StageCommand:
    """A container task made concrete: its argv and full environment, its retries."""

    argv: Sequence[str]
    env: Mapping[str, str]
    retry: Retry
    deadline_s: float | None


def run_stage(
    command: StageCommand, node: Node, folder: Path, stop: StopSignal, report: Reporter
) -> Node:
    """Run `command` (with its retries) as `node`, logging to `folder`; `node` ends final."""
    folder.mkdir(parents=True, exist_ok=True)
    node.log = folder / "log"
    node.progress_file = folder / "progress"
    env = {**command.env, "ARGO_PROGRESS_FILE": str(node.progress_file)}
    node.started = time.monotonic()
    while not stop.is_set():
        node.attempts += 1
        node.state, node.message = RUNNING, ""
        report(node)
        node.state, node.message = _attempt(command, env, node.log, folder / "stdout", stop)
        retries = command.retry.limit
        if node.state not in command.retry.on or node.attempts > retries or stop.is_set():
            break
        node.message += f"; retrying ({node.attempts}/{retries})"
        report(node)
    else:
        node.state, node.message = STOPPED, stop.reason
    node.ended = time.monotonic()
    if node.state == SUCCEEDED:
        node.result = (folder / "stdout").read_text(errors="replace").rstrip("\n")
    report(node)
    return node


def _attempt(
    command: StageCommand, env: Mapping[str, str], log: Path, stdout: Path, stop: StopSignal
) -> tuple[str, str]:
    """One attempt: its final state and why."""
    with stdout.open("wb") as out, log.open("ab") as err:
        try:
            proc = subprocess.Popen(
                list(command.argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=dict(env),
                start_new_session=True,
                preexec_fn=_dies_with(os.getpid()),
            )
        except OSError as exc:
            return ERROR, f"cannot start {command.argv[0]}: {exc.strerror or exc}"
    deadline = command.deadline_s
    ends_by = time.monotonic() + deadline if deadline is not None else None
    while (code := proc.poll()) is None:
        if stop.wait(_POLL_S):
            _terminate(proc)
            return STOPPED, stop.reason
        if ends_by is not None and time.monotonic() > ends_by:
            _terminate(proc)
            return FAILED, f"exceeded activeDeadlineSeconds ({deadline:g})"
    if code == 0:
        return SUCCEEDED, ""
    if code < 0:
        return ERROR, f"killed by {signal.Signals(-code).name}"
    return FAILED, f"exit code {code}"


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the stage's process group, SIGKILL after the grace period."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=TERM_GRACE_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _dies_with(runner_pid: int) -> Callable[[], None] | None:
    """A preexec_fn asking the kernel for SIGKILL when the runner dies (Linux only).

    The libc call is resolved here, before the fork: between fork and exec the child
    should only make the system call. If the runner died before the request was made,
    nobody would send the signal, so the child checks its parent and ends itself.
    """
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def request() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != runner_pid:
            os.kill(os.getpid(), signal.SIGKILL)

    return request
