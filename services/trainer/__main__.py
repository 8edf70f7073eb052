"""`python -m services.trainer --run RUN_ID --store URL`: train and checkpoint one run.

Several GPUs (train.strategy ddp or fsdp): `torchrun --nproc_per_node=N -m services.trainer
-- --run RUN_ID --store URL`; the `--` keeps torchrun from reading `--run` as an
abbreviation of its own `--run-path`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from shared import layout, stage_registry
from shared.spec import RunSpec
from shared.stage import Input, StageDef, stage_main
from shared.steps import complete_steps
from shared.store import Store


def _inputs(args: argparse.Namespace, spec: RunSpec, store: Store) -> Sequence[Input]:
    """A run continuing another run's training depends on that checkpoint."""
    point = spec.train.resume_point()
    if point is None:
        return []
    run_id, step = point
    if step is None:
        steps = complete_steps(store, run_id)
        step = steps[-1] if steps else 0
    return [
        Input(
            layout.checkpoint_done_key(run_id, step),
            stage_registry.TRAIN.command(run_id, args.store),
        )
    ]


TRAIN = StageDef(
    name=stage_registry.TRAIN.status_name,
    help="Train (or load) a GPT-2-style model and write checkpoints with training dynamics.",
    run="services.trainer.loop:train",
    done_key=lambda args, spec: layout.train_done_key(args.run),
    inputs=_inputs,
    spec_sections=("model", "data", "train"),
)

if __name__ == "__main__":
    sys.exit(stage_main(TRAIN, prog=stage_registry.TRAIN.program))
