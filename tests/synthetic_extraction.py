"""A run whose extraction is synthetic: known hidden states, in the extractor's format.

Stages after the extractor (ot, sae, detect) are tested on clouds whose answer is known
(a planted jump at one checkpoint, a known sparse dictionary) without training a model.
Everything is written through `shared.layout` and in `shared.hidden`'s format, so these
runs are read exactly like real ones.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from shared import hidden, layout
from shared.registry import create_run
from shared.spec import RunSpec
from shared.store import Store

#: hidden(step, layer) -> [n_tokens, d_model] float tensor
HiddenFn = Callable[[int, int], torch.Tensor]


def drifting_clouds(
    n_tokens: int, d_model: int, *, jump_at: int | None = None, jump: float = 3.0, seed: int = 0
) -> HiddenFn:
    """Gaussian clouds that drift slowly with step and depth, and jump at `jump_at`.

    From checkpoint `jump_at` on, every layer is shifted by `jump` standard deviations
    along a fixed direction: a phase transition planted at a known step.
    """
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(n_tokens, d_model, generator=gen)
    direction = torch.randn(d_model, generator=gen)
    direction /= direction.norm()
    drift = torch.randn(d_model, generator=gen) / d_model**0.5

    def cloud(step: int, layer: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed * 1_000_003 + step * 1009 + layer)
        noise = 0.05 * torch.randn(n_tokens, d_model, generator=g)
        x = base * (1.0 + 0.1 * layer) + 0.01 * step * drift + noise
        if jump_at is not None and step >= jump_at:
            x = x + jump * direction
        return x

    return cloud


def write_probe(store: Store, run_id: str, n_tokens: int, seq_len: int = 8) -> hidden.Probe:
    samples = -(-n_tokens // seq_len)
    positions = torch.arange(n_tokens) % seq_len
    probe = hidden.Probe(
        input_ids=(torch.arange(samples * seq_len) % 97).reshape(samples, seq_len),
        lengths=torch.full((samples,), seq_len, dtype=torch.int64),
        token_sample=torch.arange(n_tokens) // seq_len,
        token_position=positions,
        token_id=torch.arange(n_tokens) % 97,
        token_role=torch.where(
            positions < seq_len // 2, hidden.ROLE_QUESTION, hidden.ROLE_ANSWER
        ).to(torch.int8),
        example_ids=[f"synthetic-{i}" for i in range(samples)],
        pad_id=0,
        meta={"digest": "sha256:synthetic", "dataset": "synthetic", "token_policy": "all"},
    )
    store.put_tensors(layout.probe_key(run_id), probe.tensors(), metadata=probe.metadata())
    return probe


def write_step(
    store: Store,
    run_id: str,
    step: int,
    layers: Sequence[torch.Tensor],
    *,
    dtype: str = "float32",
    eval_metrics: dict[str, float] | None = None,
) -> None:
    """One checkpoint: its DONE marker and eval metrics, then its extraction and DONE."""
    store.put_json(
        layout.checkpoint_dynamics_key(run_id, step),
        {"step": step, "eval": eval_metrics or {}, "dynamics": {}, "train": {}},
    )
    store.put_json(layout.checkpoint_done_key(run_id, step), {"step": step})
    n_tokens, d_model = layers[0].shape
    for layer, states in enumerate(layers):
        store.put_tensors(
            layout.extract_layer_key(run_id, step, layer),
            {hidden.RESID: states.to(hidden.DTYPES[dtype])},
        )
    store.put_tensors(
        layout.extract_tokens_key(run_id, step),
        {
            "entropy": torch.ones(n_tokens),
            "next_token_prob": torch.full((n_tokens,), 0.5),
            "next_token_id": torch.zeros(n_tokens, dtype=torch.int64),
        },
    )
    index = hidden.ExtractIndex(
        step=step,
        n_layers=len(layers),
        d_model=int(d_model),
        n_tokens=int(n_tokens),
        dtype=dtype,
        sites=[],
        probe_digest="sha256:synthetic",
    )
    store.put_json(layout.extract_index_key(run_id, step), index.to_json())
    store.put_json(layout.extract_done_key(run_id, step), {"format": 1, "stage": "extract"})


def synthetic_run(
    store: Store,
    spec: RunSpec,
    *,
    steps: Sequence[int],
    n_layers: int,
    n_tokens: int,
    d_model: int,
    cloud: HiddenFn | None = None,
    eval_metrics: Callable[[int], dict[str, float]] | None = None,
) -> str:
    """Register `spec` and write a complete synthetic extraction for `steps`; the run id."""
    run_id = create_run(store, spec)
    cloud = cloud or drifting_clouds(n_tokens, d_model)
    write_probe(store, run_id, n_tokens)
    for step in steps:
        write_step(
            store,
            run_id,
            step,
            [cloud(step, layer) for layer in range(n_layers)],
            eval_metrics=eval_metrics(step) if eval_metrics else None,
        )
    return run_id
