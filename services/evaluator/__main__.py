"""`python -m services.evaluator --run RUN_ID --store URL`: the run's report."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from shared import layout, stage_registry
from shared.spec import RunSpec, model_sizes
from shared.stage import Input, StageDef, stage_main
from shared.store import Store


def _inputs(args: argparse.Namespace, spec: RunSpec, store: Store) -> Sequence[Input]:
    """Training is required; the optional stages count once done, so the cache notices them.

    A report built before OT, SAE or detection finished is rebuilt when they do, because
    their DONE markers then enter the digests of this stage's own marker.
    """
    run = args.run
    stages = stage_registry
    required = [Input(layout.train_done_key(run), stages.TRAIN.command(run, args.store))]
    optional = [
        Input(layout.ot_done_key(run), stages.OT.command(run, args.store)),
        Input(layout.detect_done_key(run), stages.DETECT.command(run, args.store)),
    ] + [
        Input(layout.sae_done_key(run, layer), stages.SAE.command(run, args.store))
        for layer in range(model_sizes(spec).n_layer + 1)
    ]
    return required + [item for item in optional if store.exists(item.done_key)]


EVALUATE = StageDef(
    name=stage_registry.EVALUATE.status_name,
    help="Score the detector, model training phases, and write the run's report.",
    run="services.evaluator.stage:evaluate",
    done_key=lambda args, spec: layout.evaluate_done_key(args.run),
    inputs=_inputs,
    spec_sections=("evaluate", "hmm"),
)

if __name__ == "__main__":
    sys.exit(stage_main(EVALUATE, prog=stage_registry.EVALUATE.program))
