"""SAE service: architectures recover a planted dictionary, metrics mean what they say,
and `python -m services.sae train` follows the stage contract."""

from __future__ import annotations

import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from services.sae.__main__ import TRAIN
from services.sae.batches import Batches, input_scale
from services.sae.fit import NonFiniteLoss, Schedule, fit
from services.sae.metrics import ce_recovered, reconstruction_metrics
from shared import layout
from shared.models import build_model, save_model
from shared.sae.artifacts import load_sae
from shared.sae.base import SAEConfig, SparseAutoencoder
from shared.sae.jumprelu import jumprelu, step
from shared.sae.models import build_sae
from shared.sae.topk import TopKSAE
from shared.spec import RunSpec, apply_overrides, parse_spec, spec_to_yaml
from shared.stage import stage_main
from shared.store import Store, open_store
from tests.support import ROOT, stage_env
from tests.synthetic_extraction import synthetic_run
from tests.synthetic_sae import planted_dictionary

CPU = torch.device("cpu")
VOCAB = 128  # the synthetic probe's token ids are < 97
D_MODEL = 32  # of the tiny models and synthetic runs (the spec wants n_embd >= ot's PCA)


def _fit(x: torch.Tensor, config: SAEConfig, steps: int, lr: float = 3e-3) -> SparseAutoencoder:
    rows = torch.arange(len(x))
    scale, mean = input_scale(x, rows)
    sae = build_sae(config, seed=0)
    sae.init_from_data(mean, scale)
    fit(sae, Batches(x, rows, 128, CPU, scale, seed=0), Schedule(steps=steps, lr=lr))
    return sae


def _recovery(sae: SparseAutoencoder, dictionary: torch.Tensor) -> float:
    """Mean over true features of the best cosine similarity with a decoder row."""
    w = sae.W_dec.detach()
    w = w / w.norm(dim=1, keepdim=True)
    return float((dictionary @ w.T).max(1).values.mean())


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize(
    "config",
    [
        SAEConfig(arch="jumprelu", d_in=32, d_sae=128, sparsity_loss="step", l0_coeff=1e-2),
        SAEConfig(arch="topk", d_in=32, d_sae=128, k=4),
    ],
    ids=["jumprelu", "topk"],
)
def test_recovers_a_planted_dictionary_and_its_l0(config):
    x, dictionary, planted_l0 = planted_dictionary(8192, 32, 64, 4.0, seed=0)
    sae = _fit(x, config, steps=1500)
    assert _recovery(sae, dictionary) >= 0.9
    fresh, same, _ = planted_dictionary(2048, 32, 64, 4.0, seed=0)  # new tokens
    assert torch.equal(same, dictionary)
    with torch.no_grad():
        l0 = float((sae.features(fresh) > 0).float().sum(1).mean())
    assert abs(l0 - planted_l0) <= 0.25 * planted_l0, (l0, planted_l0)
    # An untrained SAE of the same shape recovers far less: the bar is not trivially met.
    assert _recovery(build_sae(config, seed=1), dictionary) < 0.6


def test_threshold_pseudo_gradients_match_a_hand_computation():
    # kernel K((z - θ)/ε) = 1[|z - θ| < ε/2], ε = 0.05: on where |z - θ| < 0.025
    z = torch.tensor([[0.30, 0.12], [0.26, 0.50], [0.10, 0.11]], dtype=torch.float64)
    theta = torch.tensor([0.28, 0.10], dtype=torch.float64)
    g = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], dtype=torch.float64)
    # column 0: z - θ = 0.02, -0.02, -0.18 -> rows 0, 1 in the kernel; column 1: rows 0, 2
    z1, t1 = z.clone().requires_grad_(), theta.clone().requires_grad_()
    (jumprelu(z1, t1, 0.05) * g).sum().backward()
    assert t1.grad is not None and z1.grad is not None
    # -(θ/ε) Σ K g: -(0.28/0.05)(1 + 3) = -22.4 ; -(0.10/0.05)(2 + 6) = -16
    assert torch.allclose(t1.grad, torch.tensor([-22.4, -16.0], dtype=torch.float64))
    # towards z: g where z > θ (0.30 > 0.28; 0.12, 0.50, 0.11 > 0.10)
    assert torch.equal(z1.grad, torch.tensor([[1.0, 2.0], [0.0, 4.0], [0.0, 6.0]]).double())
    z2, t2 = z.clone().requires_grad_(), theta.clone().requires_grad_()
    (step(z2, t2, 0.05) * g).sum().backward()
    assert t2.grad is not None and z2.grad is not None
    # -(1/ε) Σ K g: -20 (1 + 3) = -80 ; -20 (2 + 6) = -160 ; nothing towards z
    assert torch.allclose(t2.grad, torch.tensor([-80.0, -160.0], dtype=torch.float64))
    assert not z2.grad.any()
    # forward values: z above its threshold kept, the rest 0
    out = jumprelu(z, theta, 0.05)
    assert torch.equal(out, z * torch.tensor([[1.0, 1.0], [0.0, 1.0], [0.0, 1.0]]).double())


def test_topk_auxk_gives_dead_latents_a_gradient():
    x, _, _ = planted_dictionary(256, 16, 32, 3.0, seed=1)
    for coeff, expect_grad in ((1 / 32, True), (0.0, False)):
        sae = build_sae(SAEConfig(arch="topk", d_in=16, d_sae=64, k=2, aux_k_coeff=coeff))
        assert isinstance(sae, TopKSAE)
        with torch.no_grad():
            sae.b_enc[32:] = 100.0  # latents 0..31 never make the top k, though often > 0
            sae.tokens_since_fired[:32] = sae.config.dead_after_tokens + 1
        sae.loss(x).total.backward()
        assert sae.W_enc.grad is not None
        dead_grad = sae.W_enc.grad[:, :32].abs().sum()
        assert bool(dead_grad > 0) == expect_grad


def test_jumprelu_pre_activation_loss_revives_dead_features():
    """Features that never reach their threshold get no gradient from reconstruction or
    sparsity, so they stay dead; the pre-activation loss walks them back until they fire."""
    x, _, _ = planted_dictionary(2048, 16, 32, 3.0, seed=2)
    rows = torch.arange(len(x))
    scale, mean = input_scale(x, rows)
    alive = {}
    for coeff in (0.0, 1e-3):
        sae = build_sae(SAEConfig(arch="jumprelu", d_in=16, d_sae=64, pre_act_coeff=coeff))
        sae.init_from_data(mean, scale)
        with torch.no_grad():
            sae.b_enc[:16] = -3.0  # far below any token's pre-activation: dead from the start
        fit(sae, Batches(x, rows, 128, CPU, scale, 0), Schedule(steps=300, lr=3e-3))
        fires = (sae.features(x) > 0).any(0)
        alive[coeff] = int(fires[:16].sum())
        assert bool(fires[16:].all())
    assert alive[0.0] == 0
    assert alive[1e-3] >= 12


def test_a_nan_loss_stops_training_with_its_step():
    x = torch.randn(64, 8)
    x[5, 3] = float("nan")
    sae = build_sae(SAEConfig(arch="relu", d_in=8, d_sae=16))
    rows = torch.arange(64)
    with pytest.raises(NonFiniteLoss) as err:
        fit(sae, Batches(x, rows, 64, CPU, 1.0, 0), Schedule(steps=30, lr=1e-3), log_every=10)
    assert err.value.step == 10


def test_schedule_warms_up_decays_and_ramps_sparsity_in():
    schedule = Schedule(steps=10, lr=1.0, warmup_steps=2, sparsity_warmup_steps=4)
    factors = [schedule.lr_factor(i) for i in range(10)]
    # warm-up 1/2, 2/2; constant; the last 20 % (2 steps) decay linearly towards 0
    assert factors == [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.5]
    assert schedule.sparsity_ramp(CPU).tolist() == [0.25, 0.5, 0.75] + [1.0] * 7
    assert Schedule(steps=3, lr=1.0).sparsity_ramp(CPU).tolist() == [1.0, 1.0, 1.0]


def identity_sae(d: int, scale: float = 1.0) -> SparseAutoencoder:
    """ReLU SAE with f = [x, -x]⁺ and x̂ = f⁺ - f⁻: an exact identity."""
    sae = build_sae(SAEConfig(arch="relu", d_in=d, d_sae=2 * d))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_dec.zero_()
        sae.input_scale.fill_(scale)
    return sae.eval()


def zero_sae(d: int) -> SparseAutoencoder:
    sae = identity_sae(d)
    with torch.no_grad():
        sae.W_dec.zero_()
    return sae


def test_reconstruction_metrics_of_known_saes():
    x = torch.randn(300, 8) * 3 + 1
    rows = torch.arange(300)
    perfect = reconstruction_metrics(identity_sae(8, scale=0.2), x, rows, 64)
    assert perfect["fvu"] == pytest.approx(0.0, abs=1e-6)
    assert perfect["explained_variance"] == pytest.approx(1.0, abs=1e-6)
    assert perfect["l0"] == pytest.approx(float((x != 0).sum(1).float().mean()))
    assert perfect["dead_fraction"] == 0.0
    assert sum(perfect["density"]["counts"]) == 16 and perfect["density"]["dead"] == 0

    nothing = reconstruction_metrics(zero_sae(8), x, rows, 64)
    expected = float(x.pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert nothing["fvu"] == pytest.approx(expected, rel=1e-5)
    assert nothing["mse"] == pytest.approx(float(x.pow(2).mean()), rel=1e-5)

    sae = identity_sae(8)
    with torch.no_grad():
        sae.b_enc[:3] = -1e4  # three features that can never fire
    assert reconstruction_metrics(sae, x, rows, 64)["dead_fraction"] == pytest.approx(3 / 16)


@pytest.fixture(scope="module")
def tiny_model():
    spec = apply_overrides(RunSpec(), {"model.n_embd": D_MODEL, "model.n_head": 2})
    return build_model(spec, VOCAB, 0, 0).eval()


def _probe_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, VOCAB, (5, 12), generator=g)
    lengths = torch.tensor([12, 7, 3, 12, 1])
    ids[torch.arange(12)[None, :] >= lengths[:, None]] = 0  # pad
    return ids, lengths


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_ce_recovered_is_one_for_identity_and_zero_for_zeros(tiny_model, layer):
    ids, lengths = _probe_batch()
    ident = ce_recovered(tiny_model, ids, lengths, layer, identity_sae(D_MODEL, 0.5).reconstruct, 2)
    assert ident["ce_spliced"] == pytest.approx(ident["ce_clean"], abs=1e-5)
    assert ident["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-3)
    assert ident["kl_spliced"] == pytest.approx(0.0, abs=1e-6)
    assert ident["kl_recovered"] == pytest.approx(1.0, abs=1e-4)
    zeros = ce_recovered(tiny_model, ids, lengths, layer, zero_sae(D_MODEL).reconstruct, 2)
    assert zeros["ce_loss_recovered"] == pytest.approx(0.0, abs=1e-4)
    assert zeros["ce_zero_ablated"] != pytest.approx(zeros["ce_clean"], abs=1e-3)
    assert ident["tokens"] == int((lengths - 1).clamp(min=0).sum())  # real next tokens only


def test_splice_sites_and_padding(tiny_model):
    ids, lengths = _probe_batch()
    last = 2  # n_layer of the tiny preset: the residual right before ln_f
    out = ce_recovered(tiny_model, ids, lengths, last, torch.zeros_like, 3)
    # zeros before ln_f (bias 0 at init) give all-zero logits: uniform over the vocabulary
    assert out["ce_spliced"] == pytest.approx(math.log(VOCAB), abs=1e-5)
    # clean CE on a padded batch equals the CE of each sequence alone, unpadded
    nll, count = 0.0, 0
    with torch.no_grad():
        for row, n in zip(ids, lengths.tolist(), strict=True):
            if n < 2:
                continue
            logits = tiny_model(input_ids=row[None, :n]).logits[0, :-1]
            nll += float(torch.nn.functional.cross_entropy(logits, row[1:n], reduction="sum"))
            count += n - 1
    assert out["ce_clean"] == pytest.approx(nll / count, rel=1e-5)


# -- the stage -----------------------------------------------------------------------------

STAGE = {
    "sae.source": "probe",
    "model.n_embd": D_MODEL,
    "model.n_head": 2,
    "sae.batch_size": 64,
    "sae.expansion": 2,
    "sae.epochs": 20,
    "sae.holdout_fraction": 0.25,
}


def _layer_cloud(n_tokens: int, d: int):
    def cloud(_step: int, layer: int) -> torch.Tensor:
        return planted_dictionary(n_tokens, d, 2 * d, 3.0, seed=10)[0] * (1 + layer)

    return cloud


def _run(store: Store, n_tokens: int = 512, overrides: dict | None = None) -> str:
    spec = apply_overrides(RunSpec(), {**STAGE, **(overrides or {})})
    run_id = synthetic_run(
        store, spec, steps=[0, 10], n_layers=3, n_tokens=n_tokens, d_model=D_MODEL,
        cloud=_layer_cloud(n_tokens, D_MODEL),
    )  # fmt: skip
    save_model(store, run_id, 10, build_model(spec, VOCAB, 0, 0))
    return run_id


def _command(store: Store, run_id: str, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "services.sae", "train", "--run", run_id, "--store", store.url,
        "--device", "cpu", *extra,
    ]  # fmt: skip


def _cli(
    store: Store, run_id: str, *extra: str, gateway: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = (
        stage_env(OMP_NUM_THREADS="1")
        if gateway is None
        else {**stage_env(OMP_NUM_THREADS="1"), "DRIFTLAB_PUSHGATEWAY": gateway}
    )
    return subprocess.run(
        _command(store, run_id, *extra),
        capture_output=True, text=True, timeout=180, cwd=ROOT, env=env,
    )  # fmt: skip


def _status(store: Store, run_id: str, layer: int) -> dict:
    return store.get_json(layout.status_key(run_id, "sae", f"layer-{layer:02d}"))


def test_stage_trains_every_layer_then_reruns_cached(tmp_path, pushgateway):
    store = open_store(tmp_path / "store")
    run_id = _run(store)
    proc = _cli(store, run_id, gateway=pushgateway.address)
    assert proc.returncode == 0, proc.stderr
    for layer in range(3):
        report = store.get_json(layout.sae_config_key(run_id, layer))
        assert report["checkpoint_step"] == 10 and report["layer"] == layer  # last step
        assert report["evaluation"] == {
            "held_out": True, "split": "probe", "samples": 16, "tokens": 128,
        }  # fmt: skip
        assert report["training"]["source"] == "probe" and report["training"]["epochs"] == 20
        metrics = report["metrics"]
        assert 0.5 < metrics["explained_variance"] <= 1.0
        assert 0 < metrics["l0"] < 2 * D_MODEL and 0 <= metrics["dead_fraction"] < 1
        assert sum(metrics["density"]["counts"]) + metrics["density"]["dead"] == 2 * D_MODEL
        ce = metrics["ce"]
        assert math.isfinite(ce["ce_loss_recovered"]) and ce["kl_spliced"] >= 0
        assert ce["tokens"] == 16 * 7  # held-out sequences of 8 tokens: 7 next tokens each
        pushed = {"run_id": run_id, "stage": "sae", "layer": str(layer)}
        assert pushgateway.value("driftlab_sae_explained_variance", **pushed) == pytest.approx(
            metrics["explained_variance"]
        )
        assert (
            pushgateway.value("driftlab_sae_samples_total", **pushed)
            == (report["training"]["samples"])
        )
        status = _status(store, run_id, layer)
        assert status["state"] == "succeeded" and status["headline"]["l0"] > 0
        sae = load_sae(store, run_id, layer)
        assert sae.config.d_sae == 2 * D_MODEL and sae.config.arch == "jumprelu"
    scales = [store.get_json(layout.sae_config_key(run_id, i))["input_scale"] for i in range(3)]
    assert scales[0] / scales[2] == pytest.approx(3.0, rel=1e-5)  # layer l: (1 + l) x layer 0

    weights = Path(tmp_path / "store" / layout.sae_weights_key(run_id, 1))
    before = weights.stat().st_mtime_ns
    again = _cli(store, run_id)
    assert again.returncode == 0, again.stderr
    assert all(_status(store, run_id, layer)["state"] == "cached" for layer in range(3))
    assert weights.stat().st_mtime_ns == before


def test_missing_layer_too_few_tokens_and_nan_are_one_line_errors(tmp_path, capsys):
    store = open_store(tmp_path / "store")
    run_id = _run(store, n_tokens=96)

    assert stage_main([TRAIN], ["train", "--run", run_id, "--store", store.url,
                                "--layer", "7"]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "layer 7" in err and "step 10" in err and "layers 0..2" in err

    # 96 tokens, a quarter of the sequences held out: 72 train tokens < batch size 100
    original = store.get_text(layout.spec_key(run_id))
    bigger = apply_overrides(parse_spec(original), {"sae.batch_size": 100})
    store.put_text(layout.spec_key(run_id), spec_to_yaml(bigger))
    assert stage_main([TRAIN], ["train", "--run", run_id, "--store", store.url,
                                "--layer", "1"]) == 1  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "layer 1" in err and "72 training tokens" in err and "sae.batch_size" in err
    assert not store.exists(layout.sae_done_key(run_id, 1))

    store.put_text(layout.spec_key(run_id), original)
    bad = torch.ones(96, D_MODEL)
    bad[4, 2] = float("nan")
    store.put_tensors(layout.extract_layer_key(run_id, 10, 2), {"resid": bad})
    assert stage_main([TRAIN], ["train", "--run", run_id, "--store", store.url,
                                "--layer", "2"]) == 1  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "NaN" in err and "step 10" in err and "layer 2" in err
    assert _status(store, run_id, 2)["state"] == "failed"


def test_killed_training_reruns_cleanly(tmp_path):
    store = open_store(tmp_path / "store")
    run_id = _run(store, overrides={"sae.epochs": None, "sae.tokens": 300_000})
    proc = subprocess.Popen(
        _command(store, run_id, "--layer", "1"),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=stage_env(OMP_NUM_THREADS="1"),
    )  # fmt: skip
    status_key = layout.status_key(run_id, "sae", "layer-01")
    deadline = time.monotonic() + 120
    while not store.exists(status_key) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.1)
    time.sleep(0.5)
    assert proc.poll() is None, "training finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    if proc.stderr:
        proc.stderr.close()
    assert store.get_json(status_key)["state"] == "running"  # what a killed pod leaves
    assert not store.exists(layout.sae_done_key(run_id, 1))
    assert not store.exists(layout.sae_config_key(run_id, 1))

    rerun = _cli(store, run_id, "--layer", "1")
    assert rerun.returncode == 0, rerun.stderr
    assert store.get_json(status_key)["state"] == "succeeded"
    assert store.exists(layout.sae_done_key(run_id, 1))
    assert load_sae(store, run_id, 1).config.d_in == D_MODEL
