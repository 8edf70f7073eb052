"""Grafana dashboards generated from the metric declarations in shared/metrics.py.

    driftlab dashboards render [--out DIR] [--check]
    driftlab dashboards push --grafana-url URL   (shared/dashboard_push.py)

Every panel is made from one `MetricDef` (its `Panel` hint says title, row and unit), so a
metric renamed in shared/metrics.py renames its query here, and a panel cannot plot a name
nothing pushes. The JSON is checked in under helm/driftlab/files/dashboards/ (the chart
ships it as a ConfigMap for Grafana's dashboard sidecar) and never edited by hand; a test
fails when it is out of sync.

Panels: gauges that move are time series; a stage's final numbers (scores, timestamps)
are stats; 0/1 and verdict gauges are state timelines with their states named; counters
marked `per_second` plot `rate()` (throughput), others their total; histograms their p50
and p95 over `$__rate_interval`. Every driftlab query is filtered by the `run_id` variable,
one series per run/stage/shard (and per label such as `layer`).

Annotations (Prometheus queries, one per metric whose `Panel.annotation` is set): a
`*_timestamp_seconds` gauge is placed at its value (Grafana's "series value as
timestamp", in ms), so stage starts and ends are points at the moment they happened; any
other metric at the end of the stage attempt that pushed it (OT change points).

Argo's own per-task metrics (declared by workflows/pipeline.py's templates, prefixed by
the Argo controller) give the task durations and failures, filtered by the `namespace` and
`workflow` variables.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from shared.errors import DriftlabError
from shared.metrics import METRICS, ROWS, MetricDef, metric

DEFAULT_OUT = Path("helm") / "driftlab" / "files" / "dashboards"
DASHBOARD_FILE = "driftlab.json"
UID = "driftlab-overview"
# Argo's custom metrics of every driftlab task (workflows/pipeline.py declares them on each
# template; the controller adds the `argo_workflows_` prefix). A test keeps them in sync.
ARGO_TASK_DURATION = "argo_workflows_driftlab_task_duration_seconds"
ARGO_TASK_TOTAL = "argo_workflows_driftlab_task_total"
ARGO_METRICS = (ARGO_TASK_DURATION, ARGO_TASK_TOTAL)

_SELECTOR = '{job="driftlab", run_id=~"$run_id"}'
_ARGO_FILTER = 'workflow_namespace=~"$namespace", workflow=~"$workflow"'
_END = metric("driftlab_stage_end_timestamp_seconds").name
_DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
_ROW_TITLES: Mapping[str, str] = {
    "stages": "Stages",
    "training": "Training",
    "extraction": "Extraction",
    "ot": "Optimal transport",
    "sae": "Sparse autoencoders",
    "detection": "Detection",
}
_WIDTH, _HEIGHT, _PER_ROW = 8, 7, 3


class DashboardsOutOfSync(DriftlabError):
    """The checked-in dashboards differ from what the metric declarations generate."""

    exit_code = 1


def _legend(m: MetricDef) -> str:
    parts = [
        "{{run_id}}",
        "{{stage}}",
        "{{shard}}",
        *(f"{label} {{{{{label}}}}}" for label in m.labels),
    ]
    return " ".join(parts)


def _target(expr: str, legend: str, ref: str = "A") -> dict[str, Any]:
    return {"refId": ref, "datasource": _DATASOURCE, "expr": expr, "legendFormat": legend}


def _targets(m: MetricDef) -> list[dict[str, Any]]:
    """PromQL of one metric; every query names the metric it plots."""
    if m.kind == "histogram":
        by = ", ".join(("le", "run_id", "stage", "shard", *m.labels))
        return [
            _target(
                f"histogram_quantile({q}, sum by ({by}) "
                f"(rate({m.name}_bucket{_SELECTOR}[$__rate_interval])))",
                f"p{round(q * 100)} {_legend(m)}",
                ref,
            )
            for ref, q in (("A", 0.5), ("B", 0.95))
        ]
    if m.panel.per_second:
        return [_target(f"rate({m.name}{_SELECTOR}[$__rate_interval])", _legend(m))]
    return [_target(f"{m.name}{_SELECTOR}", _legend(m))]


def _panel(
    title: str,
    unit: str,
    targets: list[dict[str, Any]],
    description: str,
    style: str = "timeseries",
    states: tuple[tuple[str, str], ...] = (),
) -> dict[str, Any]:
    """One Grafana panel; stats show each series' last value, state timelines name states."""
    defaults: dict[str, Any] = {"unit": unit}
    options: dict[str, Any] = {"legend": {"displayMode": "list", "placement": "bottom"}}
    if style == "stat":
        options = {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "textMode": "value_and_name",
            "graphMode": "none",
            "colorMode": "none",
            "justifyMode": "auto",
            "orientation": "auto",
        }
    if states:
        defaults["mappings"] = [
            {
                "type": "value",
                "options": {
                    str(value): {"text": text, "color": color, "index": value}
                    for value, (text, color) in enumerate(states)
                },
            }
        ]
        options = {**options, "showValue": "auto", "mergeValues": True, "rowHeight": 0.9}
    return {
        "type": style,
        "title": title,
        "description": description,
        "datasource": _DATASOURCE,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": options,
        "targets": targets,
    }


def _metric_panel(m: MetricDef) -> dict[str, Any]:
    p = m.panel
    return _panel(p.title, p.grafana_unit, _targets(m), m.help, p.style, p.states)


def _argo_panels() -> list[dict[str, Any]]:
    return [
        _panel(
            "Task duration by stage (Argo)",
            "s",
            [
                _target(
                    f"max by (stage, status) ({ARGO_TASK_DURATION}{{{_ARGO_FILTER}}})",
                    "{{stage}} {{status}}",
                )
            ],
            "Duration of the latest driftlab task per stage and final status, from Argo's "
            "metrics, for the chosen namespaces and workflows.",
            "stat",
        ),
        _panel(
            "Failed tasks by stage (Argo)",
            "short",
            [
                _target(
                    f"sum by (stage) (increase({ARGO_TASK_TOTAL}"
                    f'{{{_ARGO_FILTER}, status=~"Failed|Error"}}[$__range]))',
                    "{{stage}}",
                )
            ],
            "driftlab tasks that ended Failed or Error in the time range, from Argo's metrics, "
            "for the chosen namespaces and workflows.",
            "stat",
        ),
    ]


def _annotation(m: MetricDef) -> dict[str, Any]:
    """A Grafana annotation from the metric's series: see the module docstring."""
    if m.name.endswith("_timestamp_seconds"):
        expr = f"{m.name}{_SELECTOR} * 1000"
    else:
        expr = (
            f"({m.name}{_SELECTOR} * 0 + on (job, run_id, stage, shard) "
            f"group_left {_END}{_SELECTOR}) * 1000"
        )
    return {
        "name": m.panel.title,
        "datasource": _DATASOURCE,
        "enable": True,
        "iconColor": "rgba(255, 96, 96, 1)" if m.panel.row == "ot" else "rgba(0, 211, 255, 1)",
        "expr": expr,
        "step": "60s",
        "useValueForTime": True,
        "titleFormat": m.panel.annotation,
        "tagKeys": ",".join(("run_id", "stage", *m.labels)),
        "textFormat": m.help,
    }


def annotation_list() -> list[dict[str, Any]]:
    """Grafana's built-in annotations, then one per metric declared with an annotation."""
    builtin = {
        "builtIn": 1,
        "datasource": {"type": "grafana", "uid": "-- Grafana --"},
        "enable": True,
        "hide": True,
        "iconColor": "rgba(0, 211, 255, 1)",
        "name": "Annotations & Alerts",
        "type": "dashboard",
    }
    return [builtin, *(_annotation(m) for m in METRICS if m.panel.annotation)]


def _rows() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    for row in ROWS:
        panels = [_metric_panel(m) for m in METRICS if m.panel.row == row]
        if row == "stages":
            panels += _argo_panels()
        yield _ROW_TITLES[row], panels


def _argo_variable(name: str, label: str, source_label: str, series: str) -> dict[str, Any]:
    """A multi-value variable over one label of Argo's task metrics ("All" by default)."""
    query = f"label_values({series}, {source_label})"
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": _DATASOURCE,
        "query": {"query": query, "refId": name},
        "definition": query,
        "refresh": 2,
        "multi": True,
        "includeAll": True,
        "allValue": ".*",
        "current": {},
        "sort": 1,
        "hide": 0,
    }


def dashboard() -> dict[str, Any]:
    """The driftlab overview dashboard: one row per area, one panel per declared metric."""
    panels: list[dict[str, Any]] = []
    y, next_id = 0, 1
    for title, row_panels in _rows():
        panels.append(
            {
                "type": "row",
                "id": next_id,
                "title": title,
                "collapsed": False,
                "panels": [],
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
            }
        )
        next_id, y = next_id + 1, y + 1
        for i, panel in enumerate(row_panels):
            col, line = i % _PER_ROW, i // _PER_ROW
            panel["id"] = next_id
            panel["gridPos"] = {
                "h": _HEIGHT,
                "w": _WIDTH,
                "x": col * _WIDTH,
                "y": y + line * _HEIGHT,
            }
            panels.append(panel)
            next_id += 1
        y += -(-len(row_panels) // _PER_ROW) * _HEIGHT
    return {
        "uid": UID,
        "title": "driftlab",
        "description": "Generated by `driftlab dashboards render` from shared/metrics.py; do not edit.",
        "tags": ["driftlab"],
        "editable": False,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "timezone": "browser",
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                },
                _argo_variable("namespace", "Namespace", "workflow_namespace", ARGO_TASK_TOTAL),
                _argo_variable(
                    "workflow",
                    "Workflow",
                    "workflow",
                    f'{ARGO_TASK_TOTAL}{{workflow_namespace=~"$namespace"}}',
                ),
                {
                    "name": "run_id",
                    "label": "Run",
                    "type": "query",
                    "datasource": _DATASOURCE,
                    "query": {
                        "query": 'label_values(driftlab_stage_running{job="driftlab"}, run_id)',
                        "refId": "run_id",
                    },
                    "definition": 'label_values(driftlab_stage_running{job="driftlab"}, run_id)',
                    "refresh": 2,
                    "multi": True,
                    "includeAll": True,
                    "allValue": ".*",
                    "current": {},
                    "sort": 2,
                    "hide": 0,
                },
            ]
        },
        "annotations": {"list": annotation_list()},
        "panels": panels,
    }


def rendered() -> dict[str, str]:
    """File name -> the exact text the dashboards are checked in as."""
    return {DASHBOARD_FILE: json.dumps(dashboard(), indent=2, sort_keys=True) + "\n"}


def render(out: Path, *, check: bool = False) -> list[Path]:
    """Write the dashboards under `out`; with `check`, only say which files differ."""
    stale = [
        out / name
        for name, text in rendered().items()
        if not (out / name).is_file() or (out / name).read_text() != text
    ]
    if check:
        if stale:
            raise DashboardsOutOfSync(
                f"{', '.join(map(str, stale))} out of sync with shared/metrics.py; "
                "run `driftlab dashboards render`"
            )
        return []
    out.mkdir(parents=True, exist_ok=True)
    for name, text in rendered().items():
        (out / name).write_text(text)
    return [out / name for name in rendered()]


def _cmd_render(args: argparse.Namespace) -> int:
    for path in render(Path(args.out), check=args.check):
        print(path)
    return 0


def add_render_parser(sub: Any) -> None:
    """`driftlab dashboards render`."""
    render_cmd = sub.add_parser(
        "render", help="write the dashboard JSON (the chart's copy by default)"
    )
    render_cmd.add_argument(
        "--out", default=str(DEFAULT_OUT), help=f"folder (default {DEFAULT_OUT})"
    )
    render_cmd.add_argument(
        "--check", action="store_true", help="exit 1 if the files are out of sync"
    )
    render_cmd.set_defaults(handler=_cmd_render)
