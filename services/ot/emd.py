"""Exact OT cost between small uniform point clouds, by POT's network simplex.

The reference the entropic solvers are checked against; on the same normalised cost as
`sinkhorn.py` (see `cost.py`). POT is imported when called, so the rest of the OT service
imports with torch and numpy alone.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from services.ot.cost import Clouds, as_clouds, cost_matrix, cost_scale

__all__ = ["emd_cost"]


def emd_cost(x: Clouds, y: Clouds, *, scale: float | None = None) -> Tensor:
    """Exact OT cost per pair with POT's network simplex (``ot.emd2``), for small N.

    Solved in float64 on the CPU, on the same normalised cost as the Sinkhorn solver
    (``scale`` defaults to :func:`cost_scale` of the x clouds; pass 1.0 for raw squared
    distances). O(N^3): meant for N up to a few thousand and for checking the others.
    """
    import ot  # POT, in the ot extra and image: imported here so the solver needs only torch

    xs, ys = as_clouds(x), as_clouds(y)
    if len(xs) != len(ys):
        raise ValueError(f"x has {len(xs)} clouds and y has {len(ys)}")
    sc = cost_scale(xs) if scale is None else float(scale)
    out = torch.empty(len(xs), dtype=torch.float64)
    for k, (xk, yk) in enumerate(zip(xs, ys, strict=True)):
        cmat = cost_matrix(
            xk.detach().to("cpu", torch.float64)[None],
            yk.detach().to("cpu", torch.float64)[None],
            sc,
        )[0].numpy()
        a = np.full(cmat.shape[0], 1.0 / cmat.shape[0])
        b = np.full(cmat.shape[1], 1.0 / cmat.shape[1])
        out[k] = float(ot.emd2(a, b, cmat, numItermax=10_000_000))
    return out
