"""Sliced Wasserstein distance between uniform point clouds: the cheap OT drift.

The cost conventions are the Sinkhorn solver's (`cost.py`: `cost.cost_scale`, clouds as
``[N, d]`` or batches).

Why not POT's ``ot.sliced_wasserstein_distance``: on the same directions (its
``projections=``) it gives the same values, squared and divided by the scale (within 2e-7
relative in float32 and 5e-16 in float64; tests/unit/test_sinkhorn.py checks it), but it projects
and sorts both clouds again for every pair, where `sliced_pairs` projects and sorts each
cloud once. On the demo's shape, 26 clouds x 256 points x 32 dims, all 325 pairs, 256
directions, one torch thread on a shared 2-core CPU: ours 0.36 s in float32 and 0.49 s in
float64, POT's (torch backend) 13 s and 22 s (medians of 5), 48 s with numpy arrays. Its
``seed`` also draws other directions (numpy's generator; ours are torch's, drawn on the CPU
so a seed means the same on any device): up to 11% apart at 256 directions, ranking the
pairs alike (Spearman 0.9998).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from services.ot.cost import Clouds, as_clouds, cost_scale

__all__ = ["sliced_pairs", "sliced_wasserstein"]


def _sorted_projections(clouds: Sequence[Tensor], theta: Tensor) -> list[Tensor]:
    """Each cloud projected on every direction and sorted: [N, P] quantile functions."""
    return [torch.sort(c.to(theta) @ theta, dim=0).values for c in clouds]


def _w2_sorted(sx: Tensor, sy: Tensor) -> Tensor:
    """Mean over directions of the exact 1-D W2^2 between two sorted uniform samples.

    Equal sizes pair the order statistics. Otherwise the two quantile functions are step
    functions with breaks at i/N and j/M; on integers (levels times N*M) the merged breaks
    and the step each falls in are exact, with no floating-point ties.
    """
    n, m = sx.shape[0], sy.shape[0]
    if n == m:
        return (sx - sy).pow(2).mean(0).mean()
    levels = torch.unique(torch.cat([torch.arange(1, n + 1) * m, torch.arange(1, m + 1) * n]))
    widths = torch.diff(levels, prepend=levels.new_zeros(1)).to(sx) / (n * m)
    ix = (levels + m - 1) // m - 1
    iy = (levels + n - 1) // n - 1
    diff = sx[ix.to(sx.device)] - sy[iy.to(sy.device)]
    return (widths.to(sx.device)[:, None] * diff.pow(2)).sum(0).mean()


def _directions(d: int, n_projections: int, seed: int, like: Tensor, dtype: torch.dtype) -> Tensor:
    """Uniform directions on the sphere, drawn on the CPU so a seed means the same everywhere."""
    gen = torch.Generator().manual_seed(seed)
    theta = torch.randn(d, n_projections, generator=gen, dtype=torch.float64)
    theta /= theta.norm(dim=0, keepdim=True)
    return theta.to(like.device, dtype)


def sliced_wasserstein(
    x: Clouds,
    y: Clouds,
    *,
    n_projections: int = 256,
    seed: int = 0,
    scale: float | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Sliced W2^2 per pair: the mean over random directions of the 1-D W2^2, / scale.

    The directions are seeded (same seed, same directions, on any device), so values are
    reproducible and comparable across pairs. Cheap (sorting, no iterations) and a lower
    bound on W2^2 / scale; it ranks drifts like the full OT does. Returns float64 CPU [B].
    """
    xs, ys = as_clouds(x), as_clouds(y)
    if len(xs) != len(ys):
        raise ValueError(f"x has {len(xs)} clouds and y has {len(ys)}")
    n_pairs = len(xs)
    sc = cost_scale(xs) if scale is None else float(scale)
    return sliced_pairs(
        xs + ys, [(k, n_pairs + k) for k in range(n_pairs)], n_projections, seed, sc, dtype
    )


def sliced_pairs(
    clouds: Sequence[Tensor],
    pairs: Sequence[tuple[int, int]],
    n_projections: int,
    seed: int,
    scale: float,
    dtype: torch.dtype | None,
) -> Tensor:
    """Sliced W2^2 for pairs of clouds; each cloud is projected and sorted once."""
    theta = _directions(clouds[0].shape[1], n_projections, seed, clouds[0], dtype or torch.float32)
    used = sorted({i for pq in pairs for i in pq})
    proj = dict(zip(used, _sorted_projections([clouds[i] for i in used], theta), strict=True))
    out = torch.empty(len(pairs), dtype=torch.float64)
    for k, (p, q) in enumerate(pairs):
        out[k] = float(_w2_sorted(proj[p], proj[q])) / scale
    return out
