"""The Kronecker identity for LoKr on Linear / transformers-Conv1D rows: ``ΔW = w1 ⊗ w2`` is never formed.

``(w1 ⊗ w2) vec(X) = vec(w1 · X · w2ᵀ)`` with each token's input read as ``X (c, d)``: ``kron_apply`` computes
the update of every row with three small GEMMs (``w2 = a2 · b2`` low-rank, or ``a2`` alone when full), a few
percent of the base product, and ``kron_linear_forward`` adds it in place to the base output. ``KronLinear``
recomputes the small intermediates in backward instead of keeping them, so it saves only ``x`` and the factors.
``kron_pays`` is the multiply-add model that decides between this path and folding ``W + ΔW``
(``kernels.folded``); ``kron_linear`` dispatches between the autograd Function, a no-grad forward and the
differentiable form (autocast, ``torch.compile``, or an adapter in another dtype than the base).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightning_adapters.kernels.folded import base_weight_out_in
from lightning_adapters.kernels.lowrank import row_chunks


def kron_inner(x2: torch.Tensor, w1: torch.Tensor, b2: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The two small products of ``kron_apply`` before the last one: ``(ht, k)``.

    x2 (N, c·d), w1 (a, c), b2 (m, d) or None (then m = d) -> ht (m, N·c) holding ``X[n] b2ᵀ`` and
    k (m·N, a) holding ``w1 X[n] b2ᵀ`` (element ``[k·N + n, p]`` is its ``[p, k]``).
    """
    n_tok = x2.shape[0]
    c = w1.shape[1]
    xt = x2.reshape(n_tok * c, -1)  # (N·c, d): row n·c + i is X[n][i, :]
    ht = xt.t().contiguous() if b2 is None else b2 @ xt.t()  # (m, N·c): (X[n] b2ᵀ)[i, k] at [k, n·c + i]
    k = ht.view(-1, c) @ w1.t()  # (m·N, c) @ (c, a) -> (m·N, a)
    return ht, k


def kron_splits(n_tok: int, a: int, c: int) -> int:
    """Into how many token groups ``KronLinear`` splits its rank-m products: 2 (one per thread) when two threads are
    available and the token count is even and large enough (``lowrank.row_chunks``), else 1.

    MKL runs these thin products (8-row outputs, 16-48-long contractions) on one thread; as batches of two token
    halves both threads work. The halves stay separate through every product, so no layout copy is needed.
    """
    return 2 if n_tok % 2 == 0 and row_chunks(n_tok * min(a, c)) == 2 else 1


def kron_inner_split(
    x2: torch.Tensor, w1: torch.Tensor, b2: torch.Tensor | None, s: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``kron_inner`` over ``s`` token groups: ht (s, m, N/s·c) and k (s·m·N/s, a), row ``(h, k, n')`` of k being
    row ``(k, h·N/s + n')`` of ``kron_inner``'s (``s = 1``: the same tensors)."""
    c = w1.shape[1]
    x3 = x2.reshape(s, (x2.shape[0] // s) * c, -1)  # (s, N/s·c, d): row n·c + i of group h is X[h·N/s + n][i, :]
    ht = x3.transpose(1, 2).contiguous() if b2 is None else torch.bmm(b2.expand(s, -1, -1), x3.transpose(1, 2))
    k = ht.view(-1, c) @ w1.t()  # (s·m·N/s, c) @ (c, a) -> (s·m·N/s, a)
    return ht, k


def kron_apply(x2: torch.Tensor, w1: torch.Tensor, a2: torch.Tensor, b2: torch.Tensor | None) -> torch.Tensor:
    """``(w1 ⊗ w2) x`` for every row of ``x2``, as ``w1 · X · w2ᵀ`` with ``w2 = a2 · b2`` (``b2`` None: ``w2 = a2``).

    x2 (N, c·d), w1 (a, c), a2 (b, m), b2 (m, d) -> (N·a, b): row ``n·a + p``, column ``q`` is output
    ``p·b + q`` of token ``n``, so ``.view(N, a·b)`` is the layer output. Every product is a plain GEMM on
    contiguous or simply transposed operands (no copies, except ``Xᵀ`` when ``w2`` is full).
    """
    _, k = kron_inner(x2, w1, b2)
    return k.view(a2.shape[1], -1).t() @ a2.t()  # (N·a, m) @ (m, b) -> (N·a, b)


def kron_flops(a: int, b: int, c: int, d: int, r: int | None) -> int:
    """Multiply-adds per token of ``kron_apply`` (``r`` None: full ``w2``)."""
    m = d if r is None else r
    return m * (a * c + a * b) + (0 if r is None else r * c * d)


class KronLinear(torch.autograd.Function):
    """``x Wᵀ + b + (w1 ⊗ a2·b2) x`` (times a row mask) that keeps only ``x`` and the factors for backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, kind, w1, a2, b2, mask):
        with torch.no_grad():
            out = kron_linear_forward(x, base_weight_out_in(weight, kind), bias, w1, a2, b2, mask)
        ctx.kind = kind
        ctx.save_for_backward(x, weight, w1, a2, b2, mask)
        return out

    @staticmethod
    def backward(ctx, gy):
        x, weight, w1, a2, b2, mask = ctx.saved_tensors
        need = ctx.needs_input_grad
        w = base_weight_out_in(weight, ctx.kind)  # (out, in)
        n_tok = x.numel() // x.shape[-1]
        a, c = w1.shape
        x2 = x.reshape(n_tok, -1)  # (N, in)
        g2 = gy.reshape(n_tok, -1)  # (N, out)
        ge = g2 if mask is None else g2 * mask  # gradient reaching the adapter branch
        s = kron_splits(n_tok, a, c)  # s token groups, kept apart through every product below
        ht, k = kron_inner_split(x2, w1, b2, s)  # recomputed rather than kept: (s, m, N/s·c), (s·m·N/s, a)
        m = ht.shape[1]
        ge3 = ge.reshape(s, -1, a2.shape[0])  # (s, N/s·a, b)
        # (m, N/s·a) @ (N/s·a, b) per group, summed -> (m, b), transposed: both operands row-major (MKL is ~10x
        # slower with the long contraction on transposed operands).
        g_a2 = torch.bmm(k.view(s, m, -1), ge3).sum(0).t() if need[5] else None
        gk = torch.bmm(a2.t().expand(s, -1, -1), ge3.transpose(1, 2)).view(-1, a)  # (s, m, N/s·a) as (s·m·N/s, a)
        g_w1 = gk.t() @ ht.view(-1, c) if need[4] else None  # (a, s·m·N/s) @ (s·m·N/s, c) -> (a, c)
        ght = (gk @ w1).view(s, m, -1)  # (s·m·N/s, a) @ (a, c) -> (s, m, N/s·c)
        x3 = x2.reshape(s, ght.shape[2], -1)  # (s, N/s·c, d)
        g_b2 = torch.bmm(ght, x3).sum(0) if (b2 is not None and need[6]) else None  # (m, d)
        gx = gw = gb = None
        if need[0]:
            gx = g2 @ w  # (N, out) @ (out, in) -> (N, in)
            gxt = gx.view(s, ght.shape[2], -1)  # (s, N/s·c, d)
            if b2 is None:
                gxt.add_(ght.transpose(1, 2))
            else:
                gxt.baddbmm_(ght.transpose(1, 2), b2.expand(s, -1, -1))  # += (N/s·c, m) @ (m, d) per group
            gx = gx.view(x.shape)
        if need[1]:
            gw = g2.t() @ x2  # (out, N) @ (N, in)
            gw = gw.t() if ctx.kind == "conv1d_t" else gw
        if need[2]:
            gb = g2.sum(0)
        return gx, gw, gb, None, g_w1, g_a2, g_b2, None


def kron_linear_forward(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    w1: torch.Tensor,
    a2: torch.Tensor,
    b2: torch.Tensor | None,
    mask: torch.Tensor | None,
) -> torch.Tensor:
    """Base product plus the Kronecker update, accumulated in place (no autograd; w (out, in))."""
    out = F.linear(x, w, bias)  # (..., out)
    n_tok = out.numel() // out.shape[-1]
    b = a2.shape[0]
    if mask is None:
        sp = kron_splits(n_tok, *w1.shape)
        _, k = kron_inner_split(x.reshape(n_tok, -1), w1, b2, sp)  # (s·m·N/s, a)
        m = a2.shape[1]
        # += (N/s·a, m) @ (m, b) per token group
        out.view(sp, -1, b).baddbmm_(k.view(sp, m, -1).transpose(1, 2), a2.t().expand(sp, -1, -1))
    else:
        y = kron_apply(x.reshape(n_tok, -1), w1, a2, b2).view(n_tok, -1) * mask  # (N, out)
        out.view(n_tok, -1).add_(y)
    return out


def kron_pays(a: int, b: int, c: int, d: int, r: int | None, n_tokens: int, needs_grad: bool) -> bool:
    """Whether the Kronecker path beats folding ``W + ΔW`` for an (a·b, c·d) layer, by multiply-add counts.

    With gradients the fold costs one extra full-size product (the weight gradient) per step and the Kronecker
    path about four times its forward; without gradients the fold costs a few passes over the (out, in) weight,
    the Kronecker path ``n_tokens`` times its per-token cost (``r`` None: full ``w2``).
    """
    k = kron_flops(a, b, c, d, r)
    full = a * b * c * d
    return 4 * k < full if needs_grad else n_tokens * k <= 8 * full


def kron_linear(
    base: nn.Module,
    kind: str,
    x: torch.Tensor,
    w1: torch.Tensor,
    a2: torch.Tensor,
    b2: torch.Tensor | None,
    mask: torch.Tensor | None,
    *,
    fused: bool,
    needs_grad: bool,
) -> torch.Tensor:
    """``base(x) + ((w1 ⊗ a2·b2) x) ⊙ mask`` for a Linear or transformers Conv1D ``base``.

    Args:
        base: The adapted layer (``kind`` ``"linear"`` or ``"conv1d_t"``); its own forward is used when the
            adapter runs apart from it.
        x: (..., c·d) input.
        w1: (a, c). a2: (b, m), already scaled. b2: (m, d), or None when ``a2`` is the full ``w2``.
        mask: (a·b,) output-row multipliers (rank dropout) or None.
        fused: Whether input, base weight and factors share one dtype (then the hand-written paths may run).
        needs_grad: Whether this forward will be differentiated.

    Returns:
        (..., a·b) in the base output's dtype.
    """
    special = torch.compiler.is_compiling() or torch.is_autocast_enabled(x.device.type)
    if fused and not special:
        if not needs_grad:
            with torch.no_grad():
                return kron_linear_forward(x, base_weight_out_in(base.weight, kind), base.bias, w1, a2, b2, mask)
        return KronLinear.apply(x, base.weight, base.bias, kind, w1, a2, b2, mask)
    out = base._la_base_forward(x)
    n_tok = x.numel() // x.shape[-1]
    y = kron_apply(x.reshape(n_tok, -1).to(w1.dtype), w1, a2, b2).reshape(n_tok, -1)  # (N, out)
    if mask is not None:
        y = y * mask
    return (out + y.view(out.shape)).to(out.dtype)  # summed in the wider dtype, rounded once (PEFT's rounding)
