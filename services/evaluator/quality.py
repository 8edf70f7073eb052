"""The evaluator's part of the quality verdicts: its own checks, and everyone's gathered.

Each stage judged its own output into its status object (shared/quality.py); the report
collects them all, worst first, so its banner and `report.json["quality"]` are the one place
a researcher looks to know which numbers to trust. The evaluator adds the checks of what
it computes itself: the HMM of the training dynamics.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from shared.quality import QualityCheck, at_most

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
