"""Run ids and store keys: the first line of defence against keys escaping a run folder."""

from datetime import UTC, datetime

import pytest

from shared import layout
from shared.errors import LayoutError


def test_new_run_id_is_dns1123_and_unique():
    now = datetime(2026, 11, 22, 10, 30, 5, tzinfo=UTC)
    a = layout.new_run_id("Tiny CPU_run", now=now)
    b = layout.new_run_id("Tiny CPU_run", now=now)
    assert a.startswith("tiny-cpu-run-20261122-103005-")
    assert a != b
    assert layout.validate_run_id(a) == a


def test_new_run_id_folds_long_and_odd_names():
    rid = layout.new_run_id("X" * 200)
    assert len(rid) <= 63
    layout.validate_run_id(rid)
    assert layout.new_run_id("___").startswith("run-")


@pytest.mark.parametrize(
    "bad",
    ["", "../x", "a/b", "UPPER", "-lead", "trail-", "a.b", "a_b", "x" * 64, "a b", "é"],
)
def test_validate_run_id_rejects(bad):
    with pytest.raises(LayoutError):
        layout.validate_run_id(bad)


def test_keys_match_design():
    r = "demo-20261122-103005-abcdef"
    assert layout.spec_key(r) == f"runs/{r}/spec.yaml"
    assert layout.status_key(r, "sae", "layer-03") == f"runs/{r}/status/sae-layer-03.json"
    assert layout.status_key(r, "train") == f"runs/{r}/status/train.json"
    assert (
        layout.checkpoint_model_key(r, 40)
        == f"runs/{r}/train/checkpoints/step-000040/model.safetensors"
    )
    assert layout.checkpoint_done_key(r, 0) == f"runs/{r}/train/checkpoints/step-000000/DONE"
    assert layout.extract_layer_key(r, 40, 3) == f"runs/{r}/extract/step-40/layer-03.safetensors"
    assert layout.ot_drift_key(r) == f"runs/{r}/ot/drift.safetensors"
    assert layout.sae_weights_key(r, 12) == f"runs/{r}/sae/layer-12/sae.safetensors"
    assert layout.detect_scores_key(r) == f"runs/{r}/detect/scores.jsonl"
    assert layout.evaluate_report_html_key(r) == f"runs/{r}/evaluate/report.html"
    assert layout.evaluate_hmm_key(r, "model-3.json") == f"runs/{r}/evaluate/hmm/model-3.json"
    assert layout.ot_plot_key(r, "depth") == f"runs/{r}/ot/depth.png"


def test_checkpoint_step_parses_back():
    r = "demo-20261122-103005-abcdef"
    assert layout.parse_checkpoint_step(layout.checkpoint_done_key(r, 1234567)) == 1234567
    assert layout.parse_checkpoint_step(layout.spec_key(r)) is None


@pytest.mark.parametrize(
    "call",
    [
        lambda: layout.checkpoint_prefix("r", -1),
        lambda: layout.checkpoint_prefix("r", True),
        lambda: layout.extract_layer_key("r", 0, 1000),
        lambda: layout.status_key("r", "sae", "../x"),
        lambda: layout.status_key("r", "Sae"),
        lambda: layout.ot_plot_key("r", "../evil"),
        lambda: layout.evaluate_hmm_key("r", "a/b"),
        lambda: layout.spec_key("../r"),
    ],
)
def test_bad_parts_are_rejected(call):
    with pytest.raises(LayoutError):
        call()
