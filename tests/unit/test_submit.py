"""`driftlab submit` against a recording HTTP server on loopback: contract tests.

A real Kubernetes or Argo cannot run here. The one server plays both the Argo server
(GET /api/v1/version, GET /api/v1/workflow-templates/<ns>, POST /api/v1/workflows/<ns>)
and the Kubernetes API (GET /version, /api/v1/nodes, the chart's ConfigMap, the
WorkflowTemplates; POST of a Workflow), reached through a kubeconfig pointing at it, with
the bodies those APIs document; so the real Hera and kubernetes clients make real requests
and the tests hold submit to that contract.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from cli import main as cli
from shared import layout
from shared.lease import hold_lease
from shared.registry import create_run
from shared.spec import load_spec
from shared.store import open_store
from tests.support import ARGO, ROOT, TINY_SPEC
from workflows.submit import CHART_CONFIGMAP
from workflows.template_names import template_names

TINY_MODULE = str(ROOT / "workflows" / "tiny_cpu.py")
_ARGO_VERSION = {
    "version": "v4.1.2", "buildDate": "2025-01-01T00:00:00Z", "gitCommit": "0" * 40,
    "gitTag": "v4.1.2", "gitTreeState": "clean", "goVersion": "go1.24", "compiler": "gc",
    "platform": "linux/amd64",
}  # fmt: skip
_KUBE_VERSION = {
    "major": "1", "minor": "30", "gitVersion": "v1.30.0", "gitCommit": "0" * 40,
    "gitTreeState": "clean", "buildDate": "2025-01-01T00:00:00Z", "goVersion": "go1.24",
    "compiler": "gc", "platform": "linux/amd64",
}  # fmt: skip


class Recorder:
    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.nodes: list[dict[str, Any]] = []
        self.store: str | None = None  # the chart's ConfigMap holds it; None: no chart
        self.templates: list[str] = []  # WorkflowTemplates in every namespace
        self.workflows: set[str] = set()  # names of the Workflows created, as Argo keeps them

    def posts(self) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["method"] == "POST"]

    def reply(self, path: str) -> tuple[int, Any]:
        """The status and body each API answers `path` with."""
        path = path.split("?")[0].rstrip("/")
        if path == "/version":
            return 200, _KUBE_VERSION
        if path == "/api/v1/version":
            return 200, _ARGO_VERSION
        if path == "/api/v1/nodes":
            return 200, {
                "kind": "NodeList",
                "apiVersion": "v1",
                "metadata": {},
                "items": self.nodes,
            }
        if re.fullmatch(rf"/api/v1/namespaces/[^/]+/configmaps/{CHART_CONFIGMAP}", path):
            if self.store is None:
                return 404, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                             "reason": "NotFound", "code": 404}  # fmt: skip
            data = {"store": self.store}
            return 200, {"kind": "ConfigMap", "apiVersion": "v1", "metadata": {}, "data": data}
        items = [{"metadata": {"name": n}, "spec": {}} for n in self.templates]
        if re.fullmatch(r"/api/v1/workflow-templates/[^/]+", path):
            return 200, {"items": items, "metadata": {}}
        if re.fullmatch(r"/apis/argoproj.io/v1alpha1/namespaces/[^/]+/workflowtemplates", path):
            return 200, {"apiVersion": "argoproj.io/v1alpha1", "items": items, "metadata": {}}
        return 404, {"message": f"no route {path}"}


@pytest.fixture
def server() -> Iterator[tuple[str, Recorder]]:
    recorder = Recorder()

    class Handler(BaseHTTPRequestHandler):
        def _reply(self, code: int, body: Any) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            recorder.requests.append(
                {"method": "GET", "path": self.path, "headers": dict(self.headers)}
            )
            self._reply(*recorder.reply(self.path))

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            recorder.requests.append(
                {"method": "POST", "path": self.path, "headers": dict(self.headers), "body": body}
            )
            # The Argo server takes a create request and answers 200; Kubernetes takes the
            # Workflow itself and answers 201 Created; both refuse a name in use with 409.
            workflow = body.get("workflow", body)
            name = workflow["metadata"]["name"]
            if name in recorder.workflows:
                message = f'workflows.argoproj.io "{name}" already exists'
                self._reply(409, {"code": 6, "message": message, "reason": "AlreadyExists"})
                return
            recorder.workflows.add(name)
            self._reply(200 if "workflow" in body else 201, workflow)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", recorder
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def _no_store_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DRIFTLAB_STORE", raising=False)


def _node(name: str, gpus: str | None) -> dict[str, Any]:
    allocatable = {"cpu": "4", "memory": "8Gi"} | ({"nvidia.com/gpu": gpus} if gpus else {})
    return {"metadata": {"name": name}, "status": {"allocatable": allocatable}}


@pytest.fixture
def kubeconfig(
    server: tuple[str, Recorder], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Path:
    url, _ = server
    path = tmp_path / "kubeconfig"
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "fake", "cluster": {"server": url}}],
                "users": [{"name": "me", "user": {"token": "kube-token"}}],
                "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "me"}}],
                "current-context": "fake",
            }
        )
    )
    monkeypatch.setenv("KUBECONFIG", str(path))
    return path


def _workflow_validator() -> Any:
    schema = json.loads((ARGO / "schema.json").read_text())
    schema = {**schema, "$ref": "#/definitions/io.argoproj.workflow.v1alpha1.Workflow"}
    schema.pop("oneOf", None)
    schema.pop("type", None)
    return jsonschema.Draft202012Validator(schema)


@pytest.mark.parametrize(("gpus", "profile"), [(None, "cpu"), ("2", "gpu"), ("0", "cpu")])
def test_submit_via_argo_posts_a_valid_workflow_and_registers_the_run(
    server, kubeconfig, tmp_path, capsys, gpus, profile
):
    url, recorder = server
    recorder.nodes = [_node("cpu-node", None), _node("maybe-gpu", gpus)]
    store_dir = tmp_path / "store"
    code = cli.main(
        [
            "submit", TINY_MODULE, "--argo-server", url, "--token", "s3cret",
            "--namespace", "research", "--store", str(store_dir),
        ]
    )  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    assert f"using the {profile} profile" in err or f"{profile} profile" in err
    (post,) = recorder.posts()
    assert post["path"] == "/api/v1/workflows/research"
    assert post["headers"]["Authorization"] == "Bearer s3cret"
    workflow = post["body"]["workflow"]
    assert list(_workflow_validator().iter_errors(workflow)) == []
    run_id = out.strip()
    assert workflow["metadata"]["name"] == run_id
    assert workflow["metadata"]["namespace"] == "research"
    assert workflow["spec"]["arguments"]["parameters"] == [
        {"name": "run", "value": run_id},
        {"name": "store", "value": str(store_dir)},
    ]
    train = next(t for t in workflow["spec"]["templates"] if t["name"] == "train")
    assert ("nodeSelector" in train) is (profile == "gpu")
    # The spec is in the store before any pod could look for it.
    assert open_store(str(store_dir)).exists(layout.spec_key(run_id))
    assert f"{url}/workflows/research/{run_id}" in err
    node_lists = [r for r in recorder.requests if r["path"].startswith("/api/v1/nodes")]
    assert len(node_lists) == 1  # the profile came from the cluster


def test_dry_run_contacts_nothing_and_writes_nothing(server, kubeconfig, tmp_path, capsys):
    url, recorder = server
    store_dir = tmp_path / "store"
    code = cli.main(
        ["submit", TINY_MODULE, "--argo-server", url, "--store", str(store_dir), "--dry-run"]
    )
    out, _ = capsys.readouterr()
    assert code == 0
    assert recorder.requests == []
    assert not store_dir.exists()
    manifest = yaml.safe_load(out)
    assert manifest["kind"] == "Workflow"
    assert list(_workflow_validator().iter_errors(manifest)) == []


def test_a_spec_file_submits_too_and_errors_are_one_line(server, tmp_path, capsys):
    url, recorder = server
    spec = ROOT / "configs" / "tiny-cpu.yaml"
    code = cli.main(
        [
            "submit",
            str(spec),
            "--profile",
            "cpu",
            "--argo-server",
            url,
            "--store",
            str(tmp_path / "s"),
        ]
    )
    assert code == 0
    # The server answers first; templates are looked up; the workflow goes last.
    assert [r["path"].split("?")[0] for r in recorder.requests] == [
        "/api/v1/version",
        "/api/v1/workflow-templates/driftlab",
        "/api/v1/workflows/driftlab",
    ]
    code = cli.main(
        ["submit", str(spec), "--profile", "cpu", "--argo-server", "", "--store", str(tmp_path)]
    )
    err = capsys.readouterr().err
    assert code != 0
    assert err.strip().splitlines()[-1].startswith("driftlab: error: no Argo server")
    code = cli.main(["submit", str(tmp_path / "nope.py"), "--dry-run"])
    assert code != 0 and "no such file" in capsys.readouterr().err


def _submit(url: str, *args: str) -> int:
    return cli.main(["submit", TINY_MODULE, "--argo-server", url, "--profile", "cpu", *args])


def test_contract_without_a_store_submit_takes_the_charts_configmap_or_stops(
    server, kubeconfig, tmp_path, capsys
):
    url, recorder = server
    code = _submit(url)
    err = capsys.readouterr().err
    assert code != 0
    assert err.strip().splitlines()[-1] == (
        "driftlab: error: no store: pass --store URL, set $DRIFTLAB_STORE, or install the "
        "driftlab chart in namespace driftlab (its ConfigMap driftlab-config names the store)"
    )
    assert recorder.posts() == []
    recorder.store = str(tmp_path / "chart-store")
    assert _submit(url) == 0
    out, err = capsys.readouterr()
    assert f"store {recorder.store} (ConfigMap driftlab/driftlab-config)" in err
    assert open_store(recorder.store).exists(layout.spec_key(out.strip()))
    (post,) = recorder.posts()
    assert post["body"]["workflow"]["spec"]["arguments"]["parameters"][-1]["value"] == (
        recorder.store
    )


@pytest.mark.parametrize("via", ["argo", "kubernetes"])
def test_contract_an_unreachable_cluster_stops_submit_before_the_store_is_touched(
    via, tmp_path, capsys, monkeypatch
):
    """A refused connection (nothing listens on the port) and a missing kubeconfig."""
    import socket

    with socket.socket() as probe:  # a port nothing listens on once it is closed
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}"
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-such-kubeconfig"))
    store_dir = tmp_path / "store"
    code = _submit(dead, "--via", via, "--store", str(store_dir))
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert code != 0
    if via == "argo":
        assert line.startswith(f"driftlab: error: Argo server {dead} does not answer (")
        assert line.endswith("check --argo-server and --token (or $ARGO_SERVER, $ARGO_TOKEN), "
                             "or use --via kubernetes")  # fmt: skip
    else:
        assert line == (
            "driftlab: error: no Kubernetes configuration: set KUBECONFIG (or ~/.kube/config) "
            "to create the Workflow, or use --via argo"
        )
    assert not store_dir.exists()


def test_contract_via_kubernetes_checks_the_api_then_creates_the_workflow(
    server, kubeconfig, tmp_path, capsys
):
    _, recorder = server
    store_dir = tmp_path / "store"
    code = cli.main(
        [
            "submit",
            TINY_MODULE,
            "--via",
            "kubernetes",
            "--profile",
            "cpu",
            "--store",
            str(store_dir),
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    run_id = out.strip()
    paths = [r["path"].split("?")[0] for r in recorder.requests]
    workflows = "/apis/argoproj.io/v1alpha1/namespaces/driftlab/workflows"
    assert paths == [
        "/version/",
        "/apis/argoproj.io/v1alpha1/namespaces/driftlab/workflowtemplates",
        workflows,
    ]
    (post,) = recorder.posts()
    headers = {name.lower(): value for name, value in post["headers"].items()}
    assert headers["authorization"] == "Bearer kube-token"  # the kubeconfig's user
    assert list(_workflow_validator().iter_errors(post["body"])) == []
    assert post["body"]["metadata"]["name"] == run_id


@pytest.mark.parametrize("via", ["argo", "kubernetes"])
def test_contract_the_charts_versioned_templates_are_referenced_when_installed(
    via, server, kubeconfig, tmp_path, capsys
):
    url, recorder = server
    names = template_names(load_spec(TINY_SPEC), "cpu")
    recorder.templates = ["driftlab-train", *names.values()]  # an unversioned one is ignored
    code = _submit(url, "--via", via, "--store", str(tmp_path / "store"))
    err = capsys.readouterr().err
    assert code == 0, err
    assert "using the chart's WorkflowTemplates" in err
    (post,) = recorder.posts()
    workflow = post["body"].get("workflow", post["body"])
    assert list(_workflow_validator().iter_errors(workflow)) == []
    refs = {
        task["name"]: task["templateRef"]["name"]
        for template in workflow["spec"]["templates"]
        for task in template.get("dag", {}).get("tasks", [])
        if "templateRef" in task
    }
    assert refs == {task: name for task, name in names.items() if task != "detect"}  # off
    # One template missing (an older chart): every template is inlined instead.
    recorder.templates = list(names.values())[1:]
    recorder.requests.clear()
    assert _submit(url, "--via", via, "--store", str(tmp_path / "store")) == 0
    assert "templates inlined" in capsys.readouterr().err
    (post,) = recorder.posts()
    assert "templateRef" not in json.dumps(post["body"])


def test_contract_resubmitting_a_run_keeps_its_id_and_spec(server, kubeconfig, tmp_path, capsys):
    url, recorder = server
    store_dir = str(tmp_path / "store")
    assert _submit(url, "--store", store_dir) == 0
    run_id = capsys.readouterr().out.strip()
    # Argo still keeps the run's first workflow, under the same name: say how to clear it.
    assert _submit(url, "--store", store_dir, "--run", run_id) != 0
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"driftlab: error: workflow {run_id} already exists in driftlab: delete it first "
        f"(`argo delete -n driftlab {run_id}`, or `kubectl delete workflow -n driftlab "
        f"{run_id}`); the run's finished stages stay cached"
    )
    recorder.workflows.clear()  # argo delete
    assert _submit(url, "--store", store_dir, "--run", run_id) == 0
    assert capsys.readouterr().out.strip() == run_id
    second = recorder.posts()[-1]["body"]["workflow"]
    assert second["metadata"]["name"] == run_id
    assert second["spec"]["arguments"]["parameters"][0] == {"name": "run", "value": run_id}

    other = str(ROOT / "configs" / "grokking-cpu.yaml")
    posted = len(recorder.posts())
    code = cli.main(
        ["submit", other, "--argo-server", url, "--profile", "cpu", "--store", store_dir,
         "--run", run_id]
    )  # fmt: skip
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert code != 0
    assert line.startswith(f"driftlab: error: run {run_id} in file://{store_dir} already has")
    code = _submit(url, "--store", store_dir, "--run", "tiny-cpu-20000101-000000-abcdef")
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert code != 0
    assert line == (
        f"driftlab: error: run tiny-cpu-20000101-000000-abcdef is not registered in {store_dir}: "
        "leave out --run to register a new run, or pass the --store it lives in"
    )
    assert len(recorder.posts()) == posted  # nothing submitted


def test_contract_resubmitting_is_refused_while_a_live_writer_holds_the_run(
    server, kubeconfig, tmp_path, capsys
):
    url, recorder = server
    store = open_store(tmp_path / "store")
    run_id = create_run(store, load_spec(TINY_SPEC))
    with hold_lease(store, run_id, "driftlab run"):
        code = _submit(url, "--store", store.url, "--run", run_id)
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 3
    assert line.startswith(f"driftlab: error: run {run_id} is being written by driftlab run on ")
    assert recorder.posts() == []
    assert _submit(url, "--store", store.url, "--run", run_id) == 0  # released: it goes


def test_contract_a_sweep_cannot_be_resubmitted_as_one_run(server, kubeconfig, tmp_path, capsys):
    url, recorder = server
    code = cli.main(
        ["submit", str(ROOT / "workflows" / "sweep.py"), "--argo-server", url, "--profile",
         "cpu", "--store", str(tmp_path / "s"), "--run", "lr-20000101-000000-abcdef"]
    )  # fmt: skip
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert code != 0
    assert "a sweep registers new runs, so submit it without --run" in line
    assert recorder.posts() == []
