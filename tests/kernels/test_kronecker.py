"""``kernels.kronecker`` against plain autograd of ``y = x Wᵀ + b + (x (w1 ⊗ w2)ᵀ) ⊙ mask`` with ``torch.kron``.

``kron_linear`` picks the autograd Function ``KronLinear`` (one dtype, gradients wanted), a no-grad in-place
forward (one dtype, no gradients), or the differentiable form (autocast, another adapter dtype); ``kron_pays``
decides against folding. Every case checks outputs and the gradients of ``x``, ``W``, ``b``, ``w1``, ``a2`` and
``b2`` (those that require grad), with full and low-rank ``w2``, with and without a rank-dropout mask.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_adapters.kernels import kronecker
from tests.kernels.helpers import assert_kernel_matches, leaf

A_, B_, C_, D_, R_ = 2, 3, 4, 5, 2  # out = a·b = 6, in = c·d = 20


def _base(kind: str, grad: bool) -> nn.Module:
    if kind == "conv1d_t":
        from transformers.pytorch_utils import Conv1D

        base = Conv1D(A_ * B_, C_ * D_)
    else:
        base = nn.Linear(C_ * D_, A_ * B_)
    torch.manual_seed(0)
    base = base.double().requires_grad_(grad)
    base._la_base_forward = base.forward
    return base


def _formula(base, kind, x, w1, a2, b2, mask):
    w = base.weight.t() if kind == "conv1d_t" else base.weight
    w2 = a2 if b2 is None else a2 @ b2
    y = x @ torch.kron(w1, w2).T
    if mask is not None:
        y = y * mask
    return x @ w.T + base.bias + y


@pytest.mark.parametrize("kind", ["linear", "conv1d_t"])
@pytest.mark.parametrize("w2", ["low-rank", "full"])
@pytest.mark.parametrize("mask", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("grads", ["all", "x-and-factors", "factors-only", "a2-frozen", "none"])
def test_kron_linear_fused_paths(kind: str, w2: str, mask: bool, grads: str) -> None:
    base = _base(kind, grads == "all")
    factors_grad = grads != "none"
    x = leaf(2, 3, C_ * D_, seed=1, grad=grads in ("all", "x-and-factors"))
    w1 = leaf(A_, C_, seed=2, grad=factors_grad)
    a2 = leaf(B_, D_ if w2 == "full" else R_, seed=3, grad=factors_grad and grads != "a2-frozen")
    b2 = None if w2 == "full" else leaf(R_, D_, seed=4, grad=factors_grad)
    m = (torch.arange(A_ * B_) % 3 != 0).double() * 1.5 if mask else None
    needs_grad = grads != "none"
    inputs = [t for t in (x, base.weight, base.bias, w1, a2, b2) if t is not None]
    assert_kernel_matches(
        lambda: kronecker.kron_linear(base, kind, x, w1, a2, b2, m, fused=True, needs_grad=needs_grad),
        lambda: _formula(base, kind, x, w1, a2, b2, m),
        inputs,
    )


@pytest.mark.parametrize("mask", [False, True], ids=["nomask", "mask"])
def test_kron_linear_differentiable_form_for_another_adapter_dtype(mask: bool) -> None:
    """float32 base, float64 factors (``fused=False``): the update runs in float64, the sum comes back in float32."""
    base = _base("linear", False).float()
    x = leaf(4, C_ * D_, seed=1).float().detach().requires_grad_()
    w1, a2, b2 = leaf(A_, C_, seed=2), leaf(B_, R_, seed=3), leaf(R_, D_, seed=4)
    m = (torch.arange(A_ * B_) % 2 == 0).double() * 2.0 if mask else None
    out = kronecker.kron_linear(base, "linear", x, w1, a2, b2, m, fused=False, needs_grad=True)
    assert out.dtype == torch.float32

    def formula() -> torch.Tensor:
        y = x.double() @ torch.kron(w1, a2 @ b2).T
        return base(x) + (y if m is None else y * m).float()

    assert_kernel_matches(lambda: out, formula, [x, w1, a2, b2], rtol=1e-6, atol=1e-6)


def test_kron_linear_under_autocast_takes_the_differentiable_form() -> None:
    """One dtype and gradients wanted, but autocast on: not the Function (it would ignore autocast)."""
    base = _base("linear", False).float()
    x = leaf(4, C_ * D_, seed=1).float().detach().requires_grad_()
    w1, a2, b2 = (
        leaf(*s, seed=i).float().detach().requires_grad_() for i, s in enumerate([(A_, C_), (B_, R_), (R_, D_)])
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = kronecker.kron_linear(base, "linear", x, w1, a2, b2, None, fused=True, needs_grad=True)
    assert out.grad_fn is not None and type(out.grad_fn).__name__ != "KronLinearBackward"
    ref = _formula(base, "linear", x, w1, a2, b2, None)
    torch.testing.assert_close(out.float(), ref, rtol=3e-2, atol=3e-2)


def test_kron_apply_is_the_kronecker_product() -> None:
    x2 = leaf(7, C_ * D_, seed=1, grad=False)
    w1, a2, b2 = leaf(A_, C_, seed=2), leaf(B_, R_, seed=3), leaf(R_, D_, seed=4)
    y = kronecker.kron_apply(x2, w1, a2, b2).reshape(7, A_ * B_)
    torch.testing.assert_close(y, x2 @ torch.kron(w1, a2 @ b2).T)
    assert kronecker.kron_flops(A_, B_, C_, D_, R_) == R_ * (A_ * C_ + A_ * B_) + R_ * C_ * D_
    assert kronecker.kron_flops(A_, B_, C_, D_, None) == D_ * (A_ * C_ + A_ * B_)


@pytest.mark.parametrize("needs_grad", [True, False])
def test_kron_pays_on_both_sides_of_its_threshold(needs_grad: bool) -> None:
    """Grad: ``4k < in·out``; no grad: ``tokens·k <= 8·in·out`` (k = multiply-adds per token)."""
    a, b, c, d, r = 4, 8, 4, 8, 2  # in = out = 32, k = 2·(16 + 32) + 2·32 = 160
    k, full = kronecker.kron_flops(a, b, c, d, r), 32 * 32
    assert k == 160
    if needs_grad:
        assert kronecker.kron_pays(a, b, c, d, r, 1, True) is (4 * k < full)
        assert not kronecker.kron_pays(2, 2, 2, 2, None, 1, True)  # tiny layer: fold
    else:
        edge = 8 * full // k  # 51 tokens: 51·160 = 8160 <= 8192
        assert kronecker.kron_pays(a, b, c, d, r, edge, False)
        assert not kronecker.kron_pays(a, b, c, d, r, edge + 1, False)


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("tokens, split", [(128, True), (63, False)])
@pytest.mark.parametrize("x_grad", [True, False])
@pytest.mark.parametrize("w2", ["low-rank", "full"])
def test_kron_linear_on_both_sides_of_the_row_split(
    tokens: int, split: bool, x_grad: bool, w2: str, two_threads
) -> None:
    """With two threads the rank-m products run over two token halves kept apart (``kronecker.kron_splits``)."""
    assert kronecker.kron_splits(tokens, A_, C_) == (2 if split else 1)
    base = _base("linear", False)
    x = leaf(tokens, C_ * D_, seed=1, grad=x_grad)
    w1 = leaf(A_, C_, seed=2)
    a2 = leaf(B_, D_ if w2 == "full" else R_, seed=3)
    b2 = None if w2 == "full" else leaf(R_, D_, seed=4)
    inputs = [t for t in (x, w1, a2, b2) if t is not None]
    assert_kernel_matches(
        lambda: kronecker.kron_linear(base, "linear", x, w1, a2, b2, None, fused=True, needs_grad=True),
        lambda: _formula(base, "linear", x, w1, a2, b2, None),
        inputs,
    )
