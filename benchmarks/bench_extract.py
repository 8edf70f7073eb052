"""Benchmark: extraction throughput against the bare forward pass of the same model.

One JSON object per case on stdout. Both sides run the same random-init GPT-2-style model
over the same length-sorted batches of a synthetic probe (random token ids, lengths
between half and all of the context), in the same process, alternating, best of
`--repeats`:

* bare: `model(input_ids, attention_mask)` with its logits, nothing kept;
* extract: driftlab's batch loop (hooks keep every real token of every layer, per-token
  entropy and next-token probability, device-to-host copies, the writer thread filling
  preallocated layer files) plus the uploads, here copies into a local folder as the
  folder store does.

`ratio` = extract tokens/s / bare tokens/s; the goal is 0.85 or more. Absolute numbers
mean something only on a GPU (reference: ~167,000 tokens/s reported for GPT-2 medium
extraction on four A100s). Needs torch and transformers only, so it runs on a bare GPU
machine: `python benchmarks/bench_extract.py [--quick] [--device cuda]`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from services.extractor.batches import batch_bounds, extract_batches
from services.extractor.capture import layer_sites
from services.extractor.writer import LayerWriter
from shared.hidden import DTYPES, Probe

CASES: dict[str, dict[str, int]] = {
    "tiny": {"n_layer": 2, "n_head": 2, "n_embd": 64, "vocab": 260, "seq": 64, "samples": 512},
    "gpt2-small": {
        "n_layer": 12, "n_head": 12, "n_embd": 768, "vocab": 50257, "seq": 128, "samples": 48,
    },
    "gpt2-medium": {
        "n_layer": 24, "n_head": 16, "n_embd": 1024, "vocab": 50257, "seq": 256, "samples": 1024,
    },
}  # fmt: skip


def synthetic_probe(samples: int, seq: int, vocab: int, seed: int = 0) -> Probe:
    """Every real token kept (token_policy all), sequences sorted by length like the probe."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(seq // 2, seq + 1, (samples,), generator=gen).sort().values
    input_ids = torch.randint(0, vocab, (samples, seq), generator=gen)
    pad = torch.arange(seq)[None, :] >= lengths[:, None]
    input_ids[pad] = 0
    sample = torch.repeat_interleave(torch.arange(samples), lengths)
    starts = torch.cumsum(lengths, 0) - lengths
    position = torch.arange(int(lengths.sum())) - torch.repeat_interleave(starts, lengths)
    return Probe(
        input_ids=input_ids,
        lengths=lengths,
        token_sample=sample,
        token_position=position,
        token_id=input_ids[sample, position],
        token_role=torch.zeros_like(sample, dtype=torch.int8),
        example_ids=[str(i) for i in range(samples)],
        pad_id=0,
        meta={"digest": "bench"},
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bare_pass(model: GPT2LMHeadModel, probe: Probe, batch_size: int) -> float:
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()
    _sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode(), autocast:
        for s0, s1, _, _ in batch_bounds(probe, batch_size):
            lengths = probe.lengths[s0:s1]
            ids = probe.input_ids[s0:s1, : int(lengths.max())].to(device, non_blocking=True)
            mask = torch.arange(ids.shape[1], device=device)[None, :] < lengths.to(device)[:, None]
            model(input_ids=ids, attention_mask=mask)
    _sync(device)
    return time.perf_counter() - t0


def extract_pass(
    model: GPT2LMHeadModel, probe: Probe, batch_size: int, dtype: torch.dtype, out: Path
) -> float:
    device = next(model.parameters()).device
    n_layer, d = model.config.n_layer, model.config.n_embd
    keys = [f"layer-{layer:02d}.safetensors" for layer in range(n_layer + 1)]

    def upload(key: str, path: Path) -> None:
        shutil.copyfile(path, out / key)

    _sync(device)
    t0 = time.perf_counter()
    with LayerWriter(
        keys,
        layer_sites(n_layer, []),
        probe.n_tokens,
        d,
        dtype,
        [{}] * (n_layer + 1),
        background=device.type == "cuda",
    ) as writer:
        tokens = extract_batches(model, probe, writer, sites=[], dtype=dtype, batch_size=batch_size)
        tokens.entropy.cpu()  # the per-token outputs reach the host, as the stage stores them
        writer.finish(upload)
    _sync(device)
    return time.perf_counter() - t0


def run_case(name: str, args: argparse.Namespace) -> dict[str, Any]:
    size = dict(CASES[name])
    if args.samples:
        size["samples"] = args.samples
    device = torch.device(args.device)
    config = GPT2Config(
        n_layer=size["n_layer"], n_head=size["n_head"], n_embd=size["n_embd"],
        vocab_size=size["vocab"], n_positions=size["seq"], bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    model = GPT2LMHeadModel(config).eval()
    model.to(device)
    probe = synthetic_probe(size["samples"], size["seq"], size["vocab"])
    dtype = DTYPES[args.dtype]
    tokens = int(probe.lengths.sum())
    bare: list[float] = []
    extract: list[float] = []
    with tempfile.TemporaryDirectory(prefix="bench-extract-") as tmp:
        extract_pass(model, probe, args.batch_size, dtype, Path(tmp))  # warm-up both
        bare_pass(model, probe, args.batch_size)
        for _ in range(args.repeats):
            bare.append(bare_pass(model, probe, args.batch_size))
            extract.append(extract_pass(model, probe, args.batch_size, dtype, Path(tmp)))
        stored = sum(f.stat().st_size for f in Path(tmp).iterdir())
    bare_rate, extract_rate = tokens / min(bare), tokens / min(extract)
    return {
        "bench": "extract",
        "case": name,
        "device": str(device),
        "n_layer": size["n_layer"],
        "d_model": size["n_embd"],
        "tokens": tokens,
        "batch_size": args.batch_size,
        "dtype": args.dtype,
        "stored_mib": round(stored / 2**20, 1),
        "bare_tokens_per_s": round(bare_rate, 1),
        "extract_tokens_per_s": round(extract_rate, 1),
        "ratio": round(extract_rate / bare_rate, 3),
        "goal_ratio": 0.85,
        "reference_tokens_per_s": 167000 if name == "gpt2-medium" else None,
        "reference": "GPT-2 medium extraction, four A100s (reported)",
        "repeats": args.repeats,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cases", nargs="*", help=f"of {', '.join(CASES)}")
    parser.add_argument("--quick", action="store_true", help="tiny case only")
    parser.add_argument("--samples", type=int, help="probe sequences (default per case)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float16")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    default = ["gpt2-medium"] if args.device == "cuda" else ["tiny", "gpt2-small"]
    cases = ["tiny"] if args.quick else (args.cases or default)
    torch.manual_seed(0)
    for name in cases:
        print(json.dumps(run_case(name, args)), flush=True)


if __name__ == "__main__":
    main()
