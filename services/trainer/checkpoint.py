"""Everything needed to continue training exactly where a checkpoint left off.

Exact resume needs more than weights: the optimizer moments, the schedule's position,
every random generator and the position in the data stream. They are stored as
safetensors (tensors) and JSON (everything else) — never pickle — and the checkpoint's
DONE marker is written last and lists each file's size and sha256 (`shared.done`), so a
checkpoint either is complete and intact or does not count.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from shared import layout
from shared.errors import ArtifactNotFound
from shared.models import ModelError
from shared.store import Store

STATE_FORMAT = 1


@dataclass
class TrainerState:
    """Scalars of the loop's position; saved as trainer_state.json."""

    step: int = 0
    cursor: int = 0  # sequences of the shuffled stream consumed so far
    tokens_seen: int = 0
    elapsed_seconds: float = 0.0
    spec_digest: dict[str, str] = field(default_factory=dict)
    origin: str = ""  # "run_id:step" this training continued from, if another run


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    kind, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    version, py_state, py_gauss = random.getstate()
    info = {
        "numpy": [kind, np.asarray(keys).tolist(), int(pos), int(has_gauss), float(gauss)],
        "python": [version, list(py_state), py_gauss],
    }
    return tensors, info


def _restore_rng(tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = sorted(k for k in tensors if k.startswith("rng.cuda."))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda][: torch.cuda.device_count()])
    kind, keys, pos, has_gauss, gauss = info["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, py_state, py_gauss = info["python"]
    random.setstate((version, tuple(py_state), py_gauss))


def save_training_state(
    store: Store,
    run_id: str,
    state: TrainerState,
    optim_state: dict[str, Any],
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
    param_names: list[str],
) -> None:
    """optim.safetensors (moments + RNG tensors) and trainer_state.json (the rest).

    `optim_state` is an optimizer state dict: keyed by parameter index (one process, DDP)
    or by parameter name (FSDP's gathered full state); both round-trip.
    """
    tensors: dict[str, torch.Tensor] = {}
    for index, slots in optim_state["state"].items():
        for slot, value in slots.items():
            tensors[f"state.{index}.{slot}"] = torch.as_tensor(value).detach().cpu()
    rng_tensors, rng_info = _rng_state()
    tensors.update(rng_tensors)
    store.put_tensors(layout.checkpoint_optim_key(run_id, state.step), tensors)
    body = {
        "format": STATE_FORMAT,
        **asdict(state),
        "param_names": param_names,
        "param_groups": optim_state["param_groups"],
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "rng": rng_info,
    }
    store.put_json(layout.checkpoint_trainer_state_key(run_id, state.step), body)


def load_training_state(
    store: Store,
    run_id: str,
    step: int,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
    param_names: list[str],
) -> tuple[TrainerState, dict[str, Any]]:
    """Restore schedule, scaler and RNG; return the loop's position and the optimizer state."""
    try:
        body = store.get_json(layout.checkpoint_trainer_state_key(run_id, step))
        tensors, _ = store.get_tensors(layout.checkpoint_optim_key(run_id, step))
    except ArtifactNotFound as err:
        raise ModelError(f"checkpoint step {step} of run {run_id} is incomplete: {err}") from None
    if body.get("param_names") != param_names:
        raise ModelError(
            f"checkpoint step {step} of run {run_id} holds optimizer state for other "
            "parameters (another architecture?); start a new run or use --force"
        )
    state: dict[int | str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("state."):
            index, slot = key[len("state.") :].rsplit(".", 1)
            state.setdefault(int(index) if index.isdigit() else index, {})[slot] = value
    scheduler.load_state_dict(body["scheduler"])
    if scaler is not None and body.get("scaler"):
        scaler.load_state_dict(body["scaler"])
    _restore_rng(tensors, body["rng"])
    fields = {k: body[k] for k in TrainerState.__dataclass_fields__ if k in body}
    return TrainerState(**fields), {"state": state, "param_groups": body["param_groups"]}
