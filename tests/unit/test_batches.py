"""Training batches: the packed, vectorised path pads exactly as the per-sequence one, the
data stream walks the same seeded permutations across epochs, and `data.loss_on: answer`
leaves only the answer's tokens to predict."""

from __future__ import annotations

import random

import pytest
import torch

from services.trainer.batches import PackedSequences, pad_batch
from services.trainer.loop import DataStream, _tokenize
from shared.data import load_task
from shared.spec import RunSpec, apply_overrides
from shared.tokenizer import load_tokenizer


def test_packed_batches_equal_padding_sequence_by_sequence():
    rng = random.Random(0)
    seqs = [[rng.randrange(1, 50) for _ in range(rng.randint(1, 9))] for _ in range(40)]
    packed = PackedSequences(seqs, pad_id=0)
    for indices in ([3], [0, 39, 7, 7, 12], list(range(40))[::-3]):
        chosen = torch.tensor(indices)
        expected = pad_batch([seqs[i] for i in indices], 0, "cpu")
        for got, want in zip(packed.batch(chosen, "cpu"), expected, strict=True):
            assert got.dtype == want.dtype and torch.equal(got, want)
        assert packed.targets_in(chosen) == sum(len(seqs[i]) - 1 for i in indices)


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
