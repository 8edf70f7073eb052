"""`python -m services.extractor --run RUN_ID --store URL [--step N]`.

With `--step N` one checkpoint is extracted (the workflow runs one pod per checkpoint);
without it, every finished checkpoint selected by `extract.steps`, one after the other,
each under the stage contract, so those already extracted are cached.
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


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--step",
        type=int,
        metavar="N",
        help="extract only checkpoint step N (default: every finished checkpoint)",
    )


def _inputs(args: argparse.Namespace, spec: RunSpec, store: Store) -> Sequence[Input]:
    return [
        Input(
            layout.checkpoint_done_key(args.run, args.step),
            stage_registry.TRAIN.command(args.run, args.store),
        )
    ]


def _fan_out(args: argparse.Namespace, spec: RunSpec, store: Store) -> Sequence[argparse.Namespace]:
    return [
        argparse.Namespace(**{**vars(args), "step": s})
        for s in selected_steps(store, args.run, spec, args.store)
    ]


EXTRACT = StageDef(
    name=stage_registry.EXTRACT.status_name,
    help="Store every layer's hidden states for a fixed probe set at each checkpoint.",
    run="services.extractor.extract:extract_step",
    done_key=lambda args, spec: layout.extract_done_key(args.run, args.step),
    inputs=_inputs,
    spec_sections=("data", "extract"),
    add_arguments=_add_arguments,
    shard=lambda args: None if args.step is None else f"step-{args.step}",
    fan_out=_fan_out,
)

if __name__ == "__main__":
    sys.exit(stage_main(EXTRACT, prog=stage_registry.EXTRACT.program))
