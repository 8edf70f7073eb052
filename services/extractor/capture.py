"""One forward pass that returns every layer's residual stream at the kept tokens only.

Forward hooks gather the kept (row, position) pairs as each block finishes, so the full
[batch, time, d_model] activations are dropped as soon as the next block has them, padding
is never copied, and nothing beyond the probe's tokens leaves the device. The logits are
computed only at kept tokens too: the per-token entropy and next-token probability that
detection reads need nothing else.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.utils.hooks import RemovableHandle
from transformers import GPT2LMHeadModel
from transformers.models.gpt2.modeling_gpt2 import GPT2Block

from shared.hidden import RESID, SITES


@dataclass
class BatchOutput:
    """Per layer, site -> [kept, d_model] in the storage dtype, plus per-token outputs."""

    layers: list[dict[str, torch.Tensor]]
    entropy: torch.Tensor
    next_token_prob: torch.Tensor
    next_token_id: torch.Tensor


def layer_sites(n_layer: int, sites: list[str]) -> list[list[str]]:
    """Sites stored per layer: layer 0 (embeddings) has only the residual stream."""
    return [[RESID]] + [[RESID, *sites] for _ in range(n_layer)]


class Capture:
    """Hooks on a GPT-2 model that keep the residual stream (and extra sites) at kept tokens."""

    def __init__(self, model: GPT2LMHeadModel, sites: list[str], dtype: torch.dtype) -> None:
        unknown = sorted(set(sites) - set(SITES))
        if unknown:
            raise ValueError(f"unknown extraction sites {unknown}; known: {', '.join(SITES)}")
        self.model = model
        self.sites = sites
        self.dtype = dtype
        self._rows = torch.empty(0, dtype=torch.int64)
        self._positions = torch.empty(0, dtype=torch.int64)
        self._out: list[dict[str, torch.Tensor]] = []

    def _keep(self, layer: int, site: str, value: torch.Tensor | tuple[torch.Tensor, ...]) -> None:
        states = value[0] if isinstance(value, tuple) else value
        self._out[layer][site] = states[self._rows, self._positions].to(self.dtype)

    @contextmanager
    def hooks(self) -> Iterator[Capture]:
        tr = self.model.transformer
        handles: list[RemovableHandle] = [
            tr.drop.register_forward_hook(lambda _m, _i, out: self._keep(0, RESID, out))
        ]
        blocks: list[GPT2Block] = list(tr.h)  # type: ignore[arg-type]
        for layer, block in enumerate(blocks, start=1):
            handles.append(block.register_forward_hook(self._hook(layer, RESID)))
            if "attn_out" in self.sites:
                handles.append(block.attn.register_forward_hook(self._hook(layer, "attn_out")))
            if "mlp_out" in self.sites:
                handles.append(block.mlp.register_forward_hook(self._hook(layer, "mlp_out")))
            if "resid_mid" in self.sites:
                handles.append(
                    block.ln_2.register_forward_pre_hook(
                        lambda _m, args, layer=layer: self._keep(layer, "resid_mid", args[0])
                    )
                )
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def _hook(self, layer: int, site: str) -> Callable[..., None]:
        return lambda _m, _i, out: self._keep(layer, site, out)

    def run(
        self,
        input_ids: torch.Tensor,
        lengths: torch.Tensor,
        rows: torch.Tensor,
        positions: torch.Tensor,
    ) -> BatchOutput:
        """Forward `input_ids` [B, T] (padded beyond `lengths`); keep (rows, positions)."""
        device = input_ids.device
        time = input_ids.shape[1]
        mask = torch.arange(time, device=device)[None, :] < lengths[:, None]
        self._rows, self._positions = rows, positions
        self._out = [{} for _ in range(self.model.config.n_layer + 1)]
        final = self.model.transformer(input_ids=input_ids, attention_mask=mask).last_hidden_state
        # Entropy and log-probabilities in few passes over [tokens, vocab] (memory-bound
        # for a 50k vocabulary): with z = logits - max, e = exp(z) and s = sum(e),
        # log p = z - log s and H = log s - <e, z> / s; no log_softmax tensor is made.
        shifted = self.model.lm_head(final[rows, positions]).float()
        shifted -= shifted.amax(-1, keepdim=True)
        weights = shifted.exp()
        total = weights.sum(-1)
        log_total = total.log()
        entropy = log_total - torch.linalg.vecdot(weights, shifted) / total
        has_next = positions + 1 < lengths[rows]
        next_id = torch.where(
            has_next,
            input_ids[rows, (positions + 1).clamp(max=time - 1)],
            torch.full_like(rows, -1),
        )
        next_logp = shifted.gather(1, next_id.clamp(min=0)[:, None])[:, 0] - log_total
        next_prob = torch.where(has_next, next_logp.exp(), torch.full_like(next_logp, float("nan")))
        return BatchOutput(self._out, entropy, next_prob, next_id)
