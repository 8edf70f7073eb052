"""`driftlab submit` against a recording HTTP server on loopback.

The one server plays both the Argo server (POST /api/v1/workflows/<ns>) and the
Kubernetes API (GET /api/v1/nodes, reached through a kubeconfig pointing at it), so the
real Hera and kubernetes clients make real requests.
"""

from __future__ import annotations

import json
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
from shared.store import open_store
from tests.support import ARGO, ROOT

TINY_MODULE = str(ROOT / "workflows" / "tiny_cpu.py")


class Recorder:
    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.nodes: list[dict[str, Any]] = []


@pytest.fixture
def server() -> Iterator[tuple[str, Recorder]]:
    recorder = Recorder()

    class Handler(BaseHTTPRequestHandler):
        def _reply(self, body: Any) -> None:
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            recorder.requests.append(
                {"method": "GET", "path": self.path, "headers": dict(self.headers)}
            )
            self._reply(
                {"kind": "NodeList", "apiVersion": "v1", "metadata": {}, "items": recorder.nodes}
            )

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            recorder.requests.append(
                {"method": "POST", "path": self.path, "headers": dict(self.headers), "body": body}
            )
            self._reply(body["workflow"])

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", recorder
    httpd.shutdown()
    httpd.server_close()


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
    posts = [r for r in recorder.requests if r["method"] == "POST"]
    assert len(posts) == 1
    post = posts[0]
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
    assert [r["path"] for r in recorder.requests] == ["/api/v1/workflows/driftlab"]
    code = cli.main(
        ["submit", str(spec), "--profile", "cpu", "--argo-server", "", "--store", str(tmp_path)]
    )
    err = capsys.readouterr().err
    assert code != 0
    assert err.strip().splitlines()[-1].startswith("driftlab: error: no Argo server")
    code = cli.main(["submit", str(tmp_path / "nope.py"), "--dry-run"])
    assert code != 0 and "no such file" in capsys.readouterr().err
