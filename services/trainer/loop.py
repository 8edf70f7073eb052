"""The training loop: nanoGPT's shape, with checkpoints every later stage can trust.

Steps count optimizer updates; checkpoint N holds the weights after N updates (step 0 is
the initialisation, or the pretrained weights of an analysis-only run). Data order is a
seeded permutation per epoch and the loop's position in it is saved, so a run killed at
any moment resumes from its last complete checkpoint and ends bit-identical on the CPU.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import GPT2LMHeadModel

from services.trainer import distributed
from services.trainer.batches import PackedSequences
from services.trainer.checkpoint import (
    TrainerState,
    load_training_state,
    save_training_state,
)
from services.trainer.dynamics import dynamics_metrics
from services.trainer.evaluation import evaluate, token_loss_sum
from services.trainer.quality import trainer_checks
from shared import layout
from shared.data import Example, Task, answer_starts, load_task, tokenize_examples
from shared.done import DONE_FORMAT, RecordingStore, done_problem
from shared.errors import DriftlabError
from shared.models import (
    ModelError,
    build_model,
    check_same_architecture,
    count_parameters,
    load_config,
    load_tensors,
    model_from_config,
    model_vocab_size,
    save_model,
)
from shared.spec import DataSpec, RunSpec, section_digest
from shared.stage import StageContext
from shared.steps import complete_steps, eval_metrics
from shared.store import Store
from shared.telemetry import Progress
from shared.tokenizer import Tokenizer, load_tokenizer

DIGEST_SECTIONS = ("model", "data", "train")


class TrainingDiverged(DriftlabError):
    """Loss became NaN/inf: the run stops and keeps its last good checkpoint."""


@dataclass
class Plan:
    total_steps: int
    global_batch: int
    checkpoint_steps: set[int]


def plan(spec: RunSpec, n_train: int) -> Plan:
    t = spec.train
    global_batch = t.batch_size * t.grad_accum
    if t.epochs is not None:
        total = math.ceil(t.epochs * n_train / global_batch)
    else:
        total = int(t.steps if t.steps is not None else 0)
    steps = {0, total, *range(0, total, t.checkpoint_every)}
    return Plan(total, global_batch, steps)


def lr_factor(step: int, spec: RunSpec, total: int) -> float:
    """Warmup then cosine/linear decay to `min_lr_ratio`, or constant."""
    t = spec.train
    if t.warmup_steps and step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    if t.schedule == "constant" or total <= t.warmup_steps:
        return 1.0
    progress = min(1.0, (step - t.warmup_steps) / max(1, total - t.warmup_steps))
    floor = t.min_lr_ratio
    if t.schedule == "linear":
        return floor + (1 - floor) * (1 - progress)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices and embeddings; never biases or LayerNorm gains (as nanoGPT)."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def autocast(precision: str, device: str) -> tuple[contextlib.AbstractContextManager[Any], bool]:
    """The autocast context and whether a GradScaler is needed (fp16 only)."""
    cuda = device.startswith("cuda")
    if precision == "fp32" or (precision == "auto" and not cuda):
        return contextlib.nullcontext(), False
    if precision == "fp16":
        if not cuda:
            raise DriftlabError("train.precision fp16 needs a CUDA device: use bf16 or fp32")
        return torch.autocast("cuda", dtype=torch.float16), True
    if cuda and not torch.cuda.is_bf16_supported():
        if precision == "bf16":
            raise DriftlabError("this GPU has no bf16: set train.precision to fp16 or auto")
        return torch.autocast("cuda", dtype=torch.float16), True
    return torch.autocast("cuda" if cuda else "cpu", dtype=torch.bfloat16), False


class DataStream:
    """A seeded permutation per epoch; position `cursor` counts sequences consumed."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed = n, seed
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def take(self, cursor: int, count: int) -> torch.Tensor:
        """The indices of sequences cursor .. cursor+count-1, across epochs as needed."""
        parts, k, end = [], cursor, cursor + count
        while k < end:
            epoch, pos = divmod(k, self.n)
            if epoch != self._epoch:
                gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self._perm, self._epoch = torch.randperm(self.n, generator=gen), epoch
            part = self._perm[pos : pos + end - k]
            parts.append(part)
            k += len(part)
        return torch.cat(parts)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class Sequences:
    """Token ids of a split and, per sequence, the first position the loss predicts."""

    ids: list[list[int]]
    starts: list[int]


def _tokenize(task: Task, tokenizer: Tokenizer, data: DataSpec) -> tuple[Sequences, Sequences]:
    """Train and eval sequences; with `data.loss_on: answer` the loss starts at the answer.

    A training sequence left with nothing to predict (too short, or its answer cut off by
    `data.max_length`) is dropped.
    """
    if data.loss_on == "answer" and not task.has_answers:
        raise DriftlabError(
            f"data.loss_on answer needs a task with answers, and {task.name} is plain text: "
            "set data.loss_on to all"
        )

    def split(examples: list[Example]) -> Sequences:
        ids = tokenize_examples(examples, tokenizer, data.max_length)
        if data.loss_on == "all":
            return Sequences(ids, [1] * len(ids))
        return Sequences(ids, [max(1, s) for s in answer_starts(examples, ids, tokenizer)])

    every = split(task.train)
    kept = [i for i, seq in enumerate(every.ids) if len(seq) > every.starts[i]]
    if not kept:
        raise DriftlabError("the training split is empty after tokenization: check data.*")
    train = Sequences([every.ids[i] for i in kept], [every.starts[i] for i in kept])
    return train, split(task.eval)


def _origin(ctx: StageContext) -> tuple[str, int] | None:
    """The other run's checkpoint that train.resume_from continues, if any."""
    point = ctx.spec.train.resume_point()
    if point is None:
        return None
    run_id, step = point
    steps = complete_steps(ctx.store, run_id)
    if not steps or (step is not None and step not in steps):
        raise DriftlabError(
            f"train.resume_from: run {run_id} has no complete checkpoint"
            + (f" at step {step}" if step is not None else "")
            + f" in {ctx.store.url} (complete: {steps or 'none'})"
        )
    return run_id, step if step is not None else steps[-1]


def _intact_steps(ctx: StageContext, scheduled: set[int], origin: int | None) -> list[int]:
    """This run's checkpoints to continue from: the scheduled ones (after `origin`) up to
    the first that is missing or damaged (sizes and digests, `shared.done`).

    Stopping at the first gap, not skipping it, means a checkpoint deleted or truncated in
    the middle sends training back to the one before it, and everything after is redone
    rather than trusted; on the CPU the redo is bit-identical.
    """
    if ctx.args.force:
        return []
    written = complete_steps(ctx.store, ctx.run_id)
    intact: list[int] = []
    for step in sorted(s for s in scheduled if origin is None or s > origin):
        problem = done_problem(ctx.store, layout.checkpoint_done_key(ctx.run_id, step))
        if problem:
            if any(w >= step for w in written):  # not merely a checkpoint not reached yet
                ctx.log.warning("redoing checkpoints from step %d: %s", step, problem)
            break
        intact.append(step)
    return intact


def _settle_checkpoints(store: RecordingStore, run_id: str, intact: list[int]) -> None:
    """Before training continues: the checkpoints it continues from enter this attempt's
    DONE marker, and the DONE of every later one goes (it is redone, and a crash
    meanwhile must not leave it counting)."""
    kept = intact[-1] if intact else -1
    for step in complete_steps(store, run_id):
        if step > kept:
            store.delete(layout.checkpoint_done_key(run_id, step))
    for step in intact:
        store.keep(layout.checkpoint_done_key(run_id, step))


def _rows_upto(store: Store, key: str, upto: int) -> list[dict[str, Any]]:
    """The rows of a JSON-lines log up to step `upto`: what a resumed run carries on from."""
    rows = store.get_jsonl(key, missing_ok=True)
    return [r for r in rows if r.get("step", 0) <= upto]


def train(ctx: StageContext) -> None:
    world, device = distributed.setup(ctx.spec.train.strategy, ctx.device)
    try:
        _train(ctx, world, device)
    finally:
        distributed.teardown(world)


def _train(ctx: StageContext, world: distributed.World, device: str) -> None:
    spec, store, run_id, log = ctx.spec, ctx.store, ctx.run_id, ctx.log
    _seed_everything(spec.train.seed)
    tokenizer = load_tokenizer(spec.data.tokenizer)
    task = load_task(spec.data)
    train_seqs, eval_seqs = _tokenize(task, tokenizer, spec.data)
    vocab = model_vocab_size(spec, tokenizer.vocab_size)
    model = build_model(spec, vocab, tokenizer.eos_id, tokenizer.pad_id)
    if model.config.n_positions < spec.data.max_length:
        raise ModelError(
            f"data.max_length {spec.data.max_length} exceeds the model's "
            f"{model.config.n_positions} positions"
        )
    digest = {s: section_digest(spec, s) for s in DIGEST_SECTIONS}
    state = TrainerState(spec_digest=digest)
    schedule = plan(spec, len(train_seqs.ids))
    origin = _origin(ctx)
    intact = _intact_steps(ctx, schedule.checkpoint_steps, origin[1] if origin else None)
    source = (run_id, intact[-1]) if intact else origin
    if source is not None:
        src_run, src_step = source
        check_same_architecture(
            model.config, load_config(store, src_run, src_step), f"checkpoint {src_run}:{src_step}"
        )
        tensors, _ = store.get_tensors(layout.checkpoint_model_key(src_run, src_step))
        load_tensors(model, tensors, f"checkpoint {src_run}:{src_step}")
    model = model.to(device)  # type: ignore[arg-type]
    wrapped = distributed.wrap(model, spec.train.strategy, world, device)
    t = spec.train
    optimizer = torch.optim.AdamW(
        param_groups(wrapped, t.weight_decay), lr=t.learning_rate, betas=(t.betas[0], t.betas[1])
    )
    # Parameter names in the optimizer's order (FSDP shards in place, keeping the names).
    name_of = {id(p): n for n, p in model.named_parameters()}
    names = [name_of[id(p)] for g in optimizer.param_groups for p in g["params"]]
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, spec, schedule.total_steps)
    )
    autocast_ctx, needs_scaler = autocast(t.precision, device)
    scaler = torch.amp.GradScaler("cuda", enabled=needs_scaler) if needs_scaler else None
    if source is not None:
        src_run, src_step = source
        state, optim_state = load_training_state(store, src_run, src_step, scheduler, scaler, names)
        distributed.load_optimizer_state(wrapped, optimizer, optim_state, world, t.strategy, names)
        if src_run == run_id and state.spec_digest != digest:
            raise DriftlabError(
                f"run {run_id} has checkpoints made with a different model/data/train spec: "
                "rerun with --force to start over, or start a new run"
            )
        if src_run != run_id:
            state.origin, state.spec_digest = f"{src_run}:{src_step}", digest
        log.info("resuming from %s step %d", src_run, src_step)
    if world.primary:
        _settle_checkpoints(store, run_id, intact)
    metrics_rows = _rows_upto(store, layout.train_metrics_key(run_id), state.step)
    dynamics_rows = _rows_upto(store, layout.train_dynamics_key(run_id), state.step)
    stream = DataStream(len(train_seqs.ids), t.seed)
    packed = PackedSequences(train_seqs.ids, tokenizer.pad_id, train_seqs.starts)
    ctx.headline.update(params=count_parameters(model), total_steps=schedule.total_steps)

    def plain_copy(weights: dict[str, torch.Tensor]) -> GPT2LMHeadModel:
        copy = model_from_config(model.config)
        load_tensors(copy, weights, "gathered FSDP state")
        return copy.to(device)  # type: ignore[arg-type]

    def gather(with_optimizer: bool) -> distributed.FullState:
        return distributed.gather_full_state(
            model, optimizer, world, t.strategy, names, plain_copy, with_optimizer
        )

    def checkpoint(step_metrics: dict[str, Any], bar: Progress) -> None:
        full = gather(with_optimizer=True)
        if full.model is None or full.optim is None:
            return
        step, analysed = state.step, full.model
        step_eval = evaluate(
            analysed, task, tokenizer, eval_seqs.ids, eval_seqs.starts, t.batch_size,
            spec.data.max_length,
        )  # fmt: skip
        dyn = dynamics_metrics(analysed, full.grads or None)
        save_model(store, run_id, step, analysed)
        save_training_state(store, run_id, state, full.optim, scheduler, scaler, names)
        if t.save_gradients and full.grads:
            store.put_tensors(layout.checkpoint_grads_key(run_id, step), full.grads)
        store.put_json(
            layout.checkpoint_dynamics_key(run_id, step),
            {"step": step, "eval": step_eval, "dynamics": dyn, "train": step_metrics},
        )
        if not dynamics_rows or dynamics_rows[-1]["step"] != step:
            dynamics_rows.append({"step": step, **dyn})
        store.put_jsonl(layout.train_metrics_key(run_id), metrics_rows)
        store.put_jsonl(layout.train_dynamics_key(run_id), dynamics_rows)
        # Written last and listing the files above, so it vouches for them (shared.done).
        store.put_json(
            layout.checkpoint_done_key(run_id, step),
            {
                "format": DONE_FORMAT,
                "step": step,
                "artifacts": store.artifacts(layout.checkpoint_prefix(run_id, step)),
            },
        )
        ctx.headline.update({f"final_{k}": v for k, v in step_eval.items()})
        bar.set("driftlab_train_eval_loss", step_eval["eval_loss"])
        if "eval_accuracy" in step_eval:  # tasks with answers only
            bar.set("driftlab_train_eval_accuracy_ratio", step_eval["eval_accuracy"])
        log.info("checkpoint step %d: %s", step, _fmt(step_eval))

    step_metrics: dict[str, Any] = {}
    with ctx.progress(total=schedule.total_steps, unit="step", initial=state.step) as bar:
        if state.step == 0 and source is None:
            checkpoint({}, bar)
        distributed.barrier(world)
        model.train()
        while state.step < schedule.total_steps:
            t0 = time.perf_counter()
            step_metrics = _step(
                wrapped, optimizer, scheduler, scaler, autocast_ctx, stream, packed, state,
                schedule.global_batch, t, world, device,
            )  # fmt: skip
            loss = step_metrics["loss"]
            if not math.isfinite(loss):
                done = complete_steps(store, run_id)
                raise TrainingDiverged(
                    f"loss became {loss} at step {state.step}; the last good checkpoint is step "
                    f"{done[-1] if done else 'none'}: lower train.learning_rate or set "
                    "train.clip_grad"
                )
            step_seconds = time.perf_counter() - t0
            state.elapsed_seconds += step_seconds
            step_metrics["tokens_per_second"] = step_metrics["tokens"] / max(step_seconds, 1e-9)
            bar.update(1)
            bar.observe("driftlab_train_step_duration_seconds", step_seconds)
            bar.set("driftlab_train_loss", loss)
            bar.set("driftlab_train_learning_rate", step_metrics["lr"])
            bar.set("driftlab_train_grad_norm", step_metrics["grad_norm"])
            bar.set("driftlab_train_tokens_total", state.tokens_seen)
            bar.set("driftlab_train_step", state.step)
            last = state.step == schedule.total_steps
            if state.step % t.log_every == 0 or last:
                metrics_rows.append(
                    {"step": state.step, "tokens": state.tokens_seen, **step_metrics}
                )
            dynamics_due = state.step % t.dynamics_every == 0
            if dynamics_due and state.step not in schedule.checkpoint_steps:
                full = gather(with_optimizer=False)
                if full.model is not None:
                    dyn = dynamics_metrics(full.model, full.grads or None)
                    dynamics_rows.append({"step": state.step, **dyn})
            if state.step in schedule.checkpoint_steps:
                checkpoint(step_metrics, bar)
                distributed.barrier(world)
    ctx.headline.update(
        final_loss=step_metrics.get("loss"), steps=state.step, tokens=state.tokens_seen
    )
    if world.primary and state.step > 0:
        final_eval = eval_metrics(store, run_id, [state.step])[state.step]
        ctx.judge(*trainer_checks(final_eval, task.eval, metrics_rows))


def _step(
    wrapped: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
    autocast_ctx: contextlib.AbstractContextManager[Any],
    stream: DataStream,
    packed: PackedSequences,
    state: TrainerState,
    global_batch: int,
    t: Any,
    world: distributed.World,
    device: str,
) -> dict[str, Any]:
    """One optimizer update over `global_batch` sequences, split into micro-batches and ranks.

    The loss is the mean over every target token of the global batch, whatever the split,
    so DDP with N processes computes the same update as one process.
    """
    indices = stream.take(state.cursor, global_batch)
    total_tokens = packed.targets_in(indices)
    optimizer.zero_grad(set_to_none=True)
    loss_sum = 0.0
    micro = [indices[m : m + t.batch_size] for m in range(0, global_batch, t.batch_size)]
    for k, batch in enumerate(micro):
        mine = batch[world.rank :: world.size]
        sync = k == len(micro) - 1
        no_sync = getattr(wrapped, "no_sync", None)
        guard = no_sync() if (no_sync is not None and not sync) else contextlib.nullcontext()
        with guard:
            if len(mine) == 0:
                continue
            ids, mask, targets = packed.batch(mine, device)
            with autocast_ctx:
                part = token_loss_sum(wrapped, ids, mask, targets)
            scaled = part * (world.size / total_tokens)
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
            loss_sum += float(part.detach())
    if scaler is not None:
        scaler.unscale_(optimizer)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    max_norm = t.clip_grad if t.clip_grad is not None else float("inf")
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    lr = optimizer.param_groups[0]["lr"]
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    scheduler.step()
    state.step += 1
    state.cursor += global_batch
    state.tokens_seen += total_tokens + len(indices)
    loss = distributed.all_reduce_sum(loss_sum, world, device) / total_tokens
    return {"loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": total_tokens + len(indices)}


def _fmt(metrics: dict[str, Any]) -> str:
    return " ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()
    )
