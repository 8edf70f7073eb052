"""Grafana dashboards: generated from shared/metrics.py, checked in, in sync, complete."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli.main import main
from shared import dashboards
from shared.metrics import BY_NAME, METRICS
from shared.spec import RunSpec
from tests.support import ROOT, dashboard_queries, promql_metric_names, queried_metrics
from workflows.pipeline import build_workflow, compiled

CHECKED_IN = ROOT / dashboards.DEFAULT_OUT
#: Where metrics are set: the services and shared/, less the declarations and the generator.
_SETTERS = [
    path
    for folder in ("services", "shared")
    for path in sorted((ROOT / folder).rglob("*.py"))
    if path.relative_to(ROOT).as_posix() not in {"shared/metrics.py", "shared/dashboards.py"}
]


def _panels() -> list[dict]:
    return [p for p in dashboards.dashboard()["panels"] if p["type"] != "row"]


def _by_title() -> dict[str, dict]:
    return {p["title"]: p for p in _panels()}


def test_checked_in_dashboards_are_in_sync() -> None:
    for name, text in dashboards.rendered().items():
        assert (CHECKED_IN / name).read_text() == text, "run `driftlab dashboards render`"
    assert sorted(p.name for p in CHECKED_IN.glob("*.json")) == sorted(dashboards.rendered())


def test_every_query_names_a_declared_metric_and_every_metric_is_queried() -> None:
    board = dashboards.dashboard()
    for expr in dashboard_queries(board):
        names = promql_metric_names(expr)
        assert names, expr
        for name in names:
            assert name in BY_NAME or name in dashboards.ARGO_METRICS, (name, expr)
    plotted = {n for p in _panels() for t in p["targets"] for n in promql_metric_names(t["expr"])}
    assert {m.name for m in METRICS} <= plotted
    assert set(dashboards.ARGO_METRICS) <= plotted


def test_every_queried_driftlab_metric_is_set_by_some_code_path() -> None:
    """The fast half of tests/stages/test_dashboard_metrics.py (slow: it runs a pipeline):
    a metric no code sets is an empty panel. Argo's metrics are the controller's."""
    source = "\n".join(path.read_text() for path in _SETTERS)
    queried = queried_metrics(dashboards.dashboard()) - set(dashboards.ARGO_METRICS)
    unset = sorted(name for name in queried if f'"{name}"' not in source)
    assert unset == []


def test_states_are_state_timelines_and_final_values_are_stats() -> None:
    panels = _by_title()
    for title, states in (
        ("Outcome", ["ok", "failed"]),
        ("Running", ["ended", "running"]),
        ("Quality verdicts", ["ok", "warn", "fail"]),
    ):
        panel = panels[title]
        assert panel["type"] == "state-timeline", title
        (mapping,) = panel["fieldConfig"]["defaults"]["mappings"]
        assert [mapping["options"][str(v)]["text"] for v in range(len(states))] == states
    for title in ("Started", "Ended", "Last success", "Detection AUROC", "Explained variance"):
        assert panels[title]["type"] == "stat", title
        assert panels[title]["options"]["reduceOptions"]["calcs"] == ["lastNotNull"]
    assert panels["Last success"]["fieldConfig"]["defaults"]["unit"] == "dateTimeAsIso"
    assert panels["Train loss"]["type"] == "timeseries"


def test_units_match_values_and_throughput_is_a_rate_of_a_counter() -> None:
    ev = BY_NAME["driftlab_sae_explained_variance"]
    assert ev.unit == "" and ev.panel.grafana_unit != "percentunit"  # it can be negative
    assert not [m.name for m in METRICS if "per_second" in m.name]
    panels = _by_title()
    for title, counter in (
        ("Train throughput (tokens/s)", "driftlab_train_tokens_total"),
        ("Extraction throughput (tokens/s)", "driftlab_extract_tokens_total"),
        ("SAE throughput (samples/s)", "driftlab_sae_samples_total"),
    ):
        (target,) = panels[title]["targets"]
        assert target["expr"].startswith(f"rate({counter}{{"), title
        assert BY_NAME[counter].kind == "counter"


def test_annotations_mark_stage_starts_ends_and_ot_change_points() -> None:
    board = dashboards.dashboard()
    by_name = {a["name"]: a for a in board["annotations"]["list"]}
    assert by_name["Annotations & Alerts"]["builtIn"] == 1
    started, ended = by_name["Started"], by_name["Ended"]
    for annotation, metric in (
        (started, "driftlab_stage_start_timestamp_seconds"),
        (ended, "driftlab_stage_end_timestamp_seconds"),
    ):
        # Grafana reads the value as the time, in milliseconds.
        assert annotation["useValueForTime"] is True
        assert annotation["expr"].startswith(f"{metric}{{") and annotation["expr"].endswith(
            "* 1000"
        )
        assert 'run_id=~"$run_id"' in annotation["expr"]
    change = by_name["OT change points by step"]
    assert change["useValueForTime"] is True and "{{step}}" in change["titleFormat"]
    assert promql_metric_names(change["expr"]) == {
        "driftlab_ot_change_point_magnitude",
        "driftlab_stage_end_timestamp_seconds",
    }


def test_argo_metric_names_match_what_the_workflow_declares() -> None:
    """The controller exports `argo_workflows_<name>` for each template metric."""
    manifest = compiled(build_workflow(RunSpec(), "cpu", store="s3://b"))
    declared = {
        f"argo_workflows_{m['name']}"
        for t in manifest["spec"]["templates"]
        for m in t.get("metrics", {}).get("prometheus", [])
    }
    assert declared == set(dashboards.ARGO_METRICS)
    labels = {
        label["key"]
        for t in manifest["spec"]["templates"]
        for m in t.get("metrics", {}).get("prometheus", [])
        for label in m["labels"]
    }
    # What the dashboard's namespace and workflow variables filter on.
    assert {"workflow", "workflow_namespace"} <= labels


def test_dashboard_shape_grafana_needs() -> None:
    board = json.loads(dashboards.rendered()[dashboards.DASHBOARD_FILE])
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["run_id"]["includeAll"] and variables["datasource"]["type"] == "datasource"
    assert "workflow_namespace" in variables["namespace"]["definition"]
    assert '$namespace"' in variables["workflow"]["definition"]
    rows = [p["title"] for p in board["panels"] if p["type"] == "row"]
    assert rows == [dashboards._ROW_TITLES[r] for r in dashboards.ROWS]
    for panel in _panels():
        argo = any(
            n in dashboards.ARGO_METRICS
            for t in panel["targets"]
            for n in promql_metric_names(t["expr"])
        )
        wanted = (
            ('workflow_namespace=~"$namespace"', 'workflow=~"$workflow"')
            if argo
            else ('run_id=~"$run_id"',)
        )
        assert all(w in t["expr"] for t in panel["targets"] for w in wanted), panel["title"]
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24


def test_histograms_plot_quantiles_of_their_buckets() -> None:
    (panel,) = [p for p in _panels() if p["title"] == "Step duration"]
    exprs = [t["expr"] for t in panel["targets"]]
    assert any("histogram_quantile(0.95" in e for e in exprs)
    assert all("driftlab_train_step_duration_seconds_bucket" in e for e in exprs)


def test_cli_renders_and_check_fails_on_stale_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["dashboards", "render", "--out", str(tmp_path), "--check"]) == 1
    assert "out of sync" in capsys.readouterr().err
    assert main(["dashboards", "render", "--out", str(tmp_path)]) == 0
    assert main(["dashboards", "render", "--out", str(tmp_path), "--check"]) == 0
    (tmp_path / dashboards.DASHBOARD_FILE).write_text("{}\n")
    assert main(["dashboards", "render", "--out", str(tmp_path), "--check"]) == 1
