"""Newton polish: an entropic OT problem solved to float64 precision from a Sinkhorn start.

Why it exists. Sinkhorn stops at a marginal tolerance, and the cost ``<P, C>`` of the plan it
stops at is off by about the misplaced mass times the cost of moving it
(:func:`value_error`). A debiased divergence is a difference of three such costs, so a small
drift inherits the absolute error of three large ones: on the tiny-cpu demo run (11
checkpoints x 3 layers, 256 tokens, reg 0.05) float32 Sinkhorn at tol 1e-4 left step drifts
of 1e-4 up to 1% off converged POT. A tighter tol alone does not fix it, because real hidden
states are hard for Sinkhorn: tokens that share a context share their hidden state
(duplicate points), and the clouds of consecutive late checkpoints are near-identical, where
Sinkhorn converges sublinearly (POT's marginal error fell only from 3.4e-6 to 2.6e-7
between iterations 10,000 and 90,000 on one such pair), so those problems stop at max_iter.
Newton's method on the semi-dual converges quadratically instead: 3-8 steps from the float32
Sinkhorn potentials to a marginal error of 1e-15. Clouds in clusters far apart at the scale
of reg, with unequal shares of the points (random halves of a clustered checkpoint, as the
permutation baseline draws), make its Hessian singular along each cluster's shift; a
damped step (`_ascent_direction`) capped at the cost's range still gets there in ~10 steps.

A step costs O(M^3) (the M x M Schur complement and its Cholesky factor): 2-3 ms at M = 256
on one core, as much as ~100 Sinkhorn iterations. So `pairwise.pairwise_drift` polishes only
the problems whose error estimate matters for the value they enter, after a few float64
Sinkhorn iterations, which suffice where Sinkhorn converges fast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from services.ot.cost import cost_matrix

__all__ = ["Polished", "newton_polish", "value_error"]

#: Armijo's sufficient-increase constant of the line search.
_ARMIJO = 1e-4
#: Smallest step length tried before the line search gives up.
_MIN_STEP = 2.0**-20
#: Levenberg-Marquardt damping tried when the Schur complement is numerically singular,
#: relative to its mean diagonal: from a float64 rounding level up to a gradient step.
_DAMPING = (1e-12, 1e-9, 1e-6, 1e-3, 1.0)


@dataclass(frozen=True)
class Polished:
    """A polished problem: its cost ``<P, C>``, the L1 column-marginal error and Newton steps."""

    cost: float
    error: float
    steps: int


def value_error(marginal_error: Tensor, max_cost: Tensor) -> Tensor:
    """Estimated error of ``<P, C>`` for a plan whose column marginal is off by ``marginal_error``.

    Rows are exact, so the L1 error counts the misplaced mass twice (too much in some columns,
    too little in others); moving mass ``marginal_error / 2`` costs at most ``max_cost`` per
    unit. This is an estimate, not a bound (the exact plan is not the nearest feasible one),
    but a conservative one in practice: on the tiny-cpu demo run's 198 drift pairs, float32
    Sinkhorn at tol 1e-4 and 1e-6 was never more than 0.7x this far from converged POT.
    """
    return 0.5 * marginal_error * max_cost


def newton_polish(
    x: Tensor,
    y: Tensor,
    g: Tensor,
    reg: float,
    scale: float,
    *,
    tol: float,
    max_steps: int = 30,
) -> Polished:
    """Solve OT(x, y) in float64 by Newton's method, started from the column potential ``g``.

    The semi-dual ``D(g) = <a, f(g)> + <b, g>`` (f the exact log-domain row update, so rows
    are always exact) is concave with gradient ``b - P^T 1`` and Hessian ``-S / reg``,
    ``S = diag(P^T 1) - N P^T P``; its maximiser is the entropic plan. Each step solves
    ``S dg = reg (b - P^T 1)`` (``S`` is singular along the constant shift g + c, fixed by
    adding ``1 1^T / M^2``) and backtracks until D rises enough (Armijo). It stops at an
    L1 column error of ``tol``, after ``max_steps``, or when no step length helps any more
    (the float64 floor), and returns the state of smallest marginal error it met. Newton is
    only locally stable, so ``g`` should come from Sinkhorn. Runs on ``x``'s device; ``g`` is
    in normalised-cost units, as the Sinkhorn solver returns it.
    """
    c = cost_matrix(x[None].to(torch.float64), y[None].to(torch.float64), scale)[0]
    n, m = c.shape
    b = 1.0 / m
    g = g.to(c)
    gauge = torch.full((m, m), b * b, dtype=c.dtype, device=c.device)

    def state(pot: Tensor) -> tuple[Tensor, float]:
        """The plan of column potential ``pot`` (rows exact) and the semi-dual there."""
        logits = (pot[None, :] - c) / reg
        f = -reg * (torch.logsumexp(logits, dim=1) + math.log(n))
        plan = (logits + f[:, None] / reg).exp_()
        return plan, float(f.mean() + b * pot.sum())

    plan, dual = state(g)
    # No potential ever needs to move further than the cost's range in one step (the
    # optimal potentials of rows and columns lie within it of each other).
    reach = float(c.max() - c.min()) + reg
    best = Polished(cost=math.inf, error=math.inf, steps=0)
    steps = 0
    while True:
        col = plan.sum(0)
        grad = b - col
        error = float(grad.abs().sum())
        if error < best.error:  # far from the optimum a step can raise the error
            best = Polished(cost=float((plan * c).sum()), error=error, steps=steps)
        if error <= tol or steps >= max_steps:
            break
        schur = torch.diag(col) - n * (plan.T @ plan) + gauge
        dg = _ascent_direction(schur, reg * grad)
        if dg is None:
            break
        dg *= min(1.0, reach / float(dg.abs().max()))
        slope = float(grad @ dg)
        step, accepted = 1.0, False
        while step >= _MIN_STEP:
            trial = g + step * dg
            trial_plan, trial_dual = state(trial)
            # Near the optimum D changes below float64 resolution; allow for its rounding.
            slack = 4.0 * torch.finfo(c.dtype).eps * abs(dual)
            if trial_dual >= dual + _ARMIJO * step * slope - slack:  # False for NaN
                g, plan, dual, accepted = trial, trial_plan, trial_dual, True
                break
            step *= 0.5
        steps += 1
        if not accepted:
            break
    return best


def _ascent_direction(schur: Tensor, rhs: Tensor) -> Tensor | None:
    """Solve ``schur @ d = rhs``, damped towards a gradient step where ``schur`` is singular.

    Clouds that fall into clusters far apart at the scale of reg (the two halves of a
    checkpoint's cloud whose clusters got unequal shares of the tokens) couple their blocks
    of columns by a mass below float64 rounding, so the Schur complement is singular along
    each block's constant shift and its plain Cholesky fails. The damped system
    ``schur + lam I`` is positive definite, so its solution is always an ascent direction of
    the semi-dual; the line search and the caller's step cap then move the blocks apart.
    """
    factor, info = torch.linalg.cholesky_ex(schur)
    if int(info) == 0:
        return torch.cholesky_solve(rhs[:, None], factor)[:, 0]
    eye = torch.eye(schur.shape[0], dtype=schur.dtype, device=schur.device)
    level = float(schur.diagonal().mean())
    for damping in _DAMPING:
        factor, info = torch.linalg.cholesky_ex(schur + damping * level * eye)
        if int(info) == 0:
            return torch.cholesky_solve(rhs[:, None], factor)[:, 0]
    return None
