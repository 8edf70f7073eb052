"""The local runner on small hand-written workflows (Argo's compiled form).

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
from collections.abc import Callable
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
    }
    tasks = [
        _say("first", "first"),
        {"name": "list", "template": "list", "depends": "first"},
        {
            **_say("each", "step-{{item}}"),
            "depends": "list",
            "withParam": "{{tasks.list.outputs.result}}",
        },
        {**_say("items", "layer-{{item}}"), "depends": "first", "withItems": [7, "x"]},
        # An empty fan-out is skipped, and what depends on it still runs.
        {**_say("none", "never"), "withItems": []},
        {**_say("last", "got-{{tasks.list.outputs.result}}"), "depends": "each && items&&none"},
    ]
    result = run_workflow(_workflow(tasks, templates), workers=2, log_dir=tmp_path / "logs")
    assert result.status == SUCCEEDED, [(n.name, n.state, n.message) for n in result.nodes]
    lines = _lines(journal)
    assert lines[0] == "first hi"
    assert lines[-1] == "got-[3, 1, 2] hi"
    assert sorted(lines[1:-1]) == [
        "layer-7 hi",
        "layer-x hi",
        "step-1 hi",
        "step-2 hi",
        "step-3 hi",
    ]
    names = {n.name for n in result.nodes}
    assert {"main.each(0:3)", "main.items(1:x)"} <= names


def _say(name: str, what: str) -> dict[str, Any]:
    """A task running template `say` with input `what`."""
    return {
        "name": name,
        "template": "say",
        "arguments": {"parameters": [{"name": "what", "value": what}]},
    }


_REFUSED: dict[str, tuple[dict[str, Any], str]] = {
    "continueOn": ({"continueOn": {"failed": True}}, "dag.tasks[a].continueOn"),
    "when": ({"when": "1 == 1"}, "dag.tasks[a].when"),
    "dependencies": ({"dependencies": ["b"]}, "dag.tasks[a].dependencies"),
    "withSequence": ({"withSequence": {"count": "2"}}, "dag.tasks[a].withSequence"),
    "a task result": ({"depends": "b.Failed"}, "dag.tasks[a].depends 'b.Failed'"),
    "an or": ({"depends": "b || b"}, "dag.tasks[a].depends 'b || b'"),
}


@pytest.mark.parametrize("field", sorted(_REFUSED))
def test_a_task_field_the_pipeline_does_not_emit_is_refused_naming_it(tmp_path, field):
    journal = tmp_path / "journal"
    extra, named = _REFUSED[field]
    tasks = [_say("b", "b"), {**_say("a", "a"), **extra}]
    templates = {"say": _script(_note(journal), inputs=["what"])}
    with pytest.raises(LocalRunError) as refused:
        run_workflow(_workflow(tasks, templates), workers=1, log_dir=tmp_path / "logs")
    message = str(refused.value)
    assert named in message and "not supported by the local runner" in message
    assert "\n" not in message
    assert _lines(journal) == []  # refused before anything ran


def test_template_and_container_fields_the_pipeline_does_not_emit_are_refused(tmp_path):
    def refusal(edit: Callable[[dict[str, Any]], Any]) -> str:
        workflow = _workflow([{"name": "a", "template": "say"}], {"say": _script("pass")})
        edit(workflow["spec"])
        with pytest.raises(LocalRunError) as refused:
            run_workflow(workflow, workers=1, log_dir=tmp_path / "logs")
        return str(refused.value)

    def say(spec: dict[str, Any]) -> dict[str, Any]:
        return next(t for t in spec["templates"] if t["name"] == "say")

    output = {"parameters": [{"name": "v", "valueFrom": {"path": "/tmp/v"}}]}
    assert "templates[say].outputs is not" in refusal(lambda s: say(s).update(outputs=output))
    assert "templates[say].container.workingDir is not" in refusal(
        lambda s: say(s)["container"].update(workingDir="/")
    )
    config = {"configMapKeyRef": {"name": "c", "key": "k"}}
    assert "env[SECRET].valueFrom.configMapKeyRef is not" in refusal(
        lambda s: say(s)["container"]["env"][1].update(valueFrom=config)
    )
    assert "spec.parallelism is not" in refusal(lambda s: s.update(parallelism=2))
    steps = {"name": "main", "steps": [[{"name": "a", "template": "say"}]]}
    assert "templates[main]: only container and dag templates run locally, not steps" in refusal(
        lambda s: s["templates"].__setitem__(0, steps)
    )


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


def _timed_work(journal: Path) -> dict[str, Any]:
    """A template that sleeps 0.6 s between journal lines `start T` and `end T`."""
    start = _note(journal, "start {time.monotonic()}")
    end = _note(journal, "end {time.monotonic()}").split("; ", 1)[1]
    return _script(f"{start}; time.sleep(0.6); {end}")


def _peak(journal: Path) -> int:
    """The most tasks that were running at once, from their journal lines."""
    events = sorted((float(t), kind) for kind, t in (line.split() for line in _lines(journal)))
    running = best = 0
    for _, kind in events:
        running += 1 if kind == "start" else -1
        best = max(best, running)
    return best


def test_a_failed_fan_out_item_stops_the_items_still_pending(tmp_path):
    """Item 0 fails at once; the other seven would take 30 s each, two at a time."""
    journal = tmp_path / "journal"
    code = _note(journal) + "; time.sleep(0.3 if sys.argv[1] == '0' else 30); sys.exit(3)"
    templates = {"item": _script(code, inputs=["what"])}
    tasks = [{**_say("fan", "{{item}}"), "template": "item", "withItems": list(range(8))}]
    start = time.monotonic()
    result = run_workflow(_workflow(tasks, templates), workers=2, log_dir=tmp_path / "logs")
    assert time.monotonic() - start < 5  # the old executor took 4 x 30 s here
    assert result.failed is not None and result.failed.name == "main.fan(0:0)"
    states = {n.name: n.state for n in result.nodes}
    assert states == {"main.fan(0:0)": FAILED, "main.fan(1:1)": STOPPED}
    assert result.nodes[1].message == "stopped after main.fan(0:0) failed"
    assert sorted(_lines(journal)) == ["['0']", "['1']"]  # the six pending never started


def test_a_deadline_fails_the_task_and_a_failed_exit_handler_fails_the_run(tmp_path):
    templates = {
        "slow": {**_script("import time; time.sleep(30)"), "activeDeadlineSeconds": "1"},
        "fine": _script("pass"),
        "exit": _script("import sys; sys.exit(5)"),
    }
    start = time.monotonic()
    late = run_workflow(
        _workflow([{"name": "slow", "template": "slow"}], templates), log_dir=tmp_path / "l1"
    )
    assert time.monotonic() - start < 10
    assert late.failed is not None
    assert late.failed.message == "exceeded activeDeadlineSeconds (1)"
    exit_fails = run_workflow(
        _workflow([{"name": "fine", "template": "fine"}], templates, on_exit="exit"),
        log_dir=tmp_path / "l2",
    )
    assert exit_fails.status == FAILED
    assert exit_fails.failed is not None and exit_fails.failed.name == "t.onExit"


def test_workers_and_template_parallelism_bound_concurrency(tmp_path):
    journal = tmp_path / "journal"
    templates = {"work": _timed_work(journal)}
    tasks = [{"name": "loop", "template": "work", "withItems": [1, 2, 3, 4]}]

    def peak(workers: int, parallelism: int | None) -> int:
        journal.unlink(missing_ok=True)
        result = run_workflow(
            _workflow(tasks, templates, parallelism),
            workers=workers,
            log_dir=tmp_path / f"l{workers}{parallelism}",
        )
        assert result.ok
        return _peak(journal)

    assert peak(workers=1, parallelism=None) == 1
    assert peak(workers=4, parallelism=2) == 2
    assert peak(workers=4, parallelism=None) >= 3


def test_a_sweep_runs_its_nested_pipelines_parallelism_at_a_time(tmp_path):
    """The sweep's shape: a DAG with `parallelism` whose tasks are whole pipeline DAGs."""
    journal = tmp_path / "journal"
    pipeline = {
        "dag": {
            "tasks": [
                {"name": "a", "template": "work"},
                {"name": "b", "template": "work", "depends": "a"},
            ]
        }
    }
    tasks = [{"name": f"run-{i}", "template": "pipeline"} for i in range(3)]
    templates = {"pipeline": pipeline, "work": _timed_work(journal)}
    result = run_workflow(
        _workflow(tasks, templates, parallelism=1), workers=4, log_dir=tmp_path / "logs"
    )
    assert result.ok
    assert _peak(journal) == 1
    assert len(_lines(journal)) == 2 * 2 * 3
    assert [n.name for n in result.nodes][:2] == ["main.run-0.a", "main.run-0.b"]


def test_a_capped_fan_out_runs_its_items_from_an_input_parallelism_at_a_time(tmp_path):
    """The pipeline's capped fan-out (`<task>-fan-out`): a DAG with `parallelism` looping
    over its `items` input, which an earlier task's output fills."""
    journal = tmp_path / "journal"
    work = _timed_work(journal)
    work["inputs"] = {"parameters": [{"name": "layer"}]}
    work["container"]["args"] = ["{{inputs.parameters.layer}}"]
    capped = {
        "inputs": {"parameters": [{"name": "items"}]},
        "parallelism": 2,
        "dag": {
            "tasks": [
                {
                    "name": "work",
                    "template": "work",
                    "withParam": "{{inputs.parameters.items}}",
                    "arguments": {"parameters": [{"name": "layer", "value": "{{item}}"}]},
                }
            ]
        },
    }
    items = _script("print('[0, 1, 2, 3, 4]')")
    tasks = [
        {"name": "list", "template": "list"},
        {
            "name": "fan-out",
            "template": "capped",
            "depends": "list",
            "arguments": {
                "parameters": [{"name": "items", "value": "{{tasks.list.outputs.result}}"}]
            },
        },
    ]
    templates = {"list": items, "capped": capped, "work": work}
    result = run_workflow(_workflow(tasks, templates), workers=4, log_dir=tmp_path / "logs")
    assert result.ok
    assert _peak(journal) == 2
    assert len(_lines(journal)) == 2 * 5


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
            _workflow([{**_say("a", "x"), "depends": "ghost"}], templates),
            workers=1,
            log_dir=tmp_path / "l2",
        )


def _start_runner(tmp_path: Path, journal: Path) -> tuple[subprocess.Popen[bytes], int]:
    """A runner process on a workflow whose one task sleeps; it and the task's pid."""
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
    runner = subprocess.Popen([sys.executable, "-c", driver], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not pid_file.exists() or not pid_file.read_text():
        if runner.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"the task never started: {runner.communicate()[1].decode()}")
        time.sleep(0.1)
    return runner, int(pid_file.read_text())


def _assert_gone_within(pid: int, seconds: float) -> None:
    gone_by = time.monotonic() + seconds
    while _alive(pid):
        assert time.monotonic() < gone_by, f"the task {pid} outlived its workflow"
        time.sleep(0.05)


def test_sigterm_to_driftlab_stops_its_tasks_too(tmp_path):
    """A stopped `driftlab run` must not leave its tasks (own sessions) training on."""
    journal = tmp_path / "journal"
    runner, task_pid = _start_runner(tmp_path, journal)
    runner.send_signal(signal.SIGTERM)
    runner.wait(timeout=20)
    assert runner.returncode != 0
    _assert_gone_within(task_pid, 10)
    assert _lines(journal) == ["exit Failed"]  # the exit handler still ran


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_sigkill_of_the_runner_leaves_no_stage_alive(tmp_path):
    """Nothing of driftlab runs after a SIGKILL, yet its stage must end too (no rerun race)."""
    runner, task_pid = _start_runner(tmp_path, tmp_path / "journal")
    runner.kill()
    runner.wait(timeout=10)
    _assert_gone_within(task_pid, 3)


def _alive(pid: int) -> bool:
    """Running: a zombie (dead, not yet reaped by whoever adopted it) counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
