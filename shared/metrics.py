"""Every metric driftlab exports, declared once.

Stages set metrics by name through `shared.telemetry`, and the Grafana dashboards are
generated from `METRICS`, so a name cannot drift apart between the code that pushes it
and the panel that plots it: an undeclared name is an error at the call site.

Conventions (https://prometheus.io/docs/practices/naming/), checked at import time:

- `driftlab_<area>_<what>[_<unit>]` in snake case, base units (`_seconds`, `_bytes`,
  `_ratio` for 0..1 fractions);
- counters, and only counters, end in `_total` (promtool lints a gauge named `_total`,
  which is why the expected item count is `driftlab_stage_items_expected`);
- the grouping-key labels (`job`, `run_id`, `stage`, `shard`) are never metric labels:
  the Pushgateway attaches them to every series of a push.

Stage outcome convention: `driftlab_stage_failed` is a 0/1 gauge (like kube-state-metrics'
job status), so `driftlab_stage_failed == 1` is the alert and `sum(...)` counts failed
shards; `driftlab_stage_running` stays 1 in the group of a stage that died without its
final push (OOM kill, node loss), which with the Pushgateway's `push_time_seconds` tells a
stalled stage from a finished one.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

Kind = Literal["gauge", "counter", "histogram"]
Style = Literal["timeseries", "stat", "state-timeline"]
Row = Literal["stages", "training", "extraction", "ot", "sae", "detection"]

# Dashboard rows, top to bottom.
ROWS: tuple[Row, ...] = ("stages", "training", "extraction", "ot", "sae", "detection")

# Labels of the Pushgateway grouping key; `shared.telemetry` sets them, metrics may not.
GROUPING_LABELS = ("job", "run_id", "stage", "shard")
# Labels Prometheus itself gives a meaning to.
_RESERVED_LABELS = frozenset({*GROUPING_LABELS, "instance", "le", "quantile"})

_NAME_RE = re.compile(r"^driftlab_[a-z][a-z0-9]*(_[a-z0-9]+)*$")
_LABEL_RE = re.compile(r"^[a-z][a-z0-9_]*$")
# Prometheus base units a name may end with (before `_total` for counters).
UNITS = ("", "seconds", "bytes", "ratio")


# A 0/1 gauge's states (value i is states[i]): (text, Grafana color).
OUTCOME_STATES = (("ok", "green"), ("failed", "red"))
RUNNING_STATES = (("ended", "blue"), ("running", "green"))
VERDICT_STATES = (("ok", "green"), ("warn", "yellow"), ("fail", "red"))


@dataclass(frozen=True)
class Panel:
    """How the dashboard generator shows a metric.

    `grafana_unit` is a Grafana unit id ("percentunit", "s", "dateTimeAsIso", "short",
    "none", "bytes", ...), kept explicit so the generator needs no name heuristics.
    `style` is the Grafana panel type: "timeseries" for values that move, "stat" for one
    number a stage ends with (a final score, a timestamp), "state-timeline" for states;
    `states` names the values of a state gauge (value i is `states[i]`, text and color).
    `per_second` plots a counter's `rate()` instead of its total: a throughput is never a
    gauge of its own, so it cannot disagree with the count it is derived from.
    `annotation` (a title template over the series' labels) also marks the dashboard's
    time axis with the metric (shared/dashboards.py says how each kind of metric is placed).
    """

    title: str
    row: Row
    grafana_unit: str = "short"
    style: Style = "timeseries"
    states: tuple[tuple[str, str], ...] = ()
    per_second: bool = False
    annotation: str = ""


@dataclass(frozen=True)
class MetricDef:
    """One exported metric: its Prometheus identity plus a dashboard hint.

    `unit` is the Prometheus base unit the name ends with ("" for plain numbers);
    `buckets` are the histogram's upper bounds (histograms only).
    """

    name: str
    kind: Kind
    help: str
    labels: tuple[str, ...]
    unit: str
    panel: Panel
    buckets: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        problems = _problems(self)
        if problems:
            raise ValueError(f"metric {self.name!r} is declared wrongly: {'; '.join(problems)}")


def _problems(m: MetricDef) -> list[str]:
    """What breaks Prometheus or driftlab conventions in one declaration."""
    out = []
    if not _NAME_RE.match(m.name):
        out.append("name must be snake case starting with 'driftlab_'")
    if (m.kind == "counter") != m.name.endswith("_total"):
        out.append("counters, and only counters, end in '_total'")
    base = m.name.removesuffix("_total")
    if m.unit not in UNITS:
        out.append(f"unit must be one of {UNITS}")
    elif m.unit and not base.endswith("_" + m.unit):
        out.append(f"a metric in {m.unit} must end in '_{m.unit}'")
    if not m.help.strip() or "\n" in m.help:
        out.append("help must be one non-empty line")
    for label in m.labels:
        if not _LABEL_RE.match(label) or label in _RESERVED_LABELS:
            out.append(f"label {label!r} is invalid or reserved")
    if len(set(m.labels)) != len(m.labels):
        out.append("labels repeat")
    if (m.kind == "histogram") != bool(m.buckets):
        out.append("histograms, and only histograms, have buckets")
    if list(m.buckets) != sorted(set(m.buckets)):
        out.append("buckets must be strictly increasing")
    if m.panel.row not in ROWS:
        out.append(f"panel row must be one of {ROWS}")
    if m.panel.per_second and m.kind != "counter":
        out.append("only a counter's panel can plot its per-second rate")
    if bool(m.panel.states) != (m.panel.style == "state-timeline"):
        out.append("state-timeline panels, and only they, name their states")
    return out


_LAYER = ("layer",)

METRICS: tuple[MetricDef, ...] = (
    # -- every stage (set by shared.telemetry.progress) ---------------------------------
    MetricDef(
        "driftlab_stage_progress_ratio",
        "gauge",
        "Fraction of the stage's work items done (0..1); absent when the total is unknown.",
        (),
        "ratio",
        Panel("Progress", "stages", "percentunit"),
    ),
    MetricDef(
        "driftlab_stage_items_done_total",
        "counter",
        "Work items (steps, checkpoints, batches, pairs) the stage has finished.",
        (),
        "",
        Panel("Items done", "stages"),
    ),
    MetricDef(
        "driftlab_stage_items_expected",
        "gauge",
        "Work items the stage expects to do in all; absent when unknown.",
        (),
        "",
        Panel("Items expected", "stages"),
    ),
    MetricDef(
        "driftlab_stage_duration_seconds",
        "gauge",
        "Wall-clock seconds since the stage started; the final value once it ended.",
        (),
        "seconds",
        Panel("Duration", "stages", "s"),
    ),
    MetricDef(
        "driftlab_stage_start_timestamp_seconds",
        "gauge",
        "Unix time at which the stage's latest attempt started.",
        (),
        "seconds",
        Panel(
            "Started",
            "stages",
            "dateTimeAsIso",
            "stat",
            annotation="{{stage}} {{shard}} started",
        ),
    ),
    MetricDef(
        "driftlab_stage_end_timestamp_seconds",
        "gauge",
        "Unix time at which the stage's latest attempt ended, successfully or not.",
        (),
        "seconds",
        Panel(
            "Ended",
            "stages",
            "dateTimeAsIso",
            "stat",
            annotation="{{stage}} {{shard}} ended",
        ),
    ),
    MetricDef(
        "driftlab_stage_last_success_timestamp_seconds",
        "gauge",
        "Unix time at which the stage last finished successfully.",
        (),
        "seconds",
        Panel("Last success", "stages", "dateTimeAsIso", "stat"),
    ),
    MetricDef(
        "driftlab_stage_failed",
        "gauge",
        "1 when the stage ended with an error, else 0.",
        (),
        "",
        Panel("Outcome", "stages", "none", "state-timeline", OUTCOME_STATES),
    ),
    MetricDef(
        "driftlab_stage_running",
        "gauge",
        "1 while the stage runs, 0 once it ended; stays 1 if it died without a final push.",
        (),
        "",
        Panel("Running", "stages", "none", "state-timeline", RUNNING_STATES),
    ),
    MetricDef(
        "driftlab_quality_verdict",
        "gauge",
        "A stage's verdict on its own output per check (shared.quality): 0 ok, 1 warn, 2 fail.",
        ("check",),
        "",
        Panel("Quality verdicts", "stages", "none", "state-timeline", VERDICT_STATES),
    ),
    # -- train ---------------------------------------------------------------------------
    MetricDef(
        "driftlab_train_loss",
        "gauge",
        "Training cross-entropy loss (nats per token) at the latest logged step.",
        (),
        "",
        Panel("Train loss", "training", "none"),
    ),
    MetricDef(
        "driftlab_train_eval_loss",
        "gauge",
        "Held-out cross-entropy loss (nats per token) at the latest evaluation.",
        (),
        "",
        Panel("Eval loss", "training", "none"),
    ),
    MetricDef(
        "driftlab_train_eval_accuracy_ratio",
        "gauge",
        "Held-out accuracy (0..1) at the latest evaluation.",
        (),
        "ratio",
        Panel("Eval accuracy", "training", "percentunit"),
    ),
    MetricDef(
        "driftlab_train_learning_rate",
        "gauge",
        "Learning rate the scheduler set for the latest step.",
        (),
        "",
        Panel("Learning rate", "training", "sci"),
    ),
    MetricDef(
        "driftlab_train_grad_norm",
        "gauge",
        "Global L2 norm of the gradient at the latest step, before clipping.",
        (),
        "",
        Panel("Gradient norm", "training", "none"),
    ),
    MetricDef(
        "driftlab_train_tokens_total",
        "counter",
        "Tokens the model has trained on, counting from step 0 across resumes.",
        (),
        "",
        Panel("Train throughput (tokens/s)", "training", per_second=True),
    ),
    MetricDef(
        "driftlab_train_step",
        "gauge",
        "Last optimizer step completed.",
        (),
        "",
        Panel("Step", "training", "none"),
    ),
    MetricDef(
        "driftlab_train_step_duration_seconds",
        "histogram",
        "Wall-clock seconds per optimizer step (data, forward, backward, update).",
        (),
        "seconds",
        Panel("Step duration", "training", "s"),
        buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
    ),
    # -- extract -------------------------------------------------------------------------
    MetricDef(
        "driftlab_extract_tokens_total",
        "counter",
        "Probe tokens run through a checkpoint to record hidden states.",
        (),
        "",
        Panel("Extraction throughput (tokens/s)", "extraction", per_second=True),
    ),
    # -- ot ------------------------------------------------------------------------------
    MetricDef(
        "driftlab_ot_pairs_done_total",
        "counter",
        "Pairs of hidden-state distributions whose OT distance has been computed.",
        (),
        "",
        Panel("OT pairs done", "ot"),
    ),
    MetricDef(
        "driftlab_ot_change_points",
        "gauge",
        "Change points the OT stage found in the mean step-drift curve (0 when none).",
        (),
        "",
        Panel("OT change points", "ot", "none", "stat"),
    ),
    MetricDef(
        "driftlab_ot_change_point_magnitude",
        "gauge",
        "Jump in mean step drift (after minus before) at each change point, by training step.",
        ("step",),
        "",
        Panel(
            "OT change points by step",
            "ot",
            "none",
            "stat",
            annotation="OT change point at step {{step}}",
        ),
    ),
    # -- sae (per layer) -----------------------------------------------------------------
    MetricDef(
        "driftlab_sae_loss",
        "gauge",
        "SAE training loss (reconstruction plus sparsity penalty) at the latest step.",
        _LAYER,
        "",
        Panel("SAE loss", "sae", "none"),
    ),
    MetricDef(
        "driftlab_sae_l0",
        "gauge",
        "Mean number of SAE features active per token.",
        _LAYER,
        "",
        Panel("SAE L0", "sae", "none"),
    ),
    MetricDef(
        "driftlab_sae_dead_features_ratio",
        "gauge",
        "Fraction of SAE features that have not fired within the dead-feature window.",
        _LAYER,
        "ratio",
        Panel("Dead features", "sae", "percentunit", "stat"),
    ),
    MetricDef(
        "driftlab_sae_explained_variance",
        "gauge",
        "1 - residual/total variance of the SAE reconstruction: at most 1, negative when worse than the mean.",
        _LAYER,
        "",
        Panel("Explained variance", "sae", "none", "stat"),
    ),
    MetricDef(
        "driftlab_sae_samples_total",
        "counter",
        "Hidden-state vectors the SAE has trained on.",
        _LAYER,
        "",
        Panel("SAE throughput (samples/s)", "sae", per_second=True),
    ),
    # -- detect --------------------------------------------------------------------------
    MetricDef(
        "driftlab_detect_auroc",
        "gauge",
        "Area under the ROC curve of the hallucination detector on the labelled answers.",
        (),
        "",
        Panel("Detection AUROC", "detection", "none", "stat"),
    ),
    MetricDef(
        "driftlab_detect_answers_total",
        "counter",
        "Answers generated and scored by the detector.",
        (),
        "",
        Panel("Answers scored", "detection"),
    ),
)

BY_NAME: Mapping[str, MetricDef] = MappingProxyType({m.name: m for m in METRICS})
if len(BY_NAME) != len(METRICS):
    raise ValueError("shared.metrics declares a metric name twice")


def metric(name: str) -> MetricDef:
    """The declaration of `name`; a ValueError naming the closest declared names if none."""
    try:
        return BY_NAME[name]
    except KeyError:
        close = difflib.get_close_matches(name, BY_NAME, n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}?" if close else "declare it in shared/metrics.py"
        raise ValueError(f"metric {name!r} is not declared in shared.metrics: {hint}") from None
