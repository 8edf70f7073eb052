"""TopK SAE with the AuxK dead-latent loss (Gao et al. 2024, "Scaling and evaluating SAEs").

f keeps the k largest pre-activations (ReLU'd), so L0 ≤ k is fixed rather than tuned.
Latents that have not fired for `dead_after_tokens` tokens are dead; AuxK asks the
k_aux = d_in / 2 largest dead pre-activations to reconstruct the main model's residual
error, which gives dead latents a gradient that pulls them back towards the data:
loss = ‖x − x̂‖² + α ‖e − ê‖², α = `aux_k_coeff` (1/32 in the paper).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from shared.sae.base import LossTerms, SAEConfig, SparseAutoencoder


class TopKSAE(SparseAutoencoder):
    arch: ClassVar[str] = "topk"
    tokens_since_fired: torch.Tensor

    def __init__(self, config: SAEConfig, generator: torch.Generator | None = None) -> None:
        if config.k is None or not 0 < config.k <= config.d_sae:
            raise ValueError(f"TopK needs 0 < k <= d_sae ({config.d_sae}), got k={config.k}")
        super().__init__(config, generator)
        self.k = config.k
        self.k_aux = min(max(config.d_in // 2, 1), config.d_sae)
        # Tokens seen since each latent last fired: state of the dead-latent detector.
        self.register_buffer("tokens_since_fired", torch.zeros(config.d_sae, dtype=torch.long))

    def _top(self, z: torch.Tensor, k: int) -> torch.Tensor:
        values, index = z.topk(k, dim=-1, sorted=False)
        return torch.zeros_like(z).scatter(-1, index, values.relu())

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self._top(self.pre_activations(x), self.k)

    def loss(self, x: torch.Tensor, sparsity_scale: torch.Tensor | float = 1.0) -> LossTerms:
        z = self.pre_activations(x)
        f = self._top(z, self.k)
        x_hat = self.decode(f)
        mse = self.reconstruction_error(x, x_hat)
        dead = self.tokens_since_fired > self.config.dead_after_tokens
        residual = (x - x_hat).detach()
        f_aux = self._top(z.masked_fill(~dead, float("-inf")), self.k_aux)
        aux_error = (f_aux @ self.W_dec - residual).pow(2).sum(-1).mean()
        aux = self.config.aux_k_coeff * aux_error * dead.any().float()
        with torch.no_grad():
            fired = (f > 0).any(0)
            self.tokens_since_fired.add_(x.shape[0]).masked_fill_(fired, 0)
        l0 = (f > 0).float().sum(-1).mean().detach()
        return LossTerms(mse + aux, mse, mse.new_zeros(()), aux, l0)
