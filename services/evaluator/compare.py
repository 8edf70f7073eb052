"""`driftlab compare RUN_A RUN_B ...`: the numbers that tell runs apart, side by side.

Each run's report.json is the source (built first when a run has none), so a comparison
never disagrees with the runs' own reports. SAE metrics are lined up by relative depth
(layer / n_layer), which is what makes a 12-layer and a 24-layer model comparable.
"""

from __future__ import annotations

from html import escape
from typing import Any

from shared import layout
from shared.errors import ArtifactNotFound, DriftlabError
from shared.store import Store

#: Relative depths at which SAE metrics are compared (nearest trained layer to each).
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


def _nearest_layer(layers: dict[str, Any], depth: float) -> dict[str, Any] | None:
    if not layers:
        return None
    return min(layers.values(), key=lambda v: abs(v["relative_depth"] - depth))


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    """One row of the comparison: sizes, final metrics, SAE, detection and drift."""
    spec = report["spec"]
    training = report["training"]
    row: dict[str, Any] = {
        "run": report["run_id"],
        "n_layer": spec["model"]["n_layer"],
        "n_embd": spec["model"]["n_embd"],
        "dataset": spec["data"]["dataset"],
        "final_loss": training["final_loss"],
        **{f"final_{k}": v for k, v in training["final_eval"].items()},
    }
    layers = report.get("sae", {}).get("layers", {})
    for depth in DEPTHS:
        nearest = _nearest_layer(layers, depth)
        row[f"sae_ev@{depth:g}"] = None if nearest is None else nearest.get("explained_variance")
    for name, score in report.get("detection", {}).get("scores", {}).items():
        if score["kind"] != "signal":
            row[f"auroc_{name}"] = score["auroc"]
    drift = report.get("drift")
    if drift is not None:
        values = drift.get("step_drift_mean") or []
        row["drift_mean"] = sum(values) / len(values) if values else None
        row["drift_change_points"] = len(drift.get("change_points", []))
    if "hmm" in report:
        row["hmm_states"] = report["hmm"].get("n_states")
    return row


def load_report(store: Store, run_id: str) -> dict[str, Any]:
    key = layout.evaluate_report_json_key(run_id)
    try:
        body = store.get_json(key)
    except ArtifactNotFound:
        raise DriftlabError(
            f"run {run_id} has no report ({store.url_of(key)}): run `driftlab report {run_id}`"
        ) from None
    if not isinstance(body, dict) or "spec" not in body:
        raise DriftlabError(f"{store.url_of(key)} is not a report: run `driftlab report {run_id}`")
    return body


def comparison(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """Columns (the union, in first-seen order) and one list of cells per run."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    return columns, [[row.get(c) for c in columns] for row in rows]


def cell(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def text_table(columns: list[str], table: list[list[Any]]) -> str:
    """Runs as columns, metrics as rows: many metrics, few runs, fits a terminal."""
    lines = [[c, *(cell(row[i]) for row in table)] for i, c in enumerate(columns)]
    widths = [max(len(line[j]) for line in lines) for j in range(len(lines[0]))]
    return "\n".join(
        "  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip() for line in lines
    )


def html_page(columns: list[str], table: list[list[Any]]) -> str:
    head = "".join(f"<th>{escape(cell(row[0]))}</th>" for row in table)
    body = "".join(
        f"<tr><td>{escape(c)}</td>"
        + "".join(f"<td>{escape(cell(row[i]))}</td>" for row in table)
        + "</tr>"
        for i, c in enumerate(columns)
        if i
    )
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>driftlab '
        "comparison</title><style>body{font-family:system-ui,sans-serif;margin:2em}"
        "table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:.3em .6em}"
        "</style></head><body><h1>driftlab comparison</h1>"
        f"<table><tr><th>metric</th>{head}</tr>{body}</table></body></html>"
    )


def compare(store: Store, run_ids: list[str]) -> tuple[str, str]:
    """Write the comparison page and JSON; (its key, the terminal table)."""
    rows = [summarize(load_report(store, run_id)) for run_id in run_ids]
    columns, table = comparison(rows)
    store.put_json(layout.comparison_key(run_ids, "compare.json"), rows)
    key = layout.comparison_key(run_ids, "compare.html")
    store.put_text(key, html_page(columns, table))
    return key, text_table(columns, table)
