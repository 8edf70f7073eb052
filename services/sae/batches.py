"""Shuffled training batches from one layer's stored hidden states, in bounded memory.

The layer stays in its stored dtype (fp16/bf16) and is never copied whole to float32:
each batch is gathered by index, moved to the device and converted on its own. On a GPU
the stored tensor is first placed in device memory when it fits comfortably (gathers on
the device cost no host work, so the training loop never waits on the host); otherwise
batches are gathered on the host into pinned memory and copied asynchronously.
Imports torch only (the benchmark uses it).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

#: Share of free device memory the stored layer may take to be kept on the device.
DEVICE_SHARE = 0.3
STATS_CHUNK = 65_536


def place(data: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`data` on `device` if it takes under DEVICE_SHARE of the free memory there."""
    if device.type != "cuda":
        return data
    free, _total = torch.cuda.mem_get_info(device)
    size = data.numel() * data.element_size()
    return data.to(device) if size < DEVICE_SHARE * free else data


def input_scale(data: torch.Tensor, rows: torch.Tensor) -> tuple[float, torch.Tensor]:
    """(scale giving `data[rows]` unit mean squared norm, their unscaled mean), in chunks."""
    total = torch.zeros((), dtype=torch.float64)
    mean = torch.zeros(data.shape[1], dtype=torch.float64)
    for start in range(0, len(rows), STATS_CHUNK):
        chunk = data[rows[start : start + STATS_CHUNK].to(data.device)].to(torch.float64).cpu()
        total += chunk.pow(2).sum()
        mean += chunk.sum(0)
    n = max(len(rows), 1)
    mean_sq_norm = float(total) / n
    if not mean_sq_norm > 0:
        raise ValueError("all training hidden states are zero")
    return mean_sq_norm**-0.5, (mean / n).to(torch.float32)


class Batches:
    """Endless batches of `batch_size` rows of `data[rows]`, reshuffled every epoch.

    Epochs run into each other (a batch may straddle two), so every batch is full and
    the number of steps is exactly what was asked for.
    """

    def __init__(
        self,
        data: torch.Tensor,
        rows: torch.Tensor,
        batch_size: int,
        device: torch.device,
        scale: float,
        seed: int,
    ) -> None:
        self.data = data
        self.rows = rows.to(data.device)
        self.batch_size = batch_size
        self.device = device
        self.scale = scale
        self.generator = torch.Generator().manual_seed(seed)
        self.pin = data.device.type == "cpu" and device.type == "cuda"

    def _order(self) -> torch.Tensor:
        perm = torch.randperm(len(self.rows), generator=self.generator)
        return self.rows[perm.to(self.rows.device)]

    def __iter__(self) -> Iterator[torch.Tensor]:
        order = self._order()
        at = 0
        while True:
            if at + self.batch_size <= len(order):
                index = order[at : at + self.batch_size]
                at += self.batch_size
            else:
                rest = order[at:]
                order = self._order()
                at = self.batch_size - len(rest)
                index = torch.cat([rest, order[:at]])
            batch = self.data[index]
            if self.pin:
                batch = batch.pin_memory()
            yield batch.to(self.device, non_blocking=True).float().mul_(self.scale)
