"""Quality verdicts: each check on deliberately bad inputs, and their way to status and report."""

from __future__ import annotations

import argparse
import math

import pytest

from services.evaluator.hmm_importance import Transition
from services.evaluator.quality import hmm_checks
from services.evaluator.report import SECTION_IDS, render_html
from services.evaluator.sections import Report, quality
from services.sae.detect_quality import MIN_TEST_PER_CLASS, detection_checks
from services.trainer.quality import chance_accuracy, trainer_checks
from shared import layout
from shared.data import Example
from shared.quality import (
    QualityCheck,
    at_least,
    at_most,
    from_status,
    problems,
    run_checks,
)
from shared.spec import RunSpec, spec_to_yaml
from shared.stage import StageContext, StageDef, execute
from shared.store import open_store
from workflows.commands import _print_problems

RUN = "quality-20261205-000000-abcdef"


def _verdict(check: QualityCheck) -> str:
    return check.verdict


def _bare_report() -> Report:
    """A report whose sections are all absent: only the quality banner has content."""
    return Report(RUN, absent={sid: "not in this test" for sid in SECTION_IDS})


# -- the two threshold shapes ----------------------------------------------------------


def test_at_least_fails_warns_and_passes_at_its_thresholds():
    def judge(value: float) -> QualityCheck:
        return at_least("sae", "ev", value, what="explained variance", fix="train longer",
                        fail=0.5, warn=0.8)  # fmt: skip

    assert [_verdict(judge(v)) for v in (-1.3, 0.49, 0.5, 0.79, 0.8, 0.95)] == [
        "fail", "fail", "warn", "warn", "ok", "ok",
    ]  # fmt: skip
    bad = judge(-1.32)
    assert bad.threshold == 0.5 and bad.value == -1.32
    assert "train longer" in bad.message and "-1.32" in bad.message
    assert judge(0.6).threshold == 0.8
    assert "train longer" not in judge(0.9).message  # an ok needs no fix


def test_at_most_counts_the_threshold_itself_as_bad():
    def judge(value: float) -> QualityCheck:
        return at_most("sae", "fvu", value, what="FVU", fix="more tokens", fail=1.0)

    assert [_verdict(judge(v)) for v in (0.2, 0.999, 1.0, 2.3)] == ["ok", "ok", "fail", "fail"]


def test_nan_fails_and_serialises_as_null():
    check = at_least("ot", "x", math.nan, what="x", fix="rerun", warn=0.1)
    assert check.verdict == "fail" and check.value is None
    assert QualityCheck.from_json(check.to_json()) == check


def test_a_check_without_threshold_is_a_programming_error():
    with pytest.raises(ValueError, match="needs a fail or a warn"):
        at_least("ot", "x", 1.0, what="x", fix="y")


def test_malformed_status_entries_are_skipped_not_fatal():
    good = at_most("ot", "x", 0.0, what="x", fix="y", warn=0.1).to_json()
    status = {"quality": [good, {"verdict": "meh"}, "text", {"stage": "ot"}]}
    assert [c.check for c in from_status(status)] == ["x"]


# -- trainer -----------------------------------------------------------------------------


def _examples(answers: list[str]) -> list[Example]:
    return [
        Example(id=str(i), prompt=f"q{i}=", answer=a, text=f"q{i}={a}")
        for i, a in enumerate(answers)
    ]


def test_chance_is_always_giving_the_most_common_answer():
    assert chance_accuracy(_examples(["1", "2", "2", "3"])) == 0.5


def test_a_model_below_chance_fails_and_above_passes():
    examples = _examples([str(i % 13) for i in range(84)])
    rows = [{"step": 10, "loss": 5.0}, {"step": 200, "loss": 2.0}]
    below = trainer_checks({"eval_accuracy": 0.0235}, examples, rows)
    assert {c.check: c.verdict for c in below} == {"final_accuracy": "fail", "loss_ratio": "ok"}
    assert "train.steps" in below[0].message
    above = trainer_checks({"eval_accuracy": 0.95}, examples, rows)
    assert above[0].verdict == "ok" and above[0].threshold == pytest.approx(7 / 84)


def test_a_loss_that_does_not_fall_fails():
    flat = [{"step": 10, "loss": 5.0}, {"step": 200, "loss": 4.99}]
    (check,) = trainer_checks({}, [], flat)
    assert check.check == "loss_ratio" and check.verdict == "fail"
    slow = [{"step": 10, "loss": 5.0}, {"step": 200, "loss": 4.7}]
    assert trainer_checks({}, [], slow)[0].verdict == "warn"


# -- detection ---------------------------------------------------------------------------


def _detection_metrics(test: dict[str, int], ci: list[float] | None) -> dict:
    return {
        "class_balance": {"test": test},
        "scores": {"detector": {"auroc": 0.44, "ci95": ci}},
    }


def test_a_test_split_with_one_class_warns():
    checks = detection_checks(
        _detection_metrics({"correct": 0, "hallucinated": 75}, None), "detector"
    )
    assert [(c.check, c.verdict, c.value) for c in checks] == [
        ("test_answers_per_class", "warn", 0.0)
    ]
    assert "correct" in checks[0].message and "detect.samples" in checks[0].message


def test_an_auroc_interval_containing_chance_warns():
    metrics = _detection_metrics({"correct": 6, "hallucinated": 69}, [0.27, 0.68])
    verdicts = {c.check: c.verdict for c in detection_checks(metrics, "detector")}
    assert verdicts == {"test_answers_per_class": "warn", "detector_auroc_ci": "warn"}


def test_enough_answers_and_a_clear_auroc_pass():
    n = MIN_TEST_PER_CLASS
    metrics = _detection_metrics({"correct": n, "hallucinated": n + 5}, [0.71, 0.93])
    assert [c.verdict for c in detection_checks(metrics, "detector")] == ["ok", "ok"]


def test_a_detector_below_the_best_baseline_warns_and_one_above_passes():
    n = MIN_TEST_PER_CLASS
    metrics = _detection_metrics({"correct": n, "hallucinated": n}, [0.55, 0.65])
    below = {"auroc_difference": -0.24, "ci95": [-0.40, -0.08], "beats_baseline": False}
    metrics["against_best_baseline"] = {
        "baseline": "baseline_pred_entropy",
        "auroc": 0.835,
        "detector": below,
    }
    (check,) = [c for c in detection_checks(metrics, "detector") if c.check.endswith("baseline")]
    assert (check.verdict, check.value) == ("warn", -0.24)
    assert "baseline_pred_entropy" in check.message and "add nothing" in check.message
    above = {"auroc_difference": 0.1, "ci95": [0.02, 0.18], "beats_baseline": True}
    metrics["against_best_baseline"]["detector"] = above
    verdicts = {c.check: c.verdict for c in detection_checks(metrics, "detector")}
    assert verdicts["detector_vs_best_baseline"] == "ok"


# -- HMM ---------------------------------------------------------------------------------


def _hmm(n_states: int, n_params: int, rows: int, features: int) -> dict:
    return {
        "n_states": n_states,
        "features": [f"f{i}" for i in range(features)],
        "candidates": [{"n_states": n_states, "n_params": n_params}],
        "runs": {RUN: {"steps": list(range(rows))}},
    }


def test_an_hmm_with_more_parameters_than_values_fails():
    (check,) = hmm_checks(_hmm(4, 79, 9, 8))  # the demo on main: 79 parameters, 72 values
    assert check.verdict == "fail" and check.value == pytest.approx(79 / 72)
    assert "train.dynamics_every" in check.message
    assert hmm_checks(_hmm(2, 35, 100, 8))[0].verdict == "ok"
    assert hmm_checks(None) == []


def test_transitions_with_numerically_zero_importance_are_not_labelled():
    t = Transition(0, 1, 1, 0.5, {"a": 1e-241, "b": 0.0, "c": -0.3, "d": 0.1})
    assert t.top_features() == [("c", -0.3), ("d", 0.1)]
    assert Transition(0, 1, 1, 0.5, {"a": 1e-241}).to_json()["top_features"] == []


# -- the stage contract, the report and the CLI --------------------------------------------


def _judging_stage(verdict_value: float) -> StageDef:
    def run(ctx: StageContext) -> None:
        ctx.judge(at_least("ot", "coverage", verdict_value, what="coverage", fix="raise it",
                           fail=0.5))  # fmt: skip

    return StageDef(
        name="ot", help="", run=run, done_key=lambda args, spec: layout.ot_done_key(args.run),
        inputs=lambda args, spec, store: [], spec_sections=("ot",),
    )  # fmt: skip


def test_the_stage_contract_writes_verdicts_and_keeps_them_when_cached(tmp_path):
    store = open_store(tmp_path / "store")
    store.put_text(layout.spec_key(RUN), spec_to_yaml(RunSpec()))
    args = argparse.Namespace(run=RUN, store=str(tmp_path / "store"), device="cpu", force=False)
    assert execute(_judging_stage(0.1), args) == 0
    status = store.get_json(layout.status_key(RUN, "ot"))
    assert status["state"] == "succeeded"
    assert [(c.check, c.verdict) for c in from_status(status)] == [("coverage", "fail")]
    assert execute(_judging_stage(0.9), args) == 0  # cached: the work (and verdict) stand
    status = store.get_json(layout.status_key(RUN, "ot"))
    assert status["state"] == "cached"
    assert [c.verdict for c in from_status(status)] == ["fail"]
    assert [c.check for c in run_checks(store, RUN)] == ["coverage"]
    assert run_checks(store, RUN, exclude=["ot"]) == []


def test_the_report_gathers_every_stage_and_opens_with_the_bad_ones(tmp_path):
    store = open_store(tmp_path / "store")
    sae_fail = at_least("sae", "explained_variance", -1.32, what="explained variance",
                        fix="train on more tokens", fail=0.5, warn=0.8)  # fmt: skip
    ok = at_most("ot", "unconverged_share", 0.0, what="unconverged", fix="-", warn=0.01)
    store.put_json(layout.status_key(RUN, "sae", "layer-01"),
                   {"stage": "sae", "quality": [{**sae_fail.to_json(), "shard": "layer-01"}]})  # fmt: skip
    store.put_json(layout.status_key(RUN, "ot"), {"stage": "ot", "quality": [ok.to_json()]})
    stale = at_least("evaluate", "old", 0.0, what="old", fix="-", fail=1.0)
    store.put_json(layout.status_key(RUN, "evaluate"),
                   {"stage": "evaluate", "quality": [stale.to_json()]})  # fmt: skip
    report = _bare_report()
    report.data["hmm"] = _hmm(4, 79, 9, 8)
    quality(report, store, RUN)
    checks = report.data["quality"]
    assert [(c["stage"], c["verdict"]) for c in checks] == [
        ("sae", "fail"), ("evaluate", "fail"), ("ot", "ok"),
    ]  # fmt: skip
    assert report.data["quality_summary"] == {"ok": 1, "warn": 0, "fail": 2}
    assert [c.check for c in report.own_checks] == ["hmm_parameters_per_value"]
    html = render_html(report)
    banner = html[html.index('<div id="quality"') : html.index("<nav>")]
    assert 'class="fail"' in banner and "2 fail, 0 warn, 1 ok" in banner
    assert "sae[layer-01]" in banner and "train on more tokens" in banner
    assert "unconverged" not in banner  # oks are counted, not listed


def test_a_clean_report_says_so():
    report = _bare_report()
    ok = at_most("ot", "x", 0.0, what="x", fix="-", warn=0.1)
    report.data["quality"] = [ok.to_json()]
    assert 'id="quality" class="ok"' in render_html(report)


def test_driftlab_run_lists_fails_then_warns(capsys):
    warn = at_most("detect", "ci", 1.0, what="ci", fix="more samples", warn=0.5)
    fail = at_least("train", "acc", 0.0, what="accuracy", fix="train longer", fail=0.1)
    ok = at_most("ot", "x", 0.0, what="x", fix="-", warn=0.1)
    _print_problems([warn, ok, fail])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "quality: 1 fail, 1 warn, 1 ok"
    assert lines[1].strip().startswith("FAIL train acc") and "train longer" in lines[1]
    assert lines[2].strip().startswith("WARN detect ci")
    assert problems([ok]) == []
