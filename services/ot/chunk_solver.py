"""The Sinkhorn iteration on one chunk of pairs: what makes the solver fast and stable.

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
* Converged pairs leave the active batch.
* The divergence's self-terms OT(a, a) use a symmetric (averaged) update that converges in
  ~10-20 iterations where alternating Sinkhorn, POT's included, needs thousands.

Profiled on a 2-core CPU, N=1000, d=64 (see benchmarks/bench_ot.py). Which pairs share a
chunk, and on which thread it runs, is `engine.py`'s business.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from services.ot.cost import unclamped_cost_matrix
from services.ot.options import SolverConfig

__all__ = ["ChunkOut", "ChunkSolver", "Workspace"]

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
# Intermediate epsilon stages only have to get the potentials close: a loose marginal
# tolerance and an iteration cap per stage.
_STAGE_TOL = 1e-2
_STAGE_MAX_ITER = 50


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


def _out_of_range(s: Tensor, tau: float) -> Tensor:
    """Per pair: does the scaling ``s[B, 1, N]`` leave [1/tau, tau]?"""
    lo, hi = torch.aminmax(s.flatten(1), dim=1)
    return (hi > tau) | (lo < 1.0 / tau)


class Workspace:
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


ChunkOut = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]


class ChunkSolver:
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
        ws: Workspace,
    ) -> None:
        self.sym = y is None
        y_ = x if y is None else y
        n_pairs, n, m = x.shape[0], x.shape[1], y_.shape[1]
        self.cfg = cfg
        self.a, self.b = 1.0 / n, 1.0 / m
        self.tau = _TAU[cfg.dtype]
        self.c = unclamped_cost_matrix(x, y_, cfg.scale, out=ws.get("cost", (n_pairs, n, m), x))
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

    def solve(self) -> ChunkOut:
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
