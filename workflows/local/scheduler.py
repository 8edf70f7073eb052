"""Which task starts when: one `graphlib.TopologicalSorter` per running DAG, one pool.

The scheduler's thread decides everything; the pool's threads only run stage processes,
so no lock guards the graph. A DAG's ready tasks become units (one per fan-out item, or
a nested DAG) that start while the DAG is under its `parallelism` and, for containers, a
worker is free. The first unit that fails stops the run at once: running stages get
SIGTERM and nothing pending starts, instead of a fan-out's remaining items starting one
after another after the run is already lost.
"""

from __future__ import annotations

import os
import re
import sys
from collections import deque
from collections.abc import Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from graphlib import TopologicalSorter
from pathlib import Path

from workflows.local.manifest import (
    ContainerTemplate,
    DagTask,
    DagTemplate,
    LocalRunError,
    Workflow,
)
from workflows.local.nodes import ERROR, FAILED, STOPPED, SUCCEEDED, Node, Reporter
from workflows.local.parameters import fan_out, substitute
from workflows.local.process import StageCommand, StopSignal, run_stage


@dataclass
class _Unit:
    """What a DAG task starts: the task, one item of its fan-out, or a root template."""

    name: str  # the node's name: path.task or path.task(index:item)
    template: str
    arguments: Mapping[str, str]
    dag: _DagRun | None = None  # None for the entrypoint and onExit
    task: DagTask | None = None


@dataclass
class _DagRun:
    """One running instance of a DAG template (the sweep runs one per run id)."""

    template: DagTemplate
    scope: dict[str, str]  # workflow and input parameters, then each task's outputs.result
    path: str
    parent: _Unit  # the task (or root) that runs this DAG
    sorter: TopologicalSorter[str]
    ready: deque[_Unit] = field(default_factory=deque)
    unfinished: dict[str, int] = field(default_factory=dict)  # task: units still to end
    running: int = 0

    def has_room(self) -> bool:
        limit = self.template.parallelism
        return limit is None or self.running < limit

    def finished(self) -> bool:
        return not self.sorter.is_active() and not self.running and not self.ready


class Scheduler:
    """Runs templates of one workflow with at most `workers` stages at a time."""

    def __init__(self, workflow: Workflow, workers: int, report: Reporter, log_dir: Path) -> None:
        self.workflow = workflow
        self.workers = workers
        self.report = report
        self.log_dir = log_dir
        self.globals = {
            **{f"workflow.parameters.{k}": v for k, v in workflow.parameters.items()},
            "workflow.name": workflow.name,
        }
        self.nodes: list[Node] = []
        self.failed: Node | None = None  # the run's first failure
        self.stop = StopSignal()  # this pass's: the entrypoint's, then onExit's
        self._failed_in_pass = False
        self._dags: list[_DagRun] = []
        self._running: dict[Future[Node], _Unit] = {}

    def run(self, template: str, arguments: Mapping[str, str], name: str) -> str:
        """Run `template` (entrypoint or onExit) to the end: SUCCEEDED, FAILED or STOPPED."""
        self.stop = StopSignal()
        self._failed_in_pass = False
        with ThreadPoolExecutor(self.workers, thread_name_prefix="stage") as pool:
            try:
                self._start(_Unit(name, template, arguments), pool)
                self._start_ready(pool)
                while self._running:
                    done, _ = wait(self._running, return_when=FIRST_COMPLETED)
                    for future in done:
                        unit = self._running.pop(future)
                        self._ended(unit, future.result())
                    self._start_ready(pool)
            except BaseException:
                # The pool waits for its stages on the way out: they must be ending.
                self.stop.set("stopped: the local runner itself failed")
                raise
            finally:
                self._running.clear()
                self._dags.clear()
        if self._failed_in_pass:
            return FAILED
        return STOPPED if self.stop.is_set() else SUCCEEDED

    # -- starting --------------------------------------------------------------------------

    def _start_ready(self, pool: ThreadPoolExecutor) -> None:
        """Start ready units in DAG order until nothing more can start."""
        started = True
        while started and not self.stop.is_set():
            started = False
            for dag in list(self._dags):
                while dag.ready and dag.has_room() and not self.stop.is_set():
                    unit = dag.ready[0]
                    container = isinstance(
                        self.workflow.templates[unit.template], ContainerTemplate
                    )
                    if container and len(self._running) >= self.workers:
                        break
                    dag.ready.popleft()
                    dag.running += 1
                    self._start(unit, pool)
                    started = True

    def _start(self, unit: _Unit, pool: ThreadPoolExecutor) -> None:
        template = self.workflow.templates[unit.template]
        try:
            scope = {**self.globals, **_inputs(template.inputs, unit.arguments)}
            if isinstance(template, DagTemplate):
                self._open(template, scope, unit)
                return
            command = self._command(template, scope)
        except LocalRunError as err:
            self._error(unit, str(err))
            return
        node = Node(name=unit.name, template=unit.template)
        self.nodes.append(node)
        folder = self.log_dir / _safe(unit.name)
        future = pool.submit(run_stage, command, node, folder, self.stop, self.report)
        self._running[future] = unit

    def _command(self, template: ContainerTemplate, scope: Mapping[str, str]) -> StageCommand:
        where = f"template {template.name}"
        argv = [substitute(arg, scope, where) for arg in template.argv]
        if argv[0] == "python":  # the venv that runs driftlab runs its stages
            argv[0] = sys.executable
        env = {name: substitute(value, scope, where) for name, value in template.env}
        return StageCommand(
            argv=argv,
            env={**os.environ, **env},
            retry=template.retry,
            deadline_s=template.deadline_s,
        )

    def _open(self, template: DagTemplate, scope: dict[str, str], unit: _Unit) -> None:
        graph = {task.name: task.depends for task in template.tasks.values()}
        dag = _DagRun(template, scope, unit.name, unit, TopologicalSorter(graph))
        dag.sorter.prepare()
        self._dags.append(dag)
        self._release(dag)
        self._close_if_finished(dag)

    def _release(self, dag: _DagRun) -> None:
        """Queue the units of every task whose dependencies have all ended."""
        while not self.stop.is_set() and (names := dag.sorter.get_ready()):
            for name in names:
                task = dag.template.tasks[name]
                units = self._units(dag, task)
                if units:
                    dag.ready.extend(units)
                    dag.unfinished[name] = len(units)
                elif not self.stop.is_set():  # an empty fan-out: skipped, dependents go on
                    dag.sorter.done(name)

    def _units(self, dag: _DagRun, task: DagTask) -> list[_Unit]:
        name = f"{dag.path}.{task.name}"
        try:
            items = fan_out(task, dag.scope, f"task {name}")
            if items is None:
                return [_Unit(name, task.template, _arguments(task, dag.scope, name), dag, task)]
            return [
                _Unit(
                    f"{name}({index}:{item[:40]})",
                    task.template,
                    _arguments(task, {**dag.scope, "item": item}, name),
                    dag,
                    task,
                )
                for index, item in enumerate(items)
            ]
        except LocalRunError as err:
            self._error(_Unit(name, task.template, {}), str(err))
            return []

    # -- ending ----------------------------------------------------------------------------

    def _ended(self, unit: _Unit, node: Node) -> None:
        if node.state in (FAILED, ERROR):
            self._fail(node)
        if node.state != SUCCEEDED or unit.dag is None or unit.task is None:
            return
        if not unit.task.fans_out:
            unit.dag.scope[f"tasks.{unit.task.name}.outputs.result"] = node.result
        self._unit_succeeded(unit)

    def _unit_succeeded(self, unit: _Unit) -> None:
        """Its DAG goes on: the task is done once all its units are."""
        dag, task = unit.dag, unit.task
        if dag is None or task is None or self.stop.is_set():
            return
        dag.running -= 1
        dag.unfinished[task.name] -= 1
        if not dag.unfinished[task.name]:
            del dag.unfinished[task.name]
            dag.sorter.done(task.name)
            self._release(dag)
        self._close_if_finished(dag)

    def _close_if_finished(self, dag: _DagRun) -> None:
        if dag.finished() and not self.stop.is_set():
            self._dags.remove(dag)
            self._unit_succeeded(dag.parent)

    def _error(self, unit: _Unit, message: str) -> None:
        """A unit that could not even start (a parameter that does not resolve)."""
        node = Node(name=unit.name, template=unit.template, state=ERROR, message=message)
        self.nodes.append(node)
        self.report(node)
        self._fail(node)

    def _fail(self, node: Node) -> None:
        self._failed_in_pass = True
        if self.failed is None:
            self.failed = node
        self.stop.set(f"stopped after {node.name} {node.state.lower()}")


def _inputs(names: tuple[str, ...], arguments: Mapping[str, str]) -> dict[str, str]:
    return {f"inputs.parameters.{name}": arguments[name] for name in names}


def _arguments(task: DagTask, scope: Mapping[str, str], name: str) -> dict[str, str]:
    return {key: substitute(value, scope, f"task {name}") for key, value in task.arguments}


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.()-]+", "_", name)[:150]
