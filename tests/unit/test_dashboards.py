"""Grafana dashboards: generated from shared/metrics.py, checked in, in sync, complete."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from cli.main import main
from shared import dashboards
from shared.metrics import BY_NAME, METRICS
from shared.spec import RunSpec
from tests.support import ROOT
from workflows.pipeline import build_workflow, compiled

CHECKED_IN = ROOT / dashboards.DEFAULT_OUT
_NAME = re.compile(r"\b(?:driftlab|argo_workflows)_[a-z0-9_]+")


def _panels() -> list[dict]:
    return [p for p in dashboards.dashboard()["panels"] if p["type"] != "row"]


def _names(expr: str) -> set[str]:
    return {n.removesuffix("_bucket") for n in _NAME.findall(expr)}


def test_checked_in_dashboards_are_in_sync() -> None:
    for name, text in dashboards.rendered().items():
        assert (CHECKED_IN / name).read_text() == text, "run `driftlab dashboards render`"
    assert sorted(p.name for p in CHECKED_IN.glob("*.json")) == sorted(dashboards.rendered())


def test_every_query_names_a_declared_metric_and_every_metric_has_a_panel() -> None:
    plotted: set[str] = set()
    for panel in _panels():
        for target in panel["targets"]:
            names = _names(target["expr"])
            assert names, target["expr"]
            for name in names:
                assert name in BY_NAME or name in dashboards.ARGO_METRICS, name
            plotted |= names
    assert {m.name for m in METRICS} <= plotted
    assert set(dashboards.ARGO_METRICS) <= plotted


def test_argo_metric_names_match_what_the_workflow_declares() -> None:
    """The controller exports `argo_workflows_<name>` for each template metric."""
    manifest = compiled(build_workflow(RunSpec(), "cpu", store="s3://b"))
    declared = {
        f"argo_workflows_{m['name']}"
        for t in manifest["spec"]["templates"]
        for m in t.get("metrics", {}).get("prometheus", [])
    }
    assert declared == set(dashboards.ARGO_METRICS)


def test_dashboard_shape_grafana_needs() -> None:
    board = json.loads(dashboards.rendered()[dashboards.DASHBOARD_FILE])
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["run_id"]["includeAll"] and variables["datasource"]["type"] == "datasource"
    rows = [p["title"] for p in board["panels"] if p["type"] == "row"]
    assert rows == [dashboards._ROW_TITLES[r] for r in dashboards.ROWS]
    for panel in _panels():
        assert all('run_id=~"$run_id"' in t["expr"] for t in panel["targets"]) or any(
            n in dashboards.ARGO_METRICS for t in panel["targets"] for n in _names(t["expr"])
        ), panel["title"]
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
