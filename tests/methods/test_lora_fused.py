"""LoRA's hand-written Linear/Conv1D autograd path against the formula run through plain autograd.

Covers both execution paths (folded ``W + s·B·A`` for many rows, in-place accumulation for few, forward and
backward), dropout,
inputs with and without ``requires_grad``, a trainable base weight and bias, and transformers ``Conv1D``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightning_adapters as la
from lightning_adapters.kernels.lowrank import fold_pays, fold_pays_backward
from tests.helpers import Wrap


def _reference(layer: nn.Module, x: torch.Tensor, p: float) -> torch.Tensor:
    """``x Wᵀ + b + s · B A dropout(x)`` with stock autograd ops (the weight read from the base module)."""
    a = layer.adapter.default
    w = layer.weight.t() if a.kind == "conv1d_t" else layer.weight
    xd = F.dropout(x, p, True) if p > 0 else x
    return F.linear(x, w, layer.bias) + a.scale * F.linear(F.linear(xd, a.lora_A), a.lora_B)


def _make(kind: str, in_f: int, out_f: int, dropout: float) -> Wrap:
    torch.manual_seed(0)
    if kind == "conv1d_t":
        from transformers.pytorch_utils import Conv1D

        base = Conv1D(out_f, in_f)
        nn.init.normal_(base.weight, std=0.2)
        nn.init.normal_(base.bias, std=0.2)
    else:
        base = nn.Linear(in_f, out_f)
    model = Wrap(base)
    la.inject(model, la.LoRAConfig(r=4, alpha=8, dropout=dropout, target_modules=["layer"]))
    with torch.no_grad():
        model.layer.adapter.default.lora_B.normal_(std=0.3)
    return model.train()


def _grads(model: Wrap, x: torch.Tensor, g: torch.Tensor, fn) -> dict[str, torch.Tensor]:
    for p in model.parameters():
        p.grad = None
    x = x.detach().clone().requires_grad_(x.requires_grad)
    torch.manual_seed(123)  # the same dropout mask for both paths
    y = fn(x)
    (y * g).sum().backward()
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    out["y"] = y.detach()
    if x.requires_grad:
        out["x"] = x.grad
    return out


@pytest.mark.parametrize("kind", ["linear", "conv1d_t"])
@pytest.mark.parametrize("rows", [3, 64], ids=["inplace", "folded"])
@pytest.mark.parametrize("x_grad", [True, False], ids=["xgrad", "xfrozen"])
@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["nodrop", "drop"])
@pytest.mark.parametrize("train_base", [False, True], ids=["frozen", "trainbase"])
def test_fused_matches_autograd(kind: str, rows: int, x_grad: bool, dropout: float, train_base: bool) -> None:
    in_f, out_f = 12, 10
    assert fold_pays(rows * 2, in_f, out_f) == fold_pays_backward(rows * 2, in_f, out_f) == (rows == 64)
    model = _make(kind, in_f, out_f, dropout)
    layer = model.layer
    layer.weight.requires_grad_(train_base)
    layer.bias.requires_grad_(train_base)
    x = torch.randn(2, rows, in_f, generator=torch.Generator().manual_seed(1)).requires_grad_(x_grad)
    g = torch.randn(2, rows, out_f, generator=torch.Generator().manual_seed(2))
    ours = _grads(model, x, g, model)
    ref = _grads(model, x, g, lambda t: _reference(layer, t, dropout))
    assert ours.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], rtol=1e-5, atol=1e-5, msg=k)


def test_folded_path_is_exactly_the_base_at_init() -> None:
    """``B = 0``: ``W + s·B·A`` is ``W`` bit for bit, so the folded path returns the base output exactly."""
    torch.manual_seed(0)
    model = Wrap(nn.Linear(16, 8))
    x = torch.randn(4, 32, 16)
    expected = model(x)
    la.inject(model, la.LoRAConfig(r=4, target_modules=["layer"]))
    assert fold_pays(4 * 32, 16, 8)
    assert torch.equal(model(x), expected)


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("rows", [512, 301])
def test_thin_products_equal_plain_matmul(rows: int, two_threads) -> None:
    from lightning_adapters.kernels.lowrank import thin_cols_product, thin_rows_product

    g = torch.Generator().manual_seed(0)
    u = torch.randn(8, rows, dtype=torch.float64, generator=g).t()  # (rows, 8), a transposed view
    v = torch.randn(rows, 40, dtype=torch.float64, generator=g)
    m = torch.randn(8, 40, dtype=torch.float64, generator=g)
    torch.testing.assert_close(thin_rows_product(u, v), u.t() @ v, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(thin_cols_product(m, v), m @ v.t(), rtol=1e-12, atol=1e-12)
    assert thin_cols_product(m, v).is_contiguous()


@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["nodrop", "drop"])
def test_fused_matches_autograd_with_split_thin_products(dropout: float, two_threads) -> None:
    """Enough rows (2 × 160) that the rank-r products run as two half-row batches."""
    from lightning_adapters.kernels.lowrank import row_chunks

    assert row_chunks(320) == 2 and fold_pays(320, 12, 10) and fold_pays_backward(320, 12, 10)
    model = _make("linear", 12, 10, dropout)
    x = torch.randn(2, 160, 12, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    g = torch.randn(2, 160, 10, generator=torch.Generator().manual_seed(2))
    ours = _grads(model, x, g, model)
    ref = _grads(model, x, g, lambda t: _reference(model.layer, t, dropout))
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], rtol=1e-5, atol=1e-5, msg=k)


def _traced_ops(model: nn.Module, x: torch.Tensor) -> list[tuple[str, tuple[int, ...]]]:
    """The calls Dynamo records for ``model(x)`` (one graph, none broken) with their output shapes, ``.to`` casts
    left out."""
    graphs = []

    def capture(gm: torch.fx.GraphModule, _inputs: list) -> object:
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=capture, fullgraph=True)(x)
    (gm,) = graphs
    calls = [n for n in gm.graph.nodes if n.op in ("call_function", "call_method", "call_module")]
    return [
        (getattr(n.target, "__name__", str(n.target)), tuple(n.meta["example_value"].shape))
        for n in calls
        if n.target != "to"
    ]


@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["nodrop", "drop"])
def test_compiled_model_traces_peft_s_graph(dropout: float) -> None:
    """Under ``torch.compile`` the layer runs the plain products in PEFT's order (base product, then ``B (A x)``, the
    scale and the sum), so inductor gets PEFT's graph op for op; compiled, it equals the formula.

    Regression: the adapter's ``A x`` came before the base product (same ops, another order), the one difference
    between the two compiled decoders that measured 1.01× PEFT's compiled step.
    """
    from peft import LoraConfig, get_peft_model

    model = _make("linear", 12, 10, dropout).train()
    base = Wrap(nn.Linear(12, 10))
    base.load_state_dict({k: v for k, v in model.state_dict().items() if ".adapter." not in k})
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["layer"]))
    x = torch.randn(3, 12)
    assert _traced_ops(model, x) == _traced_ops(peft, x)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True).eval()
    torch.testing.assert_close(compiled(x), _reference(model.layer, x, 0.0))
