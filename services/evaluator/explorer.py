"""The report's activation and feature explorer: what one would otherwise open a notebook for.

For every extracted layer and checkpoint: statistics of the hidden states. For every layer
with an SAE, a card per feature (the FEATURES_PER_LAYER features with the largest mean
activation over the probe at the SAE's own checkpoint, so the page stays bounded): its
activation histogram and density, its top activating contexts (both sides), the output
tokens its decoder direction promotes and suppresses, its trajectory across checkpoints
and its nearest features in the adjacent layers. The SAE was trained at one checkpoint;
the trajectory applies that same SAE to every checkpoint's hidden states, which shows
whether the direction it found exists earlier in training; the page says so.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from services.evaluator import features as card
from shared import hidden, layout, stage_registry
from shared.errors import ArtifactNotFound, DriftlabError
from shared.spec import RunSpec
from shared.steps import extracted_steps
from shared.store import Store

#: Feature cards per SAE layer; the page embeds each card's data, so this bounds its size.
FEATURES_PER_LAYER = 32
TOP_CONTEXTS = 8
CONTEXT_TOKENS = 8
LOGIT_TOKENS = 8
NEIGHBOURS = 3
#: Features listed per checkpoint and layer in the overview table.
TOP_FEATURES = 5

Decode = Callable[[list[int]], str]


def _decoder(spec: RunSpec) -> tuple[Decode, int | None, str | None]:
    """Token ids -> text and the vocabulary size, or "#id" and why when it cannot load."""
    from shared.tokenizer import load_tokenizer

    try:
        tokenizer = load_tokenizer(spec.data.tokenizer)
    except (DriftlabError, OSError) as err:
        return (lambda ids: " ".join(f"#{i}" for i in ids)), None, f"tokenizer unavailable: {err}"
    return tokenizer.decode, tokenizer.vocab_size, None


def activation_stats(states: torch.Tensor) -> dict[str, float | int]:
    x = states.float()
    norms = x.norm(dim=1)
    return {
        "tokens": int(x.shape[0]),
        "d_model": int(x.shape[1]),
        "mean": float(x.mean()),
        "std": float(x.std()),
        "max_abs": float(x.abs().max()),
        "norm_mean": float(norms.mean()),
        "norm_std": float(norms.std()) if norms.numel() > 1 else 0.0,
        "norm_max": float(norms.max()),
    }


def overview(features: torch.Tensor) -> list[dict[str, Any]]:
    """The TOP_FEATURES features with the largest mean activation at one checkpoint."""
    mean = features.mean(0)
    chosen = torch.argsort(mean, descending=True, stable=True)[:TOP_FEATURES].tolist()
    return [
        {
            "feature": int(f),
            "mean_activation": float(mean[f]),
            "density": card.density(features[:, f]),
        }
        for f in chosen
        if float(features[:, f].max()) > 0
    ]


def _sae_step(store: Store, run_id: str, layer: int, steps: list[int]) -> int:
    """The checkpoint the layer's SAE was trained on (sae.json), else the last extracted."""
    step = store.get_json(layout.sae_config_key(run_id, layer)).get("checkpoint_step")
    return int(step) if step in steps else steps[-1]


def _unembedding(
    store: Store, run_id: str, step: int, vocab: int | None
) -> tuple[torch.Tensor, torch.Tensor | None] | str:
    """The checkpoint's output matrix (cut to the tokenizer's vocabulary) and final LN scale,
    or why there are none.

    Read from the checkpoint's safetensors by GPT-2's state-dict names (the head is tied to
    the token embedding, which `save_model` stores alone) instead of `load_model`: importing
    transformers would double the stage's time on the demo for two tensors.
    """
    key = layout.checkpoint_model_key(run_id, step)
    try:
        tensors, _ = store.get_tensors(key)
    except ArtifactNotFound:
        return f"no logit effects: checkpoint step {step} has no model ({store.url_of(key)})"
    unembedding = tensors.get("lm_head.weight", tensors.get("transformer.wte.weight"))
    if unembedding is None:
        return f"no logit effects: {store.url_of(key)} holds no GPT-2 token embedding"
    scale = tensors.get("transformer.ln_f.weight")
    return unembedding.float()[:vocab], None if scale is None else scale.float()


def trajectory_summary(acts: torch.Tensor) -> torch.Tensor:
    """[3, d_sae]: every feature's mean activation, density and max at one checkpoint.

    Only this is kept of the checkpoints other than the SAE's own: all activations of all
    checkpoints would be steps x tokens x d_sae floats (a gigabyte per layer at GPT-2's).
    """
    return torch.stack([acts.mean(0), (acts > 0).float().mean(0), acts.max(0).values])


def _feature_cards(
    layer: int,
    sae: Any,
    acts: torch.Tensor,
    trajectory: dict[int, torch.Tensor],
    contexts: card.ProbeContexts,
    decode: Decode,
    unembedding: tuple[torch.Tensor, torch.Tensor | None] | str,
) -> dict[str, dict[str, Any]]:
    """The cards of one layer's features, from its activations at the SAE's checkpoint."""
    order = torch.argsort(acts.mean(0), descending=True, stable=True)[:FEATURES_PER_LAYER]
    chosen = [int(f) for f in order.tolist() if float(acts[:, f].max()) > 0]
    directions = (sae.W_dec.detach() / sae.input_scale).float().cpu()
    cards = {}
    for f in chosen:
        column = acts[:, f]
        entry: dict[str, Any] = {
            "layer": layer,
            "feature": f,
            "density": card.density(column),
            "mean_activation": float(column.mean()),
            "histogram": card.activation_histogram(column),
            "contexts": contexts.top(column, decode, TOP_CONTEXTS, CONTEXT_TOKENS),
            "trajectory": [
                {
                    "step": s,
                    "mean": float(t[0, f]),
                    "density": float(t[1, f]),
                    "max": float(t[2, f]),
                }
                for s, t in sorted(trajectory.items())
            ],
        }
        if not isinstance(unembedding, str):
            effects = card.logit_effects(directions[f], *unembedding)
            entry.update(
                card.ranked_tokens(effects, decode, LOGIT_TOKENS, among=contexts.used_tokens)
            )
        cards[f"{layer}/{f}"] = entry
    return cards


def explore(store: Store, run_id: str, spec: RunSpec, device: str) -> dict[str, Any]:
    """Per checkpoint and layer: statistics; per SAE layer: its feature cards."""
    steps = extracted_steps(store, run_id)
    if not steps:
        command = stage_registry.EXTRACT.command(run_id, store.url)
        return {"absent": f"no extraction: run the extractor (`{command}`)"}
    probe = hidden.load_probe(store, run_id)
    n_layers = hidden.load_index(store, run_id, steps[-1]).n_layers
    saes, sae_note = _load_saes(store, run_id, n_layers, device)
    decode, vocab, tokenizer_note = _decoder(spec) if saes else ((lambda ids: ""), None, None)
    notes = [note for note in (sae_note, tokenizer_note) if note]
    cells: dict[str, Any] = {}
    sae_steps = {layer: _sae_step(store, run_id, layer, steps) for layer in saes}
    at_sae_step: dict[int, torch.Tensor] = {}
    trajectories: dict[int, dict[int, torch.Tensor]] = {layer: {} for layer in saes}
    for step in steps:
        for layer in range(hidden.load_index(store, run_id, step).n_layers):
            states = hidden.load_hidden(store, run_id, step, layer)
            cells[f"{step}/{layer}"] = {"stats": activation_stats(states)}
            if layer in saes:
                with torch.no_grad():
                    acts = saes[layer].features(states.to(device)).float().cpu()
                trajectories[layer][step] = trajectory_summary(acts)
                if step == sae_steps[layer]:
                    at_sae_step[layer] = acts
                cells[f"{step}/{layer}"]["features"] = overview(acts)
    cards: dict[str, Any] = {}
    contexts = card.ProbeContexts(probe)
    sae_info: dict[str, Any] = {}
    unembeddings: dict[int, tuple[torch.Tensor, torch.Tensor | None] | str] = {}
    for layer, sae in saes.items():
        step = sae_steps[layer]
        if step not in unembeddings:
            unembeddings[step] = _unembedding(store, run_id, step, vocab)
        layer_cards = _feature_cards(
            layer,
            sae,
            at_sae_step[layer],
            trajectories[layer],
            contexts,
            decode,
            unembeddings[step],
        )
        cards.update(layer_cards)
        sae_info[str(layer)] = {
            "step": step,
            "arch": sae.config.arch,
            "d_sae": sae.config.d_sae,
            "shown": len(layer_cards),
            "logit_note": unembeddings[step] if isinstance(unembeddings[step], str) else None,
        }
    _link_neighbours(cards, saes)
    return {
        "steps": steps,
        "layers": list(range(n_layers)),
        "sae_layers": sorted(saes),
        "saes": sae_info,
        "limits": {"features_per_layer": FEATURES_PER_LAYER, "contexts": TOP_CONTEXTS},
        "notes": notes,
        "cells": cells,
        "features": _rounded(cards),
    }


def _rounded(value: Any) -> Any:
    """Floats to 4 significant digits: what the page shows, and a third of the cards' size."""
    if isinstance(value, float):
        return float(f"{value:.4g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def _link_neighbours(cards: dict[str, Any], saes: dict[int, Any]) -> None:
    """Each card's nearest features in the layers above and below (decoder cosine)."""
    for layer, sae in saes.items():
        chosen = [c["feature"] for c in cards.values() if c["layer"] == layer]
        for other in (layer - 1, layer + 1):
            if other not in saes or not chosen:
                continue
            near = card.nearest_features(
                sae.W_dec.detach().cpu(), chosen, saes[other].W_dec.detach().cpu(), NEIGHBOURS
            )
            for f, pairs in near.items():
                cards[f"{layer}/{f}"].setdefault("neighbours", {})[str(other)] = pairs


def _load_saes(
    store: Store, run_id: str, n_layers: int, device: str
) -> tuple[dict[int, Any], str | None]:
    done = [layer for layer in range(n_layers) if store.exists(layout.sae_done_key(run_id, layer))]
    if not done:
        command = stage_registry.SAE.command(run_id, store.url)
        return {}, f"no SAE has been trained: run `{command}` for features"
    from shared.sae.artifacts import load_sae

    saes = {layer: load_sae(store, run_id, layer, device).eval() for layer in done}
    return saes, None
