"""The one Argo graph of a run, built with Hera from a run spec and a profile.

Everything the cluster needs to know about a stage is its command line: this module knows
Argo (templates, retries, selectors, metrics) and nothing of the science. `driftlab run`
executes the very workflow built here (workflows/local/), so a local run proves the
commands Argo will run; only images, selectors and resources are ignored there.

Graph::

    train -> list-checkpoints -> extract (one task per checkpoint, withParam)
          -> ot, and sae-train (one task per layer, withItems)
          -> detect -> evaluate            (onExit: record the outcome, clear Pushgateway)

Profiles: `gpu` puts train, extract, sae-train and detect on GPU nodes (node selector,
the `nvidia.com/gpu` toleration and GPU limits) and lets every stage pick its device; `cpu`
is the fallback for clusters (and laptops) without GPUs: no selector, toleration or GPU
limit, `--device cpu` everywhere, and requests capped so a kind cluster can schedule them.

A fan-out with a cap (`ResourcesSpec.fan_out_limit`: in the gpu profile by default, as
many pods as `resources.gpu_budget` GPUs hold) runs inside its own DAG template,
`<task>-fan-out`, whose Argo `parallelism` is the cap; its task in the pipeline keeps the
stage's name, so dependencies read the same.

Stage tasks run inline templates, or, given `refs` (task -> WorkflowTemplate name, see
workflows/template_names.py), `templateRef`s to the chart's versioned WorkflowTemplates.

Every pod, in both profiles, runs as the images' non-root user with RuntimeDefault seccomp,
no privilege escalation, every capability dropped and a read-only root filesystem; /tmp is
an emptyDir so the libraries that write scratch files there still can. The chart's
WorkflowTemplates (deploy/workflow_templates.py) are built from the same Workflow, so
`driftlab submit` and a template started by name run under the same restrictions.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, get_args

from hera.workflows import (
    DAG,
    Container,
    Counter,
    EmptyDirVolume,
    Env,
    Gauge,
    Label,
    Parameter,
    Resources,
    RetryStrategy,
    SecretEnv,
    Task,
    Workflow,
)
from hera.workflows.models import (
    Backoff,
    Capabilities,
    IntOrString,
    Metadata,
    PodGC,
    PodSecurityContext,
    SeccompProfile,
    SecurityContext,
    TemplateRef,
    Toleration,
    TTLStrategy,
)
from kubernetes.utils import parse_quantity

from shared import layout, stage_registry
from shared.errors import DriftlabError
from shared.lease import ORCHESTRATED_ENV
from shared.spec import ResourcesSpec, RunSpec, sae_layers
from shared.stage_registry import Stage

Profile = Literal["gpu", "cpu"]
PROFILES: tuple[str, ...] = get_args(Profile)

APP_LABEL = "app.kubernetes.io/name"
RUN_LABEL = "driftlab.io/run-id"
SWEEP_LABEL = "driftlab.io/sweep"
GPU_RESOURCE = "nvidia.com/gpu"
DEFAULT_GPU_NODE_SELECTOR: Mapping[str, str] = {"nvidia.com/gpu.present": "true"}
# Laptop-sized ceilings of the cpu profile's requests; limits keep the spec's memory, so a
# pod may still grow to what the spec asks for when the node has it.
CPU_PROFILE_MAX_CPU = "1"
CPU_PROFILE_MAX_MEMORY = "2Gi"
RETRY_LIMIT = 2
ENTRYPOINT = "pipeline"
EXIT_HANDLER = stage_registry.FINISH.task
# USER of deploy/docker/base.Dockerfile: numeric, so the kubelet can check runAsNonRoot.
IMAGE_UID = 10001
TMP_VOLUME = "tmp"
#: Name suffix of the DAG template that caps a fan-out's pods at once.
FAN_OUT_SUFFIX = "fan-out"
_HOUR = 3600


class WorkflowError(DriftlabError):
    """A workflow that cannot be built from what it was given."""

    exit_code = 2


@dataclass(frozen=True)
class Images:
    """Where the stage images live: `<registry>/driftlab-<service>:<tag>`."""

    registry: str = "driftlab"
    tag: str = "latest"
    pull_policy: str = "IfNotPresent"

    @classmethod
    def from_environment(cls) -> Images:
        """`$DRIFTLAB_REGISTRY` and `$DRIFTLAB_IMAGE_TAG` override the defaults."""
        return cls(
            registry=os.environ.get("DRIFTLAB_REGISTRY", cls.registry),
            tag=os.environ.get("DRIFTLAB_IMAGE_TAG", cls.tag),
        )

    def image(self, service: str) -> str:
        return f"{self.registry.rstrip('/')}/driftlab-{service}:{self.tag}"


@dataclass(frozen=True)
class Cluster:
    """What pods are told about the cluster: services, the credentials' Secret, GPU nodes.

    An empty `s3_endpoint` or `pushgateway` leaves the variable out of the pods (a local
    run on a folder store, no Pushgateway). Credentials only ever travel as secretKeyRef.
    """

    namespace: str = "driftlab"
    service_account: str = "driftlab-workflow"
    s3_endpoint: str = "http://minio:9000"
    s3_secret: str = "driftlab-s3"
    pushgateway: str = "http://pushgateway:9091"
    gpu_node_selector: Mapping[str, str] = field(
        default_factory=lambda: dict(DEFAULT_GPU_NODE_SELECTOR)
    )

    @classmethod
    def local(cls) -> Cluster:
        """This machine: the S3 endpoint and Pushgateway of the current environment."""
        return cls(
            s3_endpoint=os.environ.get("DRIFTLAB_S3_ENDPOINT", ""),
            pushgateway=os.environ.get("DRIFTLAB_PUSHGATEWAY", ""),
        )


GPU_STAGES = tuple(s.task for s in stage_registry.PIPELINE if s.gpu)
STAGE_TASKS = tuple(s.task for s in stage_registry.PIPELINE)


def build_workflow(
    spec: RunSpec,
    profile: Profile,
    *,
    images: Images | None = None,
    store: str,
    run_id: str | None = None,
    cluster: Cluster | None = None,
    refs: Mapping[str, str] | None = None,
) -> Workflow:
    """The workflow of one run; `run_id` defaults to a fresh id from `run.name`.

    The workflow is named after the run, so one run is one workflow and the Argo UI, the
    store and `driftlab runs` all say the same name. With `refs`, stage tasks reference
    those WorkflowTemplates instead of inlining their templates.
    """
    run_id = layout.validate_run_id(run_id or layout.new_run_id(spec.run.name))
    images = images or Images()
    cluster = cluster or Cluster()
    labels = {APP_LABEL: "driftlab", RUN_LABEL: run_id}
    with _workflow_shell(run_id, store, labels, cluster) as workflow:
        templates = _stage_templates(spec, profile, images, cluster, refs)
        _pipeline_dag(ENTRYPOINT, templates, _shape(spec, profile))
        _finish_template(["{{workflow.parameters.run}}"], images, cluster)
    workflow.arguments = [Parameter(name="run", value=run_id), Parameter(name="store", value=store)]
    return workflow


def build_sweep_workflow(
    specs: Mapping[str, RunSpec],
    sweep_name: str,
    profile: Profile,
    *,
    images: Images | None = None,
    store: str,
    parallelism: int = 2,
    cluster: Cluster | None = None,
    refs: Mapping[str, str] | None = None,
) -> Workflow:
    """One pipeline per registered run of a sweep, at most `parallelism` at a time.

    Every run goes through the same templates, so the points must share the graph's
    shape (SAE layers, detection, resources); a sweep over model depth is submitted point
    by point.
    """
    if not specs:
        raise WorkflowError(f"sweep {sweep_name} has no runs")
    if parallelism < 1:
        raise WorkflowError(f"sweep parallelism must be at least 1, got {parallelism}")
    run_ids = [layout.validate_run_id(r) for r in specs]
    first = next(iter(specs.values()))
    shape = _shape(first, profile)
    for run_id, spec in specs.items():
        if _shape(spec, profile) != shape:
            raise WorkflowError(
                f"sweep {sweep_name}: run {run_id} differs from {run_ids[0]} in its SAE layers, "
                "detect.enabled or resources; one sweep workflow runs one graph, so submit "
                "such points one by one (driftlab submit SPEC.yaml)"
            )
    images = images or Images()
    cluster = cluster or Cluster()
    name = layout.validate_run_id(f"sweep-{sweep_name}"[: layout.MAX_RUN_ID].rstrip("-"))
    labels = {APP_LABEL: "driftlab", SWEEP_LABEL: sweep_name}
    with _workflow_shell(name, store, labels, cluster, entrypoint="sweep") as workflow:
        templates = _stage_templates(first, profile, images, cluster, refs)
        pipeline = _pipeline_dag(ENTRYPOINT, templates, shape)
        with DAG(name="sweep", parallelism=parallelism):
            for run_id in run_ids:
                Task(name=run_id, template=pipeline, arguments={"run": run_id})
        _finish_template(run_ids, images, cluster)
    workflow.arguments = [Parameter(name="store", value=store)]
    return workflow


def _workflow_shell(
    name: str,
    store: str,
    labels: Mapping[str, str],
    cluster: Cluster,
    entrypoint: str = ENTRYPOINT,
) -> Workflow:
    return Workflow(
        name=name,
        namespace=cluster.namespace,
        labels=dict(labels),
        entrypoint=entrypoint,
        on_exit=EXIT_HANDLER,
        service_account_name=cluster.service_account,
        pod_metadata=Metadata(labels=dict(labels)),
        pod_gc=PodGC(strategy="OnPodSuccess"),  # failed pods stay for their logs
        ttl_strategy=TTLStrategy(
            seconds_after_success=2 * 24 * _HOUR, seconds_after_failure=7 * 24 * _HOUR
        ),
        security_context=PodSecurityContext(
            run_as_non_root=True,
            run_as_user=IMAGE_UID,
            run_as_group=IMAGE_UID,
            fs_group=IMAGE_UID,
            seccomp_profile=SeccompProfile(type="RuntimeDefault"),
        ),
    )


def _container_security() -> SecurityContext:
    """Nothing a stage does needs privileges or a writable image; /tmp is the emptyDir."""
    return SecurityContext(
        allow_privilege_escalation=False,
        read_only_root_filesystem=True,
        run_as_non_root=True,
        capabilities=Capabilities(drop=["ALL"]),
    )


def _tmp_volume() -> EmptyDirVolume:
    return EmptyDirVolume(name=TMP_VOLUME, mount_path="/tmp")


#: What a stage task runs: its inline container, or a WorkflowTemplate's template.
StageTemplate = Container | TemplateRef


def _stage_templates(
    spec: RunSpec,
    profile: Profile,
    images: Images,
    cluster: Cluster,
    refs: Mapping[str, str] | None,
) -> dict[str, StageTemplate]:
    if profile not in PROFILES:
        raise WorkflowError(f"profile must be one of {', '.join(PROFILES)}; got {profile!r}")
    if refs is not None:
        return {
            s.task: TemplateRef(name=refs[s.task], template=s.task) for s in stage_registry.PIPELINE
        }
    return {s.task: _container(s, spec, profile, images, cluster) for s in stage_registry.PIPELINE}


def _container(
    stage: Stage, spec: RunSpec, profile: Profile, images: Images, cluster: Cluster
) -> Container:
    on_gpu = profile == "gpu" and stage.gpu
    args = ["--run", "{{inputs.parameters.run}}", "--store", "{{workflow.parameters.store}}"]
    inputs = [Parameter(name="run")]
    if stage.device:
        args += ["--device", "cpu" if profile == "cpu" else "auto"]
    if stage.shard:
        args += [f"--{stage.shard}", f"{{{{inputs.parameters.{stage.shard}}}}}"]
        inputs.append(Parameter(name=stage.shard))
    volumes = [_tmp_volume()]
    if stage is stage_registry.TRAIN:  # DataLoader workers share batches through /dev/shm
        volumes.insert(0, EmptyDirVolume(name="dshm", mount_path="/dev/shm", medium="Memory"))
    return Container(
        name=stage.task,
        image=images.image(stage.service),
        image_pull_policy=images.pull_policy,
        command=list(stage.entry),
        args=args,
        inputs=inputs,
        env=_env(cluster),
        resources=_resources(stage, spec, profile),
        node_selector=dict(cluster.gpu_node_selector) if on_gpu else None,
        tolerations=(
            [Toleration(key=GPU_RESOURCE, operator="Exists", effect="NoSchedule")]
            if on_gpu
            else None
        ),
        volumes=volumes,
        security_context=_container_security(),
        active_deadline_seconds=_int_or_string(stage.deadline_s),
        retry_strategy=RetryStrategy(
            limit=_int_or_string(RETRY_LIMIT),
            # OnError: pod-level errors (eviction, node loss, deleted pod), transient errors
            # among them; a stage that exits non-zero on bad input is not retried.
            retry_policy="OnError",
            backoff=Backoff(
                duration="30s", factor=IntOrString(_int_or_string(2)), max_duration="10m"
            ),
        ),
        metrics=_stage_metrics(stage.task),
    )


def _finish_template(runs: Sequence[str], images: Images, cluster: Cluster) -> Container:
    """The onExit handler: Argo calls it without arguments, so the runs are spelled out."""
    args = [arg for run in runs for arg in ("--run", run)]
    args += ["--store", "{{workflow.parameters.store}}", "--status", "{{workflow.status}}"]
    finish = stage_registry.FINISH
    return Container(
        name=finish.task,
        image=images.image(finish.service),
        image_pull_policy=images.pull_policy,
        command=list(finish.entry),
        args=args,
        env=_env(cluster),
        resources=_resources(finish, RunSpec(), "cpu"),
        volumes=[_tmp_volume()],
        security_context=_container_security(),
        active_deadline_seconds=_int_or_string(finish.deadline_s),
        retry_strategy=RetryStrategy(limit=_int_or_string(RETRY_LIMIT), retry_policy="OnError"),
    )


def _int_or_string(value: int) -> str:
    """Argo's JSON Schema types IntOrString as a string (the CRD takes either): a string
    is valid under both, and Argo reads it as the number."""
    return str(value)


def _env(cluster: Cluster) -> list[Env | SecretEnv]:
    env: list[Env | SecretEnv] = [
        Env(name="PYTHONUNBUFFERED", value="1"),
        # The workflow is the run's writer: its stages take no lease of their own.
        Env(name=ORCHESTRATED_ENV, value="1"),
    ]
    if cluster.s3_endpoint:
        env.append(Env(name="DRIFTLAB_S3_ENDPOINT", value=cluster.s3_endpoint))
    env += [
        SecretEnv(name=key, secret_name=cluster.s3_secret, secret_key=key, optional=True)
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    ]
    if cluster.pushgateway:
        env.append(Env(name="DRIFTLAB_PUSHGATEWAY", value=cluster.pushgateway))
    return env


def _resources(stage: Stage, spec: RunSpec, profile: Profile) -> Resources:
    if stage.resources is None:
        return Resources(cpu_request="100m", memory_request="256Mi", memory_limit="1Gi")
    wanted = spec.resources.for_stage(stage.resources)
    cpu, memory = wanted.cpu, wanted.memory
    if profile == "cpu":
        cpu = min(cpu, CPU_PROFILE_MAX_CPU, key=parse_quantity)
        memory = min(memory, CPU_PROFILE_MAX_MEMORY, key=parse_quantity)
    gpus = max(wanted.gpus, 1) if profile == "gpu" and stage.gpu else None
    return Resources(cpu_request=cpu, memory_request=memory, memory_limit=wanted.memory, gpus=gpus)


def _stage_metrics(stage: str) -> list[Gauge | Counter]:
    """Argo's own per-stage metrics (the controller prefixes them with argo_workflows_).

    `workflow` and `workflow_namespace` let a dashboard show one workflow's tasks; not
    `namespace`, which Prometheus's scrape sets to the controller's namespace.
    """
    labels = [
        Label(key="stage", value=stage),
        Label(key="status", value="{{status}}"),
        Label(key="workflow", value="{{workflow.name}}"),
        Label(key="workflow_namespace", value="{{workflow.namespace}}"),
    ]
    return [
        Gauge(
            name="driftlab_task_duration_seconds",
            help="Duration of a driftlab task, by stage and final status",
            labels=labels,
            realtime=False,
            value="{{duration}}",
        ),
        Counter(
            name="driftlab_task_total",
            help="driftlab tasks that ended, by stage and final status",
            labels=labels,
            value="1",
        ),
    ]


class _Shape(NamedTuple):
    """What of a spec decides the graph: its tasks, their fan-out and their pods."""

    sae_layers: list[int]
    detect: bool
    resources: ResourcesSpec
    #: Fan-out task -> pods at once, for the capped ones.
    limits: tuple[tuple[str, int], ...]


def _shape(spec: RunSpec, profile: Profile) -> _Shape:
    limits = []
    for stage in stage_registry.PIPELINE:
        if stage.shard is not None and stage.resources is not None:
            on_gpu = profile == "gpu" and stage.gpu
            limit = spec.resources.fan_out_limit(stage.resources, on_gpu)
            if limit is not None:
                limits.append((stage.task, limit))
    return _Shape(sae_layers(spec), spec.detect.enabled, spec.resources, tuple(limits))


def _task_template(template: StageTemplate) -> dict[str, Any]:
    """Hera's Task keyword for an inline template or a WorkflowTemplate's."""
    return (
        {"template_ref": template} if isinstance(template, TemplateRef) else {"template": template}
    )


def _capped_fan_outs(templates: Mapping[str, StageTemplate], shape: _Shape) -> dict[str, DAG]:
    """Fan-out task -> the DAG template that runs its items, `parallelism` at a time.

    Argo's `parallelism` bounds a template's children, so the cap needs a template of its
    own: the items arrive as the JSON parameter `items`."""
    capped = {}
    for task, limit in shape.limits:
        stage = stage_registry.by_task(task)
        assert stage.shard is not None
        inputs = [Parameter(name="run"), Parameter(name="items")]
        with DAG(name=f"{task}-{FAN_OUT_SUFFIX}", inputs=inputs, parallelism=limit) as dag:
            Task(
                name=task,
                arguments={"run": "{{inputs.parameters.run}}", stage.shard: "{{item}}"},
                with_param="{{inputs.parameters.items}}",
                **_task_template(templates[task]),
            )
        capped[task] = dag
    return capped


def _pipeline_dag(name: str, templates: Mapping[str, StageTemplate], shape: _Shape) -> DAG:
    """The stage DAG of one run, as the stage registry lays it out; its input `run` is
    passed to every task. A stage the spec switches off (detect) is left out and its
    dependents wait for its own dependencies instead."""
    run = {"run": "{{inputs.parameters.run}}"}
    enabled = [s for s in stage_registry.PIPELINE if s is not stage_registry.DETECT or shape.detect]
    present = {s.task for s in enabled}
    upstream = {s.task: s.after for s in stage_registry.PIPELINE}
    capped = _capped_fan_outs(templates, shape)

    def waits_for(task: str) -> list[str]:
        return [t for dep in upstream[task] for t in ([dep] if dep in present else waits_for(dep))]

    with DAG(name=name, inputs=[Parameter(name="run")]) as dag:
        tasks: dict[str, Task] = {}
        for stage in enabled:
            arguments = dict(run)
            options: dict[str, Any] = _task_template(templates[stage.task])
            if stage.shard is not None:
                if stage.items == "checkpoints":
                    items = f"{{{{tasks.{stage_registry.CHECKPOINTS.task}.outputs.result}}}}"
                    loop: dict[str, Any] = {"with_param": items}
                else:
                    items = json.dumps(shape.sae_layers)
                    loop = {"with_items": list(shape.sae_layers)}
                if stage.task in capped:  # the wrapper loops over its `items` input
                    arguments["items"] = items
                    options = {"template": capped[stage.task]}
                else:
                    arguments[stage.shard] = "{{item}}"
                    options.update(loop)
            tasks[stage.task] = task = Task(name=stage.task, arguments=arguments, **options)
            for dep in waits_for(stage.task):
                tasks[dep] >> task
    return dag


def compiled(workflow: Workflow) -> dict[str, Any]:
    """The manifest Argo receives (what `hera generate yaml` writes), as plain data."""
    data: dict[str, Any] = json.loads(json.dumps(workflow.to_dict()))
    return data
