"""Detection: hypothesis tracking on hand-made activations, the question-level split, the
detector on planted signals, and `python -m services.sae detect` on a tiny facts run."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from services.extractor.__main__ import EXTRACT
from services.sae.__main__ import DETECT
from services.sae.__main__ import TRAIN as SAE_TRAIN
from services.sae.detector import TEST, TRAIN, best_layer, fit_and_score, split_by_question
from services.sae.signals import tracking_signals
from services.sae.tracking import (
    churn,
    hypothesis_entropy,
    layer_tracks,
    linked_churn,
    step_hypotheses,
    track_answer,
    unit_rows,
)
from services.trainer.__main__ import TRAIN as TRAINER
from shared import layout
from shared.auroc import auroc
from shared.stage import stage_main
from shared.store import open_store
from tests.support import TINY_DETECT_RUN, register_run

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# -- tracking on hand-made activations ---------------------------------------------------

# 4 steps x 6 features: step 0 {1: 2, 3: 2}, step 1 {1: 1.5, 3: 1, 4: 2, 5: 0.5},
# step 2 {1: 3}, step 3 nothing (negative values are not active).
ACTS = torch.tensor(
    [
        [0.0, 2.0, 0.0, 2.0, 0.0, 0.0],
        [0.0, 1.5, 0.0, 1.0, 2.0, 0.5],
        [0.0, 3.0, 0.0, 0.0, 0.0, 0.0],
        [-1.0, 0.0, 0.0, 0.0, 0.0, -2.0],
    ]
)


def test_hypotheses_keep_the_k_largest_active_features():
    steps = step_hypotheses(ACTS, k=3)
    assert steps == [{1: 2.0, 3: 2.0}, {4: 2.0, 1: 1.5, 3: 1.0}, {1: 3.0}, {}]


def test_entropy_and_churn_of_hand_made_steps():
    steps = step_hypotheses(ACTS, k=3)
    assert hypothesis_entropy(steps[0]) == pytest.approx(math.log(2))
    p = np.array([2.0, 1.5, 1.0]) / 4.5
    assert hypothesis_entropy(steps[1]) == pytest.approx(float(-(p * np.log(p)).sum()))
    assert hypothesis_entropy(steps[2]) == 0.0
    assert hypothesis_entropy(steps[3]) == 0.0
    assert churn(steps[0], steps[1]) == pytest.approx(1 - 2 / 3)
    assert churn(steps[1], steps[2]) == pytest.approx(1 - 1 / 3)
    assert churn(steps[2], steps[3]) == 1.0
    assert churn({}, {}) == 0.0


def test_tracks_have_birth_death_length_and_mass():
    tracks = layer_tracks(5, step_hypotheses(ACTS, k=3))
    got = {(t.feature, t.birth, t.death, t.length, t.mass) for t in tracks}
    assert got == {(1, 0, 2, 3, 6.5), (3, 0, 1, 2, 3.0), (4, 1, 1, 1, 2.0)}
    assert all(t.layer == 5 for t in tracks)
    # A feature that leaves and comes back starts a second track.
    again = layer_tracks(0, [{7: 1.0}, {}, {7: 2.0}])
    assert [(t.birth, t.death, t.mass) for t in again] == [(0, 0, 1.0), (2, 2, 2.0)]


def test_layers_link_through_aligned_decoders():
    eye = torch.eye(4)
    # layer 1: features 0, 1 write e0, e1; layer 2: feature 0 writes e0, 1 writes -e1,
    # 2 writes e2: only (0, 0) is aligned.
    directions = {1: unit_rows(eye[:2] * 3.0), 2: unit_rows(torch.stack([eye[0], -eye[1], eye[2]]))}
    features = {
        1: torch.tensor([[1.0, 1.0], [1.0, 0.0]]),
        2: torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]),
    }
    tracking = track_answer(features, directions, k=4, threshold=0.5)
    assert [(k.step, k.layer_a, k.feature_a, k.layer_b, k.feature_b) for k in tracking.links] == [
        (0, 1, 0, 2, 0)
    ]
    assert tracking.links[0].cosine == pytest.approx(1.0)
    # step 0: {0, 1} vs {0, 1}, one pair linked: shared 1 of union 3
    assert linked_churn({0: 1.0, 1: 1.0}, {0: 1.0, 1: 1.0}, [(0, 0, 1.0)]) == pytest.approx(2 / 3)
    assert linked_churn({0: 1.0}, {0: 1.0}, [(0, 0, 1.0)]) == 0.0
    assert linked_churn({0: 1.0}, {2: 1.0}, []) == 1.0
    signals = tracking_signals(tracking)
    # step 0 churn 2/3, step 1 ({0} vs {2}, not linked) 1 -> mean 5/6
    assert signals["churn_layer_mean"] == pytest.approx(5 / 6)
    # layer 1 steps {0, 1} -> {0}: churn 1/2; layer 2 {0, 1} -> {2}: churn 1
    assert signals["churn_step_mean_l01"] == pytest.approx(0.5)
    assert signals["churn_step_max"] == 1.0
    assert signals["hyp_entropy_max"] == pytest.approx(math.log(2))


def test_signals_of_one_layer():
    tracking = track_answer({3: ACTS}, {3: unit_rows(torch.randn(6, 4))}, k=3, threshold=0.5)
    s = tracking_signals(tracking)
    entropies = [hypothesis_entropy(step) for step in tracking.steps[3]]
    assert s["hyp_entropy_mean"] == pytest.approx(np.mean(entropies))
    assert s["hyp_entropy_mean_l03"] == s["hyp_entropy_mean"]
    assert s["churn_step_mean"] == pytest.approx(np.mean([1 / 3, 2 / 3, 1.0]))
    assert s["churn_layer_mean"] == 0.0  # one layer: nothing to compare with
    # tracks of length 3, 2, 1 in 4 steps
    assert s["track_transience"] == pytest.approx(1 - np.mean([3 / 4, 2 / 4, 1 / 4]))
    assert s["track_births_per_step"] == pytest.approx(3 / 4)
    assert s["tracks_concurrent_mean"] == pytest.approx((2 + 3 + 1 + 0) / 4)


# -- split and detector ------------------------------------------------------------------


def test_split_is_by_question_stratified_and_seeded():
    labels = {f"q{i:03d}": ("hallucinated" if i % 3 else "correct") for i in range(90)}
    split = split_by_question(labels, 0.3, seed=0)
    assert set(split) == set(labels)
    for label in ("correct", "hallucinated"):
        ids = [q for q in labels if labels[q] == label]
        n_test = sum(split[q] == TEST for q in ids)
        assert n_test == round(0.3 * len(ids))
    assert split == split_by_question(labels, 0.3, seed=0)
    assert split != split_by_question(labels, 0.3, seed=1)
    # a class with a single question cannot be on both sides: it stays in train
    assert (
        split_by_question({"a": "correct", "b": "hallucinated", "c": "hallucinated"}, 0.5, 0)["a"]
        == TRAIN
    )


def test_grouped_questions_stay_on_one_side_and_ungrouped_splits_do_not_change():
    labels = {f"q{i:03d}": ("hallucinated" if i % 2 else "correct") for i in range(60)}
    pairs = {q: f"pair{int(q[1:]) // 2}" for q in labels}  # (known land, its twin)
    split = split_by_question(labels, 0.3, seed=0, group_of=pairs)
    for pair in set(pairs.values()):
        assert len({split[q] for q in labels if pairs[q] == pair}) == 1
    assert sum(side == TEST for side in split.values()) == 2 * round(0.3 * 30)
    # every question its own group: exactly the split without groups
    alone = {q: q for q in labels}
    assert split_by_question(labels, 0.3, 0, alone) == split_by_question(labels, 0.3, 0)


def _planted(n_questions: int, samples: int, seed: int):
    rng = np.random.default_rng(seed)
    x_q = rng.normal(size=(n_questions, 6))
    x = np.repeat(x_q, samples, axis=0) + 0.05 * rng.normal(size=(n_questions * samples, 6))
    y = (x[:, 2] > 0).astype(int)  # the label is a known function of feature 2
    groups = [f"q{i}" for i in range(n_questions) for _ in range(samples)]
    return x, y, groups


def test_planted_feature_is_detected_and_a_random_one_is_not():
    x, y, groups = _planted(200, 2, seed=0)
    greedy = {g: ("hallucinated" if yy else "correct") for g, yy in zip(groups, y, strict=True)}
    split = split_by_question(greedy, 0.3, seed=0)
    side = np.array([split[g] for g in groups])
    train, test = side == TRAIN, side == TEST
    assert not {g for g, s in zip(groups, side, strict=True) if s == TRAIN} & {
        g for g, s in zip(groups, side, strict=True) if s == TEST
    }
    scores = fit_and_score(x[train], y[train], x, seed=0)
    assert auroc(y[test], scores[test]) > 0.97
    noise = np.random.default_rng(1).normal(size=(len(y), 1))
    random_scores = fit_and_score(noise[train], y[train], noise, seed=0)
    assert 0.35 < auroc(y[test], random_scores[test]) < 0.65


def test_dense_probe_picks_the_layer_that_carries_the_label():
    x, y, groups = _planted(120, 1, seed=2)
    rng = np.random.default_rng(3)
    layers = [rng.normal(size=(len(y), 8)) for _ in range(3)]
    layers[1][:, 5] = x[:, 2]
    layer, aurocs = best_layer(layers, y, groups, seed=0)
    assert layer == 1
    assert aurocs[1] > 0.95 and max(aurocs[0], aurocs[2]) < 0.75


# -- the stage on a tiny facts run -------------------------------------------------------

TINY = {
    "data.dataset": "facts",
    "data.max_length": 48,
    "train.batch_size": 16,
    "train.warmup_steps": 5,
    "sae.batch_size": 64,
    "sae.epochs": 10,
    "detect.max_new_tokens": 8,
    "detect.bootstrap": 100,
}


def _args(store, run_id):
    return ["--run", run_id, "--store", store.url]


def _trained(store, overrides):
    run_id = register_run(store, {**TINY, **overrides})
    assert stage_main(TRAINER, _args(store, run_id)) == 0
    assert stage_main(EXTRACT, _args(store, run_id)) == 0
    return run_id


def _error_line(capsys) -> str:
    """The stage's one-line error: the last line on stderr (log lines go there too)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def test_clear_errors_missing_checkpoint_missing_sae_one_class(tmp_path, capsys):
    store = open_store(str(tmp_path / "store"))
    untrained = register_run(store, TINY)
    assert stage_main([SAE_TRAIN, DETECT], ["detect", *_args(store, untrained)]) != 0
    err = _error_line(capsys)
    assert "no finished checkpoint" in err and "python -m services.trainer" in err

    run_id = _trained(
        store,
        {
            "data.facts_entities": 16,
            "data.train_samples": 160,
            "data.eval_samples": 16,
            "extract.probe_samples": 16,
            "train.steps": 20,
            "train.checkpoint_every": 20,
            "sae.layers": [1, 2],
            "detect.samples": 8,
        },
    )
    assert stage_main([SAE_TRAIN, DETECT], ["train", *_args(store, run_id), "--layer", "1"]) == 0
    capsys.readouterr()
    assert stage_main([SAE_TRAIN, DETECT], ["detect", *_args(store, run_id)]) != 0
    err = _error_line(capsys)
    assert "sae/layer-02/DONE" in err and "--layer 2" in err, err

    assert stage_main([SAE_TRAIN, DETECT], ["train", *_args(store, run_id), "--layer", "2"]) == 0
    capsys.readouterr()
    # 20 steps teach nothing: every answer is wrong, and the stage says what to do.
    assert stage_main([SAE_TRAIN, DETECT], ["detect", *_args(store, run_id)]) != 0
    err = _error_line(capsys)
    assert "error:" in err, err
    assert "labelled answers are hallucinated" in err and "detect.samples" in err, err
    assert not store.exists(layout.detect_done_key(run_id))
    status = store.get_json(layout.status_key(run_id, "detect"))
    assert status["state"] == "failed"


def test_detect_scores_every_answer_on_a_tiny_run(tmp_path):
    """A tiny `modular` run: a briefly trained model's sampled sums are right often
    enough for both classes to occur; the contract of every output, checked in full."""
    store = open_store(str(tmp_path / "store"))
    run_id = _trained(store, TINY_DETECT_RUN)
    assert stage_main([SAE_TRAIN, DETECT], ["train", *_args(store, run_id)]) == 0
    assert stage_main([SAE_TRAIN, DETECT], ["detect", *_args(store, run_id)]) == 0

    generations = [
        json.loads(x) for x in store.get_text(layout.detect_generations_key(run_id)).splitlines()
    ]
    rows = [json.loads(x) for x in store.get_text(layout.detect_scores_key(run_id)).splitlines()]
    assert len(rows) == len(generations) == 24 * 4
    assert {r["sample"] for r in rows} == {0, 1, 2, 3}
    labels = {r["label"] for r in rows}
    assert {"correct", "hallucinated"} <= labels
    for gen, row in zip(generations, rows, strict=True):
        assert (gen["id"], gen["sample"], gen["label"]) == (row["id"], row["sample"], row["label"])
        assert gen["prompt"].endswith("=") and gen["gold"].isdigit()
        assert row["known"] is None  # only facts know which entities were trained on
        assert all(math.isfinite(v) for v in row["scores"].values())
    sides: dict[str, str] = {}
    for row in rows:
        assert sides.setdefault(row["id"], row["split"]) == row["split"]  # never both sides
    names = set(rows[0]["scores"])
    assert {
        "detector", "detector_combined", "hyp_entropy_mean", "churn_step_mean", "churn_layer_mean",
        "baseline_pred_entropy", "baseline_min_token_prob", "baseline_answer_length",
        "baseline_dense_probe", "hyp_entropy_mean_l00", "churn_step_mean_l02",
    } <= names  # fmt: skip
    assert all(-1.0 <= r["scores"]["baseline_min_token_prob"] < 0 for r in rows)

    metrics = store.get_json(layout.detect_metrics_key(run_id))
    assert metrics["positive"] == "hallucinated" and metrics["negative"] == "correct"
    assert set(metrics["scores"]) == names
    for name, m in metrics["scores"].items():
        assert 0.0 <= m["auroc"] <= 1.0 and m["ci95"][0] <= m["ci95"][1], name
        assert m["kind"] == (
            "detector"
            if name in ("detector", "detector_combined")
            else "baseline"
            if name.startswith("baseline_")
            else "signal"
        )
    labelled = [r for r in rows if r["label"] != "no-answer"]
    assert metrics["sizes"]["test"] == sum(r["split"] == "test" for r in labelled)
    assert metrics["sizes"]["train"] + metrics["sizes"]["test"] == len(labelled)
    assert metrics["best_dense_layer"] in range(3)
    versus = metrics["against_best_baseline"]
    baseline_aurocs = {
        n: m["auroc"] for n, m in metrics["scores"].items() if n.startswith("baseline_")
    }
    assert versus["auroc"] == max(baseline_aurocs.values())
    assert baseline_aurocs[versus["baseline"]] == versus["auroc"]
    for name in ("detector", "detector_combined"):
        entry = versus[name]
        difference = metrics["scores"][name]["auroc"] - versus["auroc"]
        assert entry["auroc_difference"] == pytest.approx(difference)
        low, high = entry["ci95"]  # by question: what the verdict takes
        assert low <= high and entry["beats_baseline"] == (low > 0)
        by_answer = entry["ci95_by_answer"]
        assert by_answer[1] - by_answer[0] <= high - low  # 4 answers a question: narrower

    tracks, meta = store.get_tensors(layout.detect_tracks_key(run_id))
    assert len(json.loads(meta["answers"])) == len(rows)
    assert tracks["track_length"].min() >= 1
    assert torch.equal(tracks["track_length"], tracks["track_death"] - tracks["track_birth"] + 1)
    assert (tracks["hyp_activation"] > 0).all()
    status = store.get_json(layout.status_key(run_id, "detect"))
    assert status["state"] == "succeeded"
    # a rerun with the same inputs is cached
    assert stage_main([SAE_TRAIN, DETECT], ["detect", *_args(store, run_id)]) == 0
    assert store.get_json(layout.status_key(run_id, "detect"))["state"] == "cached"


def test_tiny_facts_run_knows_the_trained_lands_and_invents_the_rest(tmp_path):
    """`facts` with its known questions trained (data.facts_asked): both classes occur,
    right answers come from known lands (unknown ones only by a lucky guess), and every
    metric is finite."""
    store = open_store(str(tmp_path / "store"))
    run_id = _trained(
        store,
        {
            "data.facts_entities": 16, "data.facts_asked": True, "data.train_samples": 80,
            "data.eval_samples": 16, "extract.probe_samples": 16,
            "train.steps": 300, "train.checkpoint_every": 300, "train.learning_rate": 3e-3,
            "sae.batch_size": 32, "detect.samples": 16, "detect.num_samples": 4,
            "detect.temperature": 1.0,
        },
    )  # fmt: skip
    assert stage_main([SAE_TRAIN, DETECT], ["train", *_args(store, run_id)]) == 0
    assert stage_main([SAE_TRAIN, DETECT], ["detect", *_args(store, run_id)]) == 0
    rows = [json.loads(x) for x in store.get_text(layout.detect_scores_key(run_id)).splitlines()]
    assert {"correct", "hallucinated"} <= {r["label"] for r in rows}
    assert {r["known"] for r in rows} == {True, False}

    def right(known: bool) -> float:  # share of right answers (a colour can be guessed)
        group = [r for r in rows if r["known"] is known]
        return sum(r["label"] == "correct" for r in group) / len(group)

    assert right(True) >= 0.25 and right(False) <= 0.15
    metrics = store.get_json(layout.detect_metrics_key(run_id))
    assert all(math.isfinite(m["auroc"]) for m in metrics["scores"].values())
