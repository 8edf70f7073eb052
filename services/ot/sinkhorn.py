"""Batched entropic optimal transport between uniform point clouds (torch, CPU and CUDA).

Conventions (every solver of the OT service follows them):

* **Clouds** are uniformly weighted point sets ``x[N, d]``, ``y[M, d]``; a batch of pairs is
  ``x[B, N, d]``, ``y[B, M, d]`` (or sequences of clouds of equal shape).
* **Cost** is the squared Euclidean distance divided by an explicit ``scale``:
  ``C_ij = ||x_i - y_j||^2 / scale``. The default scale is :func:`cost.cost_scale` of the
  inputs, the mean pairwise squared distance, so a normalised cost of 1 is "a typical
  distance between two points of the reference cloud" and ``reg`` means the same blur for
  every pair. Every result carries the scale it used; multiply a cost by it to get squared
  distances.
* **reg** is the entropic regularisation on that normalised cost (POT's ``reg``).
* **The returned cost is the transport cost of the entropic plan, <P, C>**, without the
  entropy term: exactly what POT's ``ot.sinkhorn2`` returns, so the two compare like for like.
* **tol** bounds the L1 error of the column marginal, ``sum_j |(P^T 1)_j - b_j|`` (the mass
  that is in the wrong place, in [0, 2]); rows are exact after each update. POT's ``stopThr``
  is the L2 norm of the same vector, so ``stopThr ~ tol / sqrt(M)`` for spread-out errors.

The solver's parts: `cost.py` (the cost and its scale), `options.py` (settings and their
device defaults), `engine.py` (waves of warm-started pairs, chunks, worker threads) and
`chunk_solver.py` (the stabilised kernel-space iteration; how it is fast is said there).

Known limit: pairs of near-duplicate clouds (a plan close to a permutation with near ties,
duplicate points) converge slowly, sublinearly on real hidden states, as they do in every
Sinkhorn implementation; ``max_iter`` caps them and ``converged`` says so, and
``pairwise.pairwise_drift`` finishes them by Newton's method (``newton.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Unpack

import torch
from torch import Tensor

from services.ot.cost import Clouds, as_clouds, cost_scale
from services.ot.engine import run_problems
from services.ot.options import SolverOptions, solver_config

__all__ = ["SinkhornResult", "sinkhorn_cost"]


@dataclass(frozen=True)
class SinkhornResult:
    """Per-pair output of :func:`sinkhorn_cost` (all tensors have leading size B)."""

    #: <P, C> on the normalised cost (multiply by ``scale`` for squared-distance units).
    cost: Tensor
    #: Kernel iterations per pair (one v- and one u-update each; a log-domain
    #: re-stabilisation counts as one).
    iterations: Tensor
    #: L1 column-marginal error of the returned plan.
    marginal_error: Tensor
    #: ``marginal_error <= tol`` reached within ``max_iter``.
    converged: Tensor
    scale: float
    reg: float
    tol: float
    #: Dual potentials (normalised-cost units) when ``return_potentials``; they warm-start
    #: a neighbouring problem.
    f: Tensor | None = None
    g: Tensor | None = None


def sinkhorn_cost(
    x: Clouds,
    y: Clouds,
    reg: float,
    *,
    scale: float | None = None,
    warm_start: tuple[Tensor, Tensor] | None = None,
    return_potentials: bool = False,
    **options: Unpack[SolverOptions],
) -> SinkhornResult:
    """Entropic OT cost <P, C> for each pair (x[b], y[b]), all pairs solved in one program.

    ``x`` and ``y`` are ``[B, N, d]`` and ``[B, M, d]`` (``[N, d]`` for one pair, or
    sequences of clouds; pairs of different shapes go to separate chunks). ``scale``
    defaults to :func:`cost_scale` of all x clouds pooled. ``warm_start`` gives potentials
    ``(f[B, N], g[B, M])``, e.g. from a neighbouring problem (they skip epsilon scaling).
    Per-pair scalars come back on the CPU (costs in float64); potentials stay on the device.
    See :class:`SolverOptions` for the rest.
    """
    xs, ys = as_clouds(x), as_clouds(y)
    if len(xs) != len(ys):
        raise ValueError(f"x has {len(xs)} clouds and y has {len(ys)}")
    sc = cost_scale(xs) if scale is None else float(scale)
    cfg = solver_config(xs[0], reg, sc, options)
    n_pairs = len(xs)
    pairs = [(k, n_pairs + k) for k in range(n_pairs)]
    init: list[tuple[Tensor, Tensor] | None] = (
        [None] * n_pairs
        if warm_start is None
        else [(warm_start[0][k], warm_start[1][k]) for k in range(n_pairs)]
    )
    out = run_problems(xs + ys, pairs, [None] * n_pairs, init, cfg)
    return SinkhornResult(
        cost=out.cost,
        iterations=out.iterations,
        marginal_error=out.error,
        converged=out.converged,
        scale=sc,
        reg=cfg.reg,
        tol=cfg.tol,
        f=torch.stack(out.f) if return_potentials else None,
        g=torch.stack(out.g) if return_potentials else None,
    )
