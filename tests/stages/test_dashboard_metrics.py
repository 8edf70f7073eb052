"""No empty dashboard panel: a short pipeline pushes every metric the dashboard queries.

Every pushing stage (train, extract, sae train, detect, ot, evaluate) runs in this process
on a tiny `modular` run, against the session's real Pushgateway on loopback; then every
metric named by a panel or annotation query of the generated dashboard must be in the
run's groups. Argo's controller metrics are the one exemption (`dashboards.ARGO_METRICS`):
no driftlab stage pushes them, the Argo controller exports them on a cluster.
"""

from __future__ import annotations

import pytest

from services.evaluator.__main__ import EVALUATE
from services.extractor.__main__ import EXTRACT
from services.ot.__main__ import OT
from services.sae.__main__ import DETECT
from services.sae.__main__ import TRAIN as SAE_TRAIN
from services.trainer.__main__ import TRAIN as TRAINER
from shared import dashboards
from shared.stage import stage_main
from shared.store import open_store
from tests.fixtures_pushgateway import PushgatewayServer
from tests.support import queried_metrics, register_run

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # 5 s on an idle machine

#: tests/stages/test_detect.py's tiny modular run (both answer classes occur), with four
#: checkpoints so OT has step drift and change points to report.
TINY = {
    "data.dataset": "modular",
    "data.modular_p": 7,
    "data.train_fraction": 0.5,
    "data.eval_samples": 24,
    "data.max_length": 16,
    "extract.probe_samples": 24,
    "train.batch_size": 16,
    "train.warmup_steps": 5,
    "train.steps": 60,
    "train.checkpoint_every": 20,
    "sae.batch_size": 32,
    "sae.epochs": 10,
    "ot.bootstrap": 5,
    "detect.samples": 24,
    "detect.num_samples": 4,
    "detect.temperature": 1.0,
    "detect.max_new_tokens": 4,
    "detect.bootstrap": 100,
    "evaluate.bootstrap": 20,
}


def test_a_short_pipeline_pushes_every_metric_the_dashboard_queries(
    tmp_path, pushgateway: PushgatewayServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DRIFTLAB_PUSHGATEWAY", pushgateway.address)
    store = open_store(str(tmp_path / "store"))
    run_id = register_run(store, TINY)
    args = ["--run", run_id, "--store", store.url]
    assert stage_main(TRAINER, args) == 0
    assert stage_main(EXTRACT, args) == 0
    assert stage_main([SAE_TRAIN, DETECT], ["train", *args]) == 0
    assert stage_main([SAE_TRAIN, DETECT], ["detect", *args]) == 0
    assert stage_main(OT, [*args, "--device", "cpu"]) == 0
    assert stage_main(EVALUATE, [*args, "--device", "cpu"]) == 0

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
