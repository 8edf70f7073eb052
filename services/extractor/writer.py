"""Layer files written while the forward pass runs, with memory that does not grow.

Each layer file is a safetensors file whose header is known before the first batch (the
probe fixes the token count), so it is preallocated on local disk and every batch's rows
go straight to their place with one positioned write per site. On a GPU a background
thread does the writes (waiting for the asynchronous device-to-host copies), so the next
batch's forward pass never waits for the disk; on the CPU they are done inline (a second
thread only competes with the forward pass for the same cores). Uploads to the store then
run in parallel.
Host memory is a few batches of outputs, whatever the probe size.
"""

from __future__ import annotations

import errno
import json
import os
import queue
import tempfile
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import torch

from shared.hidden import ExtractionError

_SAFETENSORS_DTYPE = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}
# Batches allowed in flight between the forward pass and the writer: enough to overlap,
# few enough that host memory stays bounded.
QUEUE_DEPTH = 3
_UPLOAD_THREADS = 4


_Item = tuple[
    int, list[dict[str, torch.Tensor]], "torch.cuda.Event | None", "Callable[[], None] | None"
]


@dataclass(frozen=True)
class LayerFile:
    """One preallocated layer file: where each site's rows start."""

    path: Path
    key: str
    data_start: int
    site_offsets: dict[str, int]
    row_bytes: int


def _header(
    sites: Sequence[str], n_tokens: int, d_model: int, dtype: torch.dtype, meta: dict[str, str]
) -> tuple[bytes, dict[str, int], int]:
    itemsize = torch.empty((), dtype=dtype).element_size()
    row_bytes = d_model * itemsize
    entries: dict[str, object] = {"__metadata__": meta}
    offsets: dict[str, int] = {}
    cursor = 0
    for site in sites:
        size = n_tokens * row_bytes
        entries[site] = {
            "dtype": _SAFETENSORS_DTYPE[dtype],
            "shape": [n_tokens, d_model],
            "data_offsets": [cursor, cursor + size],
        }
        offsets[site] = cursor
        cursor += size
    raw = json.dumps(entries, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the data to 8 bytes
    return len(raw).to_bytes(8, "little") + raw, offsets, row_bytes


class LayerWriter:
    """Preallocated layer files on local disk, filled batch by batch on a thread."""

    def __init__(
        self,
        keys: Sequence[str],
        sites_per_layer: Sequence[Sequence[str]],
        n_tokens: int,
        d_model: int,
        dtype: torch.dtype,
        meta: Sequence[dict[str, str]],
        *,
        background: bool = True,
    ) -> None:
        """`background=False` writes in the caller's thread: on a CPU-only machine the
        forward pass already uses every core, and a second Python thread only contends
        with it (measured: slower), while a device needs the thread to overlap."""
        self._tmp = tempfile.TemporaryDirectory(prefix="driftlab-extract-")
        self.files: list[LayerFile] = []
        self._fds: list[int] = []
        try:
            for layer, (key, sites) in enumerate(zip(keys, sites_per_layer, strict=True)):
                path = Path(self._tmp.name) / f"layer-{layer:02d}.safetensors"
                head, offsets, row_bytes = _header(sites, n_tokens, d_model, dtype, meta[layer])
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                self._fds.append(fd)
                os.pwrite(fd, head, 0)
                os.ftruncate(fd, len(head) + n_tokens * row_bytes * len(sites))
                self.files.append(LayerFile(path, key, len(head), offsets, row_bytes))
        except OSError as exc:
            self.close()
            raise _disk_error(exc, self._tmp.name) from None
        self._queue: queue.Queue[_Item | None] = queue.Queue(maxsize=QUEUE_DEPTH)
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        if background:
            self._thread = threading.Thread(target=self._drain, name="extract-writer", daemon=True)
            self._thread.start()

    def put(
        self,
        row: int,
        layers: list[dict[str, torch.Tensor]],
        ready: torch.cuda.Event | None = None,
        written: Callable[[], None] | None = None,
    ) -> None:
        """Queue rows `row..row+n` of every layer (host tensors).

        `ready` is the CUDA event of their asynchronous copy; `written` is called once they
        are on disk, so pinned buffers can be reused.
        """
        if self._error is not None:
            raise self._error
        if self._thread is None:
            self._write((row, layers, ready, written))
            if self._error is not None:
                raise self._error
        else:
            self._queue.put((row, layers, ready, written))

    def _drain(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is None:  # else keep draining: the producer must never block
                self._write(item)

    def _write(self, item: _Item) -> None:
        row, layers, ready, written = item
        try:
            if ready is not None:
                ready.synchronize()
            for file, fd, sites in zip(self.files, self._fds, layers, strict=True):
                for site, rows in sites.items():
                    data = rows.contiguous().view(torch.uint8).numpy()
                    offset = file.data_start + file.site_offsets[site] + row * file.row_bytes
                    os.pwrite(fd, data.data, offset)
            if written is not None:
                written()
        except OSError as exc:
            self._error = _disk_error(exc, self._tmp.name)
        except BaseException as exc:
            self._error = exc

    def finish(self, upload: Callable[[str, Path], None]) -> None:
        """Wait for every write, then upload every file with `upload(key, path)` in parallel."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
        if self._error is not None:
            raise self._error
        with ThreadPoolExecutor(_UPLOAD_THREADS, thread_name_prefix="extract-upload") as pool:
            futures = [pool.submit(upload, f.key, f.path) for f in self.files]
            for future in futures:
                future.result()

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []
        self._tmp.cleanup()

    def __enter__(self) -> LayerWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self.close()


def _disk_error(exc: OSError, where: str) -> ExtractionError:
    if exc.errno == errno.ENOSPC:
        return ExtractionError(
            f"no space left on the local disk while writing hidden states under {where}; "
            "free space, point TMPDIR at a larger disk, or lower extract.max_tokens_per_layer"
        )
    return ExtractionError(f"cannot write hidden states under {where}: {exc.strerror}")
