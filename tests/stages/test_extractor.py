"""The extractor: stored hidden states are the model's, on a fixed probe, under the contract."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time

import pytest
import torch

from services.extractor.__main__ import EXTRACT
from services.extractor.probe import build_probe
from services.trainer.__main__ import TRAIN
from shared import hidden, layout
from shared.data import load_task
from shared.models import load_model
from shared.spec import RunSpec, SpecError, apply_overrides, parse_spec
from shared.stage import stage_main
from shared.steps import extracted_steps
from shared.store import open_store
from shared.tokenizer import load_tokenizer
from tests.support import ROOT, register_run, run_stage_here, stage_env

BASE = {
    "data.train_samples": 128,
    "data.eval_samples": 64,
    "train.batch_size": 8,
    "train.steps": 20,
    "train.checkpoint_every": 10,
    "train.dynamics_every": 10,
    "train.warmup_steps": 2,
    "extract.probe_samples": 24,
    "extract.batch_size": 5,
}


def _trained_run(store, **overrides) -> str:
    run_id = register_run(store, {**BASE, **overrides})
    assert stage_main(TRAIN, ["--run", run_id, "--store", store.url]) == 0
    return run_id


def _extract(store, run_id, *extra: str) -> int:
    return stage_main(EXTRACT, ["--run", run_id, "--store", store.url, *extra])


def _extract_here(store, run_id, *extra):
    """The extractor in this process, as a finished process: for its error lines."""
    return run_stage_here(EXTRACT, ["--run", run_id, "--store", store.url, *extra])


def _extract_cli(store, run_id, *extra, **kwargs):
    return subprocess.run(
        [sys.executable, "-m", "services.extractor", "--run", run_id, "--store", store.url,
         *extra],
        capture_output=True, text=True, timeout=120, cwd=ROOT, env=stage_env(), **kwargs,
    )  # fmt: skip


def _error_lines(proc: subprocess.CompletedProcess[str]) -> list[str]:
    """The error lines of a failed stage (its log lines go to stderr too); no traceback."""
    assert "Traceback" not in proc.stderr, proc.stderr
    return [line for line in proc.stderr.splitlines() if ": error: " in line]


@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory):
    """A trained tiny run extracted in float32 with every extra site."""
    store = open_store(tmp_path_factory.mktemp("extract") / "store")
    run_id = _trained_run(
        store,
        **{"extract.dtype": "float32", "extract.sites": ["attn_out", "mlp_out", "resid_mid"]},
    )
    assert _extract(store, run_id) == 0
    return store, run_id


def _reference(store, run_id, step, probe):
    """The model's own hidden states and logits on the probe, the plain way."""
    model = load_model(store, run_id, step)
    mask = torch.arange(probe.input_ids.shape[1])[None, :] < probe.lengths[:, None]
    with torch.no_grad():
        out = model(probe.input_ids, attention_mask=mask, output_hidden_states=True)
    return model, out


def test_stored_states_are_the_models_hidden_states(fp32_run):
    store, run_id = fp32_run
    probe = hidden.load_probe(store, run_id)
    steps = extracted_steps(store, run_id)
    assert steps == [0, 10, 20]
    model, out = _reference(store, run_id, 20, probe)
    n_layer = model.config.n_layer
    at = (probe.token_sample, probe.token_position)
    index = hidden.load_index(store, run_id, 20)
    assert (index.n_layers, index.d_model, index.n_tokens) == (n_layer + 1, 64, probe.n_tokens)
    stored = [hidden.load_hidden(store, run_id, 20, layer) for layer in range(n_layer + 1)]
    for layer in range(n_layer):
        torch.testing.assert_close(stored[layer], out.hidden_states[layer][at])
    # The last layer is the residual stream before ln_f; Hugging Face's last hidden state
    # is after it.
    final = model.transformer.ln_f(stored[n_layer])
    torch.testing.assert_close(final, out.hidden_states[n_layer][at], rtol=1e-4, atol=1e-5)
    for layer in range(1, n_layer + 1):
        mid = hidden.load_hidden(store, run_id, 20, layer, "resid_mid")
        attn = hidden.load_hidden(store, run_id, 20, layer, "attn_out")
        mlp = hidden.load_hidden(store, run_id, 20, layer, "mlp_out")
        torch.testing.assert_close(mid, stored[layer - 1] + attn, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(stored[layer], mid + mlp, rtol=1e-4, atol=1e-5)
    with pytest.raises(hidden.ExtractionError, match="no site 'attn_out'"):
        hidden.load_hidden(store, run_id, 20, 0, "attn_out")

    tokens = hidden.load_token_outputs(store, run_id, 20)
    logp = torch.log_softmax(out.logits[at].float(), -1)
    torch.testing.assert_close(tokens["entropy"], -(logp.exp() * logp).sum(-1), atol=1e-4, rtol=0)
    has_next = probe.token_position + 1 < probe.lengths[probe.token_sample]
    nxt = probe.input_ids[probe.token_sample[has_next], probe.token_position[has_next] + 1]
    torch.testing.assert_close(tokens["next_token_id"][has_next], nxt)
    expected = logp[has_next].gather(1, nxt[:, None])[:, 0].exp()
    torch.testing.assert_close(tokens["next_token_prob"][has_next], expected, atol=1e-5, rtol=0)
    assert torch.isnan(tokens["next_token_prob"][~has_next]).all()
    assert (tokens["next_token_id"][~has_next] == -1).all()


def test_probe_is_fixed_and_never_holds_padding(fp32_run):
    store, run_id = fp32_run
    probe = hidden.load_probe(store, run_id)
    # token_policy all, no cap reached: every real token once, no padding position.
    assert probe.n_tokens == int(probe.lengths.sum())
    assert (probe.token_position < probe.lengths[probe.token_sample]).all()
    assert (probe.token_id == probe.input_ids[probe.token_sample, probe.token_position]).all()
    assert (probe.input_ids[:, 1:] == probe.pad_id)[
        torch.arange(probe.input_ids.shape[1] - 1)[None, :] + 1 >= probe.lengths[:, None]
    ].all()
    assert (probe.lengths.diff() >= 0).all()  # sorted by length: little padding per batch
    roles = set(probe.token_role.tolist())
    assert roles == {hidden.ROLE_QUESTION, hidden.ROLE_ANSWER}
    before = store.get_bytes(layout.probe_key(run_id))
    assert _extract(store, run_id, "--step", "10", "--force") == 0
    assert store.get_bytes(layout.probe_key(run_id)) == before
    # The same tokens at every checkpoint: equal shapes, different values (it trained).
    a, b = (hidden.load_hidden(store, run_id, s, 1) for s in (0, 20))
    assert a.shape == b.shape and not torch.equal(a, b)


def test_default_fp16_matches_within_dtype_tolerance(tmp_path):
    store = open_store(tmp_path / "store")
    run_id = _trained_run(store, **{"train.steps": 0})
    assert _extract(store, run_id, "--step", "0") == 0
    probe = hidden.load_probe(store, run_id)
    _, out = _reference(store, run_id, 0, probe)
    stored = hidden.load_hidden(store, run_id, 0, 1)
    assert stored.dtype == torch.float16
    expected = out.hidden_states[1][probe.token_sample, probe.token_position]
    torch.testing.assert_close(stored.float(), expected, rtol=2e-3, atol=2e-3)
    status = store.get_json(layout.status_key(run_id, "extract", "step-0"))
    assert status["state"] == "succeeded" and status["headline"]["tokens_per_second"] > 0
    assert _extract(store, run_id, "--step", "0") == 0
    assert store.get_json(layout.status_key(run_id, "extract", "step-0"))["state"] == "cached"


def _probe(**overrides):
    spec = apply_overrides(RunSpec(), {**BASE, **overrides})
    return build_probe(spec, load_task(spec.data), load_tokenizer(spec.data.tokenizer))


def test_token_policies():
    full = _probe()
    last = _probe(**{"extract.token_policy": "last"})
    assert last.n_tokens == last.n_samples
    assert (last.token_position == last.lengths - 1).all()

    answer = _probe(**{"extract.token_policy": "answer"})
    assert (answer.token_role == hidden.ROLE_ANSWER).all()
    n_answer = int((full.token_role == hidden.ROLE_ANSWER).sum())
    assert answer.n_tokens == n_answer > 0

    k = _probe(**{"extract.token_policy": "random_k", "extract.random_k": 3})
    assert torch.equal(torch.bincount(k.token_sample), torch.full((k.n_samples,), 3))
    again = _probe(**{"extract.token_policy": "random_k", "extract.random_k": 3})
    assert torch.equal(k.token_position, again.token_position)  # seeded
    other = _probe(**{"extract.token_policy": "random_k", "extract.random_k": 3,
                      "extract.seed": 1})  # fmt: skip
    assert not torch.equal(k.token_position, other.token_position)

    capped = _probe(**{"extract.max_tokens_per_layer": 50})
    assert capped.n_tokens == 50
    kept = set(zip(capped.token_sample.tolist(), capped.token_position.tolist(), strict=True))
    assert kept <= set(zip(full.token_sample.tolist(), full.token_position.tolist(), strict=True))
    order = capped.token_sample * 1000 + capped.token_position
    assert (order.diff() > 0).all()  # probe order: each batch owns contiguous rows

    with pytest.raises(hidden.ExtractionError, match="needs a task with answers"):
        _probe(**{"data.dataset": "tinystories", "extract.token_policy": "answer",
                  "data.path": "/work/shared/data/tinystories"})  # fmt: skip


def test_clear_errors(tmp_path):
    store = open_store(tmp_path / "store")
    run_id = _trained_run(store, **{"train.steps": 0, "extract.probe_samples": 500})
    proc = _extract_here(store, run_id)
    assert proc.returncode == 1
    assert _error_lines(proc) == [
        "python -m services.extractor: error: extract.probe_samples is 500 but the eval split "
        "of arithmetic has 64 examples; lower extract.probe_samples or raise "
        "data.eval_samples"
    ]
    assert not store.exists(layout.extract_done_key(run_id, 0))

    proc = _extract_here(store, run_id, "--step", "5")
    (line,) = _error_lines(proc)
    assert proc.returncode == 2 and "step-000005/DONE is not there yet" in line

    with pytest.raises(SpecError, match=r"extract\.sites"):
        parse_spec("extract:\n  sites: [attn_output]\n", source="x.yaml")


def test_a_full_disk_is_one_line_and_damages_nothing(tmp_path):
    store = open_store(tmp_path / "store")
    run_id = _trained_run(store, **{"train.steps": 10, "extract.dtype": "float32"})
    assert _extract(store, run_id, "--step", "0") == 0
    before = store.get_bytes(layout.extract_layer_key(run_id, 0, 1))

    def small_files():  # every write past 64 KiB fails like a full disk would
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))

    proc = _extract_cli(store, run_id, "--step", "10", preexec_fn=small_files)
    assert proc.returncode == 1
    (line,) = _error_lines(proc)
    assert "cannot write hidden states under" in line and "File too large" in line, line
    assert not store.exists(layout.extract_done_key(run_id, 10))
    assert store.get_bytes(layout.extract_layer_key(run_id, 0, 1)) == before
    assert _extract(store, run_id, "--step", "10") == 0


def test_killed_extraction_resumes_and_matches_a_clean_one(tmp_path):
    store = open_store(tmp_path / "store")
    # Batches of one sequence: a few hundred batches per checkpoint, time to be killed.
    run_id = _trained_run(
        store, **{"extract.batch_size": 1, "extract.probe_samples": 64, "extract.dtype": "float32"}
    )
    status = layout.status_key(run_id, "extract", "step-10")
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.extractor", "--run", run_id, "--store", store.url],
        cwd=ROOT, env=stage_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if store.exists(status) and store.get_json(status)["state"] == "running":
            break
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = extracted_steps(store, run_id)
    assert done == [0], f"the kill came too late to test anything: {done}"
    assert store.get_json(status)["state"] == "running"  # what a killed pod leaves

    assert _extract(store, run_id) == 0
    assert extracted_steps(store, run_id) == [0, 10, 20]
    assert store.get_json(layout.status_key(run_id, "extract", "step-0"))["state"] == "cached"
    resumed = hidden.load_hidden(store, run_id, 10, 2)
    assert _extract(store, run_id, "--step", "10", "--force") == 0
    assert torch.equal(resumed, hidden.load_hidden(store, run_id, 10, 2))


_PEAK_RSS = """
import resource, subprocess, sys
subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def test_memory_stays_bounded_when_the_probe_grows_tenfold(tmp_path):
    """Peak memory of a probe 10x larger grows by far less than its 10x larger output."""
    peaks, sizes = [], []
    for samples in (24, 240):
        store = open_store(tmp_path / f"store-{samples}")
        run_id = _trained_run(
            store,
            **{
                "train.steps": 0,
                "model.arch": "custom", "model.n_layer": 4, "model.n_head": 4,
                "model.n_embd": 256, "model.n_positions": 64,
                "data.eval_samples": samples,
                "extract.probe_samples": samples, "extract.batch_size": 8,
                "extract.max_tokens_per_layer": None, "extract.dtype": "float32",
                "extract.sites": ["attn_out", "mlp_out", "resid_mid"],
            },
        )  # fmt: skip
        proc = subprocess.run(
            [sys.executable, "-c", _PEAK_RSS, sys.executable, "-m", "services.extractor",
             "--run", run_id, "--store", store.url],
            capture_output=True, text=True, timeout=300, cwd=ROOT, env=stage_env(), check=True,
        )  # fmt: skip
        peaks.append(int(proc.stdout.split()[-1]) * 1024)
        sizes.append(
            sum(len(store.get_bytes(layout.extract_layer_key(run_id, 0, la))) for la in range(5))
        )
    grown_output = sizes[1] - sizes[0]
    assert grown_output > 200 << 20, sizes  # the large probe writes > 200 MiB more
    # What does grow is the allocator's high-water mark over more, differently sized
    # batches (25-35 MiB here), not the output; holding the rows would add all of it.
    assert peaks[1] - peaks[0] < grown_output / 4, (peaks, sizes)


def test_extracts_into_s3(s3_store_url):
    store = open_store(s3_store_url)
    run_id = _trained_run(store, **{"train.steps": 0})
    assert _extract(store, run_id) == 0
    index = hidden.load_index(store, run_id, 0)
    assert hidden.load_hidden(store, run_id, 0, index.n_layers - 1).shape == (
        index.n_tokens,
        index.d_model,
    )
    assert json.loads(store.get_text(layout.extract_done_key(run_id, 0)))["stage"] == "extract"


@pytest.mark.parametrize("background", [False, True], ids=["inline", "thread"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_layer_files_are_valid_safetensors_filled_out_of_order(tmp_path, background, dtype):
    """Both writer modes (the thread is the GPU path) give files safetensors reads back."""
    from safetensors.torch import load_file

    from services.extractor.writer import LayerWriter

    sites = [["resid"], ["resid", "attn_out"]]
    data = [{s: torch.randn(10, 6).to(dtype) for s in layer} for layer in sites]
    uploaded: dict[str, dict[str, torch.Tensor]] = {}
    meta = [{"layer": str(i)} for i in range(2)]
    with LayerWriter(["a", "b"], sites, 10, 6, dtype, meta, background=background) as writer:
        for r0, r1 in [(7, 10), (0, 3), (3, 7)]:  # batches land in any order
            writer.put(r0, [{s: t[r0:r1].clone() for s, t in layer.items()} for layer in data])
        writer.finish(lambda key, path: uploaded.__setitem__(key, load_file(str(path))))
    assert sorted(uploaded) == ["a", "b"]
    for key, layer in zip(["a", "b"], data, strict=True):
        assert uploaded[key].keys() == layer.keys()
        for site, tensor in layer.items():
            assert torch.equal(uploaded[key][site], tensor)
