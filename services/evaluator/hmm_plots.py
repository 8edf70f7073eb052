"""Pictures of an HMM analysis: the state graph (SVG) and state-coloured curves (PNG).

The graph is written by hand as SVG text rather than through graphviz, so the report needs
no system package and the picture is inline, selectable and scales in any browser. Both
pictures use the same colour per state.
"""

from __future__ import annotations

import io
import math
from html import escape
from typing import TYPE_CHECKING

import numpy as np

from services.evaluator.hmm_curves import load_curves
from shared.store import Store

if TYPE_CHECKING:
    from services.evaluator.hmm import HMMAnalysis

STATE_COLOURS = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
    "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
)  # fmt: skip
#: Unobserved edges below this transition probability are not drawn.
MIN_EDGE_PROBABILITY = 0.02
_LABELLED_FEATURES = 2


def state_colour(state: int) -> str:
    return STATE_COLOURS[state % len(STATE_COLOURS)]


def state_graph_svg(analysis: HMMAnalysis) -> str:
    """Nodes are states (with their stay probability and how often they are decoded), edges
    the transitions, as wide as their probability, labelled with the top features of the
    transitions that were actually observed."""
    k = analysis.n_states
    transmat = analysis.model.transmat_
    occupancy = np.zeros(k, dtype=int)
    for path in analysis.states.values():
        occupancy += np.bincount(path, minlength=k)
    observed = {(t.source, t.target): t for t in analysis.transitions}
    size, radius, node = 640, 0.0 if k == 1 else 220.0, 42.0
    centre = size / 2
    pos = [
        (
            centre + radius * math.cos(2 * math.pi * i / k - math.pi / 2),
            centre + radius * math.sin(2 * math.pi * i / k - math.pi / 2),
        )
        for i in range(k)
    ]
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {size} {size}" '
        f'width="{size}" height="{size}" font-family="sans-serif" font-size="11">',
        "<title>HMM state transitions</title>",
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="6" '
        'markerHeight="6" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" '
        'fill="#444"/></marker></defs>',
    ]
    labels: list[str] = []
    for i in range(k):
        for j in range(k):
            p = float(transmat[i, j])
            if i == j or (p < MIN_EDGE_PROBABILITY and (i, j) not in observed):
                continue
            (x1, y1), (x2, y2) = pos[i], pos[j]
            dx, dy = x2 - x1, y2 - y1
            length = math.hypot(dx, dy) or 1.0
            ux, uy = dx / length, dy / length
            # Bend every edge to its left, so i->j and j->i do not overlap.
            cx, cy = (x1 + x2) / 2 - uy * 40, (y1 + y2) / 2 + ux * 40
            sx, sy = x1 + ux * node, y1 + uy * node
            ex, ey = x2 - ux * node, y2 - uy * node
            width = 1.0 + 8.0 * p
            dash = "" if (i, j) in observed else ' stroke-dasharray="4 3"'
            parts.append(
                f'<path d="M{sx:.1f},{sy:.1f} Q{cx:.1f},{cy:.1f} {ex:.1f},{ey:.1f}" '
                f'fill="none" stroke="#444" stroke-opacity="0.7" stroke-width="{width:.2f}"'
                f'{dash} marker-end="url(#arrow)"><title>S{i} → S{j}: p={p:.3f}</title></path>'
            )
            lines = [f"{p:.2f}"]
            if (i, j) in observed:
                seen = observed[(i, j)]
                lines[0] += f" (seen {seen.count}×)"
                lines += [
                    f"{name} {value:+.2g}" for name, value in seen.top_features(_LABELLED_FEATURES)
                ]
            for n, line in enumerate(lines):  # drawn last, haloed: readable over a node
                labels.append(
                    f'<text x="{cx:.1f}" y="{cy + 12 * n:.1f}" text-anchor="middle" '
                    f'fill="#222" stroke="#fff" stroke-width="3" paint-order="stroke">'
                    f"{escape(line)}</text>"
                )
    for i, (x, y) in enumerate(pos):
        parts.append(
            f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{node}" fill="{state_colour(i)}" '
            f'fill-opacity="0.85" stroke="#222"><title>state {i}</title></circle>'
        )
        for n, line in enumerate((f"S{i}", f"stay {transmat[i, i]:.2f}", f"n={int(occupancy[i])}")):
            weight = ' font-weight="bold" font-size="14"' if n == 0 else ""
            parts.append(
                f'<text x="{x:.1f}" y="{y - 10 + 14 * n:.1f}" text-anchor="middle" '
                f'fill="#fff"{weight}>{escape(line)}</text>'
            )
    parts += labels
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def state_curves_png(analysis: HMMAnalysis, store: Store) -> bytes:
    """Loss and accuracy against step, one line per run, each point coloured by the state
    the run was in at that step (the last decoded state at or before it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    curves = {run.run_id: load_curves(store, run.run_id) for run in analysis.runs}
    names = [
        n
        for n in ("train_loss", "eval_loss", "eval_accuracy")
        if any(c.name == n for cs in curves.values() for c in cs)
    ]
    panels = names or ["no loss or accuracy recorded"]
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.6 * len(panels)), squeeze=False)
    for ax, name in zip(axes[:, 0], panels, strict=True):
        ax.set_title(name.replace("_", " "))
        ax.set_xlabel("step")
        for run in analysis.runs:
            path = analysis.states[run.run_id]
            for curve in curves[run.run_id]:
                if curve.name != name:
                    continue
                at = np.clip(np.searchsorted(run.steps, curve.steps, side="right") - 1, 0, None)
                ax.plot(curve.steps, curve.values, color="#bbbbbb", linewidth=1, zorder=1)
                ax.scatter(
                    curve.steps,
                    curve.values,
                    c=[state_colour(int(s)) for s in path[at]],
                    s=10,
                    zorder=2,
                )
        if name.endswith("loss") and any(
            (c.values > 0).all() for cs in curves.values() for c in cs if c.name == name
        ):
            ax.set_yscale("log")
    axes[0, 0].legend(
        handles=[
            Line2D([], [], marker="o", linestyle="", color=state_colour(s), label=f"S{s}")
            for s in range(analysis.n_states)
        ],
        loc="upper right",
        fontsize=8,
        ncol=min(analysis.n_states, 8),
    )
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()
