"""Extract one checkpoint: the probe through the model, every layer to the store.

The batch loop (batches.py) fills preallocated layer files on local disk while the model
runs; the files are then uploaded in parallel, followed by the per-token outputs and the
index. The stage contract writes DONE after all of that, so a killed extraction leaves no
DONE and its rerun starts the checkpoint over.
"""

from __future__ import annotations

import time

from services.extractor.batches import extract_batches
from services.extractor.capture import layer_sites
from services.extractor.probe import ensure_probe
from services.extractor.writer import LayerWriter
from shared import hidden, layout
from shared.hidden import ExtractIndex
from shared.models import load_model
from shared.stage import StageContext


def extract_step(ctx: StageContext) -> None:
    spec, store, run_id, step = ctx.spec, ctx.store, ctx.run_id, int(ctx.args.step)
    probe = ensure_probe(store, run_id, spec)
    model = load_model(store, run_id, step, ctx.device)
    n_layer, d_model = model.config.n_layer, model.config.n_embd
    sites: list[str] = list(spec.extract.sites)
    dtype = hidden.DTYPES[spec.extract.dtype]
    keys = [layout.extract_layer_key(run_id, step, layer) for layer in range(n_layer + 1)]
    meta = [
        {"step": str(step), "layer": str(layer), "probe_digest": probe.digest}
        for layer in range(n_layer + 1)
    ]
    total_tokens = int(probe.lengths.sum())
    ctx.log.info(
        "step %d: %d probe sequences (%d tokens), %d kept tokens x %d layers, %s",
        step, probe.n_samples, total_tokens, probe.n_tokens, n_layer + 1, spec.extract.dtype,
    )  # fmt: skip
    t0 = time.perf_counter()
    with (
        LayerWriter(
            keys,
            layer_sites(n_layer, sites),
            probe.n_tokens,
            d_model,
            dtype,
            meta,
            background=ctx.device == "cuda",
        ) as w,
        ctx.progress(total=total_tokens, unit="tok", desc=f"extract step {step}") as bar,
    ):

        def advance(tokens: int) -> None:
            bar.update(tokens)
            bar.set("driftlab_extract_tokens_total", bar.n)

        outputs = extract_batches(
            model,
            probe,
            w,
            sites=sites,
            dtype=dtype,
            batch_size=spec.extract.batch_size,
            on_batch=advance,
        )
        w.finish(store.put_file)
        compute_seconds = time.perf_counter() - t0
    store.put_tensors(
        layout.extract_tokens_key(run_id, step),
        outputs.tensors(),
        metadata={"step": str(step), "probe_digest": probe.digest},
    )
    index = ExtractIndex(
        step=step,
        n_layers=n_layer + 1,
        d_model=d_model,
        n_tokens=probe.n_tokens,
        dtype=spec.extract.dtype,
        sites=sites,
        probe_digest=probe.digest,
    )
    store.put_json(layout.extract_index_key(run_id, step), index.to_json())
    rate = total_tokens / max(compute_seconds, 1e-9)
    ctx.headline.update(
        step=step,
        tokens=total_tokens,
        kept_tokens=probe.n_tokens,
        layers=n_layer + 1,
        tokens_per_second=round(rate, 1),
    )
    ctx.log.info("step %d: %.0f tokens/s including writes and uploads", step, rate)
