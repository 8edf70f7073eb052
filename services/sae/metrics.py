"""The numbers researchers judge an SAE by, on tokens it was not trained on.

Reconstruction (hidden states streamed in batches, scaled units): `mse` per element,
`fvu` = Σ‖x − x̂‖² / Σ‖x − x̄‖² (fraction of variance unexplained, pooled over tokens,
a.k.a. normalised MSE), `explained_variance` = 1 − fvu, mean `l0`, `dead_fraction`
(features that never fire on the held-out tokens) and the feature density histogram.

Downstream (SAELens's `ce_loss_score`): the reconstruction is spliced into the model at
the SAE's layer, at every position of each held-out probe sequence, and the next-token
cross-entropy on the real (non-pad) tokens compared with the clean model and with the
layer zero-ablated: `ce_loss_recovered` = (CE_zero − CE_spliced) / (CE_zero − CE_clean),
1 for a perfect SAE, 0 for one no better than zeros. `kl_recovered` is the same with
KL(clean ‖ ·) in place of CE, which does not reward lucky improvements on the labels.
Padding sits after each sequence's end, and attention is causal, so it never influences
a real token; the attention mask is passed all the same, as the extractor does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from shared.sae.base import SparseAutoencoder

#: log10 of feature firing frequency: histogram bin edges (rarer firing falls in bin 0).
DENSITY_EDGES = [x / 2 for x in range(-12, 1)]

Replace = Callable[[torch.Tensor], torch.Tensor]


@torch.no_grad()
def reconstruction_metrics(
    sae: SparseAutoencoder, data: torch.Tensor, rows: torch.Tensor, batch_size: int
) -> dict[str, Any]:
    device = sae.W_dec.device
    d_in = sae.config.d_in
    err = torch.zeros((), dtype=torch.float64, device=device)
    power = torch.zeros((), dtype=torch.float64, device=device)
    total = torch.zeros(d_in, dtype=torch.float64, device=device)
    active = torch.zeros((), dtype=torch.float64, device=device)
    fires = torch.zeros(sae.config.d_sae, dtype=torch.float64, device=device)
    scale = sae.input_scale
    for start in range(0, len(rows), batch_size):
        x = data[rows[start : start + batch_size].to(data.device)].to(device).float() * scale
        x_hat, f = sae(x)
        err += (x_hat - x).pow(2).sum()
        power += x.double().pow(2).sum()
        total += x.double().sum(0)
        on = f > 0
        active += on.sum()
        fires += on.sum(0)
    n = max(len(rows), 1)
    variance = float(power - total.pow(2).sum() / n)
    fvu = float(err) / variance if variance > 0 else float("nan")
    frequency = (fires / n).cpu()
    return {
        "tokens": len(rows),
        "mse": float(err) / (n * d_in),
        "fvu": fvu,
        "explained_variance": 1.0 - fvu,
        "l0": float(active) / n,
        "dead_fraction": float((frequency == 0).float().mean()),
        "density": density_histogram(frequency),
    }


def density_histogram(frequency: torch.Tensor) -> dict[str, Any]:
    """Counts of features per log10(firing frequency) bin; features never firing apart."""
    alive = frequency[frequency > 0]
    edges = torch.tensor(DENSITY_EDGES, dtype=torch.float64)
    index = torch.bucketize(alive.log10(), edges[1:-1], right=True)
    counts = torch.bincount(index, minlength=len(edges) - 1)
    return {
        "log10_edges": DENSITY_EDGES,
        "counts": counts.tolist(),
        "dead": int((frequency == 0).sum()),
    }


def hidden_site(model: nn.Module, layer: int) -> nn.Module:
    """Module whose output is hidden-state layer `layer` (0: embeddings, l: block l)."""
    transformer: Any = getattr(model, "transformer")  # noqa: B009 (HF GPT-2 attribute)
    if layer == 0:
        return transformer.drop
    return transformer.h[layer - 1]


@contextmanager
def spliced(model: nn.Module, layer: int, replace: Replace) -> Iterator[None]:
    """Within the block, hidden-state layer `layer` is replaced by `replace(hidden)`."""

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> Any:
        if isinstance(output, tuple):
            return (replace(output[0]), *output[1:])
        return replace(output)

    handle = hidden_site(model, layer).register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _log_probs(model: nn.Module, ids: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(model(input_ids=ids, attention_mask=real).logits.float(), dim=-1)


@torch.no_grad()
def ce_recovered(
    model: nn.Module,
    input_ids: torch.Tensor,
    lengths: torch.Tensor,
    layer: int,
    replace: Replace,
    batch_size: int = 16,
) -> dict[str, float]:
    """CE and KL of the clean, spliced and zero-ablated model on real next tokens."""
    device = next(model.parameters()).device
    sums = dict.fromkeys(("clean", "spliced", "zero", "kl_spliced", "kl_zero"), 0.0)
    count = 0
    for start in range(0, len(input_ids), batch_size):
        ids = input_ids[start : start + batch_size].to(device)
        n = lengths[start : start + batch_size].to(device)
        positions = torch.arange(ids.shape[1], device=device)
        real = positions[None, :] < n[:, None]
        mask = real[:, 1:]  # predicting a real next token
        targets = ids[:, 1:][mask]
        clean = _log_probs(model, ids, real)[:, :-1][mask]
        with spliced(model, layer, replace):
            spliced_lp = _log_probs(model, ids, real)[:, :-1][mask]
        with spliced(model, layer, torch.zeros_like):
            zero = _log_probs(model, ids, real)[:, :-1][mask]
        for name, lp in (("clean", clean), ("spliced", spliced_lp), ("zero", zero)):
            sums[name] += float(F.nll_loss(lp, targets, reduction="sum"))
        for name, lp in (("kl_spliced", spliced_lp), ("kl_zero", zero)):
            kl = F.kl_div(lp, clean, log_target=True, reduction="sum")
            sums[name] += float(kl)
        count += int(mask.sum())
    if count == 0:
        raise ValueError("no probe sequence has two tokens: nothing to predict")
    ce = {k: v / count for k, v in sums.items()}
    return {
        "ce_clean": ce["clean"],
        "ce_spliced": ce["spliced"],
        "ce_zero_ablated": ce["zero"],
        "ce_loss_recovered": _recovered(ce["zero"], ce["spliced"], ce["clean"]),
        "kl_spliced": ce["kl_spliced"],
        "kl_zero_ablated": ce["kl_zero"],
        "kl_recovered": _recovered(ce["kl_zero"], ce["kl_spliced"], 0.0),
        "tokens": count,
    }


def _recovered(zero: float, spliced: float, clean: float) -> float:
    gap = zero - clean
    return (zero - spliced) / gap if gap != 0 else float("nan")
