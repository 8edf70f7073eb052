"""A real Prometheus Pushgateway on loopback, for the whole test session.

Telemetry is tested against the real server (Debian's `prometheus-pushgateway`), not a
mock: grouping-key encoding, PUT/POST semantics and its consistency checks are exactly
what breaks in production. Tests share one server, so each uses its own run id.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from tests.support import free_port

_BINARIES = ("prometheus-pushgateway", "pushgateway")
_READY_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class PushgatewayServer:
    """Where the test Pushgateway listens, and a reader for what it holds."""

    address: str  # host:port, the form DRIFTLAB_PUSHGATEWAY takes

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def samples(self, name: str, **labels: str) -> list[Sample]:
        """Samples called `name` whose labels include `labels` (from GET /metrics)."""
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        return [
            sample
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == name and labels.items() <= sample.labels.items()
        ]

    def names(self, **labels: str) -> set[str]:
        """Metric names with a sample whose labels include `labels`: counters by their
        `_total` name, histograms by their family name (not `_bucket`/`_count`/`_sum`)."""
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        return {
            family.name if family.type == "histogram" else sample.name
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if labels.items() <= sample.labels.items()
        }

    def value(self, name: str, **labels: str) -> float:
        """The one sample `name`{labels...}; fails unless exactly one matches."""
        found = self.samples(name, **labels)
        assert len(found) == 1, f"expected one {name}{labels}, found {found}"
        return found[0].value


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/-/ready", timeout=1) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


@pytest.fixture(scope="session")
def pushgateway() -> Iterator[PushgatewayServer]:
    """Start the Pushgateway binary on a free loopback port, in memory only."""
    binary = next((path for name in _BINARIES if (path := shutil.which(name))), None)
    if binary is None:
        pytest.fail(
            "the Prometheus Pushgateway binary is not installed: "
            "run `apt-get install prometheus-pushgateway` (the telemetry tests need it)"
        )
    server = PushgatewayServer(f"127.0.0.1:{free_port()}")
    # A file, not a pipe: a pipe nobody reads would block the server once full.
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(
            [binary, f"--web.listen-address={server.address}", "--persistence.file="],
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            deadline = time.monotonic() + _READY_TIMEOUT_S
            while not _ready(server.url):
                if proc.poll() is not None:
                    log.seek(0)
                    pytest.fail(f"the Pushgateway exited at start:\n{log.read().strip()}")
                if time.monotonic() > deadline:
                    pytest.fail(f"the Pushgateway at {server.url} was not ready in time")
                time.sleep(0.05)
            yield server
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
