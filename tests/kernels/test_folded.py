"""``kernels.folded`` against plain autograd of ``op(x, W + ΔW) + b`` on every dispatch branch.

``folded_forward`` picks a no-grad fold (nothing to differentiate), the autograd Function ``FoldedProduct``
(gradients wanted: it saves only ``x``, ``W`` and the factors and rebuilds ``W + ΔW`` in backward), or the same
expression from differentiable ops (autocast, ``torch.compile``, a padding mode or string padding the Function
cannot replay). ``separate_forward`` is PEFT's ``base(x) + op(x, ΔW)`` for an adapter in another dtype. ``ΔW`` here
is ``s · P Q`` reshaped to the kernel, a product of two factors, so the factor gradients go through a real graph.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_adapters.kernels import folded
from tests.kernels.helpers import assert_kernel_matches, leaf

# name -> (base builder, input shape, kind)
BASES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], str]] = {
    "linear": (lambda: nn.Linear(9, 7), (2, 5, 9), "linear"),
    "linear-nobias": (lambda: nn.Linear(9, 7, bias=False), (6, 9), "linear"),
    "conv1d-dilated": (lambda: nn.Conv1d(4, 6, 3, padding=2, dilation=2), (2, 4, 11), "conv1d"),
    "conv2d-strided-groups": (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2), (2, 4, 7, 7), "conv2d"),
    "conv2d-reflect": (lambda: nn.Conv2d(3, 5, 3, padding=1, padding_mode="reflect"), (1, 3, 6, 6), "conv2d"),
    "conv2d-same": (lambda: nn.Conv2d(3, 5, 3, padding="same", bias=False), (1, 3, 6, 6), "conv2d"),
}


def _conv1d_t(in_f: int, out_f: int) -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    return Conv1D(out_f, in_f)


def _base(name: str) -> tuple[nn.Module, tuple[int, ...], str]:
    if name == "conv1d_t":
        base, shape, kind = _conv1d_t(9, 7), (3, 9), "conv1d_t"
    else:
        make, shape, kind = BASES[name]
        base = make()
    torch.manual_seed(0)
    base = base.double()
    base._la_base_forward = base.forward  # what inject installs: the base class's own forward
    return base, shape, kind


def _factors(base: nn.Module, kind: str, grads: str) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    w = base.weight.t() if kind == "conv1d_t" else base.weight
    out_f, n = w.shape[0], math.prod(w.shape[1:])
    return leaf(out_f, 2, seed=4, grad=grads != "frozen-P"), leaf(2, n, seed=5), tuple(w.shape)


def _delta_fn(shape: tuple[int, ...], s: float = 0.7):
    return lambda p, q: (s * (p @ q)).reshape(shape)


def _reference(base: nn.Module, kind: str, x: torch.Tensor, dw: torch.Tensor) -> torch.Tensor:
    """``op(x, W + ΔW) + b`` with stock ops (the base's own conv call, so padding modes hold)."""
    if kind == "conv1d_t":
        return x @ (base.weight + dw.t()) + base.bias
    if kind == "linear":
        return F.linear(x, base.weight + dw, base.bias)
    return base._conv_forward(x, base.weight + dw, base.bias)


@pytest.mark.parametrize("name", [*BASES, "conv1d_t"])
@pytest.mark.parametrize("grads", ["x-and-factors", "factors-only", "frozen-P", "trainable-base", "none"])
def test_folded_forward_equals_the_formula_on_every_branch(name: str, grads: str) -> None:
    base, shape, kind = _base(name)
    p, q, dshape = _factors(base, kind, grads)
    base.requires_grad_(grads == "trainable-base")
    x = leaf(*shape, seed=3, grad=grads in ("x-and-factors", "trainable-base"))
    if grads == "none":
        p.requires_grad_(False)
        q.requires_grad_(False)
    spec = folded.fold_spec(base, kind, _delta_fn(dshape))
    replayable = folded._plain_product_ok(base, kind)
    assert replayable is not name.startswith(("conv2d-reflect", "conv2d-same"))
    needs_grad = folded.grad_needed(base, x, [p, q])
    assert needs_grad is (grads != "none")
    inputs = [x, p, q, *[t for t in (base.weight, base.bias) if t is not None]]
    assert_kernel_matches(
        lambda: folded.folded_forward(base, spec, x, [p, q]),
        lambda: _reference(base, kind, x, _delta_fn(dshape)(p, q)),
        inputs,
    )


@pytest.mark.parametrize("name", ["linear", "conv2d-strided-groups", "conv1d_t"])
def test_folded_product_function_directly(name: str) -> None:
    """The autograd Function itself (the dispatch picks it in eager mode with gradients), base trainable too."""
    base, shape, kind = _base(name)
    p, q, dshape = _factors(base, kind, "x-and-factors")
    x = leaf(*shape, seed=3)
    spec = folded.fold_spec(base, kind, _delta_fn(dshape))
    assert_kernel_matches(
        lambda: folded.FoldedProduct.apply(x, base.weight, base.bias, spec, p, q),
        lambda: _reference(base, kind, x, _delta_fn(dshape)(p, q)),
        [x, p, q, base.weight, base.bias],
    )


def test_folded_forward_under_autocast_takes_the_differentiable_form() -> None:
    base, shape, kind = _base("linear")
    base.float()
    p, q = leaf(7, 2, seed=4).float().detach().requires_grad_(), leaf(2, 9, seed=5).float().detach().requires_grad_()
    x = leaf(*shape, seed=3).float().detach().requires_grad_()
    spec = folded.fold_spec(base, kind, _delta_fn((7, 9)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = folded.folded_forward(base, spec, x, [p, q])
        ref = F.linear(x, base.weight + _delta_fn((7, 9))(p, q), base.bias)
    assert out.dtype == torch.bfloat16 and out.grad_fn is not None
    assert type(out.grad_fn).__name__ != "FoldedProductBackward"
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("name", ["linear", "conv1d_t", "conv2d-strided-groups", "conv2d-reflect"])
def test_separate_forward_is_base_plus_the_delta_product_in_the_adapter_dtype(name: str) -> None:
    """float32 base, float64 ΔW: the adapter product runs in float64 and the sum comes back in float32."""
    base, shape, kind = _base(name)
    base.float()
    p, q, dshape = _factors(base, kind, "x-and-factors")
    x = leaf(*shape, seed=3).float().detach().requires_grad_()

    def formula() -> torch.Tensor:
        dw = _delta_fn(dshape)(p, q)
        if kind in ("linear", "conv1d_t"):
            extra = F.linear(x.double(), dw)
        else:
            extra = base._conv_forward(x.double(), dw, None)
        return base(x) + extra.float()

    out = folded.separate_forward(base, kind, x, _delta_fn(dshape)(p, q))
    assert out.dtype == torch.float32
    assert_kernel_matches(lambda: out, formula, [x, p, q], rtol=1e-6, atol=1e-6)


def test_base_weight_out_in_reads_conv1d_t_transposed() -> None:
    w = torch.arange(6.0).reshape(2, 3)
    assert folded.base_weight_out_in(w, "conv1d_t").shape == (3, 2)
    assert folded.base_weight_out_in(w, "linear") is w


@pytest.mark.parametrize("adapter_dtype", [torch.float64, torch.float32], ids=["same-dtype", "other-dtype"])
@pytest.mark.parametrize("name", ["linear", "conv2d-strided-groups"])
def test_delta_forward_folds_in_one_dtype_and_separates_otherwise(name: str, adapter_dtype: torch.dtype) -> None:
    """float64 base: float64 factors fold (the Function is in the graph), float32 factors run PEFT's two products."""
    base, shape, kind = _base(name)
    base.requires_grad_(False)
    p, q, dshape = _factors(base, kind, "x-and-factors")
    p, q = (t.detach().to(adapter_dtype).requires_grad_() for t in (p, q))
    x = leaf(*shape, seed=3)
    out = folded.delta_forward(base, kind, x, [p, q], _delta_fn(dshape))
    assert (type(out.grad_fn).__name__ == "FoldedProductBackward") is (adapter_dtype == torch.float64)
    tol = 1e-10 if adapter_dtype == torch.float64 else 1e-5

    def formula() -> torch.Tensor:
        dw = _delta_fn(dshape)(p, q)
        if adapter_dtype == torch.float64:
            return _reference(base, kind, x, dw)
        extra = F.linear(x.float(), dw) if kind == "linear" else base._conv_forward(x.float(), dw, None)
        return base(x) + extra.double()

    assert_kernel_matches(lambda: out, formula, [x, p, q], rtol=tol, atol=tol)
