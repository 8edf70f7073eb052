"""The stage registry: every task of a run's pipeline, defined once.

A stage is a container that runs one command line against the store. Everything else that
knows about stages derives from this table: the stage contract's names (`StageDef` in each
service's `__main__`), the Argo templates and the DAG (`workflows/pipeline.py`), the local
runner (which only runs what the DAG says), the "run this first" hints of error messages,
and the status names the store and `driftlab runs` use. Adding or renaming a stage is an
edit here plus the service's own code.

Orchestration knows a stage only by its command line (`entry` + `--run --store` + its
shard option); it never imports a service.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "BOOKKEEPING",
    "CHECKPOINTS",
    "DETECT",
    "EVALUATE",
    "EXTRACT",
    "FINISH",
    "OT",
    "PIPELINE",
    "SAE",
    "STATUS_NAMES",
    "TRAIN",
    "Stage",
    "by_status",
    "by_task",
]

_HOUR = 3600

#: Where a fan-out stage's items come from: the checkpoint steps the `list-checkpoints`
#: task prints at run time, or the SAE layers the spec selects when the graph is built.
ItemSource = Literal["checkpoints", "layers"]


@dataclass(frozen=True)
class Stage:
    """One task of the pipeline: its command line and how its pods are placed."""

    #: Template and task name, as the Argo UI and `driftlab run`'s table show it.
    task: str
    #: Name of its status objects and DONE markers (`status/<status>[-<shard>].json`);
    #: None for bookkeeping tasks, which write no status.
    status: str | None
    #: Image `driftlab-<service>`.
    service: str
    #: `python -m <module> [<subcommand>]` starts it.
    module: str
    subcommand: str | None
    #: CLI option (and Argo input parameter) of a fan-out stage: one task per item.
    shard: Literal["step", "layer"] | None
    items: ItemSource | None
    #: Section of `spec.resources` its pods request; None: a few seconds of bookkeeping.
    resources: str | None
    #: Runs on GPU nodes in the gpu profile.
    gpu: bool
    deadline_s: int
    #: Tasks that must have succeeded first. A task the spec switches off (detect) is
    #: replaced by its own dependencies, so its dependents still wait for those.
    after: tuple[str, ...] = ()
    #: Takes `--device` (bookkeeping tasks only read and write small objects).
    device: bool = True

    @property
    def status_name(self) -> str:
        """The status name of a stage of the contract; bookkeeping tasks have none."""
        if self.status is None:
            raise ValueError(f"{self.task} is a bookkeeping task: it writes no status")
        return self.status

    @property
    def program(self) -> str:
        """`python -m <module>`: the name its usage and error lines start with."""
        return f"python -m {self.module}"

    @property
    def entry(self) -> tuple[str, ...]:
        """The command that starts it, without arguments."""
        sub = (self.subcommand,) if self.subcommand else ()
        return ("python", "-m", self.module, *sub)

    def command(self, run_id: str, store: str, shard: int | str | None = None) -> str:
        """The shell command that runs it for one run (and one shard, if given).

        What every "run this first" hint prints, so a user can paste it.
        """
        args = [*self.entry, "--run", run_id, "--store", store]
        if shard is not None and self.shard is not None:
            args += [f"--{self.shard}", str(shard)]
        return shlex.join(args)


TRAIN = Stage(
    "train", "train", "trainer", "services.trainer", None, None, None, "train", True, 48 * _HOUR
)
#: Prints the JSON list of checkpoint steps to extract: the extract fan-out's items. It only
#: reads a few small objects, so it runs in the trainer's image.
CHECKPOINTS = Stage(
    "list-checkpoints", None, "trainer", "shared.bookkeeping", "checkpoints", None, None, None,
    False, 600, after=("train",), device=False,
)  # fmt: skip
EXTRACT = Stage(
    "extract", "extract", "extractor", "services.extractor", None, "step", "checkpoints",
    "extract", True, 6 * _HOUR, after=("list-checkpoints",),
)  # fmt: skip
OT = Stage("ot", "ot", "ot", "services.ot", None, None, None, "ot", False, 12 * _HOUR, ("extract",))
SAE = Stage(
    "sae-train", "sae", "sae", "services.sae", "train", "layer", "layers", "sae", True,
    24 * _HOUR, after=("extract",),
)  # fmt: skip
#: On a GPU: it generates detect.samples answers and runs each through every layer's SAE.
DETECT = Stage(
    "detect", "detect", "sae", "services.sae", "detect", None, None, "detect", True,
    12 * _HOUR, after=("sae-train",),
)  # fmt: skip
EVALUATE = Stage(
    "evaluate", "evaluate", "evaluator", "services.evaluator", None, None, None, "evaluate",
    False, 6 * _HOUR, after=("ot", "detect"),
)  # fmt: skip
#: The workflow's exit handler: records the final status and clears Pushgateway groups.
FINISH = Stage(
    "finish", None, "trainer", "shared.bookkeeping", "finish", None, None, None, False, 600,
    device=False,
)  # fmt: skip

#: The pipeline's tasks in the order they first run (the exit handler is not one of them).
PIPELINE: tuple[Stage, ...] = (TRAIN, CHECKPOINTS, EXTRACT, OT, SAE, DETECT, EVALUATE)
#: The tasks that are not stages of the contract: they write no status.
BOOKKEEPING: tuple[Stage, ...] = (CHECKPOINTS, FINISH)
#: Status names of the stages, in pipeline order (`status/<name>*.json`).
STATUS_NAMES: tuple[str, ...] = tuple(s.status for s in PIPELINE if s.status is not None)


def by_task(task: str) -> Stage:
    """The stage of a task or template name (`sae-train` -> SAE)."""
    for stage in (*PIPELINE, FINISH):
        if stage.task == task:
            return stage
    raise KeyError(f"no stage has the task name {task!r}")


def by_status(status: str) -> Stage:
    """The stage whose status objects are named `status` (`sae` -> SAE)."""
    for stage in PIPELINE:
        if stage.status == status:
            return stage
    raise KeyError(f"no stage has the status name {status!r}")
