"""Training throughput: tokens/s, model FLOPs utilisation, and what dynamics and checkpoints cost.

One JSON object per line. MFU is measured against the machine's own matmul peak, taken in
the same run (fp32 sgemm on CPU, bf16 on a GPU), so the figure means the same thing on a
laptop and an H100. The reference, timed side by side: the same model with transformers'
default GPT-2 activation ("gelu_new", eight elementwise kernels) instead of driftlab's
fused one (`speedup_vs_gelu_new`). Needs only torch, transformers and safetensors (no
pydantic), so it runs on a bare GPU machine:

    python benchmarks/bench_train.py                 # tiny and grokking's model on CPU
                                                     # (and gpt2 with --full)
    python benchmarks/bench_train.py --device cuda   # grokking's model,
                                                     # gpt2 and gpt2-medium, bf16, fused attention
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from services.trainer.dynamics import dynamics_metrics

SIZES = {  # n_layer, n_head, n_embd, vocabulary: the standard GPT2Config sizes, driftlab's
    # tiny (byte tokens) and configs/grokking.yaml's model (numbers tokenizer)
    "tiny": (2, 2, 64, 258),
    "grokking": (1, 4, 128, 1258),
    "gpt2": (12, 12, 768, 50257),
    "gpt2-medium": (24, 16, 1024, 50257),
}
# shared/models.py's activation (not imported: that would need pydantic on a bare GPU machine)
FUSED_GELU = "gelu_pytorch_tanh"


def matmul_peak(device: str, dtype: torch.dtype) -> float:
    """Best FLOP/s of a large square matmul: the ceiling MFU is measured against."""
    n = 4096 if device == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = 0.0
    for _ in range(5):
        _sync(device)
        t0 = time.perf_counter()
        reps = 20 if device == "cuda" else 3
        for _ in range(reps):
            a @ b
        _sync(device)
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0))
    return best


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def train_steps(
    arch: str, device: str, batch: int, seq: int, steps: int, activation: str
) -> tuple[float, GPT2LMHeadModel, torch.optim.Optimizer, GPT2Config]:
    """Seconds per full training step (forward, backward, clipping, AdamW) and what it trained."""
    n_layer, n_head, n_embd, vocab = SIZES[arch]
    config = GPT2Config(
        vocab_size=vocab,
        bos_token_id=vocab - 1,
        eos_token_id=vocab - 1,
        n_positions=max(seq, 128),
        n_layer=n_layer,
        n_head=n_head,
        n_embd=n_embd,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        activation_function=activation,
    )
    model = GPT2LMHeadModel._from_config(config, attn_implementation="sdpa").to(device)
    bf16 = device == "cuda" and torch.cuda.is_bf16_supported()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
    ids = torch.randint(0, config.vocab_size, (batch, seq), device=device)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast:
            logits = model(input_ids=ids).logits[:, :-1]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    for _ in range(2):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return (time.perf_counter() - t0) / steps, model, opt, config


def bench(arch: str, device: str, batch: int, seq: int, steps: int) -> dict[str, Any]:
    """driftlab's model (fused GELU) against transformers' default GPT-2 (gelu_new)."""
    reference_s, *_ = train_steps(arch, device, batch, seq, steps, "gelu_new")
    step_s, model, opt, config = train_steps(arch, device, batch, seq, steps, FUSED_GELU)
    n_layer, n_embd = config.n_layer, config.n_embd
    bf16 = device == "cuda" and torch.cuda.is_bf16_supported()

    params = sum(p.numel() for p in model.parameters())
    flops_per_token = 6 * params + 12 * n_layer * n_embd * seq  # nanoGPT's estimate
    tokens_per_s = batch * seq / step_s
    peak = matmul_peak(device, torch.bfloat16 if bf16 else torch.float32)

    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    _sync(device)
    t0 = time.perf_counter()
    dynamics_metrics(model, grads)
    _sync(device)
    dynamics_s = time.perf_counter() - t0

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        state.pop("lm_head.weight", None)
        save_file(state, os.path.join(tmp, "model.safetensors"))
        moments = {
            f"{i}.{k}": v.detach().cpu().contiguous()
            for i, s in enumerate(opt.state.values())
            for k, v in s.items()
            if v.dim() > 0
        }
        save_file(moments, os.path.join(tmp, "optim.safetensors"))
        checkpoint_s = time.perf_counter() - t0

    return {
        "bench": "train",
        "model": arch,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "precision": "bf16" if bf16 else "fp32",
        "params": params,
        "batch": batch,
        "seq": seq,
        "step_seconds": round(step_s, 5),
        "gelu_new_step_seconds": round(reference_s, 5),
        "speedup_vs_gelu_new": round(reference_s / step_s, 3),
        "tokens_per_second": round(tokens_per_s, 1),
        "model_flops_per_second": round(tokens_per_s * flops_per_token, 1),
        "matmul_peak_flops_per_second": round(peak, 1),
        "mfu": round(tokens_per_s * flops_per_token / peak, 4),
        "dynamics_seconds": round(dynamics_s, 4),
        "dynamics_share_at_every_100": round(dynamics_s / (dynamics_s + 100 * step_s), 4),
        "checkpoint_seconds": round(checkpoint_s, 4),
        "checkpoint_share_at_every_1000": round(checkpoint_s / (checkpoint_s + 1000 * step_s), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--full", action="store_true", help="also gpt2 (124M) on the CPU")
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args()
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        cases = [("grokking", 3831, 6, 50), ("gpt2", 16, 1024, 20), ("gpt2-medium", 8, 1024, 20)]
    else:
        cases = [("tiny", 16, 64, 50), ("grokking", 3831, 6, 5)]
        cases += [("gpt2", 4, 256, 3)] if args.full else []
    for arch, batch, seq, steps in cases:
        print(json.dumps(bench(arch, args.device, batch, seq, args.steps or steps)), flush=True)


if __name__ == "__main__":
    main()
