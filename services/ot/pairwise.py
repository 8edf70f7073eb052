"""Drift values between many clouds: the entry point of the OT stage.

`pairwise_drift` turns a list of cloud pairs into drift values (the debiased Sinkhorn
divergence, exact EMD cost or sliced W2^2): it solves each cloud's self-term once, warm-starts
pairs from their neighbours (`drift.depth_time_pairs` plans them) and hands every OT problem
to the batched solver's engine (`engine.run_problems`) in one call.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal, Unpack

import torch
from torch import Tensor

from services.ot.cost import Clouds, as_clouds, cost_scale
from services.ot.emd import emd_cost
from services.ot.engine import Solved, Workers, run_problems
from services.ot.newton import newton_polish, value_error
from services.ot.options import SolverConfig, SolverOptions, solver_config
from services.ot.sliced import sliced_pairs

__all__ = [
    "VALUE_FLOOR",
    "DriftResult",
    "Method",
    "pairwise_drift",
    "problem_count",
    "sinkhorn_divergence",
]

Method = Literal["sinkhorn", "emd", "sliced"]

#: Drift values are judged relative to max(|value|, VALUE_FLOOR): a millionth of a typical
#: squared distance, 100x below the smallest permutation baseline of the tiny-cpu demo run
#: (256 tokens); below it only the absolute error means anything.
VALUE_FLOOR = 1e-6


@dataclass(frozen=True)
class DriftResult:
    """Output of :func:`pairwise_drift`, one value per requested pair."""

    #: The drift: Sinkhorn divergence, exact EMD cost or sliced W2^2 (normalised cost).
    values: Tensor
    #: OT(p, q) for each pair (equal to ``values`` for emd and sliced).
    cost: Tensor
    #: OT(k, k) per cloud index (sinkhorn only; NaN for clouds no pair uses).
    self_cost: Tensor | None
    #: Iterations per pair (sinkhorn only, zeros otherwise).
    iterations: Tensor
    converged: Tensor
    scale: float
    method: str
    reg: float
    #: L1 marginal tolerance the Sinkhorn solves ran to (0 for emd and sliced).
    tol: float
    #: Estimated absolute error of each value against the converged entropic OT (sinkhorn:
    #: from the marginal errors of its three problems, see ``newton.value_error``; 0 for
    #: emd and sliced, which have no tolerance).
    error: Tensor
    #: OT problems solved (the divergence's self-terms included), and how many of them
    #: ended above ``tol`` (after the Newton polish) or were polished by Newton.
    problems: int
    unconverged_problems: int
    polished_problems: int

    def relative_error(self) -> Tensor:
        """``error / |values|``, with values below :data:`VALUE_FLOOR` counted as the floor."""
        return self.error / self.values.abs().clamp_min(VALUE_FLOOR)


def sinkhorn_divergence(
    x: Clouds,
    y: Clouds,
    reg: float,
    *,
    scale: float | None = None,
    **options: Unpack[SolverOptions],
) -> Tensor:
    """Debiased Sinkhorn divergence ``S = OT(x, y) - OT(x, x) / 2 - OT(y, y) / 2`` per pair.

    The raw entropic cost is biased (OT(a, a) > 0: the entropic plan blurs mass); S is
    symmetric and S(a, a) = 0. ``scale`` defaults to :func:`cost_scale` of the x clouds.
    Returns a float64 CPU tensor ``[B]``; options as in :class:`SolverOptions`.
    """
    xs, ys = as_clouds(x), as_clouds(y)
    if len(xs) != len(ys):
        raise ValueError(f"x has {len(xs)} clouds and y has {len(ys)}")
    n_pairs = len(xs)
    sc = cost_scale(xs) if scale is None else float(scale)
    pairs = [(k, n_pairs + k) for k in range(n_pairs)]
    return pairwise_drift(xs + ys, pairs, "sinkhorn", reg, scale=sc, **options).values


def problem_count(pairs: Sequence[tuple[int, int]], method: Method) -> int:
    """OT problems :func:`pairwise_drift` solves for ``pairs``: the total ``on_solved`` reaches.

    Sinkhorn also solves one self-term OT(k, k) per distinct cloud the pairs use.
    """
    if method == "sinkhorn":
        return len(pairs) + len({i for pq in pairs for i in pq})
    return len(pairs)


def pairwise_drift(
    clouds: Clouds,
    pairs: Sequence[tuple[int, int]],
    method: Method = "sinkhorn",
    reg: float = 0.05,
    *,
    scale: float | None = None,
    warm_from: Sequence[int | None] | None = None,
    n_projections: int = 256,
    seed: int = 0,
    rtol: float = 1e-3,
    **options: Unpack[SolverOptions],
) -> DriftResult:
    """Drift between clouds for a list of index pairs: the entry point of the OT stage.

    ``clouds`` is ``[K, N, d]`` (or a sequence of ``[N_k, d]``), e.g. hidden states of a
    fixed probe set per (checkpoint, layer); ``pairs`` index into it (see
    :func:`drift.depth_time_pairs`, which also gives ``warm_from``). One ``scale`` serves every
    pair (default :func:`cost_scale` of all clouds pooled) so reg means one thing.

    * ``sinkhorn``: the debiased divergence; each cloud's self-term OT(k, k) is solved once
      and reused by every pair it appears in. Problems Sinkhorn left above ``tol``, and those
      of values whose estimated error is above ``rtol`` x |value|, are then polished by
      Newton's method in float64 (``newton.py``), so every value is within about ``rtol``
      of the converged entropic OT.
    * ``emd``: the exact cost (POT), small N only. ``sliced``: sliced W2^2.
    """
    cl = as_clouds(clouds)
    pair_list = [(int(p), int(q)) for p, q in pairs]
    for p, q in pair_list:
        if not (0 <= p < len(cl) and 0 <= q < len(cl)):
            raise ValueError(f"pair {(p, q)} indexes outside the {len(cl)} clouds")
    sc = cost_scale(cl) if scale is None else float(scale)
    n_pairs = len(pair_list)
    none = torch.zeros(n_pairs, dtype=torch.int64)
    on_solved = options.get("on_solved")
    if method in ("emd", "sliced"):
        if method == "emd":
            xs, ys = [cl[p] for p, _ in pair_list], [cl[q] for _, q in pair_list]
            values = emd_cost(xs, ys, scale=sc)
        else:
            values = sliced_pairs(cl, pair_list, n_projections, seed, sc, options.get("dtype"))
        if on_solved is not None:
            on_solved(n_pairs)
        zero = torch.zeros(n_pairs, dtype=torch.float64)
        return DriftResult(
            values, values, None, none, none == 0, sc, method, 0.0, 0.0, zero, n_pairs, 0, 0
        )
    if method != "sinkhorn":
        raise ValueError(f"method must be 'sinkhorn', 'emd' or 'sliced', got {method!r}")

    warm = list(warm_from) if warm_from is not None else [None] * n_pairs
    if len(warm) != n_pairs:
        raise ValueError(f"warm_from has {len(warm)} entries for {n_pairs} pairs")
    # A pair of identical clouds is its own self-term: solving it as (p, p) makes S exactly
    # 0 (alternating Sinkhorn would crawl towards it instead).
    solve_pairs = [
        (p, p) if p != q and cl[p].shape == cl[q].shape and torch.equal(cl[p], cl[q]) else (p, q)
        for p, q in pair_list
    ]
    used = sorted({i for pq in pair_list for i in pq})
    # A cloud's self-term warm-starts from the earlier cloud that a warm-started pair links
    # it to (the same layer one checkpoint before, in a depth_time_pairs plan).
    self_src: dict[int, int] = {}
    for k, src in enumerate(warm):
        if src is not None:
            for c_now, c_before in zip(pair_list[k], pair_list[src], strict=True):
                if c_before < c_now:
                    self_src.setdefault(c_now, c_before)
    slot = {c: n_pairs + i for i, c in enumerate(used)}
    all_pairs = solve_pairs + [(c, c) for c in used]
    all_warm = warm + [slot[self_src[c]] if c in self_src else None for c in used]
    cfg = solver_config(cl[0], reg, sc, options)
    out = run_problems(cl, all_pairs, all_warm, [None] * len(all_pairs), cfg)
    # The problems of each value: OT(p, q), OT(p, p), OT(q, q).
    terms = torch.tensor([[k, slot[p], slot[q]] for k, (p, q) in enumerate(pair_list)])
    identical = torch.tensor([p == q for p, q in solve_pairs], dtype=torch.bool)
    cost, marginal, polished = _polish(cl, all_pairs, out, terms, identical, cfg, rtol)
    values, error = _divergence(cost, marginal, out.max_cost, terms)
    # S(a, a) = 0 exactly, whatever the rounding of its three terms.
    values[identical], error[identical] = 0.0, 0.0
    problem_ok = marginal <= cfg.tol
    self_cost = torch.full((len(cl),), math.nan, dtype=torch.float64)
    self_cost[torch.tensor(used, dtype=torch.int64)] = cost[n_pairs:]
    return DriftResult(
        values, cost[:n_pairs], self_cost, out.iterations[:n_pairs], problem_ok[terms].all(1),
        sc, method, cfg.reg, cfg.tol, error, len(all_pairs), int((~problem_ok).sum()),
        int(polished.sum()),
    )  # fmt: skip


#: A value's weights on its three problems: S = OT(p, q) - OT(p, p) / 2 - OT(q, q) / 2.
_WEIGHTS = torch.tensor([1.0, -0.5, -0.5], dtype=torch.float64)
#: Marginal error a polish runs to: near the float64 floor, far below any tolerance.
_POLISH_TOL = 1e-10
#: Float64 Sinkhorn iterations a self-term's polish tries before Newton takes over.
_POLISH_SINKHORN_ITERS = 50


def _divergence(
    cost: Tensor, marginal: Tensor, max_cost: Tensor, terms: Tensor
) -> tuple[Tensor, Tensor]:
    """Each value S from its three problems' costs, and its estimated error (the terms' sum)."""
    values = (cost[terms] * _WEIGHTS).sum(1)
    error = (value_error(marginal, max_cost)[terms] * _WEIGHTS.abs()).sum(1)
    return values, error


def _polish(
    clouds: list[Tensor],
    problems: list[tuple[int, int]],
    out: Solved,
    terms: Tensor,
    identical: Tensor,
    cfg: SolverConfig,
    rtol: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Polish in float64 the problems that need it: costs and marginal errors after, and which.

    A problem is polished when Sinkhorn left it above ``tol`` or when the estimated error
    of a value it enters is above ``rtol`` x |value| (see ``newton.py`` for why): self-terms
    by float64 symmetric Sinkhorn, the rest (and any self-term that did not converge) by
    Newton's method.
    """
    cost, marginal = out.cost.clone(), out.error.clone()
    values, error = _divergence(cost, marginal, out.max_cost, terms)
    # Written as "not within" so that a NaN (a warm start that broke down in float32: seen
    # on a grokked model's last layer) is polished too, never taken for converged.
    loose = ~(error <= rtol * values.abs().clamp_min(VALUE_FLOOR)) & ~identical
    todo = ~(marginal <= cfg.tol) | ~torch.isfinite(cost)
    todo[terms[loose].flatten()] = True
    jobs = todo.nonzero().flatten().tolist()
    # Self-terms: the symmetric float64 Sinkhorn converges in ~16 iterations, far cheaper
    # than Newton. Cross problems that need a polish are nearly all the slow ones (on the
    # tiny-cpu demo run 33 of 1,145 converged in 50 float64 iterations): Newton directly.
    selfs = [j for j in jobs if problems[j][0] == problems[j][1]]
    start = {j: _finite_or_zero(out.g[j]) for j in jobs}
    if selfs:
        cfg64 = replace(
            cfg, dtype=torch.float64, tol=_POLISH_TOL, max_iter=_POLISH_SINKHORN_ITERS,
            eps_scaling=None, on_solved=None,
        )  # fmt: skip
        init = [(_finite_or_zero(out.f[j]), start[j]) for j in selfs]
        sym = run_problems(clouds, [problems[j] for j in selfs], [None] * len(selfs), init, cfg64)
        cost[selfs], marginal[selfs] = sym.cost, sym.error
        start |= dict(zip(selfs, sym.g, strict=True))
    slow = [j for j in jobs if not marginal[j] <= _POLISH_TOL]

    def newton(j: int) -> None:
        x, y = (clouds[k].to(cfg.device) for k in problems[j])
        res = newton_polish(x, y, start[j], cfg.reg, cfg.scale, tol=_POLISH_TOL)
        cost[j], marginal[j] = res.cost, res.error

    with Workers(cfg) as workers:
        workers.map(newton, slow)
    return cost, marginal, todo


def _finite_or_zero(potential: Tensor) -> Tensor:
    """A dual potential to start a polish from: a broken-down one (NaN, inf) starts cold."""
    return potential if bool(torch.isfinite(potential).all()) else torch.zeros_like(potential)
