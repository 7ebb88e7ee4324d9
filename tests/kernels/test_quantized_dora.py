"""kernels.quantized's DoRA Function against plain autograd of PEFT's DoRA form on the dequantized weight.

The truth, in float64 from the weight ``W`` that ``dequantized_weight`` gives in the input's dtype::

    n = ‖W + s·B·A‖_row (detached),  f = m / n
    y = x Wᵀ + b + (f − 1) ⊙ (x_d Wᵀ) + f ⊙ s·(x_d Aᵀ) Bᵀ        (x_d = x without dropout)

Every base the Function runs on (bitsandbytes NF4 / FP4 / int8, torchao NF4 / int8), fp32 and bf16, with and
without a dropped-out adapter input, on both sides of the backward fold (``lowrank.fold_pays_backward``: one
product by ``diag(f)[W + s·B·A | s·B]``, else the scaled upstream gradient), with and without gradients to the
input. Outputs and the gradients of ``x``, ``x_d``, ``b``, ``A``, ``B``, ``m``; and the weight is dequantized once
per forward and once per backward (not at all when no input needs its gradient), never saved.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lightning_adapters as la
from lightning_adapters.core.quant import dequantized_weight
from lightning_adapters.kernels import lowrank
from lightning_adapters.kernels import quantized as qk

pytest.importorskip("bitsandbytes")
pytest.importorskip("torchao")

SCHEMES = ["nf4", "fp4", "int8", "torchao_nf4", "torchao_int8"]
IN, OUT, R, S = 128, 256, 4, 1.5
# Rows per batch of 3 on both sides of the backward fold: 3·in·out < N·(out + 2·in) from N = 193 on.
ROWS = {"unfolded-backward": 64, "folded-backward": 65}
# float64 truth against the kernel in the input's dtype: the largest error allowed, relative to the largest value.
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}


def test_rows_sit_on_both_sides_of_the_backward_fold() -> None:
    assert [lowrank.fold_pays_backward(3 * r, IN, OUT) for r in ROWS.values()] == [False, True]


def _layer(scheme: str, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(IN, OUT))
    if scheme.startswith("torchao"):
        return la.quantize(net.to(dtype), scheme, skip=[])[0]
    return la.quantize(net, scheme, skip=[], compute_dtype=dtype if scheme != "int8" else None)[0]


def _leaf(*shape: int, seed: int, dtype: torch.dtype, grad: bool, scale: float = 1.0) -> torch.Tensor:
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale
    return t.to(dtype).requires_grad_(grad)


def _inputs(layer: nn.Module, dtype: torch.dtype, rows: int, dropout: bool, frozen: tuple[str, ...]):
    x = _leaf(3, rows, IN, seed=1, dtype=dtype, grad="x" not in frozen)
    xd = None
    if dropout:  # a dropped-out copy: zeros and 1/(1−p)-scaled values
        keep = torch.rand(x.shape, generator=torch.Generator().manual_seed(2)) > 0.3
        xd = (x.detach() * keep / 0.7).to(dtype).requires_grad_("x" not in frozen)
    bias = _leaf(OUT, seed=3, dtype=dtype, grad="bias" not in frozen)
    A = _leaf(R, IN, seed=4, dtype=dtype, grad="A" not in frozen, scale=0.1)
    B = _leaf(OUT, R, seed=5, dtype=dtype, grad="B" not in frozen, scale=0.1)
    w = dequantized_weight(layer, dtype).double()
    n = (w + S * B.detach().double() @ A.detach().double()).norm(dim=1)
    m = (n * (1 + 0.3 * torch.randn(OUT, generator=torch.Generator().manual_seed(6)))).to(dtype)
    return x, xd, bias, A, B, m.requires_grad_("m" not in frozen)


def _formula(layer, x, xd, bias, A, B, m) -> torch.Tensor:
    w = dequantized_weight(layer, x.dtype).double()  # the weight the kernel multiplies by, exactly
    x, A, B, m, bias = (t.double() for t in (x, A, B, m, bias))
    a_in = x if xd is None else xd.double()
    n = (w + S * B @ A).detach().norm(dim=1)
    f = m / n
    return x @ w.T + bias + (f - 1) * (a_in @ w.T) + f * (S * (a_in @ A.T) @ B.T)


def _close(got: torch.Tensor, want: torch.Tensor, tol: float, what: str) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, what
    got, want = got.detach().double(), want.detach().double()
    err = float((got - want).abs().max())
    assert err <= tol * float(want.abs().max()), f"{what}: max error {err:.3g}"


def _check(layer, inputs, dtype) -> None:
    x, xd, bias, A, B, m = inputs
    y = qk.quantized_dora_linear(x, xd, bias, A, B, m, S, layer)
    ref = _formula(layer, x, xd, bias, A, B, m)
    tol = TOL[dtype]
    _close(y, ref.to(dtype), tol, "output")
    leaves = [t for t in (x, xd, bias, A, B, m) if t is not None and t.requires_grad]
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(9)).to(dtype)
    got = torch.autograd.grad(y, leaves, g)
    want = torch.autograd.grad(ref, leaves, g.double())
    for i, (a, b) in enumerate(zip(got, want)):
        _close(a, b, tol, f"gradient of input {i}")


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rows", list(ROWS))
@pytest.mark.parametrize("dropout", [False, True], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("frozen", [(), ("x",)], ids=["all-grads", "input-frozen"])
def test_equals_plain_autograd_on_the_dequantized_weight(scheme, dtype, rows, dropout, frozen) -> None:
    layer = _layer(scheme, dtype)
    _check(layer, _inputs(layer, dtype, ROWS[rows], dropout, frozen), dtype)


@pytest.mark.parametrize("rows", list(ROWS))
@pytest.mark.parametrize("frozen", [("m",), ("B",), ("A", "bias"), ("x", "m", "bias")])
def test_equals_plain_autograd_with_some_inputs_frozen(rows, frozen) -> None:
    """What is saved and computed depends on which inputs need a gradient (``u`` for ``m``, ``h`` for ``B``)."""
    layer = _layer("nf4", torch.float32)
    _check(layer, _inputs(layer, torch.float32, ROWS[rows], False, frozen), torch.float32)


@pytest.mark.parametrize("dropout", [False, True], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("frozen", [(), ("x",)], ids=["all-grads", "input-frozen"])
def test_dequantizes_once_per_direction_and_saves_no_weight(monkeypatch, dropout, frozen) -> None:
    layer = _layer("nf4", torch.float32)
    x, xd, bias, A, B, m = _inputs(layer, torch.float32, ROWS["folded-backward"], dropout, frozen)
    calls: list[torch.dtype] = []

    def counted(module: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
        calls.append(dtype)
        return dequantized_weight(module, dtype)

    monkeypatch.setattr(qk, "dequantized_weight", counted)
    saved: list[torch.Size] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = qk.quantized_dora_linear(x, xd, bias, A, B, m, S, layer)
    assert len(calls) == 1
    assert saved and not any(len(s) == 2 and s[0] == OUT and s[1] >= IN for s in saved), saved  # no (out, in)
    y.pow(2).sum().backward()
    assert len(calls) == (1 if frozen else 2)  # ∂m, ∂A, ∂B, ∂b need no weight
    assert all(t.grad is not None for t in (A, B, m, bias))


def test_applies_to_one_dtype_without_autocast() -> None:
    x, A, m = torch.zeros(2, 4), torch.zeros(3, 4), torch.zeros(5)
    assert qk.quantized_dora_applies(x, A, m)
    assert not qk.quantized_dora_applies(x, A, m.bfloat16())
    assert not qk.quantized_dora_applies(x.bfloat16(), A, m)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not qk.quantized_dora_applies(x, A, m)
