"""ReLU SAE with an L1 penalty weighted by decoder norms (Anthropic, April 2024 update).

f = ReLU(z); loss = ‖x − x̂‖² + λ Σ_i f_i ‖d_i‖, λ = `l1_coeff`. The decoder rows are not
renormalised: their norms sit in the penalty instead, so shrinking f while growing d_i
buys nothing, and the optimiser may still set each feature's scale.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from shared.sae.base import LossTerms, SparseAutoencoder


class ReLUSAE(SparseAutoencoder):
    arch: ClassVar[str] = "relu"
    unit_norm_decoder: ClassVar[bool] = False

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.pre_activations(x))

    def loss(self, x: torch.Tensor, sparsity_scale: torch.Tensor | float = 1.0) -> LossTerms:
        f = self.encode(x)
        mse = self.reconstruction_error(x, self.decode(f))
        l1 = (f * self.W_dec.norm(dim=1)).sum(-1).mean()
        sparsity = self.config.l1_coeff * sparsity_scale * l1
        l0 = (f > 0).float().sum(-1).mean().detach()
        return LossTerms(mse + sparsity, mse, sparsity, mse.new_zeros(()), l0)
