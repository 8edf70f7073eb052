"""The store interface: what every backend offers, validated and formatted once.

`Store` turns keys and Python values into the few byte-moving primitives a backend
implements, so the local folder and S3 cannot drift apart in what they accept or how they
encode JSON, JSON lines or tensors.
"""

from __future__ import annotations

import abc
import builtins
import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.errors import ArtifactNotFound, JsonLinesError, LayoutError, StoreError
from shared.store_keys import validate_key, validate_prefix
from shared.store_tensors import read_safetensors, write_safetensors

if TYPE_CHECKING:
    import torch

__all__ = ["COPY_CHUNK", "Store", "file_sha256", "missing_artifact"]

#: Bytes per read when a file or a download is copied or hashed, so no object is held whole.
COPY_CHUNK = 1024 * 1024


def file_sha256(path: Path) -> str:
    """Hex sha256 of a local file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(COPY_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def missing_artifact(url: str) -> ArtifactNotFound:
    """The error for a key that is not there, telling the user which stage should write it."""
    return ArtifactNotFound(
        f"{url} does not exist: has the stage that writes it run? (see `driftlab runs`)"
    )


class Store(abc.ABC):
    """Keys in, bytes out: the shared logic of both backends.

    Public methods validate keys and convert formats here, once; a backend only moves
    bytes and files (`_put_bytes`, `_get_file`, ...), so both behave alike by design.
    """

    @property
    @abc.abstractmethod
    def url(self) -> str:
        """The store's base URL, what `open_store` takes to reopen the same store."""

    def url_of(self, key: str) -> str:
        """Full URL of `key`, for messages that must say exactly where to look."""
        return f"{self.url.rstrip('/')}/{validate_key(key)}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(url={self.url!r})"

    # -- raw bytes and files -------------------------------------------------------------

    def put_bytes(self, key: str, data: bytes) -> None:
        """Write `data` at `key`; readers see the old or the new object, never a mix."""
        self._put_bytes(validate_key(key), bytes(data))

    def put_bytes_if_absent(self, key: str, data: bytes) -> bool:
        """Write `data` at `key` only if no object is there; False (nothing written) if one is.

        Atomic on both stores (a hard link on a folder, a conditional `If-None-Match: *`
        write on S3), so of two writers racing for one key exactly one wins: how a run's
        spec is registered and how its writer's lease is taken.
        """
        return self._put_bytes_if_absent(validate_key(key), bytes(data))

    def get_bytes(self, key: str) -> bytes:
        """Read the whole object; missing keys raise `ArtifactNotFound`."""
        return self._get_bytes(validate_key(key))

    def put_file(self, key: str, path: str | os.PathLike[str]) -> None:
        """Upload a local file without loading it into memory."""
        validate_key(key)
        if not os.path.isfile(path):
            raise StoreError(f"cannot store {self.url_of(key)}: {path} is not a file")
        self._put_file(key, Path(path))

    def get_file(self, key: str, path: str | os.PathLike[str]) -> None:
        """Download to `path`, which appears complete or not at all."""
        self._get_file(validate_key(key), Path(path))

    def exists(self, key: str) -> bool:
        return self._exists(validate_key(key))

    def size(self, key: str) -> int:
        """Bytes in the object, from metadata alone (a stat, a HEAD): cheap enough to check
        every artifact a DONE marker lists on every cached rerun. Missing: `ArtifactNotFound`."""
        return self._size(validate_key(key))

    def sha256(self, key: str) -> str:
        """Hex sha256 of the object, read in chunks (S3 downloads it to a temp file first)."""
        validate_key(key)
        with self._local_copy(key) as path:
            return file_sha256(path)

    def delete(self, key: str) -> None:
        """Remove `key`; a missing key is fine, so cleanups can be retried."""
        self._delete(validate_key(key))

    def list(self, prefix: str = "") -> builtins.list[str]:
        """Sorted keys starting with `prefix` (a plain string prefix, recursive)."""
        return sorted(self._list(validate_prefix(prefix)))

    def remove_in_flight(self, prefix: str) -> int:
        """Delete the temporary files interrupted writes left under `prefix`; how many.

        Only a run's single writer may call it (`shared.lease` does, on taking the lease):
        another writer's in-flight file would look the same. S3 has none (a put is atomic).
        """
        return self._remove_in_flight(validate_prefix(prefix))

    def list_dirs(self, prefix: str) -> builtins.list[str]:
        """Sorted names of the immediate child folders of `prefix` ("" or ending in "/").

        Cheap by design (one delimiter listing, one scandir): the run registry calls it on
        stores holding thousands of runs with many files each.
        """
        if prefix and not prefix.endswith("/"):
            raise LayoutError(f"list_dirs prefix {prefix!r} must be empty or end with '/'")
        return sorted(self._list_dirs(validate_prefix(prefix)))

    # -- formats -------------------------------------------------------------------------

    def put_text(self, key: str, text: str) -> None:
        self.put_bytes(key, text.encode("utf-8"))

    def get_text(self, key: str) -> str:
        data = self.get_bytes(key)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise StoreError(f"{self.url_of(key)} is not UTF-8 text: {exc.reason}") from None

    def put_json(self, key: str, obj: Any) -> None:
        """Sorted keys and indentation, so artifacts diff cleanly between runs."""
        self.put_text(key, json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False) + "\n")

    def get_json(self, key: str) -> Any:
        text = self.get_text(key)
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise StoreError(f"{self.url_of(key)} is not valid JSON: {exc}") from None

    def put_jsonl(self, key: str, rows: Iterable[Any], *, allow_nan: bool = True) -> None:
        """One JSON value per line, keys sorted (as `put_json`) and non-ASCII escaped.

        Escaping keeps every row on one line whatever its strings hold (U+2028 included),
        for readers that split on any line break. `allow_nan=False` refuses NaN and
        infinities, for files where one would mean a bug rather than a diverged metric.
        """
        self.put_text(
            key,
            "".join(json.dumps(row, sort_keys=True, allow_nan=allow_nan) + "\n" for row in rows),
        )

    def get_jsonl(self, key: str, *, missing_ok: bool = False) -> builtins.list[Any]:
        """The value of each non-blank line; `missing_ok` reads a missing key as no rows."""
        return [row for _, row in self.get_jsonl_lines(key, missing_ok=missing_ok)]

    def get_jsonl_lines(
        self, key: str, *, missing_ok: bool = False
    ) -> builtins.list[tuple[int, Any]]:
        """(1-based line number, value) of each non-blank line, for errors naming a line.

        Lines end at "\n" only, JSON lines' own separator, so a raw U+2028 written by
        another tool stays inside its string. A line that is not JSON raises
        `JsonLinesError`, which carries its number and the parser's reason, so a caller
        can restate it in its own terms.
        """
        try:
            text = self.get_text(key)
        except ArtifactNotFound:
            if missing_ok:
                return []
            raise
        rows = []
        for number, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                rows.append((number, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise JsonLinesError(self.url_of(key), number, str(exc)) from None
        return rows

    def put_tensors(
        self,
        key: str,
        tensors: dict[str, torch.Tensor],
        metadata: dict[str, str] | None = None,
    ) -> None:
        """Save as safetensors through a temp file, so large checkpoints stream."""
        validate_key(key)
        with tempfile.TemporaryDirectory(prefix="driftlab-") as tmp:
            path = Path(tmp) / "tensors.safetensors"
            write_safetensors(tensors, path, metadata)
            self._put_file(key, path)

    def get_tensors(self, key: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Load a safetensors object: (tensors, metadata). Never unpickles anything."""
        validate_key(key)
        with self._local_copy(key) as path:
            return read_safetensors(path, self.url_of(key))

    # -- backend primitives (keys already validated) -------------------------------------

    @abc.abstractmethod
    def _put_bytes(self, key: str, data: bytes) -> None: ...

    @abc.abstractmethod
    def _put_bytes_if_absent(self, key: str, data: bytes) -> bool: ...

    @abc.abstractmethod
    def _get_bytes(self, key: str) -> bytes: ...

    @abc.abstractmethod
    def _put_file(self, key: str, path: Path) -> None: ...

    @abc.abstractmethod
    def _get_file(self, key: str, path: Path) -> None: ...

    @abc.abstractmethod
    def _exists(self, key: str) -> bool: ...

    @abc.abstractmethod
    def _size(self, key: str) -> int: ...

    @abc.abstractmethod
    def _delete(self, key: str) -> None: ...

    @abc.abstractmethod
    def _list(self, prefix: str) -> builtins.list[str]: ...

    @abc.abstractmethod
    def _list_dirs(self, prefix: str) -> builtins.list[str]: ...

    def _remove_in_flight(self, prefix: str) -> int:
        return 0

    @contextlib.contextmanager
    def _local_copy(self, key: str) -> Iterator[Path]:
        """A local file holding the object, for readers (safetensors) that need a path."""
        with tempfile.TemporaryDirectory(prefix="driftlab-") as tmp:
            path = Path(tmp) / "object"
            self._get_file(key, path)
            yield path
