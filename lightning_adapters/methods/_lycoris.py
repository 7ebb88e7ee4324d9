"""Shared by the LyCORIS-family methods (LoHa, LoKr): FedPara's Tucker factor and PEFT's dropout semantics.

Their folded-weight product lives in ``lightning_adapters.kernels.folded``.
"""

from __future__ import annotations

import torch


def cp_factor(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """FedPara's Tucker factor ``W[p, q, ...] = Σ_ij t[i, j, ...] · wb[j, q] · wa[i, p]``.

    t (r, r, *k), wa (r, out), wb (r, in) -> (out, in, *k).
    """
    return torch.einsum("ij...,jq,ip->pq...", t, wb, wa)


def rank_dropout_multipliers(
    out_features: int, p: float, rescale: bool, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Bernoulli keep-mask over output rows, shape (out,), divided by its mean if ``rescale``.

    Drawn from the default CPU generator, as PEFT does, so a seeded run draws the same masks. If every row is
    dropped the rescaled multipliers are all 0 (PEFT divides by zero there).
    """
    keep = (torch.rand(out_features) > p).to(dtype)
    if rescale:
        keep = keep / keep.mean().clamp_min(torch.finfo(dtype).tiny)
    return keep.to(device)


def module_dropped(training: bool, p: float) -> bool:
    """PEFT's module dropout: in training, skip the adapter when a uniform draw is ``<= p``.

    The draw happens in every training forward, also at ``p = 0`` (PEFT's default), as PEFT's LoHa and LoKr layers
    draw it: skipping it would shift the default generator, so the rank-dropout mask drawn next and every dropout
    layer after the adapter would differ from a seeded PEFT run's.

    While ``torch.compile`` traces, ``p = 0`` still draws but does not branch on the draw (reading it would break
    the graph in every adapted layer): the adapter then runs also on an exact 0.0, which a uniform draw hits once
    in 2**24.
    """
    if not training:
        return False
    draw = torch.rand(1)
    if p == 0 and torch.compiler.is_compiling():
        return False
    return float(draw) <= p
