"""What a workflow module hands to `driftlab submit`: the workflow and the specs it runs.

A workflow module (workflows/gpt2_medium.py, ...) is thin: it names its config and calls
one of the builders here. The specs travel with the workflow because they are uploaded to
the store (registering the runs) before Argo starts a pod that reads them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from hera.workflows import Workflow

from shared import layout
from shared.spec import RunSpec, load_spec
from shared.sweep import expand, load_sweep
from workflows.pipeline import Cluster, Images, Profile, build_sweep_workflow, build_workflow

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
#: Where cluster runs keep their artifacts unless --store or $DRIFTLAB_STORE says otherwise.
DEFAULT_CLUSTER_STORE = "s3://driftlab"
DEFAULT_SWEEP_PARALLELISM = 4


@dataclass(frozen=True)
class Submission:
    workflow: Workflow
    specs: dict[str, RunSpec]  # run id -> spec, registered in the store before submitting


class Builder(Protocol):
    def __call__(
        self,
        profile: Profile,
        *,
        store: str | None = None,
        images: Images | None = None,
        cluster: Cluster | None = None,
    ) -> Submission: ...


def cluster_store() -> str:
    return os.environ.get("DRIFTLAB_STORE", DEFAULT_CLUSTER_STORE)


def pipeline_builder(config: str | Path) -> Builder:
    """The builder of one run of `config` (a file name in configs/ or a path)."""
    path = Path(config) if Path(config).is_file() else CONFIGS / config

    def build(
        profile: Profile,
        *,
        store: str | None = None,
        images: Images | None = None,
        cluster: Cluster | None = None,
        run_id: str | None = None,
    ) -> Submission:
        spec = load_spec(path)
        run_id = run_id or layout.new_run_id(spec.run.name)
        workflow = build_workflow(
            spec,
            profile,
            images=images,
            store=store or cluster_store(),
            run_id=run_id,
            cluster=cluster,
        )
        return Submission(workflow, {run_id: spec})

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
        store: str | None = None,
        images: Images | None = None,
        cluster: Cluster | None = None,
    ) -> Submission:
        definition = load_sweep(sweep_path)
        specs = {layout.new_run_id(s.run.name): s for s in expand(load_spec(base_path), definition)}
        workflow = build_sweep_workflow(
            specs,
            definition.name,
            profile,
            images=images,
            store=store or cluster_store(),
            parallelism=parallelism,
            cluster=cluster,
        )
        return Submission(workflow, specs)

    return build
