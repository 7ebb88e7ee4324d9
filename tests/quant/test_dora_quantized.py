"""DoRA on a quantized base takes ``kernels.quantized``'s Function under autograd, and computes what the plain form
and PEFT's QLoRA DoRA layer compute.

Truths: the layer's plain differentiable form (stock autograd ops on the dequantized stand-in, with the quantized
layer's own kernel for the base term where no gradient flows back through it), run on the same tensors with the
same dropout mask; and PEFT 0.21's bitsandbytes DoRA layers (outputs and every gradient). A spy asserts which path
ran: the Function in training (with and without an input gradient, with and without dropout) and in eval mode for
an input that needs its gradient; the plain form without autograd, in eval mode for an input that needs none (the
quantized layer's inference kernel, which for int8 also quantizes the input), and for an adapter in another dtype.
"""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from torch import nn

import lightning_adapters as la
from lightning_adapters.kernels import quantized as qk
from lightning_adapters.methods import lora as lora_method

pytest.importorskip("bitsandbytes")
pytest.importorskip("torchao")

IN, OUT = 128, 128  # torchao NF4 quantizes 16384 weights at a time


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(IN, OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def _model(scheme: str, dropout: float = 0.0, dtype: torch.dtype = torch.float32) -> Net:
    torch.manual_seed(0)
    model = la.quantize(Net(), scheme, skip=[], compute_dtype=dtype if scheme in ("nf4", "fp4") else None)
    cfg = la.LoRAConfig(r=4, alpha=8, dropout=dropout, use_dora=True, target_modules=["layer"])
    la.inject(model, dataclasses.replace(cfg, adapter_dtype=str(dtype).removeprefix("torch.")))
    a = model.layer.adapter.default
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        a.lora_B.copy_(torch.randn(a.lora_B.shape, generator=g) * 0.1)
        a.magnitude.mul_(1 + 0.3 * torch.randn(OUT, generator=g).to(dtype))  # factors far from 1
    return model


class _Spy:
    """Counts calls of the quantized DoRA Function."""

    def __init__(self, monkeypatch) -> None:
        self.calls = 0
        apply = qk._QuantizedDoRALinear.apply

        def counted(*args):
            self.calls += 1
            return apply(*args)

        monkeypatch.setattr(qk._QuantizedDoRALinear, "apply", counted)


def _run(model: Net, x: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
    """Output, and the gradients of the input and of every parameter that gets one."""
    for p in model.parameters():
        p.grad = None
    x = x.detach().clone().requires_grad_(x.requires_grad)
    torch.manual_seed(123)  # the same dropout mask on both paths
    y = model(x)
    (y * g).sum().backward()
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    out["y"] = y.detach()
    if x.requires_grad:
        out["x"] = x.grad
    return out


@pytest.mark.parametrize("scheme", ["nf4", "int8", "torchao_nf4"])
@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["nodrop", "drop"])
@pytest.mark.parametrize("x_grad", [True, False], ids=["xgrad", "xfrozen"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_function_runs_under_autograd_and_equals_the_plain_form(scheme, dropout, x_grad, mode, monkeypatch) -> None:
    model = _model(scheme, dropout).train(mode == "train")
    model.layer.bias.requires_grad_(True)  # a trainable base bias (bias="all")
    x = torch.randn(3, 50, IN, generator=torch.Generator().manual_seed(1)).requires_grad_(x_grad)
    g = torch.randn(3, 50, OUT, generator=torch.Generator().manual_seed(3))
    spy = _Spy(monkeypatch)
    ours = _run(model, x, g)
    # In eval mode the base term is the layer's own kernel where no gradient reaches x, and always on int8 (whose
    # inference product also quantizes the input): the plain form.
    calls = 0 if mode == "eval" and (not x_grad or scheme == "int8") else 1
    assert spy.calls == calls
    monkeypatch.setattr(lora_method, "quantized_dora_applies", lambda *a: False)
    ref = _run(model, x, g)
    assert spy.calls == calls
    expected = {"y", "layer.bias"} | {f"layer.adapter.default.{k}" for k in ("lora_A", "lora_B", "magnitude")}
    assert ours.keys() == ref.keys() == expected | ({"x"} if x_grad else set())
    for k in ref:  # fp32 rounding: sums over 150 rows of values ~1 differ by ~1e-5 of the largest
        atol = 2e-5 * float(ref[k].abs().max())
        torch.testing.assert_close(ours[k], ref[k], rtol=1e-5, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("x_grad", [True, False], ids=["xgrad", "xfrozen"])
def test_bf16_compute_dtype_equals_the_plain_form(x_grad, monkeypatch) -> None:
    """NF4 computing in bf16, the adapter and the input in bf16: the Function dequantizes in bf16 and keeps the norm
    in fp32, as the plain form does (its base term the quantized layer's own bf16 product when ``x`` is frozen)."""
    model = _model("nf4", dtype=torch.bfloat16).train()
    x = torch.randn(3, 50, IN, generator=torch.Generator().manual_seed(1)).bfloat16().requires_grad_(x_grad)
    g = torch.randn(3, 50, OUT, generator=torch.Generator().manual_seed(3)).bfloat16()
    spy = _Spy(monkeypatch)
    ours = _run(model, x, g)
    assert spy.calls == 1
    monkeypatch.setattr(lora_method, "quantized_dora_applies", lambda *a: False)
    ref = _run(model, x, g)
    assert ours.keys() == ref.keys() and "layer.adapter.default.magnitude" in ref
    for k in ref:  # bf16 rounding of sums in another order: ~1% of the largest value
        err, top = float((ours[k].float() - ref[k].float()).abs().max()), float(ref[k].float().abs().max())
        assert ours[k].dtype == ref[k].dtype == torch.bfloat16 and err <= 2e-2 * top, (k, err, top)


def test_no_autograd_or_another_adapter_dtype_takes_the_plain_form(monkeypatch) -> None:
    model = _model("nf4")
    x = torch.randn(2, 5, IN)
    spy = _Spy(monkeypatch)
    with torch.no_grad():
        model(x)
    assert spy.calls == 0
    model(x.bfloat16().float())  # fp32 input and adapter: the Function
    assert spy.calls == 1
    model.layer.adapter.default.to(torch.float64)  # the adapter in another dtype than the input: plain form
    y = model(x)
    assert spy.calls == 1 and y.dtype == torch.float32


def _peft_pair(scheme: str):
    peft = pytest.importorskip("peft")
    ours = _model(scheme).train()
    torch.manual_seed(0)  # as in _model: the same quantized weights
    base = la.quantize(Net(), scheme, skip=[])
    base.is_loaded_in_4bit, base.is_loaded_in_8bit = scheme != "int8", scheme == "int8"
    cfg = peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["layer"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(base, cfg).train()
    lyr = theirs.base_model.model.layer
    a = ours.layer.adapter.default
    with torch.no_grad():
        lyr.lora_A["default"].weight.copy_(a.lora_A)
        lyr.lora_B["default"].weight.copy_(a.lora_B)
        lyr.lora_magnitude_vector["default"].weight.copy_(a.magnitude)
    params = {
        "lora_A": (a.lora_A, lyr.lora_A["default"].weight),
        "lora_B": (a.lora_B, lyr.lora_B["default"].weight),
        "magnitude": (a.magnitude, lyr.lora_magnitude_vector["default"].weight),
    }
    return ours, theirs, params


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_outputs_and_gradients_equal_peft_qlora_dora(scheme: str, monkeypatch) -> None:
    ours, theirs, params = _peft_pair(scheme)
    spy = _Spy(monkeypatch)
    x = torch.randn(4, 6, IN, generator=torch.Generator().manual_seed(1))
    g = torch.randn(4, 6, OUT, generator=torch.Generator().manual_seed(2))
    xo, xt = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    yo, yt = ours(xo), theirs(xt)
    assert spy.calls == 1
    torch.testing.assert_close(yo, yt, rtol=0, atol=1e-5)
    (yo * g).sum().backward()
    (yt * g).sum().backward()
    torch.testing.assert_close(xo.grad, xt.grad, rtol=1e-5, atol=1e-5)
    for name, (mine, peft_p) in params.items():
        torch.testing.assert_close(mine.grad, peft_p.grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("kind", ["4bit", "8bit"])
def test_the_weight_of_a_layer_not_yet_quantized_is_dequantized_as_a_copy(kind: str) -> None:
    """A bitsandbytes layer holds its float weight until it moves to its device (Lightning's BitsandbytesPrecision
    layers); the quantized Functions fold into what ``dequantized_weight`` returns, which must not be that weight."""
    import bitsandbytes as bnb

    from lightning_adapters.core.quant import dequantized_weight

    torch.manual_seed(0)
    if kind == "4bit":
        layer = bnb.nn.Linear4bit(IN, OUT, quant_type="nf4", compute_dtype=torch.float32)
    else:
        layer = bnb.nn.Linear8bitLt(IN, OUT, has_fp16_weights=False)
    before = layer.weight.data.clone()
    w = dequantized_weight(layer, layer.weight.dtype)
    assert torch.equal(w, before)
    w.add_(1.0)
    assert torch.equal(layer.weight.data, before)
