"""How a local run shows its tasks: one line per change, or a live table in a terminal."""

from __future__ import annotations

import threading
from typing import TextIO

from rich.console import Console
from rich.live import Live
from rich.table import Table

from workflows.local.nodes import FINAL, Node


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

    rich fits the table to the terminal's width, so the state and progress columns stay
    visible at 80 columns (long task names fold instead of pushing them off screen).
    """

    def __init__(self, stream: TextIO, interval_s: float = 0.5) -> None:
        self.nodes: dict[str, Node] = {}
        self.lock = threading.Lock()
        self.live = Live(
            get_renderable=self._table,
            console=Console(file=stream),
            refresh_per_second=1 / interval_s,
            redirect_stdout=False,
            redirect_stderr=False,
        )
        self.live.start()

    def __call__(self, node: Node) -> None:
        with self.lock:
            self.nodes[node.name] = node

    def _table(self) -> Table:
        table = Table(box=None, pad_edge=False, expand=False)
        table.add_column("task", overflow="fold", ratio=1)
        table.add_column("state", no_wrap=True)
        table.add_column("time", justify="right", no_wrap=True)
        table.add_column("progress", justify="right", no_wrap=True)
        with self.lock:
            nodes = list(self.nodes.values())
        for node in nodes:
            table.add_row(node.name, node.state.lower(), _seconds(node), node.progress())
        return table

    def close(self) -> None:
        self.live.stop()


def _seconds(node: Node) -> str:
    seconds = node.seconds
    return "" if seconds is None else f"{seconds:.1f}s"
