"""The evaluator's part of the quality verdicts: its own checks, and everyone's gathered.

Each stage judged its own output into its status object (shared/quality.py); the report
collects them all, worst first, so its banner and `report.json["quality"]` are the one place
a researcher looks to know which numbers to trust. The evaluator adds the checks of what
it computes itself (the HMM of the training dynamics) and one for every stage whose status
still says "running": the evaluator runs after every other stage, so such a stage was
killed mid-work (its process gone, its results missing from the report), and the report
calls it stale rather than presenting the run as whole.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from shared import layout
from shared.errors import DriftlabError
from shared.quality import QualityCheck, at_most
from shared.store import Store

STAGE = "evaluate"
#: Free parameters per observed value of the chosen HMM: at 1 it can fit anything...
PARAMS_PER_VALUE_FAIL = 1.0
#: ...and with fewer than two values per parameter its states are barely constrained.
PARAMS_PER_VALUE_WARN = 0.5


def hmm_checks(hmm: Mapping[str, Any] | None) -> list[QualityCheck]:
    """Is the chosen HMM constrained by the data: free parameters against observed values?"""
    if not hmm:
        return []
    chosen = next(
        (c for c in hmm.get("candidates", []) if c.get("n_states") == hmm.get("n_states")), None
    )
    runs = hmm.get("runs") or {}
    rows = sum(len(run.get("steps", [])) for run in runs.values())
    values = rows * len(hmm.get("features", []))
    if chosen is None or values == 0:
        return []
    n_params = int(chosen["n_params"])
    return [
        at_most(
            STAGE,
            "hmm_parameters_per_value",
            n_params / values,
            what=f"free parameters per observed value of the {hmm['n_states']}-state HMM ({n_params} "
            f"parameters, {rows} rows x {len(hmm['features'])} features)",
            fix="record dynamics more often (train.dynamics_every), fit fewer states "
            "(hmm.max_components) or fewer features (hmm.features), or fit several runs "
            "together with `driftlab hmm --runs ...`",
            fail=PARAMS_PER_VALUE_FAIL,
            warn=PARAMS_PER_VALUE_WARN,
        )
    ]


def stale_checks(store: Store, run_id: str) -> list[QualityCheck]:
    """A warning for each other stage's status left at "running": stale since it started."""
    checks = []
    for key in store.list(layout.status_prefix(run_id)):
        try:
            status = store.get_json(key) if key.endswith(".json") else None
        except DriftlabError:
            continue  # damaged: `driftlab runs` lists it as such
        if not isinstance(status, dict) or status.get("state") != "running":
            continue
        if status.get("stage") == STAGE:
            continue
        checks.append(
            QualityCheck(
                stage=str(status.get("stage")),
                check="finished",
                value=None,
                threshold=None,
                verdict="warn",
                message=f"stale (last seen {status.get('started_at', 'at an unknown time')}): "
                "its status says running, but the stage was killed before it finished, so "
                "its results are missing from this report; rerun "
                f"`driftlab run SPEC.yaml --run {run_id} --store {store.url}` (finished "
                "stages are cached)",
                shard=status.get("shard"),
            )
        )
    return checks
