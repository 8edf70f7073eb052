"""The local folder backend of the store.

A key is a file under the root. Writes go through a temp file and `os.replace`, so a
reader never sees half an object, and empty folders are pruned on delete, so listings
agree with S3 (which has no folders).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from shared.errors import StoreError
from shared.store_base import COPY_CHUNK, Store, missing_artifact
from shared.store_keys import IN_FLIGHT_NAME_RE

__all__ = ["COPY_CHUNK", "LocalStore", "atomic_write"]


def _temp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{secrets.token_hex(8)}")


def atomic_write(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Write through a unique temp file in the same folder, fsync, then `os.replace`.

    A reader racing this sees the old file or the new one, never a partial one, and a
    crash leaves at most a temp file that listings skip.
    """
    for attempt in range(3):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temp_sibling(path)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileNotFoundError:
            # A concurrent delete pruned the empty parent folder between mkdir and open.
            if attempt == 2:
                raise
            continue
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return


class LocalStore(Store):
    """A folder on this machine: the default for local runs, tests and the demo."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().resolve()

    @property
    def url(self) -> str:
        return self.root.as_uri()

    def _path(self, key: str) -> Path:
        return self.root / key

    def _write_path(self, key: str) -> Path:
        """Where a write or delete of `key` lands, refusing a folder symlinked out of the store.

        Keys cannot climb out (`validate_key`), but a symlink inside the store can point
        anywhere: writing through it would change files the store does not own.
        """
        path = self._path(key)
        if not path.parent.resolve().is_relative_to(self.root):
            raise StoreError(
                f"cannot write {self.url_of(key)}: a folder on its path is a symlink out of "
                f"the store; remove the link (find {self.root} -type l)"
            )
        return path

    def _oserror(self, action: str, key: str, exc: OSError) -> StoreError:
        return StoreError(f"cannot {action} {self.url_of(key)}: {exc.strerror or exc}")

    def _put_bytes(self, key: str, data: bytes) -> None:
        try:
            atomic_write(self._write_path(key), lambda f: f.write(data))
        except OSError as exc:
            raise self._oserror("write", key, exc) from None

    def _put_bytes_if_absent(self, key: str, data: bytes) -> bool:
        path = self._write_path(key)
        staged = _temp_sibling(path)
        try:
            atomic_write(staged, lambda f: f.write(data))
            os.link(staged, path)  # fails if `path` exists: no overwrite, no window
        except FileExistsError:
            return False
        except OSError as exc:
            raise self._oserror("write", key, exc) from None
        finally:
            staged.unlink(missing_ok=True)
        return True

    def _get_bytes(self, key: str) -> bytes:
        try:
            with open(os.path.join(self.root, key), "rb") as f:
                return f.read()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise missing_artifact(self.url_of(key)) from None
        except OSError as exc:
            raise self._oserror("read", key, exc) from None

    def _put_file(self, key: str, path: Path) -> None:
        try:
            with path.open("rb") as src:
                atomic_write(
                    self._write_path(key), lambda f: shutil.copyfileobj(src, f, COPY_CHUNK)
                )
        except OSError as exc:
            raise self._oserror("write", key, exc) from None

    def _get_file(self, key: str, path: Path) -> None:
        try:
            src = self._path(key).open("rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise missing_artifact(self.url_of(key)) from None
        except OSError as exc:
            raise self._oserror("read", key, exc) from None
        with src:
            try:
                atomic_write(path, lambda f: shutil.copyfileobj(src, f, COPY_CHUNK))
            except OSError as exc:
                raise StoreError(
                    f"cannot copy {self.url_of(key)} to {path}: {exc.strerror or exc}"
                ) from None

    def _exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def _size(self, key: str) -> int:
        path = self._path(key)
        if not path.is_file():
            raise missing_artifact(self.url_of(key))
        try:
            return path.stat().st_size
        except OSError as exc:
            raise self._oserror("look up", key, exc) from None

    def _delete(self, key: str) -> None:
        path = self._write_path(key)
        try:
            path.unlink(missing_ok=True)
        except (IsADirectoryError, NotADirectoryError):
            return
        except OSError as exc:
            raise self._oserror("delete", key, exc) from None
        # S3 has no folders: prune the ones this delete emptied so listings agree.
        parent = path.parent
        while parent != self.root:
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent

    def _list(self, prefix: str) -> list[str]:
        # Plain strings and scandir: the registry lists status/ of every run it shows.
        folder, _, partial = prefix.rpartition("/")
        rel = folder + "/" if folder else ""
        todo = [(os.path.join(self.root, folder), rel, partial)]
        keys: list[str] = []
        while todo:
            path, rel, partial = todo.pop()
            try:
                entries = os.scandir(path)
            except (FileNotFoundError, NotADirectoryError):
                continue
            with entries:
                for entry in entries:
                    if not entry.name.startswith(partial):
                        continue
                    if entry.is_dir(follow_symlinks=False):
                        todo.append((entry.path, rel + entry.name + "/", ""))
                    elif entry.is_file() and not IN_FLIGHT_NAME_RE.match(entry.name):
                        keys.append(rel + entry.name)
        return keys

    def _remove_in_flight(self, prefix: str) -> int:
        removed = 0
        for folder, _, names in os.walk(self.root / prefix):
            for name in names:
                if IN_FLIGHT_NAME_RE.match(name):
                    Path(folder, name).unlink(missing_ok=True)
                    removed += 1
        return removed

    def _list_dirs(self, prefix: str) -> list[str]:
        try:
            with os.scandir(self.root / prefix) as entries:
                return [e.name for e in entries if e.is_dir(follow_symlinks=False)]
        except (FileNotFoundError, NotADirectoryError):
            return []

    @contextlib.contextmanager
    def _local_copy(self, key: str) -> Iterator[Path]:
        # Writers replace files, never modify them, so the file itself is a stable copy.
        path = self._path(key)
        if not path.is_file():
            raise missing_artifact(self.url_of(key))
        yield path
