"""Answer generation that keeps what detection reads at every generated token.

`shared.models.greedy_generate` returns tokens only; detection also needs, for each step,
the residual stream at every layer (to encode with the SAEs and for the dense probe), the
predictive entropy and the probability of the token taken. Hooks follow `shared.hidden`'s
convention (layer 0 = output of `transformer.drop`, layer l = output of block l, before
`ln_f`), so the SAEs trained on extracted hidden states see the same quantity here.

A step is one next-token prediction: the hidden states are those of the position whose
logits chose the token. The step that chose end-of-text is kept (deciding to stop is part
of the answer, and an empty answer still has one step), but its token is not.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from transformers import GPT2LMHeadModel

from shared.models import decode_steps


@dataclass(frozen=True)
class Generation:
    """One answer: its tokens (eos excluded) and, per step, what the model computed."""

    tokens: list[int]
    #: [steps, n_layer + 1, d_model] float32 residual stream at each step.
    hidden: torch.Tensor
    #: [steps] entropy (nats) of the next-token distribution the token was drawn from.
    entropy: torch.Tensor
    #: [steps] probability of the token taken (eos at the stopping step).
    token_prob: torch.Tensor


@dataclass(frozen=True)
class Sampling:
    """Greedy when `temperature` is 0; else sampling, optionally among the `top_k` best."""

    temperature: float = 0.0
    top_k: int | None = None
    generator: torch.Generator | None = None

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        if self.temperature == 0:
            return logits.argmax(-1)
        scaled = logits / self.temperature
        if self.top_k is not None and self.top_k < scaled.shape[-1]:
            cut = scaled.topk(self.top_k, dim=-1).values[:, -1:]
            scaled = scaled.masked_fill(scaled < cut, float("-inf"))
        probs = torch.softmax(scaled, dim=-1)
        return torch.multinomial(probs, 1, generator=self.generator)[:, 0]


@contextmanager
def _last_position_states(model: GPT2LMHeadModel) -> Iterator[list[torch.Tensor | None]]:
    """Hooks that leave each layer's hidden state at the last position in a list."""
    transformer: Any = model.transformer
    sites = [transformer.drop, *transformer.h]
    kept: list[torch.Tensor | None] = [None] * len(sites)

    def hook(layer: int) -> Callable[..., None]:
        def keep(_module: Any, _inputs: Any, output: Any) -> None:
            states = output[0] if isinstance(output, tuple) else output
            kept[layer] = states[:, -1, :].detach().float()

        return keep

    handles = [site.register_forward_hook(hook(i)) for i, site in enumerate(sites)]
    try:
        yield kept
    finally:
        for handle in handles:
            handle.remove()


@torch.inference_mode()
def generate(
    model: GPT2LMHeadModel,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    sampling: Sampling,
    batch_size: int = 32,
) -> list[Generation]:
    """Continuations of tokenised prompts with per-step hidden states, batched, KV-cached.

    Prompts are left-padded so every row's next token comes from the last column, and
    position ids count real tokens only (as in `greedy_generate`). A row stops at eos or
    after `max_new_tokens`; the context length caps both.
    """
    limit = model.config.n_positions
    results: list[Generation] = []
    with _last_position_states(model) as kept:
        for start in range(0, len(prompts), batch_size):
            chunk = [list(p)[-(limit - 1) :] for p in prompts[start : start + batch_size]]
            results.extend(
                _generate_batch(model, chunk, max_new_tokens, eos_id, pad_id, sampling, kept)
            )
    return results


def _generate_batch(
    model: GPT2LMHeadModel,
    chunk: list[list[int]],
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    sampling: Sampling,
    kept: list[torch.Tensor | None],
) -> list[Generation]:
    tokens: list[list[int]] = [[] for _ in chunk]
    hidden: list[list[torch.Tensor]] = [[] for _ in chunk]
    entropy: list[list[float]] = [[] for _ in chunk]
    prob: list[list[float]] = [[] for _ in chunk]
    done = [False] * len(chunk)
    for logits, nxt in decode_steps(model, chunk, max_new_tokens, pad_id, sampling.choose):
        logp = torch.log_softmax(logits, dim=-1)
        step_entropy = -(logp.exp() * logp).sum(-1)
        step_prob = logp.gather(1, nxt[:, None])[:, 0].exp()
        states = torch.stack([k for k in kept if k is not None], dim=1).cpu()
        for i, tok in enumerate(nxt.tolist()):
            if done[i]:
                continue
            hidden[i].append(states[i])
            entropy[i].append(float(step_entropy[i]))
            prob[i].append(float(step_prob[i]))
            if tok == eos_id:
                done[i] = True
            else:
                tokens[i].append(tok)
        if all(done):
            break
    return [
        Generation(
            tokens=tokens[i],
            hidden=torch.stack(hidden[i]),
            entropy=torch.tensor(entropy[i]),
            token_prob=torch.tensor(prob[i]),
        )
        for i in range(len(chunk))
    ]
