"""Batched entropic optimal transport between uniform point clouds (torch, CPU and CUDA).

Conventions (every function in this module follows them):

* **Clouds** are uniformly weighted point sets ``x[N, d]``, ``y[M, d]``; a batch of pairs is
  ``x[B, N, d]``, ``y[B, M, d]`` (or sequences of clouds of equal shape).
* **Cost** is the squared Euclidean distance divided by an explicit ``scale``:
  ``C_ij = ||x_i - y_j||^2 / scale``. The default scale is :func:`cost_scale` of the inputs,
  the mean pairwise squared distance, so a normalised cost of 1 is "a typical distance
  between two points of the reference cloud" and ``reg`` means the same blur for every pair.
  Every result carries the scale it used; multiply a cost by it to get squared distances.
* **reg** is the entropic regularisation on that normalised cost (POT's ``reg``).
* **The returned cost is the transport cost of the entropic plan, <P, C>**, without the
  entropy term: exactly what POT's ``ot.sinkhorn2`` returns, so the two compare like for like.
* **tol** bounds the L1 error of the column marginal, ``sum_j |(P^T 1)_j - b_j|`` (the mass
  that is in the wrong place, in [0, 2]); rows are exact after each update. POT's ``stopThr``
  is the L2 norm of the same vector, so ``stopThr ~ tol / sqrt(M)`` for spread-out errors.

How it is fast (profiled on a 2-core CPU, N=1000, d=64; see benchmarks/bench_ot.py):

* The iteration runs in kernel space, ``u = a / (K v)``, ``v = b / (K^T u)``, with a
  *stabilised* kernel ``K = exp((f_i + g_j - C_ij) / reg)`` that already absorbs the dual
  potentials f, g: the scalings stay near 1 and nothing underflows as long as the potentials
  are near their optimum. When a scaling leaves [1/tau, tau] it is absorbed into the
  potentials and they are recomputed exactly in the log domain (a log-sum-exp step): the
  log domain is used only when the kernel would underflow, never on every iteration.
* Exponent arguments are clamped above float underflow: ``exp`` into subnormals is 5-10x
  slower than ``exp`` itself, and the clamped entries carry no mass that matters while the
  scalings are inside [1/tau, tau] (the only state in which a result is accepted). The
  kernel is built with ``exp2``, 3-4x faster than ``exp`` in torch on the CPU.
* Mat-vec products are row-vector ``bmm`` calls (``u[B,1,N] @ K[B,N,M]``), which run at
  BLAS gemv speed for any batch size on the CPU and batch across pairs on the GPU; the
  column-vector form ``K @ v[B,M,1]`` is 10-25x slower on the CPU for B >= 2.
* On the CPU chunks are cache-sized (one N=1000 pair: its 4 MB float32 kernel stays in
  cache while it iterates, in buffers reused from chunk to chunk) and chunks are spread over
  the cores, one worker thread each; on CUDA chunks are as large as a memory budget allows.
  Converged pairs leave the active batch. Both are the same code with different
  chunk/worker settings.
* The divergence's self-terms OT(a, a) use a symmetric (averaged) update that converges in
  ~10-20 iterations where alternating Sinkhorn, POT's included, needs thousands.
* Dual potentials can be warm-started from a neighbouring pair, and cold starts at small
  reg use epsilon scaling.

Known limit: pairs of near-duplicate clouds (a plan close to a permutation with near ties,
duplicate points) converge slowly, sublinearly on real hidden states, as they do in every
Sinkhorn implementation; ``max_iter`` caps them and ``converged`` says so, and
``pairwise.pairwise_drift`` finishes them by Newton's method (``newton.py``).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypedDict, TypeVar, Unpack

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "SinkhornResult",
    "SolverOptions",
    "cost_matrix",
    "cost_scale",
    "emd_cost",
    "sinkhorn_cost",
]

Clouds = Tensor | Sequence[Tensor]
_T = TypeVar("_T")

#: Default marginal tolerance (L1) per dtype: float32 reaches ~1e-6 at N=1000; 1e-5 keeps
#: values within ~1e-5 relative of a float64 solve. float64 can go as far as POT's default.
DEFAULT_TOL: dict[torch.dtype, float] = {torch.float32: 1e-5, torch.float64: 1e-9}

# Scalings may drift this far from 1 before they are absorbed into the potentials. With the
# exponent clamp below, an entry clamped up to exp(lo) then weighs at most tau^2 * exp(lo):
# 1e16 * 1.8e-35 in float32, 1e60 * 1e-304 in float64, far below any tolerance.
_TAU: dict[torch.dtype, float] = {torch.float32: 1e8, torch.float64: 1e30}
# Exponent arguments are clamped to [-lim, lim] (natural log) so the smallest exp stays a
# normal number; the kernel is built with exp2, hence the base-2 limits.
_EXP_LIMIT: dict[torch.dtype, float] = {torch.float32: 80.0, torch.float64: 700.0}
_EXP2_LIMIT: dict[torch.dtype, float] = {dt: lim / math.log(2.0) for dt, lim in _EXP_LIMIT.items()}
_LOG2E = 1.0 / math.log(2.0)
# Scalings are range-checked every this many marginal checks (and before a pair stops).
_RANGE_EVERY = 8
# Epsilon scaling (cold starts only) begins at reg = max(C) / _EPS_START_RANGE, where the
# kernel spans exp(-50) and Sinkhorn converges in a few iterations. Above that reg plain
# Sinkhorn is fast and the extra stages would only cost kernel builds.
_EPS_START_RANGE = 50.0
# Intermediate epsilon stages only have to get the potentials close: a loose marginal
# tolerance and an iteration cap per stage.
_STAGE_TOL = 1e-2
_STAGE_MAX_ITER = 50
_CPU_DEFAULT_BUDGET = 2 << 30
# CPU chunks are cut to about this much working memory: one N=1000 float32 pair (its 4 MB
# kernel then streams from cache), or many small pairs, whose solves would otherwise be
# dominated by per-operation overhead (N=100: 5x faster batched than one by one).
_CPU_CHUNK_BYTES = 16 << 20


# --------------------------------------------------------------------------------------------
# Results and plans


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


# --------------------------------------------------------------------------------------------
# Cost


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
    return _cost(x, y, scale).clamp_min_(0.0)


def _cost(x: Tensor, y: Tensor, scale: float, out: Tensor | None = None) -> Tensor:
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


def _max_cost_bound(x: Tensor, y: Tensor, scale: float) -> float:
    """Upper bound on max C, (max|x - mu| + max|y - mu|)^2 / scale, in O((N + M) d)."""
    mu = 0.5 * (x.mean(1, keepdim=True) + y.mean(1, keepdim=True))
    reach = (x - mu).norm(dim=-1).amax() + (y - mu).norm(dim=-1).amax()
    return float(reach) ** 2 / scale


# --------------------------------------------------------------------------------------------
# The solver


@dataclass(frozen=True)
class SolverConfig:
    reg: float
    scale: float
    tol: float
    max_iter: int
    eps_scaling: float | None
    check_every: int
    dtype: torch.dtype
    device: torch.device
    budget: int
    chunk_bytes: int
    max_batch: int
    workers: int
    on_solved: Callable[[int], None] | None = None


@dataclass
class Solved:
    """Engine output, one entry per pair."""

    cost: Tensor
    iterations: Tensor
    error: Tensor
    converged: Tensor
    #: max C_ij of each problem: with ``error`` it sizes the error of ``cost``.
    max_cost: Tensor
    f: list[Tensor]
    g: list[Tensor]


def _build(k: Tensor, c: Tensor, f: Tensor, g: Tensor, reg: float) -> None:
    """Write the stabilised kernel ``exp((f_i + g_j - C_ij) / reg)`` into ``k``.

    Computed as ``exp2`` of the argument times log2(e) (folded into the same pass as the
    division by reg): torch's float32 ``exp2`` is 3-4x faster than ``exp`` on the CPU.
    """
    s = _LOG2E / reg
    lim = _EXP2_LIMIT[k.dtype]
    torch.add((g * s).unsqueeze(1), c, alpha=-s, out=k)
    k.add_((f * s).unsqueeze(2)).clamp_(-lim, lim).exp2_()


def _c_transform(work: Tensor, c: Tensor, pot: Tensor, reg: float, dim: int) -> Tensor:
    """Exact log-domain Sinkhorn half-step: the potential on the other side of ``dim``.

    ``dim=1`` returns g from f, ``g_j = -reg log(M sum_i exp((f_i - C_ij) / reg))``, so the
    columns of ``exp((f + g - C) / reg)`` sum to 1/M; ``dim=2`` returns f from g likewise.
    ``work`` (same shape as ``c``) is scratch space. The max trick makes it exact whatever
    the potentials: this is the fallback when the kernel would underflow.
    """
    n_target = c.shape[3 - dim]
    torch.add((pot / reg).unsqueeze(3 - dim), c, alpha=-1.0 / reg, out=work)
    peak = work.amax(dim, keepdim=True)
    total = work.sub_(peak).clamp_min_(-_EXP_LIMIT[work.dtype]).exp_().sum(dim, keepdim=True)
    lse = (peak + total.log()).squeeze(dim)
    return -reg * (lse + math.log(n_target))


def _eps_stages(reg: float, cmax: float, factor: float | None) -> int:
    """Epsilon-scaling stages before the target reg for a cold start (0: none).

    The stages are reg / factor^k, k = n..1, from the first above cmax / _EPS_START_RANGE
    (a well-conditioned start) down. Depending only on the pair, never on its chunk.
    """
    start = cmax / _EPS_START_RANGE
    if factor is None or start <= reg:
        return 0
    return math.ceil(math.log(start / reg) / math.log(1.0 / factor))


def _out_of_range(s: Tensor, tau: float) -> Tensor:
    """Per pair: does the scaling ``s[B, 1, N]`` leave [1/tau, tau]?"""
    lo, hi = torch.aminmax(s.flatten(1), dim=1)
    return (hi > tau) | (lo < 1.0 / tau)


class _Workspace:
    """Reusable cost and kernel buffers of one worker.

    On the CPU a fresh 4 MB tensor per pair comes straight from mmap and is page-faulted
    and zeroed on first touch: that cost as much as the whole iteration. CUDA's caching
    allocator would reuse memory anyway; holding the buffers does no harm there. A
    workspace lives as long as one call of the engine.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        size = math.prod(shape)
        buf = self._buffers.get(name)
        if (
            buf is None
            or buf.numel() < size
            or buf.dtype != like.dtype
            or buf.device != like.device
        ):
            buf = torch.empty(size, dtype=like.dtype, device=like.device)
            self._buffers[name] = buf
        return buf[:size].view(shape)


_ChunkOut = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]


class _ChunkSolver:
    """Solves B pairs (x[b], y[b]) at once: cost, iterations, error, converged, f, g.

    ``y=None`` solves the symmetric problems OT(x[b], x[b]) (the divergence's self-terms)
    with one potential, f = g, and the averaged update ``u <- sqrt(u * a / (K u))``: the
    kernel-space form of the symmetric Sinkhorn of Feydy et al. (2019), which converges in
    a handful of iterations where alternating updates crawl for thousands (POT's do here).

    Scalings are kept as row vectors ``u[B, 1, N]``, ``v[B, 1, M]`` so every mat-vec is a
    row-vector bmm. Converged pairs are finalised at each check and the survivors compacted
    to the front of the buffers, so later iterations only touch active pairs. All pairs of
    a chunk share one epsilon schedule (`run_problems` groups them so); in an intermediate stage a
    pair that reached the stage tolerance is parked (its scalings no longer change) until
    the others catch up, so every pair's iterations and result are what it would get alone.
    """

    def __init__(
        self,
        x: Tensor,
        y: Tensor | None,
        f0: Tensor | None,
        g0: Tensor | None,
        n_stages: int,
        cfg: SolverConfig,
        ws: _Workspace,
    ) -> None:
        self.sym = y is None
        y_ = x if y is None else y
        n_pairs, n, m = x.shape[0], x.shape[1], y_.shape[1]
        self.cfg = cfg
        self.a, self.b = 1.0 / n, 1.0 / m
        self.tau = _TAU[cfg.dtype]
        self.c = _cost(x, y_, cfg.scale, out=ws.get("cost", (n_pairs, n, m), x))
        self.k = ws.get("kernel", (n_pairs, n, m), x)
        self.f = self.c.new_zeros(n_pairs, n) if f0 is None else f0.clone()
        self.g = (
            self.f if self.sym else (self.c.new_zeros(n_pairs, m) if g0 is None else g0.clone())
        )
        factor = cfg.eps_scaling or 1.0
        self.stages = [cfg.reg / factor**s for s in range(n_stages, 0, -1)] + [cfg.reg]
        self.u = self.c.new_ones(n_pairs, 1, n)
        self.v = self.u if self.sym else self.c.new_ones(n_pairs, 1, m)
        self.slot = list(range(n_pairs))  # slot[row] = output index of active row `row`
        self.row_it = [0] * n_pairs  # iterations spent by each active row
        self.cost = torch.zeros(n_pairs, dtype=torch.float64)
        self.iters = torch.zeros(n_pairs, dtype=torch.int64)
        self.error = torch.full((n_pairs,), math.inf, dtype=torch.float64)
        self.cmax = torch.zeros(n_pairs, dtype=torch.float64)
        self.f_out, self.g_out = torch.empty_like(self.f), torch.empty_like(self.g)

    def solve(self) -> _ChunkOut:
        for s_idx, reg in enumerate(self.stages):
            self._stage(reg, final=s_idx == len(self.stages) - 1)
        return self.cost, self.iters, self.error, self.cmax, self.f_out, self.g_out

    def _stage(self, reg: float, final: bool) -> None:
        cfg = self.cfg
        stage_tol = cfg.tol if final else max(cfg.tol, _STAGE_TOL)
        act = len(self.slot)
        _build(self.k[:act], self.c[:act], self.f, self.g, reg)
        self.u = self.c.new_ones(act, 1, self.u.shape[2])
        self.v = self.u if self.sym else self.c.new_ones(act, 1, self.v.shape[2])
        parked = [False] * act  # intermediate stages: reached the stage tolerance
        stage_it = 0  # iterations of the rows still running in this stage
        while True:
            kk = self.k[: len(self.slot)]
            w = torch.bmm(self.u, kk)  # K^T u: the plan's column sums are v * w
            capped = [
                it >= cfg.max_iter or (not final and stage_it >= _STAGE_MAX_ITER)
                for it in self.row_it
            ]
            if stage_it > 0 and (stage_it % cfg.check_every == 0 or any(capped)):
                # Rows are exact after each u-update: the columns carry the whole error.
                err = (self.v * w).sub_(self.b).abs_().sum((1, 2)).tolist()
                # Scalings are range-checked before a pair may stop (its clamped kernel
                # entries then carry no mass) and every few checks to absorb them early.
                if any(capped) or stage_it % _RANGE_EVERY == 0 or min(err) <= stage_tol:
                    bad = (
                        _out_of_range(self.u, self.tau) | _out_of_range(self.v, self.tau)
                    ).tolist()
                else:
                    bad = [False] * len(err)
                bad = [
                    (bd or not math.isfinite(e)) and not (cap or park)
                    for bd, e, cap, park in zip(bad, err, capped, parked, strict=True)
                ]
                if any(bad):
                    self._restabilise([r for r, flag in enumerate(bad) if flag], reg)
                    w = torch.bmm(self.u, kk)
                done = [
                    park or cap or (e <= stage_tol and not bd)
                    for e, bd, cap, park in zip(err, bad, capped, parked, strict=True)
                ]
                if not final:
                    parked = done
                    if all(parked):
                        self.f += reg * self.u[:, 0].log()
                        if not self.sym:
                            self.g += reg * self.v[:, 0].log()
                        return
                elif any(done):
                    self._finish(done, err, reg)
                    keep = [r for r, flag in enumerate(done) if not flag]
                    if not keep:
                        return
                    self._compact(keep)
                    kk = self.k[: len(keep)]
                    w = w[torch.tensor(keep, device=w.device)]
                    parked = [False] * len(keep)
            self._update(w, kk, parked)
            self.row_it = [it + (not park) for it, park in zip(self.row_it, parked, strict=True)]
            stage_it += 1

    def _update(self, w: Tensor, kk: Tensor, parked: list[bool]) -> None:
        """One Sinkhorn iteration given ``w = K^T u`` (plain or symmetric), in place."""
        a, b, u, v = self.a, self.b, self.u, self.v
        if any(parked):
            keep = torch.tensor(parked, device=u.device).view(-1, 1, 1)
            if self.sym:
                u.copy_(torch.where(keep, u, (u * a / w).sqrt_()))
            else:
                v.copy_(torch.where(keep, v, b / w))
                u.copy_(torch.where(keep, u, a / torch.bmm(v, kk.mT)))
        elif self.sym:
            u.mul_(w.reciprocal_().mul_(a)).sqrt_()
        else:
            torch.reciprocal(w, out=v).mul_(b)
            torch.reciprocal(torch.bmm(v, kk.mT), out=u).mul_(a)

    def _restabilise(self, rows: list[int], reg: float) -> None:
        """Absorb runaway scalings into the potentials; recompute them in the log domain.

        Counts as one iteration of each row it touches.
        """
        kk, cc, f, g = self.k, self.c, self.f, self.g
        for row in rows:
            sl = slice(row, row + 1)
            f[sl] += reg * self.u[sl, 0].log()
            if self.sym:
                f[sl] = 0.5 * (f[sl] + _c_transform(kk[sl], cc[sl], f[sl], reg, 2))
            else:
                g[sl] = _c_transform(kk[sl], cc[sl], f[sl], reg, 1)
                f[sl] = _c_transform(kk[sl], cc[sl], g[sl], reg, 2)
            _build(kk[sl], cc[sl], f[sl], g[sl], reg)
            self.u[sl] = 1.0
            self.v[sl] = 1.0
            self.row_it[row] += 1

    def _finish(self, done: list[bool], err: list[float], reg: float) -> None:
        """Write the results of the rows that stop now (this overwrites their kernel).

        Costs and max C come back to the host in one transfer: one sync per check, not per pair.
        """
        rows = [r for r, flag in enumerate(done) if flag]
        cmax = [self.c[r].amax() for r in rows]
        costs = [torch.mm(self.u[r], self.k[r].mul_(self.c[r])).mul_(self.v[r]).sum() for r in rows]
        host = torch.stack([torch.stack(costs), torch.stack(cmax)]).tolist()
        for row, value, top in zip(rows, *host, strict=True):
            out = self.slot[row]
            self.cost[out] = value
            self.iters[out] = self.row_it[row]
            self.error[out] = err[row]
            self.cmax[out] = top
            self.f_out[out] = self.f[row] + reg * self.u[row, 0].log()
            self.g_out[out] = self.g[row] + reg * self.v[row, 0].log()

    def _compact(self, keep: list[int]) -> None:
        """Move the surviving rows to the front, in place (no second copy of the buffers)."""
        for new, old in enumerate(keep):
            if new != old:
                self.k[new].copy_(self.k[old])
                self.c[new].copy_(self.c[old])
        idx = torch.tensor(keep, device=self.c.device)
        self.f, self.u = self.f[idx], self.u[idx]
        if self.sym:
            self.g, self.v = self.f, self.u
        else:
            self.g, self.v = self.g[idx], self.v[idx]
        self.slot = [self.slot[r] for r in keep]
        self.row_it = [self.row_it[r] for r in keep]


# --------------------------------------------------------------------------------------------
# The engine: waves of warm-started pairs, chunks sized by the memory budget, CPU workers


def _pair_bytes(n: int, m: int, d: int, itemsize: int) -> int:
    """Working memory of one pair: cost and kernel matrices plus the per-point vectors."""
    return (2 * n * m + 8 * (n + m) + 2 * (n + m) * (d + 2)) * itemsize


def run_problems(
    clouds: Sequence[Tensor],
    pairs: Sequence[tuple[int, int]],
    warm_from: Sequence[int | None],
    init: Sequence[tuple[Tensor, Tensor] | None],
    cfg: SolverConfig,
) -> Solved:
    """Solve OT(clouds[p], clouds[q]) for every pair; pairs with p == q use the symmetric solver.

    A pair whose ``warm_from`` names an earlier pair starts from that pair's potentials, so
    pairs are solved in *waves* (a wave only depends on earlier waves). Inside a wave, pairs
    of one shape, kind and epsilon schedule are cut into chunks of at most ``max_batch``
    pairs whose working memory fits ``chunk_bytes`` (never more than ``budget``); the chunks
    of a wave run on ``workers`` threads.
    """
    n_pairs = len(pairs)
    level = [0] * n_pairs
    for k, src in enumerate(warm_from):
        if src is not None:
            if not 0 <= src < k:
                raise ValueError(f"warm_from[{k}] = {src}: must name an earlier pair")
            level[k] = level[src] + 1
    cost = torch.zeros(n_pairs, dtype=torch.float64)
    iters = torch.zeros(n_pairs, dtype=torch.int64)
    error = torch.zeros(n_pairs, dtype=torch.float64)
    cmax = torch.zeros(n_pairs, dtype=torch.float64)
    f_all: list[Tensor | None] = [None] * n_pairs
    g_all: list[Tensor | None] = [None] * n_pairs

    def start(k: int) -> tuple[Tensor, Tensor] | None:
        src = warm_from[k]
        if src is not None:
            fs, gs = f_all[src], g_all[src]
            assert fs is not None and gs is not None
            p, q = pairs[k]
            if fs.shape[0] == clouds[p].shape[0] and gs.shape[0] == clouds[q].shape[0]:
                return fs, gs
            return None
        return init[k]

    local = threading.local()
    report_lock = threading.Lock()

    def workspace() -> _Workspace:
        if not hasattr(local, "ws"):
            local.ws = _Workspace()
        ws: _Workspace = local.ws
        return ws

    def stages(k: int) -> int:
        if start(k) is not None or cfg.eps_scaling is None:
            return 0
        p, q = pairs[k]
        x, y = clouds[p][None], clouds[q][None]
        return _eps_stages(cfg.reg, _max_cost_bound(x, y, cfg.scale), cfg.eps_scaling)

    def solve(ks: list[int], warm: bool, n_stages: int) -> None:
        p0, q0 = pairs[ks[0]]
        x = torch.stack([clouds[pairs[k][0]] for k in ks]).to(cfg.device, cfg.dtype)
        starts = [start(k) for k in ks] if warm else []
        f0 = torch.stack([s[0] for s in starts if s is not None]).to(x) if warm else None
        g0 = torch.stack([s[1] for s in starts if s is not None]).to(x) if warm else None
        y = (
            None
            if p0 == q0
            else torch.stack([clouds[pairs[k][1]] for k in ks]).to(cfg.device, cfg.dtype)
        )
        out = _ChunkSolver(x, y, f0, g0, n_stages, cfg, workspace()).solve()
        c_b, it_b, err_b, cmax_b, f_b, g_b = out
        for row, k in enumerate(ks):
            cost[k] = float(c_b[row])
            iters[k] = it_b[row]
            error[k] = err_b[row]
            cmax[k] = cmax_b[row]
            f_all[k], g_all[k] = f_b[row], g_b[row]
        if cfg.on_solved is not None:
            with report_lock:
                cfg.on_solved(len(ks))

    waves: dict[int, list[int]] = {}
    for k in range(n_pairs):
        waves.setdefault(level[k], []).append(k)
    with Workers(cfg) as workers:
        for lvl in sorted(waves):
            groups: dict[tuple[int, int, bool, bool, int], list[int]] = {}
            for k in waves[lvl]:
                p, q = pairs[k]
                shape = (clouds[p].shape[0], clouds[q].shape[0])
                key = (*shape, p == q, start(k) is not None, stages(k))
                groups.setdefault(key, []).append(k)
            chunks: list[tuple[list[int], bool, int]] = []
            for (n, m, _, warm, n_stages), ks in groups.items():
                d = clouds[pairs[ks[0]][0]].shape[1]
                per_pair = _pair_bytes(n, m, d, cfg.dtype.itemsize)
                if per_pair > cfg.budget:
                    raise ValueError(
                        f"one {n}x{m} pair needs {per_pair / 2**20:.1f} MiB of working memory, "
                        f"over memory_budget_bytes={cfg.budget}; raise the budget"
                    )
                size = max(1, min(cfg.max_batch, cfg.chunk_bytes // per_pair))
                chunks += [(ks[i : i + size], warm, n_stages) for i in range(0, len(ks), size)]
            workers.map(lambda ch: solve(*ch), chunks)
    return Solved(cost, iters, error, error <= cfg.tol, cmax, _filled(f_all), _filled(g_all))


class Workers:
    """Runs independent jobs: on ``cfg.workers`` threads on the CPU, in order on CUDA.

    On the CPU each worker runs single-threaded torch (the thread count is restored on
    exit): problems side by side beat threads inside one small gemv or gemm, and a
    multi-threaded op spin-waits for its threads, which burns CPU time when other processes
    share the cores (a 2-thread Newton polish took the tiny-cpu demo run's OT stage from 25
    to 134 CPU seconds on a shared 2-core machine).
    """

    def __init__(self, cfg: SolverConfig) -> None:
        cpu = cfg.device.type == "cpu"
        self._pool = ThreadPoolExecutor(cfg.workers) if cpu and cfg.workers > 1 else None
        self._threads = torch.get_num_threads()

    def __enter__(self) -> Workers:
        if self._pool is not None:
            torch.set_num_threads(1)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown()
        torch.set_num_threads(self._threads)

    def map(self, fn: Callable[[_T], object], items: Sequence[_T]) -> None:
        if self._pool is not None:
            list(self._pool.map(fn, items))
        else:
            for item in items:
                fn(item)


def _filled(items: list[Tensor | None]) -> list[Tensor]:
    out = [t for t in items if t is not None]
    assert len(out) == len(items)
    return out


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


class SolverOptions(TypedDict, total=False):
    """Solver settings shared by :func:`sinkhorn_cost`, :func:`sinkhorn_divergence` and
    :func:`pairwise_drift` (all optional; the defaults suit the device).

    * ``tol``: L1 column-marginal tolerance (default :data:`DEFAULT_TOL` for the dtype).
    * ``max_iter``: iteration cap per pair, epsilon stages included (default 2000).
    * ``eps_scaling``: per-stage factor of epsilon scaling for cold starts, None for off
      (default 0.5). Stages start at reg = max(C) / 50 (max(C) bounded from the point
      norms) and run only when the target reg is below that; warm-started pairs skip them.
    * ``dtype``: torch.float32 (default) or torch.float64.
    * ``device``: where to solve (default: the inputs' device).
    * ``memory_budget_bytes``: cap on the working memory of one chunk of pairs (default:
      half the free memory on CUDA, 2 GiB on the CPU); a pair alone over it is an error.
      CUDA chunks fill it; CPU chunks stop at 16 MiB, a cache-sized chunk (one N=1000
      float32 pair, or many small ones).
    * ``max_batch``: cap on pairs per chunk (default: none).
    * ``workers``: threads solving chunks side by side (default: 1 on CUDA, torch's thread
      count on the CPU, each worker then running single-threaded BLAS).
    * ``check_every``: iterations between marginal checks (each is a host sync on CUDA;
      default 1).
    * ``on_solved``: called with the number of OT problems each finished chunk solved
      (from worker threads, one call at a time), so a caller can report progress; a
      :func:`pairwise_drift` call counts up to :func:`problem_count` of its pairs.
    """

    tol: float | None
    max_iter: int
    eps_scaling: float | None
    dtype: torch.dtype | None
    device: str | torch.device | None
    memory_budget_bytes: int | None
    max_batch: int | None
    workers: int | None
    check_every: int
    on_solved: Callable[[int], None] | None


def solver_config(like: Tensor, reg: float, scale: float, options: SolverOptions) -> SolverConfig:
    """Resolve the device-dependent defaults: this is the only place the device matters."""
    if not reg > 0.0:
        raise ValueError(f"reg must be > 0, got {reg}")
    if not scale > 0.0:
        raise ValueError(f"scale must be > 0, got {scale}")
    eps_scaling = options.get("eps_scaling", 0.5)
    if eps_scaling is not None and not 0.0 < eps_scaling < 1.0:
        raise ValueError(f"eps_scaling is the per-stage factor in (0, 1), got {eps_scaling}")
    dt = options.get("dtype") or torch.float32
    if dt not in DEFAULT_TOL:
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dt}")
    device = options.get("device")
    dev = torch.device(device) if device is not None else like.device
    cuda = dev.type == "cuda"
    budget = options.get("memory_budget_bytes")
    if budget is None:
        budget = torch.cuda.mem_get_info(dev)[0] // 2 if cuda else _CPU_DEFAULT_BUDGET
    tol = options.get("tol")
    max_batch = options.get("max_batch")
    workers = options.get("workers")
    return SolverConfig(
        reg=float(reg),
        scale=float(scale),
        tol=DEFAULT_TOL[dt] if tol is None else float(tol),
        max_iter=int(options.get("max_iter", 2000)),
        eps_scaling=eps_scaling,
        check_every=max(1, int(options.get("check_every", 1))),
        dtype=dt,
        device=dev,
        budget=int(budget),
        chunk_bytes=int(budget) if cuda else min(int(budget), _CPU_CHUNK_BYTES),
        max_batch=max(1, max_batch) if max_batch is not None else 1 << 30,
        workers=max(1, workers)
        if workers is not None
        else (1 if cuda else torch.get_num_threads()),
        on_solved=options.get("on_solved"),
    )


# --------------------------------------------------------------------------------------------
# Public API


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


def emd_cost(x: Clouds, y: Clouds, *, scale: float | None = None) -> Tensor:
    """Exact OT cost per pair with POT's network simplex (``ot.emd2``), for small N.

    Solved in float64 on the CPU, on the same normalised cost as the Sinkhorn solver
    (``scale`` defaults to :func:`cost_scale` of the x clouds; pass 1.0 for raw squared
    distances). O(N^3): meant for N up to a few thousand and for checking the others.
    """
    try:
        import ot  # POT: optional at runtime, absent from the GPU images
    except ImportError as exc:  # pragma: no cover - depends on the image
        raise RuntimeError("emd_cost needs POT (pip install POT); use method='sinkhorn'") from exc
    xs, ys = as_clouds(x), as_clouds(y)
    if len(xs) != len(ys):
        raise ValueError(f"x has {len(xs)} clouds and y has {len(ys)}")
    sc = cost_scale(xs) if scale is None else float(scale)
    out = torch.empty(len(xs), dtype=torch.float64)
    for k, (xk, yk) in enumerate(zip(xs, ys, strict=True)):
        cmat = cost_matrix(
            xk.detach().to("cpu", torch.float64)[None],
            yk.detach().to("cpu", torch.float64)[None],
            sc,
        )[0].numpy()
        a = np.full(cmat.shape[0], 1.0 / cmat.shape[0])
        b = np.full(cmat.shape[1], 1.0 / cmat.shape[1])
        out[k] = float(ot.emd2(a, b, cmat, numItermax=10_000_000))
    return out
