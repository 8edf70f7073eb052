"""The end of a run: its final status recorded, its Pushgateway groups removed.

Argo's onExit handler (and the local executor, which runs the same handler) calls
`driftlab finish`. The Pushgateway keeps every pushed group forever, so without this a
cluster's Pushgateway would grow by a few groups per run and Grafana would show finished
runs' last values as if they were live; the run's numbers stay in the store.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from datetime import UTC, datetime

from shared import layout
from shared.store import Store
from shared.telemetry import GATEWAY_ENV, JOB

WORKFLOW_STATUS = "workflow"
_STATES = {"Succeeded": "succeeded", "Failed": "failed", "Error": "failed"}
_TIMEOUT_S = 5.0


def record_outcome(store: Store, run_id: str, argo_status: str) -> str:
    """Write `status/workflow.json` (the whole graph's state, Argo's word kept); its key."""
    key = layout.status_key(run_id, WORKFLOW_STATUS)
    store.put_json(
        key,
        {
            "stage": WORKFLOW_STATUS,
            "run_id": run_id,
            "state": _STATES.get(argo_status, "failed"),
            "argo_status": argo_status,
            "ended_at": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        },
    )
    return key


def delete_pushgateway_groups(gateway: str, run_id: str) -> int:
    """Delete every group of `run_id` (job=driftlab) from the Pushgateway; how many.

    Groups are listed from the Pushgateway's own API rather than rebuilt from stage names,
    so shards (one per checkpoint or layer) are found whatever the graph was.
    """
    base = gateway if "://" in gateway else f"http://{gateway}"
    base = base.rstrip("/")
    with urllib.request.urlopen(f"{base}/api/v1/metrics", timeout=_TIMEOUT_S) as resp:
        groups = json.load(resp).get("data") or []
    deleted = 0
    for group in groups:
        labels = group.get("labels") or {}
        if labels.get("job") != JOB or labels.get("run_id") != run_id:
            continue
        path = "".join(
            f"/{urllib.parse.quote(k, safe='')}/{urllib.parse.quote(v, safe='')}"
            for k, v in labels.items()
            if k != "job"
        )
        request = urllib.request.Request(
            f"{base}/metrics/job/{urllib.parse.quote(JOB)}{path}", method="DELETE"
        )
        with urllib.request.urlopen(request, timeout=_TIMEOUT_S):
            deleted += 1
    return deleted


def gateway_from_environment() -> str | None:
    return os.environ.get(GATEWAY_ENV, "").strip() or None
