"""Which checkpoints a run has, and which are extracted: read from DONE markers alone.

Every stage's `__main__` plans its shards and checks its inputs with these before anything
heavy is imported, so a cached stage (an Argo retry, a rerun of a finished run) exits in a
fraction of a second instead of paying for importing PyTorch.
"""

from __future__ import annotations

from shared import layout, stage_registry
from shared.errors import ArtifactNotFound, InputMissing
from shared.spec import RunSpec
from shared.store import Store


def complete_steps(store: Store, run_id: str) -> list[int]:
    """Steps whose checkpoint has its DONE marker, ascending."""
    steps = set()
    for key in store.list(layout.checkpoints_prefix(run_id)):
        if key.endswith("/DONE"):
            step = layout.parse_checkpoint_step(key)
            if step is not None:
                steps.add(step)
    return sorted(steps)


def extracted_steps(store: Store, run_id: str) -> list[int]:
    """Checkpoint steps whose extraction is complete (has DONE), ascending."""
    steps = set()
    for name in store.list_dirs(layout.run_prefix(run_id) + "extract/"):
        if name.startswith("step-") and name[5:].isdigit():
            step = int(name[5:])
            if store.exists(layout.extract_done_key(run_id, step)):
                steps.add(step)
    return sorted(steps)


def selected_steps(store: Store, run_id: str, spec: RunSpec, store_arg: str) -> list[int]:
    """The complete checkpoints that `extract.steps` selects: the run's time axis.

    A step the spec names that has no complete checkpoint is an error rather than a
    silently shorter axis; so is a run with no checkpoint at all. `store_arg` is the
    --store the user gave, repeated in the command the message suggests.
    """
    chosen = spec.extract.steps
    steps = complete_steps(store, run_id)
    where = f"{store.url} ({layout.checkpoints_prefix(run_id)})"
    if chosen != "all":
        missing = [step for step in chosen if step not in steps]
        if missing:
            raise InputMissing(
                f"extract.steps {missing} have no complete checkpoint in {where} (there: "
                f"{steps or 'none'}); fix extract.steps or train further"
            )
        steps = [step for step in steps if step in chosen]
    if not steps:
        raise InputMissing(
            f"run {run_id} has no finished checkpoint in {where}; run "
            f"`{stage_registry.TRAIN.command(run_id, store_arg)}` first"
        )
    return steps


def eval_metrics(store: Store, run_id: str, steps: list[int]) -> dict[int, dict[str, float]]:
    """The numeric eval metrics each checkpoint's dynamics.json holds ({} where it has none).

    OT aligns drift with them and the evaluator plots them and dates convergence by them.
    """
    metrics: dict[int, dict[str, float]] = {}
    for step in steps:
        try:
            data = store.get_json(layout.checkpoint_dynamics_key(run_id, step))
        except ArtifactNotFound:
            data = {}
        evals = data.get("eval") if isinstance(data, dict) else None
        metrics[step] = {
            name: value
            for name, value in (evals if isinstance(evals, dict) else {}).items()
            if isinstance(value, int | float) and not isinstance(value, bool)
        }
    return metrics
