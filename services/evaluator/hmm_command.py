"""`driftlab hmm` (its parser is in shared/cli.py): one HMM of training phases over a set of runs or a sweep.

The HMM settings are the `hmm` section of the first run's spec (the runs of a sweep share
it), with command-line overrides for the usual knobs. The analysis is saved under
`evaluate/hmm/` of every run it covers, so each run's report finds the states of the
ensemble it was analysed with.
"""

from __future__ import annotations

import argparse
import sys

from shared import layout
from shared.errors import DriftlabError


def sweep_run_ids(store_url: str, sweep: str) -> list[str]:
    """The runs of a sweep, by their `run.tags.sweep` tag, in sweep order."""
    from shared.registry import load_rows, query
    from shared.store import open_store

    tagged = [r for r in load_rows(open_store(store_url)) if r.get("run.tags.sweep") == sweep]
    rows = query(tagged, sort_by=("created",))
    if not rows:
        raise DriftlabError(
            f"hmm: no run in {store_url} is tagged run.tags.sweep={sweep}; see "
            "`driftlab runs --show run.tags.sweep`"
        )
    return [str(row["run_id"]) for row in rows]


def cmd_hmm(args: argparse.Namespace) -> int:
    from services.evaluator.hmm import ANALYSIS_NAME, run_hmm
    from services.evaluator.hmm_store import save_hmm
    from shared.stage import load_run_spec
    from shared.store import open_store

    store = open_store(args.store)
    run_ids = args.runs if args.runs else sweep_run_ids(args.store, args.sweep)
    for run_id in run_ids:
        layout.validate_run_id(run_id)
    overrides = {
        name: value
        for name, value in (
            ("max_components", args.max_components),
            ("restarts", args.restarts),
            ("select_by", args.select_by),
        )
        if value is not None
    }
    base = load_run_spec(store, run_ids[0]).hmm
    try:
        spec = base.model_validate({**base.model_dump(), **overrides})
    except ValueError as err:
        raise DriftlabError(f"hmm: bad override ({str(err).splitlines()[-1].strip()})") from None
    analysis = run_hmm(store, run_ids, spec)
    print(f"{'states':>6} {'loglik_train':>13} {'loglik_heldout':>15} {'aic':>11} {'bic':>11}")
    for c in analysis.candidates:
        mark = " *" if c.n_states == analysis.n_states else ""
        print(
            f"{c.n_states:>6} {c.loglik_train:>13.2f} {c.loglik_heldout:>15.2f} "
            f"{c.aic:>11.2f} {c.bic:>11.2f}{mark}"
        )
    print(f"selected {analysis.n_states} states by {spec.select_by}; {analysis.split.describe()}")
    for run_id, steps in analysis.state_changes().items():
        print(f"{run_id}: state changes at steps {steps or 'none'}")
    for note in analysis.notes:
        print(f"note: {note}", file=sys.stderr)
    for run_id in run_ids:
        keys = save_hmm(store, run_id, analysis)
        print(store.url_of(layout.evaluate_hmm_key(run_id, ANALYSIS_NAME)), f"({len(keys)} files)")
    return 0
