"""The OT stage's work: read the clouds, compute drift, find phases, write and plot them.

Outputs (keys from `shared.layout`): `ot/drift.safetensors` (matrices, steps, scales,
bootstrap bounds, permutation null; settings in its metadata), `ot/phases.json` and PNG
figures `ot/depth.png`, `ot/time.png`, `ot/step.png`, `ot/drift_vs_eval.png`. A run with
one checkpoint (analysis-only) has depth drift only, and phases.json says so.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import torch

from services.ot import phases, plots
from services.ot.clouds import HiddenClouds, load_clouds
from services.ot.drift import (
    BASELINE_QUANTILE,
    CI_LEVEL,
    DriftMatrices,
    DriftSettings,
    SolveStats,
    compute_drift,
    p_values,
    total_problems,
)
from shared import layout
from shared.quality import QualityCheck, at_least, at_most, judged
from shared.spec import OTSpec
from shared.stage import StageContext, resolve_device
from shared.steps import eval_metrics, selected_steps
from shared.store import Store
from shared.telemetry import Progress

PHASES_FORMAT = 2
DEPTH_ONLY_NOTE = (
    "analysis-only run: one checkpoint (step {step}), so only depth drift (between layers) "
    "is computed; time and step drift, change points and the eval alignment need at least "
    "two checkpoints"
)


def run_ot(ctx: StageContext) -> None:
    ot = ctx.spec.ot
    steps = selected_steps(ctx.store, ctx.run_id, ctx.spec, ctx.args.store)
    clouds = load_clouds(ctx.store, ctx.run_id, steps, ot.n_points, ot.seed)
    settings = _settings(ot, ctx.device if ctx.args.device != "auto" else resolve_device(ot.device))
    n_t, n_l = len(steps), clouds.n_layers
    ctx.log.info(
        "%d checkpoints x %d layers, %d tokens per cloud, %s reg=%g%s",
        n_t, n_l, len(clouds.token_index), ot.method, ot.reg,
        "" if n_t >= 2 else " (one checkpoint: depth drift only)",
    )  # fmt: skip
    total = total_problems(n_t, n_l, settings)
    with ctx.progress(total, unit="problems", desc="OT problems") as prog:

        def solved(n: int) -> None:
            prog.update(n)
            prog.inc("driftlab_ot_pairs_done_total", n)

        drift = compute_drift(steps, clouds.states, settings, solved, clouds.extra)
        report = _phases(ctx.store, ctx.run_id, ot, drift)
        _push_change_points(prog, report)
    stats = drift.stats
    ctx.log.info(
        "%d of %d OT problems polished in float64; largest estimated relative error %.2g",
        stats.polished, stats.problems, stats.max_relative_error,
    )  # fmt: skip
    ctx.judge(*quality_checks(stats), *transition_checks(report))
    ctx.store.put_tensors(
        layout.ot_drift_key(ctx.run_id),
        {k: v.contiguous() for k, v in drift.tensors().items()}
        | {"token_index": clouds.token_index, "extra_index": clouds.extra_index},
        metadata=_metadata(ot, clouds),
    )
    _plot(ctx.store, ctx.run_id, drift, report)
    ctx.store.put_json(layout.ot_phases_key(ctx.run_id), report)
    mean = report.get("curves", {}).get("mean")
    ctx.headline.update(
        checkpoints=n_t,
        layers=n_l,
        problems=stats.problems,
        unconverged_problems=stats.unconverged,
        polished_problems=stats.polished,
        max_relative_error=stats.max_relative_error,
        depth_only=n_t < 2,
        transitions=[t["step"] for t in mean["transitions"]] if mean else [],
    )


def _push_change_points(prog: Progress, report: dict[str, Any]) -> None:
    """The mean step-drift curve's change points, for the dashboard's stat and annotations;
    set on the stage's progress so its final push carries them with the end time."""
    mean = report.get("curves", {}).get("mean")
    change_points = mean["change_points"] if mean else []
    prog.set("driftlab_ot_change_points", len(change_points))
    for cp in change_points:
        prog.set("driftlab_ot_change_point_magnitude", cp["magnitude"], step=cp["step"])


def quality_checks(stats: SolveStats) -> list[QualityCheck]:
    """The OT stage's verdicts on its own values (see `shared.quality`).

    * ``unconverged_share``: OT problems still above ot.tol after the float64 polish, of
      all problems (one unit: the progress count). Their values are approximate; one warns,
      5% fails.
    * ``value_error``: the largest estimated error of a drift value relative to the value
      (`pairwise.DriftResult.relative_error`), from the marginal errors the solves stopped
      at; above 1e-3 (0.1%) warns, 1e-2 fails.
    """
    share = stats.unconverged / stats.problems if stats.problems else 0.0
    return [
        at_most(
            "ot", "unconverged_share", share,
            what="share of OT problems still above ot.tol after the float64 polish",
            fix="raise ot.max_iter or ot.reg, or loosen ot.tol",
            warn=1.0 / max(stats.problems, 1), fail=0.05,
        ),
        at_most(
            "ot", "value_error", stats.max_relative_error,
            what="largest estimated relative error of a drift value",
            fix="lower ot.rtol (values above it are polished in float64) or ot.tol",
            warn=1e-3, fail=1e-2,
        ),
    ]  # fmt: skip


def transition_checks(report: Mapping[str, Any]) -> list[QualityCheck]:
    """The verdict on whether the mean step-drift curve's transitions are more than noise.

    ``transitions_resolved``: the share of its transitions that stand clear of the curve's
    typical level under token resampling (`clears_background`, see `services.ot.phases`).
    One that does not may be a wiggle of which tokens were sampled; when most are, the list
    of phases (the headline, the report, the dashboard's annotations) shows mostly noise,
    although every value is computed right. Under half warns. No transitions is ok (nothing
    is claimed); without bootstrap intervals (``ot.bootstrap: 0``) nothing tells them from
    noise, which warns. A depth-only run has no curve and no check. (The permutation
    baseline answers another question, how large a change is, and is no verdict: a
    grokking model's slingshots move it by 3-40% of the split-half drift, certainly.)
    """
    mean = report.get("curves", {}).get("mean")
    if mean is None:
        return []
    transitions = mean["transitions"]
    if not transitions:
        return [judged("ot", "transitions_resolved", None, 0.5, "ok",
                       "the mean drift curve has no transitions to judge")]  # fmt: skip
    clear = [t["clears_background"] for t in transitions]
    if None in clear:
        return [judged(
            "ot", "transitions_resolved", None, 0.5, "warn",
            f"{len(clear)} transitions were not compared with token-sampling noise (no "
            "bootstrap intervals); set ot.bootstrap (e.g. 20)",
        )]  # fmt: skip
    return [at_least(
        "ot", "transitions_resolved", sum(clear) / len(clear),
        what="share of the mean drift curve's transitions clear of its typical level under "
        f"token resampling ({sum(clear)} of {len(clear)})",
        fix="the others may be token-sampling noise (clears_background false in "
        "ot/phases.json): raise ot.n_points, or ot.change_penalty for fewer change points",
        warn=0.5,
    )]  # fmt: skip


def _settings(ot: OTSpec, device: str) -> DriftSettings:
    return DriftSettings(
        method=ot.method,
        reg=ot.reg,
        pca_components=ot.pca_components,
        bootstrap=ot.bootstrap,
        permutations=ot.permutations,
        n_projections=ot.n_projections,
        seed=ot.seed,
        rtol=ot.rtol,
        options={
            "tol": ot.tol,
            "max_iter": ot.max_iter,
            "eps_scaling": 0.5 if ot.scaling else None,
            "dtype": torch.float64 if ot.dtype == "float64" else torch.float32,
            "device": device,
        },
    )


def _metadata(ot: OTSpec, clouds: HiddenClouds) -> dict[str, str]:
    return {
        "format": "1",
        "method": ot.method,
        "reg": repr(ot.reg),
        "tol": repr(ot.tol),
        "rtol": repr(ot.rtol),
        "max_iter": str(ot.max_iter),
        "dtype": ot.dtype,
        "n_points": str(len(clouds.token_index)),
        "pca_components": json.dumps(ot.pca_components),
        "seed": str(ot.seed),
        "bootstrap": str(ot.bootstrap),
        "permutations": str(ot.permutations),
        "values": "sinkhorn: debiased Sinkhorn divergence; emd: exact OT cost; sliced: "
        "sliced W2^2; all on squared-Euclidean cost divided by the scale of the group",
        "depth_basis": "per checkpoint: PCA fit on all layers of that checkpoint pooled; "
        "cost divided by scale_depth[t]",
        "time_basis": "per layer: PCA fit on all checkpoints of that layer pooled; "
        "cost divided by scale_time[l] (time, step, bootstrap and null)",
        "scale": "mean squared distance between two points of the group's projected "
        "clouds pooled (services.ot.cost.cost_scale)",
    }


def _eval_series(store: Store, run_id: str, steps: list[int]) -> dict[str, list[float | None]]:
    """Numeric eval metrics of each checkpoint (None where a checkpoint lacks one)."""
    per_step = list(eval_metrics(store, run_id, steps).values())
    names = sorted({k for e in per_step for k in e})
    series: dict[str, list[float | None]] = {}
    for name in names:
        values = [e.get(name) for e in per_step]
        series[name] = [
            float(v) if isinstance(v, int | float) and math.isfinite(v) else None for v in values
        ]
    return series


def _phases(store: Store, run_id: str, ot: OTSpec, drift: DriftMatrices) -> dict[str, Any]:
    steps = drift.steps
    report: dict[str, Any] = {
        "format": PHASES_FORMAT,
        "steps": steps,
        "method": ot.method,
        "reg": ot.reg,
        "problems": drift.stats.problems,
        "unconverged_problems": drift.stats.unconverged,
        "polished_problems": drift.stats.polished,
        "max_relative_error": drift.stats.max_relative_error,
    }
    if drift.step is None:
        return report | {"depth_only": True, "note": DEPTH_ONLY_NOTE.format(step=steps[0])}
    step_mean = drift.step_mean
    assert step_mean is not None
    n = len(steps) - 1
    penalty = ot.change_penalty if ot.change_penalty is not None else phases.default_penalty(n)
    report |= {
        "depth_only": False,
        "intervals": "interval i runs from steps[i] to steps[i+1]; items are reported at "
        "its end, steps[i+1], the first checkpoint where the change is visible",
        "change_points": {
            "method": "ruptures PELT, l2 cost, min_size 1, on the curve divided by its noise "
            "sigma (1.4826 MAD of first differences / sqrt 2, at least "
            f"{phases.REL_NOISE_FLOOR:g} x the curve's median)",
            "penalty": penalty,
            "penalty_rule": "ot.change_penalty" if ot.change_penalty is not None
            else "2 ln(n intervals): BIC of a mean shift in noise-variance units",
        },
        "spikes": {
            "method": "modified z-score (x - median) / (1.4826 MAD), MAD term at least "
            f"{phases.REL_NOISE_FLOOR:g} x the curve's median",
            "threshold": phases.SPIKE_Z,
        },
        "bootstrap": {"replicates": ot.bootstrap, "interval": CI_LEVEL} if ot.bootstrap else None,
        "baseline": {
            "method": "drift between two random disjoint halves of one checkpoint's cloud "
            "(the n drift tokens pooled with up to n more probe tokens), pooled over both "
            "checkpoints of a step: the resolution of an n-token cloud",
            "permutations": ot.permutations,
            "quantile": BASELINE_QUANTILE,
        }
        if ot.permutations
        else None,
    }  # fmt: skip
    base = drift.baseline()
    null = drift.null
    # Row 0 is the mean over layers, row 1 + l layer l: the same layout for every input.
    values = torch.cat([step_mean[None], drift.step])
    baselines = None if base is None else torch.cat([base[1][None], base[0]])
    cis = None
    if drift.step_ci is not None and drift.step_mean_ci is not None:
        cis = torch.cat([drift.step_mean_ci[:, None], drift.step_ci], dim=1)
    pvals = None if null is None else p_values(values, torch.cat([null.mean(0)[None], null]))
    names = ["mean"] + [f"layer-{layer:02d}" for layer in range(drift.step.shape[0])]
    curves = {
        name: phases.analyse_curve(
            steps,
            values[k].numpy(),
            baseline=None if baselines is None else baselines[k].numpy(),
            ci=None if cis is None else cis[:, k].numpy(),
            p_values=None if pvals is None else pvals[k].numpy(),
            penalty=ot.change_penalty,
        )
        for k, name in enumerate(names)
    }
    report["curves"] = curves
    metrics = _eval_series(store, run_id, steps)
    jumps = {name: phases.eval_jumps(steps, values) for name, values in metrics.items()}
    report["eval"] = {
        name: {
            "values": values,
            "jumps": jumps[name],
            "lead_lag": phases.lead_lag(step_mean.numpy(), values),
        }
        for name, values in metrics.items()
    }
    report["alignment"] = phases.align(steps, curves["mean"]["transitions"], jumps)
    return report


def _plot(store: Store, run_id: str, drift: DriftMatrices, report: dict[str, Any]) -> None:
    steps = drift.steps
    figures = {"depth": plots.depth_figure(steps, drift.depth.numpy())}
    if drift.time is not None:
        figures["time"] = plots.time_figure(steps, drift.time.numpy())
        figures["step"] = plots.step_figure(steps, report["curves"])
        metrics = {name: item["values"] for name, item in report["eval"].items()}
        figures["drift_vs_eval"] = plots.eval_figure(steps, report["curves"]["mean"], metrics)
    for name, png in figures.items():
        store.put_bytes(layout.ot_plot_key(run_id, name), png)
