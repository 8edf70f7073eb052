"""Solver settings: the options a caller passes and the configuration the engine runs on.

:class:`SolverOptions` are the optional keyword arguments of :func:`sinkhorn.sinkhorn_cost`,
:func:`pairwise.sinkhorn_divergence` and :func:`pairwise.pairwise_drift`;
:func:`solver_config` resolves them, with the device's defaults, into one
:class:`SolverConfig`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypedDict

import torch
from torch import Tensor

__all__ = ["DEFAULT_TOL", "SolverConfig", "SolverOptions", "solver_config"]

#: Default marginal tolerance (L1) per dtype: float32 reaches ~1e-6 at N=1000; 1e-5 keeps
#: values within ~1e-5 relative of a float64 solve. float64 can go as far as POT's default.
DEFAULT_TOL: dict[torch.dtype, float] = {torch.float32: 1e-5, torch.float64: 1e-9}

_CPU_DEFAULT_BUDGET = 2 << 30
# CPU chunks are cut to about this much working memory: one N=1000 float32 pair (its 4 MB
# kernel then streams from cache), or many small pairs, whose solves would otherwise be
# dominated by per-operation overhead (N=100: 5x faster batched than one by one).
_CPU_CHUNK_BYTES = 16 << 20


@dataclass(frozen=True)
class SolverConfig:
    """:class:`SolverOptions` resolved for one device by :func:`solver_config`: every field set,
    so the engine never has to know which defaults a device implies."""

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
