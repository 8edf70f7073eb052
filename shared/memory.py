"""How much memory a stage of a run needs at least, checked before anything is allocated.

A typo like `model.n_embd: 1e9` or `train.batch_size: 1e9` is a valid integer, so the spec
accepts it, and the stage used to spend a minute building data before dying in an allocator
traceback. Each stage now compares a lower bound of what it will hold at once against the
memory of the device it runs on, and refuses in one line naming the fields that make it
large; `driftlab spec validate --memory 24GiB` makes the same check before submitting.

The bounds count only what must exist at once and undercount everything else (temporary
buffers, allocator slack, the framework itself), so a refusal is certain to be right and a
pass is no promise. Sizes are in float32, as every stage trains and runs in it unless the
spec says otherwise.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from shared.errors import SpecError
from shared.spec import RunSpec, model_sizes

__all__ = [
    "NO_MACHINE",
    "MemoryNeed",
    "check_memory",
    "device_memory",
    "memory_needs",
    "parse_memory",
]

#: More memory than any one machine has: `spec validate` refuses a stage that needs more,
#: whatever machine it will run on.
NO_MACHINE = 2**50
#: Where a container's memory limit is (cgroup v2): a pod cannot use more than it.
CGROUP_MEMORY_MAX = "/sys/fs/cgroup/memory.max"

_FLOAT = 4
#: Tokens per vocabulary when the spec does not fix it: the smallest tokenizer driftlab has
#: (bytes and a few specials), so the bound stays a lower one whatever the tokenizer is.
_MIN_VOCAB = 258
_UNITS = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15}
_UNITS |= {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50}
_MEMORY_RE = re.compile(r"^(\d+(?:\.\d*)?)\s*([kMGTP]i?)?B?$")


@dataclass(frozen=True)
class MemoryNeed:
    """The least memory one stage holds at once, and the fields that make it that large."""

    stage: str
    bytes: int
    what: str


def parameters(spec: RunSpec) -> int:
    """Parameters of the run's GPT-2-style model (tied embeddings, biases ignored)."""
    sizes = model_sizes(spec)
    vocab = spec.model.vocab_size or _MIN_VOCAB
    return 12 * sizes.n_layer * sizes.n_embd**2 + (vocab + sizes.n_positions) * sizes.n_embd


def memory_needs(spec: RunSpec) -> dict[str, MemoryNeed]:
    """A lower bound per stage: what its biggest tensors take at once, in bytes."""
    sizes = model_sizes(spec)
    params = parameters(spec)
    vocab = spec.model.vocab_size or _MIN_VOCAB
    tokens = spec.train.batch_size * min(spec.data.max_length, sizes.n_positions)
    # Weights, gradients and AdamW's two moments; the micro-batch's residual stream at
    # every block and its logits.
    train = 4 * params + tokens * (sizes.n_layer * sizes.n_embd + vocab)
    probe = spec.extract.batch_size * min(spec.data.max_length, sizes.n_positions)
    d_sae = spec.sae.expansion * sizes.n_embd
    # Encoder and decoder with gradients and Adam moments, and one batch of feature codes.
    sae = 4 * 2 * sizes.n_embd * d_sae + spec.sae.batch_size * d_sae
    return {
        "train": MemoryNeed(
            "train", _FLOAT * train,
            f"{params:,} parameters with gradients and AdamW state (model.n_layer, "
            f"model.n_embd), and {tokens:,} tokens a micro-batch (train.batch_size)",
        ),
        "extract": MemoryNeed(
            "extract", _FLOAT * (params + probe * (sizes.n_layer + 1) * sizes.n_embd),
            f"{params:,} parameters, and the hidden states of extract.batch_size sequences",
        ),
        "sae": MemoryNeed(
            "sae", _FLOAT * sae,
            f"an SAE of {sizes.n_embd:,} x {d_sae:,} features with its gradients and Adam "
            "state (sae.expansion, model.n_embd), and one batch of codes (sae.batch_size)",
        ),
    }  # fmt: skip


def check_memory(
    spec: RunSpec, available: int, stages: list[str] | None = None, where: str = "the device has"
) -> None:
    """Refuse, in one line, the first stage whose lower bound exceeds `available` bytes."""
    for name, need in memory_needs(spec).items():
        if stages is not None and name not in stages:
            continue
        if need.bytes > available:
            raise SpecError(
                f"the {name} stage needs at least {_show(need.bytes)}, more than {where} "
                f"({_show(available)}): {need.what}; make them smaller"
            )


def device_memory(device: str) -> int | None:
    """Bytes of memory of `device` (`cpu`, `cuda`, `cuda:N`); None when it cannot be told."""
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            return None
        index = int(device.partition(":")[2] or torch.cuda.current_device())
        return int(torch.cuda.get_device_properties(index).total_memory)
    try:
        physical = int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None
    return min(physical, _cgroup_limit() or physical)


def _cgroup_limit() -> int | None:
    """The container's memory limit (cgroup v2), which a pod's `resources.memory` sets."""
    try:
        text = Path(CGROUP_MEMORY_MAX).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max": no limit


def parse_memory(text: str) -> int:
    """`24GiB`, `24Gi`, `80G`, `512MB`, `1000000`... as bytes; a clear error otherwise."""
    match = _MEMORY_RE.match(text.strip())
    if not match:
        raise SpecError(f"--memory {text}: expected a size such as 24GiB, 80G or 512Mi")
    return int(float(match.group(1)) * _UNITS[match.group(2) or ""])


def _show(n: int) -> str:
    for unit, size in (("PiB", 2**50), ("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n:,} bytes"
