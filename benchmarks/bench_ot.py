"""Benchmark: the full OT drift computation, driftlab against the usual POT loop.

One JSON object per case on stdout. The case is the drift of one training run: T
checkpoints x L layers of N hidden states in d dimensions, every depth pair (layers i < j
at each checkpoint) and every time pair (checkpoints s < t for each layer): 1,365 pairs for
T=10, L=13, at reg on the normalised cost.

* driftlab: ``pairwise_drift`` (debiased Sinkhorn divergence, each cloud's self-term solved
  once, warm starts from ``depth_time_pairs``, float64 polish where a value needs it) at the
  OT stage's defaults (``OTSpec``: tol, max_iter, rtol), float32, timed end to end.
* POT (when installed): ``ot.dist`` + ``ot.sinkhorn2`` per cross pair, float64, at
  ``stopThr`` (1e-9: POT's default). ``max_rel_diff`` compares the cross-pair costs like for
  like. POT's self-terms are not timed: its alternating Sinkhorn needs thousands of
  iterations on OT(a, a), so the divergence reference takes POT's cross costs and
  driftlab's float64 symmetric self-terms (checked against converged POT in the tests).
* Where POT is absent (the GPU images), the reference is driftlab in float64 at tol 1e-9.

The headline is ``cpu_speedup``, POT's CPU seconds over driftlab's (process CPU time, all
threads): driftlab spreads pairs over every core while POT's loop runs on one, so the wall
time ratio (``wall_speedup``) flatters driftlab by up to the core count (on CUDA, where
driftlab's work is not CPU time, read ``wall_speedup``). POT runs with
single-threaded OpenBLAS (``OPENBLAS_NUM_THREADS=1`` unless already set): on the 2-core
machines a 2-thread OpenBLAS gemv spin-waits and runs the loop up to 9x slower when the
cores are shared, which would flatter driftlab too.

Usage: python benchmarks/bench_ot.py [--quick] [--device cpu|cuda] [--n 1000 --d 64 ...]
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy loads OpenBLAS; see above

import argparse
import importlib.util
import json
import math
import time
from typing import Any

import numpy as np
import torch

from services.ot.cost import cost_scale
from services.ot.drift import depth_time_pairs
from services.ot.pairwise import DriftResult, pairwise_drift
from shared.spec import OTSpec

#: The OT stage's solver defaults: what the benchmark times unless told otherwise.
DEFAULTS = OTSpec()


def synthetic_hidden_states(
    n_checkpoints: int, n_layers: int, n: int, d: int, seed: int = 0
) -> torch.Tensor:
    """Hidden states ``[T * L, N, d]`` (float32) of a fixed probe set drifting smoothly.

    Token ``i`` has a latent code ``z_i``; layer ``l`` at checkpoint ``t`` maps it through a
    product of near-identity layer maps (each with its own direction, plus a random walk
    over checkpoints), adds token-level noise and a per-layer offset, in a random basis.
    Consecutive checkpoints and adjacent layers are close; far ones drift apart. Layer
    maps are renormalised so every layer has the same spread, like a normalised stream.
    The token noise is drawn afresh for each (checkpoint, layer), which puts POT in the
    regime of the reference measurement (~20-30 iterations at stopThr 1e-9) and leaves
    little for warm starts to gain (potentials move with the noise, not only the drift).
    """
    gen = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    eye = torch.eye(d, dtype=f64)
    basis = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=f64))[0]
    z = torch.randn(n, d, generator=gen, dtype=f64)
    layer_dirs = torch.randn(n_layers, d, d, generator=gen, dtype=f64) * (0.3 / math.sqrt(d))
    offsets = torch.randn(n_layers, d, generator=gen, dtype=f64)
    walk = torch.zeros(n_layers, d, d, dtype=f64)
    out = torch.empty(n_checkpoints, n_layers, n, d, dtype=f64)
    for t in range(n_checkpoints):
        if t:
            walk += torch.randn(n_layers, d, d, generator=gen, dtype=f64) * (0.3 / math.sqrt(d))
        a = eye
        for layer in range(n_layers):
            a = a @ (eye + layer_dirs[layer] + walk[layer])
            a = a * (math.sqrt(d) / torch.linalg.matrix_norm(a))
            noise = torch.randn(n, d, generator=gen, dtype=f64)
            out[t, layer] = (z @ a + noise + offsets[layer]) @ basis
    return out.reshape(n_checkpoints * n_layers, n, d).float()


def pot_costs(
    clouds: np.ndarray,
    pairs: list[tuple[int, int]],
    reg: float,
    scale: float,
    stop_thr: float,
    max_iter: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The usual way: ``ot.dist`` + ``ot.sinkhorn2`` per pair in float64; costs, iterations."""
    import ot

    cost = np.empty(len(pairs))
    iters = np.empty(len(pairs))
    for k, (p, q) in enumerate(pairs):
        x, y = clouds[p], clouds[q]
        m = ot.dist(x, y) / scale
        a = np.full(x.shape[0], 1.0 / x.shape[0])
        b = np.full(y.shape[0], 1.0 / y.shape[0])
        value, log = ot.sinkhorn2(a, b, m, reg, stopThr=stop_thr, numItermax=max_iter, log=True)
        cost[k], iters[k] = float(value), int(log["niter"]) + 1
    return cost, iters


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_case(args: argparse.Namespace) -> dict[str, Any]:
    """Time driftlab and the reference on one drift computation; return the JSON record."""
    device = torch.device(args.device)
    clouds = synthetic_hidden_states(args.t, args.layers, args.n, args.d, args.seed).to(device)
    plan = depth_time_pairs(args.t, args.layers)
    scale = cost_scale(clouds)

    def driftlab(
        pairs: list[tuple[int, int]], dtype: torch.dtype, tol: float
    ) -> tuple[DriftResult, float, float]:
        """One pairwise_drift call: its result, wall seconds and process CPU seconds."""
        _sync(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        res = pairwise_drift(
            clouds,
            pairs,
            "sinkhorn",
            args.reg,
            scale=scale,
            warm_from=plan.warm_from if pairs is plan.pairs else None,
            rtol=args.rtol,
            dtype=dtype,
            tol=tol,
            max_iter=args.max_iter,
            workers=args.workers,
        )
        _sync(device)
        return res, time.perf_counter() - start, time.process_time() - cpu_start

    # Warm-up on a few clouds: library loading, CUDA context and cuBLAS handles.
    pairwise_drift(clouds[:3], [(0, 1), (1, 2)], "sinkhorn", args.reg, scale=scale)
    load_before = os.getloadavg()[0]
    ours, ours_s, ours_cpu = driftlab(plan.pairs, torch.float32, args.tol)
    record: dict[str, Any] = {
        "bench": "ot",
        "case": f"drift-{len(plan.pairs)}",
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "n": args.n,
        "d": args.d,
        "checkpoints": args.t,
        "layers": args.layers,
        "pairs": len(plan.pairs),
        "self_terms": args.t * args.layers,
        "reg": args.reg,
        "scale": round(scale, 6),
        "driftlab_seconds": round(ours_s, 3),
        "driftlab_cpu_seconds": round(ours_cpu, 3),
        "driftlab_tol_l1": ours.tol,
        "driftlab_max_iter": args.max_iter,
        "driftlab_rtol": args.rtol,
        "driftlab_iters_mean": round(float(ours.iterations.float().mean()), 2),
        "driftlab_polished_problems": ours.polished_problems,
        "driftlab_max_relative_error": float(ours.relative_error().max()),
        "driftlab_converged": bool(ours.converged.all()),
    }
    # Reference self-terms: float64, tight tolerance (pairs (k, k) use the symmetric solver).
    selfs, _, _ = driftlab([(k, k) for k in range(len(clouds))], torch.float64, 1e-10)
    self_ref = selfs.cost.numpy()
    p_idx = np.array([p for p, _ in plan.pairs])
    q_idx = np.array([q for _, q in plan.pairs])
    if importlib.util.find_spec("ot") is not None and not args.no_pot:
        start, cpu_start = time.perf_counter(), time.process_time()
        ref_cost, pot_iters = pot_costs(
            clouds.double().cpu().numpy(), plan.pairs, args.reg, scale, args.pot_stopthr, 10_000
        )
        baseline_s, baseline_cpu = time.perf_counter() - start, time.process_time() - cpu_start
        record |= {
            "reference": f"POT ot.dist + ot.sinkhorn2, float64, stopThr={args.pot_stopthr}",
            "pot_seconds": round(baseline_s, 3),
            "pot_cpu_seconds": round(baseline_cpu, 3),
            "pot_per_pair_ms": round(1e3 * baseline_s / len(plan.pairs), 3),
            "pot_iters": round(float(pot_iters.mean()), 2),
        }
    else:
        ref, baseline_s, baseline_cpu = driftlab(plan.pairs, torch.float64, 1e-9)
        ref_cost = ref.cost.numpy()
        record |= {
            "reference": "driftlab float64 tol=1e-9 (POT absent or --no-pot)",
            "reference_seconds": round(baseline_s, 3),
            "reference_cpu_seconds": round(baseline_cpu, 3),
            "reference_iters_mean": round(float(ref.iterations.float().mean()), 2),
        }
    ref_div = ref_cost - 0.5 * (self_ref[p_idx] + self_ref[q_idx])
    ours_div, ours_cost = ours.values.numpy(), ours.cost.numpy()
    record |= {
        # The headline. driftlab's time includes its self-terms; the baseline's does not.
        "cpu_speedup": round(baseline_cpu / ours_cpu, 2),
        "wall_speedup": round(baseline_s / ours_s, 2),
        "max_rel_diff": float(np.max(np.abs(ours_cost - ref_cost) / np.abs(ref_cost))),
        "max_rel_diff_divergence": float(np.max(np.abs(ours_div - ref_div) / np.abs(ref_div))),
        "divergence_range": [round(float(ref_div.min()), 6), round(float(ref_div.max()), 6)],
        "loadavg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small smoke configuration")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--n", type=int, default=1000, help="points per cloud")
    parser.add_argument("--d", type=int, default=64, help="dimension")
    parser.add_argument("--t", type=int, default=10, help="checkpoints")
    parser.add_argument("--layers", type=int, default=13)
    parser.add_argument("--reg", type=float, default=0.05)
    parser.add_argument("--tol", type=float, default=DEFAULTS.tol, help="driftlab L1 marginal tol")
    parser.add_argument("--max-iter", type=int, default=DEFAULTS.max_iter)
    parser.add_argument("--rtol", type=float, default=DEFAULTS.rtol, help="driftlab value accuracy")
    parser.add_argument("--pot-stopthr", type=float, default=1e-9)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-pot", action="store_true", help="skip the POT loop")
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.d, args.t, args.layers = 200, 16, 3, 4
    print(json.dumps(run_case(args)), flush=True)


if __name__ == "__main__":
    main()
