"""How a local run shows its tasks: one line per change, or a live table in a terminal."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TextIO

from rich.console import Console, ConsoleOptions, RenderResult
from rich.live import Live
from rich.progress import Progress, Task
from rich.table import Table
from rich.text import Text

from workflows.local.nodes import FINAL, RUNNING, Node

# Columns besides the task name, in order; the optional ones give way, in this order, when
# the terminal is too narrow to leave the name NAME_MIN_WIDTH columns. State, progress
# and ETA never do: they are what a user watches the table for.
COLUMNS = ("state", "progress", "rate", "eta", "time")
DROPPED_FIRST = ("rate", "time")
NAME_MIN_WIDTH = 16
COLUMN_GAP = 2


class LineReporter:
    """One line per state change: for logs, CI and pipes."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.lock = threading.Lock()

    def __call__(self, node: Node) -> None:
        seconds = f" in {node.seconds:.1f}s" if node.state in FINAL and node.seconds else ""
        attempt = f" (attempt {node.attempts})" if node.attempts > 1 else ""
        message = f": {node.message}" if node.message else ""
        with self.lock:
            print(
                f"{node.name} {node.state.lower()}{attempt}{seconds}{message}",
                file=self.stream,
                flush=True,
            )


class LiveTable:
    """A table of every task's state, redrawn in place in a terminal (rich's Live).

    The table is laid out for the terminal's width at every redraw (`TaskTable`), so the
    state, progress and ETA columns stay on screen at 60 columns: long task names are
    ellipsized and the rate and elapsed-time columns dropped before any of them would be.
    """

    def __init__(
        self, stream: TextIO, interval_s: float = 0.5, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.table = TaskTable(clock)
        self.live = Live(
            get_renderable=lambda: self.table,
            console=Console(file=stream),
            refresh_per_second=1 / interval_s,
            redirect_stdout=False,
            redirect_stderr=False,
        )
        self.live.start()

    def __call__(self, node: Node) -> None:
        self.table.update(node)

    def close(self) -> None:
        self.live.stop()


@dataclass
class _Row:
    name: str
    cells: dict[str, str]


class TaskTable:
    """Every task's state, progress, rate and ETA, fitted to the width it is rendered at.

    A stage writes its progress as `N/M` to `$ARGO_PROGRESS_FILE` (shared/telemetry.py);
    each render reads those files and feeds them to a (never displayed) rich `Progress`,
    whose speed is measured over its last 30 s of samples, from the second advance seen on.
    Progress over elapsed time would count a stage's start-up (imports, loading a model):
    in the tiny-cpu demo that put the trainer's first ETA at 3h35m for a real 19 minutes.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.nodes: dict[str, Node] = {}
        self.lock = threading.Lock()
        self.tracker = Progress(get_time=clock, auto_refresh=False, disable=True)
        self.tracked: dict[str, Task] = {}  # by node name

    def update(self, node: Node) -> None:
        with self.lock:
            self.nodes[node.name] = node

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        with self.lock:  # Live's thread and its last refresh at close both render
            prefix = _common_prefix(list(self.nodes))
            rows = [
                _Row(name[len(prefix) :], self._cells(node)) for name, node in self.nodes.items()
            ]
        yield _fitted_table(rows, options.max_width)

    def _cells(self, node: Node) -> dict[str, str]:
        cells = {"state": node.state.lower(), "progress": node.progress(), "time": ""}
        if node.seconds is not None:
            cells["time"] = f"{node.seconds:.1f}s"
        rate = self._rate(node, cells["progress"])
        cells["rate"] = _rate_text(rate[0]) if rate else ""
        cells["eta"] = _duration(rate[1] / rate[0]) if rate else ""
        return cells

    def _rate(self, node: Node, progress: str) -> tuple[float, float] | None:
        """(items per second, items left) of a running task that reports `N/M`."""
        done, sep, total = progress.partition("/")
        if node.state != RUNNING or not sep or not (done.isdigit() and total.isdigit()):
            return None
        completed, planned = int(done), int(total)
        task = self.tracked.get(node.name)
        if task is None:
            task_id = self.tracker.add_task(node.name, total=planned)
            task = next(task for task in self.tracker.tasks if task.id == task_id)
            self.tracked[node.name] = task
        elif completed < task.completed:  # a retry starts over
            self.tracker.reset(task.id, total=planned)
        self.tracker.update(task.id, completed=completed, total=planned)
        speed = task.speed
        return None if speed is None else (speed, max(planned - completed, 0))


def _fitted_table(rows: Sequence[_Row], width: int) -> Table:
    """The columns that fit `width`; the task names shortened to what is left."""
    widths = {c: max([len(c), *(len(row.cells[c]) for row in rows)]) for c in COLUMNS}
    shown = list(COLUMNS)
    for optional in DROPPED_FIRST:
        if _name_room(shown, widths, width) >= NAME_MIN_WIDTH:
            break
        shown.remove(optional)
    room = max(_name_room(shown, widths, width), 1)
    table = Table(box=None, pad_edge=False, expand=False)
    table.add_column("task", no_wrap=True)
    for column in shown:
        table.add_column(column, no_wrap=True, justify="left" if column == "state" else "right")
    for row in rows:
        table.add_row(Text(_shortened(row.name, room)), *(Text(row.cells[c]) for c in shown))
    return table


def _shortened(name: str, room: int) -> str:
    """`name` in `room` characters: its path's longest segments lose their heads first.

    A name is a DAG path ending in a task and its item (`pipeline.extract(1:100)`, or
    `sweep.<run id>.train` in a sweep): the task and its item say what runs, the tail of a
    run id (its random suffix) which run, so each segment keeps its end. What still does
    not fit loses its head as a whole.
    """
    path, paren, item = name.partition("(")
    segments = path.split(".")
    while (excess := len(".".join(segments)) + len(paren + item) - room) > 0:
        longest = max(range(len(segments) - 1), key=lambda i: len(segments[i]), default=None)
        if longest is None or len(segments[longest]) <= 2:
            break
        keep = max(len(segments[longest]) - excess - 1, 1)
        segments[longest] = "…" + segments[longest][-keep:]
    shortened = ".".join(segments) + paren + item
    return shortened if len(shortened) <= room else "…" + shortened[len(shortened) - room + 1 :]


def _name_room(shown: Sequence[str], widths: dict[str, int], width: int) -> int:
    return width - sum(widths[c] for c in shown) - COLUMN_GAP * len(shown)


def _common_prefix(names: Sequence[str]) -> str:
    """The dotted path every task shares (`pipeline.`): left out of every row.

    It ends before any fan-out item (`extract(3:0.5)`): an item's own dots are no path.
    """
    paths = [name.partition("(")[0].split(".")[:-1] for name in names]
    shared: list[str] = []
    for segments in zip(*paths, strict=False):
        if len(set(segments)) > 1:
            break
        shared.append(segments[0])
    return "".join(f"{segment}." for segment in shared)


def _rate_text(per_second: float) -> str:
    if per_second < 1:
        return f"{per_second * 60:.1f}/m"
    return f"{per_second:.1f}/s" if per_second < 100 else f"{per_second:.0f}/s"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
