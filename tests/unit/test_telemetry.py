"""Metric declarations and `shared.telemetry.progress`, against a real Pushgateway."""

from __future__ import annotations

import http.server
import itertools
import logging
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import prometheus_client
import pytest

from shared.metrics import GROUPING_LABELS, METRICS, ROWS, UNITS, metric
from shared.telemetry import progress, push_metrics
from tests.fixtures_pushgateway import PushgatewayServer
from tests.support import free_port

_run_ids = (f"t{i}" for i in itertools.count())


def _run_id() -> str:
    """A fresh run id: the session's Pushgateway keeps every test's groups."""
    return next(_run_ids)


# -- declarations --------------------------------------------------------------------


def test_metric_names_follow_prometheus_conventions() -> None:
    names = [m.name for m in METRICS]
    assert len(names) == len(set(names))
    for m in METRICS:
        assert re.fullmatch(r"[a-zA-Z_:][a-zA-Z0-9_:]*", m.name), m.name
        assert re.fullmatch(r"driftlab_[a-z0-9_]+", m.name), m.name
        assert m.name.endswith("_total") == (m.kind == "counter"), m.name
        assert m.help.strip() and "\n" not in m.help, m.name
        assert not set(m.labels) & set(GROUPING_LABELS), m.name
        assert m.unit in UNITS
        if m.unit:
            assert m.name.removesuffix("_total").endswith("_" + m.unit), m.name
        if m.name.endswith(("_seconds", "_ratio", "_bytes")):
            assert m.unit, f"{m.name} is in a base unit but does not say so"
        assert m.panel.row in ROWS and m.panel.title, m.name
        if m.name.startswith("driftlab_sae_"):
            assert m.labels == ("layer",), m.name


def test_required_metrics_are_declared() -> None:
    required = [
        "driftlab_stage_progress_ratio",
        "driftlab_stage_items_done_total",
        "driftlab_stage_items_expected",
        "driftlab_stage_duration_seconds",
        "driftlab_stage_start_timestamp_seconds",
        "driftlab_stage_end_timestamp_seconds",
        "driftlab_stage_last_success_timestamp_seconds",
        "driftlab_stage_failed",
        "driftlab_train_loss",
        "driftlab_train_eval_loss",
        "driftlab_train_eval_accuracy_ratio",
        "driftlab_train_learning_rate",
        "driftlab_train_grad_norm",
        "driftlab_train_tokens_total",
        "driftlab_train_step",
        "driftlab_extract_tokens_total",
        "driftlab_ot_change_points",
        "driftlab_ot_change_point_magnitude",
        "driftlab_ot_pairs_done_total",
        "driftlab_sae_loss",
        "driftlab_sae_l0",
        "driftlab_sae_dead_features_ratio",
        "driftlab_sae_explained_variance",
        "driftlab_sae_samples_total",
        "driftlab_detect_auroc",
        "driftlab_detect_answers_total",
    ]
    for name in required:
        assert metric(name).name == name


def test_undeclared_metric_names_close_matches() -> None:
    with pytest.raises(ValueError, match="driftlab_train_loss"):
        metric("driftlab_train_los")


def test_set_rejects_undeclared_names_and_wrong_labels() -> None:
    with progress("train", run_id=_run_id(), total=1) as p:
        with pytest.raises(ValueError, match="not declared"):
            p.set("driftlab_train_loss_typo", 1.0)
        with pytest.raises(ValueError, match="labels"):
            p.set("driftlab_sae_l0", 1.0)  # missing layer
        with pytest.raises(ValueError, match="labels"):
            p.set("driftlab_train_loss", 1.0, layer=3)
        with pytest.raises(ValueError, match="observe"):
            p.inc("driftlab_train_step_duration_seconds")
        with pytest.raises(ValueError, match="only goes up"):
            p.inc("driftlab_train_tokens_total", -1)
        p.update()


def test_metrics_never_reach_the_global_registry() -> None:
    with progress("train", run_id=_run_id(), total=1) as p:
        p.set("driftlab_train_loss", 1.0)
        p.update()
    assert prometheus_client.REGISTRY.get_sample_value("driftlab_train_loss") is None


# -- Pushgateway ---------------------------------------------------------------------


def test_progress_pushes_metrics_with_grouping_key(
    pushgateway: PushgatewayServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DRIFTLAB_PUSHGATEWAY", pushgateway.address)
    run_id = _run_id()
    began = time.time()
    with progress("train", run_id=run_id, total=50, unit="step") as p:
        for step in range(50):
            p.update()
            p.set("driftlab_train_step", step + 1)
            p.inc("driftlab_train_tokens_total", 512)
            p.observe("driftlab_train_step_duration_seconds", 0.02)
        p.set("driftlab_train_loss", 1.25)
    started = time.time()

    group = {"job": "driftlab", "run_id": run_id, "stage": "train"}
    loss = pushgateway.samples("driftlab_train_loss", **group)
    assert len(loss) == 1 and loss[0].value == 1.25
    assert "shard" not in loss[0].labels  # unsharded stages have no shard label
    assert pushgateway.value("driftlab_stage_progress_ratio", **group) == 1.0
    assert pushgateway.value("driftlab_stage_items_done_total", **group) == 50
    assert pushgateway.value("driftlab_stage_items_expected", **group) == 50
    assert pushgateway.value("driftlab_stage_duration_seconds", **group) > 0
    assert pushgateway.value("driftlab_stage_failed", **group) == 0
    assert pushgateway.value("driftlab_stage_running", **group) == 0
    last = pushgateway.value("driftlab_stage_last_success_timestamp_seconds", **group)
    assert abs(last - started) < 5
    start = pushgateway.value("driftlab_stage_start_timestamp_seconds", **group)
    end = pushgateway.value("driftlab_stage_end_timestamp_seconds", **group)
    assert began <= start <= end <= started and end == pytest.approx(last, abs=1)
    assert pushgateway.value("driftlab_train_tokens_total", **group) == 50 * 512
    assert pushgateway.value("driftlab_train_step_duration_seconds_count", **group) == 50
    assert pushgateway.value("driftlab_train_step_duration_seconds_bucket", le="0.025", **group)
    assert pushgateway.value("driftlab_train_step_duration_seconds_bucket", le="0.01", **group) == 0


def test_sharded_progress_and_labelled_metrics(
    pushgateway: PushgatewayServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DRIFTLAB_PUSHGATEWAY", f"http://{pushgateway.address}/")
    run_id = _run_id()
    with progress("sae", run_id=run_id, total=None, shard="layer-03") as p:
        p.update(7)
        p.set("driftlab_sae_l0", 31.0, layer=3)
        p.set("driftlab_sae_l0", 12.5, layer="4")
    group = {"run_id": run_id, "stage": "sae", "shard": "layer-03"}
    assert pushgateway.value("driftlab_sae_l0", layer="3", **group) == 31.0
    assert pushgateway.value("driftlab_sae_l0", layer="4", **group) == 12.5
    assert pushgateway.value("driftlab_stage_items_done_total", **group) == 7
    # Unknown total: no ratio and no expected count rather than made-up numbers.
    assert pushgateway.samples("driftlab_stage_progress_ratio", **group) == []
    assert pushgateway.samples("driftlab_stage_items_expected", **group) == []


def test_failure_is_pushed_and_the_exception_propagates(
    pushgateway: PushgatewayServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DRIFTLAB_PUSHGATEWAY", pushgateway.address)
    run_id = _run_id()
    with pytest.raises(RuntimeError, match="boom"), progress("ot", run_id=run_id, total=10) as p:
        p.update(4)
        raise RuntimeError("boom")
    group = {"run_id": run_id, "stage": "ot"}
    assert pushgateway.value("driftlab_stage_failed", **group) == 1
    assert pushgateway.value("driftlab_stage_running", **group) == 0
    assert pushgateway.value("driftlab_stage_progress_ratio", **group) == 0.4
    assert pushgateway.samples("driftlab_stage_last_success_timestamp_seconds", **group) == []
    # A failed attempt still ends: the dashboard's end annotation marks it.
    assert pushgateway.value("driftlab_stage_end_timestamp_seconds", **group) >= (
        pushgateway.value("driftlab_stage_start_timestamp_seconds", **group)
    )


def test_push_metrics_adds_headline_numbers_without_wiping_the_group(
    pushgateway: PushgatewayServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DRIFTLAB_PUSHGATEWAY", pushgateway.address)
    run_id = _run_id()
    with progress("detect", run_id=run_id, total=3) as p:
        p.update(3)
    assert push_metrics("detect", run_id, {"driftlab_detect_auroc": 0.875})
    group = {"run_id": run_id, "stage": "detect"}
    assert pushgateway.value("driftlab_detect_auroc", **group) == 0.875
    assert pushgateway.value("driftlab_stage_items_done_total", **group) == 3
    with pytest.raises(ValueError, match="not declared"):
        push_metrics("detect", run_id, {"driftlab_detect_aurok": 0.5})


def test_push_metrics_without_a_gateway_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DRIFTLAB_PUSHGATEWAY", raising=False)
    assert not push_metrics("sae", _run_id(), {"driftlab_sae_l0": 3.0}, labels={"layer": 0})


@dataclass
class _FakeGateway:
    """A loopback HTTP server that counts requests and answers with `status`."""

    address: str
    status: int
    requests: list[str] = field(default_factory=list)


@pytest.fixture
def fake_gateway() -> Iterator[_FakeGateway]:
    state = _FakeGateway(address="", status=200)

    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            state.requests.append(f"{self.command} {self.path}")
            self.send_response(state.status)
            self.end_headers()
            if state.status >= 400:
                self.wfile.write(b"pushed metrics are invalid or inconsistent")

        do_PUT = do_POST = _answer

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.address = f"127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


def test_pushes_are_throttled(fake_gateway: _FakeGateway, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DRIFTLAB_PUSHGATEWAY", fake_gateway.address)
    run_id = _run_id()
    with progress("train", run_id=run_id, total=10_000) as p:
        for _ in range(10_000):
            p.update()
            p.set("driftlab_train_loss", 1.0)
    # One push at the start and the final one, nothing in between.
    assert len(fake_gateway.requests) == 2
    assert all(
        r.startswith(f"PUT /metrics/job/driftlab/run_id/{run_id}/") for r in fake_gateway.requests
    )

    fake_gateway.requests.clear()
    with progress("train", run_id=_run_id(), total=100) as p:
        deadline = time.monotonic() + 2.3
        while time.monotonic() < deadline:
            p.update()
            time.sleep(0.02)
    assert len(fake_gateway.requests) == 3  # start, after 2 s, final


def test_update_is_cheap(fake_gateway: _FakeGateway, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DRIFTLAB_PUSHGATEWAY", fake_gateway.address)
    with progress("extract", run_id=_run_id(), total=100_000) as p:
        start = time.perf_counter()
        for _ in range(100_000):
            p.update()
        elapsed = time.perf_counter() - start
    assert elapsed < 1.0, f"100k updates took {elapsed:.2f}s"


def _push_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "Pushgateway" in r.getMessage()]


def test_unreachable_gateway_warns_once_and_the_loop_completes(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    monkeypatch.setenv("DRIFTLAB_PUSHGATEWAY", f"127.0.0.1:{free_port()}")  # nobody listens
    for _ in range(2):
        with progress("train", run_id=_run_id(), total=5) as p:
            for _ in range(5):
                p.update()
                p.set("driftlab_train_loss", 1.0)
        assert p.n == 5
    warnings = _push_warnings(caplog)
    assert len(warnings) == 1
    assert getattr(warnings[0], "stage", None) == "train"


def test_gateway_errors_warn_once_with_the_reason(
    fake_gateway: _FakeGateway, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    fake_gateway.status = 400
    monkeypatch.setenv("DRIFTLAB_PUSHGATEWAY", fake_gateway.address)
    with progress("sae", run_id=_run_id(), total=2) as p:
        p.update(2)
    assert len(fake_gateway.requests) == 2  # the final push is attempted anyway
    (warning,) = _push_warnings(caplog)
    assert "400" in warning.getMessage() and "inconsistent" in warning.getMessage()


# -- Argo progress file and logs ----------------------------------------------------


def test_progress_file_holds_n_of_m(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DRIFTLAB_PUSHGATEWAY", raising=False)
    path = tmp_path / "progress"
    monkeypatch.setenv("ARGO_PROGRESS_FILE", str(path))
    with progress("extract", run_id=_run_id(), total=10) as p:
        assert path.read_text() == "0/10"
        for _ in range(10):
            p.update()
    assert path.read_text() == "10/10"
    assert [f.name for f in tmp_path.iterdir()] == ["progress"]  # no temp files left

    with progress("extract", run_id=_run_id(), total=3) as p:
        p.update(5)  # more than announced: Argo rejects N > M
    assert path.read_text() == "3/3"


def test_progress_file_skipped_when_total_unknown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "progress"
    monkeypatch.setenv("ARGO_PROGRESS_FILE", str(path))
    with progress("ot", run_id=_run_id(), total=None) as p:
        p.update(3)
    assert not path.exists()


def test_logs_progress_without_flooding(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="driftlab")
    run_id = _run_id()
    with progress("train", run_id=run_id, total=1000, unit="step") as p:
        for _ in range(1000):
            p.update()
    lines = [r.getMessage() for r in caplog.records if getattr(r, "run_id", None) == run_id]
    assert 2 <= len(lines) <= 12, lines
    assert lines[0].startswith("0/1000 step (0%)")
    assert lines[-1].startswith("done, 1000/1000 step in")


def test_bad_group_values_are_rejected() -> None:
    with pytest.raises(ValueError, match="shard"):
        progress("sae", run_id="r1", total=1, shard="")
    with pytest.raises(ValueError, match="total"):
        progress("sae", run_id="r1", total=-1)
