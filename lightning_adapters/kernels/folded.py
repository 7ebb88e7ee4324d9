"""Folded-weight products: an additive weight-space adapter (LoHa, LoKr) run as ONE product with ``W + ΔW``.

PEFT applies an additive adapter as ``base(x) + op(x, ΔW)``: two full-size products forward and three backward
(two input gradients and the ``ΔW`` gradient). With the update folded in, ``op(x, W + ΔW)`` needs one product
forward and two backward (the input gradient and ``G = ∂L/∂(W + ΔW)``), and ``ΔW``'s factors get their gradient
from ``G`` through the small graph that builds ``ΔW``. The result is the same function with the same gradients.

Memory: the autograd Function below saves only ``x``, the base weight (already alive) and the small factors;
``W + ΔW`` is rebuilt in backward, as activation checkpointing would, which costs ``O(out·in·r)`` next to the
``O(N·out·in)`` products. PEFT keeps a full-size ``ΔW`` per layer for backward.

``delta_forward`` is the one call a method makes: ``folded_forward`` when everything shares a dtype, which picks a
no-grad fold without gradients, the autograd Function ``FoldedProduct`` with
them, and the same expression from differentiable ops under ``torch.compile``, autocast or a padding the Function
cannot replay; else ``separate_forward``, PEFT's two-product reference form, for adapters in another dtype.

``delta_fn(*tensors)`` returns ``ΔW`` as ``(out, in[/groups], *kernel)``, the output-first layout; for
transformers ``Conv1D`` (weight ``(in, out)``) the base weight is read transposed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class FoldSpec:
    """How to run the base product of one layer.

    Attributes:
        kind: ``"linear"``, ``"conv1d_t"``, ``"conv1d"`` or ``"conv2d"`` (see ``methods._common.layer_kind``).
        delta_fn: ``(*tensors) -> ΔW`` in the output-first layout.
        stride, padding, dilation, groups: The base convolution's settings (unused for linear kinds).
    """

    kind: str
    delta_fn: Callable[..., torch.Tensor]
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1


def base_weight_out_in(weight: torch.Tensor, kind: str) -> torch.Tensor:
    """The base weight in the output-first layout (a transposed view for Conv1D)."""
    return weight.t() if kind == "conv1d_t" else weight


def _product(spec: FoldSpec, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if spec.kind in ("linear", "conv1d_t"):
        return F.linear(x, w, bias)
    conv = F.conv1d if spec.kind == "conv1d" else F.conv2d
    return conv(x, w, bias, spec.stride, spec.padding, spec.dilation, spec.groups)


class FoldedProduct(torch.autograd.Function):
    """``op(x, W + ΔW(tensors)) + b`` saving only ``x``, ``W`` and the factor tensors."""

    @staticmethod
    def forward(ctx, x, weight, bias, spec, *tensors):
        with torch.no_grad():
            w = base_weight_out_in(weight, spec.kind) + spec.delta_fn(*tensors)
            y = _product(spec, x, w, bias)
        ctx.spec = spec
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight, *tensors)
        return y

    @staticmethod
    def backward(ctx, gy):
        x, weight, *tensors = ctx.saved_tensors
        spec: FoldSpec = ctx.spec
        need_x, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        need_t = ctx.needs_input_grad[4:]
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(bool(n)) for t, n in zip(tensors, need_t)]
            delta = spec.delta_fn(*leaves)
        w = base_weight_out_in(weight, spec.kind) + delta.detach()  # (out, in[/g], *k), rebuilt
        want_gw = need_w or any(need_t)
        gx = gw = gb = None
        if spec.kind in ("linear", "conv1d_t"):
            gy2 = gy.reshape(-1, gy.shape[-1])  # (N, out)
            if need_x:
                gx = (gy2 @ w).view(*gy.shape[:-1], w.shape[1])  # (N, out) @ (out, in) -> (..., in)
            if want_gw:
                gw = gy2.t() @ x.reshape(-1, x.shape[-1])  # (out, N) @ (N, in) -> (out, in)
            if need_b:
                gb = gy2.sum(0)
        else:
            nd = w.dim() - 2
            gx, gw, gb = torch.ops.aten.convolution_backward(
                gy,
                x,
                w,
                [w.shape[0]] if ctx.has_bias else None,
                list(spec.stride),
                list(spec.padding),
                list(spec.dilation),
                False,
                [0] * nd,
                spec.groups,
                [need_x, want_gw, need_b],
            )
        grads_t: list[torch.Tensor | None] = [None] * len(tensors)
        wanted = [i for i, n in enumerate(need_t) if n]
        if wanted:
            got = torch.autograd.grad(delta, [leaves[i] for i in wanted], gw)
            for i, g in zip(wanted, got):
                grads_t[i] = g
        gw_base = None
        if need_w:
            gw_base = gw.t() if spec.kind == "conv1d_t" else gw
        return (gx, gw_base, gb, None, *grads_t)


def grad_needed(base: nn.Module, x: torch.Tensor, tensors: Sequence[torch.Tensor]) -> bool:
    """Whether this forward will be differentiated (grad mode on and some input requires grad)."""
    return torch.is_grad_enabled() and (
        x.requires_grad or base.weight.requires_grad or any(t.requires_grad for t in tensors)
    )


def _plain_product_ok(base: nn.Module, kind: str) -> bool:
    """Whether ``base``'s product can be replayed by ``_product`` (zeros padding, numeric padding)."""
    if kind in ("linear", "conv1d_t"):
        return True
    return base.padding_mode == "zeros" and not isinstance(base.padding, str)


def folded_forward(base: nn.Module, spec: FoldSpec, x: torch.Tensor, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``op(x, W + ΔW) + b`` for a Linear, Conv1D, Conv1d or Conv2d ``base`` (same dtype everywhere).

    Uses the memory-saving autograd Function when gradients are needed in eager mode; under ``torch.compile``,
    autocast or an unusual padding it builds the same expression from differentiable ops, which the compiler
    (or autograd) handles itself.
    """
    weight, bias = base.weight, base.bias
    needs_grad = grad_needed(base, x, tensors)
    fast_ok = _plain_product_ok(base, spec.kind)
    if not needs_grad and fast_ok:
        with torch.no_grad():
            w = base_weight_out_in(weight, spec.kind) + spec.delta_fn(*tensors)
            return _product(spec, x, w, bias)
    special = torch.compiler.is_compiling() or torch.is_autocast_enabled(x.device.type) or not fast_ok
    if special:
        w = base_weight_out_in(weight, spec.kind) + spec.delta_fn(*tensors)
        if spec.kind in ("linear", "conv1d_t"):
            return F.linear(x, w, bias)
        return base._conv_forward(x, w, bias)
    return FoldedProduct.apply(x, weight, bias, spec, *tensors)


def fold_spec(base: nn.Module, kind: str, delta_fn: Callable[..., torch.Tensor]) -> FoldSpec:
    """The ``FoldSpec`` of ``base`` with ``delta_fn``."""
    if kind in ("linear", "conv1d_t"):
        return FoldSpec(kind, delta_fn)
    return FoldSpec(
        kind,
        delta_fn,
        tuple(base.stride),
        tuple(base.padding) if not isinstance(base.padding, str) else (),
        tuple(base.dilation),
        base.groups,
    )


def separate_forward(base: nn.Module, kind: str, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """PEFT's two-product form ``base(x) + op(x, ΔW)``, for adapters in another dtype than the base.

    ``x`` is cast to ``ΔW``'s dtype for the adapter product and the sum is returned in the base output's dtype.
    """
    out = base._la_base_forward(x)
    return (out + delta_term(base, kind, x, delta)).to(out.dtype)  # summed in the wider dtype, rounded once


def delta_term(base: nn.Module, kind: str, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``op(x, ΔW)`` alone, in ``ΔW``'s dtype (``ΔW`` output-first): the term an additive adapter adds to
    ``base(x)``, for several adapters acting on one module."""
    xd = x if x.dtype == delta.dtype else x.to(delta.dtype)
    if kind in ("linear", "conv1d_t"):
        return F.linear(xd, delta)  # (..., in) @ (in, out) -> (..., out)
    return base._conv_forward(xd, delta, None)  # the base's stride/padding/dilation/groups


def delta_forward(
    base: nn.Module, kind: str, x: torch.Tensor, tensors: Sequence[torch.Tensor], delta_fn: Callable[..., torch.Tensor]
) -> torch.Tensor:
    """``op(x, W + ΔW) + b`` with ``ΔW = delta_fn(*tensors)``: the dispatch of an additive weight-space adapter.

    Folded (``folded_forward``) when ``x``, the base weight and ``tensors[0]`` share one dtype; otherwise PEFT's
    ``base(x) + op(x, ΔW)`` (``separate_forward``) with the adapter product in the adapter's dtype.
    """
    dt = tensors[0].dtype
    if x.dtype == dt and base.weight.dtype == dt:
        return folded_forward(base, fold_spec(base, kind, delta_fn), x, tensors)
    return separate_forward(base, kind, x, delta_fn(*tensors))
