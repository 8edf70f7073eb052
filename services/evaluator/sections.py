"""Everything the report says about one run, gathered section by section from the store.

Training is required (the stage's input); every other part is optional. A part whose stage
has not run, or could not be analysed, becomes an entry of `absent` that says why and what
to run, so a partial report is still a correct one.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from services.evaluator import agreement
from services.evaluator.detection import evaluate_detection
from services.evaluator.explorer import explore
from services.evaluator.phase_figure import PhaseSeries, phases_png
from services.evaluator.quality import STAGE, hmm_checks, stale_checks
from shared import layout, stage_registry
from shared.errors import DriftlabError
from shared.quality import QualityCheck, run_checks, summary, worst_first
from shared.spec import RunSpec, model_sizes, spec_to_yaml
from shared.steps import complete_steps, eval_metrics
from shared.store import Store

OT_PLOTS = ("depth", "time", "step", "drift_vs_eval")


@dataclass
class Report:
    """report.json's numbers, the figures (PNG bytes / SVG text) and what is absent."""

    run_id: str
    data: dict[str, Any] = field(default_factory=dict)
    figures: dict[str, bytes] = field(default_factory=dict)
    svgs: dict[str, str] = field(default_factory=dict)
    absent: dict[str, str] = field(default_factory=dict)
    #: The fully resolved spec as YAML (`spec_to_yaml`): every value, defaults included.
    spec_yaml: str = ""
    #: The evaluator's own verdicts (the HMM's); `data["quality"]` holds every stage's.
    own_checks: list[QualityCheck] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"format": 1, "run_id": self.run_id, **self.data, "absent": self.absent}


def _png(draw: Callable[[Any], None], size: tuple[float, float] = (6.0, 3.6)) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size, dpi=100)
    draw(ax)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def spec_summary(spec: RunSpec) -> dict[str, Any]:
    """The settings one compares runs by (`driftlab compare` reads them); every other value
    is in the page's resolved spec (`Report.spec_yaml`)."""
    sizes = model_sizes(spec)
    return {
        "name": spec.run.name,
        "seed": spec.run.seed,
        "tags": dict(spec.run.tags),
        "model": {"arch": spec.model.arch, "init": spec.model.init, **sizes._asdict()},
        "data": {"dataset": spec.data.dataset, "tokenizer": spec.data.tokenizer},
        "train": {
            "steps": spec.train.steps,
            "batch_size": spec.train.batch_size,
            "learning_rate": spec.train.learning_rate,
            "weight_decay": spec.train.weight_decay,
        },
        "custom": spec.custom,
    }


def training(report: Report, store: Store, run_id: str) -> list[int]:
    """Loss curve and per-checkpoint eval metrics; returns the checkpoint steps."""
    rows = store.get_jsonl(layout.train_metrics_key(run_id), missing_ok=True)
    checkpoints = complete_steps(store, run_id)
    evals = eval_metrics(store, run_id, checkpoints)
    names = sorted({k for e in evals.values() for k, v in e.items() if isinstance(v, float)})
    series = {n: [evals[s].get(n) for s in checkpoints] for n in names}
    logged = [r for r in rows if isinstance(r.get("loss"), int | float)]
    report.data["training"] = {
        "checkpoints": checkpoints,
        "final_loss": rows[-1]["loss"] if rows else None,
        "loss_spikes": agreement.loss_spikes(
            [r["step"] for r in logged], [float(r["loss"]) for r in logged]
        )
        if logged
        else None,
        "eval": series,
        "final_eval": {n: v[-1] for n, v in series.items()},
        "log_rows": len(rows),
    }

    def draw(ax: Any) -> None:
        if rows:
            ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train loss")
        if "eval_loss" in series:
            ax.plot(checkpoints, series["eval_loss"], "o-", label="eval loss")
        ax.set(xlabel="step", ylabel="loss")
        if "eval_accuracy" in series:
            twin = ax.twinx()
            twin.plot(
                checkpoints, series["eval_accuracy"], "s--", color="C3", label="eval accuracy"
            )
            twin.set(ylabel="eval accuracy", ylim=(-0.02, 1.02))
            # One legend for both axes: a twin axis's lines are not in ax.legend() otherwise.
            lines, labels = ax.get_legend_handles_labels()
            twin_lines, twin_labels = twin.get_legend_handles_labels()
            ax.legend(lines + twin_lines, labels + twin_labels, loc="center right", fontsize=8)
        else:
            ax.legend(loc="upper right", fontsize=8)

    report.figures["training"] = _png(draw)
    return checkpoints


def dynamics(report: Report, store: Store, run_id: str, spec: RunSpec) -> None:
    rows = store.get_jsonl(layout.train_dynamics_key(run_id), missing_ok=True)
    if not rows:
        report.absent["dynamics"] = (
            f"train/dynamics.jsonl is empty or missing (train.dynamics_every); rerun "
            f"`{stage_registry.TRAIN.command(run_id, store.url)} --force`"
        )
        return
    features = [f for f in spec.hmm.features if any(f in r for r in rows)]
    steps = [r["step"] for r in rows]
    report.data["dynamics"] = {
        "steps": steps,
        "features": {f: [r.get(f) for r in rows] for f in features},
        # mean Frobenius norm of the blocks' matrices: the phase figure's weight norm
        "weight_norm": [r.get("l2") for r in rows],
    }

    def draw(ax: Any) -> None:
        for f in features:
            values = [r.get(f) for r in rows]
            top = max((abs(v) for v in values if v is not None), default=1.0) or 1.0
            ax.plot(steps, [None if v is None else v / top for v in values], label=f)
        ax.set(xlabel="step", ylabel="value / max |value|")
        ax.legend(fontsize=6, ncol=2)

    report.figures["dynamics"] = _png(draw, (6.0, 4.0))


def drift(report: Report, store: Store, run_id: str) -> dict[str, Any] | None:
    if not store.exists(layout.ot_done_key(run_id)):
        report.absent["drift"] = (
            f"the OT stage has not run: `{stage_registry.OT.command(run_id, store.url)}`"
        )
        return None
    phases = store.get_json(layout.ot_phases_key(run_id))
    mean = phases.get("curves", {}).get("mean", {})
    report.data["drift"] = {
        "depth_only": phases.get("depth_only", False),
        "note": phases.get("note"),
        "change_points": mean.get("change_points", []),
        "transitions": mean.get("transitions", []),
        "step_drift_mean": mean.get("values"),
        "alignment": phases.get("alignment", []),
    }
    for name in OT_PLOTS:
        key = layout.ot_plot_key(run_id, name)
        if store.exists(key):
            report.figures[f"ot_{name}"] = store.get_bytes(key)
    return dict(phases)


def sae(report: Report, store: Store, run_id: str, n_layer: int) -> None:
    layers = {}
    for layer in range(n_layer + 1):
        if store.exists(layout.sae_done_key(run_id, layer)):
            body = store.get_json(layout.sae_config_key(run_id, layer))
            metrics = body.get("metrics", {})
            layers[str(layer)] = {
                "arch": body.get("config", {}).get("arch"),
                "d_sae": body.get("config", {}).get("d_sae"),
                "relative_depth": layer / max(n_layer, 1),
                **{k: v for k, v in metrics.items() if isinstance(v, int | float)},
                "ce_loss_recovered": metrics.get("ce", {}).get("ce_loss_recovered"),
            }
    if not layers:
        report.absent["sae"] = (
            f"no SAE has been trained: `{stage_registry.SAE.command(run_id, store.url)}`"
        )
        return
    report.data["sae"] = {"layers": layers}


def detection(report: Report, store: Store, run_id: str, spec: RunSpec) -> None:
    if not store.exists(layout.detect_done_key(run_id)):
        command = f"`{stage_registry.DETECT.command(run_id, store.url)}`"
        report.absent["detection"] = (
            f"detection is off in this run's spec (detect.enabled: false); {command} runs it"
            if not spec.detect.enabled
            else f"the detect stage has not run: {command}"
        )
        return
    section, figures = evaluate_detection(store, run_id, spec.evaluate)
    report.data["detection"] = section
    report.figures.update(figures)


def hmm(report: Report, store: Store, run_id: str, spec: RunSpec) -> dict[str, list[int]] | None:
    """The HMM of this run's training dynamics; its state changes, or None when absent.

    The model is the one `driftlab hmm` fitted to this run with others (a sweep's seeds)
    when there is one, else a fit of this run alone.
    """
    try:
        from services.evaluator import hmm as hmm_module
        from services.evaluator import hmm_plots, hmm_store
    except ModuleNotFoundError as err:
        if err.name not in ("services.evaluator.hmm", "services.evaluator.hmm_store"):
            raise
        report.absent["hmm"] = "the HMM analysis (services/evaluator/hmm.py) is not installed"
        return None
    ensemble = hmm_store.load_ensemble(store, run_id)
    if ensemble is not None:
        body, svg, png = ensemble
        report.data["hmm"] = {**body, "ensemble_of": sorted(body["runs"])}
        report.data["hmm"]["transitions"] = readable_transitions(body)
        report.svgs["hmm_graph"] = svg
        report.figures["hmm_curves"] = png
        ensemble_changes: dict[str, list[int]] = body.get("state_changes", {})
        return ensemble_changes
    try:
        analysis = hmm_module.run_hmm(store, [run_id], spec.hmm)
    except DriftlabError as err:
        report.absent["hmm"] = f"the HMM could not be fitted: {err}"
        return None
    body = analysis.to_json()
    report.data["hmm"] = {**body, "transitions": readable_transitions(body)}
    report.data["hmm"]["saved"] = hmm_store.save_hmm(store, run_id, analysis)
    report.svgs["hmm_graph"] = hmm_plots.state_graph_svg(analysis)
    report.figures["hmm_curves"] = hmm_plots.state_curves_png(analysis, store)
    changes: dict[str, list[int]] = body.get("state_changes", {})
    return changes


def readable_transitions(body: dict[str, Any]) -> list[dict[str, Any]]:
    """Each transition's top features as {name, importance, mean_shift}.

    `top_features` already leaves out importances that are numerically zero (a saturated
    posterior); the mean shift is the target state's mean minus the source's, in the
    z-scored units the HMM was fitted in, so a reader sees which way each feature moved.
    """
    index = {name: i for i, name in enumerate(body.get("features", []))}
    means = body.get("means", [])
    rows = []
    for transition in body.get("transitions", []):
        source, target = transition["from"], transition["to"]
        features = [
            {
                "name": name,
                "importance": importance,
                "mean_shift": means[target][index[name]] - means[source][index[name]]
                if name in index and means
                else None,
            }
            for name, importance in transition.get("top_features", [])
        ]
        rows.append({**transition, "top_features": features})
    return rows


def phases(
    report: Report,
    spec: RunSpec,
    checkpoints: list[int],
    hmm_changes: dict[str, list[int]] | None,
    ot_phases: dict[str, Any] | None,
) -> None:
    accuracy = report.data["training"]["eval"].get("eval_accuracy")
    spikes = report.data["training"]["loss_spikes"]
    sources = {
        "hmm": None if hmm_changes is None else hmm_changes.get(report.run_id, []),
        "ot": None if ot_phases is None else agreement.ot_change_points(ot_phases),
        "accuracy": None
        if accuracy is None or any(v is None for v in accuracy)
        else agreement.accuracy_jumps(checkpoints, accuracy),
        "loss_spikes": None
        if spikes is None
        else agreement.spike_checkpoints(checkpoints, [spike["step"] for spike in spikes]),
    }
    why = {
        "hmm": report.absent.get("hmm"),
        "ot": report.absent.get("drift"),
        "accuracy": "the checkpoints have no eval_accuracy (the task has no answers)",
        "loss_spikes": "train/metrics.jsonl has no logged loss",
    }
    section = agreement.phase_agreement(checkpoints, sources, spec.evaluate.phase_tolerance)
    section["absent_because"] = {name: why[name] for name in section["absent"]}
    significant = None if ot_phases is None else agreement.significant_ot_change_points(ot_phases)
    section["ot_significant"] = significant
    if sources["accuracy"] is not None:
        section["crossing"] = agreement.crossing(
            checkpoints,
            accuracy,
            {
                "ot_significant": None
                if significant is None
                else [point["step"] for point in significant],
                "hmm": sources["hmm"],
                "loss_spikes": sources["loss_spikes"],
            },
        )
    report.data["phases"] = section
    report.figures["phases"] = phases_png(
        _phase_series(report, checkpoints, accuracy, ot_phases, significant or [])
    )


def _phase_series(
    report: Report,
    checkpoints: list[int],
    accuracy: list[float | None] | None,
    ot_phases: dict[str, Any] | None,
    significant: list[dict[str, Any]],
) -> PhaseSeries:
    """Accuracy, the mean drift curve and this run's HMM path, as the phase figure wants.

    The OT lines are the mean curve's change points and every curve's significant ones;
    a line is solid when some curve's change there exceeds that curve's baseline.
    """
    mean = (ot_phases or {}).get("curves", {}).get("mean", {})
    path = report.data.get("hmm", {}).get("runs", {}).get(report.run_id, {})
    dynamics = report.data.get("dynamics", {})
    solid = {point["step"] for point in significant}
    dotted = {int(c["step"]) for c in mean.get("change_points", [])} - solid
    return PhaseSeries(
        checkpoints=checkpoints,
        accuracy=accuracy,
        drift=mean.get("values"),
        baseline=mean.get("baseline"),
        ot_points=sorted([(step, True) for step in solid] + [(step, False) for step in dotted]),
        hmm_steps=path.get("steps", []),
        hmm_states=path.get("states", []),
        crossing=report.data["phases"].get("crossing", {}).get("step"),
        loss_spikes=report.data["phases"]["sources"].get("loss_spikes", []),
        norm_steps=dynamics.get("steps", []),
        weight_norm=dynamics.get("weight_norm", []),
    )


def explorer(report: Report, store: Store, run_id: str, spec: RunSpec, device: str) -> None:
    section = explore(store, run_id, spec, device)
    if "absent" in section:
        report.absent["explorer"] = section["absent"]
        return
    report.data["explorer"] = section


def build(store: Store, run_id: str, spec: RunSpec, device: str = "cpu") -> Report:
    report = Report(run_id)
    report.data["spec"] = spec_summary(spec)
    report.spec_yaml = spec_to_yaml(spec)
    checkpoints = training(report, store, run_id)
    dynamics(report, store, run_id, spec)
    ot_phases = drift(report, store, run_id)
    sae(report, store, run_id, model_sizes(spec).n_layer)
    detection(report, store, run_id, spec)
    hmm_changes = hmm(report, store, run_id, spec)
    phases(report, spec, checkpoints, hmm_changes, ot_phases)
    explorer(report, store, run_id, spec, device)
    quality(report, store, run_id)
    return report


def quality(report: Report, store: Store, run_id: str) -> None:
    """Every stage's verdicts and the evaluator's own, worst first, with their counts."""
    report.own_checks = [*hmm_checks(report.data.get("hmm")), *stale_checks(store, run_id)]
    checks = worst_first([*run_checks(store, run_id, exclude=[STAGE]), *report.own_checks])
    report.data["quality"] = [c.to_json() for c in checks]
    report.data["quality_summary"] = summary(checks)
