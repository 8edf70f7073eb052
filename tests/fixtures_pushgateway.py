"""A real Prometheus Pushgateway on loopback, for the whole test session.

Telemetry is tested against the real server (Debian's `prometheus-pushgateway`), not a
mock: grouping-key encoding, PUT/POST semantics and its consistency checks are exactly
what breaks in production. Tests share one server, so each uses its own run id.
"""

from __future__ import annotations

import shutil
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from tests.support import free_port, serving

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
    argv = [binary, f"--web.listen-address={server.address}", "--persistence.file="]
    with serving(argv, server.url, "the Pushgateway", _READY_TIMEOUT_S):
        yield server
