"""The Hadamard product of two low-rank matrices as one rank-``r²`` product (LoHa on Linear / transformers Conv1D).

``(w1a·w1b) ⊙ (w2a·w2b) = Σ_ij (w1a[:, i] ⊙ w2a[:, j]) (w1b[i] ⊙ w2b[j])``: ``khatri_rao_factors`` builds the two
factors ``A (out, r²)`` and ``B (r², n)`` of that sum from ``O(r²·(out + n))`` products, and ``rank_r2_linear``
adds ``A (B x)`` in place to the base output, so no full-size tensor is formed. ``rank_r2_pays`` is the
multiply-add model that decides between this form and folding ``W + ΔW`` (``kernels.folded``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def khatri_rao_factors(
    w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor, w2b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w1a·w1b) ⊙ (w2a·w2b)`` as a rank-``r²`` product ``A · B``.

    w1a, w2a (out, r); w1b, w2b (r, n) -> A (out, r²) with column ``i·r + j`` equal to ``w1a[:, i] ⊙ w2a[:, j]``,
    B (r², n) with row ``i·r + j`` equal to ``w1b[i] ⊙ w2b[j]``.
    """
    out_f, r1 = w1a.shape
    r2 = w2a.shape[1]
    a = (w1a[:, :, None] * w2a[:, None, :]).reshape(out_f, r1 * r2)  # (out, r, 1) ⊙ (out, 1, r) -> (out, r²)
    b = (w1b[:, None, :] * w2b[None, :, :]).reshape(r1 * r2, -1)  # (r, 1, n) ⊙ (1, r, n) -> (r², n)
    return a, b


def rank_r2_pays(r: int, in_f: int, out_f: int, n_tokens: int, needs_grad: bool) -> bool:
    """Whether the rank-``r²`` form beats folding ``W + ΔW`` for an (out, in) layer, by multiply-add counts.

    With gradients the fold adds one full-size product (the weight gradient, ``in·out`` per token) and the
    rank-``r²`` form six thin ones (``3·r²·(in + out)`` per token); without gradients the fold costs the
    rebuild of ``W + ΔW`` (about ``(2r + 8)·in·out``) and the rank-``r²`` form ``r²·(in + out)`` per token.
    """
    r2, io = r * r, in_f + out_f
    full = in_f * out_f
    if needs_grad:
        return 3 * r2 * io < full
    return n_tokens * r2 * io < (2 * r + 8) * full


def rank_r2_linear(base: nn.Module, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``base(x) + A (B x)`` for A (out, k), B (k, in), accumulated in place into the base output.

    ``x`` is cast to the factors' dtype for the adapter product; the result has the base output's dtype.
    """
    out = base._la_base_forward(x)  # (..., out)
    h = F.linear(x if x.dtype == b.dtype else x.to(b.dtype), b)  # (..., in) @ (in, r²) -> (..., r²)
    if out.dtype == h.dtype:
        out.view(-1, out.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), a.t())  # += (N, r²) @ (r², out)
        return out
    return (out + F.linear(h, a)).to(out.dtype)  # summed in the wider dtype, rounded once (PEFT's rounding)
