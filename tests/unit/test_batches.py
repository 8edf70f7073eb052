"""Training batches: the packed, vectorised path pads exactly as the per-sequence one, the
data stream walks the same seeded permutations across epochs, and `data.loss_on: answer`
leaves only the answer's tokens to predict, with the LM head run only where they are."""

from __future__ import annotations

import random

import pytest
import torch

from services.trainer.batches import PackedSequences, pad_batch
from services.trainer.evaluation import token_loss_sum
from services.trainer.loop import DataStream, _tokenize
from shared.data import load_task
from shared.models import build_model
from shared.spec import RunSpec, apply_overrides
from shared.tokenizer import load_tokenizer


@pytest.mark.parametrize("with_starts", [False, True])
def test_packed_batches_equal_padding_sequence_by_sequence(with_starts):
    """Ids, attention mask and targets alike: with answer starts, the packed path once
    masked the prompt out of the *attention* (an in-place `&=` on a view of the mask), so a
    model trained on the answer only never saw its operands."""
    rng = random.Random(0)
    seqs = [[rng.randrange(1, 50) for _ in range(rng.randint(1, 9))] for _ in range(40)]
    starts = [rng.randint(1, len(s)) for s in seqs] if with_starts else None
    packed = PackedSequences(seqs, pad_id=0, starts=starts)
    for indices in ([3], [0, 39, 7, 7, 12], list(range(40))[::-3]):
        chosen = torch.tensor(indices)
        chosen_starts = [starts[i] for i in indices] if starts else None
        expected = pad_batch([seqs[i] for i in indices], 0, "cpu", chosen_starts)
        got = packed.batch(chosen, "cpu")
        for part, want in zip(got, expected, strict=True):
            assert part.dtype == want.dtype and torch.equal(part, want)
        assert got[1].tolist() == [[1] * len(seqs[i]) + [0] * (got[1].shape[1] - len(seqs[i]))
                                   for i in indices]  # fmt: skip
        first = chosen_starts or [1] * len(indices)
        assert packed.targets_in(chosen) == sum(
            len(seqs[i]) - f for i, f in zip(indices, first, strict=True)
        )


def test_the_stream_takes_each_epochs_seeded_permutation_in_order():
    n, seed = 7, 3

    def permutation(epoch: int) -> list[int]:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        return torch.randperm(n, generator=gen).tolist()

    expected = [i for epoch in range(4) for i in permutation(epoch)]
    stream = DataStream(n, seed)
    for cursor, count in ((0, 3), (3, 7), (10, 1), (11, 17), (5, 2)):
        assert stream.take(cursor, count).tolist() == expected[cursor : cursor + count]


@pytest.mark.parametrize("tokenizer", ["numbers", "byte"])
def test_answer_only_loss_predicts_exactly_the_answer_and_eos(tokenizer):
    data = apply_overrides(
        RunSpec(),
        {"data.dataset": "modular", "data.modular_p": 17, "data.tokenizer": tokenizer,
         "data.loss_on": "answer"},
    ).data  # fmt: skip
    task, tok = load_task(data), load_tokenizer(tokenizer)
    train, evals = _tokenize(task, tok, data)
    packed = PackedSequences(train.ids, tok.pad_id, train.starts)
    chosen = torch.arange(len(train.ids))
    _, _, targets = packed.batch(chosen, "cpu")
    for row, ex in zip(targets.tolist(), task.train, strict=True):
        assert [t for t in row if t != -100] == [*tok.encode(ex.completion), tok.eos_id], ex.id
    assert packed.targets_in(chosen) == int((targets != -100).sum())
    expected = pad_batch(train.ids, tok.pad_id, "cpu", train.starts)
    assert torch.equal(targets, expected[2])
    _, _, eval_targets = pad_batch(evals.ids, tok.pad_id, "cpu", evals.starts)
    assert int((eval_targets != -100).sum()) == sum(
        len(tok.encode(ex.completion)) + 1 for ex in task.eval
    )


@pytest.mark.parametrize("starts", [None, [3, 5, 4, 6], [9, 9, 9, 9]])
def test_the_loss_on_kept_logits_equals_the_loss_on_every_logit(starts):
    """`token_loss_sum` runs the LM head from the first target on: its loss and gradients
    must be those of the whole-sequence logits, whatever the starts (none left included)."""
    torch.manual_seed(0)
    spec = apply_overrides(
        RunSpec(), {"model.arch": "custom", "model.n_layer": 1, "model.n_embd": 32,
                    "model.n_head": 2},
    )  # fmt: skip
    model = build_model(spec, vocab_size=40, eos_id=1, pad_id=0)
    seqs = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 16, 17], [2, 3, 4, 5, 6, 7, 8, 9], [20] * 7]
    ids, mask, targets = pad_batch(seqs, 0, "cpu", starts)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    expected = torch.nn.functional.cross_entropy(
        logits.reshape(-1, 40), targets.reshape(-1), ignore_index=-100, reduction="sum"
    )
    expected_grads = torch.autograd.grad(expected, list(model.parameters()))
    got = token_loss_sum(model, ids, mask, targets)
    got_grads = torch.autograd.grad(got, list(model.parameters()))
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6)
    for g, e in zip(got_grads, expected_grads, strict=True):
        assert torch.allclose(g, e, rtol=1e-4, atol=1e-6)
