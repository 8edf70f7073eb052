"""`evaluate/report.html`: one file that opens anywhere, offline, with nothing beside it.

Images are inline data URIs, the activation explorer's data is an inline JSON block read
by a few lines of plain JavaScript, and there is no external script, font or stylesheet:
the page can be mailed, archived with the run, or opened from an air-gapped cluster.

The page is the Jinja2 template templates/report.html.j2 (its style and script are
templates/report.css and report.js, inlined), autoescaped: every string from the run is
escaped unless the template says otherwise.
"""

from __future__ import annotations

import base64
import functools
import json
from pathlib import Path
from typing import Any

import jinja2

from services.evaluator.sections import Report

#: Section ids, in page order; the browser test checks every one is rendered.
SECTION_IDS = (
    "spec",
    "training",
    "dynamics",
    "drift",
    "sae",
    "detection",
    "hmm",
    "phases",
    "explorer",
)
TITLES = {
    "spec": "Run spec",
    "training": "Training curves",
    "dynamics": "Training dynamics",
    "drift": "Representation drift (OT)",
    "sae": "Sparse autoencoders",
    "detection": "Hallucination detection",
    "hmm": "HMM training phases",
    "phases": "Phase agreement",
    "explorer": "Activation explorer",
}


#: What to look for in each OT figure (the OT stage draws them; the report captions them).
OT_CAPTIONS = {
    "depth": "Optimal-transport distance between every pair of layers, one matrix per "
    "checkpoint. Look for blocks: layers that compute alike sit close together.",
    "time": "Optimal-transport distance between every pair of checkpoints, one matrix per "
    "layer. Look for blocks along the diagonal: each block is a phase in which the layer's "
    "representation barely moves; a sharp block edge is a transition.",
    "step": "Drift between consecutive checkpoints per layer and their mean, with confidence "
    "intervals, the permutation baseline (two random halves of one checkpoint's cloud) and "
    "change points. Look for a peak above the baseline.",
    "drift_vs_eval": "The mean step drift above eval loss and accuracy on one step axis. Look "
    "for the drift peak at the checkpoint where accuracy jumps.",
}


def _fmt(value: Any) -> Any:
    """A table cell: floats to 4 significant digits, intervals to 3 decimals, None as a dash."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list | tuple) and all(isinstance(v, float) for v in value):
        return "[" + ", ".join(f"{v:.3f}" for v in value) + "]"
    return value if isinstance(value, str) else str(value)


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters["fmt"] = _fmt
    env.filters["b64"] = lambda png: base64.b64encode(png).decode()
    env.filters["pretty_json"] = functools.partial(json.dumps, indent=2)
    # The explorer's JSON keeps its key order: it is the order of its table's columns.
    env.policies["json.dumps_kwargs"] = {"sort_keys": False}
    return env


_TEMPLATE = _environment().get_template("report.html.j2")


def render_html(report: Report) -> str:
    """The page of `report`, every section in SECTION_IDS order, absent ones saying why."""
    return _TEMPLATE.render(
        r=report, section_ids=SECTION_IDS, titles=TITLES, ot_captions=OT_CAPTIONS
    )
