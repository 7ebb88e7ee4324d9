"""``kernels.rotation`` against dense plain-autograd formulas: Cayley map, block-chain rotations, rotated linear.

Dispatches covered on both sides: ``UnitSkewInverse`` (Gauss-Jordan for blocks up to ``GAUSS_JORDAN_MAX_BLOCK``,
LAPACK above); ``rotated_linear`` (rotate the tokens when there are fewer tokens than outputs or the base is
trainable, else ``RotatedLinear`` rotating ``W``); ``RotatedLinear``'s backward (token-major for one natural
layout with blocks of at least ``TOKEN_MAJOR_MIN_BLOCK`` features, feature-major otherwise, which is also the
path of multi-factor chains with permuted layouts), and so is ``BlockRotation``'s forward and backward. The
reference builds each factor as a dense permuted block-diagonal matrix.
"""

from __future__ import annotations

import pytest
import torch

from lightning_adapters.kernels import rotation
from tests.kernels.helpers import F64, assert_kernel_matches, leaf


def _dense(axis: tuple[int, ...], layout: tuple[tuple[int, ...], int], blocks: torch.Tensor) -> torch.Tensor:
    """(d, d) matrix ``M`` with ``x · M`` = the rows ``x`` through ``blocks`` acting on the layout's feature groups."""
    order, _ = layout
    d = blocks.shape[0] * blocks.shape[1]
    perm = torch.arange(d).reshape(axis).permute(order).reshape(-1)  # storage position -> feature
    p = torch.zeros(d, d, dtype=blocks.dtype)
    p[perm, torch.arange(d)] = 1.0  # x @ p = x in storage order
    return p @ torch.block_diag(*blocks.unbind(0)) @ p.T


def _chain(axis, steps) -> torch.Tensor:
    out = torch.eye(steps[0][1].shape[0] * steps[0][1].shape[1], dtype=F64)
    for layout, blocks in steps:
        out = out @ _dense(axis, layout, blocks)
    return out


NATURAL = rotation.block_layout([0], [1])
# axis (2, 2, 2, 3): three factors of 6-feature blocks in different layouts (a butterfly-like chain)
CHAIN_AXIS = (2, 2, 2, 3)
CHAIN_LAYOUTS = [
    rotation.block_layout([0, 1], [2, 3]),
    rotation.block_layout([0, 2], [1, 3]),
    rotation.block_layout([1, 2], [0, 3]),
]


def _skew(n: int, b: int, seed: int) -> torch.Tensor:
    u = torch.triu(torch.randn(n, b, b, dtype=F64, generator=torch.Generator().manual_seed(seed)), 1) * 0.3
    return (u - u.transpose(1, 2)).requires_grad_(True)


@pytest.mark.parametrize("b", [rotation.GAUSS_JORDAN_MAX_BLOCK, rotation.GAUSS_JORDAN_MAX_BLOCK + 1, 2])
def test_cayley_equals_the_dense_formula_with_its_gradient(b: int) -> None:
    q = _skew(5, b, seed=b)
    eye = torch.eye(b, dtype=F64)
    assert_kernel_matches(lambda: rotation.cayley(q), lambda: (eye - q) @ torch.linalg.inv(eye + q), [q])
    assert_kernel_matches(
        lambda: rotation.unit_skew_inverse(eye + q), lambda: torch.linalg.inv(eye + q), [q], rtol=1e-9, atol=1e-9
    )


@pytest.mark.parametrize("b", [4, rotation.TOKEN_MAJOR_MIN_BLOCK - 1, rotation.TOKEN_MAJOR_MIN_BLOCK])
def test_rotate_features_natural_layout(b: int) -> None:
    """Feature-major below ``TOKEN_MAJOR_MIN_BLOCK``, token-major from it: the formula either way, and token-major
    returns the rotated rows and ``∂x`` as contiguous rows (what the base GEMM and autograd's sums read)."""
    x = leaf(2, 5, 3 * b, seed=1)
    blocks = leaf(3, b, b, seed=2)
    out = rotation.rotate_features(x, [(NATURAL, blocks)], (3, b))
    if b >= rotation.TOKEN_MAJOR_MIN_BLOCK:
        (gx,) = torch.autograd.grad(out, x, torch.ones_like(out), retain_graph=True)
        assert out.is_contiguous() and gx.is_contiguous()
    assert_kernel_matches(lambda: out, lambda: x @ torch.block_diag(*blocks.unbind(0)), [x, blocks])


@pytest.mark.parametrize("x_grad", [True, False])
def test_rotate_features_through_a_chain_of_permuted_layouts(x_grad: bool) -> None:
    x = leaf(7, 24, seed=1, grad=x_grad)
    blocks = [leaf(4, 6, 6, seed=2 + i, grad=i != 1) for i in range(3)]  # the middle factor frozen
    steps = list(zip(CHAIN_LAYOUTS, blocks))
    assert_kernel_matches(
        lambda: rotation.rotate_features(x, steps, CHAIN_AXIS),
        lambda: x @ _chain(CHAIN_AXIS, steps),
        [x, *blocks],
    )


# (name, blocks n, block size b, tokens, outputs, trainable base): which side of each dispatch
LINEAR_CASES = [
    ("tokens-rotated", 2, 8, 19, 20, False),  # 19 tokens < 20 outputs: feature-major rotation of the tokens
    ("tokens-rotated-b16", 2, 16, 19, 20, False),  # token-major rotation of the tokens
    ("weight-rotated-b8", 2, 8, 20, 20, False),  # RotatedLinear, feature-major backward
    ("weight-rotated-b15", 2, 15, 21, 20, False),  # just below TOKEN_MAJOR_MIN_BLOCK
    ("weight-rotated-b16", 2, 16, 20, 20, False),  # token-major backward
    ("trainable-base", 2, 16, 40, 20, True),  # many tokens, but a trainable base rotates the tokens
]


@pytest.mark.parametrize("case", LINEAR_CASES, ids=lambda c: c[0])
@pytest.mark.parametrize("x_grad", [True, False], ids=["xgrad", "xconst"])
def test_rotated_linear_on_both_sides_of_its_dispatch(case, x_grad: bool) -> None:
    _, n, b, tokens, out_f, train_base = case
    assert (b >= rotation.TOKEN_MAJOR_MIN_BLOCK) is (b >= 16)
    x = leaf(tokens, n * b, seed=1, grad=x_grad)
    if tokens % 2 == 0:
        x = x.view(2, tokens // 2, n * b)
    w, bias = leaf(out_f, n * b, seed=2, grad=train_base), leaf(out_f, seed=3, grad=train_base)
    blocks = leaf(n, b, b, seed=4, scale=0.3)
    assert_kernel_matches(
        lambda: rotation.rotated_linear(x, w, bias, [(NATURAL, blocks)], (n, b)),
        lambda: x @ torch.block_diag(*blocks.unbind(0)) @ w.T + bias,
        [x, w, bias, blocks],
    )


@pytest.mark.parametrize("tokens", [5, 30], ids=["tokens-rotated", "weight-rotated"])
def test_rotated_linear_through_a_chain_of_permuted_layouts(tokens: int) -> None:
    x = leaf(tokens, 24, seed=1)
    w = leaf(9, 24, seed=2, grad=False)
    blocks = [leaf(4, 6, 6, seed=3 + i, scale=0.3) for i in range(3)]
    steps = list(zip(CHAIN_LAYOUTS, blocks))
    assert_kernel_matches(
        lambda: rotation.rotated_linear(x, w, None, steps, CHAIN_AXIS),
        lambda: x @ _chain(CHAIN_AXIS, steps) @ w.T,
        [x, *blocks],
    )


def test_rotated_linear_function_keeps_base_dtype_and_adapter_dtype_apart() -> None:
    """float32 input and weight, float64 blocks: the output is float32 and equals the float64 formula."""
    x = leaf(30, 16, seed=1).float().detach().requires_grad_()
    w = leaf(9, 16, seed=2, grad=False).float()
    blocks = leaf(2, 8, 8, seed=3, scale=0.3)
    out = rotation.rotated_linear(x, w, None, [(NATURAL, blocks)], (2, 8))
    assert out.dtype == torch.float32
    ref = (x.double() @ torch.block_diag(*blocks.unbind(0)) @ w.double().T).float()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
