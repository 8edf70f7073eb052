"""GPT-2 family models, as the trainer, extractor and detector all see them.

One place builds a model from the run spec (a preset size or explicit sizes, random or
pretrained), saves it in the store, and loads it back: every stage studies exactly the
weights the trainer wrote. Checkpoints are Hugging Face compatible (`model.safetensors`
without the tied `lm_head.weight`, plus `config.json`), so a researcher can also open one
with `GPT2LMHeadModel.from_pretrained(folder)`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from shared import layout
from shared.errors import ArtifactNotFound, DriftlabError
from shared.spec import RunSpec, model_sizes
from shared.store import Store

# Hugging Face's own marker in safetensors metadata: `from_pretrained` checks it.
_HF_METADATA = {"format": "pt"}
_TIED_KEY = "lm_head.weight"
# GPT-2's activation, tanh-approximated GELU, as PyTorch's one fused kernel: the same function
# (within 3e-7) as transformers' "gelu_new", which spends eight elementwise kernels on it and
# was a third of a small model's step time on a CPU.
_FUSED_GELU = "gelu_pytorch_tanh"
SIZE_FIELDS = ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size")


class ModelError(DriftlabError):
    exit_code = 2


def gpt2_config(spec: RunSpec, vocab_size: int, eos_id: int, pad_id: int) -> GPT2Config:
    """The GPT2Config of a randomly initialised model of the spec's size."""
    sizes = model_sizes(spec)
    p = spec.model.dropout
    return GPT2Config(
        vocab_size=vocab_size,
        n_positions=sizes.n_positions,
        n_embd=sizes.n_embd,
        n_layer=sizes.n_layer,
        n_head=sizes.n_head,
        resid_pdrop=p,
        embd_pdrop=p,
        attn_pdrop=p,
        initializer_range=spec.model.init_std,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        activation_function=_FUSED_GELU,
    )


def model_vocab_size(spec: RunSpec, tokenizer_vocab: int) -> int:
    """The embedding size: the tokenizer's, or a larger explicit `model.vocab_size`."""
    wanted = spec.model.vocab_size
    if wanted is None:
        return tokenizer_vocab
    if wanted < tokenizer_vocab:
        raise ModelError(
            f"model.vocab_size is {wanted} but the {spec.data.tokenizer!r} tokenizer has "
            f"{tokenizer_vocab} tokens: raise model.vocab_size or remove it"
        )
    return wanted


def build_model(spec: RunSpec, vocab_size: int, eos_id: int, pad_id: int) -> GPT2LMHeadModel:
    """A fresh model: random init from the spec's seed, or the pretrained weights."""
    if spec.model.init == "pretrained":
        model = load_pretrained(str(spec.model.pretrained))
        if model.config.vocab_size < vocab_size:
            raise ModelError(
                f"pretrained model {spec.model.pretrained!r} has {model.config.vocab_size} "
                f"tokens but the {spec.data.tokenizer!r} tokenizer has {vocab_size}: use the "
                "model's own tokenizer (data.tokenizer: gpt2 or its folder)"
            )
        return model
    config = gpt2_config(spec, vocab_size, eos_id, pad_id)
    model = model_from_config(config)
    init_weights(model, std=spec.model.init_std, mean=spec.model.init_mean, seed=spec.train.seed)
    return model


def model_from_config(config: GPT2Config) -> GPT2LMHeadModel:
    # PyTorch's fused scaled-dot-product attention; transformers falls back when absent.
    return GPT2LMHeadModel._from_config(_with_fused_gelu(config), attn_implementation="sdpa")


def _with_fused_gelu(config: GPT2Config) -> GPT2Config:
    """Pretrained GPT-2s and checkpoints written before the fused GELU run with it too."""
    if config.activation_function == "gelu_new":
        config.activation_function = _FUSED_GELU
    return config


@torch.no_grad()
def init_weights(model: GPT2LMHeadModel, std: float, mean: float, seed: int) -> None:
    """GPT-2's initialisation, seeded and with a configurable mean.

    Matrices and embeddings ~ N(mean, std); residual output projections use
    std / sqrt(2 n_layer) as in GPT-2 (so the residual stream's variance does not grow
    with depth); biases 0; LayerNorm gain 1. A private generator makes the weights depend
    on the seed alone, not on what else consumed the global RNG.
    """
    gen = torch.Generator().manual_seed(seed)
    residual_std = std / math.sqrt(2 * model.config.n_layer)
    for name, param in model.named_parameters():
        if ".ln_" in name or name.startswith("transformer.ln_f"):
            param.fill_(1.0 if name.endswith("weight") else 0.0)
        elif name.endswith("bias"):
            param.zero_()
        else:
            s = residual_std if name.endswith("c_proj.weight") else std
            param.copy_(torch.normal(mean, s, param.shape, generator=gen))


def load_pretrained(name_or_path: str) -> GPT2LMHeadModel:
    """A Hugging Face GPT-2 checkpoint by hub name (users) or local folder (tests, clusters)."""
    try:
        config = _with_fused_gelu(GPT2Config.from_pretrained(name_or_path))
        model = GPT2LMHeadModel.from_pretrained(
            name_or_path, config=config, attn_implementation="sdpa"
        )
    except (OSError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(
            f"cannot load pretrained model {name_or_path!r}: {reason} (give a hub name "
            "reachable from here, or a folder saved with save_pretrained)"
        ) from None
    return model


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict as saved: without the tied head, which is the embedding again."""
    state = dict(model.state_dict())
    head = state.get(_TIED_KEY)
    wte = state.get("transformer.wte.weight")
    if head is not None and wte is not None and head.data_ptr() == wte.data_ptr():
        del state[_TIED_KEY]
    return {k: v.detach() for k, v in state.items()}


def save_model(store: Store, run_id: str, step: int, model: GPT2LMHeadModel) -> None:
    store.put_tensors(
        layout.checkpoint_model_key(run_id, step), model_tensors(model), metadata=_HF_METADATA
    )
    store.put_json(layout.checkpoint_config_key(run_id, step), model.config.to_dict())


def load_config(store: Store, run_id: str, step: int) -> GPT2Config:
    key = layout.checkpoint_config_key(run_id, step)
    try:
        data = store.get_json(key)
    except ArtifactNotFound:
        raise ModelError(
            f"checkpoint step {step} of run {run_id} has no config.json ({store.url_of(key)}): "
            "has the trainer written it?"
        ) from None
    return GPT2Config.from_dict(data)


def load_model(
    store: Store, run_id: str, step: int, device: str | torch.device = "cpu"
) -> GPT2LMHeadModel:
    """The model of one checkpoint, in eval mode on `device`."""
    config = load_config(store, run_id, step)
    model = model_from_config(config)
    tensors, _ = store.get_tensors(layout.checkpoint_model_key(run_id, step))
    load_tensors(model, tensors, f"checkpoint step {step} of run {run_id}")
    model.to(device)  # type: ignore[arg-type]
    return model.eval()


def load_tensors(model: torch.nn.Module, tensors: dict[str, torch.Tensor], what: str) -> None:
    """Load a saved state dict, failing with one line when it is from another architecture."""
    own = model.state_dict()
    missing = sorted(set(own) - set(tensors) - {_TIED_KEY})
    unexpected = sorted(set(tensors) - set(own))
    wrong = [k for k in tensors if k in own and tuple(tensors[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        detail = (
            f"{wrong[0]} is {tuple(tensors[wrong[0]].shape)}, the model expects "
            f"{tuple(own[wrong[0]].shape)}"
            if wrong
            else f"missing {missing[:2]}"
            if missing
            else f"unexpected {unexpected[:2]}"
        )
        raise ModelError(f"{what} does not fit this model's architecture: {detail}")
    model.load_state_dict(tensors, strict=False)
    if isinstance(model, GPT2LMHeadModel):
        model.tie_weights()


def describe_sizes(config: GPT2Config) -> dict[str, Any]:
    return {k: getattr(config, k) for k in SIZE_FIELDS}


def check_same_architecture(expected: GPT2Config, found: GPT2Config, what: str) -> None:
    a, b = describe_sizes(expected), describe_sizes(found)
    if a != b:
        diff = ", ".join(f"{k} {b[k]} (spec: {a[k]})" for k in SIZE_FIELDS if a[k] != b[k])
        raise ModelError(f"{what} is from another architecture: {diff}")


def count_parameters(model: torch.nn.Module) -> int:
    """Unique parameters (the tied head counts once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def decode_steps(
    model: GPT2LMHeadModel,
    chunk: Sequence[Sequence[int]],
    max_new_tokens: int,
    pad_id: int,
    choose: Callable[[torch.Tensor], torch.Tensor],
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """KV-cached decoding of one batch of prompts: yields (last logits, chosen tokens).

    Prompts are left-padded so every row's next token sits in the last column; position
    ids count only real tokens, so padding changes nothing but speed. `choose` maps the
    float logits [rows, vocab] to the next token of each row; the caller decides when to
    stop (it stops iterating), and the context length caps the number of steps.
    """
    device = next(model.parameters()).device
    width = max(len(p) for p in chunk)
    budget = max(0, min(max_new_tokens, model.config.n_positions - width))
    ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(chunk), width), dtype=torch.long)
    for i, p in enumerate(chunk):
        ids[i, width - len(p) :] = torch.tensor(list(p), dtype=torch.long)
        mask[i, width - len(p) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    past = None
    step_ids = ids
    for _ in range(budget):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -step_ids.shape[1] :]
        out = model(
            input_ids=step_ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=past,
            use_cache=True,
        )
        past = out.past_key_values
        logits = out.logits[:, -1, :].float()
        nxt = choose(logits)
        yield logits, nxt
        step_ids = nxt.unsqueeze(-1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)


@torch.inference_mode()
def greedy_generate(
    model: GPT2LMHeadModel,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    batch_size: int = 64,
) -> list[list[int]]:
    """Greedy continuations of tokenised prompts, batched, with the KV cache.

    Each row stops at its first `eos_id` (not included) or after `max_new_tokens`.
    """
    limit = model.config.n_positions
    results: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = [list(p)[-(limit - 1) :] for p in prompts[start : start + batch_size]]
        out: list[list[int]] = [[] for _ in chunk]
        done = [False] * len(chunk)
        for _, nxt in decode_steps(model, chunk, max_new_tokens, pad_id, _argmax):
            for i, tok in enumerate(nxt.tolist()):
                done[i] = done[i] or tok == eos_id
                if not done[i]:
                    out[i].append(tok)
            if all(done):
                break
        results.extend(out)
    return results


def _argmax(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(-1)
