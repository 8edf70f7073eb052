"""Training-dynamics metrics: checked against a plain float64 per-matrix reference.

The vectorised code (stacks per shape, Gram eigenvalues, one host sync) has many ways to be
subtly wrong (a wrong q/k/v block, a transposed MLP matrix, a mean over the wrong axis); a
naive numpy re-derivation of every definition on a tiny random GPT-2 catches them all.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from services.trainer import dynamics
from services.trainer.dynamics import MATRIX_METRICS, dynamics_metrics, weight_matrices
from shared.spec import DYNAMICS_FEATURES

N_LAYER, N_EMBD = 2, 64


def _tiny(seed: int = 0) -> GPT2LMHeadModel:
    """A 2-layer, d=64 GPT-2 with every parameter random (GPT-2 initialises biases to 0,
    which would make the bias statistics trivially right)."""
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=N_LAYER, n_head=2, n_embd=N_EMBD, n_positions=32, vocab_size=101)
    model = GPT2LMHeadModel(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    return model


def _reference(model: GPT2LMHeadModel) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Every metric computed the obvious way, one matrix at a time, in float64 numpy."""
    n = model.config.n_embd
    per_matrix: dict[str, dict[str, float]] = {}
    weights, biases = [], []
    params = {name: p.detach().double().numpy() for name, p in model.named_parameters()}
    for i in range(model.config.n_layer):
        block = {k.removeprefix(f"transformer.h.{i}."): v for k, v in params.items()}
        attn = block["attn.c_attn.weight"]
        mats = {
            "attn.q": attn[:, :n],
            "attn.k": attn[:, n : 2 * n],
            "attn.v": attn[:, 2 * n :],
            "attn.o": block["attn.c_proj.weight"],
            "mlp.in": block["mlp.c_fc.weight"],
            "mlp.out": block["mlp.c_proj.weight"],
        }
        for name, x in mats.items():
            sv = np.linalg.svd(x, compute_uv=False)
            l1, l2, trace = np.abs(x).sum(), np.sqrt((x**2).sum()), np.trace(x)
            floored = np.where(sv < dynamics.SV_FLOOR, 0.0, sv)
            per_matrix[f"h.{i}.{name}"] = {
                "l1": l1,
                "l2": l2,
                "trace": trace,
                "spectral": sv.max(),
                "code_sparsity": l1 / l2,
                "computational_sparsity": trace / sv.max(),
                "sv_mean": floored.mean(),
                "sv_var": floored.var(ddof=1),
            }
            weights.append(x.ravel())
        for module in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            biases.append(block[f"{module}.bias"])
    headline = {m: float(np.mean([v[m] for v in per_matrix.values()])) for m in MATRIX_METRICS}
    for prefix, values in (("w", np.concatenate(weights)), ("b", np.concatenate(biases))):
        lower_median = np.sort(values)[(values.size - 1) // 2]  # torch.median's convention
        headline |= {
            f"{prefix}_mean": values.mean(),
            f"{prefix}_median": lower_median,
            f"{prefix}_var": values.var(ddof=1),
        }
    return headline, per_matrix


def _close(got: float, want: float, rel: float = 1e-4, abs_: float = 1e-7) -> bool:
    return math.isclose(got, float(want), rel_tol=rel, abs_tol=abs_)


def test_matches_naive_float64_reference_on_tiny_gpt2() -> None:
    model = _tiny()
    got = dynamics_metrics(model, per_matrix=True)
    headline, per_matrix = _reference(model)
    bad = {k: (got[k], v) for k, v in headline.items() if not _close(got[k], v)}
    for name, metrics in per_matrix.items():
        for metric, want in metrics.items():
            key = f"matrix.{name}.{metric}"
            if not _close(got[key], want):
                bad[key] = (got[key], want)
    assert not bad
    assert len(per_matrix) == 6 * N_LAYER


def test_every_spec_feature_is_produced_finite_and_json_able() -> None:
    got = dynamics_metrics(_tiny())
    assert set(DYNAMICS_FEATURES) <= set(got)
    assert all(type(v) is float and math.isfinite(v) for v in got.values())
    json.dumps(got, allow_nan=False)
    assert not any(k.startswith("matrix.") for k in got)  # per-matrix values are opt-in


def _known_model() -> GPT2LMHeadModel:
    """One layer, d=8, with hand-made matrices whose metrics are known exactly."""
    config = GPT2Config(n_layer=1, n_head=2, n_embd=8, n_positions=8, vocab_size=16)
    model = GPT2LMHeadModel(config)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for p in params.values():
            p.zero_()
        params["transformer.h.0.attn.c_attn.weight"].copy_(
            torch.cat([torch.diag(torch.arange(1.0, 9.0)), 2 * torch.eye(8), -torch.eye(8)], 1)
        )
        # [8, 32] with 3 on the main diagonal; [32, 8] with a single entry, off the diagonal
        params["transformer.h.0.mlp.c_fc.weight"][:, :8] = 3 * torch.eye(8)
        params["transformer.h.0.mlp.c_proj.weight"][10, 2] = 5.0
    return model


def test_hand_made_matrices_give_exact_values() -> None:
    got = dynamics_metrics(_known_model(), per_matrix=True)
    expected = {
        # q = diag(1..8): singular values 1..8, variance (n-1 denominator) 6
        "attn.q": (36, math.sqrt(204), 36, 8, 36 / math.sqrt(204), 36 / 8, 4.5, 6),
        "attn.k": (16, math.sqrt(32), 16, 2, 16 / math.sqrt(32), 8, 2, 0),  # 2 I
        "attn.v": (8, math.sqrt(8), -8, 1, math.sqrt(8), -8, 1, 0),  # -I
        "attn.o": (0, 0, 0, 0, 0, 0, 0, 0),  # zero matrix: ratios defined as 0
        "mlp.in": (24, math.sqrt(72), 24, 3, 24 / math.sqrt(72), 8, 3, 0),
        # a single 5: trace 0, singular values (5, 0 x 7)
        "mlp.out": (5, 5, 0, 5, 1, 0, 5 / 8, (4.375**2 + 7 * 0.625**2) / 7),
    }
    for name, values in expected.items():
        for metric, want in zip(MATRIX_METRICS, values, strict=True):
            assert _close(got[f"matrix.h.0.{name}.{metric}"], want, rel=1e-6, abs_=1e-6), (
                name,
                metric,
            )
    for i, metric in enumerate(MATRIX_METRICS):
        mean = sum(v[i] for v in expected.values()) / len(expected)
        assert _close(got[metric], mean, rel=1e-6, abs_=1e-6), metric
    assert got["b_mean"] == got["b_median"] == got["b_var"] == 0.0


def test_qkv_split_follows_gpt2_attention() -> None:
    model = _known_model()
    mats = weight_matrices(model)
    assert set(mats) == {
        f"h.0.{m}" for m in ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.in", "mlp.out")
    }
    torch.testing.assert_close(mats["h.0.attn.q"], torch.diag(torch.arange(1.0, 9.0)))
    torch.testing.assert_close(mats["h.0.attn.k"], 2 * torch.eye(8))
    torch.testing.assert_close(mats["h.0.attn.v"], -torch.eye(8))
    # GPT-2 computes q, k, v = c_attn(x).split(n_embd): the blocks act as x @ W.
    model = _tiny()
    c_attn = model.get_submodule("transformer.h.1.attn.c_attn")
    mats = weight_matrices(model)
    x = torch.randn(3, N_EMBD)
    with torch.no_grad():
        q, k, v = c_attn(x).split(N_EMBD, dim=-1)
        b_q, b_k, b_v = model.get_parameter("transformer.h.1.attn.c_attn.bias").split(N_EMBD)
    torch.testing.assert_close(q, x @ mats["h.1.attn.q"] + b_q)
    torch.testing.assert_close(k, x @ mats["h.1.attn.k"] + b_k)
    torch.testing.assert_close(v, x @ mats["h.1.attn.v"] + b_v)


def _backward(model: GPT2LMHeadModel) -> None:
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()


def _grad_norms_by_hand(named: dict[str, torch.Tensor]) -> dict[str, float]:
    out = {}
    for i in range(N_LAYER):
        sq = sum(g.double().square().sum() for n, g in named.items() if f".h.{i}." in n)
        out[f"grad_norm.h.{i}"] = math.sqrt(float(sq))
    out["grad_norm"] = math.sqrt(float(sum(g.double().square().sum() for g in named.values())))
    return out


def test_grad_norms_per_layer_from_dot_grad_and_from_a_mapping() -> None:
    model = _tiny()
    assert not any(k.startswith("grad_norm") for k in dynamics_metrics(model))
    _backward(model)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    want = _grad_norms_by_hand(grads)
    got = dynamics_metrics(model)  # reads .grad
    assert {k for k in got if k.startswith("grad_norm")} == set(want)
    for key, value in want.items():
        assert _close(got[key], value, rel=1e-6), key
    doubled = {n: 2 * g for n, g in grads.items()}
    got = dynamics_metrics(model, doubled)
    for key, value in want.items():
        assert _close(got[key], 2 * value, rel=1e-6), key


def test_sums_of_squares_stay_exact_for_embedding_sized_tensors() -> None:
    # float32 vector_norm of 5M entries is ~1e-4 off on a CPU; the metric must not be.
    torch.manual_seed(0)
    g = torch.randn(5_000_003) * 1e-3
    want = float(g.double().square().sum())
    assert _close(float(dynamics._sum_of_squares(g)), want, rel=1e-7)


def test_low_rank_matrices_keep_their_zero_singular_values() -> None:
    # Why the Gram matrix is float64: in float32 each zero singular value of this rank-4
    # matrix would come out near 2e-4 * spectral, biasing sv_mean by about 0.1%.
    model = _tiny()
    torch.manual_seed(1)
    low_rank = torch.randn(N_EMBD, 4) @ torch.randn(4, 4 * N_EMBD)
    with torch.no_grad():
        model.get_parameter("transformer.h.1.mlp.c_fc.weight").copy_(low_rank)
    got = dynamics_metrics(model, per_matrix=True)
    _, per_matrix = _reference(model)
    for metric in ("spectral", "sv_mean", "sv_var"):
        want = per_matrix["h.1.mlp.in"][metric]
        assert _close(got[f"matrix.h.1.mlp.in.{metric}"], want, rel=1e-6), metric


def test_a_non_finite_matrix_is_skipped_not_fatal() -> None:
    model = _tiny()
    clean, per_matrix = _reference(model)  # numpy's SVD itself fails on a NaN matrix
    with torch.no_grad():
        model.get_parameter("transformer.h.0.mlp.c_fc.weight")[3, 5] = float("nan")
    got = dynamics_metrics(model, per_matrix=True)
    assert all(math.isnan(got[f"matrix.h.0.mlp.in.{m}"]) for m in MATRIX_METRICS)
    others = [v for name, v in per_matrix.items() if name != "h.0.mlp.in"]
    for metric in MATRIX_METRICS:
        assert _close(got[metric], float(np.mean([v[metric] for v in others]))), metric
    assert math.isnan(got["w_mean"])  # the distribution of all weights is honestly NaN
    assert _close(got["b_mean"], clean["b_mean"])


def test_bfloat16_model_is_measured_in_float32() -> None:
    model = _tiny()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())  # the values a bf16 model holds
    want = dynamics_metrics(model)
    got = dynamics_metrics(model.bfloat16())
    for key, value in want.items():
        assert _close(got[key], value, rel=1e-5, abs_=1e-8), key


def test_measuring_a_stack_in_slices_does_not_change_results(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = _tiny()
    whole = dynamics_metrics(model, per_matrix=True)
    monkeypatch.setattr(dynamics, "_CHUNK_ELEMENTS", 3 * N_EMBD * N_EMBD)
    chunked = dynamics_metrics(model, per_matrix=True)
    assert chunked.keys() == whole.keys()
    assert all(_close(chunked[k], v, rel=1e-9, abs_=1e-12) for k, v in whole.items())
