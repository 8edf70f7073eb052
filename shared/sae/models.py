"""The SAE architectures behind one interface (`base.SparseAutoencoder`), by name.

`encode`, `decode`, `forward` and `loss` work on scaled inputs; `features` and
`reconstruct` on hidden states as stored. Saved weights carry their config in the
safetensors metadata, so `from_tensors` rebuilds the exact SAE anywhere (detection,
notebooks) from that one file. Imports torch only (the benchmark relies on it).
"""

from __future__ import annotations

import json

import torch

from shared.sae.base import LossTerms, SAEConfig, SparseAutoencoder
from shared.sae.jumprelu import JumpReLUSAE
from shared.sae.relu import ReLUSAE
from shared.sae.topk import TopKSAE

__all__ = ["ARCHS", "LossTerms", "SAEConfig", "SparseAutoencoder", "build_sae", "from_tensors"]

ARCHS: dict[str, type[SparseAutoencoder]] = {
    cls.arch: cls for cls in (JumpReLUSAE, TopKSAE, ReLUSAE)
}
CONFIG_METADATA = "sae_config"


def build_sae(config: SAEConfig, seed: int = 0) -> SparseAutoencoder:
    """A freshly initialised SAE: unit-norm random decoder, encoder its transpose."""
    try:
        cls = ARCHS[config.arch]
    except KeyError:
        raise ValueError(f"unknown SAE arch {config.arch!r}; one of {sorted(ARCHS)}") from None
    return cls(config, torch.Generator().manual_seed(seed))


def metadata(sae: SparseAutoencoder) -> dict[str, str]:
    return {CONFIG_METADATA: json.dumps(sae.config.to_json(), sort_keys=True)}


def from_tensors(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> SparseAutoencoder:
    """The SAE saved as (`sae.tensors()`, `metadata(sae)`)."""
    config = SAEConfig(**json.loads(meta[CONFIG_METADATA]))
    sae = build_sae(config)
    sae.load_state_dict(tensors)
    return sae.eval()
