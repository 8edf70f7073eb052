"""`sae train` for one layer: get the activations, fit the SAE, measure and judge it, store it.

Where the activations come from, and which tokens judge the SAE, is `sae.source`
(`services.sae.sources`): the training split streamed through the checkpoint (default),
or the extracted probe. The metrics and CE-loss-recovered are always measured on text
the SAE never trained on, and the stage ends with quality verdicts on them
(`services.sae.quality`).

TopK's dead-latent window is Gao et al.'s 10M tokens, shortened to a tenth of the training
tokens for small budgets (a window longer than training would never call a latent dead).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from services.sae.fit import FitSummary, NonFiniteLoss, Schedule, fit
from services.sae.metrics import ce_recovered, reconstruction_metrics
from services.sae.plan import training_step
from services.sae.quality import sae_checks
from services.sae.sources import SAETrainingError, Source, probe_source, stream_source
from shared.errors import InputMissing
from shared.hidden import load_index
from shared.models import load_model
from shared.sae.artifacts import save_sae
from shared.sae.base import SAEConfig, SparseAutoencoder
from shared.sae.models import build_sae
from shared.spec import SAESpec, model_sizes
from shared.stage import StageContext
from shared.telemetry import push_metrics

GAO_DEAD_TOKENS = 10_000_000
LOG_EVERY = 50
CE_BATCH = 16
#: Multiply-adds of the SAE's encoder matmul below which a CPU trains on one thread.
SMALL_MATMUL = 1 << 26


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
        pre_act_coeff=spec.pre_act_coeff,
        dead_after_tokens=min(GAO_DEAD_TOKENS, max(1, train_tokens // 10)),
    )


def train_layer(ctx: StageContext) -> None:
    """The stage's `run`: one layer's SAE, its metrics, verdicts and artifacts."""
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
    device = torch.device(ctx.device)
    matmul = spec.batch_size * index.d_model * spec.expansion * index.d_model
    with _small_steps_on_one_thread(device, matmul):
        _train(ctx, step, where, device)


@contextmanager
def _small_steps_on_one_thread(device: torch.device, matmul: int) -> Iterator[None]:
    """One intra-op thread on a CPU when the SAE's matmuls (`matmul` multiply-adds) are small.

    Ops this small gain nothing from splitting across threads, and with stages sharing the
    cores (the local executor runs one per core, each with a thread per core) the threads
    spin against each other: 64 -> 320 features at batch 256 trained at 106k samples/s on
    one thread and 14k on two, on a 2-core machine with a load of 3.
    """
    if device.type != "cpu" or matmul >= SMALL_MATMUL:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _train(ctx: StageContext, step: int, where: str, device: torch.device) -> None:
    """Activations, fit, metrics, verdicts and artifacts of one layer's SAE."""
    run_id, store, spec = ctx.run_id, ctx.store, ctx.spec.sae
    layer: int = ctx.args.layer
    model = load_model(store, run_id, step, device)
    source: Source
    if spec.source == "stream":
        source = stream_source(ctx.spec, model, layer, device, where)
    else:
        source = probe_source(store, run_id, step, layer, spec, device, where)
    total = spec.tokens or math.ceil(float(spec.epochs or 1.0) * source.epoch_tokens)
    schedule = Schedule(
        steps=max(1, math.ceil(total / spec.batch_size)),
        lr=spec.lr,
        warmup_steps=spec.warmup_steps,
        sparsity_warmup_steps=spec.sparsity_warmup_steps,
    )
    d_in = len(source.mean)
    sae = build_sae(sae_config(spec, d_in, total), seed=spec.seed).to(device)
    sae.init_from_data(source.mean.to(device), source.scale)
    ctx.log.info(
        "%s SAE %d -> %d on %s: %d steps of %d tokens from the %s (%d tokens a pass, "
        "scale %.4g)", spec.arch, d_in, sae.config.d_sae, where, schedule.steps,
        spec.batch_size, spec.source, source.epoch_tokens, source.scale,
    )  # fmt: skip
    summary = _fit(ctx, sae, source, schedule, spec, where)

    held = source.held_out
    reconstruction = reconstruction_metrics(sae, held, torch.arange(len(held)), spec.batch_size)
    judges = source.eval_sequences
    downstream = ce_recovered(model, judges.ids, judges.lengths, layer, sae.reconstruct, CE_BATCH)
    metrics = {**reconstruction, "ce": downstream}
    report = {
        "run_id": run_id,
        "layer": layer,
        "checkpoint_step": step,
        "config": sae.config.to_json(),
        "spec": spec.model_dump(mode="json"),
        "input_scale": source.scale,
        "training": {
            **source.training,
            **_training_report(summary, schedule, source.epoch_tokens, ctx.device),
        },
        "evaluation": source.evaluation,
        "metrics": metrics,
    }
    save_sae(store, run_id, layer, sae.cpu(), report)
    ctx.judge(*sae_checks(metrics, d_in, source.evaluation, spec))
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
            "driftlab_sae_explained_variance": reconstruction["explained_variance"],
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
    source: Source,
    schedule: Schedule,
    spec: SAESpec,
    where: str,
) -> FitSummary:
    layer: int = ctx.args.layer
    with ctx.progress(total=schedule.steps, unit="step") as progress:
        clock = {"step": 0}

        def on_log(step: int, samples: int, means: dict[str, float]) -> None:
            progress.update(step - clock["step"])
            clock["step"] = step
            progress.set("driftlab_sae_samples_total", samples, layer=layer)
            progress.set("driftlab_sae_loss", means["loss"], layer=layer)
            progress.set("driftlab_sae_l0", means["l0"], layer=layer)

        try:
            summary = fit(
                sae,
                source.batches,
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
    return summary


def _training_report(
    summary: FitSummary, schedule: Schedule, epoch_tokens: int, device: str
) -> dict[str, Any]:
    return {
        "steps": summary.steps,
        "samples": summary.samples,
        "train_tokens": epoch_tokens,
        "epochs": round(summary.samples / epoch_tokens, 3),
        "lr": schedule.lr,
        "seconds": round(summary.seconds, 3),
        "samples_per_second": round(summary.samples_per_second, 1),
        "device": device,
        "final": summary.last,
    }
