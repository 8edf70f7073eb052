"""benchmarks/gpu_suite.py: the one call a lent GPU gets must end inside its budget and keep
what every step printed, whatever the steps do."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from tests.support import ROOT


@pytest.fixture(scope="module")
def suite_module():
    spec = importlib.util.spec_from_file_location("gpu_suite", ROOT / "benchmarks" / "gpu_suite.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_suite"] = module
    spec.loader.exec_module(module)
    return module


def _results(out):
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_steps_keep_their_json_lines_time_out_and_are_skipped_when_the_budget_is_spent(
    suite_module, tmp_path
):
    suite = suite_module.Suite(tmp_path, budget=suite_module.RESERVE + 30)
    printing = "import sys; print('{\"x\": 1}'); print('not json'); sys.exit(3)"
    suite.run("prints", [sys.executable, "-c", printing], cap=20, need=1)
    suite.run("hangs", [sys.executable, "-c", "import time; time.sleep(30)"], cap=1, need=0.5)
    lines = _results(tmp_path)
    assert {"step": "prints", "x": 1} in lines
    statuses = {ln["step"]: ln["status"] for ln in lines if "status" in ln}
    assert statuses == {"prints": "exit 3", "hangs": "timed out after 1 s"}
    assert "== hangs: timed out" in (tmp_path / "log.txt").read_text()

    spent = suite_module.Suite(tmp_path / "spent", budget=suite_module.RESERVE + 5)
    spent.run("late", [sys.executable, "-c", "print(1)"], cap=60, need=20)
    spent.write()
    assert _results(tmp_path / "spent") == [
        {"step": "late", "status": "skipped", "reason": "budget spent"}
    ]
