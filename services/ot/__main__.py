"""`python -m services.ot --run RUN_ID --store URL`: OT drift, phases and plots of one run.

Reads every extracted checkpoint (one job, not fanned out: drift compares all checkpoints
and layers with each other) and writes `ot/drift.safetensors`, `ot/phases.json` and
`ot/*.png`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from shared import layout, stage_registry
from shared.spec import RunSpec
from shared.stage import Input, StageDef, stage_main
from shared.steps import selected_steps
from shared.store import Store


def _inputs(args: argparse.Namespace, spec: RunSpec, store: Store) -> Sequence[Input]:
    """The extraction of every checkpoint the extractor is meant to cover."""
    return [
        Input(
            layout.extract_done_key(args.run, step),
            stage_registry.EXTRACT.command(args.run, args.store, step),
        )
        for step in selected_steps(store, args.run, spec, args.store)
    ]


OT = StageDef(
    name=stage_registry.OT.status_name,
    help="Optimal-transport drift between layers and checkpoints, change points and plots.",
    run="services.ot.stage:run_ot",
    done_key=lambda args, spec: layout.ot_done_key(args.run),
    inputs=_inputs,
    spec_sections=("extract", "ot"),
)

if __name__ == "__main__":
    sys.exit(stage_main(OT, prog=stage_registry.OT.program))
