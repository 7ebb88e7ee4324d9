"""kernels.quantized: the QLoRA Function equals plain autograd of ``x Wᵀ + b + s·(x_d Aᵀ) Bᵀ`` with the dequantized
``W``, outputs and every gradient, with and without input dropout, and keeps no weight-sized tensor for backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightning_adapters as la
from lightning_adapters.core.quant import dequantized_weight
from lightning_adapters.kernels.quantized import fold_backward, fold_forward, quantized_lowrank_linear

pytest.importorskip("bitsandbytes")


# (in, out, rows per batch of 3): both sides of the forward and backward fold rules (fold_forward: in < rows,
# fold_backward: out < rows) and of lowrank.row_chunks' split (768 rows).
SHAPES = {
    "fold_none": (96, 40, 7),
    "fold_backward_only": (96, 40, 20),
    "fold_forward_only": (40, 96, 20),
    "fold_both_split_rows": (96, 40, 256),
}


def test_shapes_cover_both_sides_of_the_fold_rules() -> None:
    sides = {(fold_forward(3 * rows, i), fold_backward(3 * rows, o)) for i, o, rows in SHAPES.values()}
    assert sides == {(False, False), (False, True), (True, False), (True, True)}


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
@pytest.mark.parametrize("dropout", [False, True])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_equals_plain_autograd(scheme: str, dropout: bool, shape: str) -> None:
    in_f, out_f, rows = SHAPES[shape]
    torch.manual_seed(0)
    layer = la.quantize(nn.Sequential(nn.Linear(in_f, out_f)), scheme, skip=[])[0]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, rows, in_f, generator=g, requires_grad=True)
    xd = (x * (torch.rand(x.shape, generator=g) > 0.3)).detach().requires_grad_(True) if dropout else None
    A = torch.randn(4, in_f, generator=g, requires_grad=True)
    B = torch.randn(out_f, 4, generator=g, requires_grad=True)
    bias = torch.randn(out_f, generator=g, requires_grad=True)
    gy = torch.randn(3, rows, out_f, generator=g)
    y = quantized_lowrank_linear(x, xd, bias, A, B, 0.5, layer)
    ins = [t for t in (x, xd, A, B, bias) if t is not None]
    grads = torch.autograd.grad(y, ins, gy)
    w = dequantized_weight(layer, torch.float32)
    ref = F.linear(x, w, bias) + 0.5 * F.linear(F.linear(x if xd is None else xd, A), B)
    ref_grads = torch.autograd.grad(ref, ins, gy)
    assert torch.allclose(y, ref, atol=1e-4)
    for got, want in zip(grads, ref_grads):
        assert torch.allclose(got, want, atol=1e-4)


def test_keeps_no_weight_sized_tensor_for_backward() -> None:
    torch.manual_seed(0)
    layer = la.quantize(nn.Sequential(nn.Linear(256, 192)), "nf4", skip=[])[0]
    x = torch.randn(8, 256, requires_grad=True)
    A = torch.randn(4, 256, requires_grad=True)
    B = torch.randn(192, 4, requires_grad=True)
    saved: list[torch.Size] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = quantized_lowrank_linear(x, None, layer.bias, A, B, 2.0, layer)
    assert saved and all(s.numel() < 192 * 256 for s in saved), saved
    y.sum().backward()
    assert x.grad is not None and A.grad is not None and B.grad is not None


def test_compiled_models_trace_the_plain_terms_instead_of_the_function() -> None:
    from lightning_adapters.kernels.quantized import quantized_dora_applies, quantized_lowrank_applies

    x, A, m = torch.ones(3, 4), torch.ones(2, 4), torch.ones(5)

    def which(t: torch.Tensor) -> torch.Tensor:
        lora, dora = quantized_lowrank_applies(x, A), quantized_dora_applies(x, A, m)
        return t + 1 + 2 * dora if lora else t - 1 - 2 * dora

    assert torch.equal(which(x), x + 3)  # eager: both Functions
    assert torch.equal(torch.compile(which, backend="eager", fullgraph=True)(x), x - 1)  # traced: neither


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_a_compiled_qlora_model_equals_eager(use_dora: bool) -> None:
    """torch.compile of a LoRA/DoRA model on an NF4 base: outputs and every gradient as in eager mode (the LoRA
    Function's saved views once made dynamo fail with an internal error)."""
    torch.manual_seed(0)
    model = la.quantize(nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32)), "nf4", skip=[])
    la.inject(model, la.LoRAConfig(r=4, target_modules=["0", "2"], use_dora=use_dora))
    with torch.no_grad():
        for t in la.adapter_state_dict(model).values():
            t.add_(torch.randn_like(t) * 0.1)
    params = [p for p in model.parameters() if p.requires_grad]
    x = torch.randn(16, 64, requires_grad=True)

    def run(fn: nn.Module) -> list[torch.Tensor]:
        for t in [x, *params]:
            t.grad = None
        out = fn(x)
        out.square().sum().backward()
        return [out.detach(), x.grad.clone(), *(p.grad.clone() for p in params)]

    eager = run(model)
    compiled = run(torch.compile(model, backend="aot_eager"))
    for a, b in zip(eager, compiled, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
