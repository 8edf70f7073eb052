"""One figure that shows a training phase three ways on one step axis.

Held-out accuracy, the mean step drift of the hidden states (with the drift between two
halves of one checkpoint's cloud, the size a change is measured against) and the HMM's
decoded states of the training dynamics: when the three change together, the picture says
so without a table. A fourth view needs neither OT nor the HMM: the weights' norm (the
mean Frobenius norm of the blocks' matrices, the dynamics' `l2`), which under weight decay
grows while a model memorises and falls while it cleans up to a general solution (Nanda
et al. 2023), so a transition shows as its bend. OT change points above their curve's
baseline (in some layer or in the mean over layers) are solid, the mean curve's others
dotted; the step where accuracy first crosses 50% is dashed black; grey triangles on top
mark the checkpoints after a training-loss spike (see `agreement.loss_spikes`).
"""

from __future__ import annotations

import io
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


@dataclass(frozen=True)
class PhaseSeries:
    """What the figure draws; every list is optional but `checkpoints`."""

    checkpoints: Sequence[int]
    accuracy: Sequence[float | None] | None = None
    drift: Sequence[float] | None = None  # mean step drift, interval i ending at checkpoint i+1
    baseline: Sequence[float] | None = None
    ot_points: Sequence[tuple[int, bool]] = ()  # (step, exceeds a curve's baseline)
    hmm_steps: Sequence[int] = ()
    hmm_states: Sequence[int] = ()
    crossing: int | None = None
    loss_spikes: Sequence[int] = ()  # checkpoints after a training-loss spike
    norm_steps: Sequence[int] = ()  # steps of the dynamics rows, and their weight norm
    weight_norm: Sequence[float | None] = ()


def phases_png(series: PhaseSeries) -> bytes:
    """The figure as PNG bytes (Agg canvas: no pyplot state, safe in any thread)."""
    fig = Figure(figsize=(7.0, 5.2), dpi=110)
    FigureCanvasAgg(fig)
    top, norm, strip = fig.subplots(
        3, 1, sharex=True, gridspec_kw={"height_ratios": [4, 1.4, 1], "hspace": 0.08}
    )
    handles = []
    if series.accuracy is not None:
        (line,) = top.plot(series.checkpoints, series.accuracy, "s-", color="C3",
                           label="held-out accuracy")  # fmt: skip
        handles.append(line)
        top.set_ylabel("held-out accuracy")
        top.set_ylim(-0.02, 1.02)
    if series.drift is not None:
        ends = list(series.checkpoints[1 : len(series.drift) + 1])
        twin = top.twinx()
        (line,) = twin.plot(ends, series.drift, "o-", color="C0", label="mean step drift")
        handles.append(line)
        if series.baseline is not None:
            (line,) = twin.plot(ends, series.baseline[: len(ends)], ":", color="C0",
                                label="permutation baseline (noise)")  # fmt: skip
            handles.append(line)
        twin.set_ylabel("OT drift / layer spread")
        if min(series.drift) > 0:  # a first interval far larger than the rest flattens them
            twin.set_yscale("log")
    for step, significant in series.ot_points:
        top.axvline(step, color="C1", lw=1.6 if significant else 0.8,
                    ls="-" if significant else ":")  # fmt: skip
    if series.loss_spikes:
        # On the frame's top edge, in axes units: at 1.0 in data they hid under accuracy.
        (line,) = top.plot(series.loss_spikes, [1.0] * len(series.loss_spikes), "v",
                           color="0.35", ms=6, label="training-loss spike", clip_on=False,
                           transform=top.get_xaxis_transform())  # fmt: skip
        handles.append(line)
    if series.crossing is not None:
        top.axvline(series.crossing, color="black", ls="--", lw=1.2)
        top.annotate("50% crossed", (series.crossing, 0.52), xytext=(4, 0),
                     textcoords="offset points", fontsize=8)  # fmt: skip
    if handles:  # above the axes: inside, it hides whatever part of the curves it covers
        top.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 1.03), ncol=3,
                   fontsize=8, frameon=False)  # fmt: skip
    # Padded over the legend's two rows (points), which sit between it and the frame.
    top.set_title("accuracy, drift (orange: OT change points), weight norm and HMM states",
                  fontsize=10, pad=36)  # fmt: skip
    _weight_norm(norm, series)
    _state_strip(strip, series)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    return buffer.getvalue()


def _weight_norm(ax: Axes, series: PhaseSeries) -> None:
    """The weights' norm over training, with the 50% crossing marked as above."""
    ax.set_ylabel("weight\nnorm", rotation=0, ha="right", va="center", fontsize=8)
    ax.tick_params(labelsize=7)
    points = [(s, v) for s, v in zip(series.norm_steps, series.weight_norm, strict=True)
              if v is not None]  # fmt: skip
    if not points:
        ax.set_yticks([])
        ax.text(0.5, 0.5, "no dynamics rows", ha="center", va="center", transform=ax.transAxes)
        return
    steps, values = zip(*points, strict=True)
    ax.plot(steps, values, "-", color="C2", lw=1.2)
    if series.crossing is not None:
        ax.axvline(series.crossing, color="black", ls="--", lw=1.2)


def _state_strip(ax: Axes, series: PhaseSeries) -> None:
    """The decoded HMM state as coloured bands, one per run of equal states."""
    ax.set_yticks([])
    ax.set_xlabel("step")
    if not series.hmm_steps:
        ax.text(0.5, 0.5, "no HMM", ha="center", va="center", transform=ax.transAxes)
        return
    steps, states = list(series.hmm_steps), list(series.hmm_states)
    # Each row's band reaches halfway to its neighbours; the ends stop at the first and
    # last recorded step, so the strip spans exactly the axis the curves above use.
    middles = [(a + b) / 2 for a, b in itertools.pairwise(steps)]
    edges = [steps[0], *middles, steps[-1]]
    for i, state in enumerate(states):
        ax.axvspan(edges[i], edges[i + 1], color=f"C{state % 10}", alpha=0.6, lw=0)
    # A band's label needs room: one too narrow for it (a state held for a checkpoint or
    # two of a long run) stays unlabelled rather than printed over its neighbour's.
    room = 0.04 * (steps[-1] - steps[0])
    starts = [0, *(i for i in range(1, len(states)) if states[i] != states[i - 1])]
    for start, end in itertools.pairwise([*starts, len(states)]):
        if start > 0 and edges[end] - edges[start] >= room:
            ax.text(steps[start], 0.5, f"S{states[start]}", fontsize=7, va="center")
    ax.set_ylabel("HMM", rotation=0, ha="right", va="center")
