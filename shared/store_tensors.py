"""Tensors in the store: safetensors files, written and read through a local path.

safetensors needs a real file on both sides, so `Store.put_tensors`/`get_tensors` hand
these functions a temp file (or the local store's own file) and move bytes themselves.
safetensors never unpickles anything, unlike `torch.load`, so a checkpoint from the store
cannot run code.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from shared.errors import StoreError

# torch and safetensors are imported where they are used: most processes (`driftlab runs`,
# the registry) never touch a tensor.
if TYPE_CHECKING:
    import torch

__all__ = ["read_safetensors", "safetensors_bytes", "write_safetensors"]


def write_safetensors(
    tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None
) -> None:
    """Save `tensors` (any device, any layout) and `metadata` as a safetensors file."""
    from safetensors.torch import save_file

    save_file(_cpu_tensors(tensors), str(path), metadata=metadata)


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> bytes:
    """`tensors` and `metadata` as the bytes of a safetensors file, for small objects that
    are written in one piece (`Store.put_bytes_if_absent`)."""
    from safetensors.torch import save

    return save(_cpu_tensors(tensors), metadata=metadata)


def read_safetensors(path: Path, url: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of the safetensors file at `path`; `url` names it in errors."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
            metadata = f.metadata() or {}
    except SafetensorError as exc:
        raise StoreError(f"{url} is not a valid safetensors file: {exc}") from None
    return tensors, dict(metadata)


def _cpu_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors moved to the CPU and made contiguous, as safetensors requires.

    Tensors sharing storage (tied embeddings) are copied, because safetensors refuses
    aliases.
    """
    out = {}
    seen: set[int] = set()
    for name, tensor in tensors.items():
        t = tensor.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.numel():
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out
