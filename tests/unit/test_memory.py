"""The memory a stage is checked against: the machine's, or its container's limit."""

from __future__ import annotations

import os

import pytest

from shared import memory
from shared.errors import SpecError
from shared.spec import RunSpec, apply_overrides


def test_a_container_limit_is_the_memory_a_cpu_stage_has(tmp_path, monkeypatch):
    physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    limit = tmp_path / "memory.max"
    monkeypatch.setattr(memory, "CGROUP_MEMORY_MAX", str(limit))
    limit.write_text("2147483648\n")  # a pod's resources.memory: 2Gi
    assert memory.device_memory("cpu") == min(physical, 2 << 30)
    limit.write_text("max\n")  # no limit
    assert memory.device_memory("cpu") == physical
    limit.unlink()  # no cgroup v2 at all
    assert memory.device_memory("cpu") == physical


def test_needs_grow_with_the_fields_they_name():
    small = memory.memory_needs(RunSpec())
    wide = memory.memory_needs(apply_overrides(RunSpec(), {"sae.expansion": 64}))
    assert wide["sae"].bytes > 8 * small["sae"].bytes and wide["train"] == small["train"]
    with pytest.raises(SpecError, match="the sae stage needs at least"):
        memory.check_memory(
            apply_overrides(RunSpec(), {"sae.expansion": 64}), 8 << 20, stages=["sae"]
        )
    memory.check_memory(RunSpec(), 1 << 30)  # the defaults fit in a GiB
