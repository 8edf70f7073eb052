"""The compiled workflow as the local runner reads it: what the pipeline emits, no more.

workflows/pipeline.py compiles to a small part of Argo: DAG templates whose tasks name a
template, `depends` as task names joined by `&&`, `withItems` and `withParam` fan-outs,
`{{tasks.X.outputs.result}}`, container templates with a `retryStrategy` and an
`activeDeadlineSeconds`, DAG `parallelism` (sweeps) and an `onExit` container. The
manifest is read into small typed records before anything starts, so a workflow using
anything else (`continueOn`, `when`, `steps`, output parameters, `X.Failed` in `depends`)
is refused with one line naming the field instead of being run half-understood. Fields
that only place or secure pods on a cluster (images, resources, selectors, volumes,
security contexts, metrics, retry backoff) are accepted and ignored.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from graphlib import CycleError, TopologicalSorter
from typing import Any

from shared.errors import DriftlabError
from workflows.local.nodes import ERROR, FAILED


class LocalRunError(DriftlabError):
    """A workflow the local runner refuses or cannot run as written."""

    exit_code = 2


@dataclass(frozen=True)
class Retry:
    """`retryStrategy`: up to `limit` more attempts after an attempt ending in `on`."""

    limit: int
    on: frozenset[str]


@dataclass(frozen=True)
class ContainerTemplate:
    name: str
    inputs: tuple[str, ...]
    argv: tuple[str, ...]  # command + args, before substitution
    env: tuple[tuple[str, str], ...]  # literal variables; secretKeyRef ones come from here
    retry: Retry
    deadline_s: float | None  # activeDeadlineSeconds, per attempt


@dataclass(frozen=True)
class DagTask:
    name: str
    template: str
    arguments: tuple[tuple[str, str], ...]
    depends: tuple[str, ...]  # every one must succeed (or be skipped: an empty fan-out)
    with_items: tuple[Any, ...] | None
    with_param: str | None  # a JSON list once substituted

    @property
    def fans_out(self) -> bool:
        return self.with_items is not None or self.with_param is not None


@dataclass(frozen=True)
class DagTemplate:
    name: str
    inputs: tuple[str, ...]
    tasks: Mapping[str, DagTask]
    parallelism: int | None  # running tasks (fan-out items count one each) at most


Template = ContainerTemplate | DagTemplate


@dataclass(frozen=True)
class Workflow:
    name: str
    entrypoint: str
    on_exit: str | None
    parameters: Mapping[str, str]  # spec.arguments: {{workflow.parameters.X}}
    templates: Mapping[str, Template]


# What each level may hold: the fields run here, then those that only matter on a cluster.
_TOP = {"apiVersion", "kind", "metadata", "spec"}
_SPEC = {"entrypoint", "templates", "arguments", "onExit"}
_SPEC_IGNORED = {"podGC", "podMetadata", "securityContext", "serviceAccountName", "ttlStrategy"}
_CONTAINER_TEMPLATE = {"name", "inputs", "container", "retryStrategy", "activeDeadlineSeconds"}
_CONTAINER_TEMPLATE_IGNORED = {"metrics", "volumes", "nodeSelector", "tolerations"}
_CONTAINER = {"command", "args", "env"}
_CONTAINER_IGNORED = {"image", "imagePullPolicy", "resources", "securityContext", "volumeMounts"}
_DAG_TEMPLATE = {"name", "inputs", "dag", "parallelism"}
_TASK = {"name", "template", "arguments", "depends", "withItems", "withParam"}
_RETRY_ON = {
    "Always": frozenset({FAILED, ERROR}),
    "OnFailure": frozenset({FAILED}),
    "OnError": frozenset({ERROR}),
    "OnTransientError": frozenset({ERROR}),
}
_TASK_NAME = r"[A-Za-z0-9][A-Za-z0-9_-]*"
_DEPENDS_RE = re.compile(rf"\s*{_TASK_NAME}(\s*&&\s*{_TASK_NAME})*\s*")


def read_workflow(manifest: Mapping[str, Any]) -> Workflow:
    """The workflow in `manifest` (`Workflow.to_dict()`), checked whole before any task runs."""
    _fields(manifest, "manifest", _TOP)
    name = str((manifest.get("metadata") or {}).get("name") or "workflow")
    spec = _fields(manifest.get("spec") or {}, "spec", _SPEC, _SPEC_IGNORED)
    templates: dict[str, Template] = {}
    for raw in spec.get("templates") or []:
        template = _template(raw)
        templates[template.name] = template
    parameters = _pairs(spec.get("arguments"), "spec.arguments")
    workflow = Workflow(
        name=name,
        entrypoint=str(spec.get("entrypoint") or ""),
        on_exit=spec.get("onExit"),
        parameters=dict(parameters),
        templates=templates,
    )
    _check_references(workflow)
    return workflow


def _fields(
    data: Any, where: str, supported: AbstractSet[str], ignored: AbstractSet[str] = frozenset()
) -> Mapping[str, Any]:
    """`data`, once every key in it is one the runner runs or knows it may ignore."""
    if not isinstance(data, Mapping):
        raise LocalRunError(f"{where} is not a mapping")
    for key in data:
        if key not in supported and key not in ignored:
            raise LocalRunError(
                f"{where}.{key} is not supported by the local runner "
                "(it runs what workflows/pipeline.py emits)"
            )
    return data


def _template(raw: Any) -> Template:
    name = str(raw.get("name", "")) if isinstance(raw, Mapping) else ""
    where = f"spec.templates[{name}]"
    if isinstance(raw, Mapping) and "dag" in raw:
        return _dag_template(_fields(raw, where, _DAG_TEMPLATE), name, where)
    if isinstance(raw, Mapping) and "container" in raw:
        data = _fields(raw, where, _CONTAINER_TEMPLATE, _CONTAINER_TEMPLATE_IGNORED)
        return _container_template(data, name, where)
    kinds = sorted(set(raw) - {"name", "inputs", "outputs"}) if isinstance(raw, Mapping) else []
    found = ", ".join(kinds) or "an empty template"
    raise LocalRunError(f"{where}: only container and dag templates run locally, not {found}")


def _inputs(data: Mapping[str, Any], where: str) -> tuple[str, ...]:
    inputs = _fields(data.get("inputs") or {}, f"{where}.inputs", {"parameters"})
    names = []
    for param in inputs.get("parameters") or []:
        names.append(str(_fields(param, f"{where}.inputs.parameters", {"name"})["name"]))
    return tuple(names)


def _pairs(arguments: Any, where: str) -> tuple[tuple[str, str], ...]:
    """`arguments.parameters` as (name, value) pairs."""
    data = _fields(arguments or {}, where, {"parameters"})
    pairs = []
    for param in data.get("parameters") or []:
        param = _fields(param, f"{where}.parameters", {"name", "value"})
        pairs.append((str(param["name"]), str(param.get("value", ""))))
    return tuple(pairs)


def _container_template(data: Mapping[str, Any], name: str, where: str) -> ContainerTemplate:
    container = _fields(data["container"], f"{where}.container", _CONTAINER, _CONTAINER_IGNORED)
    if not container.get("command"):
        raise LocalRunError(f"{where}: has no command; set one (images are not run locally)")
    env = []
    for var in container.get("env") or []:
        var = _fields(var, f"{where}.container.env", {"name", "value", "valueFrom"})
        if "valueFrom" in var:
            _fields(
                var["valueFrom"],
                f"{where}.container.env[{var['name']}].valueFrom",
                {"secretKeyRef"},
            )
            continue  # a Secret's key: this machine's environment variable of that name
        env.append((str(var["name"]), str(var.get("value", ""))))
    deadline = data.get("activeDeadlineSeconds")
    return ContainerTemplate(
        name=name,
        inputs=_inputs(data, where),
        argv=tuple(str(a) for a in [*container["command"], *(container.get("args") or [])]),
        env=tuple(env),
        retry=_retry(data.get("retryStrategy"), f"{where}.retryStrategy"),
        deadline_s=float(deadline) if deadline is not None else None,
    )


def _retry(data: Any, where: str) -> Retry:
    if data is None:
        return Retry(limit=0, on=frozenset())
    # Backoff is ignored: locally a retry starts at once.
    data = _fields(data, where, {"limit", "retryPolicy"}, {"backoff"})
    policy = str(data.get("retryPolicy", "OnFailure"))
    if policy not in _RETRY_ON:
        raise LocalRunError(f"{where}.retryPolicy {policy!r} is not one of {', '.join(_RETRY_ON)}")
    return Retry(limit=int(str(data.get("limit", 0))), on=_RETRY_ON[policy])


def _dag_template(data: Mapping[str, Any], name: str, where: str) -> DagTemplate:
    dag = _fields(data["dag"], f"{where}.dag", {"tasks"})
    tasks: dict[str, DagTask] = {}
    for raw in dag.get("tasks") or []:
        task_name = raw.get("name", "") if isinstance(raw, Mapping) else ""
        task_where = f"{where}.dag.tasks[{task_name}]"
        task = _task(_fields(raw, task_where, _TASK), task_where)
        tasks[task.name] = task
    parallelism = data.get("parallelism")
    if parallelism is not None and int(parallelism) < 1:
        raise LocalRunError(f"{where}.parallelism must be at least 1, got {parallelism}")
    return DagTemplate(
        name=name,
        inputs=_inputs(data, where),
        tasks=tasks,
        parallelism=int(parallelism) if parallelism is not None else None,
    )


def _task(data: Mapping[str, Any], where: str) -> DagTask:
    depends = str(data.get("depends", ""))
    if depends and not _DEPENDS_RE.fullmatch(depends):
        raise LocalRunError(
            f"{where}.depends {depends!r} is not supported by the local runner: "
            "only task names joined by &&"
        )
    if "withItems" in data and "withParam" in data:
        raise LocalRunError(f"{where}: withItems and withParam together")
    if not data.get("template"):
        raise LocalRunError(f"{where}: names no template")
    return DagTask(
        name=str(data["name"]),
        template=str(data["template"]),
        arguments=_pairs(data.get("arguments"), f"{where}.arguments"),
        depends=tuple(d.strip() for d in depends.split("&&")) if depends else (),
        with_items=tuple(data["withItems"]) if "withItems" in data else None,
        with_param=str(data["withParam"]) if "withParam" in data else None,
    )


def _check_references(workflow: Workflow) -> None:
    """Every named template and task exists, inputs are given, and nothing waits in a cycle.

    Also over templates: a DAG that (through others) runs itself would never end here,
    since nothing this runner supports (no `when`) could stop the recursion.
    """
    prefix = f"workflow {workflow.name}"
    for role, name in (("entrypoint", workflow.entrypoint), ("onExit", workflow.on_exit)):
        if name is not None and name not in workflow.templates:
            raise LocalRunError(f"{prefix}: {role} {name!r} is not a template")
    entry = workflow.templates[workflow.entrypoint]
    missing = [i for i in entry.inputs if i not in workflow.parameters]
    if missing:
        raise LocalRunError(f"{prefix}: the entrypoint's input {missing[0]!r} is no argument")
    if workflow.on_exit is not None and workflow.templates[workflow.on_exit].inputs:
        raise LocalRunError(f"{prefix}: onExit {workflow.on_exit!r} has inputs; Argo gives none")
    calls: dict[str, set[str]] = {}
    for template in workflow.templates.values():
        if not isinstance(template, DagTemplate):
            continue
        for task in template.tasks.values():
            where = f"{prefix}: task {template.name}.{task.name}"
            called = workflow.templates.get(task.template)
            if called is None:
                raise LocalRunError(f"{where} names no template {task.template!r}")
            given = {name for name, _ in task.arguments}
            missing = [i for i in called.inputs if i not in given]
            if missing:
                raise LocalRunError(f"{where} gives no input {missing[0]!r}")
            unknown = [d for d in task.depends if d not in template.tasks]
            if unknown:
                raise LocalRunError(f"{where} depends on unknown task {unknown[0]!r}")
        _acyclic({t.name: t.depends for t in template.tasks.values()}, f"{prefix}: {template.name}")
        calls[template.name] = {t.template for t in template.tasks.values()}
    _acyclic(calls, f"{prefix}: templates")


def _acyclic(graph: Mapping[str, Any], where: str) -> None:
    try:
        TopologicalSorter(graph).prepare()
    except CycleError as err:
        raise LocalRunError(f"{where}: {' -> '.join(err.args[1])} wait on each other") from None
