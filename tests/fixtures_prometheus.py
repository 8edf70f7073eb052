"""A real Prometheus on loopback, scraping the test Pushgateway every second.

Checking that a metric was pushed does not show that a Grafana panel draws it: the panel's
PromQL must select it once Prometheus has scraped it, with the job and run labels the
Pushgateway hands on (`honor_labels`), and `rate()` needs two samples of a counter. This
Prometheus (Debian's `prometheus`) answers the panels' own queries.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures_pushgateway import PushgatewayServer
from tests.support import free_port, serving

#: Seconds between scrapes; a panel's `$__rate_interval` is four of them, as Grafana's is.
SCRAPE_S = 1
_READY_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class PrometheusServer:
    """Where the test Prometheus listens, and its range-query API."""

    url: str

    def query_range(self, expr: str, start: float, end: float) -> list[dict[str, Any]]:
        """The series `expr` returns between `start` and `end` (Unix seconds), a point a
        scrape; a query Prometheus refuses fails the test with its error."""
        params = urllib.parse.urlencode(
            {"query": expr, "start": start, "end": end, "step": f"{SCRAPE_S}s"}
        )
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/query_range?{params}", timeout=10) as r:
                body = json.loads(r.read())
        except urllib.error.HTTPError as err:
            pytest.fail(f"Prometheus refused {expr!r}: {err.read().decode()}")
        assert body["status"] == "success", body
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def wait_for_scrape(self) -> None:
        """Return once a scrape has started after this call (its samples are then in)."""
        time.sleep(2.5 * SCRAPE_S)


@pytest.fixture(scope="session")
def prometheus(pushgateway: PushgatewayServer) -> Iterator[PrometheusServer]:
    """Start Prometheus on a free loopback port, scraping the session's Pushgateway."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail(
            "Prometheus is not installed: run `apt-get install prometheus` "
            "(the dashboard test queries it)"
        )
    server = PrometheusServer(f"http://127.0.0.1:{free_port()}")
    with tempfile.TemporaryDirectory(prefix="prometheus-") as tmp:
        config = Path(tmp) / "prometheus.yml"
        config.write_text(
            f"global: {{scrape_interval: {SCRAPE_S}s, evaluation_interval: {SCRAPE_S}s}}\n"
            "scrape_configs:\n"
            "  - job_name: pushgateway\n"
            "    honor_labels: true\n"
            f"    static_configs: [{{targets: ['{pushgateway.address}']}}]\n"
        )
        argv = [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp}/data",
            f"--web.listen-address={server.url.removeprefix('http://')}",
        ]
        with serving(argv, server.url, "Prometheus", _READY_TIMEOUT_S):
            yield server
