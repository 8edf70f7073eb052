"""The evaluator: detection metrics against scikit-learn, phase agreement, the report and
its partial forms, the stage's errors, and `driftlab compare`."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

from cli.main import main as cli_main
from services.evaluator import agreement, detection, sections
from services.evaluator.__main__ import EVALUATE
from services.evaluator.explorer import FEATURES_PER_LAYER
from services.evaluator.report import SECTION_IDS, render_html
from services.evaluator.sections import Report
from shared import hidden, layout
from shared.auroc import (
    auroc,
    bootstrap_ci,
    clustered_difference_ci,
    paired_difference_ci,
    resampled_aurocs,
)
from shared.sae.artifacts import load_sae
from shared.spec import EvaluateSpec
from shared.stage import stage_main
from tests.evaluator_run import (
    JUMP_AT,
    LOSS_SPIKE_AT,
    N_TOKENS,
    SAE_LAYER,
    STEPS,
    detection_rows,
    make_run,
)

RNG = np.random.default_rng(7)
LABELS = RNG.integers(0, 2, 120)
SCORES = np.round(LABELS * 0.8 + RNG.normal(size=120), 1)  # rounded: many ties


def _evaluate(store, run_id, *extra):
    return stage_main(EVALUATE, ["--run", run_id, "--store", store.url, "--device", "cpu", *extra])


def test_auroc_is_undefined_with_one_class_and_checks_its_labels():
    assert auroc(LABELS, SCORES) == pytest.approx(roc_auc_score(LABELS, SCORES), abs=1e-12)
    assert np.isnan(auroc(np.ones(5), np.arange(5.0)))
    with pytest.raises(ValueError, match=r"0 \(negative\) or 1"):
        auroc([0, 2], [0.1, 0.2])


def test_resampled_aurocs_match_sklearn_weighted_by_the_draws_with_ties():
    """The vectorised replicates are roc_auc_score with each answer weighted by how often
    the replicate drew it: ties (rounded scores) count one half, as in sklearn."""
    pos, neg = SCORES[LABELS == 1], SCORES[LABELS == 0]
    rng = np.random.default_rng(3)
    pos_draws = rng.integers(0, pos.size, (5, pos.size))
    neg_counts = rng.multinomial(neg.size, np.full(neg.size, 1 / neg.size), size=5)
    values = resampled_aurocs(pos, neg, pos_draws, neg_counts)
    y = np.r_[np.ones(pos.size), np.zeros(neg.size)]
    for r in range(5):
        weights = np.r_[np.bincount(pos_draws[r], minlength=pos.size), neg_counts[r]]
        expected = roc_auc_score(y, np.r_[pos, np.sort(neg)], sample_weight=weights)
        assert values[r] == pytest.approx(expected, abs=1e-12)


def test_threshold_rules_pick_the_best_distinct_score_and_count_at_or_above_it():
    candidates = np.unique(SCORES)[::-1]  # high to low: ties go to the highest
    f1s = [f1_score(LABELS, t <= SCORES) for t in candidates]
    threshold = detection.choose_threshold(LABELS, SCORES, EvaluateSpec(threshold="f1"))
    assert threshold is not None and threshold == candidates[int(np.argmax(f1s))]
    counts = detection.confusion(LABELS, SCORES, threshold)
    flagged = threshold <= SCORES
    assert counts == {
        "tp": np.sum(flagged & (LABELS == 1)),
        "fp": np.sum(flagged & (LABELS == 0)),
        "tn": np.sum(~flagged & (LABELS == 0)),
        "fn": np.sum(~flagged & (LABELS == 1)),
    }
    assert detection.prf(counts)["f1"] == pytest.approx(max(f1s))
    youdens = [
        np.mean(SCORES[LABELS == 1] >= t) - np.mean(SCORES[LABELS == 0] >= t) for t in candidates
    ]
    youden = detection.choose_threshold(LABELS, SCORES, EvaluateSpec(threshold="youden"))
    assert youden == candidates[int(np.argmax(youdens))]
    fixed = EvaluateSpec(threshold="fixed", threshold_value=0.3)
    assert detection.choose_threshold(LABELS, SCORES, fixed) == 0.3
    assert detection.choose_threshold(np.ones(4), SCORES[:4], EvaluateSpec()) is None


def test_bootstrap_ci_contains_estimate_and_narrows_with_data():
    ci = bootstrap_ci(LABELS, SCORES, 300, seed=1)
    assert ci is not None
    low, high = ci
    assert low < auroc(LABELS, SCORES) < high
    big_y = np.tile(LABELS, 10)
    big_s = np.tile(SCORES, 10) + RNG.normal(scale=1e-3, size=1200)
    big = bootstrap_ci(big_y, big_s, 300, seed=1)
    assert big is not None
    b_low, b_high = big
    assert b_high - b_low < (high - low) / 2
    assert bootstrap_ci(np.ones(5), np.arange(5.0), 100) is None


def test_paired_difference_ci_is_the_percentile_interval_of_same_draw_differences():
    other = np.round(LABELS * 0.3 + RNG.normal(size=120), 1)  # a weaker score, ties too
    got = paired_difference_ci(LABELS, SCORES, other, 200, seed=3)
    # the same draws by hand, each replicate scored by scikit-learn
    rng = np.random.default_rng(3)
    pos, neg = np.flatnonzero(LABELS == 1), np.flatnonzero(LABELS == 0)
    pos_draws = rng.integers(0, pos.size, (200, pos.size))
    neg_draws = rng.integers(0, neg.size, (200, neg.size))
    diffs = []
    for p_draw, n_draw in zip(pos_draws, neg_draws, strict=True):
        rows = np.concatenate([pos[p_draw], neg[n_draw]])
        y = LABELS[rows]
        diffs.append(roc_auc_score(y, SCORES[rows]) - roc_auc_score(y, other[rows]))
    assert got is not None
    assert got == pytest.approx(tuple(np.quantile(diffs, [0.025, 0.975])), abs=1e-12)
    assert got[0] > 0  # the stronger score wins beyond the noise
    # a score sharing most of SCORES' errors: pairing cancels them, two separate
    # intervals would not
    close = SCORES + RNG.normal(scale=0.3, size=120)
    paired = paired_difference_ci(LABELS, SCORES, close, 200, seed=3)
    separate = bootstrap_ci(LABELS, SCORES, 200, seed=3)
    assert paired is not None and separate is not None
    assert paired[1] - paired[0] < (separate[1] - separate[0]) / 2
    assert paired_difference_ci(LABELS, SCORES, SCORES, 50) == (0.0, 0.0)
    assert paired_difference_ci(np.ones(5), np.arange(5.0), np.arange(5.0), 50) is None


def test_clustered_interval_counts_questions_not_their_repeated_answers():
    other = np.round(LABELS * 0.3 + RNG.normal(size=120), 1)
    questions = [f"q{i}" for i in range(120)]
    one_each = clustered_difference_ci(LABELS, SCORES, other, questions, 400, seed=2)
    # eight identical answers per question: the same evidence as one answer each
    y8, a8, b8 = (np.repeat(v, 8) for v in (LABELS, SCORES, other))
    q8 = np.repeat(questions, 8).tolist()
    by_question = clustered_difference_ci(y8, a8, b8, q8, 400, seed=2)
    by_answer = paired_difference_ci(y8, a8, b8, 400, seed=2)
    assert one_each is not None and by_question is not None and by_answer is not None
    assert by_question == pytest.approx(one_each)  # repeats add nothing
    width = by_question[1] - by_question[0]
    assert by_answer[1] - by_answer[0] < width / 2  # answers alone: far too sure
    point = auroc(LABELS, SCORES) - auroc(LABELS, other)
    assert by_question[0] < point < by_question[1]
    assert clustered_difference_ci(LABELS[:3], SCORES[:3], other[:3], questions[:3], 50) is None


def test_detection_uses_train_threshold_on_test_and_drops_no_answers():
    rows = detection_rows()
    spec = EvaluateSpec(bootstrap=20)
    result = detection.score_metrics(rows, "detector", spec)
    train = detection.split_scores(rows, "detector", "train")
    test = detection.split_scores(rows, "detector", "test")
    assert result["threshold"] == detection.choose_threshold(train.labels, train.values, spec)
    assert result["auroc"] == pytest.approx(roc_auc_score(test.labels, test.values))
    assert result["pr_auc"] == pytest.approx(average_precision_score(test.labels, test.values))
    n_test = sum(1 for r in rows if r["split"] == "test" and r["label"] != "no-answer")
    assert result["n_test"] == n_test and sum(result["confusion"].values()) == n_test


def test_pair_agreement_counts_matches_within_tolerance():
    checkpoints = [0, 10, 20, 30, 40, 50]
    near = agreement.pair_agreement(checkpoints, [20], [30, 50], tolerance=1)
    assert (near["a_matched"], near["b_matched"], near["agreement"]) == (1, 1, pytest.approx(2 / 3))
    assert agreement.pair_agreement(checkpoints, [20], [40], tolerance=1)["agreement"] == 0
    assert agreement.pair_agreement(checkpoints, [], [], tolerance=1)["agreement"] is None
    assert agreement.accuracy_jumps([0, 1, 2, 3], [0.1, 0.12, 0.8, 0.81]) == [2]
    assert agreement.accuracy_jumps([0, 1, 2], [0.1, 0.11, 0.12]) == []


def test_loss_spikes_are_tenfold_rises_counted_once_and_dated_by_the_next_checkpoint():
    """The grokking runs' slingshots: a loss resting near 5e-5 jumps to 0.03 for two logged
    rows and decays; an ordinary noisy descent is no spike."""
    steps = list(range(0, 200, 10))
    losses = [5e-5] * 20
    losses[12:15] = [0.03, 0.002, 4e-4]  # steps 120-140: one spike, not three
    (spike,) = agreement.loss_spikes(steps, losses)
    assert spike == {"step": 120, "loss": 0.03, "before": 5e-5}
    # A diverged row is skipped, not a spike, and does not hide the next one.
    losses[16:18] = [float("nan"), float("inf")]
    assert [s["step"] for s in agreement.loss_spikes(steps, losses)] == [120]
    losses[18] = 0.03
    assert [s["step"] for s in agreement.loss_spikes(steps, losses)] == [120, 180]
    noisy = 2.0 * np.exp(-np.arange(200) / 50) * (1 + 0.3 * RNG.standard_normal(200))
    assert agreement.loss_spikes(list(range(200)), list(np.abs(noisy))) == []
    # Reported at the first checkpoint at or after the spike; none after the last one.
    assert agreement.spike_checkpoints([0, 100, 200], [120, 130, 200, 250]) == [200]
    assert agreement.spike_checkpoints([0, 100, 200], [100]) == [100]


def test_significant_ot_change_points_test_each_curve_against_its_own_baseline():
    # The demo's shape: the embeddings' split-half baseline is large, so the mean curve's
    # baseline hides a change that layer 1 shows far above its own.
    def point(step, exceeds):
        return {"step": step, "exceeds_baseline": exceeds}

    phases = {
        "curves": {
            "layer-00": {"change_points": [point(300, False)]},
            "layer-01": {"change_points": [point(100, True), point(300, True)]},
            "mean": {"change_points": [point(100, True), point(300, False), point(350, False)]},
        }
    }
    assert agreement.significant_ot_change_points(phases) == [
        {"step": 100, "curves": ["layer-01", "mean"]},
        {"step": 300, "curves": ["layer-01"]},
    ]
    assert agreement.significant_ot_change_points({**phases, "depth_only": True}) == []


def test_report_page_escapes_what_the_run_wrote():
    """The run's strings (ids, notes, spec values) are text, never markup, and the
    explorer's JSON cannot close its script element."""
    hostile = "</script><b>x</b>&"
    explorer = {"notes": [hostile], "steps": [0], "layers": [1], "cells": {"0/1": hostile}}
    report = Report(
        "run<1>",
        data={"spec": {"name": hostile}, "explorer": explorer},
        absent={sid: hostile for sid in SECTION_IDS if sid not in ("spec", "explorer")},
    )
    html = render_html(report)
    assert "<b>" not in html and "run&lt;1&gt;" in html
    assert html.count("&lt;/script&gt;&lt;b&gt;x&lt;/b&gt;&amp;") == len(SECTION_IDS)
    data = html[html.index('id="explorer-data">') : html.index("</script>")]
    assert "</" not in data and "\\u003c/script\\u003e" in data


def test_full_report_has_every_section_and_agreeing_phases(store):
    run_id = make_run(store)
    assert _evaluate(store, run_id) == 0
    report = store.get_json(layout.evaluate_report_json_key(run_id))
    assert report["absent"] == {}
    dynamics = report["dynamics"]  # the phase figure's weight norm: the dynamics' l2 rows
    assert dynamics["weight_norm"] == dynamics["features"]["l2"]
    assert len(dynamics["weight_norm"]) == len(dynamics["steps"]) > 1
    phases = report["phases"]
    assert phases["sources"]["ot"] == [40] and phases["sources"]["accuracy"] == [40]
    # Two logged spiking losses are one spike, seen first by the checkpoint after it.
    (spike,) = report["training"]["loss_spikes"]
    assert spike["step"] == LOSS_SPIKE_AT and spike["loss"] > 10 * spike["before"]
    assert phases["sources"]["loss_spikes"] == [JUMP_AT]
    assert phases["crossing"]["nearest"]["loss_spikes"] == {
        "step": JUMP_AT,
        "offset_checkpoints": 0,
    }
    assert all(p["agreement"] == 1.0 for p in phases["pairs"] if "hmm" not in (p["a"], p["b"]))
    scores = report["detection"]["scores"]
    assert scores["detector"]["auroc"] > scores["baseline_random"]["auroc"]
    assert report["detection"]["no_answer_excluded"] > 0
    cells = report["explorer"]["cells"]
    assert set(report["explorer"]["sae_layers"]) == {1}
    assert "features" in cells[f"{STEPS[-1]}/1"] and "features" not in cells[f"{STEPS[-1]}/0"]
    assert cells[f"{STEPS[-1]}/1"]["stats"]["tokens"] == N_TOKENS  # an int, not 32.0
    # The spec section holds every value: the tags' values, and the resolved spec's YAML.
    assert report["spec"]["tags"] == {"purpose": "test"}
    html = store.get_text(layout.evaluate_report_html_key(run_id))
    resolved = html[html.index('<details id="spec-resolved">') : html.index("</details>")]
    assert "purpose: test" in resolved and "max_components: 3" in resolved
    # Every figure says what to look for: training, dynamics, ROC, PR, the HMM's graph and
    # curves, the phases (the synthetic OT stage draws no plots).
    captions = re.findall(r"<figure>.*?<figcaption>([^<]*)</figcaption></figure>", html, re.S)
    assert len(captions) == html.count("<figure>") == 7 and all(len(c) > 40 for c in captions)
    assert all(f'<section id="{sid}">' in html for sid in SECTION_IDS)
    # Nothing is fetched from anywhere: no linked stylesheet, script or image.
    for fetch in ('src="http', "src='http", 'href="http', "<link", "<script src", "url(http"):
        assert fetch not in html
    assert store.exists(layout.evaluate_plot_key(run_id, "detection_roc"))
    assert store.exists(layout.evaluate_done_key(run_id))
    check_feature_cards(store, run_id, report["explorer"])


def test_training_figure_legend_names_every_line_of_both_axes(store, monkeypatch):
    """Eval accuracy is drawn on a twin axis, whose lines ax.legend() alone would miss."""
    import matplotlib.pyplot as plt

    run_id = make_run(store, ot=False, sae=False, detect=False)
    legends = []

    def draw_and_read_legend(draw, size=(6.0, 3.6)):
        fig, ax = plt.subplots(figsize=size)
        draw(ax)
        legend = ax.get_legend()
        assert legend is not None, "the training figure has no legend"
        legends.append([text.get_text() for text in legend.get_texts()])
        plt.close(fig)
        return b""

    monkeypatch.setattr(sections, "_png", draw_and_read_legend)
    sections.training(Report(run_id), store, run_id)
    assert legends == [["train loss", "eval loss", "eval accuracy"]]


def check_feature_cards(store, run_id: str, explorer: dict) -> None:
    """Each card applies the SAE of its checkpoint to every checkpoint's hidden states."""
    sae = explorer["saes"]["1"]
    assert sae["step"] == STEPS[-1] and sae["logit_note"] is None
    assert 0 < sae["shown"] <= min(FEATURES_PER_LAYER, 16)
    cards = explorer["features"]
    assert len(cards) == sae["shown"]
    states = {step: hidden.load_hidden(store, run_id, step, SAE_LAYER) for step in STEPS}
    model = load_sae(store, run_id, SAE_LAYER)
    for key, entry in cards.items():
        assert key == f"1/{entry['feature']}"
        assert [t["step"] for t in entry["trajectory"]] == STEPS
        for point in entry["trajectory"]:
            with torch.no_grad():
                column = model.features(states[point["step"]])[:, entry["feature"]]
            # The page's numbers are rounded to 4 significant digits.
            assert point["mean"] == pytest.approx(float(column.mean()), rel=1e-3)
            assert point["density"] == pytest.approx(float((column > 0).float().mean()), rel=1e-3)
        (at_sae,) = [t for t in entry["trajectory"] if t["step"] == sae["step"]]
        assert entry["density"] == at_sae["density"]
        assert sum(entry["histogram"]["counts"]) == round(entry["density"] * N_TOKENS)
        assert len(entry["promoted"]) == len(entry["suppressed"]) == 8
        assert entry["promoted"][0][1] >= entry["promoted"][-1][1] > entry["suppressed"][0][1]
        activations = [c["activation"] for c in entry["contexts"]]
        assert activations == sorted(activations, reverse=True) and activations[0] > 0


def test_partial_report_says_what_is_absent(store):
    run_id = make_run(store, ot=False, sae=False, detect=False)
    assert _evaluate(store, run_id) == 0
    report = store.get_json(layout.evaluate_report_json_key(run_id))
    assert {"drift", "sae", "detection"} <= set(report["absent"])
    assert "services.ot" in report["absent"]["drift"]
    assert "ot" in report["phases"]["absent"]
    html = store.get_text(layout.evaluate_report_html_key(run_id))
    assert html.count('class="absent"') >= 3
    # OT finishing later invalidates the cached report.
    from tests.evaluator_run import write_ot

    write_ot(store, run_id)
    assert _evaluate(store, run_id) == 0
    assert "drift" not in store.get_json(layout.evaluate_report_json_key(run_id))["absent"]


def test_a_run_without_detection_says_it_is_off(store):
    run_id = make_run(store, detect=False, overrides={"detect.enabled": False})
    assert _evaluate(store, run_id) == 0
    absent = store.get_json(layout.evaluate_report_json_key(run_id))["absent"]
    assert set(absent) == {"detection"}
    assert "detect.enabled: false" in absent["detection"]


def test_missing_training_is_one_line_naming_the_trainer(store, capsys):
    run_id = make_run(store, ot=False, sae=False, detect=False)
    store.delete(layout.train_done_key(run_id))
    assert _evaluate(store, run_id) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "python -m services.trainer" in err[0]
    assert not store.exists(layout.evaluate_report_json_key(run_id))


def test_report_and_compare_commands(store, capsys):
    run_a = make_run(store, seed=0)
    run_b = make_run(store, seed=1, detect=False)
    assert cli_main(["report", run_a, "--store", store.url]) == 0
    assert capsys.readouterr().out.strip().endswith("evaluate/report.html")
    assert cli_main(["compare", run_a, run_b, "--store", store.url]) == 0
    out = capsys.readouterr().out
    assert run_a in out and run_b in out and "auroc_detector" in out
    page = store.get_text(layout.comparison_key([run_a, run_b], "compare.html"))
    assert run_b in page
    rows = store.get_json(layout.comparison_key([run_a, run_b], "compare.json"))
    assert rows[0]["auroc_detector"] is not None and "auroc_detector" not in rows[1]
    assert rows[0]["sae_ev@0.5"] == 0.8 and rows[0]["drift_change_points"] == 1


def test_report_shows_the_ensemble_hmm_of_driftlab_hmm_and_keeps_it(store, capsys):
    run_a = make_run(store, seed=0, sae=False, detect=False)
    run_b = make_run(store, seed=1, sae=False, detect=False)
    assert _evaluate(store, run_a) == 0  # the evaluator's own single-run fit comes first
    single = store.get_json(layout.evaluate_hmm_key(run_a, "analysis.json"))
    assert list(single["runs"]) == [run_a]
    assert cli_main(["hmm", "--runs", run_a, run_b, "--store", store.url, "--restarts", "1"]) == 0
    ensemble = store.get_json(layout.evaluate_hmm_key(run_a, "analysis.json"))
    assert cli_main(["report", run_a, "--store", store.url]) == 0
    capsys.readouterr()
    # Rebuilding the report reuses the two-run fit instead of overwriting it.
    assert store.get_json(layout.evaluate_hmm_key(run_a, "analysis.json")) == ensemble
    report = store.get_json(layout.evaluate_report_json_key(run_a))
    assert report["hmm"]["ensemble_of"] == sorted([run_a, run_b])
    assert report["phases"]["sources"]["hmm"] == ensemble["state_changes"][run_a]
    html = store.get_text(layout.evaluate_report_html_key(run_a))
    assert "over 2 runs" in html and "<svg" in html


def test_a_stage_left_running_reads_stale_in_the_report_banner(store):
    """SAE killed mid-layer: the evaluator (optional inputs) reports without it and says so."""
    run_id = make_run(store, sae=False)
    status = {"stage": "sae", "shard": "layer-01", "state": "running",
              "started_at": "2026-12-05T08:00:00.000Z", "run_id": run_id}  # fmt: skip
    store.put_json(layout.status_key(run_id, "sae", "layer-01"), status)
    assert _evaluate(store, run_id) == 0
    report = store.get_json(layout.evaluate_report_json_key(run_id))
    (stale,) = [q for q in report["quality"] if q["check"] == "finished"]
    assert (stale["stage"], stale["shard"], stale["verdict"]) == ("sae", "layer-01", "warn")
    assert stale["message"].startswith("stale (last seen 2026-12-05T08:00:00.000Z)")
    assert f"--run {run_id}" in stale["message"]
    html = store.get_text(layout.evaluate_report_html_key(run_id))
    banner = html[: html.index("</section>")]
    assert "stale (last seen 2026-12-05T08:00:00.000Z)" in banner
