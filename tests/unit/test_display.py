"""The live task table of `driftlab run`: what stays on screen at 60, 80 and 120 columns."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from workflows.local.display import LiveTable, TaskTable
from workflows.local.nodes import Node

RUN = "tiny-cpu-20261205-064208-20f8b1"
SWEEP_RUN = "lr-sweep-learning-rate-1e-3-seed-3-20261205-064208"


def _render(table: TaskTable, width: int) -> list[str]:
    console = Console(width=width, record=True, file=io.StringIO())
    console.print(table)
    return console.export_text().splitlines()


@pytest.mark.parametrize("width", [40, 60, 80, 120])
def test_state_progress_and_eta_stay_on_screen(tmp_path, width):
    """Three seconds after a task read 3/10 it reads 6/10: 1 item/s over that window (not
    6 over its 9.5 s since start), so 4 s left. Every line fits the width; the long names
    give way first, from the left, so the task and its item stay readable, then the rate
    and elapsed time."""
    now = [100.0]
    table = TaskTable(clock=lambda: now[0])
    progress = tmp_path / "extract"
    progress.write_text("3/10\n")
    done = tmp_path / "train"
    done.write_text("50/50\n")
    table.update(Node(name=f"sweep-1.{SWEEP_RUN}-b.pipeline.train", template="train",
                      state="Succeeded", started=0.0, ended=3.0, progress_file=done))  # fmt: skip
    table.update(Node(name=f"sweep-1.{SWEEP_RUN}-a.pipeline.extract(12:600)", template="x",
                      state="Running", started=0.0, ended=9.5, progress_file=progress))  # fmt: skip
    table.update(Node(name=f"sweep-1.{SWEEP_RUN}-a.pipeline.sae-train(0:0)", template="sae",
                      state="Pending"))  # fmt: skip
    _render(table, width)
    now[0] = 103.0
    progress.write_text("6/10\n")
    lines = _render(table, width)
    assert all(len(line) <= width for line in lines), lines
    header = lines[0].split()  # `sweep-1.`, what every task shares, is left out
    # At 40 columns the rate and the elapsed time give way; never the state, progress, ETA.
    full = ["task", "state", "progress", "rate", "eta", "time"]
    assert header == (full if width >= 60 else ["task", "state", "progress", "eta"]), lines
    running = [line.split() for line in lines if "running" in line]
    assert len(running) == 1 and running[0][1:3] == ["running", "6/10"], lines
    assert running[0][header.index("eta")] == "4s", lines
    assert running[0][0].endswith("tract(12:600)"), lines
    assert any(line.split()[1:3] == ["succeeded", "50/50"] for line in lines), lines
    assert any(line.split()[1:] == ["pending"] for line in lines), lines
    if width >= 60:  # room for the rate and the elapsed time
        assert running[0][3:] == ["1.0/s", "4s", "9.5s"], lines
    if width == 120:  # room for the whole name
        assert running[0][0] == f"{SWEEP_RUN}-a.pipeline.extract(12:600)", lines
    elif width == 80:  # the run id loses its head: its suffix still says which run
        assert running[0][0] == "…261205-064208-a.pipeline.extract(12:600)", lines
    elif width == 60:  # each segment keeps its end: which run, which task
        assert running[0][0] == "…a.…e.extract(12:600)", lines


def test_the_live_table_draws_in_a_terminal_of_80_columns(tmp_path, monkeypatch):
    """The table rich's Live draws on the stream at 80 columns: a long task name and all of
    state, progress, rate, ETA and time; no ETA before the task has advanced twice (its
    start-up would count: 3 items in 2.5 s would say 6 s left)."""
    monkeypatch.setenv("COLUMNS", "80")
    now = [10.0]
    progress = tmp_path / "progress"
    progress.write_text("3/10\n")
    stream = io.StringIO()
    table = LiveTable(stream, interval_s=60, clock=lambda: now[0])
    name = f"{RUN}.pipeline.extract(12:600)-with-a-long-suffix-that-runs-past-the-edge"
    table(Node(name=name, template="extract", state="Running", started=0.0, ended=2.5,
               progress_file=progress))  # fmt: skip
    first = "\n".join(_render(table.table, 80))  # a redraw (Live draws a pipe only at close)
    now[0] = 12.0
    progress.write_text("5/10\n")
    table.close()  # its last refresh draws the table once more
    lines = [line for line in stream.getvalue().splitlines() if line.strip()]
    assert all(len(line) <= 80 for line in lines), lines
    assert "3/10" in first and "6s" not in first, first
    # 2 items in 2 s: 1.0/s, 5 left: 5 s.
    assert any(line.split()[1:] == ["running", "5/10", "1.0/s", "5s", "2.5s"] for line in lines), (
        lines
    )
    assert any(line.startswith("…") and "with-a-long-suffix" in line for line in lines), lines
