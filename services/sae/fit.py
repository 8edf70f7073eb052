"""The SAE optimisation loop: Adam, warm-up and decay, sparsity ramp, no per-step sync.

Schedule: linear learning-rate warm-up over `warmup_steps`, constant, then linear decay to
0 over the last `DECAY_FRACTION` of training (Anthropic's April 2024 SAE update; SAELens's
`lr_decay_steps`); the sparsity coefficient ramps linearly from 0 over
`sparsity_warmup_steps` (Rajamanoharan et al. 2024), so features form before the penalty
bites. Loss parts are summed on the device and read back once per `log_every` steps: on a
GPU the host then queues work far ahead and never waits for a step to finish.
Imports torch only (the benchmark uses it).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from shared.sae.base import SparseAutoencoder

DECAY_FRACTION = 0.2
LOSS_PARTS = ("loss", "mse", "sparsity", "aux", "l0")


class NonFiniteLoss(ArithmeticError):
    """The loss became NaN or infinite; `step` is the first log point that saw it."""

    def __init__(self, step: int) -> None:
        super().__init__(f"SAE loss is not finite at training step {step}")
        self.step = step


@dataclass(frozen=True)
class Schedule:
    steps: int
    lr: float
    warmup_steps: int = 0
    sparsity_warmup_steps: int = 0

    def lr_factor(self, step: int) -> float:
        """Multiplier of `lr` for optimiser step `step` (0-based)."""
        warm = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        decay_steps = max(1, int(self.steps * DECAY_FRACTION))
        left = self.steps - step
        return warm * min(1.0, left / decay_steps)

    def sparsity_ramp(self, device: torch.device) -> torch.Tensor:
        """[steps] sparsity multipliers, on the device so indexing them never syncs."""
        ramp = torch.arange(1, self.steps + 1, dtype=torch.float32, device=device)
        return (ramp / max(self.sparsity_warmup_steps, 1)).clamp_(max=1.0)


@dataclass(frozen=True)
class FitSummary:
    steps: int
    samples: int
    seconds: float
    last: dict[str, float]

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else math.inf


LogFn = Callable[[int, int, dict[str, float]], None]


def fit(
    sae: SparseAutoencoder,
    batches: Iterable[torch.Tensor],
    schedule: Schedule,
    *,
    compile: bool = False,
    log_every: int = 100,
    on_log: LogFn | None = None,
) -> FitSummary:
    """Train `sae` for `schedule.steps` batches; `on_log(step, samples, means)` every
    `log_every` steps (`samples`: vectors trained on so far)."""
    device = sae.W_dec.device
    cuda = device.type == "cuda"
    optimizer = torch.optim.Adam(sae.parameters(), lr=schedule.lr, fused=cuda or None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule.lr_factor)
    ramp = schedule.sparsity_ramp(device)
    loss_fn = torch.compile(sae.loss) if compile else sae.loss
    precision = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    sums = torch.zeros(len(LOSS_PARTS), device=device)
    since_log = 0
    samples = 0
    last: dict[str, float] = {}
    sae.train()
    start = time.perf_counter()
    stream = iter(batches)
    for step in range(schedule.steps):
        x = next(stream)
        with precision:
            terms = loss_fn(x, ramp[step])
        optimizer.zero_grad(set_to_none=True)
        terms.total.backward()
        optimizer.step()
        scheduler.step()
        sae.normalize_decoder()
        sums += torch.stack([t.detach().float() for t in terms])
        since_log += 1
        samples += x.shape[0]
        if since_log == log_every or step + 1 == schedule.steps:
            means = (sums / since_log).tolist()  # the one host sync per log interval
            if not all(math.isfinite(v) for v in means):
                raise NonFiniteLoss(step + 1)
            last = dict(zip(LOSS_PARTS, means, strict=True))
            if on_log is not None:
                on_log(step + 1, samples, last)
            sums.zero_()
            since_log = 0
    if cuda:
        torch.cuda.synchronize(device)
    sae.eval()
    return FitSummary(schedule.steps, samples, time.perf_counter() - start, last)
