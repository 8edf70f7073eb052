"""How `driftlab runs` shows its rows: a table fitted to the terminal, CSV or JSON.

JSON and CSV are for programs: every selected column, every value whole. The table is for
a person: lists read `20, 60`, long values end in `…`, and at a terminal (or with
$COLUMNS set) it keeps to its width by leaving out the columns that matter least: the
run id and its state (first) and what `--show` asked for stay; the run's name, swept
parameters, annotations, tags, headline numbers and when it was created come next; the
spec's other fields give way first, and a column with no value in any row is never shown.
"""

from __future__ import annotations

import csv
import fnmatch
import io
import json
from collections.abc import Sequence
from typing import Any

from rich.cells import cell_len, set_cell_size  # screen cells: a CJK character takes two

Row = dict[str, Any]

FORMATS = ("table", "csv", "json")
ALWAYS_SHOWN = ("run_id", "state")
# After those and --show's columns, kept in this order while they fit; the rest after.
KEPT_FIRST = ("run.name", "custom.*", "annotations.*", "run.tags.*", "*.headline.*", "created")
MAX_CELL_WIDTH = 40  # a run id is never cut: it is what every other command takes
MIN_CUT_WIDTH = 6
COLUMN_GAP = 2


def cell(value: Any) -> str:
    """A value as one CSV cell or one `key=value`: lists and dicts as compact JSON."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list | dict):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def display_cell(value: Any, nested: bool = False) -> str:
    """A value as a person reads it in a table: `20, 60`, `a=1, b=2` (brackets only inside)."""
    if isinstance(value, dict) and value:
        text = ", ".join(f"{key}={display_cell(item, True)}" for key, item in value.items())
        return f"{{{text}}}" if nested else text
    if isinstance(value, list) and value:
        text = ", ".join(display_cell(item, True) for item in value)
        return f"[{text}]" if nested else text
    return cell(value)


def fit_columns(
    rows: Sequence[Row], columns: Sequence[str], width: int, wanted: Sequence[str] = ()
) -> list[str]:
    """The `columns` a table of `width` characters shows, in their order.

    The run id, state and `wanted` (what --show asked for) are always shown; the others,
    most useful first (KEPT_FIRST), while their widest value fits what is left, and never
    one that no row has a value in.
    """
    natural = {column: _natural_width(rows, column) for column in columns}
    kept: set[str] = set()
    used = -COLUMN_GAP
    for column in sorted(columns, key=lambda c: _rank(c, wanted)):
        need = natural[column] + COLUMN_GAP
        required = column in ALWAYS_SHOWN or column in wanted
        has_values = any(row.get(column) not in (None, "") for row in rows)
        if required or (used + need <= width and has_values):
            kept.add(column)
            used += need
    first = [column for column in ALWAYS_SHOWN if column in kept]
    return first + [column for column in columns if column in kept and column not in first]


def _rank(column: str, wanted: Sequence[str]) -> int:
    if column in ALWAYS_SHOWN or column in wanted:
        return 0
    for rank, pattern in enumerate(KEPT_FIRST, start=1):
        if fnmatch.fnmatchcase(column, pattern):
            return rank
    return len(KEPT_FIRST) + 1


def _natural_width(rows: Sequence[Row], column: str) -> int:
    widest = max([cell_len(column), *(cell_len(display_cell(row.get(column))) for row in rows)])
    return widest if column == "run_id" else min(widest, MAX_CELL_WIDTH)


def render(rows: Sequence[Row], columns: Sequence[str], fmt: str, width: int | None = None) -> str:
    """`rows` as JSON, CSV or a table; a table wider than `width` characters has its widest
    columns ellipsized (choose its columns first with `fit_columns`)."""
    if fmt == "json":
        return json.dumps([{c: r.get(c) for c in columns} for r in rows], indent=2) + "\n"
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows([[cell(r.get(c)) for c in columns] for r in rows])
        return buf.getvalue()
    widths = _column_widths(rows, columns, width)
    # A cut header keeps its end: `…final_loss` tells two headline columns apart.
    lines = [[_fit_cell(column, widths[column], keep_end=True) for column in columns]]
    lines += [[_fit_cell(display_cell(row.get(c)), widths[c]) for c in columns] for row in rows]
    gap = " " * COLUMN_GAP
    return "".join(gap.join(line).rstrip() + "\n" for line in lines)


def _fit_cell(text: str, width: int, keep_end: bool = False) -> str:
    """`text` padded to `width` screen cells, or cut to them with an ellipsis."""
    if cell_len(text) <= width:
        return set_cell_size(text, width)
    if keep_end:
        return "…" + set_cell_size(text[::-1], width - 1)[::-1]
    return set_cell_size(text, width - 1) + "…"


def _column_widths(
    rows: Sequence[Row], columns: Sequence[str], width: int | None
) -> dict[str, int]:
    """Each column's natural width; over `width`, the widest give way, down to MIN_CUT_WIDTH
    characters. The run id and state are never cut: a wider table is better than a wrong id."""
    widths = {column: _natural_width(rows, column) for column in columns}
    if width is None:
        return widths
    excess = sum(widths.values()) + COLUMN_GAP * (len(columns) - 1) - width
    while excess > 0:
        cuttable = [c for c in columns if c not in ALWAYS_SHOWN and widths[c] > MIN_CUT_WIDTH]
        if not cuttable:
            break
        widest = max(cuttable, key=lambda c: widths[c])
        widths[widest] -= 1
        excess -= 1
    return widths
