"""DoRA on Linear / transformers-Conv1D rows: ``y = f ⊙ (x (W + s·B·A)ᵀ) + b`` with ``f = m / ‖W + s·B·A‖_row``.

The norm ``n = ‖W + s·B·A‖_row`` is a constant of the step (detached, the DoRA paper's §4.3, as PEFT), so the
layer is a row-scaled LoRA whose scale ``f`` is learned through ``m`` alone: ``∂m_j = Σ_i g_ij u_ij / n_j`` with
``u = x (W + s·B·A)ᵀ`` the unscaled output. With a dropped-out adapter input ``x_d`` (dropout in training) the
base keeps the clean input, as in PEFT::

    y = x Wᵀ + b + (f − 1) ⊙ (x_d Wᵀ) + f ⊙ s·(x_d Aᵀ) Bᵀ = (x − x_d) Wᵀ + f ⊙ (x_d (W + s·B·A)ᵀ) + b

``DoRALinear`` runs the whole layer as one autograd Function. Training needs the folded ``W + s·B·A`` for the
norm anyway, so its forward is one product by it (never ``x Wᵀ`` plus a rank-r correction, never PEFT's separate
base, LoRA and rescaling passes), bias included, then ``z + (f − 1) ⊙ (z − b)``: at init (``f = 1``, ``B = 0``)
that is the base module's own output bit for bit (the folded weight keeps ``W``'s memory layout). It saves ``x``
(or ``x_d``), ``u`` (only when ``m`` needs a gradient) and the rank-r ``h = A x_d`` (only when ``B`` does), never a
weight-sized tensor. When the backward folds (``lowrank.fold_plan``: on the CPU, by shape) and an input needs a
gradient it rebuilds ``[W + s·B·A | s·B]``, scales its rows by ``f`` and multiplies once to get ``∂x`` (or ``∂x_d``)
and ``∂h`` together; otherwise it scales the upstream gradient by ``f`` and runs LoRA's unfolded backward. A
precomputed ``norm`` (the layer's eval-mode cache) makes the forward fold only where that pays (``fold_plan``;
unfolded, ``x Wᵀ + b`` comes from the base weight alone and the rank-r term is added to its copy). A base weight
that needs a gradient is left to the plain form (DoRA trains ``m``, ``A``, ``B``). The Function's maths is
``dora_forward`` / ``dora_backward``, which take the weight from the caller: ``DoRALinear`` saves the base weight,
``kernels.quantized`` dequantizes a quantized base's in each direction instead. Without autograd
(``dora_linear_no_grad``) the factor folds into the weight: one product by ``diag(f)(W + s·B·A)``, ``W`` itself at
init.

A row whose ``W + s·B·A`` is exactly zero has no direction: its factor is 0, and so is ``∂m`` there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from lightning_adapters.kernels.lowrank import fold_cat, fold_plan, thin_cols_product, thin_rows_product


def row_norm(weight: torch.Tensor) -> torch.Tensor:
    """L2 norm of every output slice of ``weight`` (out, ...) -> (out,)."""
    return weight.reshape(weight.shape[0], -1).norm(p=2, dim=1)


def dora_factor(magnitude: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """``m / ‖W + s·B·A‖`` per output, 0 where the norm is 0 (a zero row has no direction to scale).

    The division runs on a norm with its zeros replaced by 1, so neither the value nor ``∂/∂m`` is NaN there.
    """
    zero = norm == 0
    return torch.where(zero, torch.zeros_like(magnitude), magnitude / torch.where(zero, torch.ones_like(norm), norm))


def norm_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype the weight norm is computed in: fp32 for half weights on CPU, else the weight's own."""
    if weight.device.type == "cpu" and weight.dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return weight.dtype


def folded_weight(
    weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float, fresh: bool = False
) -> torch.Tensor:
    """``W + s·B·A`` (out, in) in ``norm_dtype(weight)``, laid out in memory as ``weight`` is.

    A transposed view (transformers Conv1D stores ``(in, out)``) gets a transposed result, so a product by it runs
    the same BLAS layout as the base module's own: with ``B = 0`` the output is the base's bit for bit. ``fresh``:
    ``weight`` is a temporary that may be overwritten, so a contiguous one in the norm dtype is folded in place.
    """
    cd = norm_dtype(weight)
    if fresh and weight.dtype == cd and weight.is_contiguous():
        return weight.addmm_(B.to(cd), A.to(cd), alpha=scale)
    if weight.t().is_contiguous() and not weight.is_contiguous():
        return torch.addmm(weight.t().to(cd), A.t().to(cd), B.t().to(cd), alpha=scale).t()  # (in, out) storage
    return torch.addmm(weight.to(cd), B.to(cd), A.to(cd), alpha=scale)


def dora_fused_applies(x: torch.Tensor, weight: torch.Tensor, A: torch.Tensor, magnitude: torch.Tensor) -> bool:
    """Whether ``DoRALinear`` runs the layer: one dtype throughout, no autocast, a frozen base weight, and not while
    ``torch.compile`` traces the model (inductor fuses the plain form's scalings into its products, as for LoRA:
    ``lowrank.fused_linear_applies``)."""
    same = x.dtype == weight.dtype == A.dtype == magnitude.dtype
    eager = not torch.compiler.is_compiling()
    return same and eager and not weight.requires_grad and not torch.is_autocast_enabled(x.device.type)


def autograd_records(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd records an op on ``tensors``: grad mode on and one of them (None skipped) requires grad."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class DoRALinear(torch.autograd.Function):
    """``y = (x − x_d) Wᵀ + f ⊙ (x_d (W + s·B·A)ᵀ) + b`` (``x_d = x`` when None) with a hand-written backward.

    ``f = m / n`` per output, ``n`` the detached norm (computed here from the folded weight unless given). The
    maths is ``dora_forward`` / ``dora_backward``, shared with the quantized-base Function
    (``kernels.quantized``), which dequantizes ``W`` in each of them instead of saving it.
    """

    @staticmethod
    def forward(ctx, x, xd, weight, bias, A, B, magnitude, scale, norm):  # noqa: ANN001, ANN205
        y, saved = dora_forward(ctx, x, xd, weight, bias, A, B, magnitude, scale, norm)
        ctx.save_for_backward(weight, *saved)
        return y

    @staticmethod
    def backward(ctx, gy):  # noqa: ANN001, ANN205
        weight, *saved = ctx.saved_tensors
        return (*dora_backward(ctx, gy, saved, lambda: weight), None, None)


def dora_forward(
    ctx: Any,
    x: torch.Tensor,
    xd: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    magnitude: torch.Tensor,
    scale: float,
    norm: torch.Tensor | None,
    fresh: bool = False,
) -> tuple[torch.Tensor, tuple[torch.Tensor | None, ...]]:
    """The forward of a DoRA autograd Function whose inputs start ``(x, xd, weight, bias, A, B, magnitude)``.

    Sets what ``dora_backward`` reads on ``ctx`` and returns the output and the tensors to save for it (never
    ``weight``: the caller saves it or rebuilds it). ``fresh``: ``weight`` is a temporary of the caller's, which the
    fold may overwrite (a dequantized weight).
    """
    out_f, in_f = weight.shape
    x2 = x.reshape(-1, in_f)  # (N, in)
    a_in = x2 if xd is None else xd.reshape(-1, in_f)  # (N, in) adapter input
    rows = x2.shape[0]
    need_b_lora, need_m = ctx.needs_input_grad[5:7]
    wf = None
    if norm is None:
        wf = folded_weight(weight, A, B, scale, fresh=fresh and xd is None)  # (out, in) in the norm dtype
        norm = torch.linalg.vector_norm(wf, dim=1).to(magnitude.dtype)  # (out,)
        wf = wf.to(x.dtype)
    elif xd is not None or fold_plan(rows, in_f, out_f, x.device)[0]:
        wf = folded_weight(weight, A, B, scale, fresh=fresh and xd is None).to(x.dtype)
    factor = dora_factor(magnitude, norm)  # (out,)
    fx = factor.to(x.dtype)
    h_t = thin_cols_product(A, a_in) if need_b_lora or wf is None else None  # (r, N)
    u = None  # x_d (W + s·B·A)ᵀ (N, out), kept for ∂m
    if xd is not None:
        u = torch.mm(a_in, wf.t())
        y = u * fx if bias is None else torch.addcmul(bias, u, fx)
        y.addmm_(x2 - a_in, weight.t())  # + (x − x_d) Wᵀ
    elif wf is None:
        # z = x Wᵀ + b as the base computes it; y = z + (f ⊙ u − (z − b)): exactly z while f = 1 and B = 0.
        y = F.linear(x2, weight, bias)  # (N, out)
        zb = y if bias is None else y - bias
        u = torch.addmm(zb, h_t.t(), B.t(), alpha=scale)  # x Wᵀ + s · h Bᵀ
        y.add_(torch.mul(u, fx).sub_(zb))
    else:
        y = F.linear(x2, wf, bias)  # (N, out): x (W + s·B·A)ᵀ + b, the base's own product when B = 0
        if bias is None:
            u, y = y, y * fx
        elif need_m:
            u = y - bias
            y.addcmul_(u, fx - 1)  # z + (f − 1)(z − b) = f ⊙ u + b
        else:
            y.mul_(fx).add_(bias * (1 - fx))  # f ⊙ z + (1 − f) b = f ⊙ u + b
    fold_back = fold_plan(rows, in_f, out_f, x.device)[1]
    ctx.scale, ctx.has_xd, ctx.fold_back = scale, xd is not None, fold_back
    ctx.x_shape = x.shape if xd is None else (x.shape, xd.shape)
    saved = (None if xd is None else x2, a_in, h_t, A, B, magnitude, norm, factor, u if need_m else None)
    return y.view(*x.shape[:-1], out_f), saved


def dora_backward(
    ctx: Any, gy: torch.Tensor, saved: Sequence[torch.Tensor | None], weight_of: Callable[[], torch.Tensor]
) -> tuple[torch.Tensor | None, ...]:
    """The gradients ``(x, xd, weight, bias, A, B, magnitude)`` (the weight's None) from what ``dora_forward``
    saved; ``weight_of()`` gives the (out, in) weight, called at most once and only when an input needs a gradient.
    """
    x2, a_in, h_t, A, B, magnitude, norm, factor, u = saved
    need_x, need_xd, _, need_bias, need_a, need_b_lora, need_m = ctx.needs_input_grad[:7]
    s = ctx.scale
    x_shape, xd_shape = ctx.x_shape if ctx.has_xd else (ctx.x_shape, None)
    out_f, in_f = B.shape[0], A.shape[1]
    g = gy.reshape(-1, out_f)  # (N, out)
    fx = factor.to(g.dtype)
    gx = gxd = gbias = ga = gb = gm = None
    # The adapter input's gradient: ∂x without dropout, ∂x_d with it (its base part subtracted below).
    need_in = need_xd if ctx.has_xd else need_x
    weight = weight_of() if need_x or need_xd else None
    if need_m:
        # ∂m = Σ_rows g ⊙ u / n, 0 on zero-norm rows (as ∂/∂m of dora_factor).
        zero = norm == 0
        gm = torch.linalg.vecdot(g, u, dim=0).to(magnitude.dtype)  # (out,)
        gm = torch.where(zero, torch.zeros_like(gm), gm / torch.where(zero, torch.ones_like(norm), norm))
    if need_bias:
        gbias = g.sum(0)
    dh = None  # ∂L/∂h = s · (g ⊙ f) B  (N, r)
    gin = None  # (g ⊙ f) (W + s·B·A): the adapter input's gradient through the folded weight
    if need_in and ctx.fold_back:
        if need_b_lora:
            gb = thin_rows_product(h_t.t(), g).mul_(fx * s).t()  # (r, out) -> (out, r): s · (g ⊙ f)ᵀ h
        w_cat = fold_cat(weight, A, B, s).mul_(fx[:, None])  # diag(f) [W + s·B·A | s·B | 0], built here
        both = torch.mm(g, w_cat)  # (N, in + r + pad) = [(g ⊙ f)(W + s·B·A) | ∂h | 0]
        gin, dh = both[:, :in_f], both[:, in_f : in_f + A.shape[0]]
    else:
        gs = g * fx  # (N, out)
        if need_b_lora:
            gb = thin_rows_product(h_t.t(), gs).mul_(s).t()
        if need_a or need_in:
            dh = thin_cols_product(B.t(), gs).mul_(s).t()  # computed as (r, N), used as (N, r)
        if need_in:
            gin = torch.mm(gs, weight).addmm_(dh, A)
    if ctx.has_xd:
        gbase = torch.mm(g, weight) if need_x or need_xd else None  # g W: the base's part of ∂x and ∂x_d
        if need_x:
            gx = gbase.view(x_shape)
        if need_xd:
            gxd = gin.sub_(gbase).reshape(xd_shape)
    elif need_x:
        gx = gin.reshape(x_shape)
    if need_a:
        ga = thin_rows_product(dh, a_in)  # (r, in)
    return gx, gxd, None, gbias, ga, gb, gm


def dora_linear(
    x: torch.Tensor,
    xd: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    magnitude: torch.Tensor,
    scale: float,
    norm: torch.Tensor | None = None,
    factor: torch.Tensor | None = None,
) -> torch.Tensor:
    """DoRA's layer output (check ``dora_fused_applies`` first): through ``DoRALinear`` when autograd records,
    else ``dora_linear_no_grad``.

    Args:
        x: (..., in) layer input.
        xd: The dropped-out adapter input (same shape), or None when the adapter reads ``x`` itself.
        weight: (out, in) frozen base weight (a transposed view for transformers Conv1D).
        bias: (out,) or None.
        A: (r, in). B: (out, r). magnitude: (out,) ``m``. scale: ``s``.
        norm: The detached ``‖W + s·B·A‖_row`` (out,) if already known (a cache), else computed here.
        factor: ``dora_factor(magnitude, norm)`` for that ``norm`` if already known (a cache; read without
            autograd only, and only with ``norm``).

    Returns:
        (..., out).
    """
    if autograd_records(x, xd, bias, A, B, magnitude):
        return DoRALinear.apply(x, xd, weight, bias, A, B, magnitude, scale, norm)
    with torch.no_grad():
        return dora_linear_no_grad(x, xd, weight, bias, A, B, magnitude, scale, norm, factor)


def dora_linear_no_grad(
    x: torch.Tensor,
    xd: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    magnitude: torch.Tensor,
    scale: float,
    norm: torch.Tensor | None,
    factor: torch.Tensor | None = None,
) -> torch.Tensor:
    """The forward of ``DoRALinear`` without saving anything: ``f`` folded into the weight where the folded weight
    is built (no norm given, a dropped-out input, or ``lowrank.fold_plan``), else ``z + (f ⊙ u − (z − b))``.
    ``factor``: ``f`` for the given ``norm`` when the caller has it (ignored without ``norm``)."""
    out_f, in_f = weight.shape
    x2 = x.reshape(-1, in_f)
    if norm is None:
        factor = None
    if norm is None or xd is not None or fold_plan(x2.shape[0], in_f, out_f, x.device)[0]:
        wf = folded_weight(weight, A, B, scale)  # (out, in), a fresh tensor
        if norm is None:
            norm = torch.linalg.vector_norm(wf, dim=1).to(magnitude.dtype)
        if factor is None:
            factor = dora_factor(magnitude, norm)
        wf = wf.mul_(factor.to(wf.dtype)[:, None]).to(x.dtype)  # diag(f) (W + s·B·A): W itself at init
        if xd is None:
            y = F.linear(x2, wf, bias)
        else:
            y = F.linear(x2 - xd.reshape(-1, in_f), weight, bias).addmm_(xd.reshape(-1, in_f), wf.t())
    else:
        factor = (dora_factor(magnitude, norm) if factor is None else factor).to(x.dtype)
        # z = x Wᵀ + b as the base computes it; y = z + (f ⊙ u − (z − b)): exactly z while f = 1 and B = 0.
        y = F.linear(x2, weight, bias)  # (N, out)
        zb = y if bias is None else y - bias
        u = torch.addmm(zb, thin_cols_product(A, x2).t(), B.t(), alpha=scale)  # x Wᵀ + s · h Bᵀ
        y.add_(u.mul_(factor).sub_(zb))
    return y.view(*x.shape[:-1], out_f)
