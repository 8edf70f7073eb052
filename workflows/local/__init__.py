"""Runs a compiled Argo Workflow on this machine: the same graph, without a cluster.

The input is the manifest Hera produces (`Workflow.to_dict()`), not a second description
of the pipeline, so what runs here is what Argo would run: DAG `depends` and
`dependencies`, workflow/input/item/task-output parameters, `withItems` and `withParam`,
template `parallelism`, `retryStrategy`, `activeDeadlineSeconds`, the `onExit` handler.
Each container task is its `command + args` run as a subprocess with the template's env
on top of this process's (secretKeyRef variables are taken from the local environment).
Deliberately ignored: images, node selectors, tolerations, resources, pod metadata,
retry backoff and `expression` (retries happen at once). The one rewrite: a leading
`python` is this interpreter, so the venv that runs driftlab runs the stages.

Semantics follow Argo's: a task's bare dependency `A` means A succeeded or was skipped;
a task whose `depends` is false is omitted; a task ends Failed when its command exits
non-zero (retried under `OnFailure`/`Always`) and Error when it is killed by a signal
(retried under `OnError`/`OnTransientError`/`Always`); `limit` retries follow the first
attempt. The first failure nobody handles (no `continueOn`, no `X.Failed` dependency)
stops the run: running tasks get SIGTERM, nothing new starts, and the exit handler runs
with `workflow.status` Failed. Ctrl-C or a SIGTERM to this process (kill, `timeout`, a
pod's shutdown) does the same, so no task trains on after its workflow is gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from shared.errors import DriftlabError
from workflows.local.display import LineReporter, LiveTable
from workflows.local.nodes import (
    ERROR,
    FAILED,
    OMITTED,
    RUNNING,
    SKIPPED,
    STOPPED,
    SUCCEEDED,
    Node,
    Reporter,
    RunResult,
)

__all__ = [
    "ERROR",
    "FAILED",
    "SKIPPED",
    "STOPPED",
    "SUCCEEDED",
    "LineReporter",
    "LiveTable",
    "LocalRunError",
    "Node",
    "RunResult",
    "run_workflow",
]

_TERM_GRACE_S = 15.0
_POLL_S = 0.1
_VAR_RE = re.compile(r"{{\s*([^{}]*?)\s*}}")
_DEPENDS_TOKEN_RE = re.compile(r"\s*(&&|\|\||!|\(|\)|[A-Za-z0-9_.-]+)")
_RESULTS = {
    "Succeeded": (SUCCEEDED,),
    "Failed": (FAILED,),
    "Errored": (ERROR,),
    "Skipped": (SKIPPED, OMITTED),
    "Omitted": (OMITTED,),
    "Daemoned": (),
}
_RETRY_ON = {
    "Always": (FAILED, ERROR),
    "OnFailure": (FAILED,),
    "OnError": (ERROR,),
    "OnTransientError": (ERROR,),
}


class LocalRunError(DriftlabError):
    """A workflow this executor cannot run as written (bad reference, unknown template)."""

    exit_code = 2


def run_workflow(
    workflow: Mapping[str, Any],
    *,
    workers: int | None = None,
    reporter: Reporter | None = None,
    log_dir: Path | None = None,
) -> RunResult:
    """Execute `workflow` (a compiled manifest) here; returns when it and onExit are done."""
    return _Executor(workflow, workers or os.cpu_count() or 1, reporter, log_dir).run()


class _Executor:
    def __init__(
        self,
        workflow: Mapping[str, Any],
        workers: int,
        reporter: Reporter | None,
        log_dir: Path | None,
    ) -> None:
        spec = workflow.get("spec") or {}
        self.name = str((workflow.get("metadata") or {}).get("name") or "workflow")
        self.templates: dict[str, Mapping[str, Any]] = {
            t["name"]: t for t in spec.get("templates") or []
        }
        self.entrypoint = spec.get("entrypoint")
        self.on_exit = spec.get("onExit")
        self.globals = {
            f"workflow.parameters.{p['name']}": str(p.get("value", ""))
            for p in (spec.get("arguments") or {}).get("parameters") or []
        }
        self.globals["workflow.name"] = self.name
        self.arguments = {
            p["name"]: str(p.get("value", ""))
            for p in (spec.get("arguments") or {}).get("parameters") or []
        }
        if workers < 1:
            raise LocalRunError(f"--workers must be at least 1, got {workers}")
        self.slots = threading.BoundedSemaphore(workers)
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads: list[threading.Thread] = []  # every task thread, to wait for on abort
        self.procs: set[subprocess.Popen[bytes]] = set()  # the task processes running now
        self.nodes: list[Node] = []
        self.failed: Node | None = None
        self.report = reporter or (lambda _node: None)
        self.log_dir = log_dir or Path(tempfile.mkdtemp(prefix=f"driftlab-{self.name}-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)

    # -- whole workflow --------------------------------------------------------------------

    def run(self) -> RunResult:
        if not self.entrypoint or self.entrypoint not in self.templates:
            raise LocalRunError(
                f"workflow {self.name}: entrypoint {self.entrypoint!r} is not a template"
            )
        try:
            with _sigterm_as_interrupt():
                phase = self._run_template(self.entrypoint, self.entrypoint, self.arguments)
        except KeyboardInterrupt:
            self._abort()
            phase = FAILED
            self._finish(phase)
            raise
        status = SUCCEEDED if phase in (SUCCEEDED, SKIPPED, OMITTED) else FAILED
        self._finish(status)
        return RunResult(status, list(self.nodes), self.failed, self.log_dir)

    def _abort(self) -> None:
        """Ctrl-C or SIGTERM: every running task gets SIGTERM and its thread ends.

        All before the exit handler runs: it clears `stop`, and a task thread that had not
        yet seen it set would then wait on (or retry) its task instead of ending it.
        """
        self.stop.set()
        with self.lock:
            procs = list(self.procs)
        for proc in procs:
            _terminate(proc)
        with self.lock:
            threads = list(self.threads)
        for thread in threads:
            thread.join(timeout=_TERM_GRACE_S)

    def _finish(self, status: str) -> None:
        if not self.on_exit:
            return
        self.globals["workflow.status"] = status
        self.stop.clear()
        self._run_template(self.on_exit, f"{self.name}.onExit", {})

    # -- templates -------------------------------------------------------------------------

    def _template(self, name: str) -> Mapping[str, Any]:
        try:
            return self.templates[name]
        except KeyError:
            raise LocalRunError(f"workflow {self.name}: no template named {name!r}") from None

    def _inputs(self, template: Mapping[str, Any], given: Mapping[str, str]) -> dict[str, str]:
        scope: dict[str, str] = {}
        for param in (template.get("inputs") or {}).get("parameters") or []:
            name = param["name"]
            if name in given:
                scope[f"inputs.parameters.{name}"] = given[name]
            elif "value" in param:
                scope[f"inputs.parameters.{name}"] = str(param["value"])
            elif "default" in param:
                scope[f"inputs.parameters.{name}"] = str(param["default"])
            else:
                raise LocalRunError(
                    f"template {template['name']}: input parameter {name!r} has no value"
                )
        return scope

    def _run_template(self, name: str, node_name: str, given: Mapping[str, str]) -> str:
        template = self._template(name)
        scope = {**self.globals, **self._inputs(template, given)}
        if "dag" in template:
            node = self._add_node(node_name, name, "dag")
            node.state, node.started = RUNNING, time.monotonic()
            phase = self._run_dag(template, scope, node_name)
            node.state, node.ended = phase, time.monotonic()
            return phase
        if "container" in template:
            return self._run_container(template, scope, node_name).state
        kinds = ", ".join(k for k in template if k not in ("name", "inputs", "outputs"))
        raise LocalRunError(
            f"template {name}: only container and dag templates run locally, not {kinds}"
        )

    def _add_node(self, name: str, template: str, kind: str) -> Node:
        node = Node(name=name, template=template, kind=kind)
        with self.lock:
            self.nodes.append(node)
        return node

    # -- DAG ------------------------------------------------------------------------------

    def _run_dag(self, template: Mapping[str, Any], scope: dict[str, str], path: str) -> str:
        tasks = {t["name"]: t for t in template["dag"].get("tasks") or []}
        limit = template.get("parallelism")
        gate = threading.BoundedSemaphore(int(limit)) if limit else None
        handled = _handled_failures(tasks)
        for name, task in tasks.items():
            unknown = [d for d in _dependencies(task) if d not in tasks]
            if unknown:
                raise LocalRunError(f"task {path}.{name} depends on unknown task {unknown[0]!r}")
        phases: dict[str, str] = {}
        outputs: dict[str, str] = {}
        results: dict[str, str] = {}
        threads: list[threading.Thread] = []
        done = threading.Condition()

        def run_task(task: Mapping[str, Any], task_scope: dict[str, str]) -> None:
            try:
                phase = self._run_task(task, task_scope, path, gate, outputs)
            except LocalRunError as err:
                node = self._add_node(f"{path}.{task['name']}", task.get("template", ""), "task")
                node.state, node.message = ERROR, str(err)
                self._fail(node)
                self.report(node)
                phase = ERROR
            with done:
                results[task["name"]] = phase
                done.notify_all()

        while len(phases) < len(tasks):
            with done:
                phases.update(results)
                merged = len(results)
            if any(_is_failure(tasks[n], p, handled) for n, p in phases.items()):
                self.stop.set()
            decided = False
            for name, task in tasks.items():
                if name in phases or any(t.name == name for t in threads):
                    continue
                if any(d not in phases for d in _dependencies(task)):
                    continue
                decided = True
                if self.stop.is_set():
                    phases[name] = STOPPED
                elif not _evaluate_depends(task, phases):
                    phases[name] = OMITTED
                else:
                    task_scope = {**scope, **outputs}
                    thread = threading.Thread(
                        target=run_task, args=(task, task_scope), name=name, daemon=True
                    )
                    threads.append(thread)
                    with self.lock:
                        self.threads.append(thread)
                    thread.start()
            if decided or len(phases) == len(tasks):
                continue
            with done:
                if len(results) == merged == len(threads):
                    stuck = sorted(set(tasks) - set(phases))
                    raise LocalRunError(f"{path}: tasks {stuck} wait on each other (a cycle)")
                done.wait_for(lambda: len(results) > merged, timeout=1.0)  # noqa: B023
        for thread in threads:
            thread.join()
        failed = any(_is_failure(tasks[n], p, handled) or p == STOPPED for n, p in phases.items())
        return FAILED if failed else SUCCEEDED

    def _run_task(
        self,
        task: Mapping[str, Any],
        scope: dict[str, str],
        path: str,
        gate: threading.BoundedSemaphore | None,
        outputs: dict[str, str],
    ) -> str:
        name = task["name"]
        where = f"task {path}.{name}"
        template = task.get("template")
        if not template:
            raise LocalRunError(f"{where}: only tasks naming a template run locally")
        items = _items(task, scope, where)
        if items is None:
            phase = self._run_child(task, scope, f"{path}.{name}", gate, where, outputs, name)
            return phase
        if not items:
            return SKIPPED
        phases: list[str] = []
        lock = threading.Lock()

        def one(index: int, item: Any) -> None:
            item_scope = {**scope, **_item_scope(item)}
            child = f"{path}.{name}({index}:{_item_label(item)})"
            phase = self._run_child(task, item_scope, child, gate, where, None, name)
            with lock:
                phases.append(phase)

        threads = [
            threading.Thread(target=one, args=(i, item), daemon=True)
            for i, item in enumerate(items)
        ]
        with self.lock:
            self.threads.extend(threads)
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for bad in (ERROR, FAILED, STOPPED):
            if bad in phases:
                return bad
        return SUCCEEDED

    def _run_child(
        self,
        task: Mapping[str, Any],
        scope: dict[str, str],
        node_name: str,
        gate: threading.BoundedSemaphore | None,
        where: str,
        outputs: dict[str, str] | None,
        task_name: str,
    ) -> str:
        given = {
            p["name"]: substitute(str(p.get("value", "")), scope, where)
            for p in (task.get("arguments") or {}).get("parameters") or []
        }
        if gate:
            gate.acquire()
        try:
            if self.stop.is_set():
                return STOPPED
            template = self._template(task["template"])
            if "dag" in template:
                return self._run_template(task["template"], node_name, given)
            node = self._run_container(
                template, {**self.globals, **self._inputs(template, given)}, node_name
            )
            if outputs is not None:
                for key, value in node.outputs.items():
                    outputs[f"tasks.{task_name}.outputs.{key}"] = value
            return node.state
        finally:
            if gate:
                gate.release()

    # -- containers ------------------------------------------------------------------------

    def _run_container(
        self, template: Mapping[str, Any], scope: dict[str, str], node_name: str
    ) -> Node:
        node = self._add_node(node_name, template["name"], "container")
        where = f"template {template['name']}"
        container = template["container"]
        if not container.get("command"):
            raise LocalRunError(f"{where}: has no command; set command (images are not run here)")
        folder = self.log_dir / _safe(node_name)
        folder.mkdir(parents=True, exist_ok=True)
        node.log = folder / "log"
        node.progress_file = folder / "progress"
        command = [substitute(str(a), scope, where) for a in container["command"]]
        args = [substitute(str(a), scope, where) for a in container.get("args") or []]
        output_paths = _output_paths(template, folder)
        argv = [_local_path(a, output_paths) for a in [*command, *args]]
        if argv[0] == "python":
            argv[0] = sys.executable
        env = dict(os.environ)
        for var in container.get("env") or []:
            if "value" in var:
                env[var["name"]] = substitute(str(var["value"]), scope, where)
        env["ARGO_PROGRESS_FILE"] = str(node.progress_file)
        retry = template.get("retryStrategy") or {}
        limit = int(str(retry.get("limit", 0))) if retry else 0
        retry_on = _RETRY_ON.get(str(retry.get("retryPolicy", "OnFailure")), (FAILED,))
        deadline = template.get("activeDeadlineSeconds")
        with self.slots:
            node.started = time.monotonic()
            while True:
                if self.stop.is_set():
                    node.state = STOPPED
                    break
                node.attempts += 1
                node.state = RUNNING
                self.report(node)
                node.state, node.message = self._attempt(argv, env, node, folder, deadline)
                if node.state not in retry_on or node.attempts > limit or self.stop.is_set():
                    break
                node.message += f"; retrying ({node.attempts}/{limit})"
                self.report(node)
        node.ended = time.monotonic()
        if node.state == SUCCEEDED:
            node.outputs["result"] = (folder / "stdout").read_text(errors="replace").rstrip("\n")
            for name, (_source, path) in output_paths.items():
                try:
                    node.outputs[f"parameters.{name}"] = path.read_text().strip()
                except OSError:
                    node.state = ERROR
                    node.message = f"output parameter {name}: {path.name} was not written"
        if node.state in (FAILED, ERROR):
            self._fail(node)
        self.report(node)
        return node

    def _attempt(
        self,
        argv: Sequence[str],
        env: Mapping[str, str],
        node: Node,
        folder: Path,
        deadline: Any,
    ) -> tuple[str, str]:
        assert node.log is not None
        with (folder / "stdout").open("wb") as out, node.log.open("ab") as log:
            try:
                proc = subprocess.Popen(
                    list(argv),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=log,
                    env=dict(env),
                    start_new_session=True,  # Ctrl-C reaches driftlab, which stops tasks
                )
            except OSError as err:
                return ERROR, f"cannot start {argv[0]}: {err.strerror or err}"
            with self.lock:
                self.procs.add(proc)
            try:
                limit = time.monotonic() + float(deadline) if deadline else None
                while True:
                    try:
                        code = proc.wait(timeout=_POLL_S)
                        break
                    except subprocess.TimeoutExpired:
                        pass
                    if self.stop.is_set():
                        _terminate(proc)
                        return STOPPED, "stopped after another task failed"
                    if limit is not None and time.monotonic() > limit:
                        _terminate(proc)
                        return FAILED, f"exceeded activeDeadlineSeconds ({deadline})"
            finally:
                with self.lock:
                    self.procs.discard(proc)
        if code == 0:
            return SUCCEEDED, ""
        if code < 0:
            return ERROR, f"killed by {signal.Signals(-code).name}"
        return FAILED, f"exit code {code}"

    def _fail(self, node: Node) -> None:
        with self.lock:
            if self.failed is None:
                self.failed = node


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt, so it stops the tasks as Ctrl-C does.

    Tasks run in their own sessions (a terminal's Ctrl-C must reach driftlab, not them), so
    a SIGTERM that ended this process without this would leave them running, orphaned.
    Signal handlers can only be set from the main thread; elsewhere nothing changes.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=_TERM_GRACE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# -- parameters ---------------------------------------------------------------------------


def substitute(text: str, scope: Mapping[str, str], where: str) -> str:
    """Replace every `{{name}}` from `scope`; an unknown name is an error, as in Argo."""

    def one(match: re.Match[str]) -> str:
        key = match.group(1)
        if key.startswith("="):
            raise LocalRunError(
                f"{where}: expression tags ({{{{{key}}}}}) are not supported locally"
            )
        if key not in scope:
            raise LocalRunError(f"{where}: cannot resolve {{{{{key}}}}}")
        return scope[key]

    return _VAR_RE.sub(one, text)


def _items(task: Mapping[str, Any], scope: Mapping[str, str], where: str) -> list[Any] | None:
    if "withItems" in task:
        return list(task["withItems"])
    if "withParam" in task:
        text = substitute(str(task["withParam"]), scope, where)
        try:
            items = json.loads(text)
        except json.JSONDecodeError:
            raise LocalRunError(f"{where}: withParam is not a JSON list: {text[:200]!r}") from None
        if not isinstance(items, list):
            raise LocalRunError(f"{where}: withParam is not a JSON list: {text[:200]!r}")
        return items
    if "withSequence" in task:
        raise LocalRunError(f"{where}: withSequence is not supported locally; use withItems")
    return None


def _render(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"))


def _item_scope(item: Any) -> dict[str, str]:
    scope = {"item": _render(item)}
    if isinstance(item, dict):
        scope.update({f"item.{k}": _render(v) for k, v in item.items()})
    return scope


def _item_label(item: Any) -> str:
    return _render(item)[:40]


def _output_paths(template: Mapping[str, Any], folder: Path) -> dict[str, tuple[str, Path]]:
    """Output parameters read from a file: (path in the container, file in the node folder).

    The container path is rewritten to the local file wherever the command names it, so
    parallel tasks never share a file.
    """
    paths = {}
    for param in (template.get("outputs") or {}).get("parameters") or []:
        source = (param.get("valueFrom") or {}).get("path")
        if source:
            local = folder / "outputs" / param["name"]
            local.parent.mkdir(parents=True, exist_ok=True)
            paths[param["name"]] = (str(source), local)
    return paths


def _local_path(arg: str, paths: Mapping[str, tuple[str, Path]]) -> str:
    for source, local in paths.values():
        arg = arg.replace(source, str(local))
    return arg


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.()-]+", "_", name)[:150]


# -- dependencies -------------------------------------------------------------------------


def _dependencies(task: Mapping[str, Any]) -> list[str]:
    if "depends" in task:
        names = [
            tok.split(".")[0]
            for tok in _DEPENDS_TOKEN_RE.findall(str(task["depends"]))
            if tok not in ("&&", "||", "!", "(", ")")
        ]
        return list(dict.fromkeys(names))
    return list(task.get("dependencies") or [])


def _evaluate_depends(task: Mapping[str, Any], phases: Mapping[str, str]) -> bool:
    """Argo's `depends` logic over the finished tasks' phases."""
    if "depends" not in task:
        return all(phases[d] == SUCCEEDED for d in task.get("dependencies") or [])
    python = []
    for tok in _DEPENDS_TOKEN_RE.findall(str(task["depends"])):
        if tok in ("&&", "||", "!", "(", ")"):
            python.append({"&&": " and ", "||": " or ", "!": " not "}.get(tok, tok))
            continue
        name, _, result = tok.partition(".")
        phase = phases[name]
        if not result:
            value = phase in (SUCCEEDED, SKIPPED, OMITTED)
        elif result in _RESULTS:
            value = phase in _RESULTS[result]
        elif result == "AnySucceeded":
            value = phase == SUCCEEDED
        elif result == "AllFailed":
            value = phase in (FAILED, ERROR)
        else:
            raise LocalRunError(f"task {task['name']}: unknown task result {tok!r} in depends")
        python.append(str(value))
    return bool(eval("".join(python), {"__builtins__": {}}, {}))


def _handled_failures(tasks: Mapping[str, Mapping[str, Any]]) -> set[str]:
    """Tasks whose failure another task waits for (`X.Failed`): not a workflow failure."""
    handled = set()
    for task in tasks.values():
        for tok in _DEPENDS_TOKEN_RE.findall(str(task.get("depends", ""))):
            name, _, result = tok.partition(".")
            if result in ("Failed", "Errored", "AnySucceeded", "AllFailed"):
                handled.add(name)
    return handled


def _is_failure(task: Mapping[str, Any], phase: str, handled: set[str]) -> bool:
    """A failed task nobody handles fails its DAG (and stops the run)."""
    return (
        phase in (FAILED, ERROR) and task["name"] not in handled and not _continues_on(task, phase)
    )


def _continues_on(task: Mapping[str, Any], phase: str) -> bool:
    cont = task.get("continueOn") or {}
    return bool(cont.get("failed") if phase == FAILED else cont.get("error"))
