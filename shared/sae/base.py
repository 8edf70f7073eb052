"""What every sparse autoencoder here shares: parameters, scaling, init, the loss's shape.

An SAE works on hidden states multiplied by `input_scale`, chosen so the training tokens
have unit mean squared norm (as in Rajamanoharan et al. 2024): reconstruction errors,
thresholds and sparsity coefficients then mean the same at every layer and checkpoint,
whatever the residual stream's norm. `features` and `reconstruct` take hidden states as
stored and apply the scale themselves, so callers (metrics, detection) never handle it.

This module imports torch only: the benchmark runs it on machines without the rest of
driftlab's dependencies.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn


@dataclass(frozen=True)
class SAEConfig:
    """Everything that defines an SAE and its loss; saved in `sae.json` and the weights."""

    arch: str
    d_in: int
    d_sae: int
    k: int | None = None
    sparsity_loss: str = "step"
    l0_coeff: float = 1e-3
    target_l0: float | None = None
    l1_coeff: float = 1e-2
    bandwidth: float = 0.05
    init_threshold: float = 0.01
    tanh_scale: float = 4.0
    aux_k_coeff: float = 1 / 32
    pre_act_coeff: float = 0.0
    dead_after_tokens: int = 10_000_000

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class LossTerms(NamedTuple):
    """The loss and its parts, all 0-dim tensors (reading them is the caller's choice)."""

    total: torch.Tensor
    mse: torch.Tensor
    sparsity: torch.Tensor
    aux: torch.Tensor
    l0: torch.Tensor


class SparseAutoencoder(nn.Module, ABC):
    """x̂ = W_dec f + b_dec with f = act(W_enc (x - b_dec) + b_enc); subclasses give act.

    Subtracting b_dec before encoding makes the encoder see centred inputs once b_dec sits
    at the data mean, which is also what makes "encoder = decoder transpose" a good start.
    """

    arch: ClassVar[str]
    input_scale: torch.Tensor
    #: Decoder rows are renormalised after each optimiser step; otherwise their norms
    #: enter the sparsity penalty (ReLU + L1, where the penalty could shrink f and grow
    #: W_dec without bound).
    unit_norm_decoder: ClassVar[bool] = True

    def __init__(self, config: SAEConfig, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.config = config
        w_dec = torch.randn(config.d_sae, config.d_in, generator=generator)
        w_dec /= w_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w_dec)
        self.W_enc = nn.Parameter(w_dec.t().clone())
        self.b_enc = nn.Parameter(torch.zeros(config.d_sae))
        self.b_dec = nn.Parameter(torch.zeros(config.d_in))
        self.register_buffer("input_scale", torch.ones(()))

    # -- the interface ---------------------------------------------------------------------

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    @abstractmethod
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations [batch, d_sae] of scaled inputs."""

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.encode(x)
        return self.decode(f), f

    @abstractmethod
    def loss(self, x: torch.Tensor, sparsity_scale: torch.Tensor | float = 1.0) -> LossTerms:
        """Training loss on scaled inputs; `sparsity_scale` ramps the penalty in (0..1)."""

    # -- hidden states as stored -----------------------------------------------------------

    def features(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.encode(hidden.to(self.W_enc.dtype) * self.input_scale)

    def reconstruct(self, hidden: torch.Tensor) -> torch.Tensor:
        """The SAE's version of `hidden`, in the same units and dtype (for splicing)."""
        out = self.decode(self.features(hidden)) / self.input_scale
        return out.to(hidden.dtype)

    # -- training helpers ------------------------------------------------------------------

    @torch.no_grad()
    def init_from_data(self, mean: torch.Tensor, input_scale: float) -> None:
        """Decoder bias at the (scaled) data mean, so features start by explaining deviations."""
        self.input_scale.fill_(input_scale)
        self.b_dec.copy_(mean * input_scale)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        if self.unit_norm_decoder:
            self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))

    def reconstruction_error(self, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        """Squared error summed over dimensions, mean over tokens (≈ fraction of x's power)."""
        return (x_hat - x).pow(2).sum(-1).mean()

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.state_dict().items()}
