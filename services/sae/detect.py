"""`sae detect`: answer held-out questions, track SAE hypotheses, score hallucinations.

The final checkpoint answers `detect.samples` eval questions (greedy answer = sample 0,
then `detect.num_samples - 1` sampled ones when `detect.temperature` > 0); the task's own
extractor labels each answer correct / hallucinated / no-answer. While it writes, every
tracked layer's residual stream goes through that layer's SAE, and the hypotheses, their
tracks and cross-layer links become per-answer signals (`tracking`, `signals`). The
detector and the dense-probe baseline are fitted on a question-level train split and
every score is judged on the test split (`detector`), with no-answers left out of AUROC.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from services.sae.detect_quality import detection_checks
from services.sae.detector import TEST, TRAIN, best_layer, fit_and_score, split_by_question
from services.sae.generate import Generation, Sampling, generate
from services.sae.plan import detect_layers, final_checkpoint
from services.sae.signals import describe, model_baselines, tracking_signals
from services.sae.tracking import AnswerTracking, track_answer, unit_rows
from shared import layout
from shared.auroc import auroc, bootstrap_ci, clustered_difference_ci, paired_difference_ci
from shared.data import Example, Task, load_task, prompt_ids
from shared.errors import ArtifactNotFound, DriftlabError
from shared.models import load_model
from shared.sae.artifacts import load_sae
from shared.spec import DetectSpec, RunSpec
from shared.stage import StageContext
from shared.store import Store
from shared.telemetry import push_metrics
from shared.tokenizer import load_tokenizer

CORRECT, HALLUCINATED, NO_ANSWER = "correct", "hallucinated", "no-answer"
DETECTOR = "detector"
#: The detector with the model's own baselines as extra inputs: do SAE signals add to them?
COMBINED = "detector_combined"
DENSE_PROBE = "baseline_dense_probe"
TRACKS_FORMAT = 1
#: Prompts generated in one batch (and one progress tick).
BATCH = 32


class DetectionError(DriftlabError):
    """Detection cannot give a meaningful answer on these inputs."""


@dataclass(frozen=True)
class Answer:
    """One generated answer with its label and what was measured while writing it."""

    example: Example
    sample: int
    text: str
    label: str
    generation: Generation
    tracking: AnswerTracking


def run_detect(ctx: StageContext) -> None:
    """The stage's `run`: generations, tracks, scores and metrics of one run."""
    spec, store, run_id = ctx.spec, ctx.store, ctx.run_id
    task = load_task(spec.data)
    if not task.has_answers:
        raise DetectionError(
            f"dataset {task.name} has no answers to label as correct or hallucinated; "
            "detect needs facts, arithmetic, modular or gsm8k"
        )
    step = final_checkpoint(store, run_id, ctx.args.store)
    layers = detect_layers(spec)
    device = torch.device(ctx.device)
    model = load_model(store, run_id, step, device)
    saes = {layer: load_sae(store, run_id, layer, device) for layer in layers}
    _warn_on_other_checkpoint(ctx, layers, step)
    answers = _answer_and_track(ctx, task, model, saes)
    rows, metrics = _score(answers, spec, layers, step)
    _write(store, run_id, answers, rows, metrics)
    detector = metrics["scores"][DETECTOR]
    ctx.headline.update(
        answers=len(answers),
        hallucinated=metrics["class_balance"][HALLUCINATED],
        correct=metrics["class_balance"][CORRECT],
        detector_auroc=round(detector["auroc"], 4),
        dense_probe_auroc=round(metrics["scores"][DENSE_PROBE]["auroc"], 4),
    )
    push_metrics(ctx.stage, run_id, {"driftlab_detect_auroc": detector["auroc"]})
    ctx.judge(*detection_checks(metrics, DETECTOR))
    ctx.log.info(
        "%d answers (%s); test AUROC: detector %.3f, dense probe %.3f (layer %d)",
        len(answers),
        ", ".join(f"{k} {v}" for k, v in metrics["class_balance"].items() if isinstance(v, int)),
        detector["auroc"],
        metrics["scores"][DENSE_PROBE]["auroc"],
        metrics["best_dense_layer"],
    )


def _warn_on_other_checkpoint(ctx: StageContext, layers: Sequence[int], step: int) -> None:
    """SAEs trained on another checkpoint's hidden states still run, with a warning."""
    for layer in layers:
        try:
            report = ctx.store.get_json(layout.sae_config_key(ctx.run_id, layer))
        except ArtifactNotFound:
            continue
        trained_on = report.get("checkpoint_step") if isinstance(report, dict) else None
        if trained_on is not None and trained_on != step:
            ctx.log.warning(
                "the SAE of layer %d was trained on checkpoint step %s, detection uses the "
                "final step %d (set sae.step to %d to match)",
                layer, trained_on, step, step,
            )  # fmt: skip


def _questions(task: Task, count: int, seed: int) -> list[Example]:
    """`count` eval questions, seeded, in the task's order (all of them when fewer)."""
    n = len(task.eval)
    if count >= n:
        return list(task.eval)
    chosen = sorted(random.Random(f"driftlab-detect-{seed}").sample(range(n), count))
    return [task.eval[i] for i in chosen]


def _label(task: Task, example: Example, text: str) -> str:
    if task.extract_answer(text) is None:
        return NO_ANSWER
    assert example.answer is not None  # tasks with answers give every eval example one
    return CORRECT if task.is_correct(text, example.answer) else HALLUCINATED


def _answer_and_track(
    ctx: StageContext, task: Task, model: Any, saes: dict[int, Any]
) -> list[Answer]:
    spec, d = ctx.spec, ctx.spec.detect
    tokenizer = load_tokenizer(spec.data.tokenizer)
    room = model.config.n_positions - d.max_new_tokens
    if room < 1:
        raise DetectionError(
            f"detect.max_new_tokens {d.max_new_tokens} leaves no room for a prompt in the "
            f"model's {model.config.n_positions} positions; lower it"
        )
    examples = _questions(task, d.samples, d.seed)
    if len(examples) < d.samples:
        ctx.log.warning(
            "detect.samples is %d but %s has %d eval questions: using all of them",
            d.samples, task.name, len(examples),
        )  # fmt: skip
    prompts = prompt_ids(examples, tokenizer, room)
    directions = {layer: unit_rows(sae.W_dec) for layer, sae in saes.items()}
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(d.seed)
    answers: list[Answer] = []
    with ctx.progress(total=len(examples) * d.num_samples, unit="answer") as progress:
        for sample in range(d.num_samples):
            sampling = Sampling() if sample == 0 else Sampling(d.temperature, d.top_k, generator)
            for start in range(0, len(examples), BATCH):
                batch = generate(
                    model,
                    prompts[start : start + BATCH],
                    d.max_new_tokens,
                    tokenizer.eos_id,
                    tokenizer.pad_id,
                    sampling,
                    batch_size=BATCH,
                )
                for example, gen in zip(examples[start : start + BATCH], batch, strict=True):
                    text = tokenizer.decode(gen.tokens)
                    with torch.inference_mode():
                        features = {
                            layer: sae.features(gen.hidden[:, layer].to(device)).cpu()
                            for layer, sae in saes.items()
                        }
                    tracking = track_answer(features, directions, d.hypotheses, d.link_cosine)
                    label = _label(task, example, text)
                    answers.append(Answer(example, sample, text, label, gen, tracking))
                progress.update(len(batch))
                progress.inc("driftlab_detect_answers_total", len(batch))
    return answers


def _score(
    answers: list[Answer], spec: RunSpec, layers: list[int], step: int
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Score rows of every answer and the metrics of every score on the test split."""
    d = spec.detect
    labels = [a.label for a in answers]
    counts = {label: labels.count(label) for label in (CORRECT, HALLUCINATED, NO_ANSWER)}
    if counts[CORRECT] == 0 or counts[HALLUCINATED] == 0:
        present = HALLUCINATED if counts[HALLUCINATED] else CORRECT
        raise DetectionError(
            f"all {counts[CORRECT] + counts[HALLUCINATED]} labelled answers are {present} "
            f"({counts[NO_ANSWER]} gave no answer): AUROC needs both classes; raise "
            "detect.samples, sample more answers (detect.num_samples with detect.temperature) "
            "or use another checkpoint"
        )
    greedy = {a.example.id: a.label for a in answers if a.sample == 0}
    pairs = {a.example.id: a.example.meta.get("pair", a.example.id) for a in answers}
    split = split_by_question(greedy, d.test_fraction, d.seed, pairs)
    rows_split = np.array([split[a.example.id] for a in answers])
    labelled = np.array([a.label != NO_ANSWER for a in answers])
    y = np.array([int(a.label == HALLUCINATED) for a in answers])
    train = labelled & (rows_split == TRAIN)
    test = labelled & (rows_split == TEST)
    for name, side in ((TRAIN, train), (TEST, test)):
        if len(set(y[side].tolist())) < 2:
            raise DetectionError(
                f"the {name} split has {int(side.sum())} labelled answers of one class only; "
                "raise detect.samples (or adjust detect.test_fraction) so both splits get "
                "correct and hallucinated answers"
            )

    signals = [tracking_signals(a.tracking) for a in answers]
    baselines = [model_baselines(a.generation) for a in answers]
    x = _matrix(signals)
    detector = fit_and_score(x[train], y[train], x, d.seed)
    x_both = np.hstack([x, _matrix(baselines)])
    combined = fit_and_score(x_both[train], y[train], x_both, d.seed)
    per_layer = np.stack([a.generation.hidden.mean(0).numpy() for a in answers], axis=1)
    groups = [a.example.id for a, keep in zip(answers, train, strict=True) if keep]
    layer, layer_auroc = best_layer([h[train] for h in per_layer], y[train], groups, d.seed)
    dense = fit_and_score(per_layer[layer][train], y[train], per_layer[layer], d.seed)

    rows: list[dict[str, Any]] = []
    for i, a in enumerate(answers):
        scores = {
            DETECTOR: float(detector[i]),
            COMBINED: float(combined[i]),
            **signals[i],
            **baselines[i],
            DENSE_PROBE: float(dense[i]),
        }
        rows.append(
            {
                "id": a.example.id,
                "sample": a.sample,
                "split": str(rows_split[i]),
                "label": a.label,
                "known": _known(a.example),
                "scores": scores,
            }
        )
    metrics = {
        "positive": HALLUCINATED,
        "negative": CORRECT,
        "excluded": "no-answer answers are excluded from AUROC",
        "sizes": {
            "train": int(train.sum()),
            "test": int(test.sum()),
            "no_answer": counts[NO_ANSWER],
        },
        "class_balance": {
            **counts,
            "hallucinated_fraction": counts[HALLUCINATED]
            / (counts[HALLUCINATED] + counts[CORRECT]),
            "train": _balance(y[train]),
            "test": _balance(y[test]),
        },
        "scores": {
            name: _score_metrics(name, y[test], [r["scores"][name] for r in rows], test, d)
            for name in rows[0]["scores"]
        },
        "against_best_baseline": _against_best_baseline(rows, y[test], test, d),
        "best_dense_layer": layer,
        "dense_layer_cv_auroc": [None if not np.isfinite(v) else v for v in layer_auroc],
        "checkpoint_step": step,
        "tracked_layers": layers,
    }
    return rows, metrics


def _matrix(rows: list[dict[str, float]]) -> np.ndarray:
    """[rows, names] of the values, columns in sorted name order."""
    names = sorted(rows[0])
    return np.array([[row[name] for name in names] for row in rows])


def _against_best_baseline(
    rows: list[dict[str, Any]], y_test: np.ndarray, test: np.ndarray, d: DetectSpec
) -> dict[str, Any]:
    """Each detector's test AUROC minus the best baseline's, with paired bootstrap CIs.

    The best baseline is the one with the highest *test* AUROC: picking the comparison on
    the test split favours the baselines, so a detector that beats it with a CI above 0
    beats every baseline. The verdict (`beats_baseline`) takes the interval that resamples
    questions (`ci95`): a question's answers are not independent evidence, and the one
    that resamples answers (`ci95_by_answer`) is too narrow. A CI above 0 is the claim
    "SAE signals add something"; one containing 0 is no evidence either way.
    """

    def test_scores(name: str) -> np.ndarray:
        return np.asarray([r["scores"][name] for r in rows])[test]

    questions = [r["id"] for r, keep in zip(rows, test, strict=True) if keep]
    baselines = [name for name in rows[0]["scores"] if name.startswith("baseline_")]
    best = max(baselines, key=lambda name: auroc(y_test, test_scores(name)))
    best_auroc = auroc(y_test, test_scores(best))
    result: dict[str, Any] = {"baseline": best, "auroc": best_auroc, "resamples": d.bootstrap,
                              "questions": len(set(questions))}  # fmt: skip
    for name in (DETECTOR, COMBINED):
        ours, theirs = test_scores(name), test_scores(best)
        ci = clustered_difference_ci(y_test, ours, theirs, questions, d.bootstrap, seed=d.seed)
        by_answer = paired_difference_ci(y_test, ours, theirs, d.bootstrap, seed=d.seed)
        result[name] = {
            "auroc_difference": auroc(y_test, ours) - best_auroc,
            "ci95": None if ci is None else list(ci),
            "ci95_by_answer": None if by_answer is None else list(by_answer),
            "beats_baseline": ci is not None and ci[0] > 0,
        }
    return result


def _known(example: Example) -> bool | None:
    known = example.meta.get("known")
    return None if known is None else known == "true"


def _balance(y: np.ndarray) -> dict[str, int]:
    return {CORRECT: int((y == 0).sum()), HALLUCINATED: int((y == 1).sum())}


def _score_metrics(
    name: str, y_test: np.ndarray, values: list[float], test: np.ndarray, d: DetectSpec
) -> dict[str, Any]:
    s = np.asarray(values)[test]
    ci = bootstrap_ci(y_test, s, d.bootstrap, seed=d.seed)
    kind = (
        "detector"
        if name in (DETECTOR, COMBINED)
        else "baseline"
        if name.startswith("baseline_")
        else "signal"
    )
    return {
        "kind": kind,
        "auroc": auroc(y_test, s),
        "ci95": None if ci is None else list(ci),
        "description": describe(name),
    }


def _write(
    store: Store,
    run_id: str,
    answers: list[Answer],
    rows: list[dict[str, Any]],
    metrics: dict[str, Any],
) -> None:
    generations = [
        {
            "id": a.example.id,
            "sample": a.sample,
            "prompt": a.example.prompt,
            "answer": a.text,
            "gold": a.example.answer,
            "label": a.label,
            "known": _known(a.example),
        }
        for a in answers
    ]
    store.put_jsonl(layout.detect_generations_key(run_id), generations, allow_nan=False)
    tensors, meta = tracks_tensors(answers)
    store.put_tensors(layout.detect_tracks_key(run_id), tensors, metadata=meta)
    store.put_jsonl(layout.detect_scores_key(run_id), rows, allow_nan=False)
    store.put_json(layout.detect_metrics_key(run_id), metrics)


def tracks_tensors(answers: Sequence[Answer]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Hypotheses, tracks and links of every answer as flat columns.

    Row `answer` indexes `answers` in the metadata (and the lines of scores.jsonl).
    """
    hyp: list[tuple[int, int, int, int, float]] = []
    tracks: list[tuple[int, int, int, int, int, int, float]] = []
    links: list[tuple[int, int, int, int, int, int, float]] = []
    for i, a in enumerate(answers):
        t = a.tracking
        hyp += [
            (i, layer, step, f, v)
            for layer in t.layers
            for step, hyps in enumerate(t.steps[layer])
            for f, v in hyps.items()
        ]
        tracks += [
            (i, tr.layer, tr.feature, tr.birth, tr.death, tr.length, tr.mass) for tr in t.tracks
        ]
        links += [
            (i, k.step, k.layer_a, k.feature_a, k.layer_b, k.feature_b, k.cosine) for k in t.links
        ]
    tensors: dict[str, torch.Tensor] = {}
    _columns(tensors, "hyp", ("answer", "layer", "step", "feature"), "activation", hyp)
    _columns(
        tensors, "track", ("answer", "layer", "feature", "birth", "death", "length"), "mass", tracks
    )
    _columns(
        tensors,
        "link",
        ("answer", "step", "layer_a", "feature_a", "layer_b", "feature_b"),
        "cosine",
        links,
    )
    meta = {
        "format": str(TRACKS_FORMAT),
        "answers": json.dumps([[a.example.id, a.sample] for a in answers]),
        "steps": json.dumps([a.tracking.n_steps for a in answers]),
    }
    return tensors, meta


def _columns(
    out: dict[str, torch.Tensor],
    prefix: str,
    int_names: Sequence[str],
    float_name: str,
    records: Sequence[tuple[Any, ...]],
) -> None:
    n = len(int_names)
    ints = torch.tensor([r[:n] for r in records], dtype=torch.int64).reshape(-1, n)
    for j, name in enumerate(int_names):
        out[f"{prefix}_{name}"] = ints[:, j].contiguous()
    out[f"{prefix}_{float_name}"] = torch.tensor([r[n] for r in records], dtype=torch.float32)
