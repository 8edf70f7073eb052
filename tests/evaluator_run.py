"""A tiny run with every artifact the evaluator reads, written through `shared.layout`.

Extraction and checkpoints come from `tests.synthetic_extraction`; training logs, OT
phases, one SAE (with a random model of its width at the SAE's checkpoint, for the
explorer's logit effects) and detection scores are written here in their stages' formats,
so the evaluator is tested on known inputs without training anything.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch

from shared import layout
from shared.sae.artifacts import save_sae
from shared.sae.base import SAEConfig
from shared.sae.models import build_sae
from shared.spec import RunSpec, apply_overrides, model_sizes
from shared.store import Store
from tests.synthetic_extraction import drifting_clouds, synthetic_run

STEPS = [0, 10, 20, 30, 40, 50, 60]
JUMP_AT = 40
N_TOKENS, D_MODEL = 32, 8
SAE_LAYER = 1
SCORE_NAMES = ("detector", "baseline_entropy", "baseline_random", "signal_norm")


def eval_metrics(step: int) -> dict[str, float]:
    """Accuracy jumps at JUMP_AT, where the hidden states jump too."""
    late = step >= JUMP_AT
    return {"eval_loss": 2.0 - 0.01 * step, "eval_accuracy": 0.9 if late else 0.1 + 0.001 * step}


def detection_rows(n: int = 80, seed: int = 0) -> list[dict]:
    """Answers whose detector score separates the classes well, the baselines less so."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        label = ("hallucinated", "correct", "no-answer")[
            0 if i % 5 < 2 else (2 if i % 13 == 0 else 1)
        ]
        y = 1.0 if label == "hallucinated" else 0.0
        scores = {
            "detector": float(y * 1.5 + rng.normal()),
            "baseline_entropy": float(y * 0.5 + rng.normal()),
            "baseline_random": float(rng.normal()),
            "signal_norm": float(np.round(y + rng.normal(), 1)),  # ties on purpose
        }
        rows.append({"id": f"a{i}", "sample": i, "split": "train" if i % 2 else "test",
                     "label": label, "known": None, "scores": scores})  # fmt: skip
    return rows


#: The training loss spikes (tenfold) at this step, seen first by the checkpoint at JUMP_AT.
LOSS_SPIKE_AT = JUMP_AT - 3


def train_loss(step: int) -> float:
    return 3.0 / (1 + step) * (20.0 if step in (LOSS_SPIKE_AT, LOSS_SPIKE_AT + 1) else 1.0)


def write_training(store: Store, run_id: str) -> None:
    rows = [{"step": s, "loss": train_loss(s), "lr": 1e-3, "grad_norm": 1.0} for s in range(61)]
    store.put_text(layout.train_metrics_key(run_id), "".join(json.dumps(r) + "\n" for r in rows))
    rng = np.random.default_rng(1)
    # Every HMM feature has two levels, switching at JUMP_AT: two phases by construction.
    dyn = [
        {"step": s, **{f: float(k + (s >= JUMP_AT) + 0.01 * rng.normal())
                       for k, f in enumerate(RunSpec().hmm.features)}}
        for s in range(0, STEPS[-1] + 1, 2)
    ]  # fmt: skip
    store.put_text(layout.train_dynamics_key(run_id), "".join(json.dumps(r) + "\n" for r in dyn))
    store.put_json(layout.train_done_key(run_id), {"format": 1, "stage": "train"})


def write_ot(store: Store, run_id: str) -> None:
    """phases.json in the OT stage's format: one change point, at the jump."""
    point = {"step": JUMP_AT, "interval": [30, 40], "before": 0.1, "after": 2.0,
             "magnitude": 1.9, "exceeds_baseline": True}  # fmt: skip
    store.put_json(
        layout.ot_phases_key(run_id),
        {"format": 1, "steps": STEPS, "depth_only": False,
         "curves": {"mean": {"values": [0.1, 0.1, 0.1, 2.0, 0.1, 0.1], "change_points": [point],
                             "spikes": [], "transitions": []}},
         "alignment": []},
    )  # fmt: skip
    store.put_json(layout.ot_done_key(run_id), {"format": 1, "stage": "ot"})


def write_sae(store: Store, run_id: str) -> None:
    """The SAE of SAE_LAYER, trained (says its report) at the last step, and that step's
    model: a random GPT-2 of width D_MODEL over the byte tokenizer's vocabulary."""
    from transformers import GPT2Config

    from shared.models import model_from_config, save_model

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=258,
        n_positions=16,
        n_embd=D_MODEL,
        n_layer=1,
        n_head=2,
        bos_token_id=256,
        eos_token_id=256,
    )
    save_model(store, run_id, STEPS[-1], model_from_config(config))
    sae = build_sae(SAEConfig(arch="relu", d_in=D_MODEL, d_sae=16), seed=0)
    report = {"layer": SAE_LAYER, "checkpoint_step": STEPS[-1], "config": sae.config.to_json(),
              "metrics": {"explained_variance": 0.8, "l0": 3.0, "dead_fraction": 0.1,
                          "ce": {"ce_loss_recovered": 0.9}}}  # fmt: skip
    save_sae(store, run_id, SAE_LAYER, sae, report)
    store.put_json(layout.sae_done_key(run_id, SAE_LAYER), {"format": 1, "stage": "sae"})


def write_detect(store: Store, run_id: str, rows: list[dict]) -> None:
    text = "".join(json.dumps(r) + "\n" for r in rows)
    store.put_text(layout.detect_scores_key(run_id), text)
    described = {n: {"kind": "x", "auroc": 0.5, "ci95": None, "description": f"the {n} score"}
                 for n in SCORE_NAMES}  # fmt: skip
    store.put_json(layout.detect_metrics_key(run_id), {"scores": described})
    store.put_json(layout.detect_done_key(run_id), {"format": 1, "stage": "detect"})


def make_run(
    store: Store,
    *,
    ot: bool = True,
    sae: bool = True,
    detect: bool = True,
    seed: int = 0,
    overrides: dict[str, Any] | None = None,
) -> str:
    spec = apply_overrides(
        RunSpec(),
        {
            "run.name": "evaltest",
            "run.tags": {"purpose": "test"},
            "run.seed": seed,
            "evaluate.bootstrap": 50,
            "hmm.max_components": 3,
            "hmm.restarts": 2,
            **(overrides or {}),
        },
    )
    n_layers = model_sizes(spec).n_layer + 1
    torch.manual_seed(seed)
    run_id = synthetic_run(
        store, spec, steps=STEPS, n_layers=n_layers, n_tokens=N_TOKENS, d_model=D_MODEL,
        cloud=drifting_clouds(N_TOKENS, D_MODEL, jump_at=JUMP_AT, seed=seed),
        eval_metrics=eval_metrics,
    )  # fmt: skip
    write_training(store, run_id)
    if ot:
        write_ot(store, run_id)
    if sae:
        write_sae(store, run_id)
    if detect:
        write_detect(store, run_id, detection_rows(seed=seed))
    return run_id
