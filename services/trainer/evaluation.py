"""Held-out metrics stored in every checkpoint: what the drift analysis is lined up against."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from transformers import GPT2LMHeadModel

from services.trainer.batches import pad_batch
from shared.data import Task, prompt_ids
from shared.models import greedy_generate
from shared.tokenizer import Tokenizer


def token_loss_sum(
    model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """Summed next-token cross-entropy: callers divide by the global token count.

    The LM head runs only from the first position any sequence has a target at
    (`logits_to_keep`), never on the last one: with `data.loss_on: answer` the prompt never
    reaches it, and on grokking's six-token sequences the head is most of a step's cost.
    """
    with_target = (targets != -100).any(dim=0).nonzero()
    first = int(with_target[0]) if len(with_target) else targets.shape[1] - 1
    keep = torch.arange(first, targets.shape[1], device=ids.device)
    logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        targets[:, first:].reshape(-1),
        ignore_index=-100,
        reduction="sum",
    )


@torch.inference_mode()
def evaluate(
    model: GPT2LMHeadModel,
    task: Task,
    tokenizer: Tokenizer,
    eval_ids: Sequence[Sequence[int]],
    eval_starts: Sequence[int],
    batch_size: int,
    max_length: int,
) -> dict[str, Any]:
    """Eval loss on the held-out split and, for tasks with answers, greedy exact match.

    The loss is on the tokens training takes it on (from `eval_starts`, see `pad_batch`), so
    the eval and train losses of a run compare.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(eval_ids), batch_size):
        end = start + batch_size
        ids, mask, targets = pad_batch(
            eval_ids[start:end], tokenizer.pad_id, device, eval_starts[start:end]
        )
        total += float(token_loss_sum(model, ids, mask, targets))
        count += int((targets != -100).sum())
    metrics: dict[str, Any] = {"eval_loss": total / max(count, 1), "eval_tokens": count}
    if task.has_answers and task.eval:
        prompts = prompt_ids(task.eval, tokenizer, max_length - 1)
        longest = max(len(p) for p in prompts)
        outputs = greedy_generate(
            model,
            prompts,
            max_new_tokens=max(1, max_length - longest),
            eos_id=tokenizer.eos_id,
            pad_id=tokenizer.pad_id,
            batch_size=max(batch_size, 32),
        )
        correct = answered = 0
        for ex, out in zip(task.eval, outputs, strict=True):
            text = tokenizer.decode(out)
            answered += task.extract_answer(text) is not None
            correct += ex.answer is not None and task.is_correct(text, ex.answer)
        metrics["eval_accuracy"] = correct / len(task.eval)
        metrics["eval_answered"] = answered / len(task.eval)
    model.train(was_training)
    return metrics
