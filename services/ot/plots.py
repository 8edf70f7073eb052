"""The OT stage's figures, as PNG bytes (matplotlib's Agg canvas, no pyplot state).

Sized to be read without zooming: at most 25 panels per figure (evenly chosen checkpoints
or layers when there are more, first and last always kept), 10 pt text or larger, one
shared colour scale across the panels of a heatmap figure so panels compare by eye.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

MAX_PANELS = 25
_DPI = 110
_FONT: Any = {"font.size": 11, "axes.titlesize": 11, "axes.labelsize": 10}


def pick(n: int, limit: int = MAX_PANELS) -> list[int]:
    """At most `limit` indices of range(n), evenly spread, first and last included."""
    if n <= limit:
        return list(range(n))
    return sorted({round(i * (n - 1) / (limit - 1)) for i in range(limit)})


def _grid(n: int, panel: float, extra_height: float = 0.0) -> tuple[Figure, list[Axes]]:
    cols = min(n, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(panel * cols + 1.2, (panel + 0.6) * rows + extra_height), dpi=_DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False, gridspec_kw={"hspace": 0.7}).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


def _heatmaps(
    matrices: np.ndarray, titles: list[str], axis_label: str, ticks: list[str], title: str
) -> bytes:
    import matplotlib

    with matplotlib.rc_context(_FONT):
        fig, axes = _grid(len(matrices), 3.0, 0.6)
        vmax = float(np.nanmax(matrices)) or 1.0
        image = None
        step = max(1, math.ceil(len(ticks) / 8))
        for ax, mat, name in zip(axes, matrices, titles, strict=True):
            image = ax.imshow(mat, cmap="viridis", vmin=0.0, vmax=vmax, origin="upper")
            ax.set_title(name)
            positions = list(range(0, len(ticks), step))
            ax.set_xticks(positions, [ticks[i] for i in positions], rotation=90)
            ax.set_yticks(positions, [ticks[i] for i in positions])
            ax.set_xlabel(axis_label)
        assert image is not None
        fig.colorbar(image, ax=axes, shrink=0.8, label="drift (normalised OT)")
        fig.suptitle(title)
        return _png(fig)


def depth_figure(steps: Sequence[int], depth: np.ndarray) -> bytes:
    """Layer-by-layer drift at each checkpoint (small multiples)."""
    chosen = pick(len(steps))
    layers = [str(i) for i in range(depth.shape[1])]
    return _heatmaps(
        depth[chosen],
        [f"step {steps[t]}" for t in chosen],
        "layer",
        layers,
        "Depth drift: OT between layers at each checkpoint",
    )


def time_figure(steps: Sequence[int], time: np.ndarray) -> bytes:
    """Checkpoint-by-checkpoint drift of each layer (small multiples)."""
    chosen = pick(time.shape[0])
    return _heatmaps(
        time[chosen],
        [f"layer {layer}" for layer in chosen],
        "checkpoint step",
        [str(s) for s in steps],
        "Time drift: OT between checkpoints for each layer",
    )


def _curve(ax: Axes, ends: np.ndarray, curve: Mapping[str, Any], label: str) -> None:
    values = np.asarray(curve["values"])
    ax.plot(ends, values, marker="o", ms=3, color="C0", label="step drift")
    if curve["ci"] is not None:
        lo, hi = np.asarray(curve["ci"])
        ax.fill_between(ends, lo, hi, color="C0", alpha=0.25, label="95% bootstrap CI")
    if curve["baseline"] is not None:
        ax.plot(ends, curve["baseline"], ls="--", color="0.4", label="permutation baseline")
    for k, cp in enumerate(curve["change_points"]):
        ax.axvline(cp["step"], color="C3", lw=1.2, label="change point" if k == 0 else None)
    for k, tr in enumerate(curve["transitions"]):
        ax.plot(
            tr["peak_step"],
            tr["drift"],
            "v",
            color="C3",
            ms=8,
            label="transition" if k == 0 else None,
        )
    ax.set_title(label)
    ax.set_yscale("log" if values.size and float(values.min()) > 0 else "linear")


def step_figure(steps: Sequence[int], curves: Mapping[str, Mapping[str, Any]]) -> bytes:
    """Step drift per layer (and the mean) with CIs, baseline and change points."""
    import matplotlib

    ends = np.asarray(steps[1:])
    names = ["mean", *sorted(k for k in curves if k != "mean")]
    chosen = [names[i] for i in pick(len(names))]
    with matplotlib.rc_context(_FONT):
        fig, axes = _grid(len(chosen), 3.4, 0.8)
        for ax, name in zip(axes, chosen, strict=True):
            _curve(ax, ends, curves[name], "mean over layers" if name == "mean" else name)
            ax.set_xlabel("step (end of interval)")
        handles, labels = axes[0].get_legend_handles_labels()
        # Below the panels; savefig's tight bounding box keeps it in the picture.
        fig.legend(
            handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.02), ncol=len(labels),
            frameon=False,
        )  # fmt: skip
        fig.suptitle("Step drift between consecutive checkpoints")
        return _png(fig)


def eval_figure(
    steps: Sequence[int], mean_curve: Mapping[str, Any], metrics: Mapping[str, list[float | None]]
) -> bytes:
    """Mean step drift above eval loss and accuracy, on one step axis."""
    import matplotlib

    shown = {k: v for k, v in metrics.items() if any(x is not None for x in v)}
    with matplotlib.rc_context(_FONT):
        fig = Figure(figsize=(9, 2.6 * (1 + len(shown)) + 0.4), dpi=_DPI)
        FigureCanvasAgg(fig)
        axes = fig.subplots(1 + len(shown), 1, sharex=True, squeeze=False)[:, 0].tolist()
        _curve(axes[0], np.asarray(steps[1:]), mean_curve, "mean step drift over layers")
        axes[0].legend(loc="best", fontsize=9)
        for k, (ax, (name, values)) in enumerate(zip(axes[1:], shown.items(), strict=True)):
            ys = [np.nan if v is None else v for v in values]
            ax.plot(steps, ys, marker="o", ms=3, color=f"C{k + 1}")
            ax.set_ylabel(name)
            for tr in mean_curve["transitions"]:
                ax.axvline(tr["step"], color="C3", lw=1.0, ls=":")
        axes[-1].set_xlabel("training step")
        fig.suptitle("Representation drift and eval metrics")
        fig.tight_layout()
        return _png(fig)
