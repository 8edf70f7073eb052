"""An HMM analysis in the store: every model, the analysis, the state graph and the curves.

Apart from `hmm.py` (the fit) so that the pictures (`hmm_plots`), which draw an analysis,
and the fit do not import each other.
"""

from __future__ import annotations

from typing import Any

from hmmlearn.hmm import GaussianHMM

from services.evaluator.hmm import (
    ANALYSIS_NAME,
    CURVES_NAME,
    GRAPH_NAME,
    MODEL_NAME,
    HMMAnalysis,
    candidate_model_name,
)
from services.evaluator.hmm_models import model_from_tensors, model_tensors
from services.evaluator.hmm_plots import state_curves_png, state_graph_svg
from shared import layout
from shared.store import Store

__all__ = ["load_ensemble", "load_hmm_model", "save_hmm"]


def save_hmm(store: Store, run_id: str, analysis: HMMAnalysis) -> list[str]:
    """Write the analysis, every model, the graph and the curves; returns the keys written."""
    keys = []

    def key(name: str) -> str:
        keys.append(layout.evaluate_hmm_key(run_id, name))
        return keys[-1]

    for candidate in analysis.candidates:
        store.put_tensors(
            key(candidate_model_name(candidate.n_states)), *model_tensors(candidate.model)
        )
    store.put_tensors(key(MODEL_NAME), *model_tensors(analysis.model))
    store.put_text(key(GRAPH_NAME), state_graph_svg(analysis))
    store.put_bytes(key(CURVES_NAME), state_curves_png(analysis, store))
    store.put_json(key(ANALYSIS_NAME), analysis.to_json())
    return keys


def load_ensemble(store: Store, run_id: str) -> tuple[dict[str, Any], str, bytes] | None:
    """The analysis, graph and curves `driftlab hmm` saved for this run and others, if any.

    A fit over a sweep's runs sees every seed's phases and is the better model of this
    run's; a report rebuilt after `driftlab hmm` shows it instead of refitting the run
    alone over it. A single-run analysis is not returned: it is the evaluator's own, and
    refitting it is cheap and always current.
    """
    if not store.exists(layout.evaluate_hmm_key(run_id, ANALYSIS_NAME)):
        return None
    body: dict[str, Any] = store.get_json(layout.evaluate_hmm_key(run_id, ANALYSIS_NAME))
    runs = body.get("runs", {})
    if len(runs) < 2 or run_id not in runs:
        return None
    svg = store.get_text(layout.evaluate_hmm_key(run_id, GRAPH_NAME))
    png = store.get_bytes(layout.evaluate_hmm_key(run_id, CURVES_NAME))
    return body, svg, png


def load_hmm_model(store: Store, run_id: str, name: str = MODEL_NAME) -> GaussianHMM:
    """A saved model (the selected one by default, or `candidate_model_name(k)`)."""
    return model_from_tensors(*store.get_tensors(layout.evaluate_hmm_key(run_id, name)))
