"""An SAE in the store: `sae/layer-LL/sae.safetensors` (weights + config) and `sae.json`."""

from __future__ import annotations

from typing import Any

import torch

from shared import layout, stage_registry
from shared.errors import ArtifactNotFound, InputMissing
from shared.sae.models import SparseAutoencoder, from_tensors, metadata
from shared.store import Store

FORMAT = 1


def save_sae(
    store: Store, run_id: str, layer: int, sae: SparseAutoencoder, report: dict[str, Any]
) -> None:
    """Weights first, then the report: a reader that finds `sae.json` finds the weights."""
    store.put_tensors(layout.sae_weights_key(run_id, layer), sae.tensors(), metadata(sae))
    store.put_json(layout.sae_config_key(run_id, layer), {"format": FORMAT, **report})


def load_sae(
    store: Store, run_id: str, layer: int, device: str | torch.device = "cpu"
) -> SparseAutoencoder:
    """The trained SAE of one layer, in eval mode; a clear InputMissing when not trained."""
    if not store.exists(layout.sae_done_key(run_id, layer)):
        raise InputMissing(
            f"run {run_id} has no finished SAE for layer {layer}: run "
            f"`{stage_registry.SAE.command(run_id, store.url, layer)}` first"
        )
    try:
        tensors, meta = store.get_tensors(layout.sae_weights_key(run_id, layer))
    except ArtifactNotFound:
        raise InputMissing(
            f"{store.url_of(layout.sae_weights_key(run_id, layer))} is missing although the "
            "layer's DONE marker exists: rerun the SAE training with --force"
        ) from None
    return from_tensors(tensors, meta).to(device)
