"""JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping Ahead"; as in SAELens's jumprelu_sae).

f_i = z_i · H(z_i − θ_i), with a learned per-feature threshold θ = exp(log θ). H has no
useful derivative, so θ learns through straight-through pseudo-derivatives built on a
rectangle kernel K(u) = 1[|u| < ½] of bandwidth ε:

    ∂ JumpReLU(z, θ) / ∂θ  ≈ −(θ / ε) · K((z − θ) / ε)
    ∂ H(z − θ) / ∂θ        ≈ −(1 / ε) · K((z − θ) / ε)      (and 0 towards z)

Sparsity penalties (coefficient λ = `l0_coeff`, ramped in by the caller):

- `step`: λ · L0, the paper's loss, L0 differentiated through the pseudo-derivative;
- `tanh`: λ · Σ tanh(c · f_i · ‖d_i‖) (SAELens's smooth stand-in for L0, c = `tanh_scale`);
- `target_l0`: λ · (L0 − target)², a quadratic pull toward a chosen L0, useful when the
  token budget is too small to tune λ by sweeping.

Dead features (Anthropic, "Circuits Updates – January 2025"): a feature whose
pre-activation never reaches its threshold gets no gradient from either term above, so
once dead it stays dead. The pre-activation loss μ · Σ_i ReLU(θ_i − z_i), μ =
`pre_act_coeff` (0: off), pushes every feature's z towards θ on the tokens it does not
fire on, so a dead feature drifts back until it fires on the tokens nearest its direction,
where reconstruction and sparsity decide again whether it stays. (Anthropic weight the
term by decoder norms; ours are kept at 1.) It is a trade: on the demo's embedding layer
(1,024 steps) μ = 1e-3 cut dead features from 32% to 2% but doubled L0, and took L0 above
d_in / 2 one layer up; 3e-6 (Anthropic's, for far longer training) changed nothing.

Defaults (spec `sae`): bandwidth 0.05 and initial threshold 0.01 are SAELens's; the paper
uses 0.001 for both. Inputs have unit mean squared norm (see `base`).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from shared.sae.base import LossTerms, SAEConfig, SparseAutoencoder


def _rectangle(z: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
    return ((z - threshold).abs() < bandwidth / 2).to(torch.float32)


def _per_feature(grad: torch.Tensor, width: int) -> torch.Tensor:
    """Sum a [..., d_sae] gradient over every leading (token) dimension."""
    return grad.reshape(-1, width).sum(0)


class JumpReLUFunction(torch.autograd.Function):
    """z · 1[z > θ]; gradient 1[z > θ] towards z, the rectangle pseudo-derivative towards θ."""

    @staticmethod
    def forward(
        ctx: Any, z: torch.Tensor, threshold: torch.Tensor, bandwidth: float
    ) -> torch.Tensor:
        ctx.save_for_backward(z, threshold)
        ctx.bandwidth = bandwidth
        return z * (z > threshold)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        z, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_z = grad * (z > threshold)
        kernel = _rectangle(z, threshold, eps)
        grad_theta = -(threshold / eps) * _per_feature(kernel * grad.float(), z.shape[-1])
        return grad_z, grad_theta.to(threshold.dtype), None


class StepFunction(torch.autograd.Function):
    """1[z > θ]; no gradient towards z, the rectangle pseudo-derivative towards θ."""

    @staticmethod
    def forward(
        ctx: Any, z: torch.Tensor, threshold: torch.Tensor, bandwidth: float
    ) -> torch.Tensor:
        ctx.save_for_backward(z, threshold)
        ctx.bandwidth = bandwidth
        return (z > threshold).to(z.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        z, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        kernel = _rectangle(z, threshold, eps)
        grad_theta = -(1.0 / eps) * _per_feature(kernel * grad.float(), z.shape[-1])
        return torch.zeros_like(z), grad_theta.to(threshold.dtype), None


def jumprelu(z: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
    out: torch.Tensor = JumpReLUFunction.apply(z, threshold, bandwidth)
    return out


def step(z: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
    out: torch.Tensor = StepFunction.apply(z, threshold, bandwidth)
    return out


class JumpReLUSAE(SparseAutoencoder):
    arch: ClassVar[str] = "jumprelu"

    def __init__(self, config: SAEConfig, generator: torch.Generator | None = None) -> None:
        super().__init__(config, generator)
        start = torch.full((config.d_sae,), float(config.init_threshold)).log()
        self.log_threshold = nn.Parameter(start)

    @property
    def threshold(self) -> torch.Tensor:
        return self.log_threshold.exp()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return jumprelu(self.pre_activations(x), self.threshold, self.config.bandwidth)

    def loss(self, x: torch.Tensor, sparsity_scale: torch.Tensor | float = 1.0) -> LossTerms:
        cfg = self.config
        z = self.pre_activations(x)
        threshold = self.threshold
        f = jumprelu(z, threshold, cfg.bandwidth)
        mse = self.reconstruction_error(x, self.decode(f))
        if cfg.sparsity_loss == "tanh":
            penalty = torch.tanh(cfg.tanh_scale * f).sum(-1).mean()
        else:
            l0 = step(z, threshold, cfg.bandwidth).sum(-1).mean()
            penalty = l0 if cfg.sparsity_loss == "step" else (l0 - float(cfg.target_l0 or 0)) ** 2
        sparsity = cfg.l0_coeff * sparsity_scale * penalty
        aux = mse.new_zeros(())
        if cfg.pre_act_coeff:
            aux = cfg.pre_act_coeff * torch.relu(threshold - z).sum(-1).mean()
        l0_now = (f != 0).float().sum(-1).mean().detach()
        return LossTerms(mse + sparsity + aux, mse, sparsity, aux, l0_now)
