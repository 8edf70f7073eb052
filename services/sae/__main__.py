"""`python -m services.sae train --run RUN_ID --store URL [--layer L]` and `... detect`.

With `--layer L` one layer's SAE is trained (the workflow runs one pod per layer); without
it, every layer that `sae.layers` selects, one after the other, each under the stage
contract (own DONE marker, cache check and status object `status/sae-layer-LL.json`).

`detect` answers held-out questions with the final checkpoint and scores hallucinations
from the SAE features of every layer in `detect.layers` (status `status/detect.json`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from services.sae.plan import detect_layers, final_checkpoint, training_step
from shared import layout, stage_registry
from shared.spec import RunSpec, sae_layers
from shared.stage import Input, StageDef, stage_main
from shared.store import Store


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--layer",
        type=int,
        metavar="L",
        help="train only the SAE of hidden-state layer L (0 = embeddings; default: every "
        "layer in sae.layers)",
    )


def _inputs(args: argparse.Namespace, spec: RunSpec, store: Store) -> Sequence[Input]:
    """The extraction (it picks the checkpoint; source probe trains on it) and the checkpoint."""
    step = training_step(store, args.run, spec.sae)
    return [
        Input(
            layout.extract_done_key(args.run, step),
            stage_registry.EXTRACT.command(args.run, args.store, step),
        ),
        Input(
            layout.checkpoint_done_key(args.run, step),
            stage_registry.TRAIN.command(args.run, args.store),
        ),
    ]


def _fan_out(args: argparse.Namespace, spec: RunSpec, store: Store) -> Sequence[argparse.Namespace]:
    return [argparse.Namespace(**{**vars(args), "layer": layer}) for layer in sae_layers(spec)]


TRAIN = StageDef(
    name=stage_registry.SAE.status_name,
    subcommand=stage_registry.SAE.subcommand,
    help="Train a sparse autoencoder per layer on the extracted hidden states.",
    run="services.sae.train:train_layer",
    done_key=lambda args, spec: layout.sae_done_key(args.run, args.layer),
    inputs=_inputs,
    spec_sections=("data", "sae"),
    add_arguments=_add_arguments,
    shard=lambda args: None if args.layer is None else f"layer-{args.layer:02d}",
    fan_out=_fan_out,
)


def _detect_inputs(args: argparse.Namespace, spec: RunSpec, store: Store) -> Sequence[Input]:
    """The final checkpoint, and the finished SAE of every tracked layer."""
    step = final_checkpoint(store, args.run, args.store)
    return [
        Input(
            layout.checkpoint_done_key(args.run, step),
            stage_registry.TRAIN.command(args.run, args.store),
        ),
        *(
            Input(
                layout.sae_done_key(args.run, layer),
                stage_registry.SAE.command(args.run, args.store, layer),
            )
            for layer in detect_layers(spec)
        ),
    ]


DETECT = StageDef(
    name=stage_registry.DETECT.status_name,
    subcommand=stage_registry.DETECT.subcommand,
    help="Answer held-out questions, track SAE feature hypotheses and score hallucinations.",
    run="services.sae.detect:run_detect",
    done_key=lambda args, spec: layout.detect_done_key(args.run),
    inputs=_detect_inputs,
    spec_sections=("data", "detect"),
)

if __name__ == "__main__":
    sys.exit(stage_main([TRAIN, DETECT], prog=stage_registry.SAE.program))
