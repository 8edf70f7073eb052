"""SAEs on a token stream: the mixing buffer, activations made by the model, the stage with
`sae.source: stream`, and the quality verdicts on an SAE's metrics."""

from __future__ import annotations

import itertools
import math
import threading
import time

import pytest
import torch

from services.extractor.__main__ import EXTRACT
from services.sae.__main__ import TRAIN
from services.sae.batches import Batches, input_scale
from services.sae.buffer import MixingBuffer
from services.sae.fit import Schedule, fit
from services.sae.quality import sae_checks
from services.sae.sources import stream_source
from services.sae.stream import (
    FORWARD_TOKENS,
    Sequences,
    first_tokens,
    forward_groups,
    layer_activations,
    pass_order,
)
from services.sae.train import SMALL_MATMUL, _small_steps_on_one_thread
from services.trainer.__main__ import TRAIN as TRAINER
from shared import hidden, layout
from shared.data import load_task
from shared.models import load_model
from shared.sae.base import SAEConfig
from shared.sae.models import build_sae
from shared.spec import SAESpec, apply_overrides, parse_spec, spec_to_yaml
from shared.stage import stage_main
from shared.store import open_store
from shared.tokenizer import load_tokenizer
from tests.support import register_run
from tests.synthetic_sae import planted_dictionary

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# -- the mixing buffer -------------------------------------------------------------------


class Counting:
    """Chunks of 37 consecutive row numbers (as 1-d activations); counts what was taken."""

    def __init__(self, chunk: int = 37) -> None:
        self.chunk = chunk
        self.taken = 0

    def __iter__(self):
        while True:
            start = self.taken
            self.taken += self.chunk
            yield torch.arange(start, self.taken, dtype=torch.float32)[:, None]


def test_mixing_buffer_is_bounded_shuffled_and_serves_each_row_once():
    source = Counting()
    buffer = MixingBuffer(iter(source), capacity=512, batch_size=32, seed=0)
    stream = buffer.batches(scale=2.0)
    served = []
    for _ in range(200):  # 25 refills of half the buffer
        batch = next(stream)
        assert batch.shape == (32, 1) and batch.dtype == torch.float32
        served.append(batch[:, 0] / 2.0)
        assert buffer.contents.shape == (512, 1)  # bounded: the buffer never grows...
        assert source.taken - 32 * len(served) <= 512 + source.chunk  # ...nor what waits
    rows = torch.cat(served).long()
    assert len(rows.unique()) == len(rows)  # no row served twice
    assert int(rows.max()) < source.taken  # only rows the stream gave
    # Shuffled: a batch mixes rows from far apart in the stream, not 32 neighbours.
    spread = torch.stack([b.max() - b.min() for b in served[8:]])
    assert float(spread.median()) > 300
    # ...and rows leave in a random order: early rows are not all served first.
    first_half = rows[: len(rows) // 2]
    assert float(first_half.float().mean()) < float(rows[len(rows) // 2 :].float().mean())
    assert int((rows[1:] < rows[:-1]).sum()) > len(rows) // 3
    again = MixingBuffer(iter(Counting()), capacity=512, batch_size=32, seed=0).batches(2.0)
    assert torch.equal(next(again)[:, 0] / 2.0, served[0])  # seeded
    other = MixingBuffer(iter(Counting()), capacity=512, batch_size=32, seed=1).batches(2.0)
    assert not torch.equal(next(other)[:, 0] / 2.0, served[0])


def test_mixing_buffer_never_writes_into_the_chunks_it_was_given():
    data = torch.arange(300, dtype=torch.float32)[:, None]
    chunks = (data[i : i + 50] for _ in range(100) for i in range(0, 300, 50))
    stream = MixingBuffer(chunks, capacity=128, batch_size=16, seed=0).batches(1.0)
    for _ in range(40):
        next(stream)
    assert torch.equal(data, torch.arange(300, dtype=torch.float32)[:, None])


def _refill_threads() -> int:
    return sum(t.name == "mixing-buffer-refill" for t in threading.enumerate())


def test_mixing_buffer_refills_in_a_thread_and_serves_the_same_batches_at_any_speed():
    """The stream is read while the consumer holds a batch and calls nothing (a refill done
    inside `next` would leave it untouched), and a slow producer changes no batch."""

    class Slow(Counting):
        def __iter__(self):
            for chunk in super().__iter__():
                time.sleep(0.002)  # the consumer has to wait for the producer at times
                yield chunk

    source = Slow()
    slow = MixingBuffer(iter(source), capacity=512, batch_size=32, seed=0).batches(1.0)
    served = [next(slow)]
    filled = source.taken
    deadline = time.monotonic() + 10
    while source.taken == filled and time.monotonic() < deadline:
        time.sleep(0.001)
    assert source.taken > filled, "the refill did not overlap serving"
    served += [next(slow) for _ in range(99)]  # 12 rounds
    fast = MixingBuffer(iter(Counting()), capacity=512, batch_size=32, seed=0).batches(1.0)
    assert all(torch.equal(a, next(fast)) for a in served)


def test_mixing_buffer_raises_the_producers_error_and_ends_its_thread():
    def failing():
        yield from itertools.islice(Counting(), 512 // 37 + 3)
        raise OSError("the model's forward pass failed")

    before = _refill_threads()
    stream = MixingBuffer(failing(), capacity=512, batch_size=32, seed=0).batches(1.0)
    with pytest.raises(OSError, match="forward pass failed"):
        for _ in range(9):  # the first round's 8 batches, then its refill's end
            next(stream)
    assert _refill_threads() == before
    stopped = MixingBuffer(iter(Counting()), capacity=512, batch_size=32, seed=0).batches(1.0)
    next(stopped)
    assert _refill_threads() == before + 1
    stopped.close()
    assert _refill_threads() == before


def _epochs_of(x: torch.Tensor, chunk: int, seed: int):
    """Endless chunks of `x`'s rows, each pass in a new order: a stream over fixed data."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), chunk):
            yield x[order[start : start + chunk]]


def _loss_curve(x: torch.Tensor, batches_of, steps: int) -> tuple[list[float], torch.Tensor]:
    rows = torch.arange(len(x))
    scale, mean = input_scale(x, rows)
    sae = build_sae(SAEConfig(arch="jumprelu", d_in=32, d_sae=128, l0_coeff=1e-2), seed=0)
    sae.init_from_data(mean, scale)
    curve: list[float] = []
    fit(sae, batches_of(scale), Schedule(steps=steps, lr=3e-3), log_every=50,
        on_log=lambda _step, _samples, means: curve.append(means["mse"]))  # fmt: skip
    with torch.no_grad():
        fresh = planted_dictionary(2048, 32, 64, 4.0, seed=0)[0][-1024:] * scale
        fvu = (sae(fresh)[0] - fresh).pow(2).sum() / (fresh - fresh.mean(0)).pow(2).sum()
    return curve, fvu


def test_streamed_training_follows_the_stored_tensor_path_on_the_same_data():
    x = planted_dictionary(4096, 32, 64, 4.0, seed=0)[0]
    rows = torch.arange(len(x))
    stored, stored_fvu = _loss_curve(
        x, lambda scale: Batches(x, rows, 128, CPU, scale, seed=0), steps=600
    )
    streamed, streamed_fvu = _loss_curve(
        x,
        lambda scale: MixingBuffer(_epochs_of(x, 100, seed=1), 1024, 128, seed=2).batches(scale),
        steps=600,
    )
    assert stored[-1] < 0.3 * stored[0]  # the curve falls: the comparison means something
    for a, b in zip(stored[1:], streamed[1:], strict=True):
        assert b == pytest.approx(a, rel=0.15), (stored, streamed)
    assert float(streamed_fvu) == pytest.approx(float(stored_fvu), rel=0.15, abs=0.01)


# -- activations from the model, and the stage on a tiny trained run --------------------

TINY = {
    "data.dataset": "modular",
    "data.modular_p": 17,
    "data.max_length": 16,
    "data.eval_samples": 200,
    "model.n_embd": 32,
    "train.steps": 60,
    "train.batch_size": 32,
    "train.checkpoint_every": 60,
    "extract.probe_samples": 32,
    "extract.dtype": "float32",
    "sae.batch_size": 64,
    "sae.tokens": 48_000,
    "sae.buffer_tokens": 256,
    "sae.eval_tokens": 500,
    "sae.lr": 3e-3,
}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A modular run trained briefly, extracted in float32, SAEs trained from the stream."""
    store = open_store(tmp_path_factory.mktemp("stream") / "store")
    run_id = register_run(store, TINY)
    args = ["--run", run_id, "--store", store.url, "--device", "cpu"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures start before the autouse one above
    try:
        assert stage_main(TRAINER, args) == 0
        assert stage_main(EXTRACT, args) == 0
        assert stage_main([TRAIN], ["train", *args]) == 0
    finally:
        torch.set_num_threads(threads)
    return store, run_id


def test_streamed_activations_are_the_extracted_hidden_states(tiny_run):
    store, run_id = tiny_run
    probe = hidden.load_probe(store, run_id)
    model = load_model(store, run_id, 60)
    reached = []
    model.lm_head.register_forward_hook(lambda *_: reached.append("lm_head"))
    model.transformer.h[-1].register_forward_hook(lambda *_: reached.append("last block"))
    seqs = Sequences(probe.input_ids, probe.lengths)
    for layer in range(3):
        streamed = layer_activations(model, layer, seqs)
        # the probe keeps every token (policy all), sequence by sequence, in order
        torch.testing.assert_close(streamed, hidden.load_hidden(store, run_id, 60, layer))
    assert reached == ["last block"]  # the forward pass stops at the layer asked for


def test_a_pass_visits_every_sequence_once_in_passes_of_alike_lengths():
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 300, (5000,), generator=generator)
    order = pass_order(lengths, window=1000, generator=generator)
    assert sorted(order.tolist()) == list(range(5000))
    windows = lengths[order].split(1000)
    assert all(bool((w[1:] >= w[:-1]).all()) for w in windows)  # sorted within a window
    assert not torch.equal(order[:1000].sort().values, torch.arange(1000))  # shuffled across
    groups = list(forward_groups(lengths[order]))
    assert groups[0][0] == 0 and groups[-1][1] == 5000
    assert all(a[1] == b[0] for a, b in itertools.pairwise(groups))
    sizes = [(end - start) * int(lengths[order[start:end]].max()) for start, end in groups]
    assert max(sizes) <= FORWARD_TOKENS
    shuffled = lengths[torch.randperm(5000, generator=generator)]
    random_sizes = [(e - s) * int(shuffled[s:e].max()) for s, e in forward_groups(shuffled)]
    real = int(lengths.sum())
    assert sum(sizes) < 1.1 * real < 0.75 * sum(random_sizes)  # padding: < 10% against ~50%
    assert list(forward_groups(torch.tensor([FORWARD_TOKENS + 5, 3]))) == [(0, 1), (1, 2)]


def test_first_tokens_takes_whole_sequences_until_enough():
    seqs = Sequences.pad([[1] * n for n in (3, 5, 2, 7, 4)], pad_id=0)
    some = first_tokens(seqs, 9, seed=0)
    assert some.n_tokens >= 9 and some.n_tokens - int(some.lengths[-1]) < 9
    assert torch.equal(first_tokens(seqs, 9, seed=0).lengths, some.lengths)
    every = first_tokens(seqs, 1000, seed=0)
    assert sorted(every.lengths.tolist()) == [2, 3, 4, 5, 7]
    assert every.ids.shape == (5, 7) and int((every.ids != 0).sum()) == 21


def test_the_stream_trains_on_train_text_and_judges_on_eval_text(tiny_run):
    store, run_id = tiny_run
    spec = parse_spec(store.get_text(layout.spec_key(run_id)))
    task = load_task(spec.data)
    tokenizer = load_tokenizer(spec.data.tokenizer)
    source = stream_source(spec, load_model(store, run_id, 60), 1, CPU, "test")
    texts = {
        tokenizer.decode([i for i in row[:n].tolist() if i != tokenizer.eos_id])
        for row, n in zip(source.eval_sequences.ids, source.eval_sequences.lengths, strict=True)
    }
    assert texts <= {ex.text for ex in task.eval}
    assert not texts & {ex.text for ex in task.train}
    assert len(source.held_out) == source.eval_sequences.n_tokens >= 500
    assert source.epoch_tokens > spec.sae.buffer_tokens  # the buffered path, refilled


def test_a_bfloat16_stream_computes_the_same_activations_to_half_a_percent(tiny_run):
    store, run_id = tiny_run
    spec = parse_spec(store.get_text(layout.spec_key(run_id)))
    model = load_model(store, run_id, 60)
    fast = apply_overrides(spec, {"sae.stream_dtype": "bfloat16"})
    exact, rounded = (stream_source(s, model, 2, CPU, "test") for s in (spec, fast))
    assert rounded.training["dtype"] == "bfloat16" and exact.training["dtype"] == "float32"
    assert next(p.dtype for p in model.parameters()) == torch.float32  # a copy was cast
    torch.testing.assert_close(rounded.held_out, exact.held_out)  # the judges stay float32
    assert rounded.scale == pytest.approx(exact.scale, rel=1e-2)
    batch_exact, batch_rounded = next(iter(exact.batches)), next(iter(rounded.batches))
    assert batch_rounded.dtype == torch.float32
    error = (batch_rounded - batch_exact).norm() / batch_exact.norm()
    assert 0 < float(error) < 5e-3  # the same rows, computed in bfloat16


def test_stage_streams_the_training_set_into_good_saes(tiny_run):
    store, run_id = tiny_run
    for layer in range(3):
        report = store.get_json(layout.sae_config_key(run_id, layer))
        training, evaluation = report["training"], report["evaluation"]
        assert training["source"] == "stream" and training["mode"] == "buffered"
        assert training["dataset"] == "modular" and training["split"] == "train"
        assert training["samples"] == 48_000 and training["epochs"] > 10
        assert evaluation["held_out"] and evaluation["split"] == "eval"
        assert 500 <= evaluation["tokens"] < 500 + 16
        metrics = report["metrics"]
        assert metrics["tokens"] == evaluation["tokens"]
        # next-token targets: every held-out token but each sequence's first
        assert metrics["ce"]["tokens"] == evaluation["tokens"] - evaluation["samples"]
        assert metrics["explained_variance"] > 0.8, (layer, metrics)
        assert metrics["ce"]["ce_loss_recovered"] > 0.8, (layer, metrics["ce"])
        status = store.get_json(layout.status_key(run_id, "sae", f"layer-{layer:02d}"))
        verdicts = {q["check"]: q["verdict"] for q in status["quality"]}
        assert verdicts["explained_variance"] == "ok" and verdicts["fvu"] == "ok"
        assert verdicts["held_out_tokens"] == "warn"  # 500 < 1000, as asked for


def test_an_sae_trained_for_two_steps_fails(tiny_run):
    store, run_id = tiny_run
    original = store.get_text(layout.spec_key(run_id))
    spec = apply_overrides(parse_spec(original), {"sae.tokens": 128, "sae.layers": [2]})
    store.put_text(layout.spec_key(run_id), spec_to_yaml(spec))
    try:
        args = ["train", "--run", run_id, "--store", store.url, "--device", "cpu", "--force"]
        assert stage_main([TRAIN], [*args, "--layer", "2"]) == 0
    finally:
        store.put_text(layout.spec_key(run_id), original)
    report = store.get_json(layout.sae_config_key(run_id, 2))
    assert report["training"]["steps"] == 2
    status = store.get_json(layout.status_key(run_id, "sae", "layer-02"))
    fails = {q["check"] for q in status["quality"] if q["verdict"] == "fail"}
    assert {"explained_variance", "fvu"} <= fails, status["quality"]
    assert all(q["shard"] == "layer-02" and q["stage"] == "sae" for q in status["quality"])


# -- quality verdicts --------------------------------------------------------------------

GOOD = {
    "explained_variance": 0.92,
    "fvu": 0.08,
    "dead_fraction": 0.02,
    "l0": 12.0,
    "ce": {"ce_loss_recovered": 0.95},
}
HELD_OUT = {"held_out": True, "tokens": 2400}


def _verdicts(metrics=None, evaluation=None, **spec) -> dict[str, tuple[str, str]]:
    checks = sae_checks(
        {**GOOD, **(metrics or {})}, 64, {**HELD_OUT, **(evaluation or {})}, SAESpec(**spec)
    )
    return {c.check: (c.verdict, c.message) for c in checks}


def test_good_metrics_pass_every_check():
    verdicts = _verdicts()
    assert set(verdicts) == {
        "explained_variance", "fvu", "dead_fraction", "l0", "held_out_tokens",
        "ce_loss_recovered",
    }  # fmt: skip
    assert {v for v, _ in verdicts.values()} == {"ok"}, verdicts


@pytest.mark.parametrize(
    ("metrics", "check", "verdict", "says"),
    [
        ({"explained_variance": 0.3}, "explained_variance", "fail", "sae.tokens"),
        ({"explained_variance": 0.7}, "explained_variance", "warn", "lower sae.l0_coeff"),
        ({"explained_variance": -1.32}, "explained_variance", "fail", "sae.tokens"),
        ({"fvu": 1.0}, "fvu", "fail", "sae.tokens"),
        ({"fvu": 2.3}, "fvu", "fail", "sae.lr"),
        ({"dead_fraction": 0.2}, "dead_fraction", "warn", "sae.expansion"),
        ({"dead_fraction": 0.6}, "dead_fraction", "warn", "lower sae.l0_coeff"),
        ({"dead_fraction": 0.95}, "dead_fraction", "fail", "sae.expansion"),
        ({"l0": 40.0}, "l0", "warn", "raise sae.l0_coeff"),
        ({"l0": 130.0}, "l0", "fail", "not sparse"),
        ({"l0": 0.4}, "l0", "warn", "lower sae.l0_coeff"),
        ({"ce": {"ce_loss_recovered": 0.7}}, "ce_loss_recovered", "warn", "sae.tokens"),
        ({"ce": {"ce_loss_recovered": 0.2}}, "ce_loss_recovered", "fail", "sae.l0_coeff"),
        ({"ce": {"ce_loss_recovered": math.nan}}, "ce_loss_recovered", "fail", "NaN"),
    ],
)
def test_bad_metrics_get_their_verdict_and_a_fix(metrics, check, verdict, says):
    verdicts = _verdicts(metrics)
    assert verdicts[check][0] == verdict and says in verdicts[check][1], verdicts[check]
    assert all(v == "ok" for name, (v, _) in verdicts.items() if name != check)


def test_sparsity_fixes_name_the_arch_knob_and_held_out_tokens_are_counted():
    assert "lower sae.k" in _verdicts({"l0": 40.0}, arch="topk", k=40)["l0"][1]
    assert (
        "raise sae.k"
        in _verdicts({"explained_variance": 0.6}, arch="topk", k=8)["explained_variance"][1]
    )
    assert "raise sae.l1_coeff" in _verdicts({"l0": 40.0}, arch="relu")["l0"][1]
    verdict, message = _verdicts(evaluation={"tokens": 565})["held_out_tokens"]
    assert verdict == "warn" and "sae.eval_tokens" in message and "565" in message
    verdict, message = _verdicts(evaluation={"held_out": False}, source="probe")["held_out_tokens"]
    assert verdict == "warn" and "held-out tokens 0 " in message
    assert "sae.holdout_fraction" in message


def test_spec_defaults_to_a_token_budget_and_a_buffer_of_two_batches_at_least():
    default = SAESpec()
    assert (default.source, default.tokens, default.epochs) == ("stream", 262_144, None)
    assert SAESpec(epochs=3).tokens is None
    with pytest.raises(ValueError, match="buffer_tokens 300 holds fewer than two batches"):
        SAESpec(batch_size=256, buffer_tokens=300)


def test_small_saes_train_on_one_cpu_thread_and_leave_the_count_as_it_was():
    torch.set_num_threads(2)
    with _small_steps_on_one_thread(CPU, 256 * 64 * 320):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with _small_steps_on_one_thread(CPU, SMALL_MATMUL):
        assert torch.get_num_threads() == 2
    with _small_steps_on_one_thread(torch.device("cuda"), 1):
        assert torch.get_num_threads() == 2
