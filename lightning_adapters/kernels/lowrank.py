"""Low-rank products on Linear / transformers-Conv1D rows: ``y = x Wᵀ + b + s · (x_d Aᵀ) Bᵀ`` (LoRA, AdaLoRA).

``lowrank_linear`` runs the whole layer as one autograd Function (``LowRankLinear``). It saves ``x``, the rank-r
``h = A x_d`` and the weights, what PEFT's layer saves, never a weight- or activation-sized temporary, and computes no
gradient nobody asked for (no ``∂x`` when ``x`` does not require grad, no ``∂W`` for a frozen base). On CPU the rank-r
products cost memory traffic, not arithmetic, so the layer saves passes over full-size tensors: with enough rows it
multiplies by the folded ``W + s·B·A`` (forward, ``fold_pays``) and by ``[W + s·B·A | s·B]`` (backward, giving ``∂x``
and ``∂h`` in one product, ``fold_pays_backward``) instead of accumulating ``s·h·Bᵀ`` and ``∂h·A`` in place; the
rank-r products are laid out thin side first, which BLAS runs several times faster, and split over two row halves
when two threads are available (``thin_rows_product``, ``thin_cols_product``). ``fold_plan`` makes these choices
per call from the shape and the device. Outputs and gradients are those of the formula; with ``B = 0`` the folded
weight is ``W`` exactly.

``A`` may be any differentiable tensor (AdaLoRA passes ``A ⊙ E``; autograd splits its gradient).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def fold_pays(rows: int, in_f: int, out_f: int) -> bool:
    """Forward: whether ``x (W + s·B·A)ᵀ`` beats ``x Wᵀ`` followed by an in-place ``+= s·h Bᵀ``.

    Building the folded weight touches ~3·out·in numbers (read ``W``, write ``W + s·B·A``, the rank-r product);
    accumulating touches 2·rows·out (read and write the output).
    """
    return 3 * in_f < 2 * rows


def fold_pays_backward(rows: int, in_f: int, out_f: int) -> bool:
    """Backward: whether one product ``g [W + s·B·A | s·B]`` (giving ``∂x`` and ``∂h`` together) beats ``g W`` plus
    a separate ``∂h = s·g B`` (one more read of the rows×out gradient) and an in-place ``∂x += ∂h A``."""
    return 3 * in_f * out_f < rows * (out_f + 2 * in_f)


# Width multiple of ``fold_cat``'s columns: MKL's fp32 GEMM runs 30-45% slower when the output width is not a
# multiple of 8 (e.g. 396 = 384 + AdaLoRA's init_r 12, against 384 or 400 on the reference CPU).
CAT_ALIGN = 16


def fold_cat(weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """``[W + s·B·A | s·B | 0]``: (out, in), (out, r) and zero columns up to a multiple of ``CAT_ALIGN``.

    Returns (out, in + r + pad); a product ``g @ fold_cat(...)`` holds ``∂x`` in its first ``in`` columns and ``∂h``
    in the next ``r``, the zero columns only align the product's width.
    """
    out_f, in_f = weight.shape
    r = A.shape[0]
    width = -(-(in_f + r) // CAT_ALIGN) * CAT_ALIGN
    w_cat = torch.empty(out_f, width, dtype=weight.dtype, device=weight.device)
    w_cat[:, :in_f].copy_(weight).addmm_(B, A, alpha=scale)
    w_cat[:, in_f : in_f + r].copy_(B).mul_(scale)
    w_cat[:, in_f + r :].zero_()
    return w_cat


def fold_plan(rows: int, in_f: int, out_f: int, device: torch.device) -> tuple[bool, bool]:
    """Whether the forward folds (``fold_pays``) and whether the backward folds (``fold_pays_backward``).

    Both compare element counts, so they hold for every dtype (each side scales with the item size). Only on the
    CPU, where they were measured: a GPU's rank-r products are cheap next to its launch and GEMM costs and memory is
    what it lacks, so there the layer runs the plain products. Each folded weight is a temporary of the direction
    that builds it and is freed right after its product: kept from forward to backward it would hold one extra
    weight-sized tensor per layer for the whole step (2.5% more peak memory than PEFT on the decoder at hidden 512,
    sequence 1024, growing with the model), while rebuilding it cost nothing measurable (within ±4% per layer on
    one CPU thread).
    """
    if device.type != "cpu":
        return False, False
    return fold_pays(rows, in_f, out_f), fold_pays_backward(rows, in_f, out_f)


def row_chunks(rows: int, device: torch.device | None = None) -> int:
    """Into how many row chunks a rank-r product over ``rows`` tokens is split (see ``thin_rows_product``): two on
    the CPU with two threads and enough rows, else one (the split works around MKL, a GPU needs none)."""
    cpu = device is None or device.type == "cpu"
    return 2 if cpu and rows >= 256 and rows % 2 == 0 and torch.get_num_threads() > 1 else 1


def thin_rows_product(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``uᵀ v`` for tall ``u`` (N, p) and ``v`` (N, q) with a small ``p``: a sum over the N rows.

    MKL runs such a thin product on about one thread; as a batch of two half-row products plus one tiny sum it
    uses both (25-35% faster at the reference shapes). Any strides that split N into two equal views work.
    """
    k = row_chunks(u.shape[0], u.device)
    if k == 1:
        return torch.mm(u.t(), v)
    n = u.shape[0] // k
    return torch.bmm(u.view(k, n, -1).transpose(1, 2), v.view(k, n, -1)).sum(0)


def thin_cols_product(m: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``m xᵀ`` (r, N) for a small (r, k) ``m`` and tall ``x`` (N, k), split over N as ``thin_rows_product``."""
    k = row_chunks(x.shape[0], x.device)
    if k == 1:
        return torch.mm(m, x.t())
    n = x.shape[0] // k
    out = torch.bmm(m.expand(k, -1, -1), x.view(k, n, -1).transpose(1, 2))  # (k, r, n)
    return out.transpose(0, 1).reshape(m.shape[0], -1)  # (r, N): a copy of r·N values


def fused_linear_applies(x: torch.Tensor, weight: torch.Tensor, A: torch.Tensor) -> bool:
    """Whether ``LowRankLinear`` runs the layer: one dtype throughout, no autocast to honour, and not while
    ``torch.compile`` traces the model. Compiled, the plain products are better: inductor fuses their scaling and
    sum into the GEMMs by itself, while the Function's hand-made folds stay fixed in the graph (measured on the
    reference decoder, both sides compiled: 1.01× PEFT's step and 1.02× its peak memory with the Function)."""
    same = x.dtype == weight.dtype == A.dtype
    return same and not torch.is_autocast_enabled(x.device.type) and not torch.compiler.is_compiling()


class LowRankLinear(torch.autograd.Function):
    """``y = x Wᵀ + b + s · (x_d Aᵀ) Bᵀ`` for 2-D-flattened rows, with a hand-written, minimal backward.

    ``x_d`` is the dropped-out adapter input, or ``None`` when it is ``x`` itself. Saved: ``x`` (and ``x_d``),
    ``hᵀ = A x_dᵀ`` (r, rows) and the weights; a folded weight lives only during its own product (``fold_plan``).
    The rank-r products are written thin side first (``A xᵀ``, ``Bᵀ gᵀ``, ``hᵀ g``):
    BLAS runs these layouts several times faster than ``x Aᵀ``, ``g B`` and ``gᵀ h`` on CPU.
    """

    @staticmethod
    def forward(ctx, x, xd, weight, bias, A, B, scale):  # noqa: ANN001, ANN205 (autograd signature)
        out_f, in_f = weight.shape
        x2 = x.reshape(-1, in_f)  # (N, in)
        a_in = x2 if xd is None else xd.reshape(-1, in_f)  # (N, in) adapter input
        rows = x2.shape[0]
        fold, fold_back = fold_plan(rows, in_f, out_f, x2.device) if xd is None else (False, False)
        need_h = ctx.needs_input_grad[5] or not fold
        h_t = thin_cols_product(A, a_in) if need_h else None  # (r, N)
        if fold:
            y = F.linear(x2, torch.addmm(weight, B, A, alpha=scale), bias)  # (N, out); the (out, in) fold is freed
        else:
            y = F.linear(x2, weight, bias)
            y.addmm_(h_t.t(), B.t(), alpha=scale)  # += s · h Bᵀ, scaling the (N, r) factor, in place
        ctx.scale, ctx.has_xd, ctx.fold_back = scale, xd is not None, fold_back
        ctx.x_shape = x.shape if xd is None else (x.shape, xd.shape)
        # A serves only the adapter input's gradient (∂x through ``[W + s·B·A | s·B]`` or ``+ ∂h A``; ∂x_d = ∂h A).
        # Not keeping it otherwise matters where A is a temporary (AdaLoRA's A ⊙ E, (r, in) per layer) and a first
        # layer's input needs no gradient (frozen embeddings): autograd's own products would not keep it either.
        need_a_later = (ctx.needs_input_grad[0] and xd is None) or ctx.needs_input_grad[1]
        ctx.save_for_backward(x2, None if xd is None else a_in, h_t, weight, A if need_a_later else None, B)
        return y.view(*x.shape[:-1], out_f)

    @staticmethod
    def backward(ctx, gy):  # noqa: ANN001, ANN205
        x2, a_in, h_t, weight, A, B = ctx.saved_tensors
        need_x, need_xd, need_w, need_b, need_a, need_b_lora = ctx.needs_input_grad[:6]
        s = ctx.scale
        if a_in is None:
            a_in = x2
        x_shape, xd_shape = ctx.x_shape if ctx.has_xd else (ctx.x_shape, None)
        out_f, in_f = weight.shape
        g = gy.reshape(-1, out_f)  # (N, out)
        gx = gxd = gw = gbias = ga = gb = None
        dh = None  # ∂L/∂h = s · g B  (N, r)
        if need_b_lora:  # first: g was just written by the layer above and is still in cache
            gb = thin_rows_product(h_t.t(), g).mul_(s).t()  # (r, out) product, returned as (out, r)
        if need_x and ctx.fold_back:
            # One product gives both: g [W + s·B·A | s·B] -> (N, in + r) = [∂x | ∂h].
            both = torch.mm(g, fold_cat(weight, A, B, s))  # (N, in + r + pad); the fold is freed after it
            gx, dh = both[:, :in_f].view(x_shape), both[:, in_f : in_f + A.shape[0]]
        else:
            if need_a or need_xd or (need_x and not ctx.has_xd):
                dh = thin_cols_product(B.t(), g).mul_(s).t()  # computed as (r, N), used as (N, r)
            if need_x:
                gx = torch.mm(g, weight)
                if not ctx.has_xd:
                    gx.addmm_(dh, A)  # + ∂h A, in place
                gx = gx.view(x_shape)
        if need_xd:
            gxd = torch.mm(dh, A).view(xd_shape)
        if need_w:
            gw = torch.mm(g.t(), x2)  # (out, in)
        if need_b:
            gbias = g.sum(0)
        if need_a:
            ga = thin_rows_product(dh, a_in)  # (r, in)
        return gx, gxd, gw, gbias, ga, gb, None


def lowrank_linear(
    x: torch.Tensor,
    xd: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """``x Wᵀ + b + s · (x_d Aᵀ) Bᵀ`` through ``LowRankLinear`` (check ``fused_linear_applies`` first).

    Args:
        x: (..., in) layer input.
        xd: The dropped-out adapter input (same shape), or None when the adapter reads ``x`` itself.
        weight: (out, in) base weight (a transposed view for transformers Conv1D).
        bias: (out,) or None.
        A: (r, in). B: (out, r). scale: ``s``.

    Returns:
        (..., out).
    """
    return LowRankLinear.apply(x, xd, weight, bias, A, B, scale)
