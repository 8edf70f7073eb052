"""The trainer, run as Argo runs it: `python -m services.trainer` in a real subprocess where
how it runs or dies matters (kills, resumes, torchrun), in process for what it does with
bad inputs."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from services.trainer.__main__ import TRAIN
from shared import layout
from shared.models import load_model
from shared.steps import complete_steps
from tests.support import ROOT, register_run, run_stage_here, stage_env

BASE = {
    "data.train_samples": 256,
    "data.eval_samples": 16,
    "train.batch_size": 8,
    "train.steps": 30,
    "train.checkpoint_every": 10,
    "train.dynamics_every": 5,
    "train.log_every": 1,
    "train.warmup_steps": 2,
}


def _new_run(store, **overrides):
    return register_run(store, {**BASE, **overrides})


def _train(store, run_id, *extra, timeout=300, prefix=()):
    return subprocess.run(
        # torchrun reads `--run` as an abbreviation of its own --run-path: `--` ends its options.
        [*prefix, "-m", "services.trainer", "--", "--run", run_id, "--store", store.url, *extra]
        if prefix
        else [sys.executable, "-m", "services.trainer", "--run", run_id, "--store", store.url,
              *extra],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=stage_env(),
    )  # fmt: skip


def _train_here(store, run_id):
    """The trainer in this process: for what it does with its inputs, not how it dies."""
    return run_stage_here(TRAIN, ["--run", run_id, "--store", store.url])


def _metrics(store, run_id):
    text = store.get_text(layout.train_metrics_key(run_id))
    return [json.loads(line) for line in text.splitlines()]


@pytest.mark.parametrize(
    "overrides",
    [
        {"data.dataset": "arithmetic", "train.learning_rate": 3e-3},
        {"data.dataset": "modular", "data.modular_p": 23, "train.learning_rate": 3e-3},
    ],
    ids=["arithmetic", "modular"],
)
def test_loss_falls_and_checkpoints_hold_everything(store, overrides):
    run_id = _new_run(store, **overrides, **{"train.save_gradients": True})
    proc = _train_here(store, run_id)
    assert proc.returncode == 0, proc.stderr
    rows = _metrics(store, run_id)
    assert [r["step"] for r in rows] == list(range(1, 31))
    first, last = sum(r["loss"] for r in rows[:3]) / 3, sum(r["loss"] for r in rows[-3:]) / 3
    assert last < 0.8 * first, (first, last)

    for step in (0, 10, 20, 30):
        keys = set(store.list(layout.checkpoint_prefix(run_id, step)))
        expected = {
            layout.checkpoint_model_key(run_id, step),
            layout.checkpoint_config_key(run_id, step),
            layout.checkpoint_optim_key(run_id, step),
            layout.checkpoint_trainer_state_key(run_id, step),
            layout.checkpoint_dynamics_key(run_id, step),
            layout.checkpoint_done_key(run_id, step),
        }
        if step > 0:
            expected.add(layout.checkpoint_grads_key(run_id, step))
        assert keys == expected, keys ^ expected
        dyn = store.get_json(layout.checkpoint_dynamics_key(run_id, step))
        assert dyn["eval"]["eval_loss"] > 0 and "eval_accuracy" in dyn["eval"]
        assert dyn["dynamics"]["spectral"] > 0
    state = store.get_json(layout.checkpoint_trainer_state_key(run_id, 30))
    assert state["step"] == 30 and state["cursor"] == 30 * 8
    grads, _ = store.get_tensors(layout.checkpoint_grads_key(run_id, 30))
    assert "transformer.h.0.attn.c_attn.weight" in grads

    model = load_model(store, run_id, 30)
    tensors, meta = store.get_tensors(layout.checkpoint_model_key(run_id, 30))
    assert meta.get("format") == "pt"
    assert torch.equal(model.transformer.wte.weight, tensors["transformer.wte.weight"])
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    dynamics_steps = [json.loads(x)["step"] for x in store.get_text(
        layout.train_dynamics_key(run_id)).splitlines()]  # fmt: skip
    assert dynamics_steps == [0, 5, 10, 15, 20, 25, 30]
    status = store.get_json(layout.status_key(run_id, "train"))
    assert status["state"] == "succeeded" and status["headline"]["steps"] == 30
    assert store.exists(layout.train_done_key(run_id))

    cached = _train_here(store, run_id)
    assert cached.returncode == 0
    assert store.get_json(layout.status_key(run_id, "train"))["state"] == "cached"


def test_sigkill_and_resume_is_bit_identical(store):
    overrides = {"train.steps": 40, "train.checkpoint_every": 10}
    reference = _new_run(store, **overrides)
    assert _train(store, reference).returncode == 0

    killed = _new_run(store, **overrides)
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.trainer", "--run", killed, "--store", store.url],
        cwd=ROOT, env=stage_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 240
    while not store.exists(layout.checkpoint_done_key(killed, 20)):
        assert proc.poll() is None and time.monotonic() < deadline, "trainer ended early"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not store.exists(layout.checkpoint_done_key(killed, 40))

    resumed = _train(store, killed)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr
    a, _ = store.get_tensors(layout.checkpoint_model_key(reference, 40))
    b, _ = store.get_tensors(layout.checkpoint_model_key(killed, 40))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "weights differ after resume"
    ra, rb = _metrics(store, reference), _metrics(store, killed)
    assert [r["step"] for r in rb] == list(range(1, 41))
    assert [r["loss"] for r in ra] == [r["loss"] for r in rb]


def test_resume_from_another_run(store):
    first = _new_run(store, **{"train.steps": 20})
    assert _train_here(store, first).returncode == 0
    second = _new_run(store, **{"train.steps": 30, "train.resume_from": f"{first}:10"})
    proc = _train_here(store, second)
    assert proc.returncode == 0, proc.stderr
    state = store.get_json(layout.checkpoint_trainer_state_key(second, 30))
    assert state["origin"] == f"{first}:10"
    assert _metrics(store, second)[0]["step"] == 11
    assert not store.exists(layout.checkpoint_done_key(second, 0))


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_on_gloo_match_single_process(store, strategy):
    overrides = {"train.steps": 8, "train.checkpoint_every": 4, "train.batch_size": 8}
    single = _new_run(store, **overrides)
    assert _train_here(store, single).returncode == 0
    multi = _new_run(store, **overrides, **{"train.strategy": strategy})
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                "--master_port=0", "--rdzv_backend=c10d", "--rdzv_endpoint=127.0.0.1:0"]  # fmt: skip
    proc = _train(store, multi, prefix=torchrun)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _metrics(store, single), _metrics(store, multi)
    assert len(a) == len(b) == 8
    for ra, rb in zip(a, b, strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-4)
    assert store.get_json(layout.status_key(multi, "train"))["state"] == "succeeded"
    # Full-state checkpoints: they load back on one device, in one process.
    one, many = load_model(store, single, 8), load_model(store, multi, 8)
    for (name, p), q in zip(one.named_parameters(), many.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-5), name
    state = store.get_json(layout.checkpoint_trainer_state_key(multi, 8))
    assert state["param_names"][0] == "transformer.wte.weight"
    # ...and training continues from them in a single process.
    cont = _new_run(store, **{**overrides, "train.steps": 10, "train.resume_from": f"{multi}:8"})
    resumed = _train_here(store, cont)
    assert resumed.returncode == 0, resumed.stderr[-2000:]


def _one_line_failure(proc) -> str:
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert "Traceback" not in proc.stderr, proc.stderr
    assert lines, proc.stderr
    return lines[-1]


def test_bad_inputs_are_clear(store, tmp_path):
    run_id = _new_run(store, **{"data.dataset": "text", "data.path": str(tmp_path / "nope.txt")})
    assert "nope.txt" in _one_line_failure(_train_here(store, run_id))

    run_id = _new_run(store, **{"model.vocab_size": 100})
    assert "vocab_size" in _one_line_failure(_train_here(store, run_id))

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("one story.\n\nanother story.\n\na third one.\n")
    run_id = _new_run(
        store, **{"data.dataset": "text", "data.path": str(corpus), "data.loss_on": "answer"}
    )
    assert "data.loss_on answer needs a task with answers" in _one_line_failure(
        _train_here(store, run_id)
    )

    small = _new_run(store, **{"train.steps": 10})
    assert _train_here(store, small).returncode == 0
    other = _new_run(
        store, **{"model.arch": "custom", "model.n_layer": 1, "model.n_head": 2,
                  "model.n_embd": 32, "train.resume_from": f"{small}:10"}
    )  # fmt: skip
    assert "another architecture" in _one_line_failure(_train_here(store, other))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(store):
    run_id = _new_run(store, **{"train.learning_rate": 1e6, "train.clip_grad": None,
                                "train.warmup_steps": 0, "train.steps": 30})  # fmt: skip
    proc = _train_here(store, run_id)
    line = _one_line_failure(proc)
    assert "loss became" in line and "last good checkpoint is step" in line
    status = store.get_json(layout.status_key(run_id, "train"))
    assert status["state"] == "failed" and "at step" in status["error"]
    assert store.exists(layout.checkpoint_done_key(run_id, 0))
    assert not store.exists(layout.train_done_key(run_id))


def test_pretrained_analysis_only_run_writes_step_zero(store, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "pretrained"
    torch.manual_seed(3)
    config = GPT2Config(vocab_size=258, n_positions=128, n_embd=32, n_layer=2, n_head=2)
    GPT2LMHeadModel(config).save_pretrained(folder)
    run_id = _new_run(
        store, **{"model.init": "pretrained", "model.pretrained": str(folder),
                  "model.arch": "custom", "model.n_layer": 2, "model.n_head": 2,
                  "model.n_embd": 32, "train.steps": 0}
    )  # fmt: skip
    proc = _train_here(store, run_id)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert complete_steps(store, run_id) == [0]
    saved = load_model(store, run_id, 0)
    original = GPT2LMHeadModel.from_pretrained(folder)
    for (name, p), q in zip(saved.named_parameters(), original.parameters(), strict=True):
        assert torch.equal(p, q), name
    ids = torch.randint(0, 258, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the fused GELU it runs with computes GPT-2's gelu_new
        torch.testing.assert_close(
            saved(input_ids=ids).logits, original(input_ids=ids).logits, atol=1e-5, rtol=0
        )
    assert store.get_json(layout.checkpoint_dynamics_key(run_id, 0))["eval"]["eval_loss"] > 0

    missing = _new_run(store, **{"model.init": "pretrained",
                                 "model.pretrained": str(tmp_path / "absent")})  # fmt: skip
    assert "cannot load pretrained model" in _one_line_failure(_train_here(store, missing))


def test_a_batch_no_machine_holds_is_refused_before_any_work(store):
    """train.batch_size: 1e9 used to build a minute of data, then die in an allocator."""
    run_id = _new_run(store, **{"train.batch_size": 10**9})
    start = time.monotonic()
    proc = _train_here(store, run_id)
    assert proc.returncode == 2 and "train stage needs at least" in _one_line_failure(proc)
    assert "train.batch_size" in proc.stderr and time.monotonic() - start < 5
    assert not store.exists(layout.checkpoint_done_key(run_id, 0))
