"""The cost of moving mass between uniform point clouds, and what a cloud argument may be.

Conventions (the solvers of `sinkhorn.py`, `emd.py`, `sliced.py` and `newton.py` follow them):
the cost is the squared Euclidean distance divided by an explicit ``scale``,
``C_ij = ||x_i - y_j||^2 / scale``, by default :func:`cost_scale` of the inputs; a cloud is
``[N, d]``, a batch ``[B, N, d]`` or a sequence of ``[N, d]`` clouds (:data:`Clouds`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "Clouds",
    "as_clouds",
    "cost_matrix",
    "cost_scale",
    "max_cost_bound",
    "unclamped_cost_matrix",
]

Clouds = Tensor | Sequence[Tensor]


def cost_scale(x: Clouds) -> float:
    """The cost normalisation: mean squared distance between two points of ``x``.

    For a cloud ``x[N, d]`` (or the pooled points of ``x[K, N, d]`` / a sequence of clouds)
    this is ``mean_{i,j} ||x_i - x_j||^2 = 2 mean_i ||x_i - mean(x)||^2``. It is chosen over
    the mean squared norm because it is translation invariant: transformer hidden states
    carry a large common offset that says nothing about how spread out they are, and the
    spread is what sets the entropic blur. Dividing by it makes ``reg`` a fraction of a
    typical squared distance. Computed in float64.
    """
    pts = _as_points(x).to(torch.float64)
    centred = pts - pts.mean(0, keepdim=True)
    value = float(2.0 * centred.pow(2).sum(1).mean())
    if not value > 0.0:
        raise ValueError("cost_scale: all points coincide; pass an explicit scale > 0")
    return value


def cost_matrix(x: Tensor, y: Tensor, scale: float = 1.0) -> Tensor:
    """``C[b, i, j] = ||x[b, i] - y[b, j]||^2 / scale`` for ``x[B, N, d]``, ``y[B, M, d]``.

    The matrix the solvers use (they skip the final clamp at 0 of rounding errors).
    """
    return unclamped_cost_matrix(x, y, scale).clamp_min_(0.0)


def unclamped_cost_matrix(x: Tensor, y: Tensor, scale: float, out: Tensor | None = None) -> Tensor:
    """Normalised squared distances in one gemm; entries may be rounded a hair below 0.

    Both clouds are first centred on their joint mean (the cost is translation invariant),
    which keeps ``|x|^2 + |y|^2 - 2 x.y`` free of cancellation in float32 when the points
    share a large offset. The gemm runs on augmented matrices
    ``[x, |x|^2, 1] @ [-2y, 1, |y|^2]^T / scale``: no extra pass for the norms or the scale.
    """
    mu = 0.5 * (x.mean(1, keepdim=True) + y.mean(1, keepdim=True))
    xc, yc = x - mu, y - mu
    ones_x = torch.ones_like(xc[..., :1])
    ones_y = torch.ones_like(yc[..., :1])
    xa = torch.cat([xc, (xc * xc).sum(-1, keepdim=True), ones_x], -1)
    ya = torch.cat([-2.0 * yc, ones_y, (yc * yc).sum(-1, keepdim=True)], -1).div_(scale)
    return torch.bmm(xa, ya.mT, out=out)


def max_cost_bound(x: Tensor, y: Tensor, scale: float) -> float:
    """Upper bound on max C, (max|x - mu| + max|y - mu|)^2 / scale, in O((N + M) d)."""
    mu = 0.5 * (x.mean(1, keepdim=True) + y.mean(1, keepdim=True))
    reach = (x - mu).norm(dim=-1).amax() + (y - mu).norm(dim=-1).amax()
    return float(reach) ** 2 / scale


def _as_points(x: Clouds) -> Tensor:
    if isinstance(x, Tensor):
        return x.reshape(-1, x.shape[-1])
    return torch.cat([c.reshape(-1, c.shape[-1]) for c in x])


def as_clouds(x: Clouds) -> list[Tensor]:
    """A batch as a list of [N, d] clouds: accepts [N, d], [B, N, d] or a sequence of [N, d]."""
    if isinstance(x, Tensor):
        if x.dim() == 2:
            return [x]
        if x.dim() == 3:
            return list(x.unbind(0))
        raise ValueError(
            f"expected a cloud [N, d] or a batch [B, N, d], got shape {tuple(x.shape)}"
        )
    clouds = list(x)
    if any(c.dim() != 2 for c in clouds):
        raise ValueError("expected a sequence of clouds shaped [N, d]")
    return clouds
