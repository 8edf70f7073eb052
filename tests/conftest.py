"""Test plumbing: real servers on loopback live in their own fixture modules."""

from collections.abc import Iterator

import pytest
import torch

pytest_plugins = ["tests.fixtures_s3", "tests.fixtures_pushgateway"]


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Torch on one thread for the test: the CPU is shared, and small tensors gain nothing."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
