"""Drift matrices of a run: depth, time and step drift, bootstrap CIs, permutation baseline.

Bases and scales (what makes two values comparable):

* `depth[t]` compares the layers of checkpoint t: they are projected on one PCA basis fit
  on all layers of that checkpoint pooled, and costs are divided by that checkpoint's
  `scale_depth[t]` (`cost.cost_scale` of those projected clouds pooled).
* `time[l]` and `step[l]` compare the checkpoints of layer l: one PCA basis fit on all
  checkpoints of that layer pooled, costs divided by `scale_time[l]`. A step value is thus
  "drift as a fraction of the layer's typical squared distance", comparable across layers
  whose norms differ by orders of magnitude, and the mean over layers is meaningful.

Dividing the clouds by sqrt(scale) before one solver call is the same as dividing their
costs by scale, so every pair of the run is solved in one batched call with `reg` meaning
the same blur everywhere.

Uncertainty: bootstrap replicates resample the n tokens with replacement (the same draw for
every cloud, so pairs still compare the same tokens) and give percentile intervals of the
step curves. The permutation baseline is the drift between two random halves of one
checkpoint's cloud: the n drift tokens pooled with up to n further probe tokens, split at
random into two disjoint halves (n each when the probe has 2n tokens or more), in the
layer's basis and scale. It is the drift two token samples of one and the same
distribution show, the resolution of an n-token cloud when different tokens are
compared: a step's drift below it is a change smaller than the spread between two
samples of one checkpoint. Its 95th percentile over the splits of both checkpoints of a
step is the level a step is compared with, and the share of those splits reaching the
step's drift its p-value. (Step drift compares the *same* tokens, so it is 0 without
change; the baseline is therefore a conservative yardstick of size. Whether a change is
certain at all is the bootstrap's question: `services.ot.phases`, `clears_background`.)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from services.ot import pairwise
from services.ot.clouds import fit_basis
from services.ot.cost import cost_scale
from services.ot.options import SolverOptions

#: Percentile interval of the bootstrap and quantile of the permutation baseline.
CI_LEVEL = 0.95
BASELINE_QUANTILE = 0.95


@dataclass(frozen=True)
class DriftSettings:
    """The `ot` spec section as the computation needs it."""

    method: pairwise.Method
    reg: float
    pca_components: int | None
    bootstrap: int
    permutations: int
    n_projections: int
    seed: int
    options: SolverOptions
    #: Relative accuracy of every sinkhorn value (see `pairwise.pairwise_drift`).
    rtol: float


@dataclass
class SolveStats:
    """How the OT problems behind all values of a run ended, summed over every solver call.

    One unit throughout: OT problems (a sinkhorn value is three: OT(p, q) and two
    self-terms, shared between values), the unit `total_problems` and the progress count.
    """

    problems: int = 0
    #: Still above ot.tol after the float64 polish: their values are approximate.
    unconverged: int = 0
    #: Polished in float64 (Sinkhorn left them above tol, or a value needed more accuracy).
    polished: int = 0
    #: Largest estimated error of a value relative to max(|value|, pairwise.VALUE_FLOOR).
    max_relative_error: float = 0.0

    def add(self, result: pairwise.DriftResult) -> None:
        self.problems += result.problems
        self.unconverged += result.unconverged_problems
        self.polished += result.polished_problems
        if len(result.values):  # a NaN value counts as an infinite error, never as none
            worst = float(torch.nan_to_num(result.relative_error(), nan=math.inf).max())
            self.max_relative_error = max(self.max_relative_error, worst)


@dataclass(frozen=True)
class DriftMatrices:
    """Everything `ot/drift.safetensors` holds; time-axis parts are None with one checkpoint."""

    steps: list[int]
    depth: Tensor
    scale_depth: Tensor
    explained_depth: Tensor
    time: Tensor | None
    step: Tensor | None
    scale_time: Tensor | None
    explained_time: Tensor | None
    #: [2, L+1, T-1] and [2, T-1]: lower and upper bootstrap bounds (None without bootstrap).
    step_ci: Tensor | None
    step_mean_ci: Tensor | None
    #: [L+1, T, P]: drift between two random halves of each cloud (None without
    #: permutations); split p is the same token split in every layer and checkpoint, so
    #: `null.mean(0)` is the baseline of the mean curve.
    null: Tensor | None
    stats: SolveStats

    @property
    def step_mean(self) -> Tensor | None:
        return None if self.step is None else self.step.mean(0)

    def baseline(self) -> tuple[Tensor, Tensor] | None:
        """Noise level per step, [L+1, T-1], and of the mean curve, [T-1]."""
        if self.null is None:
            return None
        per_layer = torch.quantile(_pooled(self.null), BASELINE_QUANTILE, dim=-1)
        mean_curve = torch.quantile(_pooled(self.null.mean(0)), BASELINE_QUANTILE, dim=-1)
        return per_layer, mean_curve

    def tensors(self) -> dict[str, Tensor]:
        out = {
            "steps": torch.tensor(self.steps, dtype=torch.int64),
            "depth": self.depth,
            "scale_depth": self.scale_depth,
            "explained_depth": self.explained_depth,
        }
        optional = {
            "time": self.time,
            "step": self.step,
            "step_mean": self.step_mean,
            "scale_time": self.scale_time,
            "explained_time": self.explained_time,
            "step_ci": self.step_ci,
            "step_mean_ci": self.step_mean_ci,
            "null": self.null,
        }
        out.update({k: v for k, v in optional.items() if v is not None})
        base = self.baseline()
        if base is not None:
            out["baseline"], out["baseline_mean"] = base
        return out


def _pooled(null: Tensor) -> Tensor:
    """[..., T, P] split drifts per checkpoint -> [..., T-1, 2P]: both checkpoints of a step."""
    return torch.cat([null[..., :-1, :], null[..., 1:, :]], dim=-1)


def p_values(observed: Tensor, null: Tensor) -> Tensor:
    """Per step: (1 + splits of either checkpoint at least as large) / (1 + splits).

    `observed` is [..., T-1] step drift, `null` [..., T, P] split drifts per checkpoint.
    """
    pooled = _pooled(null)
    return (1.0 + (pooled >= observed[..., None]).sum(-1)) / (1.0 + pooled.shape[-1])


def total_problems(n_checkpoints: int, n_layers: int, settings: DriftSettings) -> int:
    """OT problems `compute_drift` solves: the total its progress callback counts up to."""
    t, n_l = n_checkpoints, n_layers
    plan = depth_time_pairs(t, n_l)
    total = pairwise.problem_count(_offset_time_pairs(plan.pairs, t, n_l), settings.method)
    if t >= 2:
        total += settings.bootstrap * pairwise.problem_count(_step_pairs(t, n_l), settings.method)
        total += settings.permutations * pairwise.problem_count(
            _split_pairs(t * n_l), settings.method
        )
    return total


def compute_drift(
    steps: list[int],
    states: Tensor,
    settings: DriftSettings,
    on_solved: Callable[[int], None] | None = None,
    extra: Tensor | None = None,
) -> DriftMatrices:
    """All drift of a run from its clouds `states[T, L+1, n, d]` (see the module docstring).

    `extra[T, L+1, m, d]` are further tokens for the permutation baseline's pool.
    """
    n_t, n_l = states.shape[0], states.shape[1]
    options: SolverOptions = {**settings.options, "on_solved": on_solved}

    def solve(
        clouds: list[Tensor], pairs: list[tuple[int, int]], warm: list[int | None] | None
    ) -> pairwise.DriftResult:
        return pairwise.pairwise_drift(
            clouds,
            pairs,
            settings.method,
            settings.reg,
            scale=1.0,
            warm_from=warm,
            n_projections=settings.n_projections,
            seed=settings.seed,
            rtol=settings.rtol,
            **options,
        )

    depth_clouds, scale_depth, explained_depth = _normalised_groups(
        [states[t] for t in range(n_t)], None, settings.pca_components
    )
    clouds = [c for group in depth_clouds for c in group.unbind(0)]
    time_block: Tensor | None = None
    extra_block = torch.empty(0)
    scale_time = explained_time = None
    if n_t >= 2:
        extras = [None if extra is None else extra[:, layer] for layer in range(n_l)]
        per_layer, scale_time, explained_time = _normalised_groups(
            [states[:, layer] for layer in range(n_l)], extras, settings.pca_components
        )
        time_block = torch.stack([c[:, : states.shape[2]] for c in per_layer], dim=1)
        extra_block = torch.stack([c[:, states.shape[2] :] for c in per_layer], dim=1)
        clouds += list(time_block.flatten(0, 1).unbind(0))

    plan = depth_time_pairs(n_t, n_l)
    pairs = _offset_time_pairs(plan.pairs, n_t, n_l)
    result = solve(clouds, pairs, plan.warm_from)
    stats = SolveStats()
    stats.add(result)

    depth = torch.zeros(n_t, n_l, n_l, dtype=torch.float64)
    time = torch.zeros(n_l, n_t, n_t, dtype=torch.float64) if n_t >= 2 else None
    n_depth = n_t * n_l * (n_l - 1) // 2
    for k, (p, q) in enumerate(plan.pairs):
        value = float(result.values[k])
        if k < n_depth:
            t, i, j = p // n_l, p % n_l, q % n_l
            depth[t, i, j] = depth[t, j, i] = value
        else:
            assert time is not None
            layer, s, t = p % n_l, p // n_l, q // n_l
            time[layer, s, t] = time[layer, t, s] = value
    if time is None or time_block is None:
        return DriftMatrices(
            steps, depth, scale_depth, explained_depth, None, None, None, None, None, None,
            None, stats,
        )  # fmt: skip

    step = torch.stack([time[:, t, t + 1] for t in range(n_t - 1)], dim=1)
    gen = torch.Generator().manual_seed(settings.seed + 1)
    step_ci = step_mean_ci = None
    step_pairs, step_warm = _step_pairs(n_t, n_l), _step_warm(n_t, n_l)
    if settings.bootstrap:
        reps = []
        for _ in range(settings.bootstrap):
            idx = torch.randint(time_block.shape[2], (time_block.shape[2],), generator=gen)
            boot = list(time_block[:, :, idx].flatten(0, 1).unbind(0))
            res = solve(boot, step_pairs, step_warm)
            stats.add(res)
            reps.append(res.values.reshape(n_t - 1, n_l).T)
        stacked = torch.stack(reps)  # [B, L+1, T-1]
        alpha = (1.0 - CI_LEVEL) / 2
        levels = torch.tensor([alpha, 1.0 - alpha], dtype=torch.float64)
        step_ci = torch.quantile(stacked, levels, dim=0)
        step_mean_ci = torch.quantile(stacked.mean(1), levels, dim=0)
    null = None
    if settings.permutations:
        pool = torch.cat([time_block, extra_block], dim=2).flatten(0, 1)  # [T * (L+1), m, k]
        half = pool.shape[1] // 2
        splits = []
        for _ in range(settings.permutations):
            perm = torch.randperm(pool.shape[1], generator=gen)
            halves = [pool[:, perm[:half]], pool[:, perm[half : 2 * half]]]
            res = solve(list(torch.cat(halves).unbind(0)), _split_pairs(pool.shape[0]), None)
            stats.add(res)
            splits.append(res.values.reshape(n_t, n_l).T)
        null = torch.stack(splits, dim=2)  # [L+1, T, P]
    return DriftMatrices(
        steps, depth, scale_depth, explained_depth, time, step, scale_time, explained_time,
        step_ci, step_mean_ci, null, stats,
    )  # fmt: skip


def _normalised_groups(
    groups: list[Tensor], extras: list[Tensor | None] | None, components: int | None
) -> tuple[list[Tensor], Tensor, Tensor]:
    """Each group [G, n, d] on its own PCA basis, divided by sqrt(its scale).

    The basis and scale are fit on the group alone; its extra points [G, m, d], if any,
    are projected and scaled alike and returned after the group's, as [G, n + m, k].
    """
    out, scales, kept = [], [], []
    for k, group in enumerate(groups):
        basis = fit_basis(group, components)
        projected = basis.apply(group)
        scale = cost_scale(projected)
        more = extras[k] if extras is not None else None
        if more is not None:
            projected = torch.cat([projected, basis.apply(more)], dim=1)
        out.append(projected / math.sqrt(scale))
        scales.append(scale)
        kept.append(basis.explained)
    return out, torch.tensor(scales, dtype=torch.float64), torch.tensor(kept, dtype=torch.float64)


@dataclass(frozen=True)
class PairPlan:
    """Pairs of cloud indices and, per pair, an earlier pair to warm-start from (or None)."""

    pairs: list[tuple[int, int]]
    warm_from: list[int | None]


def depth_time_pairs(n_checkpoints: int, n_layers: int) -> PairPlan:
    """The drift pairs of a run, over clouds indexed ``t * n_layers + layer``.

    Depth pairs: at each checkpoint, every layer pair i < j. Time pairs: for each layer,
    every checkpoint pair s < t. Each pair warm-starts from its nearest earlier neighbour
    (the same layers one checkpoint before; for time pairs (s, t-1), or (s-1, s) for
    consecutive ones), which is close because consecutive checkpoints are.
    """
    n_t, n_l = n_checkpoints, n_layers
    pairs: list[tuple[int, int]] = []
    warm: list[int | None] = []
    index: dict[tuple[str, int, int, int], int] = {}

    def add(key: tuple[str, int, int, int], pair: tuple[int, int], src: int | None) -> None:
        index[key] = len(pairs)
        pairs.append(pair)
        warm.append(src)

    for t in range(n_t):
        for i in range(n_l):
            for j in range(i + 1, n_l):
                add(("d", t, i, j), (t * n_l + i, t * n_l + j), index.get(("d", t - 1, i, j)))
    for layer in range(n_l):
        for s in range(n_t):
            for t in range(s + 1, n_t):
                src = ("t", layer, s, t - 1) if t - 1 > s else ("t", layer, s - 1, s)
                add(("t", layer, s, t), (s * n_l + layer, t * n_l + layer), index.get(src))
    return PairPlan(pairs, warm)


def _offset_time_pairs(pairs: list[tuple[int, int]], n_t: int, n_l: int) -> list[tuple[int, int]]:
    """depth_time_pairs indexes both blocks t * (L+1) + l; time clouds sit after depth's."""
    n_depth = n_t * n_l * (n_l - 1) // 2
    shift = n_t * n_l
    return [pq if k < n_depth else (pq[0] + shift, pq[1] + shift) for k, pq in enumerate(pairs)]


def _step_pairs(n_t: int, n_l: int) -> list[tuple[int, int]]:
    """Consecutive checkpoints of every layer, ordered (t, layer)."""
    return [
        (t * n_l + layer, (t + 1) * n_l + layer) for t in range(n_t - 1) for layer in range(n_l)
    ]


def _step_warm(n_t: int, n_l: int) -> list[int | None]:
    """Each step pair warm-starts from the same layer's previous step."""
    return [
        None if t == 0 else (t - 1) * n_l + layer for t in range(n_t - 1) for layer in range(n_l)
    ]


def _split_pairs(n_clouds: int) -> list[tuple[int, int]]:
    """First halves are clouds 0..K-1, second halves K..2K-1."""
    return [(k, n_clouds + k) for k in range(n_clouds)]
