"""A planted sparse dictionary: tokens whose true features and L0 are known."""

from __future__ import annotations

import torch


def planted_dictionary(
    n: int, d: int, m: int, l0: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(tokens [n, d], unit-norm dictionary [m, d], planted mean L0).

    Each token is a sparse nonnegative combination of dictionary rows (each row on with
    probability l0 / m, coefficient in [0.5, 1.5]) plus a shared offset and a little noise.
    """
    g = torch.Generator().manual_seed(seed)
    dictionary = torch.randn(m, d, generator=g)
    dictionary /= dictionary.norm(dim=1, keepdim=True)
    offset = 0.3 * torch.randn(d, generator=g)
    on = torch.rand(n, m, generator=g) < l0 / m
    coef = (0.5 + torch.rand(n, m, generator=g)) * on
    x = coef @ dictionary + offset + 0.01 * torch.randn(n, d, generator=g)
    return x, dictionary, float(on.sum(1).float().mean())
