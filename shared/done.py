"""DONE markers that vouch for what a stage wrote, and the checks that hold them to it.

A marker holding only the digests of a stage's inputs said "this work was done", not "its
files are still what the work produced": a truncated checkpoint or a half-written
extraction behind it read as cached forever. A marker of format 2 lists every artifact
the stage wrote, `{key: {"size": bytes, "sha256": hex}}`, recorded while it wrote them
(`RecordingStore`, hashed from the bytes in hand, so recording costs no second read).

What is checked, and why there:

- a stage's own marker, before it reports "cached": every listed size, and the sha256 of
  every listed object up to `DIGEST_LIMIT` bytes; a listed DONE marker (a checkpoint's,
  below the trainer's) is followed and its artifacts checked alike. Any mismatch, or a
  marker that is empty, garbage or of another format, counts as not done: the stage redoes
  the work instead of failing on every rerun. Measured on configs/tiny-cpu.yaml in a
  folder store (about 200 objects, 75 MB): checking every stage's marker, digests
  included, takes 0.15 s, lost in the noise of a fully cached `driftlab run --run` (9 to
  11 s before and after, mostly starting 20 processes). Above the limit only sizes are
  compared, because a digest there means reading the whole object, on S3 downloading it:
  a GPT-2-small run's checkpoints are gigabytes, and a cached rerun must stay seconds.
- an input's marker (`shared.stage.check_inputs`): sizes at the start (one stat or HEAD
  each, not followed into nested markers), and the sha256 of each listed object when the
  stage reads it (`RecordingStore` with `inputs`), hashed from the bytes or the local
  file the read produced, whatever its size: a consumer never computes on a file its
  producer did not write, even one of the right size, and pays for the digest only with
  a pass over what it reads anyway (sha256 runs at about 1 GB/s, against a GPT-2
  checkpoint's load and use of seconds).

Markers written before format 2 list nothing, so they vouch for nothing: a stage's own
such marker is redone once (the safe choice: nothing says its files are whole), while
such a marker as an input is taken as before, for its existence only, so the consumer
does not fail before its producer had a chance to rewrite it.
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.errors import ArtifactNotFound, InputMissing, LayoutError
from shared.store_base import Store, file_sha256
from shared.store_keys import validate_key

__all__ = [
    "DIGEST_LIMIT",
    "DONE_FORMAT",
    "RecordingStore",
    "Vouched",
    "check_listed",
    "done_problem",
    "listed_artifacts",
    "marker_problem",
    "parse_marker",
]

DONE_FORMAT = 2

#: Objects up to this size have their sha256 checked on a cached rerun; larger ones only
#: their size (see the module docstring for why).
DIGEST_LIMIT = 64 * 1024 * 1024

Artifacts = dict[str, dict[str, Any]]


@dataclass(frozen=True)
class Vouched:
    """An input as its producer's DONE marker lists it, and the command that redoes it."""

    sha256: str
    redo: str


class RecordingStore(Store):
    """A stage's view of the store: every write under `prefix` (outside `skip`) is recorded
    with its size and sha256, so the stage's DONE marker can list exactly what it wrote,
    and every read of an object in `inputs` is checked against the sha256 its producer's
    marker lists (once per object), raising `InputMissing` naming the command that redoes it.

    Everything else is passed to the store underneath; a deleted key is dropped from the
    record, so a stage that removes what it wrote does not vouch for it.
    """

    def __init__(
        self,
        inner: Store,
        prefix: str,
        skip: tuple[str, ...] = (),
        inputs: Mapping[str, Vouched] | None = None,
    ) -> None:
        self.inner = inner
        self.prefix = prefix
        self.skip = skip
        self.inputs = dict(inputs or {})
        self._written: Artifacts = {}
        self._verified: set[str] = set()

    def _check_read(self, key: str, sha256: Callable[[], str]) -> None:
        vouched = self.inputs.get(key)
        if vouched is None or key in self._verified:
            return
        if sha256() != vouched.sha256:
            raise InputMissing(
                f"input {self.url_of(key)} is not the file its DONE marker vouches for "
                f"(another sha256); run `{vouched.redo}` to redo it"
            )
        self._verified.add(key)

    @property
    def url(self) -> str:
        return self.inner.url

    def artifacts(self, prefix: str = "") -> Artifacts:
        """What this stage wrote under `prefix` so far, sorted by key."""
        return {k: dict(v) for k, v in sorted(self._written.items()) if k.startswith(prefix)}

    def keep(self, key: str) -> None:
        """Vouch for an object an earlier attempt wrote and this one keeps (the checkpoints
        a resumed trainer continues from): it is read and hashed once, now."""
        validate_key(key)
        self._record(key, self.inner.size(key), self.inner.sha256(key))

    def _record(self, key: str, size: int, sha256: str) -> None:
        if key.startswith(self.prefix) and not key.startswith(self.skip):
            self._written[key] = {"size": size, "sha256": sha256}

    def _put_bytes(self, key: str, data: bytes) -> None:
        self.inner._put_bytes(key, data)
        self._record(key, len(data), hashlib.sha256(data).hexdigest())

    def _put_bytes_if_absent(self, key: str, data: bytes) -> bool:
        written = self.inner._put_bytes_if_absent(key, data)
        if written:
            self._record(key, len(data), hashlib.sha256(data).hexdigest())
        return written

    def _remove_in_flight(self, prefix: str) -> int:
        return self.inner._remove_in_flight(prefix)

    def _put_file(self, key: str, path: Path) -> None:
        size, sha256 = path.stat().st_size, file_sha256(path)
        self.inner._put_file(key, path)
        self._record(key, size, sha256)

    def _delete(self, key: str) -> None:
        self.inner._delete(key)
        self._written.pop(key, None)

    def _get_bytes(self, key: str) -> bytes:
        data = self.inner._get_bytes(key)
        self._check_read(key, lambda: hashlib.sha256(data).hexdigest())
        return data

    def _get_file(self, key: str, path: Path) -> None:
        self.inner._get_file(key, path)
        self._check_read(key, lambda: file_sha256(path))

    def _exists(self, key: str) -> bool:
        return self.inner._exists(key)

    def _size(self, key: str) -> int:
        return self.inner._size(key)

    def _list(self, prefix: str) -> builtins.list[str]:
        return self.inner._list(prefix)

    def _list_dirs(self, prefix: str) -> builtins.list[str]:
        return self.inner._list_dirs(prefix)

    @contextlib.contextmanager
    def _local_copy(self, key: str) -> Iterator[Path]:
        with self.inner._local_copy(key) as path:  # a local folder's own file, not a copy
            self._check_read(key, lambda: file_sha256(path))
            yield path


def parse_marker(data: bytes) -> dict[str, Any] | None:
    """A marker's fields; None for one that is empty, not JSON or not an object."""
    try:
        marker = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return marker if isinstance(marker, dict) else None


def listed_artifacts(marker: dict[str, Any]) -> Artifacts | None:
    """The artifacts a marker vouches for; None when it lists none in the current format."""
    artifacts = marker.get("artifacts")
    if marker.get("format") != DONE_FORMAT or not isinstance(artifacts, dict):
        return None
    for key, entry in artifacts.items():
        try:
            validate_key(key)
        except LayoutError:
            return None
        if not (
            isinstance(entry, dict)
            and type(entry.get("size")) is int
            and isinstance(entry.get("sha256"), str)
        ):
            return None
    return artifacts


def check_listed(
    store: Store, artifacts: Artifacts, *, digests: bool, seen: set[str] | None = None
) -> str | None:
    """The first listed artifact that is not what its marker says, as a phrase naming its
    URL; None when all are. `digests` also compares contents (and follows listed DONE
    markers); `seen` keeps an artifact two markers list from being read twice."""
    seen = set() if seen is None else seen
    for key, entry in sorted(artifacts.items()):
        if key in seen:
            continue
        seen.add(key)
        url = store.url_of(key)
        try:
            size = store.size(key)
        except ArtifactNotFound:
            return f"{url} is missing"
        if size != entry["size"]:
            return f"{url} has {size} bytes where its DONE marker says {entry['size']}"
        if not digests:
            continue
        if size <= DIGEST_LIMIT and store.sha256(key) != entry["sha256"]:
            return f"{url} is not the file its DONE marker vouches for (another sha256)"
        if key.endswith("/DONE"):
            problem = done_problem(store, key, seen=seen)
            if problem:
                return problem
    return None


def done_problem(store: Store, key: str, *, seen: set[str] | None = None) -> str | None:
    """Why the DONE marker at `key` does not vouch for intact artifacts (sizes and
    digests); None when it does."""
    try:
        data = store.get_bytes(key)
    except ArtifactNotFound:
        return f"{store.url_of(key)} is missing"
    return marker_problem(store, key, parse_marker(data), seen=seen)


def marker_problem(
    store: Store, key: str, marker: dict[str, Any] | None, *, seen: set[str] | None = None
) -> str | None:
    """`done_problem` for a marker already read (`parse_marker`'s answer for `key`)."""
    url = store.url_of(key)
    if marker is None:
        return f"{url} is unreadable (empty or not a JSON object)"
    artifacts = listed_artifacts(marker)
    if artifacts is None:
        return f"{url} lists no artifacts (written before DONE format {DONE_FORMAT})"
    return check_listed(store, artifacts, digests=True, seen=seen)
