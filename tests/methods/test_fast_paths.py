"""Every optimised path against plain autograd of the closed-form formula, on both sides of its threshold.

Each test builds one adapted layer in float64, runs it, and runs the method's formula written out here with stock
differentiable ops on the *same* leaf tensors; outputs and the gradients of the input (when it requires grad)
and of every adapter parameter must agree to float64 rounding. Shapes are picked just below and just above each
threshold (the dispatch predicate is asserted, so a moved threshold shows up here too), including shapes where
the forward and the backward choose differently. Values are chosen so that a wrong formula cannot be right by
accident: ``r = 3`` (``sqrt(r)`` is not an integer), ``alpha != r``, odd non-square layers, grouped convolutions,
batches of one and of many rows.

Dispatch table (tests named without their ``test_`` prefix; a row starting with spaces continues the one above):

| dispatch (predicate)                                   | sides covered                | test                         |
|--------------------------------------------------------|------------------------------|------------------------------|
| lora ``fused_linear_applies`` (one dtype, no autocast) | fused / plain (fp64 adapter  | lora_fused_thresholds,       |
|                                                        | on an fp32 base)             | lora_plain_path_mixed_dtypes |
| any: autocast on -> plain / differentiable path        | bf16 and fp16 autocast       | test_dtypes.py: autocast_*   |
| lora fwd fold ``3·in < 2·rows``,                       | F/F, F/T, T/F, T/T at each   | lora_fused_thresholds        |
|   bwd fold ``3·in·out < rows·(out + 2·in)``            | edge (``LORA_SHAPES``)       |                              |
| lora ``[W+sBA | sB]`` iff both fold and x needs grad   | x grad / x constant          | lora_fused_thresholds        |
| lora ``h`` kept iff B needs grad or no fwd fold        | A, B, A+B frozen / trainable | lora_fused_thresholds        |
| lora dropout in training: no fold, own ``∂x_d``        | 10 / 19 / 64 rows            | lora_fused_dropout           |
| lora ``row_chunks``: split iff rows >= 256, even       | 254 / 255 / 256 / 257 rows   | lora_row_split_threshold     |
| lora DoRA, with / without dropout (Linear and Conv1D:  | Linear, Conv1D, Conv1d,      | dora_formula                 |
|   fused ``kernels.dora``; conv/embedding: plain path)  | Conv2d groups=2, Embedding   |                              |
| DoRA ``dora_fused_applies``, norm computed / cached,   | every side, fp16/bf16/fp32,  | kernels/test_dora.py,        |
|   fold / bwd fold, ``∂m``, no-grad path, eval cache    | cache invalidation           | methods/test_dora_fused.py   |
| lora conv (A conv + grouped 1x1 B), Embedding          | dilated, strided g=2, 1x1    | lora_conv_embedding_formula  |
| adalora ``LowRankLinear`` with ``A ⊙ E``               | rows 10 / 11 / 19, 7         | adalora_fused_thresholds     |
| adalora plain path (mixed dtypes), Conv2d              | with / without dropout       | adalora_plain_and_conv       |
| loha ``_rank_r2_is_cheaper``, grad:                    | (24, 23) fold,               | loha_paths                   |
|   ``3r²(in + out) < in·out``                           | (25, 24) rank-r²             |                              |
| loha same, no grad:                                    | 36 / 37 tokens               | loha_paths                   |
|   ``tokens·r²·(in + out) < (2r + 8)·in·out``           |                              |                              |
| loha/lokr mixed dtypes (out-of-place sums)             | both cost sides              | lycoris_mixed_dtypes         |
| lokr ``_kron_is_cheaper``, grad: ``4k < in·out``       | (9, 10) fold, (10, 12) kron  | lokr_paths                   |
| lokr same, no grad: ``tokens·k <= 8·in·out``           | 34 / 35, 16 / 17 tokens      | lokr_paths                   |
| lokr full / low-rank w2, w1_a·w1_b; forced kron        | full w2 backward             | lokr_paths                   |
| loha/lokr conv: ``FoldedProduct`` / no-grad fold /     | x grad, factors only, no     | loha_lokr_conv_paths         |
|   autograd fallback; LoHa CP form                      | grad; reflect, ``'same'``    |                              |
| oft ``rotated_linear``: rotate tokens iff              | 19 / 20 tokens (20 outs),    | oft_linear_paths             |
|   tokens < out or a trainable base                     | trainable base               |                              |
| oft ``RotatedLinear`` bwd token-major iff b >= 16      | blocks 15 / 16               | oft_linear_paths             |
| oft ``UnitSkewInverse`` Gauss-Jordan iff b <= 8        | blocks 8 / 9 (exact Cayley)  | oft_linear_paths             |
| oft Neumann / exact, ``block_share``                   | both                         | oft_linear_paths             |
| oft Conv2d (groups=2), Embedding                       | Neumann / exact              | oft_conv_and_embedding       |
| boft token / weight path; m = 1, b = 16 (token-        | 11 / 12 tokens (12 outs)     | boft_linear_paths            |
|   major bwd) vs m = 2, 3 (permuted layouts)            |                              |                              |
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightning_adapters as la
from lightning_adapters.kernels import lowrank, rotation
from lightning_adapters.methods.lokr import LoKrLayer
from tests.helpers import Wrap
from tests.methods.test_boft import _dense_rotation

F64 = torch.float64


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _randomize(module: nn.Module, std: float = 0.3, seed: int = 0) -> None:
    g = _g(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * std)


def _conv1d_t(in_f: int, out_f: int) -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    m = Conv1D(out_f, in_f)
    nn.init.normal_(m.weight, std=0.2)
    nn.init.normal_(m.bias, std=0.2)
    return m


def _base(kind: str, in_f: int, out_f: int, dtype: torch.dtype = F64) -> nn.Module:
    torch.manual_seed(0)
    base = _conv1d_t(in_f, out_f) if kind == "conv1d_t" else nn.Linear(in_f, out_f)
    return base.to(dtype)


def _w_out_in(layer: nn.Module) -> torch.Tensor:
    """The base weight as (out, in) whatever the layer kind."""
    return layer.weight.t() if layer.adapter.default.kind == "conv1d_t" else layer.weight


def compare(
    ours: Callable[[torch.Tensor], torch.Tensor],
    ref: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    leaves: list[torch.Tensor],
    *,
    seed: int | None = None,
    grad_mode: bool = True,
    rtol: float = 1e-9,
    atol: float = 1e-10,
) -> None:
    """Outputs and gradients (x when it requires grad, every leaf that requires grad) of ``ours`` equal ``ref``'s.

    ``seed`` reseeds the default generator before each call, so dropout draws the same masks on both sides.
    """
    results = []
    for fn in (ours, ref):
        xx = x.detach().clone().requires_grad_(x.requires_grad)
        if seed is not None:
            torch.manual_seed(seed)
        with torch.set_grad_enabled(grad_mode):
            y = fn(xx)
        wrt = ([xx] if xx.requires_grad else []) + [p for p in leaves if p.requires_grad]
        grads: tuple[torch.Tensor, ...] = ()
        if grad_mode and wrt:
            g = torch.randn(y.shape, generator=_g(99), dtype=torch.float64).to(y.dtype)
            grads = torch.autograd.grad((y * g).sum(), wrt)
        results.append((y.detach(), grads))
    (y0, g0), (y1, g1) = results
    assert y0.dtype == y1.dtype and y0.shape == y1.shape
    torch.testing.assert_close(y0, y1, rtol=rtol, atol=atol, msg="output")
    assert len(g0) == len(g1)
    for i, (a, b) in enumerate(zip(g0, g1)):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=f"gradient #{i} (x first when it requires grad)")


def _input(lead: tuple[int, ...], in_f: int, x_grad: bool, dtype: torch.dtype = F64, seed: int = 1) -> torch.Tensor:
    return torch.randn(*lead, in_f, generator=_g(seed), dtype=torch.float64).to(dtype).requires_grad_(x_grad)


# ============================================================================================================
# LoRA (Linear / Conv1D): kernels.lowrank.LowRankLinear


def lora_scale_ref(alpha: float, r: int, rslora: bool) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r


def _lora_ref(layer: nn.Module, x: torch.Tensor, scale: float, p: float = 0.0) -> torch.Tensor:
    """``x Wᵀ + b + s · (dropout(x) Aᵀ) Bᵀ``."""
    a = layer.adapter.default
    xd = F.dropout(x, p, True) if p > 0 else x
    return x @ _w_out_in(layer).T + layer.bias + scale * (xd @ a.lora_A.T) @ a.lora_B.T


def _lora_layer(kind: str, in_f: int, out_f: int, *, r: int = 3, alpha: float = 5.0, rslora: bool = False, **kw):
    model = la.inject(
        Wrap(_base(kind, in_f, out_f)),
        la.LoRAConfig(r=r, alpha=alpha, use_rslora=rslora, target_modules=["layer"], **kw),
    )
    _randomize(model.layer.adapter.default)
    return model.train()


# (in, out, rows, forward folds, backward folds): both sides of each edge, and both mixed cases.
LORA_SHAPES = [
    (12, 10, 10, False, False),
    (12, 10, 11, False, True),  # forward accumulates, backward folds
    (12, 10, 18, False, True),
    (12, 10, 19, True, True),
    (4, 40, 6, False, False),
    (4, 40, 7, True, False),  # forward folds, backward accumulates
    (4, 40, 10, True, False),
    (4, 40, 11, True, True),
]


@pytest.mark.parametrize("variant", ["linear-rslora", "linear", "conv1d_t-rslora"])
@pytest.mark.parametrize("shape", LORA_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}-rows{s[2]}-f{int(s[3])}b{int(s[4])}")
@pytest.mark.parametrize("x_grad", [True, False], ids=["xgrad", "xconst"])
@pytest.mark.parametrize("frozen", ["", "A", "B", "AB"])
def test_lora_fused_thresholds(variant: str, shape, x_grad: bool, frozen: str) -> None:
    in_f, out_f, rows, fold, fold_back = shape
    kind, _, rs = variant.partition("-")
    assert lowrank.fold_pays(rows, in_f, out_f) is fold
    assert lowrank.fold_pays_backward(rows, in_f, out_f) is fold_back
    model = _lora_layer(kind, in_f, out_f, rslora=bool(rs))
    a = model.layer.adapter.default
    a.lora_A.requires_grad_("A" not in frozen)
    a.lora_B.requires_grad_("B" not in frozen)
    x = _input((rows,) if rows % 2 else (1, rows), in_f, x_grad)  # 2-D rows and a batch of one
    assert lowrank.fused_linear_applies(x, model.layer.weight, a.lora_A)
    scale = lora_scale_ref(5.0, 3, bool(rs))
    compare(model, lambda t: _lora_ref(model.layer, t, scale), x, [a.lora_A, a.lora_B])


@pytest.mark.parametrize("rows", [10, 19, 64])
@pytest.mark.parametrize("x_grad", [True, False], ids=["xgrad", "xconst"])
@pytest.mark.parametrize("frozen", ["", "A", "B"])
def test_lora_fused_dropout(rows: int, x_grad: bool, frozen: str) -> None:
    model = _lora_layer("linear", 12, 10, r=3, alpha=5.0, dropout=0.3)
    a = model.layer.adapter.default
    a.lora_A.requires_grad_("A" not in frozen)
    a.lora_B.requires_grad_("B" not in frozen)
    x = _input((2, rows), 12, x_grad)
    compare(model, lambda t: _lora_ref(model.layer, t, 5.0 / 3, p=0.3), x, [a.lora_A, a.lora_B], seed=5)


@pytest.mark.parametrize(
    "in_f, out_f, rows, split",
    [(12, 10, 254, True), (12, 10, 255, False), (12, 10, 256, True), (12, 10, 257, False), (200, 8, 256, True)],
)
@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["nodrop", "drop"])
def test_lora_row_split_threshold(in_f: int, out_f: int, rows: int, split: bool, dropout: float, two_threads) -> None:
    """254 rows are below 256: no split; (200, 8, 256): the forward does not fold but the row product splits."""
    split = split and rows >= 256
    assert (lowrank.row_chunks(rows) == 2) is split
    model = _lora_layer("linear", in_f, out_f, r=3, alpha=5.0, dropout=dropout)
    a = model.layer.adapter.default
    x = _input((rows,), in_f, True)
    compare(model, lambda t: _lora_ref(model.layer, t, 5.0 / 3, p=dropout), x, [a.lora_A, a.lora_B], seed=5)


@pytest.mark.parametrize("kind", ["linear", "conv1d_t"])
@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["nodrop", "drop"])
def test_lora_plain_path_mixed_dtypes(kind: str, dropout: float) -> None:
    """fp32 base, fp64 adapter: ``LowRankLinear`` does not apply; the plain path computes the same formula."""
    model = la.inject(
        Wrap(_base(kind, 13, 7, torch.float32)),
        la.LoRAConfig(
            r=3, alpha=5.0, use_rslora=True, dropout=dropout, adapter_dtype="float64", target_modules=["layer"]
        ),
    ).train()
    a = model.layer.adapter.default
    _randomize(a)
    x = _input((2, 9), 13, True, torch.float32)
    assert not lowrank.fused_linear_applies(x, model.layer.weight, a.lora_A)
    s = lora_scale_ref(5.0, 3, True)

    def ref(t: torch.Tensor) -> torch.Tensor:
        td = F.dropout(t.double(), dropout, True) if dropout else t.double()
        return t @ _w_out_in(model.layer).T + model.layer.bias + (s * (td @ a.lora_A.T) @ a.lora_B.T).float()

    compare(model, ref, x, [a.lora_A, a.lora_B], seed=5, rtol=1e-5, atol=1e-5)


# --- LoRA conv / embedding and DoRA ---------------------------------------------------------------------------


def _conv_fn(base: nn.Module) -> Callable[..., torch.Tensor]:
    conv = F.conv1d if isinstance(base, nn.Conv1d) else F.conv2d
    return lambda x, w, b=None: conv(x, w, b, base.stride, base.padding, base.dilation, base.groups)


def _lora_conv_delta(base: nn.Module, A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """ΔW of a grouped conv LoRA, group by group: out rows of group g get ``s · B_g A_g``."""
    g = base.groups
    out, r = B.shape[0], A.shape[0]
    parts = []
    for k in range(g):
        b_k = B[k * out // g : (k + 1) * out // g].reshape(out // g, r // g)
        a_k = A[k * r // g : (k + 1) * r // g].reshape(r // g, -1)
        parts.append(scale * b_k @ a_k)
    return torch.cat(parts).reshape(out, *A.shape[1:])


CONV_BASES = {
    "conv1d-dilated": (lambda: nn.Conv1d(6, 10, 3, padding=2, dilation=2), (2, 6, 11)),
    "conv2d-groups2-strided": (lambda: nn.Conv2d(6, 10, 3, stride=2, padding=1, groups=2), (3, 6, 7, 7)),
    "conv2d-1x1": (lambda: nn.Conv2d(6, 10, 1), (1, 6, 5, 5)),
}


def _delta_lora(layer: nn.Module, base: nn.Module, scale: float) -> torch.Tensor:
    """ΔW (out, in) of a linear-like LoRA in (out, in) layout, or the conv kernel."""
    if isinstance(base, (nn.Conv1d, nn.Conv2d)):
        return _lora_conv_delta(base, layer.lora_A, layer.lora_B, scale)
    return scale * layer.lora_B @ layer.lora_A


@pytest.mark.parametrize("name", [*CONV_BASES, "embedding"])
@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["nodrop", "drop"])
def test_lora_conv_embedding_formula(name: str, dropout: float) -> None:
    torch.manual_seed(0)
    if name == "embedding":
        base, x = nn.Embedding(11, 6, padding_idx=0).double(), torch.tensor([[0, 3, 10, 3], [1, 1, 7, 2]])
    else:
        make, shape = CONV_BASES[name]
        base, x = make().double(), torch.randn(*shape, generator=_g(3), dtype=F64, requires_grad=True)
    r = 4  # divisible by the 2 groups; sqrt is an integer, so rsLoRA (s = alpha/2) differs from alpha/r = alpha/4
    model = la.inject(
        Wrap(base), la.LoRAConfig(r=r, alpha=3.0, use_rslora=True, dropout=dropout, target_modules=["layer"])
    ).train()
    a = model.layer.adapter.default
    _randomize(a)
    s = 3.0 / math.sqrt(r)

    def ref(t: torch.Tensor) -> torch.Tensor:
        if name == "embedding":  # no dropout on embeddings
            return (
                F.embedding(t, base.weight, padding_idx=0) + s * F.embedding(t, a.lora_A.T, padding_idx=0) @ a.lora_B.T
            )
        conv = _conv_fn(base)
        td = F.dropout(t, dropout, True) if dropout else t
        return conv(t, base.weight, base.bias) + conv(td, _delta_lora(a, base, s))

    compare(model, ref, x, [a.lora_A, a.lora_B], seed=5)


DORA_BASES = {
    "linear": (lambda: nn.Linear(13, 7), (2, 5, 13)),
    "conv1d_t": (lambda: _conv1d_t(13, 7), (1, 5, 13)),
    "conv1d": (lambda: nn.Conv1d(6, 10, 3, padding=1), (2, 6, 9)),
    "conv2d-groups2": (lambda: nn.Conv2d(6, 10, 3, padding=1, groups=2), (2, 6, 5, 5)),
}


@pytest.mark.parametrize("name", [*DORA_BASES, "embedding"])
@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["nodrop", "drop"])
def test_dora_formula(name: str, dropout: float) -> None:
    """``m/‖W + ΔW‖ ⊙ (W + ΔW) x + b`` (norm detached).

    With dropout, PEFT's form ``base(x) + (m/n − 1) W x_d + (m/n) ΔW x_d``.
    """
    torch.manual_seed(0)
    if name == "embedding":
        base, x = nn.Embedding(11, 6).double(), torch.tensor([[0, 3, 10], [1, 1, 7]])
    else:
        make, shape = DORA_BASES[name]
        base, x = make().double(), torch.randn(*shape, generator=_g(3), dtype=F64, requires_grad=True)
    model = la.inject(
        Wrap(base), la.LoRAConfig(r=4, alpha=3.0, use_dora=True, dropout=dropout, target_modules=["layer"])
    ).train()
    a = model.layer.adapter.default
    _randomize(a)
    s = 3.0 / 4
    is_conv = isinstance(base, (nn.Conv1d, nn.Conv2d))
    t_kind = name == "conv1d_t"

    def ref(t: torch.Tensor) -> torch.Tensor:
        if name == "embedding":
            dw = (s * a.lora_B @ a.lora_A).T  # (V, d)
            norm = (base.weight + dw).detach().norm(dim=0)  # per output feature d
            y = F.embedding(t, base.weight) + F.embedding(t, a.lora_A.T) @ a.lora_B.T * s
            return a.magnitude / norm * y
        w = base.weight.t() if t_kind else base.weight  # (out, ...)
        dw = _delta_lora(a, base, s)
        norm = (w + dw).detach().reshape(w.shape[0], -1).norm(dim=1)  # (out,)
        factor = a.magnitude.reshape(-1) / norm
        if is_conv:
            conv = _conv_fn(base)
            shape = (1, -1) + (1,) * (t.dim() - 2)
            f, bias = factor.reshape(shape), base.bias.reshape(shape)
            td = F.dropout(t, dropout, True) if dropout else t
            if dropout:
                return conv(t, w, base.bias) + (f - 1) * conv(td, w) + f * conv(td, dw)
            return f * conv(t, w + dw) + bias
        td = F.dropout(t, dropout, True) if dropout else t
        if dropout:
            return t @ w.T + base.bias + (factor - 1) * (td @ w.T) + factor * (td @ dw.T)
        return factor * (t @ (w + dw).T) + base.bias

    compare(model, ref, x, [a.lora_A, a.lora_B, a.magnitude], seed=5)


# ============================================================================================================
# AdaLoRA: LowRankLinear with A ⊙ E, the plain path and Conv2d


def _adalora_ref(layer: nn.Module, x: torch.Tensor, p: float = 0.0) -> torch.Tensor:
    a = layer.adapter.default
    s = 5.0 / (6 + 1e-5)  # alpha / (init_r + 1e-5): PEFT's ranknum convention, init_r = 6
    xd = F.dropout(x, p, True) if p > 0 else x
    w = _w_out_in(layer)
    return x @ w.T + layer.bias + s * (xd @ (a.lora_A * a.lora_E).T) @ a.lora_B.T


def _adalora(base: nn.Module, **kw) -> nn.Module:
    model = la.inject(
        Wrap(base), la.AdaLoRAConfig(init_r=6, target_r=2, alpha=5.0, total_step=10, target_modules=["layer"], **kw)
    ).train()
    _randomize(model.layer.adapter.default)
    return model


@pytest.mark.parametrize("kind", ["linear", "conv1d_t"])
@pytest.mark.parametrize("shape", [s for s in LORA_SHAPES if s[2] in (10, 11, 19, 7)], ids=lambda s: f"rows{s[2]}")
@pytest.mark.parametrize("x_grad", [True, False], ids=["xgrad", "xconst"])
@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["nodrop", "drop"])
def test_adalora_fused_thresholds(kind: str, shape, x_grad: bool, dropout: float) -> None:
    in_f, out_f, rows, fold, fold_back = shape
    assert lowrank.fold_pays(rows, in_f, out_f) is fold
    assert lowrank.fold_pays_backward(rows, in_f, out_f) is fold_back
    model = _adalora(_base(kind, in_f, out_f), dropout=dropout)
    a = model.layer.adapter.default
    x = _input((rows,), in_f, x_grad)
    assert lowrank.fused_linear_applies(x, model.layer.weight, a.lora_A)
    compare(model, lambda t: _adalora_ref(model.layer, t, dropout), x, [a.lora_A, a.lora_E, a.lora_B], seed=5)


@pytest.mark.parametrize("case", ["mixed-dtypes", "conv2d"])
@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["nodrop", "drop"])
def test_adalora_plain_and_conv(case: str, dropout: float) -> None:
    s = 5.0 / (6 + 1e-5)
    if case == "conv2d":
        torch.manual_seed(0)
        base = nn.Conv2d(3, 5, 3, stride=2, padding=1).double()
        model = _adalora(base, dropout=dropout)
        a = model.layer.adapter.default
        x = torch.randn(2, 3, 7, 7, generator=_g(3), dtype=F64, requires_grad=True)

        def ref(t: torch.Tensor) -> torch.Tensor:
            td = F.dropout(t, dropout, True) if dropout else t
            dw = (s * a.lora_B @ (a.lora_A * a.lora_E)).reshape(base.weight.shape)
            return F.conv2d(t, base.weight, base.bias, 2, 1) + F.conv2d(td, dw, None, 2, 1)

        compare(model, ref, x, [a.lora_A, a.lora_E, a.lora_B], seed=5)
        return
    model = _adalora(_base("linear", 13, 7, torch.float32), dropout=dropout, adapter_dtype="float64")
    a = model.layer.adapter.default
    x = _input((2, 9), 13, True, torch.float32)
    assert not lowrank.fused_linear_applies(x, model.layer.weight, a.lora_A)

    def ref32(t: torch.Tensor) -> torch.Tensor:
        td = F.dropout(t.double(), dropout, True) if dropout else t.double()
        return t @ model.layer.weight.T + model.layer.bias + (s * (td @ (a.lora_A * a.lora_E).T) @ a.lora_B.T).float()

    compare(model, ref32, x, [a.lora_A, a.lora_E, a.lora_B], seed=5, rtol=1e-5, atol=1e-5)


# ============================================================================================================
# LoHa and LoKr


def _loha_delta(a: nn.Module) -> torch.Tensor:
    """``s · (w1_a w1_b) ⊙ (w2_a w2_b)`` (out, n)."""
    return a.scale_ref * (a.hada_w1_a @ a.hada_w1_b) * (a.hada_w2_a @ a.hada_w2_b)


def _lokr_delta(a: nn.Module, kernel_shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """``s · w1 ⊗ w2`` with each factor read full or as its low-rank product."""
    w1 = a.lokr_w1 if hasattr(a, "lokr_w1") else a.lokr_w1_a @ a.lokr_w1_b
    w2 = a.lokr_w2 if hasattr(a, "lokr_w2") else a.lokr_w2_a @ a.lokr_w2_b
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    dw = a.scale_ref * torch.kron(w1, w2)
    return dw if kernel_shape is None else dw.reshape(kernel_shape)


def _lycoris(method: str, base: nn.Module, **kw) -> nn.Module:
    cfg_cls = la.LoHaConfig if method == "loha" else la.LoKrConfig
    model = la.inject(Wrap(base), cfg_cls(target_modules=["layer"], **kw)).train()
    a = model.layer.adapter.default
    _randomize(a)
    a.scale_ref = kw["alpha"] / kw["r"]  # written here, not read from the layer
    return model


def _linear_ref(method: str, model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    layer, a = model.layer, model.layer.adapter.default

    def ref(t: torch.Tensor) -> torch.Tensor:
        dw = _loha_delta(a) if method == "loha" else _lokr_delta(a)  # (out, in)
        w = _w_out_in(layer)
        return (t.to(dw.dtype) @ (w.to(dw.dtype) + dw).T).to(t.dtype) + layer.bias

    return ref


# (in, out, r, tokens, grad mode) -> which path; the predicate is asserted.
LOHA_CASES = [
    ("fold-grad", 24, 23, 2, 9, True, False),  # 12·(in+out) = 564 >= in·out = 552: fold (FoldedProduct)
    ("r2-grad", 25, 24, 2, 9, True, True),  # 588 < 600: rank-r²
    ("r2-nograd", 25, 24, 2, 36, False, True),  # 36·4·49 = 7056 < 12·600 = 7200
    ("fold-nograd", 25, 24, 2, 37, False, False),  # 7252 >= 7200
]


@pytest.mark.parametrize("case", LOHA_CASES, ids=lambda c: c[0])
@pytest.mark.parametrize("kind", ["linear", "conv1d_t"])
@pytest.mark.parametrize("x_grad", [True, False], ids=["xgrad", "xconst"])
def test_loha_paths(case, kind: str, x_grad: bool) -> None:
    _, in_f, out_f, r, tokens, grad_mode, r2 = case
    model = _lycoris("loha", _base(kind, in_f, out_f), r=r, alpha=3.0)
    a = model.layer.adapter.default
    x = _input((1, tokens), in_f, x_grad and grad_mode)
    with torch.set_grad_enabled(grad_mode):
        assert a._rank_r2_is_cheaper(x, grad_mode) is r2
    compare(model, _linear_ref("loha", model), x, list(a.parameters()), grad_mode=grad_mode)


@pytest.mark.parametrize("method", ["loha", "lokr"])
@pytest.mark.parametrize("cheap", [True, False], ids=["r2-or-kron", "fold"])
def test_lycoris_mixed_dtypes(method: str, cheap: bool) -> None:
    """fp32 base, fp64 factors: the rank-r²/Kronecker form sums out of place; the fold becomes base + op(x, ΔW)."""
    in_f, out_f = ((25, 24) if cheap else (24, 23)) if method == "loha" else ((16, 16) if cheap else (9, 10))
    model = _lycoris(
        method,
        _base("linear", in_f, out_f, torch.float32),
        r=2 if method == "loha" else 1,
        alpha=3.0,
        adapter_dtype="float64",
    )
    a = model.layer.adapter.default
    x = _input((2, 3), in_f, True, torch.float32)
    switch = a._rank_r2_is_cheaper(x, True) if method == "loha" else a._kron_is_cheaper(6, True)
    assert switch is cheap
    layer = model.layer

    def ref(t: torch.Tensor) -> torch.Tensor:
        dw = _loha_delta(a) if method == "loha" else _lokr_delta(a)
        return t @ layer.weight.T + layer.bias + (t.double() @ dw.T).float()

    compare(model, ref, x, list(a.parameters()), rtol=1e-5, atol=1e-5)


# (name, in, out, kw, tokens, grad mode, Kronecker path); None: the Kronecker path forced (a full w2 never
# takes it by cost in training, but its backward must still be right).
LOKR_CASES = [
    ("lowrank-fold-grad", 9, 10, dict(r=1), 5, True, False),  # k = 25: 4k = 100 >= 90
    ("lowrank-kron-grad", 10, 12, dict(r=1), 5, True, True),  # k = 28: 112 < 120
    ("both-kron-grad", 16, 16, dict(r=1, decompose_both=True), 5, True, True),
    ("lowrank-kron-nograd", 10, 12, dict(r=1), 34, False, True),  # 34·28 = 952 <= 960
    ("lowrank-fold-nograd", 10, 12, dict(r=1), 35, False, False),  # 980 > 960
    ("full-fold-grad", 16, 16, dict(r=2), 5, True, False),
    ("full-kron-nograd", 16, 16, dict(r=2), 16, False, True),  # 16·128 <= 8·256
    ("full-fold-nograd", 16, 16, dict(r=2), 17, False, False),
    ("full-kron-grad-forced", 16, 16, dict(r=2), 5, True, None),
]


@pytest.mark.parametrize("case", LOKR_CASES, ids=lambda c: c[0])
@pytest.mark.parametrize("kind", ["linear", "conv1d_t"])
@pytest.mark.parametrize("x_grad", [True, False], ids=["xgrad", "xconst"])
def test_lokr_paths(case, kind: str, x_grad: bool, monkeypatch) -> None:
    name, in_f, out_f, kw, tokens, grad_mode, kron = case
    model = _lycoris("lokr", _base(kind, in_f, out_f), alpha=3.0, **kw)
    a = model.layer.adapter.default
    assert a.full_w2 is name.startswith("full")
    assert a.full_w1 is not name.startswith("both")
    if kron is None:
        monkeypatch.setattr(LoKrLayer, "_kron_is_cheaper", lambda self, *args: True)
    else:
        assert a._kron_is_cheaper(tokens, grad_mode) is kron
    x = _input((tokens, 1), in_f, x_grad and grad_mode)
    compare(model, _linear_ref("lokr", model), x, list(a.parameters()), grad_mode=grad_mode)


def _cp(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """FedPara's Tucker factor ``W[p, q, ...] = Σ_ij t[i, j, ...] wb[j, q] wa[i, p]``."""
    return torch.einsum("ijhw,jq,ip->pqhw", t, wb, wa)


LYCORIS_CONVS = {
    "conv2d-groups2-strided": (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2), (2, 4, 7, 7)),
    "conv1d-dilated": (lambda: nn.Conv1d(4, 6, 3, padding=2, dilation=2), (2, 4, 9)),
    "conv2d-reflect": (lambda: nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"), (1, 4, 6, 6)),
    "conv2d-same": (lambda: nn.Conv2d(4, 6, 3, padding="same"), (1, 4, 6, 6)),
}


@pytest.mark.parametrize("method", ["loha", "lokr", "loha-cp"])
@pytest.mark.parametrize("name", list(LYCORIS_CONVS))
@pytest.mark.parametrize("mode", ["xgrad", "factors-only", "nograd"])
def test_loha_lokr_conv_paths(method: str, name: str, mode: str) -> None:
    """Conv layers always fold: ``FoldedProduct`` with gradients, a no-grad fold without, and the
    differentiable fallback for padding the Function cannot replay (reflect, ``"same"``)."""
    if method == "loha-cp" and name.startswith("conv1d"):
        pytest.skip("the CP test formula is written for 2-D kernels")
    torch.manual_seed(0)
    make, shape = LYCORIS_CONVS[name]
    base = make().double()
    kw = dict(r=2, alpha=3.0) if method != "lokr" else dict(r=1, alpha=3.0)
    model = _lycoris(method.split("-")[0], base, use_effective_conv2d=method == "loha-cp", **kw)
    a = model.layer.adapter.default
    grad_mode = mode != "nograd"
    x = torch.randn(*shape, generator=_g(3), dtype=F64, requires_grad=mode == "xgrad")

    def ref(t: torch.Tensor) -> torch.Tensor:
        if method == "loha-cp":
            dw = a.scale_ref * _cp(a.hada_t1, a.hada_w1_a, a.hada_w1_b) * _cp(a.hada_t2, a.hada_w2_a, a.hada_w2_b)
        elif method == "loha":
            dw = _loha_delta(a).reshape(base.weight.shape)
        else:
            dw = _lokr_delta(a, tuple(base.weight.shape))
        return base._conv_forward(t, base.weight + dw, base.bias)

    compare(model, ref, x, list(a.parameters()), grad_mode=grad_mode)


# ============================================================================================================
# OFT and BOFT


def _oft_blocks_ref(a: nn.Module) -> torch.Tensor:
    """Rotation blocks from ``oft_R`` written out: ``Q = U − Uᵀ``; exact ``(I − Q)(I + Q)⁻¹`` or the Neumann sum
    ``I + 2Q + 2Q² + 2Q³ + Q⁴`` (5 terms)."""
    b = a.block_size
    n = a.oft_R.shape[0]
    iu = torch.triu_indices(b, b, 1)
    u = torch.zeros(n, b, b, dtype=a.oft_R.dtype)
    u = u.index_put((torch.arange(n)[:, None], iu[0][None], iu[1][None]), a.oft_R)
    q = u - u.transpose(1, 2)
    eye = torch.eye(b, dtype=q.dtype)
    if a.use_cayley_neumann:
        assert a.num_terms == 5
        q2 = q @ q
        rot = eye + 2 * q + 2 * q2 + 2 * q2 @ q + q2 @ q2
    else:
        rot = (eye - q) @ torch.linalg.inv(eye + q)
    return rot.expand(a.r, b, b) if a.block_share else rot


# (name, in, out, block, tokens, Neumann, block_share); tokens < out: rotate tokens, else rotate W
OFT_CASES = [
    ("b8-tokens", 32, 20, 8, 19, True, False),
    ("b8-weight", 32, 20, 8, 20, True, False),
    ("b15-weight-exact", 30, 20, 15, 21, False, False),  # linalg.inv, feature-major backward
    ("b16-weight", 32, 20, 16, 20, True, False),  # token-major backward
    ("b16-tokens-exact", 32, 20, 16, 19, False, False),
    ("b8-weight-exact", 32, 20, 8, 24, False, False),  # Gauss-Jordan inverse
    ("b9-weight-exact", 27, 20, 9, 24, False, False),  # LAPACK inverse
    ("b16-weight-share", 32, 20, 16, 33, True, True),
]


@pytest.mark.parametrize("case", OFT_CASES, ids=lambda c: c[0])
@pytest.mark.parametrize("x_grad", [True, False], ids=["xgrad", "xconst"])
@pytest.mark.parametrize("grads", ["adapter", "frozen-adapter", "trainable-base"])
def test_oft_linear_paths(case, x_grad: bool, grads: str) -> None:
    _, in_f, out_f, b, tokens, neumann, share = case
    torch.manual_seed(0)
    base = nn.Linear(in_f, out_f).double()
    model = la.inject(
        Wrap(base),
        la.OFTConfig(oft_block_size=b, use_cayley_neumann=neumann, block_share=share, target_modules=["layer"]),
    ).train()
    a = model.layer.adapter.default
    _randomize(a, std=0.2)
    a.oft_R.requires_grad_(grads != "frozen-adapter")
    base.weight.requires_grad_(grads == "trainable-base")
    base.bias.requires_grad_(grads == "trainable-base")
    if not x_grad and grads == "frozen-adapter":
        pytest.skip("nothing requires grad")
    assert (b >= rotation.TOKEN_MAJOR_MIN_BLOCK) is (b >= 16)
    x = _input((tokens,) if tokens % 2 else (2, tokens // 2), in_f, x_grad)

    def ref(t: torch.Tensor) -> torch.Tensor:
        r_bd = torch.block_diag(*_oft_blocks_ref(a).unbind(0))
        return t @ r_bd @ base.weight.T + base.bias

    compare(model, ref, x, [a.oft_R, base.weight, base.bias])


@pytest.mark.parametrize("name", ["conv2d-groups2", "embedding"])
@pytest.mark.parametrize("neumann", [True, False])
def test_oft_conv_and_embedding(name: str, neumann: bool) -> None:
    torch.manual_seed(0)
    if name == "embedding":
        base, x = nn.Embedding(11, 12).double(), torch.tensor([[0, 3, 10], [1, 1, 7]])
    else:
        base = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2).double()
        x = torch.randn(2, 4, 7, 7, generator=_g(3), dtype=F64, requires_grad=True)
    model = la.inject(Wrap(base), la.OFTConfig(oft_block_size=6, use_cayley_neumann=neumann, target_modules=["layer"]))
    a = model.layer.adapter.default
    _randomize(a, std=0.2)

    def ref(t: torch.Tensor) -> torch.Tensor:
        r_bd = torch.block_diag(*_oft_blocks_ref(a).unbind(0))
        if name == "embedding":
            return F.embedding(t, base.weight) @ r_bd
        w = (base.weight.reshape(6, -1) @ r_bd.T).reshape(base.weight.shape)
        return F.conv2d(t, w, base.bias, 2, 1, 1, 2)

    compare(model, ref, x, [a.oft_R])


@pytest.mark.parametrize("m, b", [(1, 16), (2, 4), (3, 2)])
@pytest.mark.parametrize("tokens", [11, 12], ids=["tokens", "weight"])
@pytest.mark.parametrize("x_grad", [True, False], ids=["xgrad", "xconst"])
def test_boft_linear_paths(m: int, b: int, tokens: int, x_grad: bool) -> None:
    """m = 1 with b = 16 takes the token-major backward on the weight path; m > 1 the permuted layouts."""
    torch.manual_seed(0)
    base = nn.Linear(32, 12).double()
    model = la.inject(
        Wrap(base), la.BOFTConfig(boft_block_size=b, boft_n_butterfly_factor=m, target_modules=["layer"])
    ).train()
    a = model.layer.adapter.default
    _randomize(a, std=0.3)
    x = _input((tokens,), 32, x_grad)

    def ref(t: torch.Tensor) -> torch.Tensor:
        rot = _dense_rotation_diff(a.boft_R)
        return (t @ rot @ base.weight.T) * a.boft_s.reshape(-1) + base.bias

    compare(model, ref, x, [a.boft_R, a.boft_s])


def _dense_rotation_diff(boft_r: torch.Tensor) -> torch.Tensor:
    """``tests.methods.test_boft._dense_rotation`` kept in the autograd graph: ``R = B_{m−1} ⋯ B_0`` with
    ``B_i = P_i · blockdiag(Cayley(½(A − Aᵀ))) · P_iᵀ`` (evens-then-odds half-blocks inside groups of b·2^i)."""
    m, n, b, _ = boft_r.shape
    d = n * b
    out = torch.eye(d, dtype=boft_r.dtype)
    for i in range(m):
        perm = []
        group, half = b * 2**i, b // 2
        for start in range(0, d, group):
            halves = [list(range(start + k * half, start + (k + 1) * half)) for k in range(group // half)]
            for k in list(range(0, len(halves), 2)) + list(range(1, len(halves), 2)):
                perm += halves[k]
        p = torch.zeros(d, d, dtype=boft_r.dtype)
        p[torch.arange(d), torch.tensor(perm)] = 1.0
        s = 0.5 * (boft_r[i] - boft_r[i].transpose(1, 2))
        eye = torch.eye(b, dtype=boft_r.dtype)
        blocks = (eye - s) @ torch.linalg.inv(eye + s)
        out = p @ torch.block_diag(*blocks.unbind(0)) @ p.T @ out
    return out


def test_boft_reference_is_the_checked_dense_rotation() -> None:
    """The differentiable reference above equals the dense rotation ``tests.methods.test_boft`` checks."""
    r = torch.randn(2, 8, 4, 4, generator=_g(0), dtype=F64)
    torch.testing.assert_close(_dense_rotation_diff(r), _dense_rotation(r), rtol=0, atol=1e-12)
