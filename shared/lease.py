"""One writer per run: a lease object in the store, taken atomically and renewed while held.

Two `driftlab run` of one run id used to both proceed: the trainer ran twice and one
extractor read checkpoints the other was rewriting. Now whoever writes a run holds
`runs/<id>/lease.json` ({holder, host, pid, token, expires_at}): it is created only if
absent (`Store.put_bytes_if_absent`: a hard link on a folder, `If-None-Match: *` on S3),
renewed every `RENEW_SECONDS` by a thread, and deleted when the writer is done. A second
writer is refused at once, in one line naming the holder. A holder that died (a SIGKILL)
on this machine is seen to be dead and its lease taken over at once; one on another
machine leaves a lease that expires after `LEASE_SECONDS` and can then be taken over with
`--steal`.

Who holds it: `driftlab run` (and a sweep run here) for the whole workflow; a stage run by
hand (`python -m services.X`) for its own duration. Stages started by a workflow do not
take it: the workflow's writer already holds the run (locally) or Argo runs the graph
(on a cluster), and parallel fan-out pods of one run must not exclude each other; the
workflow marks their environment with `ORCHESTRATED_ENV`.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

from shared import layout
from shared.errors import ArtifactNotFound, DriftlabError, StoreError
from shared.log import get_logger
from shared.store import Store

__all__ = [
    "LEASE_SECONDS",
    "ORCHESTRATED_ENV",
    "Lease",
    "RunBusy",
    "hold_lease",
    "read_lease",
    "refuse_if_held",
]

#: A lease not renewed for this long is taken to belong to a dead writer.
LEASE_SECONDS = 90.0
#: How often a holder renews: a third of the lease, so two missed renewals are tolerated.
RENEW_SECONDS = LEASE_SECONDS / 3
#: Set (to anything) in the environment of stages a workflow starts.
ORCHESTRATED_ENV = "DRIFTLAB_ORCHESTRATED"


class RunBusy(DriftlabError):
    """Another writer holds the run's lease."""

    exit_code = 3


@dataclass(frozen=True)
class Lease:
    """Who writes a run, and until when (seconds since the epoch) unless renewed."""

    holder: str
    host: str
    pid: int
    token: str
    expires_at: float

    def expired(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) >= self.expires_at

    def holder_gone(self) -> bool:
        """Held by a process of this machine that is no longer running."""
        return self.host == socket.gethostname() and not _alive(self.pid)

    def abandoned(self) -> bool:
        """Its holder is gone, or (on another machine) it has not renewed the lease."""
        return self.expired() or self.holder_gone()

    def last_seen(self) -> str:
        """When its holder last renewed it (its expiry less a lease), in UTC."""
        seen = self.expires_at - LEASE_SECONDS
        return datetime.fromtimestamp(seen, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")

    def describe(self) -> str:
        until = datetime.fromtimestamp(self.expires_at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        return f"{self.holder} on {self.host} (pid {self.pid}), lease until {until}"


def read_lease(store: Store, run_id: str) -> Lease | None:
    """The run's lease, or None when there is none; a damaged one reads as long expired."""
    key = layout.lease_key(run_id)
    try:
        body = store.get_json(key)
        return Lease(**{k: body[k] for k in Lease.__dataclass_fields__})
    except ArtifactNotFound:
        return None
    except (StoreError, KeyError, TypeError):
        return Lease("a damaged lease", "?", 0, "", 0.0)


@contextmanager
def hold_lease(store: Store, run_id: str, holder: str, *, steal: bool = False) -> Iterator[Lease]:
    """Hold the run's lease while the block runs: taken at entry, renewed, released at exit.

    Refuses with `RunBusy` when another writer holds it; an expired lease (its holder died)
    is taken over only with `steal`, which is refused while the lease is still live.
    """
    lease = _take(store, run_id, holder, steal)
    removed = store.remove_in_flight(layout.run_prefix(run_id))  # a killed writer's leftovers
    if removed:
        get_logger("lease", run_id).info("removed %d unfinished temporary files", removed)
    stop = threading.Event()
    renewer = threading.Thread(target=_renew, args=(store, run_id, lease, stop), daemon=True)
    renewer.start()
    try:
        yield lease
    finally:
        stop.set()
        renewer.join()
        current = read_lease(store, run_id)
        if current is not None and current.token == lease.token:
            store.delete(layout.lease_key(run_id))


def refuse_if_held(store: Store, run_id: str) -> None:
    """Raise `RunBusy` naming the holder while a live writer holds the run's lease.

    For writers that start the run elsewhere (`driftlab submit --run`) and so cannot hold
    the lease themselves: they must not start a second writer beside a live one.
    """
    current = read_lease(store, run_id)
    if current is not None and not current.abandoned():
        raise _busy(run_id, current)


def _busy(run_id: str, current: Lease) -> RunBusy:
    return RunBusy(
        f"run {run_id} is being written by {current.describe()}; wait for it to finish "
        f"(`driftlab runs --filter run_id={run_id}`), or stop it"
    )


def _take(store: Store, run_id: str, holder: str, steal: bool) -> Lease:
    key = layout.lease_key(run_id)
    lease = _fresh(holder)
    current = None
    for _ in range(3):  # a holder may release between our attempt and our read
        if store.put_bytes_if_absent(key, _encode(lease)):
            return lease
        current = read_lease(store, run_id)
        if current is not None:
            break
    if current is None:
        raise RunBusy(f"run {run_id}: its lease keeps changing hands; try again")
    if current.holder_gone():
        # Its holder ran here and is gone (a SIGKILL): no need to wait for the expiry.
        store.put_bytes(key, _encode(lease))
        get_logger("lease", run_id).warning(
            "took over the lease of %s: it is dead", current.describe()
        )
        return lease
    if not current.expired():
        raise _busy(run_id, current)
    if not steal:
        raise RunBusy(
            f"run {run_id} was being written by {current.describe()}, which has expired: its "
            "writer died; take the run over by adding --steal to the same command"
        )
    store.put_bytes(key, _encode(lease))
    get_logger("lease", run_id).warning("took over the expired lease of %s", current.describe())
    return lease


def _renew(store: Store, run_id: str, lease: Lease, stop: threading.Event) -> None:
    while not stop.wait(RENEW_SECONDS):
        current = read_lease(store, run_id)
        if current is None or current.token != lease.token:
            get_logger("lease", run_id).warning(
                "lost the run's lease (now %s)", current.describe() if current else "none"
            )
            return
        try:
            store.put_bytes(layout.lease_key(run_id), _encode(_renewed(lease)))
        except StoreError as err:  # the next round tries again; the lease has slack
            get_logger("lease", run_id).warning("could not renew the lease: %s", err)


def _alive(pid: int) -> bool:
    """Whether a process of this machine is still running (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return True  # no /proc: kill(0) said it exists


def _fresh(holder: str) -> Lease:
    return Lease(
        holder=holder,
        host=socket.gethostname(),
        pid=os.getpid(),
        token=secrets.token_hex(8),
        expires_at=time.time() + LEASE_SECONDS,
    )


def _renewed(lease: Lease) -> Lease:
    return Lease(**{**asdict(lease), "expires_at": time.time() + LEASE_SECONDS})


def _encode(lease: Lease) -> bytes:
    return json.dumps(asdict(lease), sort_keys=True).encode()
