"""Shared fixtures. Real servers on loopback live in their own fixture modules; plain values
and helpers (paths, a stage's environment, a free port) in `tests/support.py`.

Tests are in three folders: `unit/` (one module or command, in process), `stages/` (a
stage under its contract, on a real store) and `e2e/` (the whole graph through
`driftlab run`).
"""

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from shared.store import Store, open_store

pytest_plugins = ["tests.fixtures_s3", "tests.fixtures_pushgateway", "tests.fixtures_prometheus"]


@pytest.fixture
def store(tmp_path: Path) -> Store:
    """An empty folder store for the test."""
    return open_store(tmp_path / "store")


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Torch on one thread for the test: the CPU is shared, and small tensors gain nothing."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
