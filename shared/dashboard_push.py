"""Upload the generated dashboards to a running Grafana.

    GRAFANA_TOKEN=... driftlab dashboards push --grafana-url URL [--folder-uid UID]

For a Grafana that does not run the chart's dashboard sidecar (the ConfigMap path). The
upload goes through `grafana-client`, an optional extra (`driftlab[grafana]`) kept out of
the core install and imported only here, only when pushing: its `urllib3-future`
dependency replaces `urllib3` for every library in the environment (minio's included)
unless it is installed with `URLLIB3_NO_OVERRIDE=1` and `--no-binary urllib3-future`.

The token is a Grafana service-account token, read from `--token` or `$GRAFANA_TOKEN`; it
is sent as a bearer token and never printed, not even in errors.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from shared.dashboards import rendered
from shared.errors import DriftlabError

TOKEN_ENV = "GRAFANA_TOKEN"
INSTALL_HINT = "URLLIB3_NO_OVERRIDE=1 pip install --no-binary urllib3-future 'driftlab[grafana]'"


class GrafanaPushError(DriftlabError):
    """Grafana is missing a piece (client, token) or refused the upload."""


def upload_body(dashboard: dict[str, Any], *, folder_uid: str | None = None) -> dict[str, Any]:
    """The body of Grafana's `POST /api/dashboards/db` for one generated dashboard.

    `overwrite` because the generated JSON is the source of truth: an upload replaces
    whatever version Grafana holds under the same uid. `id` is dropped so Grafana matches
    by uid across instances (an id is local to one database).
    """
    body: dict[str, Any] = {
        "dashboard": {k: v for k, v in dashboard.items() if k != "id"},
        "overwrite": True,
        "message": "driftlab dashboards push",
    }
    if folder_uid:
        body["folderUid"] = folder_uid
    return body


def push(
    grafana_url: str, token: str, *, folder_uid: str | None = None, timeout: float = 10.0
) -> list[str]:
    """Upload every generated dashboard; returns the URL Grafana gives each one."""
    if not token:
        raise GrafanaPushError(
            f"no Grafana token: set ${TOKEN_ENV} (or pass --token) to a service-account token "
            "with the Editor role"
        )
    try:
        from grafana_client import GrafanaApi
        from grafana_client.client import GrafanaException
    except ImportError:
        raise GrafanaPushError(
            f"`driftlab dashboards push` needs grafana-client; install it with: {INSTALL_HINT}"
        ) from None
    api = GrafanaApi.from_url(grafana_url, credential=token, timeout=timeout)
    urls = []
    for name, text in rendered().items():
        body = upload_body(json.loads(text), folder_uid=folder_uid)
        try:
            answer = api.dashboard.update_dashboard(body)
        except GrafanaException as err:
            raise GrafanaPushError(
                f"Grafana at {grafana_url} refused {name}: HTTP {err.status_code} {err.message}; "
                "check the token's role and the folder uid"
            ) from None
        except OSError as err:  # connection refused, DNS, TLS: niquests' errors are OSErrors
            raise GrafanaPushError(
                f"cannot reach Grafana at {grafana_url} ({type(err).__name__}); "
                "check --grafana-url (a port-forward may be needed)"
            ) from None
        urls.append(grafana_url.rstrip("/") + str(answer.get("url", "")))
    return urls


def _cmd_push(args: argparse.Namespace) -> int:
    token = args.token or os.environ.get(TOKEN_ENV, "")
    for url in push(args.grafana_url, token, folder_uid=args.folder_uid, timeout=args.timeout):
        print(url)
    return 0


def add_push_parser(sub: Any) -> None:
    """`driftlab dashboards push`."""
    cmd = sub.add_parser("push", help="upload the dashboards to Grafana (needs driftlab[grafana])")
    cmd.add_argument("--grafana-url", required=True, help="e.g. http://localhost:3000")
    cmd.add_argument(
        "--token",
        default=None,
        help=f"service-account token (default ${TOKEN_ENV}; prefer the variable: "
        "arguments show in the process list)",
    )
    cmd.add_argument("--folder-uid", default=None, help="Grafana folder (default: General)")
    cmd.add_argument("--timeout", type=float, default=10.0, help="seconds per request")
    cmd.set_defaults(handler=_cmd_push)
