"""No empty dashboard panel: a short pipeline pushes every metric the dashboard queries,
and every panel's query draws it.

Every pushing stage (train, extract, sae train, detect, ot, evaluate) runs in this process
on a tiny `modular` run, against the session's real Pushgateway on loopback, which a real
Prometheus scrapes every second; then every metric named by a panel or annotation query of
the generated dashboard must be in the run's groups, and every query, its variables set
for the run, must return series from Prometheus (about 7 s on an idle machine). Argo's controller metrics are the one exemption (`dashboards.ARGO_METRICS`):
no driftlab stage pushes them, the Argo controller exports them on a cluster.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import pytest
import torch

from services.evaluator.__main__ import EVALUATE
from services.extractor.__main__ import EXTRACT
from services.ot.__main__ import OT
from services.sae.__main__ import DETECT
from services.sae.__main__ import TRAIN as SAE_TRAIN
from services.trainer.__main__ import TRAIN as TRAINER
from shared import dashboards
from shared.stage import stage_main
from shared.store import open_store
from tests.fixtures_prometheus import SCRAPE_S, PrometheusServer
from tests.fixtures_pushgateway import PushgatewayServer
from tests.support import TINY_DETECT_RUN, dashboard_queries, queried_metrics, register_run

#: The detect tests' tiny run, with four checkpoints so OT has step drift and change
#: points to report, and every other pushing stage kept short.
TINY = {
    **TINY_DETECT_RUN,
    "train.batch_size": 16,
    "train.warmup_steps": 5,
    "train.checkpoint_every": 20,
    "sae.epochs": 10,
    "ot.bootstrap": 5,
    "detect.bootstrap": 100,
    "evaluate.bootstrap": 20,
}


@dataclass(frozen=True)
class PushedRun:
    run_id: str
    #: Unix seconds when the pipeline started and when Prometheus had scraped its end.
    start: float
    end: float


@pytest.fixture(scope="module")
def pushed_run(
    tmp_path_factory: pytest.TempPathFactory,
    pushgateway: PushgatewayServer,
    prometheus: PrometheusServer,
) -> PushedRun:
    """Every pushing stage once on the tiny run, while Prometheus scrapes the Pushgateway."""
    start = time.time()
    store = open_store(str(tmp_path_factory.mktemp("dashboards") / "store"))
    run_id = register_run(store, TINY)
    args = ["--run", run_id, "--store", store.url]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures start before `one_torch_thread`
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("DRIFTLAB_PUSHGATEWAY", pushgateway.address)
            assert stage_main(TRAINER, args) == 0
            assert stage_main(EXTRACT, args) == 0
            assert stage_main([SAE_TRAIN, DETECT], ["train", *args]) == 0
            assert stage_main([SAE_TRAIN, DETECT], ["detect", *args]) == 0
            assert stage_main(OT, [*args, "--device", "cpu"]) == 0
            assert stage_main(EVALUATE, [*args, "--device", "cpu"]) == 0
    finally:
        torch.set_num_threads(threads)
    prometheus.wait_for_scrape()
    return PushedRun(run_id, start, time.time())


def test_a_short_pipeline_pushes_every_metric_the_dashboard_queries(
    pushed_run: PushedRun, pushgateway: PushgatewayServer
) -> None:
    run_id = pushed_run.run_id
    pushed = pushgateway.names(run_id=run_id)
    queried = queried_metrics(dashboards.dashboard())
    assert set(dashboards.ARGO_METRICS) <= queried  # exempt, but still plotted
    assert sorted(queried - set(dashboards.ARGO_METRICS) - pushed) == []
    # The values the new panels show are the run's, not placeholders.
    group = {"run_id": run_id, "stage": "train"}
    assert 0 <= pushgateway.value("driftlab_train_eval_accuracy_ratio", **group) <= 1
    assert pushgateway.value("driftlab_train_eval_loss", **group) > 0
    steps = pushgateway.value("driftlab_train_step_duration_seconds_count", **group)
    assert steps == TINY["train.steps"]
    change_points = pushgateway.value("driftlab_ot_change_points", run_id=run_id, stage="ot")
    assert change_points == len(
        pushgateway.samples("driftlab_ot_change_point_magnitude", run_id=run_id)
    )


def test_every_panel_and_annotation_query_draws_the_run_in_prometheus(
    pushed_run: PushedRun, prometheus: PrometheusServer
) -> None:
    """The dashboard's own PromQL, its variables set as Grafana would for this run, against
    a Prometheus that scraped the Pushgateway while the stages ran: no empty panel."""
    variables = {
        "$__rate_interval": f"{4 * SCRAPE_S}s",
        "$run_id": pushed_run.run_id,
    }
    empty = []
    checked = 0
    for expr in dashboard_queries(dashboards.dashboard()):
        if any(name in expr for name in dashboards.ARGO_METRICS):
            continue  # the Argo controller exports these on a cluster, nothing here
        query = expr
        for variable, value in variables.items():
            query = query.replace(variable, value)
        assert "$" not in query, f"a dashboard variable this test does not set: {expr}"
        checked += 1
        series = prometheus.query_range(query, pushed_run.start, pushed_run.end)
        values = [float(v) for s in series for _, v in s["values"]]
        # rate() needs a counter seen growing between scrapes, and this run's stages take
        # a second or two (the demo's, tens): there a series is what the panel draws,
        # elsewhere a finite value (an unset gauge reads NaN)
        drawn = bool(values) if "rate(" in expr else any(map(math.isfinite, values))
        if not drawn:
            empty.append(expr)
    assert checked >= 30
    assert empty == []
