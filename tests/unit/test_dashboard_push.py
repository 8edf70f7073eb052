"""`driftlab dashboards push`: the request Grafana receives, and one-line errors.

The upload is a contract test against a recording HTTP server on 127.0.0.1 that answers
like Grafana's `POST /api/dashboards/db` (no Grafana server is available here), driven by
the real grafana-client, which `make install` installs the safe way (URLLIB3_NO_OVERRIDE=1,
--no-binary urllib3-future). The install hint, the missing-token error and the request body
are tested without the client.
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from cli.main import main
from shared import dashboards
from shared.dashboard_push import TOKEN_ENV, upload_body

TOKEN = "glsa_secret-token-for-tests"


class RecordingGrafana(ThreadingHTTPServer):
    """Records every request; answers with `status` and Grafana's success body."""

    def __init__(self, status: int) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.status = status
        self.requests: list[dict[str, Any]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: RecordingGrafana

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.requests.append(
            {"path": self.path, "headers": dict(self.headers), "body": json.loads(body)}
        )
        if self.server.status == 200:
            uid = json.loads(body)["dashboard"]["uid"]
            answer = {"id": 1, "uid": uid, "url": f"/d/{uid}/driftlab", "status": "success"}
        else:
            answer = {"message": "Invalid API key"}
        data = json.dumps(answer).encode()
        self.send_response(self.server.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _serve(status: int) -> Iterator[RecordingGrafana]:
    server = RecordingGrafana(status)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def grafana() -> Iterator[RecordingGrafana]:
    yield from _serve(200)


@pytest.fixture
def grafana_refusing() -> Iterator[RecordingGrafana]:
    yield from _serve(401)


@pytest.fixture
def client() -> None:
    """The real client: `make install` installs driftlab[grafana] (safely), so CI has it."""
    import grafana_client  # noqa: F401


def test_body_overwrites_the_dashboard_by_uid_in_the_folder() -> None:
    board = {**dashboards.dashboard(), "id": 7}
    body = upload_body(board, folder_uid="ml")
    assert body["overwrite"] is True
    assert body["folderUid"] == "ml"
    assert "id" not in body["dashboard"], "ids are local to one Grafana database"
    assert body["dashboard"] == dashboards.dashboard()
    assert "folderUid" not in upload_body(board)


def test_contract_push_posts_every_dashboard_with_the_bearer_token(
    client: None,
    grafana: RecordingGrafana,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    assert main(["dashboards", "push", "--grafana-url", grafana.url]) == 0
    rendered = {json.loads(t)["uid"]: json.loads(t) for t in dashboards.rendered().values()}
    assert [r["path"] for r in grafana.requests] == ["/api/dashboards/db"] * len(rendered)
    for request in grafana.requests:
        assert request["headers"]["Authorization"] == f"Bearer {TOKEN}"
        body = request["body"]
        assert body["overwrite"] is True
        assert body["dashboard"] == rendered[body["dashboard"]["uid"]]
    out, err = capsys.readouterr()
    assert out.split() == [f"{grafana.url}/d/{uid}/driftlab" for uid in rendered]
    assert TOKEN not in out + err


def test_contract_token_flag_wins_and_a_refusal_is_one_line_without_the_token(
    client: None,
    grafana_refusing: RecordingGrafana,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv(TOKEN_ENV, "from-the-environment")
    args = ["dashboards", "push", "--grafana-url", grafana_refusing.url, "--token", TOKEN]
    assert main(args) == 1
    (request,) = grafana_refusing.requests
    assert request["headers"]["Authorization"] == f"Bearer {TOKEN}"
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and "HTTP 401" in err and grafana_refusing.url in err
    assert TOKEN not in err


def test_unreachable_grafana_is_one_line(
    client: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with RecordingGrafana(200) as closed:  # bound, then closed: nothing listens there
        url = closed.url
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    assert main(["dashboards", "push", "--grafana-url", url, "--timeout", "2"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cannot reach Grafana at {url}" in err
    assert TOKEN not in err


def test_without_grafana_client_the_error_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "grafana_client", None)  # as if not installed
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    assert main(["dashboards", "push", "--grafana-url", "http://127.0.0.1:9"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "URLLIB3_NO_OVERRIDE=1 pip install --no-binary urllib3-future" in err
    assert "'driftlab[grafana]'" in err


def test_without_a_token_nothing_is_sent(
    grafana: RecordingGrafana, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    assert main(["dashboards", "push", "--grafana-url", grafana.url]) == 1
    assert grafana.requests == []
    assert f"${TOKEN_ENV}" in capsys.readouterr().err
