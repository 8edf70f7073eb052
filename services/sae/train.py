"""`sae train` for one layer: read the hidden states, fit the SAE, measure it, store it.

Which tokens train and which judge: the probe's *sequences* are split (`holdout_fraction`,
seeded), so the held-out tokens and the sequences used for CE-loss-recovered are the same
unseen text. With one sequence, or `holdout_fraction: 0`, metrics fall back to the
training tokens and `sae.json` says so.

TopK's dead-latent window is Gao et al.'s 10M tokens, shortened to a tenth of the training
tokens for small budgets (a window longer than training would never call a latent dead).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from services.sae.artifacts import save_sae
from services.sae.base import SAEConfig, SparseAutoencoder
from services.sae.batches import Batches, input_scale, place
from services.sae.fit import FitSummary, NonFiniteLoss, Schedule, fit
from services.sae.metrics import ce_recovered, reconstruction_metrics
from services.sae.models import build_sae
from services.sae.plan import training_step
from shared.errors import DriftlabError, InputMissing
from shared.hidden import Probe, load_hidden, load_index, load_probe
from shared.models import load_model
from shared.spec import SAESpec, model_sizes
from shared.stage import StageContext
from shared.telemetry import push_metrics

GAO_DEAD_TOKENS = 10_000_000
LOG_EVERY = 50
CE_BATCH = 16


class SAETrainingError(DriftlabError):
    """SAE training cannot go on: too little data, or a diverging loss."""


def holdout_split(
    probe: Probe, fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """(training token rows, evaluation token rows, evaluation samples, held out?)."""
    n = probe.n_samples
    n_held = 0 if fraction == 0 else min(n - 1, max(1, round(fraction * n)))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    is_held = torch.zeros(n, dtype=torch.bool)
    is_held[order[:n_held]] = True
    token_held = is_held[probe.token_sample.long()]
    train_rows = torch.nonzero(~token_held).flatten()
    if n_held == 0:
        return train_rows, train_rows, torch.arange(n), False
    held_rows = torch.nonzero(token_held).flatten()
    return train_rows, held_rows, torch.nonzero(is_held).flatten(), True


def sae_config(spec: SAESpec, d_in: int, train_tokens: int) -> SAEConfig:
    return SAEConfig(
        arch=spec.arch,
        d_in=d_in,
        d_sae=spec.expansion * d_in,
        k=spec.k,
        sparsity_loss=spec.sparsity_loss,
        l0_coeff=spec.l0_coeff,
        target_l0=spec.target_l0,
        l1_coeff=spec.l1_coeff,
        bandwidth=spec.bandwidth,
        init_threshold=spec.init_threshold,
        tanh_scale=spec.tanh_scale,
        aux_k_coeff=spec.aux_k_coeff,
        dead_after_tokens=min(GAO_DEAD_TOKENS, max(1, train_tokens // 10)),
    )


def train_layer(ctx: StageContext) -> None:
    """The stage's `run`: one layer's SAE, its metrics and its artifacts."""
    run_id, store, spec = ctx.run_id, ctx.store, ctx.spec.sae
    layer: int = ctx.args.layer
    step = training_step(store, run_id, spec)
    where = f"layer {layer} at checkpoint step {step} of run {run_id}"
    index = load_index(store, run_id, step)
    if layer >= index.n_layers:
        raise InputMissing(
            f"{where} was not extracted: the extraction holds layers 0..{index.n_layers - 1}"
            f" (model.n_layer {model_sizes(ctx.spec).n_layer}); pick one of those"
        )
    probe = load_probe(store, run_id)
    if probe.n_tokens != index.n_tokens:
        raise SAETrainingError(
            f"{where}: the probe has {probe.n_tokens} tokens but the extraction "
            f"{index.n_tokens}; rerun the extractor with --force"
        )
    train_rows, eval_rows, eval_samples, held_out = holdout_split(
        probe, spec.holdout_fraction, spec.seed
    )
    if len(train_rows) < spec.batch_size:
        raise SAETrainingError(
            f"{where}: only {len(train_rows)} training tokens for sae.batch_size "
            f"{spec.batch_size}; lower sae.batch_size or extract more tokens "
            "(extract.probe_samples)"
        )
    device = torch.device(ctx.device)
    data = place(load_hidden(store, run_id, step, layer), device)
    scale, mean = input_scale(data, train_rows)
    total = spec.tokens or math.ceil(float(spec.epochs or 1.0) * len(train_rows))
    schedule = Schedule(
        steps=max(1, math.ceil(total / spec.batch_size)),
        lr=spec.lr,
        warmup_steps=spec.warmup_steps,
        sparsity_warmup_steps=spec.sparsity_warmup_steps,
    )
    sae = build_sae(sae_config(spec, index.d_model, total), seed=spec.seed).to(device)
    sae.init_from_data(mean.to(device), scale)
    batches = Batches(data, train_rows, spec.batch_size, device, scale, spec.seed)
    ctx.log.info(
        "%s SAE %d -> %d on %s: %d steps of %d tokens (%d training tokens, scale %.4g)",
        spec.arch, sae.config.d_in, sae.config.d_sae, where, schedule.steps,
        spec.batch_size, len(train_rows), scale,
    )  # fmt: skip
    summary = _fit(ctx, sae, batches, schedule, spec, where)

    reconstruction = reconstruction_metrics(sae, data, eval_rows, spec.batch_size)
    model = load_model(store, run_id, step, device)
    downstream = ce_recovered(
        model,
        probe.input_ids[eval_samples],
        probe.lengths[eval_samples],
        layer,
        sae.reconstruct,
        CE_BATCH,
    )
    metrics = {**reconstruction, "ce": downstream}
    report = {
        "run_id": run_id,
        "layer": layer,
        "checkpoint_step": step,
        "config": sae.config.to_json(),
        "spec": spec.model_dump(mode="json"),
        "input_scale": scale,
        "training": _training_report(summary, schedule, len(train_rows), ctx.device),
        "evaluation": {
            "held_out": held_out,
            "samples": len(eval_samples),
            "tokens": len(eval_rows),
        },
        "metrics": metrics,
    }
    save_sae(store, run_id, layer, sae.cpu(), report)
    ctx.headline.update(
        l0=round(reconstruction["l0"], 3),
        explained_variance=round(reconstruction["explained_variance"], 4),
        dead_fraction=round(reconstruction["dead_fraction"], 4),
        ce_loss_recovered=round(downstream["ce_loss_recovered"], 4),
    )
    push_metrics(
        ctx.stage,
        run_id,
        {
            "driftlab_sae_explained_variance_ratio": reconstruction["explained_variance"],
            "driftlab_sae_dead_features_ratio": reconstruction["dead_fraction"],
            "driftlab_sae_l0": reconstruction["l0"],
        },
        shard=ctx.shard,
        labels={"layer": layer},
    )
    ctx.log.info(
        "layer %d: explained variance %.3f, L0 %.1f, dead %.1f%%, CE recovered %.3f",
        layer, reconstruction["explained_variance"], reconstruction["l0"],
        100 * reconstruction["dead_fraction"], downstream["ce_loss_recovered"],
    )  # fmt: skip


def _fit(
    ctx: StageContext,
    sae: SparseAutoencoder,
    batches: Batches,
    schedule: Schedule,
    spec: SAESpec,
    where: str,
) -> FitSummary:
    layer: int = ctx.args.layer
    with ctx.progress(total=schedule.steps, unit="step") as progress:
        clock = {"step": 0, "samples": 0.0}

        def on_log(step: int, means: dict[str, float]) -> None:
            progress.update(step - clock["step"])
            clock["step"] = step
            progress.set("driftlab_sae_loss", means["loss"], layer=layer)
            progress.set("driftlab_sae_l0", means["l0"], layer=layer)

        try:
            summary = fit(
                sae,
                batches,
                schedule,
                compile=spec.compile,
                log_every=LOG_EVERY,
                on_log=on_log,
            )
        except NonFiniteLoss as err:
            raise SAETrainingError(
                f"{where}: the SAE loss became NaN/inf by training step {err.step}; "
                "lower sae.lr (or raise sae.warmup_steps)"
            ) from None
        progress.set("driftlab_sae_samples_per_second", summary.samples_per_second, layer=layer)
    return summary


def _training_report(
    summary: FitSummary, schedule: Schedule, train_tokens: int, device: str
) -> dict[str, Any]:
    return {
        "steps": summary.steps,
        "samples": summary.samples,
        "train_tokens": train_tokens,
        "lr": schedule.lr,
        "seconds": round(summary.seconds, 3),
        "samples_per_second": round(summary.samples_per_second, 1),
        "device": device,
        "final": summary.last,
    }
