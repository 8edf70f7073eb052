"""Which checkpoint and layers the SAE stages work on, decided from DONE markers alone.

Kept apart from the training and detection code so `python -m services.sae` checks its
inputs (and exits at once when cached) without importing PyTorch.
"""

from __future__ import annotations

from shared import stage_registry
from shared.errors import InputMissing
from shared.spec import RunSpec, SAESpec, sae_layers
from shared.steps import complete_steps, extracted_steps
from shared.store import Store


def training_step(store: Store, run_id: str, spec: SAESpec) -> int:
    """`sae.step`, or the last checkpoint whose extraction is complete."""
    if spec.step is not None:
        return spec.step
    steps = extracted_steps(store, run_id)
    if not steps:
        raise InputMissing(
            f"run {run_id} has no finished extraction to train SAEs on: run "
            f"`{stage_registry.EXTRACT.command(run_id, store.url)}` first"
        )
    return steps[-1]


def final_checkpoint(store: Store, run_id: str, store_arg: str) -> int:
    """The last checkpoint with a DONE marker: the model whose answers are judged."""
    steps = complete_steps(store, run_id)
    if not steps:
        raise InputMissing(
            f"run {run_id} has no finished checkpoint to answer with: run "
            f"`{stage_registry.TRAIN.command(run_id, store_arg)}` first"
        )
    return steps[-1]


def detect_layers(spec: RunSpec) -> list[int]:
    """Tracked layers: `detect.layers`, or every layer with an SAE."""
    chosen = spec.detect.layers
    return sae_layers(spec) if chosen == "all" else list(chosen)
