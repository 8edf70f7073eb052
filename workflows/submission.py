"""What a workflow module hands to `driftlab submit`: the workflow and the specs it runs.

A workflow module (workflows/gpt2_medium.py, ...) is thin: it names its config, makes one
of the builders here, and keeps a `preview` of its workflow for `hera generate yaml`. The
specs travel with the workflow because they are uploaded to the store (registering the
runs) before Argo starts a pod that reads them.

Importing a module has no side effect: its preview carries fixed run ids
(`<name>-20000101-000000-00000N`) and the store the chart installs by default; the run ids
of a submission are made when `driftlab submit` calls the builder.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from hera.workflows import Workflow

from shared import layout
from shared.spec import RunSpec, load_spec
from shared.sweep import expand, load_sweep
from workflows.pipeline import (
    Cluster,
    Images,
    Profile,
    WorkflowError,
    build_sweep_workflow,
    build_workflow,
)
from workflows.template_names import installed_refs

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
#: The store of a preview when $DRIFTLAB_STORE is unset: the chart's default `store.url`.
#: Only renders use it; `driftlab submit` needs its store said (never a guess).
PREVIEW_STORE = "s3://driftlab"
_PREVIEW_TIME = datetime(2000, 1, 1, tzinfo=UTC)
DEFAULT_SWEEP_PARALLELISM = 4

#: Names the run of one spec (the i-th of the workflow's runs).
RunIds = Callable[[RunSpec, int], str]


def new_run_ids(spec: RunSpec, index: int) -> str:
    """A fresh id per run: what a submission registers."""
    return layout.new_run_id(spec.run.name)


def preview_run_ids(spec: RunSpec, index: int) -> str:
    """A fixed id per run, so rendering a module twice gives the same text."""
    return layout.new_run_id(spec.run.name, now=_PREVIEW_TIME, token=f"{index:06d}")


@dataclass(frozen=True)
class Submission:
    workflow: Workflow
    specs: dict[str, RunSpec]  # run id -> spec, registered in the store before submitting
    #: Task -> the chart's WorkflowTemplate its tasks reference; None: templates inlined.
    refs: Mapping[str, str] | None = None


class Builder(Protocol):
    def __call__(
        self,
        profile: Profile,
        *,
        store: str,
        images: Images | None = None,
        cluster: Cluster | None = None,
        run_ids: RunIds = new_run_ids,
        installed: Collection[str] = (),
    ) -> Submission: ...


def preview(build: Builder) -> Workflow:
    """The gpu-profile workflow a module shows `hera generate yaml`, made without a run id.

    Its store is $DRIFTLAB_STORE or the chart's default; its run ids are fixed and not
    registered: submit with `driftlab submit`, which registers fresh ones.
    """
    store = os.environ.get("DRIFTLAB_STORE", PREVIEW_STORE)
    images = Images.from_environment()
    return build("gpu", store=store, images=images, run_ids=preview_run_ids).workflow


def pipeline_builder(config: str | Path) -> Builder:
    """The builder of one run of `config` (a file name in configs/ or a path)."""
    path = Path(config) if Path(config).is_file() else CONFIGS / config

    def build(
        profile: Profile,
        *,
        store: str,
        images: Images | None = None,
        cluster: Cluster | None = None,
        run_ids: RunIds = new_run_ids,
        installed: Collection[str] = (),
    ) -> Submission:
        spec = load_spec(path)
        run_id = run_ids(spec, 0)
        refs = installed_refs(spec, profile, installed)
        workflow = build_workflow(
            spec, profile, images=images, store=store, run_id=run_id, cluster=cluster, refs=refs
        )
        return Submission(workflow, {run_id: spec}, refs)

    return build


def sweep_builder(
    base: str | Path, sweep: str | Path, parallelism: int = DEFAULT_SWEEP_PARALLELISM
) -> Builder:
    """The builder of every run of a `driftlab sweep` expansion, `parallelism` at a time."""
    base_path = Path(base) if Path(base).is_file() else CONFIGS / base
    sweep_path = Path(sweep) if Path(sweep).is_file() else CONFIGS / "sweeps" / sweep

    def build(
        profile: Profile,
        *,
        store: str,
        images: Images | None = None,
        cluster: Cluster | None = None,
        run_ids: RunIds = new_run_ids,
        installed: Collection[str] = (),
    ) -> Submission:
        definition = load_sweep(sweep_path)
        points = expand(load_spec(base_path), definition)
        specs = {run_ids(spec, index): spec for index, spec in enumerate(points)}
        if len(specs) != len(points):
            raise WorkflowError(
                f"sweep {definition.name}: its {len(points)} runs need as many run ids; a "
                "sweep registers new runs, so submit it without --run"
            )
        refs = installed_refs(points[0], profile, installed)  # the points share resources
        workflow = build_sweep_workflow(
            specs,
            definition.name,
            profile,
            images=images,
            store=store,
            parallelism=parallelism,
            cluster=cluster,
            refs=refs,
        )
        return Submission(workflow, specs, refs)

    return build
