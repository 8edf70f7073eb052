"""Correctness of the OT core (services/ot: sinkhorn, pairwise, sliced) against POT and OT's laws.

Small clouds throughout: the whole file runs in well under a minute on a 2-core CPU.
"""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
import warnings
from typing import Any

import numpy as np
import pytest
import torch

import services.ot.pairwise as pairwise_module
from services.ot.cost import cost_matrix, cost_scale
from services.ot.drift import SolveStats, depth_time_pairs
from services.ot.emd import emd_cost
from services.ot.newton import newton_polish
from services.ot.options import DEFAULT_TOL
from services.ot.pairwise import pairwise_drift, sinkhorn_divergence
from services.ot.sinkhorn import sinkhorn_cost
from services.ot.sliced import _directions, sliced_pairs, sliced_wasserstein
from tests.support import ROOT

F64 = torch.float64


def clouds(n: int, d: int, seed: int, shift: float = 0.0, batch: int | None = None) -> torch.Tensor:
    """Gaussian clouds ``[N, d]`` (or ``[batch, N, d]``), float64, reproducible."""
    gen = torch.Generator().manual_seed(seed)
    shape = (n, d) if batch is None else (batch, n, d)
    return torch.randn(*shape, generator=gen, dtype=F64) + shift


def pot() -> Any:
    """POT, the reference; the GPU images lack it, so only the tests that need it skip."""
    return pytest.importorskip("ot")


def uniform(n: int) -> np.ndarray:
    return np.full(n, 1.0 / n)


def pot_sinkhorn(x: torch.Tensor, y: torch.Tensor, reg: float, scale: float, **kw: object) -> float:
    """POT's sinkhorn2 on exactly our normalised cost, run to a tight tolerance."""
    m = cost_matrix(x[None], y[None], scale)[0].numpy()
    options: dict[str, object] = {"stopThr": 1e-12, "numItermax": 100_000} | kw
    return float(pot().sinkhorn2(uniform(m.shape[0]), uniform(m.shape[1]), m, reg, **options))


def near_permutation(
    n: int, d: int, noise: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """y = a noisy permutation of x, shifted so that ||v||^2 is one normalised unit.

    At reg = 1e-3 every exp(-C / reg) of some rows underflows to 0 even in float64
    (C > 0.75 everywhere in them), so a kernel-space Sinkhorn divides by zero.
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=F64)
    scale = cost_scale(x)
    v = torch.full((d,), (scale / d) ** 0.5, dtype=F64)
    perm = torch.randperm(n, generator=gen)
    y = x[perm] + noise * torch.randn(n, d, generator=gen, dtype=F64) + v
    return x, y, scale


# ------------------------------------------------------------------------------------------
# Agreement with POT


@pytest.mark.parametrize(
    ("n", "m", "d", "reg"),
    [(30, 45, 3, 0.5), (100, 100, 8, 0.05), (160, 120, 16, 0.01), (300, 300, 64, 0.05)],
)
def test_matches_pot_sinkhorn2_float64(n: int, m: int, d: int, reg: float) -> None:
    x, y = clouds(n, d, seed=1), clouds(m, d, seed=2, shift=0.3)
    scale = cost_scale(x)
    res = sinkhorn_cost(x, y, reg, scale=scale, dtype=F64, tol=1e-11, max_iter=20_000)
    ref = pot_sinkhorn(x, y, reg, scale)
    assert bool(res.converged.all())
    assert res.cost.item() == pytest.approx(ref, rel=1e-4)
    assert res.cost.item() == pytest.approx(ref, rel=1e-8)  # in fact much closer


def test_small_reg_where_naive_kernel_underflows() -> None:
    """reg = 1e-3 on the normalised cost: naive kernel-space Sinkhorn breaks, ours does not.

    References: POT's log-domain ``sinkhorn2(method="sinkhorn_log")``, which converges this
    slowly from a cold start (1e-4 takes ~10k iterations), and POT's epsilon-scaling
    solver, which gets there to 1e-12.
    """
    reg, n = 1e-3, 30
    x, y, scale = near_permutation(n, 4, noise=0.1, seed=0)
    m = cost_matrix(x[None], y[None], scale)[0].numpy()
    a = uniform(n)

    kernel = np.exp(-m / reg)
    assert (kernel.sum(1) == 0).any()  # whole rows underflow, even in float64
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        u, v = np.ones(n), np.ones(n)
        for _ in range(3):
            v = a / (kernel.T @ u)
            u = a / (kernel @ v)
    assert not np.isfinite(u).all()  # so the naive iteration produces inf/nan
    ot = pot()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        naive_pot = float(ot.sinkhorn2(a, a, m, reg))
        plan = ot.bregman.sinkhorn_epsilon_scaling(a, a, m, reg, stopThr=1e-12, numItermax=10_000)
    ref = float((plan * m).sum())
    ref_log = pot_sinkhorn(x, y, reg, scale, method="sinkhorn_log", numItermax=10_000)

    res = sinkhorn_cost(x, y, reg, scale=scale, dtype=F64, tol=1e-10)
    assert bool(res.converged.all())
    assert res.cost.item() == pytest.approx(ref, rel=1e-8)
    assert res.cost.item() == pytest.approx(ref_log, rel=1e-4)
    assert naive_pot != pytest.approx(ref, rel=1e-2)  # POT's kernel-space method fails here

    # float32 is robust too, to its own tolerance.
    res32 = sinkhorn_cost(x.float(), y.float(), reg, scale=scale)
    assert bool(res32.converged.all())
    assert res32.cost.item() == pytest.approx(ref, rel=1e-4)


def test_self_terms_match_converged_pot() -> None:
    """The symmetric solver of OT(a, a) agrees with POT's alternating Sinkhorn run long."""
    x = clouds(80, 6, seed=3)
    scale = cost_scale(x)
    res = pairwise_drift(x[None], [(0, 0)], reg=0.05, scale=scale, dtype=F64, tol=1e-11)
    assert res.self_cost is not None
    ref = pot_sinkhorn(x, x, 0.05, scale)
    assert res.self_cost[0].item() == pytest.approx(ref, rel=1e-7)
    assert int(res.iterations[0]) < 100  # POT needs thousands here


# ------------------------------------------------------------------------------------------
# Laws of the divergence and of OT


def test_divergence_of_a_cloud_to_itself_is_zero() -> None:
    x = clouds(120, 5, seed=4, batch=3)
    s64 = sinkhorn_divergence(x, x, 0.05, dtype=F64, tol=1e-11)
    assert s64.abs().max().item() < 1e-12
    ot_xx = sinkhorn_cost(x, x, 0.05, dtype=F64).cost
    assert ot_xx.min().item() > 1e-3  # the raw entropic cost is biased, S removes it
    s32 = sinkhorn_divergence(x.float(), x.float(), 0.05)
    assert s32.abs().max().item() < 1e-4 * ot_xx.max().item()


def test_divergence_is_symmetric() -> None:
    x = clouds(100, 5, seed=5, batch=3)
    y = clouds(90, 5, seed=6, shift=0.4, batch=3)
    scale = cost_scale(x)
    s_xy = sinkhorn_divergence(x, y, 0.05, scale=scale, dtype=F64, tol=1e-11)
    s_yx = sinkhorn_divergence(y, x, 0.05, scale=scale, dtype=F64, tol=1e-11)
    assert torch.allclose(s_xy, s_yx, rtol=1e-8, atol=0)
    assert bool((s_xy > 0).all())


def test_sinkhorn_approaches_emd_as_reg_vanishes() -> None:
    pot()
    x, y = clouds(60, 3, seed=7), clouds(60, 3, seed=8, shift=0.5)
    scale = cost_scale(x)
    exact = emd_cost(x, y, scale=scale).item()
    m = cost_matrix(x[None], y[None], scale)[0].numpy()
    assert exact == pytest.approx(float(pot().emd2(uniform(60), uniform(60), m)), rel=1e-12)
    gaps = []
    for reg in (0.3, 0.1, 0.03, 0.01, 0.003):
        res = sinkhorn_cost(x, y, reg, scale=scale, dtype=F64, tol=1e-9, max_iter=50_000)
        gaps.append(abs(res.cost.item() - exact) / exact)
    assert all(later < earlier for earlier, later in itertools.pairwise(gaps))
    assert gaps[-1] < 2e-3


def test_translation_adds_squared_norm_to_exact_cost() -> None:
    """Equal means: translating y by v adds exactly ||v||^2 (cost in raw units, scale=1)."""
    pot()
    x = clouds(40, 4, seed=9)
    y = clouds(40, 4, seed=10)
    y = y - y.mean(0) + x.mean(0)
    v = torch.tensor([0.7, -1.2, 0.3, 2.0], dtype=F64)
    base = emd_cost(x, y, scale=1.0).item()
    moved = emd_cost(x, y + v, scale=1.0).item()
    assert moved - base == pytest.approx(float(v @ v), rel=1e-9)
    # The entropic plan is unchanged by the translation too, so the same law holds.
    ent = sinkhorn_cost(torch.stack([x, x]), torch.stack([y, y + v]), 1.0, scale=1.0, dtype=F64)
    assert bool(ent.converged.all())
    assert (ent.cost[1] - ent.cost[0]).item() == pytest.approx(float(v @ v), rel=1e-7)


def kendall_tau(a: np.ndarray, b: np.ndarray) -> float:
    n = len(a)
    concordant = sum(
        np.sign(a[i] - a[j]) * np.sign(b[i] - b[j]) for i in range(n) for j in range(i + 1, n)
    )
    return float(concordant) / (n * (n - 1) / 2)


def test_sliced_ranks_pairs_like_sinkhorn() -> None:
    x = clouds(200, 8, seed=11)
    gen = torch.Generator().manual_seed(12)
    direction = torch.randn(8, generator=gen, dtype=F64)
    ys = [clouds(200, 8, seed=20 + k) * (1.0 + 0.1 * k) + 0.15 * k * direction for k in range(8)]
    xs = torch.stack([x] * len(ys))
    y = torch.stack(ys)
    scale = cost_scale(x)
    s = sinkhorn_divergence(xs, y, 0.05, scale=scale).numpy()
    sw = sliced_wasserstein(xs, y, n_projections=256, seed=0, scale=scale).numpy()
    assert kendall_tau(s, sw) >= 0.9
    again = sliced_wasserstein(xs, y, n_projections=256, seed=0, scale=scale).numpy()
    assert np.array_equal(sw, again)  # seeded projections


def test_sliced_matches_pot_on_the_same_directions() -> None:
    """POT's ``ot.sliced_wasserstein_distance`` on our directions, squared and / scale, is ours.

    Equal and unequal cloud sizes; why sliced.py keeps its own implementation is said there.
    """
    ot = pot()
    x, y = clouds(40, 6, seed=15), clouds(40, 6, seed=16, shift=0.3)
    z = clouds(55, 6, seed=17, shift=-0.2)
    pairs = [(0, 1), (0, 2), (1, 2)]
    ours = sliced_pairs([x, y, z], pairs, 32, 3, 2.0, F64)
    theta = _directions(6, 32, 3, x, F64).numpy()
    points = [x.numpy(), y.numpy(), z.numpy()]
    ref = [
        ot.sliced_wasserstein_distance(points[p], points[q], projections=theta) ** 2 / 2.0
        for p, q in pairs
    ]
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-12)


def test_sliced_unequal_sizes_matches_one_dimensional_ot() -> None:
    """In 1-D the sliced distance is the exact W2^2 (all directions are +-1)."""
    pot()
    x = clouds(30, 1, seed=13)
    y = clouds(45, 1, seed=14, shift=0.5)
    exact = emd_cost(x, y, scale=1.0).item()
    assert sliced_wasserstein(x, y, n_projections=4, scale=1.0, dtype=F64).item() == pytest.approx(
        exact, rel=1e-9
    )


# ------------------------------------------------------------------------------------------
# Batching, chunking, dtypes, stopping, warm starts


def test_batched_equals_looped() -> None:
    x = clouds(80, 6, seed=15, batch=5)
    y = clouds(70, 6, seed=16, shift=0.2, batch=5)
    scale = cost_scale(x)
    batched = sinkhorn_cost(x, y, 0.05, scale=scale, dtype=F64, tol=1e-11, max_batch=5, workers=1)
    looped = torch.cat(
        [sinkhorn_cost(x[b], y[b], 0.05, scale=scale, dtype=F64, tol=1e-11).cost for b in range(5)]
    )
    assert torch.allclose(batched.cost, looped, rtol=1e-9, atol=0)


def test_memory_chunking_matches_one_chunk() -> None:
    x = clouds(64, 4, seed=17, batch=6)
    y = clouds(64, 4, seed=18, shift=0.3, batch=6)
    scale = cost_scale(x)
    one_pair = (2 * 64 * 64 + 8 * 128 + 2 * 128 * 6) * 8  # float64
    common: dict[str, Any] = {"scale": scale, "dtype": F64, "tol": 1e-11, "max_batch": 64}
    whole = sinkhorn_cost(x, y, 0.05, memory_budget_bytes=1 << 30, **common)
    tiny = sinkhorn_cost(x, y, 0.05, memory_budget_bytes=2 * one_pair, **common)
    assert torch.allclose(whole.cost, tiny.cost, rtol=1e-9, atol=0)
    with pytest.raises(ValueError, match="memory_budget_bytes"):
        sinkhorn_cost(x, y, 0.05, memory_budget_bytes=one_pair // 2, **common)


def test_float32_by_default_float64_on_request() -> None:
    x, y = clouds(50, 3, seed=19).float(), clouds(50, 3, seed=20).float()
    res = sinkhorn_cost(x, y, 0.1, return_potentials=True)
    assert res.f is not None and res.f.dtype == torch.float32
    assert res.tol == DEFAULT_TOL[torch.float32]
    res64 = sinkhorn_cost(x, y, 0.1, dtype=F64, return_potentials=True)
    assert res64.f is not None and res64.f.dtype == F64
    assert res64.tol == DEFAULT_TOL[F64]
    assert res.cost.item() == pytest.approx(res64.cost.item(), rel=1e-4)


def test_early_stopping_is_per_pair() -> None:
    """One chunk, two pairs of different difficulty: each stops on its own iteration.

    Independent samples give a blurry plan and converge fast; a slightly perturbed copy
    gives a near-permutation plan, the slow case of Sinkhorn.
    """
    x = clouds(100, 4, seed=21)
    fast = clouds(100, 4, seed=22, shift=0.2)
    slow = x + 0.5 * clouds(100, 4, seed=23)
    ys = torch.stack([fast, slow])
    res = sinkhorn_cost(torch.stack([x, x]), ys, 0.05, dtype=F64, tol=1e-6, max_batch=2)
    iters = res.iterations.tolist()
    assert iters[0] < iters[1]
    assert bool(res.converged.all())
    assert bool((res.marginal_error <= res.tol).all())
    for b in range(2):  # the same pair alone stops at the same iteration (+-1: rounding)
        alone = sinkhorn_cost(x, ys[b], 0.05, dtype=F64, tol=1e-6)
        assert abs(alone.iterations.item() - iters[b]) <= 1, (alone.iterations, iters)


def test_warm_start_saves_iterations_on_a_nearby_problem() -> None:
    x = clouds(200, 8, seed=24, batch=1)
    y = clouds(200, 8, seed=25, shift=0.3, batch=1)
    scale = cost_scale(x)
    first = sinkhorn_cost(x, y, 0.05, scale=scale, return_potentials=True)
    assert first.f is not None and first.g is not None
    x2 = x + 0.01 * clouds(200, 8, seed=26, batch=1)
    y2 = y + 0.01 * clouds(200, 8, seed=27, batch=1)
    cold = sinkhorn_cost(x2, y2, 0.05, scale=scale)
    warm = sinkhorn_cost(x2, y2, 0.05, scale=scale, warm_start=(first.f, first.g))
    assert int(warm.iterations[0]) < int(cold.iterations[0])
    assert warm.cost.item() == pytest.approx(cold.cost.item(), rel=1e-4)


# ------------------------------------------------------------------------------------------
# The drift entry point


def test_depth_time_pairs_plan() -> None:
    plan = depth_time_pairs(10, 13)
    assert len(plan.pairs) == 1365
    assert len(set(plan.pairs)) == 1365
    assert sum(1 for p, q in plan.pairs if p // 13 == q // 13) == 780  # depth pairs
    assert all(src is None or src < k for k, src in enumerate(plan.warm_from))
    assert sum(src is None for src in plan.warm_from) == 78 + 13


def test_pairwise_drift_reuses_self_terms_and_matches_divergence() -> None:
    data = clouds(60, 5, seed=28, batch=6).float()
    data += torch.arange(6, dtype=torch.float32)[:, None, None] * 0.1
    plan = depth_time_pairs(2, 3)
    scale = cost_scale(data)
    res = pairwise_drift(data, plan.pairs, "sinkhorn", 0.05, scale=scale, warm_from=plan.warm_from)
    assert res.self_cost is not None and res.scale == scale
    xs = torch.stack([data[p] for p, _ in plan.pairs])
    ys = torch.stack([data[q] for _, q in plan.pairs])
    direct = sinkhorn_divergence(xs, ys, 0.05, scale=scale)
    assert torch.allclose(res.values, direct, rtol=1e-4, atol=1e-6)
    p, q = plan.pairs[0]
    assert res.values[0].item() == pytest.approx(
        res.cost[0].item() - 0.5 * (res.self_cost[p] + res.self_cost[q]).item()
    )
    for method in ("sliced", "emd"):
        if method == "emd":
            pot()
        other = pairwise_drift(data, plan.pairs, method, scale=scale)
        assert other.values.shape == (len(plan.pairs),) and bool((other.values > 0).all())
    with pytest.raises(ValueError, match="method"):
        pairwise_drift(data, plan.pairs, "wasserstein")  # type: ignore[arg-type]


def test_a_solve_that_broke_down_to_nan_is_polished_not_taken_for_converged(monkeypatch) -> None:
    """A float32 warm start can break down to NaN (a grokked model's last layer did: 39 of
    40 step drifts came out NaN, and the OT verdicts passed them). The polish must redo
    such a problem from a cold start, and the value must equal the healthy solve's."""
    data = clouds(60, 5, seed=29, batch=6).float()
    data += torch.arange(6, dtype=torch.float32)[:, None, None] * 0.1
    plan = depth_time_pairs(2, 3)
    scale = cost_scale(data)
    healthy = pairwise_drift(data, plan.pairs, "sinkhorn", 0.05, scale=scale)
    real = pairwise_module.run_problems
    calls = []

    def broken_first_problem(*args: Any, **kwargs: Any) -> Any:
        """The main solve's first problem breaks down; the polish's own solves do not."""
        out = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 1:
            out.cost[0] = out.error[0] = math.nan
            out.f[0] = torch.full_like(out.f[0], math.nan)
            out.g[0] = torch.full_like(out.g[0], math.nan)
        return out

    monkeypatch.setattr(pairwise_module, "run_problems", broken_first_problem)
    res = pairwise_drift(data, plan.pairs, "sinkhorn", 0.05, scale=scale)
    assert bool(torch.isfinite(res.values).all()) and res.unconverged_problems == 0
    assert torch.allclose(res.values, healthy.values, rtol=1e-3, atol=1e-6)
    stats = SolveStats()  # and a NaN that got through would fail the verdict, not pass it
    res.values[0] = math.nan
    stats.add(res)
    assert stats.max_relative_error == math.inf


def test_polish_finishes_problems_sinkhorn_left_unconverged() -> None:
    """max_iter=1 leaves every problem far from converged; the float64 polish finishes them."""
    data = clouds(50, 4, seed=31, batch=4).float()
    plan = depth_time_pairs(2, 2)
    scale = cost_scale(data)
    tight = pairwise_drift(data, plan.pairs, scale=scale, dtype=F64, tol=1e-11, max_iter=100_000)
    capped = pairwise_drift(data, plan.pairs, scale=scale, max_iter=1)
    assert capped.polished_problems == capped.problems == len(plan.pairs) + 4
    assert capped.unconverged_problems == 0 and bool(capped.converged.all())
    assert torch.allclose(capped.values, tight.values, rtol=1e-8, atol=0)
    assert float(capped.relative_error().max()) < 1e-6


def test_newton_polish_reaches_pot_from_a_loose_sinkhorn_start() -> None:
    x, y = clouds(60, 3, seed=33), clouds(60, 3, seed=34, shift=0.2)
    scale = cost_scale(x)
    loose = sinkhorn_cost(x.float(), y.float(), 0.05, scale=scale, tol=1e-3, return_potentials=True)
    assert loose.g is not None
    polished = newton_polish(x, y, loose.g[0], 0.05, scale, tol=1e-13)
    ref = pot_sinkhorn(x, y, 0.05, scale)
    assert abs(loose.cost.item() - ref) > 1e-6  # the start is visibly off
    assert polished.error <= 1e-13 and polished.steps <= 10
    assert polished.cost == pytest.approx(ref, rel=1e-11)


def test_value_error_estimate_covers_the_actual_error() -> None:
    """At a loose tol without polish, each value's estimated error bounds its actual error."""
    data = clouds(80, 5, seed=35, batch=6).float()
    data += torch.arange(6, dtype=torch.float32)[:, None, None] * 0.05
    plan = depth_time_pairs(2, 3)
    scale = cost_scale(data)
    exact = pairwise_drift(data, plan.pairs, scale=scale, dtype=F64, tol=1e-11, max_iter=100_000)
    for tol in (1e-2, 1e-3, 1e-4):
        loose = pairwise_drift(data, plan.pairs, scale=scale, tol=tol, rtol=1e9)
        assert loose.polished_problems == 0
        actual = (loose.values - exact.values).abs()
        assert bool((actual <= loose.error).all()), (tol, actual / loose.error)
        # ... and scales with the tolerance: tol x max C (normalised costs below 10 here).
        assert float(loose.error.max()) < 10 * tol


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    x = clouds(300, 16, seed=29, batch=8).float()
    y = clouds(300, 16, seed=30, shift=0.2, batch=8).float()
    scale = cost_scale(x)
    cpu = sinkhorn_divergence(x, y, 0.05, scale=scale)
    gpu = sinkhorn_divergence(x.cuda(), y.cuda(), 0.05, scale=scale)
    assert torch.allclose(cpu, gpu, rtol=1e-4, atol=1e-6)


def test_benchmark_quick_prints_json_lines() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_ot.py"), "--quick", "--device", "cpu"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        timeout=300,
    )
    records = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
    assert records and all(r["bench"] == "ot" for r in records)
    rec = records[0]
    assert rec["pairs"] == 30 and rec["driftlab_converged"]
    assert rec["max_rel_diff"] < 1e-3 and rec["cpu_speedup"] > 0 and rec["wall_speedup"] > 0
