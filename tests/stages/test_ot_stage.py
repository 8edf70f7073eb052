"""The OT stage on synthetic extractions: `python -m services.ot` as Argo runs it.

The Sinkhorn core's own correctness (POT agreement, S(a, a) = 0, symmetry, reg -> 0,
translation, sliced ranking) is in tests/unit/test_sinkhorn.py; here: the stage contract, the
drift matrices' layout, the planted phase transition, the permutation baseline, the
reporting conventions of phases.json and the errors a user can meet.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

from services.ot import phases
from services.ot.__main__ import OT
from services.ot.drift import DriftSettings, SolveStats, compute_drift, total_problems
from services.ot.stage import quality_checks, transition_checks
from shared import layout
from shared.spec import RunSpec, apply_overrides
from shared.stage import stage_main
from tests.support import ROOT, stage_env
from tests.synthetic_extraction import drifting_clouds, synthetic_run, write_step

STEPS = [0, 10, 20, 30, 40, 50, 60]
JUMP_AT = 40
JUMP = 6.0  # standard deviations: above the resolution of a 48-token cloud
N_LAYERS, N_TOKENS, D_MODEL = 3, 64, 16
PERMUTATIONS = 10
SPEC = {
    "ot.n_points": 48,
    "ot.pca_components": 8,
    "ot.bootstrap": 5,
    "ot.permutations": PERMUTATIONS,
}


def _ot(store, run_id, *extra):
    return subprocess.run(
        [sys.executable, "-m", "services.ot", "--run", run_id, "--store", store.url, "--device",
         "cpu", *extra],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env=stage_env(),
    )  # fmt: skip


def _eval(step: int) -> dict[str, float]:
    """Accuracy jumps one checkpoint after the representations do: drift leads by 10 steps."""
    late = step >= JUMP_AT + 10
    return {"eval_loss": 1.0 - 0.01 * step - (0.5 if late else 0.0), "eval_accuracy": 0.1 + (0.6 if late else 0.01 * step / 10)}  # fmt: skip


def _run(store, steps=STEPS, **overrides):
    spec = apply_overrides(RunSpec(), {**SPEC, **overrides})
    cloud = drifting_clouds(N_TOKENS, D_MODEL, jump_at=JUMP_AT, jump=JUMP)
    return synthetic_run(
        store, spec, steps=steps, n_layers=N_LAYERS, n_tokens=N_TOKENS, d_model=D_MODEL,
        cloud=cloud, eval_metrics=_eval,
    )  # fmt: skip


def test_stage_finds_the_planted_jump_and_writes_every_artifact(store):
    run_id = _run(store)
    proc = _ot(store, run_id)
    assert proc.returncode == 0, proc.stderr

    tensors, meta = store.get_tensors(layout.ot_drift_key(run_id))
    t, n_l = len(STEPS), N_LAYERS
    assert tensors["steps"].tolist() == STEPS
    assert tensors["depth"].shape == (t, n_l, n_l)
    assert tensors["time"].shape == (n_l, t, t)
    assert tensors["step"].shape == (n_l, t - 1)
    assert tensors["step_ci"].shape == (2, n_l, t - 1)
    assert tensors["null"].shape == (n_l, t, PERMUTATIONS)
    assert tensors["scale_depth"].shape == (t,) and tensors["scale_time"].shape == (n_l,)
    assert bool((tensors["scale_depth"] > 0).all()) and bool((tensors["scale_time"] > 0).all())
    assert tensors["token_index"].shape == (48,)
    assert meta["method"] == "sinkhorn" and float(meta["reg"]) == 0.05
    for name in ("depth", "time"):
        m = tensors[name]
        assert torch.equal(m, m.transpose(1, 2)), f"{name} is not symmetric"
        assert bool((torch.diagonal(m, dim1=1, dim2=2) == 0).all())
    assert torch.equal(tensors["step"], torch.diagonal(tensors["time"], 1, dim1=1, dim2=2))
    # Deeper layers of the synthetic clouds are scaled further from layer 0.
    assert bool((tensors["depth"][:, 0, 2] > tensors["depth"][:, 0, 1]).all())
    lo, hi = tensors["step_ci"]
    assert bool((lo <= hi).all())

    report = store.get_json(layout.ot_phases_key(run_id))
    assert report["depth_only"] is False and report["steps"] == STEPS
    assert set(report["curves"]) == {"mean", "layer-00", "layer-01", "layer-02"}
    for name, curve in report["curves"].items():
        assert [tr["step"] for tr in curve["transitions"]] == [JUMP_AT], name
        assert [sp["step"] for sp in curve["spikes"]] == [JUMP_AT], name
        rising = [cp["step"] for cp in curve["change_points"] if cp["magnitude"] > 0]
        assert rising == [JUMP_AT], name
        (tr,) = curve["transitions"]
        assert tr["exceeds_baseline"] is True and sorted(tr["by"]) == ["mad", "pelt"]
        assert tr["clears_background"] is True
        jump = STEPS.index(JUMP_AT) - 1
        assert curve["p_values"][jump] == pytest.approx(1 / (2 * PERMUTATIONS + 1))
        quiet = [v for i, v in enumerate(curve["values"]) if i != jump]
        assert curve["values"][jump] > 10 * max(quiet)
    accuracy = report["eval"]["eval_accuracy"]
    assert [j["step"] for j in accuracy["jumps"]] == [JUMP_AT + 10]
    assert accuracy["lead_lag"]["lag_intervals"] == 1
    readings = {(a["metric"], a["reading"]) for a in report["alignment"]}
    assert ("eval_accuracy", "drift leads by 10 steps") in readings

    for name in ("depth", "time", "step", "drift_vs_eval"):
        png = store.get_bytes(layout.ot_plot_key(run_id, name))
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000, name
    status = store.get_json(layout.status_key(run_id, "ot"))
    assert status["state"] == "succeeded" and status["headline"]["transitions"] == [JUMP_AT]
    verdicts = {c["check"]: (c["verdict"], c["value"]) for c in status["quality"]}
    assert verdicts["transitions_resolved"] == ("ok", 1.0)
    assert store.exists(layout.ot_done_key(run_id))

    drift_before = store.get_bytes(layout.ot_drift_key(run_id))
    again = _ot(store, run_id)
    assert again.returncode == 0, again.stderr
    assert store.get_json(layout.status_key(run_id, "ot"))["state"] == "cached"
    assert store.get_bytes(layout.ot_drift_key(run_id)) == drift_before


def test_one_checkpoint_gives_depth_only_and_says_so(store):
    run_id = _run(store, steps=[0], **{"train.steps": 0})
    proc = _ot(store, run_id)
    assert proc.returncode == 0, proc.stderr
    tensors, _ = store.get_tensors(layout.ot_drift_key(run_id))
    assert tensors["depth"].shape == (1, N_LAYERS, N_LAYERS)
    assert not {"time", "step", "step_ci", "null"} & set(tensors)
    report = store.get_json(layout.ot_phases_key(run_id))
    assert report["depth_only"] is True and "one checkpoint" in report["note"]
    assert "curves" not in report
    plots = {k.rsplit("/", 1)[1] for k in store.list(layout.ot_prefix(run_id))}
    assert plots == {"drift.safetensors", "phases.json", "depth.png", "DONE"}


def test_missing_extraction_is_one_line_and_exit_2(store):
    run_id = _run(store)
    store.delete(layout.extract_done_key(run_id, 20))
    proc = _ot(store, run_id)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "step-000020/DONE is not there yet" in lines[0] or "step-20" in lines[0], lines[0]
    assert "python -m services.extractor" in lines[0] and "--step 20" in lines[0]
    assert not store.list(layout.ot_prefix(run_id))


def test_nan_in_hidden_states_names_step_and_layer(store, capsys):
    run_id = _run(store, steps=[0, 10])
    layers = [torch.randn(N_TOKENS, D_MODEL) for _ in range(N_LAYERS)]
    layers[2][5, 3] = float("nan")
    write_step(store, run_id, 10, layers)
    code = stage_main(OT, ["--run", run_id, "--store", store.url, "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1
    assert "step 10" in err and "layer 2" in err and "NaN/inf" in err
    assert not store.exists(layout.ot_drift_key(run_id))


def test_run_without_any_checkpoint_is_a_clear_error(store, capsys):
    run_id = _run(store, steps=[])
    code = stage_main(OT, ["--run", run_id, "--store", store.url, "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "no finished checkpoint" in err and "services.trainer" in err


def _settings(**kw) -> DriftSettings:
    base = {
        "method": "sinkhorn", "reg": 0.05, "pca_components": 8, "bootstrap": 0,
        "permutations": 10, "n_projections": 64, "seed": 0, "rtol": 1e-3,
        "options": {"tol": 1e-4, "max_iter": 500},
    }  # fmt: skip
    return DriftSettings(**{**base, **kw})


def test_baseline_is_the_drift_between_halves_and_only_a_resolvable_jump_exceeds_it():
    """Fresh noise at every checkpoint, a shift of 8 sd at checkpoint 4, 32 extra tokens."""
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(64, 16, generator=gen)
    shift = torch.zeros(16)
    shift[0] = 8.0
    states = torch.stack(
        [
            torch.stack([base + 0.3 * torch.randn(64, 16, generator=gen) + (shift if t >= 4 else 0) for _ in range(3)])
            for t in range(6)
        ]
    )  # fmt: skip
    solved: list[int] = []
    settings = _settings()
    drift = compute_drift(
        list(range(6)), states[:, :, :32], settings, solved.append, states[:, :, 32:]
    )
    assert sum(solved) == total_problems(6, 3, settings)
    assert drift.null is not None and drift.null.shape == (3, 6, settings.permutations)
    baseline = drift.baseline()
    assert baseline is not None and drift.step is not None and drift.step_mean is not None
    per_layer, mean_curve = baseline
    # Two disjoint 32-token samples of one cloud are far apart next to fresh noise on the
    # same tokens, and nearer than a shift of 8 sd.
    assert bool((per_layer > 0.05).all())
    above = (drift.step > per_layer).nonzero()[:, 1].tolist()
    assert above == [3, 3, 3], (drift.step, per_layer)
    assert (drift.step_mean > mean_curve).nonzero()[:, 0].tolist() == [3]


def test_identical_layers_have_zero_depth_drift_in_a_shared_basis():
    cloud = torch.randn(40, 12, generator=torch.Generator().manual_seed(1))
    states = torch.stack([torch.stack([cloud, cloud, 2 * cloud]) for _ in range(2)])
    drift = compute_drift([0, 1], states, _settings(permutations=0))
    assert float(drift.depth[0, 0, 1]) == 0.0 and float(drift.depth[0, 0, 2]) > 0.01
    assert drift.step is not None and float(drift.step.abs().max()) == 0.0


def _verdicts(stats: SolveStats) -> dict[str, str]:
    return {c.check: c.verdict for c in quality_checks(stats)}


def test_quality_checks_judge_unconverged_share_and_value_error():
    clean = SolveStats(problems=1000, unconverged=0, polished=10, max_relative_error=2e-4)
    assert _verdicts(clean) == {"unconverged_share": "ok", "value_error": "ok"}
    assert _verdicts(replace(clean, unconverged=1))["unconverged_share"] == "warn"
    assert _verdicts(replace(clean, unconverged=49))["unconverged_share"] == "warn"
    assert _verdicts(replace(clean, unconverged=50))["unconverged_share"] == "fail"
    assert _verdicts(replace(clean, max_relative_error=2e-3))["value_error"] == "warn"
    assert _verdicts(replace(clean, max_relative_error=0.05))["value_error"] == "fail"
    (share,) = [
        c for c in quality_checks(replace(clean, unconverged=50)) if c.check == "unconverged_share"
    ]
    assert share.value == 0.05 and "ot.max_iter" in share.message


def _jump_states(n_t: int = 4) -> torch.Tensor:
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(32, 8, generator=gen)
    return torch.stack(
        [torch.stack([base * (1 + 0.2 * layer) + 0.02 * t * torch.randn(32, 8, generator=gen) for layer in range(3)]) for t in range(n_t)]
    )  # fmt: skip


def test_loose_tolerance_without_polish_is_judged_inaccurate():
    """tol 1e-2 and an rtol that polishes nothing: the value_error check must say so."""
    states = _jump_states()
    loose = _settings(rtol=1e9, options={"tol": 1e-2, "max_iter": 500})
    drift = compute_drift(list(range(4)), states, loose)
    assert drift.stats.polished == 0 and drift.stats.max_relative_error > 1e-2
    assert _verdicts(drift.stats)["value_error"] == "fail"
    # The defaults polish what needs it: same clouds, accurate values, every check ok.
    tight = compute_drift(list(range(4)), states, _settings(permutations=0))
    assert _verdicts(tight.stats) == {"unconverged_share": "ok", "value_error": "ok"}
    assert tight.stats.problems == total_problems(4, 3, _settings(permutations=0))
    assert tight.time is not None and drift.time is not None
    assert not torch.allclose(drift.time, tight.time, rtol=1e-3, atol=0)


def test_sinkhorn_capped_at_one_iteration_is_finished_by_the_polish():
    """A start far from the optimum changes how much Newton works, not the values."""
    states = _jump_states()
    capped = compute_drift(
        list(range(4)), states, _settings(permutations=0, options={"max_iter": 1})
    )
    # The reference polishes every value from Sinkhorn's usual start (rtol far below any).
    ref = compute_drift(list(range(4)), states, _settings(permutations=0, rtol=1e-12))
    stats = capped.stats
    assert stats.polished == stats.problems and stats.unconverged == 0
    assert _verdicts(stats) == {"unconverged_share": "ok", "value_error": "ok"}
    assert capped.time is not None and ref.time is not None
    assert torch.allclose(capped.time, ref.time, rtol=1e-6, atol=1e-12)
    assert torch.allclose(capped.depth, ref.depth, rtol=1e-6, atol=1e-12)


def test_plateau_gives_rising_and_falling_change_points_and_one_transition():
    steps = list(range(0, 110, 10))
    rng = np.random.default_rng(0)
    values = np.array([1.0] * 3 + [5.0] * 4 + [1.0] * 3) + 0.05 * rng.standard_normal(10)
    curve = phases.analyse_curve(steps, values, baseline=None, ci=None, p_values=None, penalty=None)
    assert [(cp["step"], cp["magnitude"] > 0) for cp in curve["change_points"]] == [
        (40, True),
        (80, False),
    ]
    # The plateau's intervals are MAD spikes too: one episode, not four transitions.
    assert len(curve["spikes"]) == 4
    (tr,) = curve["transitions"]
    assert (tr["step"], tr["interval"], tr["by"]) == (40, [30, 70], ["mad", "pelt"])
    assert tr["exceeds_baseline"] is None


def _judged_transitions(values, ci):
    steps = list(range(0, 10 * (len(values) + 1), 10))
    curve = phases.analyse_curve(
        steps, np.asarray(values), baseline=None, ci=ci, p_values=None, penalty=None
    )
    (check,) = transition_checks({"curves": {"mean": curve}})
    return curve["transitions"], check


def _bursts_and_intervals(spread: float) -> tuple[list[float], np.ndarray]:
    """Three bursts of drift on a level of 1; the bootstrap puts each value within
    +-spread of itself, except the first burst, which is always within +-0.5."""
    values = [1.0] * 3 + [9.0] + [1.0] * 3 + [4.0] + [1.0] * 3 + [4.0] + [1.0] * 3
    half = np.full(len(values), spread)
    half[3] = 0.5
    return values, np.stack([np.asarray(values) - half, np.asarray(values) + half])


def test_transitions_that_resampling_can_erase_warn_and_say_how_many():
    """Three bursts, only the first clear of the curve's level whatever tokens were drawn:
    the list of phases is mostly noise, and the banner must say so."""
    transitions, check = _judged_transitions(*_bursts_and_intervals(spread=3.5))
    assert [t["clears_background"] for t in transitions] == [True, False, False]
    assert (check.check, check.verdict) == ("transitions_resolved", "warn")
    assert check.value == pytest.approx(1 / 3)
    assert "(1 of 3)" in check.message and "ot.n_points" in check.message
    # The same curve with tight intervals: each burst is certain, however small.
    transitions, resolved = _judged_transitions(*_bursts_and_intervals(spread=0.2))
    assert [t["clears_background"] for t in transitions] == [True, True, True]
    assert (resolved.verdict, resolved.value) == ("ok", 1.0)


def test_transitions_without_intervals_warn_and_a_flat_curve_is_ok():
    values = [1.0] * 5 + [9.0] + [1.0] * 5
    _, untested = _judged_transitions(values, None)
    assert untested.verdict == "warn" and "ot.bootstrap" in untested.message
    flat = [1.0, 1.02, 0.99, 1.01, 1.0, 0.98]
    transitions, quiet = _judged_transitions(flat, np.stack([np.zeros(6), 2 * np.ones(6)]))
    assert transitions == [] and quiet.verdict == "ok"
    assert transition_checks({"depth_only": True}) == []


def test_lead_lag_sign_says_which_moves_first():
    drift = np.array([0.1, 0.1, 1.0, 0.1, 0.1, 0.1, 0.1])
    later = [0.0, 0.0, 0.0, 0.0, 0.8, 0.8, 0.8, 0.8]  # jumps in interval 3: one after drift
    earlier = [0.0, 0.0, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8]  # jumps in interval 1: one before
    leads, lags = phases.lead_lag(drift, later), phases.lead_lag(drift, earlier)
    assert leads is not None and lags is not None
    assert leads["lag_intervals"] == 1 and "leads" in leads["reading"]
    assert lags["lag_intervals"] == -1 and "lags" in lags["reading"]
