"""The engine: many OT problems over one list of clouds, in waves, chunks and worker threads.

* Dual potentials can be warm-started from a neighbouring pair, so pairs are solved in
  waves; cold starts at small reg use epsilon scaling.
* On the CPU chunks are cache-sized (one N=1000 pair: its 4 MB float32 kernel stays in
  cache while it iterates, in buffers reused from chunk to chunk) and chunks are spread over
  the cores, one worker thread each; on CUDA chunks are as large as a memory budget allows.
  Both are the same code with different chunk/worker settings (`options.solver_config`).

Each chunk is solved by `chunk_solver.ChunkSolver`.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor

from services.ot.chunk_solver import ChunkSolver, Workspace
from services.ot.cost import max_cost_bound
from services.ot.options import SolverConfig

__all__ = ["Solved", "Workers", "run_problems"]

_T = TypeVar("_T")

# Epsilon scaling (cold starts only) begins at reg = max(C) / _EPS_START_RANGE, where the
# kernel spans exp(-50) and Sinkhorn converges in a few iterations. Above that reg plain
# Sinkhorn is fast and the extra stages would only cost kernel builds.
_EPS_START_RANGE = 50.0


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


def _eps_stages(reg: float, cmax: float, factor: float | None) -> int:
    """Epsilon-scaling stages before the target reg for a cold start (0: none).

    The stages are reg / factor^k, k = n..1, from the first above cmax / _EPS_START_RANGE
    (a well-conditioned start) down. Depending only on the pair, never on its chunk.
    """
    start = cmax / _EPS_START_RANGE
    if factor is None or start <= reg:
        return 0
    return math.ceil(math.log(start / reg) / math.log(1.0 / factor))


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

    def workspace() -> Workspace:
        if not hasattr(local, "ws"):
            local.ws = Workspace()
        ws: Workspace = local.ws
        return ws

    def stages(k: int) -> int:
        if start(k) is not None or cfg.eps_scaling is None:
            return 0
        p, q = pairs[k]
        x, y = clouds[p][None], clouds[q][None]
        return _eps_stages(cfg.reg, max_cost_bound(x, y, cfg.scale), cfg.eps_scaling)

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
        out = ChunkSolver(x, y, f0, g0, n_stages, cfg, workspace()).solve()
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
