"""The HMM of training dynamics: recovery, gradients, split, storage, and `driftlab hmm`."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
from hmmlearn.hmm import GaussianHMM
from scipy import stats

from cli.main import main
from services.evaluator.hmm import (
    ANALYSIS_NAME,
    CURVES_NAME,
    GRAPH_NAME,
    MODEL_NAME,
    candidate_model_name,
    run_hmm,
)
from services.evaluator.hmm_curves import Curve, convergence_step
from services.evaluator.hmm_data import HMMError, choose_split, zscore_params
from services.evaluator.hmm_detour import detour_analysis
from services.evaluator.hmm_importance import (
    NEGLIGIBLE_IMPORTANCE,
    filtered_log_posteriors,
    posterior_gradients,
)
from services.evaluator.hmm_models import fit_best, model_from_tensors, model_tensors, n_parameters
from services.evaluator.hmm_store import load_hmm_model, save_hmm
from shared import layout
from shared.errors import InputMissing
from shared.spec import HMMSpec, RunSpec, apply_overrides, spec_to_yaml
from shared.store import LocalStore

FEATURES = ["l1", "l2", "trace"]
TRUE_MEANS = np.array([[0.0, 0.0, 0.0], [6.0, -4.0, 2.0], [-3.0, 5.0, 6.0]])


def _true_model() -> GaussianHMM:
    model = GaussianHMM(n_components=3, covariance_type="diag")
    model.n_features = 3
    model.startprob_ = np.array([1.0, 0.0, 0.0])
    model.transmat_ = np.array([[0.85, 0.1, 0.05], [0.05, 0.85, 0.1], [0.1, 0.05, 0.85]])
    model.means_ = TRUE_MEANS
    model.covars_ = np.full((3, 3), 0.6)
    return model


def _sample_runs(n_runs: int, length: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """(observations, true states) per run, kept when each state holds 28-39% of the run.

    Runs are z-scored one by one, so a run that spends most of its time in one state has
    its states shifted against another run's; real seeds of one training setup spend
    similar shares of time per phase, and so do these.
    """
    model = _true_model()
    runs: list[tuple[np.ndarray, np.ndarray]] = []
    rng = np.random.default_rng(seed)
    while len(runs) < n_runs:
        x, z = model.sample(length, random_state=int(rng.integers(2**31)))
        shares = np.bincount(z, minlength=3) / length
        if shares.min() >= 0.28 and shares.max() <= 0.39:
            runs.append((x, z))
    return runs


def _write_dynamics(store: LocalStore, run_id: str, x: np.ndarray, every: int = 10) -> None:
    """Rows in the trainer's format: {"step": N, <feature>: value, ...} per line."""
    rows = [
        {"step": i * every, **dict(zip(FEATURES, map(float, row), strict=True)), "grad_norm": 1.0}
        for i, row in enumerate(x)
    ]
    store.put_text(layout.train_dynamics_key(run_id), "".join(json.dumps(r) + "\n" for r in rows))


def _spec(**changes: object) -> HMMSpec:
    return HMMSpec.model_validate(
        {"features": FEATURES, "max_components": 5, "restarts": 3, "n_iter": 60, **changes}
    )


def _best_relabelling_accuracy(decoded: np.ndarray, truth: np.ndarray) -> float:
    return max(
        float(np.mean(np.asarray(perm)[decoded] == truth))
        for perm in itertools.permutations(range(3))
    )


@pytest.fixture(scope="module")
def recovered(tmp_path_factory):
    store = LocalStore(tmp_path_factory.mktemp("hmm-store"))
    runs = _sample_runs(6, 150)
    ids = [f"synthetic-{i}" for i in range(len(runs))]
    for run_id, (x, _) in zip(ids, runs, strict=True):
        _write_dynamics(store, run_id, x)
    analysis = run_hmm(store, ids, _spec())
    return store, ids, runs, analysis


def test_bic_picks_three_states_and_paths_match_up_to_relabelling(recovered):
    _, ids, runs, analysis = recovered
    bics = {c.n_states: c.bic for c in analysis.candidates}
    assert analysis.n_states == 3 and min(bics, key=bics.__getitem__) == 3
    assert [c.n_states for c in analysis.candidates] == [1, 2, 3, 4, 5]
    decoded = np.concatenate([analysis.states[r] for r in ids])
    truth = np.concatenate([z for _, z in runs])
    assert _best_relabelling_accuracy(decoded, truth) > 0.97
    assert len({int(analysis.states[r][0]) for r in ids}) == 1  # the true start is one state
    # states are numbered by when they occur: mean relative time grows with the label
    times = np.concatenate([np.linspace(0, 1, 150) for _ in ids])
    mean_time = [times[decoded == s].mean() for s in range(3)]
    assert mean_time == sorted(mean_time)


def test_analysis_json_has_the_promised_shape(recovered):
    _, ids, _, analysis = recovered
    body = json.loads(json.dumps(analysis.to_json()))  # plain JSON, no numpy left
    assert body["n_states"] == 3 and body["selected_by"] == "bic"
    assert body["features"] == FEATURES
    assert set(body["candidates"][0]) >= {
        "n_states",
        "loglik_train",
        "loglik_heldout",
        "aic",
        "bic",
    }
    run = body["runs"][ids[0]]
    assert run["steps"][:3] == [0, 10, 20] and len(run["states"]) == len(run["steps"]) == 150
    path = np.array(run["states"])
    expected = [run["steps"][t] for t in range(1, 150) if path[t] != path[t - 1]]
    assert body["state_changes"][ids[0]] == expected
    assert body["transitions"], "sampled paths change state"
    for edge in body["transitions"]:
        assert edge["from"] != edge["to"] and edge["count"] >= 1
        assert 0.0 < edge["probability"] < 1.0
        assert set(edge["importance"]) == set(FEATURES)
        # States this well separated saturate the posterior: gradients of ~1e-12 are
        # numerically zero and label nothing; whatever is listed is ranked and non-zero.
        names = [name for name, _ in edge["top_features"]]
        assert set(names) <= set(FEATURES) and len(names) <= 3
        magnitudes = [abs(v) for _, v in edge["top_features"]]
        assert magnitudes == sorted(magnitudes, reverse=True)
        assert all(m > NEGLIGIBLE_IMPORTANCE for m in magnitudes)
    # 6 runs but no loss curves: the detour analysis is absent and says why
    assert body["detour"] is None and any("curve" in n for n in body["notes"])


def test_information_criteria_use_the_parameter_count_of_each_covariance_type():
    x = np.random.default_rng(1).normal(size=(40, 4))
    # 3 states, 4 features: start 2, transitions 6, means 12, then the covariances.
    covariances = {"diag": 12, "full": 30, "spherical": 3, "tied": 10}
    for cov_type, n_cov in covariances.items():
        model = GaussianHMM(3, covariance_type=cov_type, n_iter=5, random_state=0).fit(x)
        n_params = 2 + 6 + 12 + n_cov
        assert n_parameters(model) == n_params
        loglik = model.score(x)
        assert model.aic(x) == pytest.approx(-2 * loglik + 2 * n_params)
        assert model.bic(x) == pytest.approx(-2 * loglik + n_params * math.log(40))
    one = GaussianHMM(1, covariance_type="diag", n_iter=5, random_state=0).fit(x)
    assert n_parameters(one) == 8  # one state: no start or transition freedom


def _random_model(cov_type: str, seed: int) -> GaussianHMM:
    x = np.random.default_rng(seed).normal(size=(60, 3)) + np.repeat(np.eye(3) * 3, 20, axis=0)
    spec = HMMSpec(restarts=1, n_iter=20, cov_type=cov_type)  # type: ignore[arg-type]
    return fit_best([x], 3, spec)


@pytest.mark.parametrize("cov_type", ["diag", "full", "spherical", "tied"])
def test_transition_importance_equals_finite_differences(cov_type):
    model = _random_model(cov_type, seed=3)
    model.startprob_ = np.array([0.5, 0.3, 0.2])  # a fit on one run starts surely in one state
    # between the states' means, so that posteriors are neither 0 nor 1
    x = np.random.default_rng(4).normal(size=(9, 3)) + 1.0
    # the forward pass agrees with hmmlearn: forward-backward on a prefix is the filter
    filtered = np.exp(filtered_log_posteriors(model, x))
    for t in (0, 4, 8):
        np.testing.assert_allclose(filtered[t], model.predict_proba(x[: t + 1])[-1], atol=1e-9)
    grads = posterior_gradients(model, x)
    eps = 1e-5
    # the three least certain (t, state) pairs: where the gradient is far from zero
    order = np.argsort(np.abs(filtered - 0.5), axis=None)[:3]
    pairs = [
        (int(t), int(j)) for t, j in zip(*np.unravel_index(order, filtered.shape), strict=True)
    ]
    assert all(0.02 < filtered[t, j] < 0.98 for t, j in pairs)
    for t, j in pairs:
        numeric = np.empty(3)
        for f in range(3):
            up, down = x[: t + 1].copy(), x[: t + 1].copy()
            up[t, f] += eps
            down[t, f] -= eps
            numeric[f] = (
                math.log(model.predict_proba(up)[-1, j])
                - math.log(model.predict_proba(down)[-1, j])
            ) / (2 * eps)
        np.testing.assert_allclose(grads[t, j], numeric, rtol=1e-4, atol=1e-6)
        assert np.abs(grads[t, j]).max() > 1e-4  # a vector, not a collapsed zero


def test_heldout_split_is_runs_from_five_else_time():
    assert choose_split([f"r{i}" for i in range(4)], seed=0).kind == "time"
    five = choose_split([f"r{i}" for i in range(5)], seed=0)
    assert five.kind == "runs" and len(five.heldout_runs) == 1
    ten = [f"r{i}" for i in range(10)]
    split = choose_split(ten, seed=7)
    assert len(split.heldout_runs) == 2 and set(split.heldout_runs) <= set(ten)
    assert choose_split(list(reversed(ten)), seed=7) == split  # order of the ids is irrelevant
    assert len({choose_split(ten, seed=s).heldout_runs for s in range(20)}) > 1
    time_split = choose_split(["a"], seed=0)
    assert [time_split.head_length(n) for n in (2, 3, 10, 11)] == [1, 2, 8, 9]
    fitted = time_split.train_sequences([_obs("a", 10)])
    assert [len(z) for z in fitted] == [8]
    by_runs = split.train_sequences([_obs(r, 5) for r in ten])
    assert len(by_runs) == 8


def _obs(run_id: str, length: int):
    from services.evaluator.hmm_data import RunObservations

    raw = np.arange(length * 2, dtype=float).reshape(length, 2)
    return RunObservations(run_id, np.arange(length), raw, *zscore_params(raw))


def test_time_split_scores_the_tail_given_the_head(tmp_path):
    store = LocalStore(tmp_path)
    runs = _sample_runs(2, 60, seed=5)
    for i, (x, _) in enumerate(runs):
        _write_dynamics(store, f"run-{i}", x)
    analysis = run_hmm(store, ["run-0", "run-1"], _spec(max_components=3))
    assert analysis.split.kind == "time"
    for candidate in analysis.candidates:
        expected = sum(
            candidate.model.score(r.z) - candidate.model.score(r.z[:48]) for r in analysis.runs
        )
        assert candidate.loglik_heldout == pytest.approx(expected)
        fitted = np.concatenate([r.z[:48] for r in analysis.runs])
        assert candidate.loglik_train == pytest.approx(candidate.model.score(fitted, [48, 48]))
        assert candidate.bic == pytest.approx(
            -2 * candidate.loglik_train + candidate.n_params * math.log(96)
        )


def test_zscore_is_per_run_and_survives_constant_features():
    raw = np.array([[1.0, 5.0], [3.0, 5.0], [5.0, 5.0]])
    mean, std = zscore_params(raw)
    z = (raw - mean) / std
    np.testing.assert_allclose(z[:, 0], [-math.sqrt(1.5), 0.0, math.sqrt(1.5)])
    np.testing.assert_array_equal(z[:, 1], 0.0)


def test_saved_models_reload_and_decode_the_same(recovered, tmp_path):
    store, ids, _, analysis = recovered
    keys = save_hmm(store, ids[0], analysis)
    names = {k.rsplit("/", 1)[-1] for k in keys}
    assert names == {
        ANALYSIS_NAME, MODEL_NAME, GRAPH_NAME, CURVES_NAME,
        *(candidate_model_name(k) for k in range(1, 6)),
    }  # fmt: skip
    assert all(k.startswith(layout.evaluate_prefix(ids[0]) + "hmm/") for k in keys)
    reloaded = load_hmm_model(store, ids[0])
    for run in analysis.runs:
        np.testing.assert_array_equal(reloaded.predict(run.z), analysis.states[run.run_id])
        assert reloaded.score(run.z) == analysis.model.score(run.z)
    four = load_hmm_model(store, ids[0], candidate_model_name(4))
    np.testing.assert_array_equal(
        four.predict(analysis.runs[1].z), analysis.candidates[3].model.predict(analysis.runs[1].z)
    )
    stored = store.get_json(layout.evaluate_hmm_key(ids[0], ANALYSIS_NAME))
    assert stored["runs"][ids[2]]["states"] == analysis.states[ids[2]].tolist()
    svg = store.get_text(layout.evaluate_hmm_key(ids[0], GRAPH_NAME))
    assert svg.startswith("<svg") and svg.count("<circle") == 3 and "<path d=" in svg
    assert store.get_bytes(layout.evaluate_hmm_key(ids[0], CURVES_NAME))[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("cov_type", ["full", "spherical", "tied"])
def test_every_covariance_type_round_trips(cov_type):
    model = _random_model(cov_type, seed=8)
    again = model_from_tensors(*model_tensors(model))
    x = np.random.default_rng(9).normal(size=(30, 3)) * 2
    np.testing.assert_array_equal(again.predict(x), model.predict(x))
    assert again.score(x) == pytest.approx(model.score(x), abs=1e-9)


def test_detour_p_value_is_the_two_sided_point_biserial_test():
    # runs 0-2 visit state 2 and converge late; runs 3-5 skip it
    states = {f"r{i}": np.array([0, 2, 1] if i < 3 else [0, 1]) for i in range(6)}
    convergence = {"r0": 900, "r1": 800, "r2": 1000, "r3": 300, "r4": 500, "r5": 350}
    result = detour_analysis(states, 3, convergence, "eval_accuracy")
    assert result is not None
    (row,) = result["states"]  # states 0 and 1 are visited by every run: no test
    visited = np.array([1, 1, 1, 0, 0, 0], dtype=float)
    steps = np.array([900, 800, 1000, 300, 500, 350], dtype=float)
    r = np.corrcoef(visited, steps)[0, 1]
    t = r * math.sqrt(4 / (1 - r**2))
    assert row["state"] == 2 and row["visited_by"] == ["r0", "r1", "r2"]
    assert row["correlation"] == pytest.approx(r) and r > 0.9
    assert row["p_value"] == pytest.approx(2 * stats.t.sf(abs(t), df=4))
    flipped = detour_analysis(
        {k: v for k, v in states.items()}, 3, {k: 2000 - v for k, v in convergence.items()}, "x"
    )
    assert flipped is not None
    assert flipped["states"][0]["p_value"] == pytest.approx(row["p_value"])
    assert detour_analysis(dict(list(states.items())[:4]), 3, convergence, "x") is None


def test_convergence_step_is_ninety_percent_of_the_way():
    accuracy = Curve(
        "eval_accuracy", np.arange(0, 60, 10), np.array([0, 0.1, 0.2, 0.93, 1.0, 1.0]), True
    )
    assert convergence_step(accuracy) == 30
    loss = Curve("eval_loss", np.arange(5), np.array([5.0, 3.0, 1.5, 1.05, 1.0]), False)
    assert convergence_step(loss) == 3


def test_missing_dynamics_and_too_few_observations_are_clear_errors(tmp_path):
    store = LocalStore(tmp_path)
    with pytest.raises(InputMissing, match=r"python -m services\.trainer --run nodyn"):
        run_hmm(store, ["nodyn"], _spec())
    _write_dynamics(store, "short", np.random.default_rng(0).normal(size=(6, 3)))
    with pytest.raises(HMMError, match=r"5 observations to fit .* fewer than hmm.max_components=8"):
        run_hmm(store, ["short"], _spec(max_components=8))


def _register(store: LocalStore, run_id: str, sweep: str | None, seed: int) -> None:
    overrides: dict[str, object] = {"run.seed": seed, "hmm.features": FEATURES}
    if sweep:
        overrides["run.tags.sweep"] = sweep
    store.put_text(layout.spec_key(run_id), spec_to_yaml(apply_overrides(RunSpec(), overrides)))


def test_driftlab_hmm_on_a_sweep_writes_every_run(tmp_path, capsys):
    store = LocalStore(tmp_path)
    runs = _sample_runs(5, 50, seed=11)
    for i, (x, z) in enumerate(runs):
        run_id = f"seeds-20250101-00000{i}-abcdef"
        _register(store, run_id, "seeds", seed=i)
        _write_dynamics(store, run_id, x)
        losses = [
            {"step": s * 10, "loss": float(3.0 / (1 + s + 20 * (z[s] == 2)))} for s in range(50)
        ]
        store.put_text(
            layout.train_metrics_key(run_id), "".join(json.dumps(r) + "\n" for r in losses)
        )
    _register(store, "other-20250101-000000-abcdef", "elsewhere", seed=9)
    code = main(
        [
            "hmm",
            "--sweep",
            "seeds",
            "--store",
            str(tmp_path),
            "--max-components",
            "4",
            "--restarts",
            "1",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "selected 3 states by bic" in out and "1 whole run(s) held out" in out
    ids = [f"seeds-20250101-00000{i}-abcdef" for i in range(5)]
    for run_id in ids:
        body = store.get_json(layout.evaluate_hmm_key(run_id, ANALYSIS_NAME))
        assert sorted(body["runs"]) == ids
        assert store.exists(layout.evaluate_hmm_key(run_id, candidate_model_name(4)))
    assert not store.exists(layout.evaluate_hmm_key("other-20250101-000000-abcdef", ANALYSIS_NAME))
    detour = body["detour"]
    assert detour["metric"] == "train_loss" and set(detour["convergence_steps"]) == set(ids)


def test_driftlab_hmm_errors_are_one_line(tmp_path, capsys):
    store = LocalStore(tmp_path)
    _register(store, "lonely-20250101-000000-abcdef", None, seed=0)
    code = main(["hmm", "--runs", "lonely-20250101-000000-abcdef", "--store", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "has no training dynamics" in err and "python -m services.trainer" in err
    assert main(["hmm", "--sweep", "nothing", "--store", str(tmp_path)]) == 1
    assert "run.tags.sweep=nothing" in capsys.readouterr().err
