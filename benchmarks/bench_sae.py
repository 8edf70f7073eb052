"""Benchmark: SAE training throughput, against the machine's own matmul peak.

One JSON object per case on stdout. Each case trains an SAE through the service's own
path (`services.sae.batches.Batches` over a stored-dtype float16 layer tensor, then
`services.sae.fit.fit`: Adam, schedule, decoder renormalisation, bf16 autocast on CUDA) for
a fixed number of steps after a warm-up, and reports samples (hidden-state vectors) per
second and the FLOP/s that implies.

FLOPs per sample: the encoder and decoder matmuls (2·d_in·d_sae each) forward, twice
that backward: 12·d_in·d_sae. Element-wise work, top-k and Adam are not counted, so the
fraction is a lower bound on how busy the machine is.

The side-by-side reference is the machine itself: the matmul peak is measured in the same
run, in the dtype training computes in (float32 on CPU, bfloat16 on CUDA), both on a large
square product and on the SAE's own encoder shape ([batch, d_in] @ [d_in, d_sae]); the
fraction is against the larger. Published figures (other hardware, not re-measured here)
are printed as ratios for orientation in the GhostTrack shape (1024 -> 5120): GhostTrack ~33,000 samples/s and SAELens ~55,000
tokens/s end to end, both on an A100; the goal on one H100 is 1,000,000 samples/s.

With `--stream` it instead sets the two sources of `sae.source` side by side, one JSON
object per layer: samples/s, wall and CPU seconds of training from a stored float16 tensor
(the extracted probe's path) and of training on activations streamed from a GPT-2 model
(random weights, random token sequences of up to `--seq-len`) through the mixing buffer,
which its producer thread refills during the timed steps (the data set holds several
buffers), and their ratios (goal on a CPU: >= 0.8): `ratio` of samples/s, `cpu_ratio` of
CPU seconds (every thread's: the forward passes cost CPU even where the thread hides them
from the wall clock on a second core), for each `--stream-dtype` of the forward pass
(`sae.stream_dtype`; float32 and bfloat16 by default); each side is the fastest of
`--repeats` alternating runs, so a neighbour's burst on a shared machine slows one run
rather than one side. Streaming costs one forward pass up to the layer per training
sample, so the CPU ratio falls with depth and with the model's size relative to the SAE's.

Imports only torch and the service's model code (`--stream` also needs transformers), so it
runs on a bare GPU machine.

Usage: python benchmarks/bench_sae.py [--quick] [--device cpu|cuda] [--arch jumprelu ...]
       python benchmarks/bench_sae.py --stream [--quick] [--n-layer 1 --d-in 128 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import torch

from services.sae.batches import Batches, input_scale, place
from services.sae.buffer import MixingBuffer
from services.sae.fit import Schedule, fit
from services.sae.stream import Sequences, all_activations, endless_chunks, generating_model
from shared.sae.base import SAEConfig, SparseAutoencoder
from shared.sae.models import build_sae

PUBLISHED = {"ghosttrack_a100": 33_000.0, "saelens_a100": 55_000.0, "goal_h100": 1_000_000.0}
ARCHS = ("jumprelu", "topk", "relu")
#: (d_in, expansion) of the published figures: GPT-2 medium, 1024 -> 5120.
GHOSTTRACK_SHAPE = (1024, 5)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _matmul_flops(m: int, k: int, n: int, device: torch.device, dtype: torch.dtype) -> float:
    """Best FLOP/s of [m, k] @ [k, n] over a few timed repetitions."""
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    _sync(device)
    best = float("inf")
    reps = 10 if device.type == "cuda" else 3
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2.0 * m * k * n / best


def matmul_peak(device: torch.device, batch: int, d_in: int, d_sae: int) -> dict[str, float]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    square = 8192 if device.type == "cuda" else 1024
    return {
        "square": _matmul_flops(square, square, square, device, dtype),
        "sae_shape": _matmul_flops(batch, d_in, d_sae, device, dtype),
    }


def _sae(arch: str, d_in: int, d_sae: int, k: int) -> SparseAutoencoder:
    return build_sae(SAEConfig(arch=arch, d_in=d_in, d_sae=d_sae, k=k if arch == "topk" else None))


def run_case(args: argparse.Namespace, arch: str, peak: dict[str, float]) -> dict[str, Any]:
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    stored = torch.randn(args.tokens, args.d_in, generator=gen).to(torch.float16)
    data = place(stored, device)
    rows = torch.arange(args.tokens)
    scale, mean = input_scale(data, rows)
    sae = _sae(arch, args.d_in, args.d_in * args.expansion, args.k).to(device)
    sae.init_from_data(mean.to(device), scale)
    batches = Batches(data, rows, args.batch, device, scale, seed=0)
    fit(sae, batches, Schedule(steps=args.warmup, lr=1e-4), compile=args.compile)
    timed = Schedule(steps=args.steps, lr=1e-4)
    load_before = os.getloadavg()[0]
    summary = fit(sae, batches, timed, compile=args.compile, log_every=args.steps)
    d_sae = sae.config.d_sae
    flops_per_sample = 12.0 * args.d_in * d_sae
    achieved = summary.samples_per_second * flops_per_sample
    best_peak = max(peak.values())
    sps = summary.samples_per_second
    record: dict[str, Any] = {
        "bench": "sae",
        "case": f"{arch}-{args.d_in}x{d_sae}",
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "threads": torch.get_num_threads(),
        "arch": arch,
        "d_in": args.d_in,
        "d_sae": d_sae,
        "k": args.k if arch == "topk" else None,
        "batch": args.batch,
        "steps": args.steps,
        "compile": args.compile,
        "precision": "bf16 autocast" if device.type == "cuda" else "float32",
        "data_on_device": data.device.type == device.type,
        "seconds": round(summary.seconds, 4),
        "samples_per_second": round(sps, 1),
        "flops_per_sample": flops_per_sample,
        "achieved_tflops": round(achieved / 1e12, 4),
        "matmul_peak_tflops": {k: round(v / 1e12, 4) for k, v in peak.items()},
        "fraction_of_matmul_peak": round(achieved / best_peak, 4),
        "final_loss": round(summary.last.get("loss", float("nan")), 5),
        "loadavg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    if (args.d_in, args.expansion) == GHOSTTRACK_SHAPE:
        record["vs_published"] = {k: round(sps / v, 4) for k, v in PUBLISHED.items()}
    return record


def _timed(sae: SparseAutoencoder, batches: Any, args: argparse.Namespace) -> dict[str, float]:
    """Samples/s, wall and CPU seconds (every thread) of `args.steps` steps after a warm-up."""
    stream = iter(batches)  # one iterator for both, so the timed steps continue the warm-up's
    fit(sae, stream, Schedule(steps=args.warmup, lr=1e-4))
    cpu = time.process_time()
    summary = fit(sae, stream, Schedule(steps=args.steps, lr=1e-4), log_every=args.steps)
    return {
        "samples_per_second": round(summary.samples_per_second, 1),
        "wall_s": round(summary.seconds, 3),
        "cpu_s": round(time.process_time() - cpu, 3),
    }


def _best(runs: list[dict[str, float]]) -> dict[str, float]:
    return max(runs, key=lambda run: run["samples_per_second"])


def _layer_cases(
    args: argparse.Namespace, model: Any, layer: int, seqs: Sequences, stored_seqs: Sequences
) -> list[dict[str, Any]]:
    """One record per stream dtype: the stored tensor against the stream at `layer`."""
    device = torch.device(args.device)
    stored = place(all_activations(model, layer, stored_seqs).to(torch.float16), device)
    rows = torch.arange(len(stored))
    scale, mean = input_scale(stored, rows)

    def fresh_sae() -> SparseAutoencoder:
        sae = _sae("jumprelu", args.d_in, args.d_in * args.expansion, args.k).to(device)
        sae.init_from_data(mean.to(device), scale)
        return sae

    def tensor_run() -> dict[str, float]:
        batches = Batches(stored, rows, args.batch, device, scale, seed=0)
        return _timed(fresh_sae(), batches, args)

    def stream_run(dtype: str) -> dict[str, float]:
        generator = generating_model(model, dtype)
        chunks = endless_chunks(generator, layer, seqs, args.buffer // 4, seed=0)
        buffer = MixingBuffer(chunks, args.buffer, args.batch, seed=0)
        return _timed(fresh_sae(), buffer.batches(scale), args)

    # alternating repeats, the fastest of each kept: a neighbour's burst on a shared
    # machine then slows one repeat, not one side of the comparison
    tensor: list[dict[str, float]] = []
    streamed: dict[str, list[dict[str, float]]] = {d: [] for d in args.stream_dtype}
    for _ in range(args.repeats):
        tensor.append(tensor_run())
        for dtype in args.stream_dtype:
            streamed[dtype].append(stream_run(dtype))
    records = []
    for dtype in args.stream_dtype:
        records.append(
            _stream_record(args, layer, seqs, stored, dtype, _best(tensor), _best(streamed[dtype]))
        )
    return records


def stream_cases(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Per layer: training from a stored tensor against training from the model's stream."""
    from transformers import GPT2Config, GPT2LMHeadModel  # only this case needs a model

    device = torch.device(args.device)
    head_dim = 64 if args.d_in % 64 == 0 else args.d_in
    config = GPT2Config(
        vocab_size=args.vocab, n_positions=args.seq_len, n_embd=args.d_in,
        n_layer=args.n_layer, n_head=args.d_in // head_dim,
        activation_function="gelu_pytorch_tanh",
        bos_token_id=args.vocab - 1, eos_token_id=args.vocab - 1,
    )  # fmt: skip
    model = GPT2LMHeadModel(config).eval().to(device)
    gen = torch.Generator().manual_seed(0)
    n_seqs = 4 * args.buffer // (3 * args.seq_len // 4) + 1  # about four buffers of tokens
    lengths = torch.randint(args.seq_len // 2, args.seq_len + 1, (n_seqs,), generator=gen)
    ids = torch.randint(args.vocab, (n_seqs, args.seq_len), generator=gen)
    seqs = Sequences(ids, lengths)
    stored_seqs = seqs.select(torch.arange(args.tokens // args.seq_len + 1))
    records = []
    for layer in range(args.n_layer + 1):
        records += _layer_cases(args, model, layer, seqs, stored_seqs)
    return records


def _stream_record(
    args: argparse.Namespace, layer: int, seqs: Sequences, stored: torch.Tensor, dtype: str,
    tensor: dict[str, float], streamed: dict[str, float],
) -> dict[str, Any]:  # fmt: skip
    device = torch.device(args.device)
    return {
        "bench": "sae_stream",
        "case": f"layer-{layer}-of-{args.n_layer}x{args.d_in}-{dtype}",
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "threads": torch.get_num_threads(),
        "layer": layer, "n_layer": args.n_layer, "d_in": args.d_in,
        "d_sae": args.d_in * args.expansion, "batch": args.batch, "steps": args.steps,
        "seq_len": args.seq_len, "buffer_tokens": args.buffer, "stream_dtype": dtype,
        "dataset_tokens": seqs.n_tokens, "stored_tokens": len(stored),
        "tensor": tensor, "stream": streamed,
        "ratio": round(streamed["samples_per_second"] / tensor["samples_per_second"], 3),
        "cpu_ratio": round(tensor["cpu_s"] / streamed["cpu_s"], 3),
        "goal": 0.8,
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny CPU smoke configuration")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--arch", nargs="+", choices=ARCHS, default=list(ARCHS))
    parser.add_argument("--d-in", type=int, default=None, help="default 1024 (GhostTrack)")
    parser.add_argument("--expansion", type=int, default=None, help="default 5; --stream: 1")
    parser.add_argument("--k", type=int, default=32, help="active latents of topk")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--tokens", type=int, default=None, help="rows of the layer tensor")
    parser.add_argument("--compile", action="store_true", help="torch.compile the loss")
    parser.add_argument("--stream", action="store_true", help="stored tensor against stream")
    parser.add_argument("--n-layer", type=int, default=None, help="--stream: model blocks")
    parser.add_argument("--seq-len", type=int, default=None, help="--stream: longest sequence")
    parser.add_argument("--vocab", type=int, default=256, help="--stream: vocabulary")
    parser.add_argument("--buffer", type=int, default=None, help="--stream: buffer rows")
    parser.add_argument("--repeats", type=int, default=3, help="--stream: best of, alternating")
    parser.add_argument(
        "--stream-dtype", nargs="+", choices=("float32", "bfloat16"),
        default=["float32", "bfloat16"], help="--stream: dtypes of the generating forward pass",
    )  # fmt: skip
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    if args.stream:
        # the demo's model and SAE on a CPU (1 x 128, 128 features, "a+b=c" and eos: 6
        # tokens); GPT-2 small on a GPU
        defaults = {"d_in": 128, "n_layer": 1, "seq_len": 6, "batch": 256, "buffer": 65_536,
                    "steps": 512, "warmup": 16, "tokens": 65_536, "expansion": 1}  # fmt: skip
        if cuda:
            defaults = {"d_in": 768, "n_layer": 12, "seq_len": 128, "batch": 4096,
                        "buffer": 1 << 20, "steps": 512, "warmup": 32,
                        "tokens": 1 << 20, "expansion": 5}  # fmt: skip
        if args.quick:
            defaults.update(buffer=8192, steps=64, warmup=8, tokens=8192)
        for name, value in defaults.items():
            if getattr(args, name) is None:
                setattr(args, name, value)
        if not cuda:
            # as the stage trains matmuls this small (services.sae.train): on a shared
            # 2-core machine, a thread per core spun and made both sources 10x slower
            torch.set_num_threads(1)
        for record in stream_cases(args):
            print(json.dumps(record), flush=True)
        return
    if args.quick:
        defaults = {"d_in": 64, "batch": 256, "steps": 50, "warmup": 5, "tokens": 8192}
    elif cuda:
        defaults = {"d_in": 1024, "batch": 8192, "steps": 200, "warmup": 20, "tokens": 262_144}
    else:
        defaults = {"d_in": 1024, "batch": 1024, "steps": 5, "warmup": 1, "tokens": 16_384}
    defaults["expansion"] = 5
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    peak = matmul_peak(torch.device(args.device), args.batch, args.d_in, args.d_in * args.expansion)
    for arch in args.arch:
        print(json.dumps(run_case(args, arch, peak)), flush=True)


if __name__ == "__main__":
    main()
