"""``kernels.dora`` against plain autograd of PEFT's DoRA form, on both sides of each dispatch.

The formula, written with stock ops as PEFT 0.21 computes it (``peft/tuners/lora/dora.py``)::

    n = ‖W + s·B·A‖_row (detached),  f = m / n
    y = x Wᵀ + b + (f − 1) ⊙ (x_d Wᵀ) + f ⊙ s·(x_d Aᵀ) Bᵀ        (x_d = x without dropout)

The Function chooses per call: compute the norm from the folded weight (training) or take a given one (the
eval-mode cache), and then fold the forward only where ``fold_pays``; multiply the backward by a rebuilt
``diag(f)[W + s·B·A | s·B]`` when an input needs a gradient and ``fold_pays_backward`` (both through ``fold_plan``
on the CPU), else scale the upstream gradient; keep ``u`` only when ``m`` needs a gradient and ``h`` only when
``B`` does; split the rank-r products over two row halves (``row_chunks``). Without autograd it runs
``dora_linear_no_grad`` (the factor folded into the weight, or applied in place). Every case compares the output
and the gradients of ``x``, ``x_d``, ``b``, ``A``, ``B``, ``m`` (those that require grad) in float64.
"""

from __future__ import annotations

import pytest
import torch

from lightning_adapters.kernels import dora, lowrank
from tests.kernels.helpers import assert_kernel_matches, leaf


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _formula(x, xd, weight, bias, A, B, m, s):
    n = (weight + s * B @ A).detach().norm(dim=1)
    f = m / n
    a_in = x if xd is None else xd
    y = x @ weight.T + (f - 1) * (a_in @ weight.T) + f * (s * (a_in @ A.T) @ B.T)
    return y if bias is None else y + bias


def _norm(weight, A, B, s):
    return (weight + s * B @ A).norm(dim=1).detach()


# (in, out, rows, forward folds, backward folds): just below and above each edge, and both mixed cases.
SHAPES = [
    (12, 10, 10, False, False),
    (12, 10, 11, False, True),
    (12, 10, 19, True, True),
    (4, 40, 6, False, False),
    (4, 40, 7, True, False),
    (4, 40, 11, True, True),
]
GRADS = ["all", "x-frozen", "A-frozen", "B-frozen", "m-frozen", "adapter-only"]


def _inputs(shape, grads: str, layout: str, dropout: bool):
    in_f, out_f, rows, _, _ = shape
    x = leaf(rows, in_f, seed=1, grad=grads not in ("x-frozen", "adapter-only"))
    if rows % 2 == 0:
        x = x.view(2, rows // 2, in_f)  # a batch dimension on half the cases
    xd = leaf(*x.shape, seed=6, grad=x.requires_grad) if dropout else None
    if layout == "plain":
        weight, bias = leaf(out_f, in_f, seed=2, grad=False), leaf(out_f, seed=3, grad=grads != "adapter-only")
    else:  # transformers Conv1D stores (in, out): the kernel gets a transposed view
        weight, bias = leaf(in_f, out_f, seed=2, grad=False).t(), None
    A = leaf(3, in_f, seed=4, grad=grads != "A-frozen")
    B = leaf(out_f, 3, seed=5, grad=grads != "B-frozen")
    m = (_norm(weight, A, B, 1.3) * (1 + 0.3 * leaf(out_f, seed=7, grad=False))).requires_grad_(grads != "m-frozen")
    return x, xd, weight, bias, A, B, m


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}-rows{s[2]}-f{int(s[3])}b{int(s[4])}")
@pytest.mark.parametrize("grads", GRADS)
@pytest.mark.parametrize("layout", ["plain", "transposed-weight-no-bias"])
@pytest.mark.parametrize("cached", [False, True], ids=["norm-computed", "norm-given"])
def test_dora_linear_on_both_sides_of_the_fold_thresholds(shape, grads: str, layout: str, cached: bool) -> None:
    in_f, out_f, rows, fold, fold_back = shape
    assert lowrank.fold_pays(rows, in_f, out_f) is fold
    assert lowrank.fold_pays_backward(rows, in_f, out_f) is fold_back
    x, _, weight, bias, A, B, m = _inputs(shape, grads, layout, dropout=False)
    assert dora.dora_fused_applies(x, weight, A, m)
    norm = _norm(weight, A, B, 1.3) if cached else None
    inputs = [t for t in (x, bias, A, B, m) if t is not None]
    assert_kernel_matches(
        lambda: dora.dora_linear(x, None, weight, bias, A, B, m, 1.3, norm),
        lambda: _formula(x, None, weight, bias, A, B, m, 1.3),
        inputs,
    )


@pytest.mark.parametrize("shape", SHAPES[1:3] + SHAPES[4:], ids=lambda s: f"{s[0]}x{s[1]}-rows{s[2]}-b{int(s[4])}")
@pytest.mark.parametrize("grads", ["all", "x-frozen", "A-frozen", "B-frozen", "m-frozen"])
@pytest.mark.parametrize("cached", [False, True], ids=["norm-computed", "norm-given"])
def test_dora_linear_with_a_separate_adapter_input(shape, grads: str, cached: bool) -> None:
    """A dropped-out ``x_d`` (here any other tensor): the base reads ``x``, the adapter ``x_d``."""
    x, xd, weight, bias, A, B, m = _inputs(shape, grads, "plain", dropout=True)
    norm = _norm(weight, A, B, 1.3) if cached else None
    assert_kernel_matches(
        lambda: dora.dora_linear(x, xd, weight, bias, A, B, m, 1.3, norm),
        lambda: _formula(x, xd, weight, bias, A, B, m, 1.3),
        [t for t in (x, xd, bias, A, B, m) if t.requires_grad],
    )


@pytest.mark.parametrize("xd_grad", [True, False], ids=["xd-grad", "xd-frozen"])
def test_dora_linear_with_only_one_of_x_and_xd_needing_a_gradient(xd_grad: bool) -> None:
    x, xd, weight, bias, A, B, m = _inputs(SHAPES[2], "all", "plain", dropout=True)
    x.requires_grad_(not xd_grad)
    xd.requires_grad_(xd_grad)
    assert_kernel_matches(
        lambda: dora.dora_linear(x, xd, weight, bias, A, B, m, 1.3),
        lambda: _formula(x, xd, weight, bias, A, B, m, 1.3),
        [x, xd, bias, A, B, m],
    )


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}-rows{s[2]}-f{int(s[3])}")
@pytest.mark.parametrize("cached", [False, True], ids=["norm-computed", "norm-given"])
@pytest.mark.parametrize("dropout", [False, True], ids=["x", "xd"])
def test_dora_linear_without_autograd(shape, cached: bool, dropout: bool) -> None:
    """``no_grad`` (and inputs that need no gradient) take ``dora_linear_no_grad``: the same output."""
    x, xd, weight, bias, A, B, m = _inputs(shape, "all", "plain", dropout)
    norm = _norm(weight, A, B, 1.3) if cached else None
    expected = _formula(x, xd, weight, bias, A, B, m, 1.3).detach()
    with torch.no_grad():
        got = dora.dora_linear(x, xd, weight, bias, A, B, m, 1.3, norm)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    frozen = [t.detach() if t is not None else None for t in (x, xd, bias, A, B, m)]
    got = dora.dora_linear(frozen[0], frozen[1], weight, frozen[2], frozen[3], frozen[4], frozen[5], 1.3, norm)
    assert got.grad_fn is None
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("rows, split", [(254, False), (256, True), (257, False)])
@pytest.mark.parametrize("xd", [False, True], ids=["x", "xd"])
def test_dora_linear_on_both_sides_of_the_row_split(rows: int, split: bool, xd: bool, two_threads) -> None:
    assert (lowrank.row_chunks(rows) == 2) is split
    x = leaf(rows, 12, seed=1)
    xd_t = leaf(rows, 12, seed=6) if xd else None
    weight, bias = leaf(10, 12, seed=2, grad=False), leaf(10, seed=3)
    A, B, m = leaf(3, 12, seed=4), leaf(10, 3, seed=5), leaf(10, seed=7)
    assert_kernel_matches(
        lambda: dora.dora_linear(x, xd_t, weight, bias, A, B, m, 1.3),
        lambda: _formula(x, xd_t, weight, bias, A, B, m, 1.3),
        [t for t in (x, xd_t, bias, A, B, m) if t is not None],
    )


@pytest.mark.parametrize("rows", [10, 19], ids=["unfolded", "folded"])
@pytest.mark.parametrize("cached", [False, True], ids=["norm-computed", "norm-given"])
def test_zero_rows_have_factor_and_magnitude_gradient_zero(rows: int, cached: bool) -> None:
    """A row of ``W + s·B·A`` that is exactly zero has no direction: factor 0, ``∂m = 0`` (PEFT: NaN)."""
    x = leaf(rows, 12, seed=1)
    weight = leaf(10, 12, seed=2, grad=False).detach().clone()
    B = leaf(10, 3, seed=5).detach().clone()
    weight[4], B[4] = 0, 0
    B.requires_grad_(True)
    A, m, bias = leaf(3, 12, seed=4), leaf(10, seed=7), leaf(10, seed=3)
    norm = _norm(weight, A, B, 1.3)
    assert norm[4] == 0

    def formula():
        f = torch.where(norm == 0, torch.zeros_like(m), m / torch.where(norm == 0, torch.ones_like(norm), norm))
        return f * (x @ weight.T + 1.3 * (x @ A.T) @ B.T) + bias

    assert_kernel_matches(
        lambda: dora.dora_linear(x, None, weight, bias, A, B, m, 1.3, norm if cached else None),
        formula,
        [x, bias, A, B, m],
    )


def test_dora_fused_applies_only_to_one_dtype_a_frozen_base_and_no_autocast() -> None:
    x, w, a, m = torch.ones(2, 3), torch.ones(4, 3), torch.ones(1, 3), torch.ones(4)
    assert dora.dora_fused_applies(x, w, a, m)
    assert not dora.dora_fused_applies(x, w, a, m.double())
    assert not dora.dora_fused_applies(x, w, a.double(), m)
    assert not dora.dora_fused_applies(x.double(), w, a, m)
    assert not dora.dora_fused_applies(x, w.requires_grad_(True), a, m)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not dora.dora_fused_applies(x, w.detach(), a, m)


def test_no_weight_sized_tensor_lives_from_forward_to_backward() -> None:
    # 30 rows, in 40, out 4: the backward folds, and u (30, 4) is smaller than the (4, 40) weight.
    in_f, out_f, rows = 40, 4, 30
    assert lowrank.fold_plan(rows, in_f, out_f, torch.device("cpu"))[1]
    x, weight = leaf(rows, in_f, seed=1), leaf(out_f, in_f, seed=2, grad=False)
    A, B, m = leaf(3, in_f, seed=4), leaf(out_f, 3, seed=5), leaf(out_f, seed=7)
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = dora.dora_linear(x, None, weight, None, A, B, m, 0.5)
    inputs = {t.untyped_storage().data_ptr() for t in (x, weight)}
    big = [t.shape for t in saved if t.untyped_storage().data_ptr() not in inputs and t.numel() >= out_f * in_f]
    assert not big, big  # the folded [W + s·B·A | s·B] is rebuilt in backward, not kept
    assert_kernel_matches(lambda: y, lambda: _formula(x, None, weight, None, A, B, m, 0.5), [x, A, B, m])


def test_compiled_models_trace_the_plain_form_instead_of_the_function() -> None:
    x, w, A, m = torch.ones(3, 4), torch.ones(5, 4), torch.ones(2, 4), torch.ones(5)

    def which(t: torch.Tensor) -> torch.Tensor:
        return t + 1 if dora.dora_fused_applies(x, w, A, m) else t - 1

    assert torch.equal(which(x), x + 1)  # eager: the fused Function
    assert torch.equal(torch.compile(which, backend="eager", fullgraph=True)(x), x - 1)  # traced: plain form
