"""``kernels.lowrank`` against plain autograd of ``y = x Wᵀ + b + s · (x_d Aᵀ) Bᵀ``, on both sides of each dispatch.

The Function chooses per call: fold ``W + s·B·A`` into the forward product (``fold_pays``), multiply the backward
by ``[W + s·B·A | s·B]`` (``fold_pays_backward``), keep ``h = A x_d`` (only when B needs a gradient or the forward
does not fold), split the rank-r products over two row halves (``row_chunks``); with a separate dropout input
``x_d`` it never folds. Every case compares the output and the gradients of ``x``, ``x_d``, ``W``, ``b``, ``A``,
``B`` (those that require grad) with the formula written with stock ops.
"""

from __future__ import annotations

import pytest
import torch

from lightning_adapters.kernels import lowrank
from tests.kernels.helpers import F64, assert_kernel_matches, leaf


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _formula(x, xd, weight, bias, A, B, s):
    a_in = x if xd is None else xd
    y = x @ weight.T + s * (a_in @ A.T) @ B.T
    return y if bias is None else y + bias


# (in, out, rows, forward folds, backward folds): just below and above each edge, and both mixed cases.
SHAPES = [
    (12, 10, 10, False, False),
    (12, 10, 11, False, True),
    (12, 10, 18, False, True),
    (12, 10, 19, True, True),
    (4, 40, 6, False, False),
    (4, 40, 7, True, False),
    (4, 40, 10, True, False),
    (4, 40, 11, True, True),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}-rows{s[2]}-f{int(s[3])}b{int(s[4])}")
@pytest.mark.parametrize("grads", ["all", "x-frozen", "A-frozen", "B-frozen", "adapter-only"])
@pytest.mark.parametrize("layout", ["plain", "transposed-weight-no-bias"])
def test_lowrank_linear_on_both_sides_of_the_fold_thresholds(shape, grads: str, layout: str) -> None:
    in_f, out_f, rows, fold, fold_back = shape
    assert lowrank.fold_pays(rows, in_f, out_f) is fold
    assert lowrank.fold_pays_backward(rows, in_f, out_f) is fold_back
    x = leaf(rows, in_f, seed=1, grad=grads not in ("x-frozen", "adapter-only"))
    if rows % 2 == 0:
        x = x.view(2, rows // 2, in_f)  # a batch dimension on half the cases
    if layout == "plain":
        weight, bias = leaf(out_f, in_f, seed=2, grad=grads == "all"), leaf(out_f, seed=3, grad=grads == "all")
    else:  # transformers Conv1D stores (in, out): the kernel gets a transposed view
        weight, bias = leaf(in_f, out_f, seed=2, grad=grads == "all").t(), None
    A = leaf(3, in_f, seed=4, grad=grads != "A-frozen")
    B = leaf(out_f, 3, seed=5, grad=grads != "B-frozen")
    s = 5.0 / 3**0.5
    assert lowrank.fused_linear_applies(x, weight, A)
    inputs = [t for t in (x, weight, bias, A, B) if t is not None]
    assert_kernel_matches(
        lambda: lowrank.lowrank_linear(x, None, weight, bias, A, B, s),
        lambda: _formula(x, None, weight, bias, A, B, s),
        inputs,
    )


@pytest.mark.parametrize("rows", [10, 19, 64])
@pytest.mark.parametrize("grads", ["all", "x-frozen", "xd-frozen", "A-frozen", "B-frozen"])
def test_lowrank_linear_with_a_separate_adapter_input(rows: int, grads: str) -> None:
    """A dropped-out ``x_d`` (here any other tensor): no fold, ``∂x`` and ``∂x_d`` computed apart."""
    x = leaf(rows, 12, seed=1, grad=grads != "x-frozen")
    xd = leaf(rows, 12, seed=6, grad=grads != "xd-frozen")
    weight, bias = leaf(10, 12, seed=2, grad=False), leaf(10, seed=3, grad=False)
    A, B = leaf(3, 12, seed=4, grad=grads != "A-frozen"), leaf(10, 3, seed=5, grad=grads != "B-frozen")
    assert_kernel_matches(
        lambda: lowrank.lowrank_linear(x, xd, weight, bias, A, B, 1.7),
        lambda: _formula(x, xd, weight, bias, A, B, 1.7),
        [x, xd, A, B],
    )


def test_lowrank_linear_with_a_product_for_A() -> None:
    """AdaLoRA passes ``A ⊙ E``: the kernel's ``∂A'`` reaches both factors through autograd."""
    x = leaf(19, 12, seed=1)
    weight, bias = leaf(10, 12, seed=2, grad=False), leaf(10, seed=3, grad=False)
    A, E, B = leaf(3, 12, seed=4), leaf(3, 1, seed=7), leaf(10, 3, seed=5)
    assert_kernel_matches(
        lambda: lowrank.lowrank_linear(x, None, weight, bias, A * E, B, 0.4),
        lambda: _formula(x, None, weight, bias, A * E, B, 0.4),
        [x, A, E, B],
    )


def test_folded_forward_is_exactly_the_base_when_B_is_zero() -> None:
    x = leaf(64, 12, seed=1, grad=False)
    weight, bias = leaf(10, 12, seed=2, grad=False), leaf(10, seed=3, grad=False)
    A, B = leaf(3, 12, seed=4), torch.zeros(10, 3, dtype=F64, requires_grad=True)
    assert lowrank.fold_pays(64, 12, 10)
    assert torch.equal(lowrank.lowrank_linear(x, None, weight, bias, A, B, 2.0), x @ weight.T + bias)


def test_fused_linear_applies_only_to_one_dtype_without_autocast() -> None:
    x, w, a = torch.ones(2, 3), torch.ones(4, 3), torch.ones(1, 3)
    assert lowrank.fused_linear_applies(x, w, a)
    assert not lowrank.fused_linear_applies(x, w, a.double())
    assert not lowrank.fused_linear_applies(x.double(), w, a)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not lowrank.fused_linear_applies(x, w, a)


@pytest.mark.parametrize("rows, split", [(254, True), (255, False), (256, True), (257, False)])
@pytest.mark.parametrize("xd", [False, True], ids=["x", "xd"])
def test_lowrank_linear_on_both_sides_of_the_row_split(rows: int, split: bool, xd: bool, two_threads) -> None:
    """254 rows stay below 256 (no split); odd counts never split."""
    assert (lowrank.row_chunks(rows) == 2) is (split and rows >= 256)
    x = leaf(rows, 12, seed=1)
    xd_t = leaf(rows, 12, seed=6) if xd else None
    weight, bias = leaf(10, 12, seed=2, grad=False), leaf(10, seed=3, grad=False)
    A, B = leaf(3, 12, seed=4), leaf(10, 3, seed=5)
    assert_kernel_matches(
        lambda: lowrank.lowrank_linear(x, xd_t, weight, bias, A, B, 1.3),
        lambda: _formula(x, xd_t, weight, bias, A, B, 1.3),
        [t for t in (x, xd_t, A, B) if t is not None],
    )


@pytest.mark.parametrize("rows", [512, 301])
def test_thin_products_equal_plain_matmul(rows: int, two_threads) -> None:
    u = leaf(8, rows, seed=1, grad=False).t()  # (rows, 8), a transposed view
    v = leaf(rows, 40, seed=2, grad=False)
    m = leaf(8, 40, seed=3, grad=False)
    torch.testing.assert_close(lowrank.thin_rows_product(u, v), u.t() @ v, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lowrank.thin_cols_product(m, v), m @ v.t(), rtol=1e-12, atol=1e-12)
    assert lowrank.thin_cols_product(m, v).is_contiguous()


@pytest.mark.parametrize("in_f, r", [(12, 3), (13, 3), (384, 12), (384, 8)])
def test_fold_cat_is_the_folded_weight_beside_the_scaled_B_padded_to_an_aligned_width(in_f: int, r: int) -> None:
    w, A, B = leaf(10, in_f, seed=1, grad=False), leaf(r, in_f, seed=2, grad=False), leaf(10, r, seed=3, grad=False)
    cat = lowrank.fold_cat(w, A, B, 0.5)
    # The backward's product g @ cat is as wide as cat: a width off a multiple of 8 runs 30-45% slower in MKL.
    assert cat.shape[1] % 8 == 0 and in_f + r <= cat.shape[1] < in_f + r + 16
    torch.testing.assert_close(cat[:, : in_f + r], torch.cat([w + 0.5 * B @ A, 0.5 * B], dim=1))
    assert not cat[:, in_f + r :].any()


@pytest.mark.parametrize("r", [8, 12])
@pytest.mark.parametrize("x_grad", [True, False])
def test_lowrank_linear_at_reference_widths_with_an_unaligned_rank(r: int, x_grad: bool) -> None:
    """384 + 12 (AdaLoRA's init_r) is padded in the backward product; ∂x and ∂h come from the right columns."""
    in_f, out_f, rows = 384, 24, 600
    assert lowrank.fold_pays(rows, in_f, out_f) and lowrank.fold_pays_backward(rows, in_f, out_f)
    x = leaf(rows, in_f, seed=1, grad=x_grad)
    weight, bias = leaf(out_f, in_f, seed=2, grad=False), leaf(out_f, seed=3, grad=False)
    A, B = leaf(r, in_f, seed=4, grad=True), leaf(out_f, r, seed=5, grad=True)
    assert_kernel_matches(
        lambda: lowrank.lowrank_linear(x, None, weight, bias, A, B, 0.7),
        lambda: _formula(x, None, weight, bias, A, B, 0.7),
        [x, weight, bias, A, B],
    )


def test_fold_plan_follows_the_shape_on_cpu_and_runs_plain_products_elsewhere(two_threads) -> None:
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    for in_f, out_f, rows, fold, fold_back in SHAPES:
        assert lowrank.fold_plan(rows, in_f, out_f, cpu) == (fold, fold_back)
        assert lowrank.fold_plan(rows, in_f, out_f, gpu) == (False, False)
    assert lowrank.row_chunks(256, cpu) == 2 and lowrank.row_chunks(256) == 2
    assert lowrank.row_chunks(256, gpu) == 1  # the two-half split works around MKL; a GPU gets one product


def test_no_weight_sized_tensor_lives_from_forward_to_backward() -> None:
    # 11 rows, in 4, out 40: both directions fold, and every activation is smaller than the (40, 4) weight.
    in_f, out_f, rows = 4, 40, 11
    assert lowrank.fold_plan(rows, in_f, out_f, torch.device("cpu")) == (True, True)
    x, weight = leaf(rows, in_f, seed=1, grad=True), leaf(out_f, in_f, seed=2, grad=False)
    A, B = leaf(3, in_f, seed=4, grad=True), leaf(out_f, 3, seed=5, grad=True)
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = lowrank.lowrank_linear(x, None, weight, None, A, B, 0.5)
    big = [t.shape for t in saved if t is not weight and t.numel() >= out_f * in_f]
    assert not big, big  # the folded [W + s·B·A | s·B] is rebuilt in backward, not kept
    y.square().sum().backward()
    want = _formula(x.detach(), None, weight, None, A.detach(), B.detach(), 0.5)
    assert torch.allclose(y, want, atol=1e-12)
    for t in (x, A, B):
        assert t.grad is not None


@pytest.mark.parametrize("grads", ["x", "xd", "adapter-only", "x-with-xd"])
@pytest.mark.parametrize("rows", [10, 19], ids=["unfolded", "folded"])
def test_a_product_for_A_is_kept_only_for_the_adapter_input_gradient(grads: str, rows: int) -> None:
    """A temporary ``A`` (AdaLoRA's ``A ⊙ E``) is kept for backward only when the adapter input needs a gradient.

    Regression: it was always kept, one (r, in) tensor per layer whose input needs no gradient (a first layer
    behind frozen embeddings) that PEFT's products do not keep.
    """
    x = leaf(rows, 12, seed=1, grad=grads in ("x", "x-with-xd"))
    xd = leaf(rows, 12, seed=6, grad=grads == "xd") if grads in ("xd", "x-with-xd") else None
    weight, bias = leaf(10, 12, seed=2, grad=False), leaf(10, seed=3, grad=False)
    A, E, B = leaf(3, 12, seed=4), leaf(3, 1, seed=7), leaf(10, 3, seed=5)
    a_e = A * E
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = lowrank.lowrank_linear(x, xd, weight, bias, a_e, B, 0.4)
    kept = any(t is a_e or t.untyped_storage().data_ptr() == a_e.untyped_storage().data_ptr() for t in saved)
    assert kept is (grads in ("x", "xd"))
    inputs = [t for t in (x, xd, A, E, B) if t is not None]
    assert_kernel_matches(lambda: y, lambda: _formula(x, xd, weight, bias, A * E, B, 0.4), inputs)


def test_compiled_models_trace_the_plain_products_instead_of_the_function() -> None:
    x, w, A = torch.ones(3, 4), torch.ones(5, 4), torch.ones(2, 4)

    def which(t: torch.Tensor) -> torch.Tensor:
        return t + 1 if lowrank.fused_linear_applies(x, w, A) else t - 1

    assert torch.equal(which(x), x + 1)  # eager: the fused Function
    assert torch.equal(torch.compile(which, backend="eager", fullgraph=True)(x), x - 1)  # traced: plain products
