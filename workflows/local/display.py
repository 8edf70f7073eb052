"""How a local run shows its tasks: one line per change, or a live table in a terminal."""

from __future__ import annotations

import shutil
import threading
from typing import TextIO

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
    """A table of every task's state, redrawn in place in a terminal."""

    def __init__(self, stream: TextIO, interval_s: float = 0.5) -> None:
        self.stream = stream
        self.interval_s = interval_s
        self.nodes: dict[str, Node] = {}
        self.lock = threading.Lock()
        self.drawn = 0
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def __call__(self, node: Node) -> None:
        with self.lock:
            self.nodes[node.name] = node

    def _loop(self) -> None:
        while not self.closed.wait(self.interval_s):
            self.draw()

    def draw(self) -> None:
        with self.lock:
            rows = [
                f"{n.name[:60]:<60} {n.state.lower():<10} {_seconds(n):>8} {n.progress():>12}"
                for n in self.nodes.values()
            ]
        width = shutil.get_terminal_size().columns
        out = "\x1b[F\x1b[2K" * self.drawn + "".join(r[:width] + "\n" for r in rows)
        self.stream.write(out)
        self.stream.flush()
        self.drawn = len(rows)

    def close(self) -> None:
        self.closed.set()
        self.thread.join()
        self.draw()


def _seconds(node: Node) -> str:
    seconds = node.seconds
    return "" if seconds is None else f"{seconds:.1f}s"
