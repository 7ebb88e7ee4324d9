"""Low-rank adapters on a quantized base (QLoRA): ``y = x Wᵀ + b + s · (x_d Aᵀ) Bᵀ`` with ``W`` dequantized on the fly.

``quantized_lowrank_linear`` runs the layer as one autograd Function that dequantizes ``W`` (bitsandbytes NF4/FP4/
int8 or torchao, ``core.quant.dequantized_weight``) in forward and again in backward, never keeping it between the
two, as the quantized layer's own training matmul does (so a step's peak memory holds one layer's full-precision
weight at a time, not the model's). The dequantized ``W`` is a fresh tensor, so the update can be folded into it
in place: ``x (W + s·B·A)ᵀ`` is one product over the rows, where PEFT's QLoRA layer runs the base matmul, two
rank-r products, a scaling and an add (and clones the base output). Folding costs a pass over the (out, in) weight;
accumulating ``s·h Bᵀ`` into the output instead costs a pass over the (rows, out) output, so the forward folds when
``in < rows`` (``fold_forward``). Backward: ``∂h = s·g B`` is needed for ``∂A`` anyway, so ``∂x = g W + ∂h A``
accumulates into the (rows, in) input gradient unless folding into the (out, in) weight is the smaller pass
(``out < rows``, ``fold_backward``): ``∂x = g (W + s·B·A)``. With input dropout nothing folds: ``∂x = g W``,
``∂x_d = ∂h A``. ``∂A = ∂hᵀ x_d``, ``∂B = s·gᵀ h``. Saved: ``x`` (and ``x_d``), ``hᵀ`` (r, rows) and the factors;
the weight-sized tensors live only inside forward and inside backward. ``A`` may be any differentiable tensor
(AdaLoRA: ``A ⊙ E``).

``quantized_dora_linear`` does the same for DoRA: ``kernels.dora``'s Function maths (``dora_forward`` /
``dora_backward``: one product by the folded ``W + s·B·A`` its weight norm needs anyway, the norm detached, the
``diag(f)[W + s·B·A | s·B]`` backward where ``lowrank.fold_plan`` says it pays) on a weight dequantized in forward,
folded in place there, and dequantized again in backward only when an input needs its gradient (``∂m``, ``∂A``,
``∂B`` need no weight). PEFT's QLoRA DoRA layer runs the quantized base product, dequantizes the weight a second
time for the norm, and adds the rank-r products and the rescaling as separate passes.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_adapters.core.quant import dequantized_weight
from lightning_adapters.kernels.dora import dora_backward, dora_forward
from lightning_adapters.kernels.lowrank import thin_cols_product, thin_rows_product


def quantized_lowrank_applies(x: torch.Tensor, A: torch.Tensor) -> bool:
    """Whether ``quantized_lowrank_linear`` can run: the input in the adapter's dtype, no autocast to honour, and
    not while ``torch.compile`` traces (dynamo cannot capture the Function's saved views: the compiled model runs
    the plain terms, which it can)."""
    same = x.dtype == A.dtype and x.is_floating_point()
    return same and not torch.is_autocast_enabled(x.device.type) and not torch.compiler.is_compiling()


def fold_forward(rows: int, in_f: int) -> bool:
    """Forward: whether adding ``s·B·A`` into the fresh (out, in) weight touches fewer numbers than adding
    ``s·h Bᵀ`` into the (rows, out) output (both are in-place rank-r updates)."""
    return in_f < rows


def fold_backward(rows: int, out_f: int) -> bool:
    """Backward: whether adding ``s·B·A`` into the fresh (out, in) weight touches fewer numbers than adding
    ``∂h A`` into the (rows, in) input gradient (``∂h`` is computed for ``∂A`` either way)."""
    return out_f < rows


def quantized_lowrank_linear(
    x: torch.Tensor,
    xd: torch.Tensor | None,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    scale: float,
    module: nn.Module,
) -> torch.Tensor:
    """``x Wᵀ + b + s·(x_d Aᵀ) Bᵀ`` for the quantized Linear ``module`` (``xd``: the dropped-out input, or None).

    Shapes: x, xd (..., in); A (r, in); B (out, r); bias (out,) -> (..., out), in ``x``'s dtype.
    """
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    return _QuantizedLowRankLinear.apply(x, xd, bias, A, B, scale, module)


class _QuantizedLowRankLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x, xd, bias, A, B, scale, module):  # noqa: ANN001, ANN205 (autograd signature)
        w = dequantized_weight(module, x.dtype)  # (out, in), a fresh tensor
        out_f, in_f = w.shape
        x2 = x.reshape(-1, in_f)  # (N, in)
        a_in = x2 if xd is None else xd.reshape(-1, in_f)  # (N, in) adapter input
        fold = xd is None and fold_forward(x2.shape[0], in_f)
        need_h = ctx.needs_input_grad[4] or not fold
        h_t = thin_cols_product(A, a_in) if need_h else None  # (r, N), thin side first
        if fold:
            y = F.linear(x2, w.addmm_(B, A, alpha=scale), bias)  # x (W + s·B·A)ᵀ: one product over the rows
        else:
            y = F.linear(x2, w, bias).addmm_(h_t.t(), B.t(), alpha=scale)  # + s · h Bᵀ
        ctx.scale, ctx.module, ctx.has_xd = scale, module, xd is not None
        ctx.shapes = (x.shape, None if xd is None else xd.shape)
        # x itself is only needed for ∂A without dropout; with dropout ∂A reads x_d.
        ctx.save_for_backward(
            x2 if xd is None and ctx.needs_input_grad[3] else None, None if xd is None else a_in, h_t, A, B
        )
        return y.view(*x.shape[:-1], out_f)

    @staticmethod
    def backward(ctx: Any, gy):  # noqa: ANN001, ANN205
        x2, a_in, h_t, A, B = ctx.saved_tensors
        need_x, need_xd, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        s = ctx.scale
        x_shape, xd_shape = ctx.shapes
        a_in = x2 if a_in is None else a_in
        g = gy.reshape(-1, B.shape[0])  # (N, out)
        gx = gxd = gbias = ga = gb = None
        fold = need_x and not ctx.has_xd and fold_backward(g.shape[0], B.shape[0])
        # Rank-r products thin side first (kernels.lowrank): ∂h = s·g B computed as (r, N), used as (N, r).
        need_dh = need_a or need_xd or (need_x and not ctx.has_xd and not fold)
        dh = thin_cols_product(B.t(), g).mul_(s).t() if need_dh else None
        if need_x:
            w = dequantized_weight(ctx.module, g.dtype)  # dequantized again: never kept since forward
            if fold:
                gx = torch.mm(g, w.addmm_(B, A, alpha=s))  # ∂x = g (W + s·B·A)
            else:
                gx = torch.mm(g, w)
                if not ctx.has_xd:
                    gx.addmm_(dh, A)  # ∂x = g W + ∂h A
            gx = gx.view(x_shape)
        if need_xd:
            gxd = torch.mm(dh, A).view(xd_shape)
        if need_bias:
            gbias = g.sum(0)
        if need_a:
            ga = thin_rows_product(dh, a_in)  # (r, in)
        if need_b:
            gb = thin_rows_product(h_t.t(), g).mul_(s).t()  # (r, out) product, returned as (out, r)
        return gx, gxd, gbias, ga, gb, None, None


def quantized_dora_applies(x: torch.Tensor, A: torch.Tensor, magnitude: torch.Tensor) -> bool:
    """Whether ``quantized_dora_linear`` can run: as ``kernels.dora.dora_fused_applies`` (one dtype, no autocast,
    not while ``torch.compile`` traces), the base's weight being the one dequantized in ``x``'s dtype."""
    return quantized_lowrank_applies(x, A) and magnitude.dtype == x.dtype


def quantized_dora_linear(
    x: torch.Tensor,
    xd: torch.Tensor | None,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    magnitude: torch.Tensor,
    scale: float,
    module: nn.Module,
) -> torch.Tensor:
    """DoRA's ``(x − x_d) Wᵀ + f ⊙ (x_d (W + s·B·A)ᵀ) + b`` (``f = m / ‖W + s·B·A‖_row``, detached; ``x_d = x``
    when ``xd`` is None) for the quantized Linear ``module``, ``W`` dequantized in ``x``'s dtype.

    Shapes: x, xd (..., in); A (r, in); B (out, r); magnitude, bias (out,) -> (..., out), in ``x``'s dtype.
    """
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    return _QuantizedDoRALinear.apply(x, xd, module, bias, A, B, magnitude, scale)


class _QuantizedDoRALinear(torch.autograd.Function):
    # Inputs in ``kernels.dora``'s order, the quantized module where the weight goes (no gradient either way).

    @staticmethod
    def forward(ctx, x, xd, module, bias, A, B, magnitude, scale):  # noqa: ANN001, ANN205 (autograd signature)
        w = dequantized_weight(module, x.dtype)  # (out, in), a fresh tensor, folded in place
        y, saved = dora_forward(ctx, x, xd, w, bias, A, B, magnitude, scale, None, fresh=True)
        ctx.module = module
        ctx.save_for_backward(*saved)
        return y

    @staticmethod
    def backward(ctx, gy):  # noqa: ANN001, ANN205
        return (*dora_backward(ctx, gy, ctx.saved_tensors, lambda: dequantized_weight(ctx.module, gy.dtype)), None)
