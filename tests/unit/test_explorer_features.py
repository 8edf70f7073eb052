"""The numbers of the explorer's feature cards against direct computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics.pairwise import cosine_similarity
from transformers import GPT2Config

from services.evaluator import features as card
from services.evaluator.sections import readable_transitions
from shared import hidden
from shared.models import model_from_config


def _probe(rows: list[list[int]]) -> hidden.Probe:
    """Every token of every row kept, row by row: token i of row s is probe token s*len+i."""
    ids = torch.tensor(rows)
    samples, length = ids.shape
    return hidden.Probe(
        input_ids=ids,
        lengths=torch.full((samples,), length),
        token_sample=torch.arange(samples).repeat_interleave(length),
        token_position=torch.arange(length).repeat(samples),
        token_id=ids.flatten(),
        token_role=torch.zeros(samples * length, dtype=torch.int8),
        example_ids=[f"ex{s}" for s in range(samples)],
        pad_id=0,
        meta={"digest": "d"},
    )


def test_histogram_counts_the_active_tokens_and_density_their_share():
    column = torch.tensor([0.0, 0.0, 0.1, 0.5, 0.5, 1.0, 0.0, 0.95])
    histogram = card.activation_histogram(column, bins=4)
    # Bins [0, .25) [.25, .5) [.5, .75) [.75, 1.0]: the max falls in the last (closed) bin.
    assert histogram == {"max": 1.0, "counts": [1, 0, 2, 2], "active": 5}
    assert card.density(column) == pytest.approx(5 / 8)
    assert card.activation_histogram(torch.zeros(4))["counts"] == [0] * card.HISTOGRAM_BINS


def test_top_contexts_merge_ties_and_show_both_sides():
    # Samples 0 and 2 are the same sequence: their tokens have the same activations.
    probe = _probe([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10], [1, 2, 3, 4, 5], [7, 7, 7, 7, 5]])
    column = torch.zeros(20)
    column[[2, 12]] = 3.0  # token 3 of samples 0 and 2: one example, twice
    column[7] = 2.0  # token 8 of sample 1
    column[[4, 19]] = 1.0  # token 5 ending samples 0 and 3: other contexts, yet one tie
    column[13] = 1.0  # token 4 of sample 2: the same activation, another token
    contexts = card.ProbeContexts(probe)
    top = contexts.top(column, lambda ids: f"<{ids[0]}>", count=2, width=2)
    assert top == [
        {"left": ["<1>", "<2>"], "token": "<3>", "right": ["<4>", "<5>"], "activation": 3.0,
         "count": 2, "example": "ex0"},
        {"left": ["<6>", "<7>"], "token": "<8>", "right": ["<9>", "<10>"], "activation": 2.0,
         "count": 1, "example": "ex1"},
    ]  # fmt: skip
    rest = contexts.top(column, lambda ids: str(ids[0]), count=10, width=2)[2:]
    # The first of the tied fives (sample 0), at the end of its sequence: no right context.
    assert [(c["left"], c["token"], c["right"], c["count"]) for c in rest] == [
        (["3", "4"], "5", [], 2),
        (["2", "3"], "4", ["5"], 1),
    ]


def test_logit_effects_are_the_model_s_own_final_norm_and_unembedding():
    """LN_f(d) through the head, minus the head of LN_f's bias alone, is the effect of the
    centred, scaled direction divided by d's spread: the ranking is the model's own."""
    torch.manual_seed(0)
    model = model_from_config(
        GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0)
    ).eval()
    with torch.no_grad():
        model.transformer.ln_f.weight.uniform_(0.5, 2.0)
        model.transformer.ln_f.bias.normal_()
        direction = torch.randn(16)
        ln_f, head = model.transformer.ln_f, model.lm_head
        direct = (head(ln_f(direction)) - head(ln_f.bias)).double()
    effects = card.logit_effects(direction, head.weight.detach(), ln_f.weight.detach())
    spread = torch.sqrt(direction.double().var(unbiased=False) + ln_f.eps)
    assert torch.allclose(effects / spread, direct, atol=1e-5)
    ranked = card.ranked_tokens(effects, lambda ids: str(ids[0]), count=3)
    order = torch.argsort(direct, descending=True)
    assert [int(t) for t, _ in ranked["promoted"]] == order[:3].tolist()
    assert [int(t) for t, _ in ranked["suppressed"]] == order.flip(0)[:3].tolist()
    # restricted to the tokens a task uses: the same order, the rest left out
    used = torch.tensor([1, 4, 9, 16, 25, 36, 49])
    within = card.ranked_tokens(effects, lambda ids: str(ids[0]), count=3, among=used)
    in_use = [t for t in order.tolist() if t in used.tolist()]
    assert [int(t) for t, _ in within["promoted"]] == in_use[:3]
    assert [int(t) for t, _ in within["suppressed"]] == in_use[::-1][:3]


def test_nearest_features_rank_decoder_cosines():
    rng = np.random.default_rng(0)
    decoder, other = (
        torch.from_numpy(rng.normal(size=(6, 5))),
        torch.from_numpy(rng.normal(size=(9, 5))),
    )
    near = card.nearest_features(decoder, [1, 4], other, count=3)
    cosines = cosine_similarity(decoder.numpy(), other.numpy())
    for f in (1, 4):
        expected = np.argsort(-cosines[f])[:3]
        assert [j for j, _ in near[f]] == expected.tolist()
        assert [c for _, c in near[f]] == pytest.approx(cosines[f, expected].tolist())


def test_hmm_transitions_read_as_name_importance_and_mean_shift():
    body = {
        "features": ["l1", "spectral"],
        "means": [[0.0, 1.0], [2.5, -1.0]],
        "transitions": [
            {"from": 0, "to": 1, "top_features": [["spectral", -0.4], ["l1", 0.2]]},
            {"from": 1, "to": 0, "top_features": []},
        ],
    }
    first, second = readable_transitions(body)
    assert first["top_features"] == [
        {"name": "spectral", "importance": -0.4, "mean_shift": -2.0},
        {"name": "l1", "importance": 0.2, "mean_shift": 2.5},
    ]
    assert second["top_features"] == []
