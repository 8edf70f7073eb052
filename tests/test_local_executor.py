"""The local executor on small hand-written workflows (Argo's compiled form).

Every task is a short `python -c` that appends to a journal file, so the tests see what
ran, in which order, with which parameters, and how often.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from workflows.local import (
    FAILED,
    STOPPED,
    SUCCEEDED,
    LocalRunError,
    run_workflow,
)


def _script(code: str, **template: Any) -> dict[str, Any]:
    """A container template running `code` with python; inputs become argv[1:]."""
    inputs = template.pop("inputs", [])
    args = [f"{{{{inputs.parameters.{name}}}}}" for name in inputs]
    return {
        "inputs": {"parameters": [{"name": n} for n in inputs]},
        "container": {
            "image": "ignored:latest",
            "command": ["python", "-c", code],
            "args": args,
            "env": [
                {"name": "GREETING", "value": "{{workflow.parameters.greeting}}"},
                {"name": "SECRET", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}},
            ],
        },
        **template,
    }


def _workflow(
    tasks: list[Any],
    templates: dict[str, dict[str, Any]],
    parallelism: int | None = None,
    on_exit: str | None = None,
) -> dict[str, Any]:
    dag: dict[str, Any] = {"name": "main", "dag": {"tasks": tasks}}
    if parallelism:
        dag["parallelism"] = parallelism
    spec: dict[str, Any] = {
        "entrypoint": "main",
        "arguments": {"parameters": [{"name": "greeting", "value": "hi"}]},
        "templates": [dag, *({"name": k, **v} for k, v in templates.items())],
    }
    if on_exit:
        spec["onExit"] = on_exit
    return {
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "Workflow",
        "metadata": {"name": "t"},
        "spec": spec,
    }


def _note(journal: Path, text: str = "{sys.argv[1:]}") -> str:
    """Code that appends one line (an f-string over sys.argv/os.environ) to the journal."""
    return f"import os, sys, time; open({str(journal)!r}, 'a').write(f'{text}\\n')"


def _lines(journal: Path) -> list[str]:
    return journal.read_text().splitlines() if journal.exists() else []


def test_dependencies_parameters_and_loops(tmp_path):
    journal = tmp_path / "journal"
    templates = {
        "say": _script(_note(journal, '{sys.argv[1]} {os.environ["GREETING"]}'), inputs=["what"]),
        "list": _script("print('[3, 1, 2]')"),
        # An output parameter from a file: the container path, named in the arguments,
        # is remapped to the task's own folder.
        "file-out": {
            **_script("import sys; open(sys.argv[1], 'w').write('from-file')"),
            "outputs": {"parameters": [{"name": "value", "valueFrom": {"path": "/tmp/out/value"}}]},
        },
    }
    templates["file-out"]["container"]["args"] = ["/tmp/out/value"]
    tasks = [
        {
            "name": "first",
            "template": "say",
            "arguments": {"parameters": [{"name": "what", "value": "first"}]},
        },
        {"name": "list", "template": "list", "depends": "first"},
        {
            "name": "each",
            "template": "say",
            "depends": "list",
            "withParam": "{{tasks.list.outputs.result}}",
            "arguments": {"parameters": [{"name": "what", "value": "step-{{item}}"}]},
        },
        {
            "name": "items",
            "template": "say",
            "depends": "first",
            "withItems": [{"layer": 7}],
            "arguments": {"parameters": [{"name": "what", "value": "layer-{{item.layer}}"}]},
        },
        {"name": "file", "template": "file-out", "depends": "first"},
        {
            "name": "last",
            "template": "say",
            "depends": "each && items && file",
            "arguments": {
                "parameters": [
                    {"name": "what", "value": "got-{{tasks.file.outputs.parameters.value}}"}
                ]
            },
        },
    ]
    result = run_workflow(_workflow(tasks, templates), workers=2, log_dir=tmp_path / "logs")
    assert result.status == SUCCEEDED, [(n.name, n.state, n.message) for n in result.nodes]
    lines = _lines(journal)
    assert lines[0] == "first hi"
    assert lines[-1] == "got-from-file hi"
    assert sorted(lines[1:-1]) == ["layer-7 hi", "step-1 hi", "step-2 hi", "step-3 hi"]
    names = {n.name for n in result.nodes}
    assert "main.each(0:3)" in names and 'main.items(0:{"layer":7})' in names


def test_a_false_depends_omits_the_task_and_a_handled_failure_does_not_fail(tmp_path):
    journal = tmp_path / "journal"
    templates = {
        "fail": _script("import sys; sys.exit(3)"),
        "say": _script(_note(journal), inputs=["what"]),
    }
    say = {"template": "say"}
    tasks = [
        {"name": "bad", "template": "fail"},
        {
            **say,
            "name": "on-success",
            "depends": "bad",
            "arguments": {"parameters": [{"name": "what", "value": "ok"}]},
        },
        {
            **say,
            "name": "on-failure",
            "depends": "bad.Failed",
            "arguments": {"parameters": [{"name": "what", "value": "cleanup"}]},
        },
    ]
    result = run_workflow(_workflow(tasks, templates), workers=1, log_dir=tmp_path / "logs")
    assert _lines(journal) == ["['cleanup']"]
    assert result.status == SUCCEEDED
    states = {n.name: n.state for n in result.nodes}
    assert states["main.bad"] == FAILED
    assert "main.on-success" not in states  # omitted: never became a node


def test_retries_follow_the_policy_and_the_limit(tmp_path):
    counter = tmp_path / "count"
    # Fails twice, then succeeds: needs limit >= 2 under a policy that retries failures.
    flaky = (
        "import pathlib, sys; p = pathlib.Path(sys.argv[1]); n = len(p.read_text()) if p.exists() else 0; "
        "p.write_text('x' * (n + 1)); sys.exit(0 if n >= 2 else 1)"
    )

    def run(retry: dict[str, Any] | None) -> Any:
        counter.unlink(missing_ok=True)
        template = _script(flaky)
        template["container"]["args"] = [str(counter)]
        if retry:
            template["retryStrategy"] = retry
        return run_workflow(
            _workflow([{"name": "flaky", "template": "flaky"}], {"flaky": template}),
            workers=1,
            log_dir=tmp_path / f"logs-{json.dumps(retry)}".replace("/", "_"),
        )

    ok = run({"limit": "2", "retryPolicy": "Always"})
    assert ok.status == SUCCEEDED and ok.nodes[-1].attempts == 3
    short = run({"limit": 1})  # OnFailure by default
    assert short.status == FAILED and short.nodes[-1].attempts == 2
    on_error = run({"limit": 2, "retryPolicy": "OnError"})  # exit 1 is a failure, not an error
    assert on_error.status == FAILED and on_error.nodes[-1].attempts == 1
    assert run(None).nodes[-1].attempts == 1


def test_first_failure_stops_the_run_with_its_log_and_exit_handler_sees_it(tmp_path):
    journal = tmp_path / "journal"
    templates = {
        "boom": _script(
            "import sys; print('line one', file=sys.stderr); print('bad spec here', file=sys.stderr); sys.exit(2)"
        ),
        "slow": _script("import time; time.sleep(30)"),
        "say": _script(_note(journal), inputs=["what"]),
        "exit": _script(_note(journal, "exit {sys.argv[1]}"), inputs=[]),
    }
    templates["exit"]["container"]["args"] = ["{{workflow.status}}"]
    tasks = [
        {"name": "boom", "template": "boom"},
        {"name": "slow", "template": "slow"},
        {
            "name": "after",
            "template": "say",
            "depends": "boom",
            "arguments": {"parameters": [{"name": "what", "value": "x"}]},
        },
    ]
    start = time.monotonic()
    result = run_workflow(
        _workflow(tasks, templates, on_exit="exit"), workers=2, log_dir=tmp_path / "logs"
    )
    assert time.monotonic() - start < 20  # the slow task was stopped, not waited for
    assert result.status == FAILED
    assert result.failed is not None and result.failed.name == "main.boom"
    assert result.failed.message == "exit code 2"
    assert result.failed.log_tail().splitlines()[-1] == "bad spec here"
    states = {n.name: n.state for n in result.nodes}
    assert states["main.slow"] == STOPPED
    assert _lines(journal) == ["exit Failed"]  # `after` never ran; onExit did


def test_workers_and_template_parallelism_bound_concurrency(tmp_path):
    journal = tmp_path / "journal"
    code = (
        _note(journal, "start {time.monotonic()}")
        + "; time.sleep(0.6); "
        + _note(journal, "end {time.monotonic()}").split("; ", 1)[1]
    )
    templates = {"work": _script(code)}
    tasks = [{"name": "loop", "template": "work", "withItems": [1, 2, 3, 4]}]

    def peak(workers: int, parallelism: int | None) -> int:
        journal.unlink(missing_ok=True)
        result = run_workflow(
            _workflow(tasks, templates, parallelism),
            workers=workers,
            log_dir=tmp_path / f"l{workers}{parallelism}",
        )
        assert result.ok
        events = sorted((float(t), kind) for kind, t in (line.split() for line in _lines(journal)))
        running = best = 0
        for _, kind in events:
            running += 1 if kind == "start" else -1
            best = max(best, running)
        return best

    assert peak(workers=1, parallelism=None) == 1
    assert peak(workers=4, parallelism=2) == 2
    assert peak(workers=4, parallelism=None) >= 3


def test_nested_dag_with_inputs_from_workflow_arguments(tmp_path):
    journal = tmp_path / "journal"
    inner = {
        "inputs": {"parameters": [{"name": "run"}]},
        "dag": {
            "tasks": [
                {
                    "name": "do",
                    "template": "say",
                    "arguments": {
                        "parameters": [{"name": "what", "value": "{{inputs.parameters.run}}"}]
                    },
                }
            ]
        },
    }
    workflow = _workflow(
        [
            {
                "name": f"r{i}",
                "template": "inner",
                "arguments": {"parameters": [{"name": "run", "value": f"run-{i}"}]},
            }
            for i in range(2)
        ],
        {"inner": inner, "say": _script(_note(journal), inputs=["what"])},
    )
    result = run_workflow(workflow, workers=2, log_dir=tmp_path / "logs")
    assert result.ok
    assert sorted(_lines(journal)) == ["['run-0']", "['run-1']"]


def test_unresolvable_references_are_clear_errors(tmp_path):
    templates = {"say": _script("pass", inputs=["what"])}
    tasks = [
        {
            "name": "a",
            "template": "say",
            "arguments": {
                "parameters": [{"name": "what", "value": "{{tasks.nope.outputs.result}}"}]
            },
        }
    ]
    result = run_workflow(_workflow(tasks, templates), workers=1, log_dir=tmp_path / "logs")
    assert result.status == FAILED
    assert result.failed is not None
    assert "cannot resolve {{tasks.nope.outputs.result}}" in result.failed.message
    with pytest.raises(LocalRunError, match="unknown task 'ghost'"):
        run_workflow(
            _workflow([{"name": "a", "template": "say", "depends": "ghost"}], templates),
            workers=1,
            log_dir=tmp_path / "l2",
        )


def test_sigterm_to_driftlab_stops_its_tasks_too(tmp_path):
    """A killed `driftlab run` must not leave its tasks (own sessions) training on."""
    journal = tmp_path / "journal"
    pid_file = tmp_path / "task.pid"
    templates = {
        "slow": _script(
            f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
        ),
        "exit": _script(_note(journal, "exit {sys.argv[1]}"), inputs=[]),
    }
    templates["exit"]["container"]["args"] = ["{{workflow.status}}"]
    manifest = tmp_path / "workflow.json"
    manifest.write_text(
        json.dumps(_workflow([{"name": "slow", "template": "slow"}], templates, on_exit="exit"))
    )
    driver = (
        "import json, pathlib; from workflows.local import run_workflow; "
        f"run_workflow(json.load(open({str(manifest)!r})), workers=1, "
        f"log_dir=pathlib.Path({str(tmp_path / 'logs')!r}))"
    )
    parent = subprocess.Popen([sys.executable, "-c", driver], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not pid_file.exists() or not pid_file.read_text():
        if parent.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"the task never started: {parent.communicate()[1].decode()}")
        time.sleep(0.1)
    task_pid = int(pid_file.read_text())
    parent.send_signal(signal.SIGTERM)
    parent.wait(timeout=20)
    assert parent.returncode != 0
    gone_by = time.monotonic() + 10
    while _alive(task_pid):
        assert time.monotonic() < gone_by, "the task outlived its workflow"
        time.sleep(0.1)
    assert _lines(journal) == ["exit Failed"]  # the exit handler still ran


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
