"""Quantized bases, two things the contract suite (``test_quantized_contract.py``) does not reach: which torchao
weight reads as which scheme, and LoRA training with dropout on a 4-bit base (the contract configs have none).

Truths: the quantizer that built the layer (torchao's int8 weight-only config gives an ``Int8Tensor`` with int8
``qdata``), and the same LoRA on a float Linear holding the dequantized weight, run under the same seed, so that
dropout draws the same mask: outputs and every gradient must agree.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lightning_adapters as la
from lightning_adapters.core.quant import dequantized_weight, quant_scheme

pytest.importorskip("torchao")
pytest.importorskip("bitsandbytes")


def test_torchao_int8_weight_only_reads_as_torchao_int8_and_takes_an_adapter():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 16))
    assert quant_scheme(model[0]) is None
    la.quantize(model, "torchao_int8", skip=[])
    assert model[0].weight.qdata.dtype == torch.int8
    assert quant_scheme(model[0]) == "torchao_int8"
    x = torch.randn(3, 32)
    before = model(x)
    la.inject(model, la.LoRAConfig(r=2, target_modules=["0"]))
    assert torch.equal(model(x), before)  # B = 0 at init: the quantized layer's own output


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_lora_training_with_dropout_on_nf4_equals_the_dequantized_float_model(use_dora):
    """DoRA computes ``W x_d`` without the bias as a term of its own (``base_linear(with_bias=False)``): the base
    has a bias, so adding it there shows."""
    torch.manual_seed(0)
    quantized = la.quantize(nn.Sequential(nn.Linear(64, 16)), "nf4", skip=[]).train()
    plain = nn.Sequential(nn.Linear(64, 16)).train()
    with torch.no_grad():
        plain[0].weight.copy_(dequantized_weight(quantized[0], torch.float32))
        plain[0].bias.copy_(quantized[0].bias.float())
    assert quantized[0].bias.abs().min() > 0
    for model in (quantized, plain):
        la.inject(model, la.LoRAConfig(r=4, alpha=6.0, dropout=0.5, use_dora=use_dora, target_modules=["0"]))
    with torch.no_grad():
        quantized[0].adapter["default"].lora_B.normal_()
        plain[0].adapter["default"].lora_B.copy_(quantized[0].adapter["default"].lora_B)
        plain[0].adapter["default"].lora_A.copy_(quantized[0].adapter["default"].lora_A)
    x0 = torch.randn(5, 64)
    g = torch.randn(5, 16)

    def run(model):
        x = x0.clone().requires_grad_(True)  # the input needs a gradient: the training path, not the inference kernel
        torch.manual_seed(7)
        y = model(x)
        params = [p for p in model.parameters() if p.requires_grad]  # lora_A, lora_B (and DoRA's magnitude)
        grads = torch.autograd.grad((y * g).sum(), [x, *params])
        return y.detach(), grads

    y_q, grads_q = run(quantized)
    y_p, grads_p = run(plain)
    assert torch.allclose(y_q, y_p, atol=1e-5)
    assert len(grads_q) == len(grads_p) == (4 if use_dora else 3)
    for got, want in zip(grads_q, grads_p):
        assert torch.allclose(got, want, atol=1e-5)
    # Dropout acted: without it (eval) the output differs.
    quantized.eval()
    with torch.no_grad():
        assert not torch.allclose(quantized(x0), y_q, atol=1e-3)


@pytest.mark.parametrize("compute_dtype", [None, torch.bfloat16, torch.float16])
def test_a_4bit_base_computes_in_the_dtype_it_was_given(compute_dtype):
    """``compute_dtype_of``: the ``compute_dtype`` the layer was quantized with, else the dtype of the weight it
    quantized (fp32 here)."""
    from lightning_adapters.core.quant import compute_dtype_of

    model = la.quantize(nn.Sequential(nn.Linear(64, 16)), "nf4", skip=[], compute_dtype=compute_dtype)
    assert compute_dtype_of(model[0]) == (compute_dtype or torch.float32)


def test_a_bitsandbytes_layer_not_yet_quantized_reads_as_its_float_weight():
    """A ``Linear4bit`` built but not moved to its device (Lightning's ``BitsandbytesPrecision`` builds them so)
    still holds its float weight: that is its dequantized weight, unchanged."""
    import bitsandbytes as bnb

    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(64, 16, bias=False, quant_type="nf4")
    assert layer.weight.bnb_quantized is False
    assert quant_scheme(layer) == "nf4"
    assert torch.equal(dequantized_weight(layer, torch.float32), layer.weight.data.float())


def _nf4_lora(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = la.quantize(nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16)), "nf4", skip=[]).train()
    la.inject(model, la.LoRAConfig(r=4, alpha=6.0, target_modules=["0", "2"]))
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.adapter["default"].lora_B.normal_()
    return model


def _grads(model: nn.Module, run) -> tuple[torch.Tensor, list[torch.Tensor]]:
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    y = run(model, x)
    params = [p for p in model.parameters() if p.requires_grad]
    return y.detach(), torch.autograd.grad(y.square().sum(), [x, *params])


def test_qlora_under_outer_saved_tensor_hooks_hands_them_every_tensor_but_the_weight():
    """Around a call, saved-tensor hooks (non-reentrant activation checkpointing installs them) still receive
    what the adapted quantized layers save (the inputs, the adapter factors), while the dequantized weight stays a
    token; unpacking through them gives the gradients of the plain run. Under ``checkpoint(use_reentrant=False)``
    the outputs and gradients are those without it."""
    model = _nf4_lora()
    y0, g0 = _grads(model, lambda m, x: m(x))
    seen: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> tuple[str, torch.Tensor]:
        seen.append(t)
        return ("mine", t)

    def unpack(packed: tuple[str, torch.Tensor]) -> torch.Tensor:
        assert packed[0] == "mine"
        return packed[1]

    inputs: list[torch.Tensor] = []

    def hooked(m, x):
        inputs.append(x)
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            return m(x)

    y1, g1 = _grads(model, hooked)
    # The first layer's input is saved inside the quantized layer's own Function: the outer hooks get it too.
    assert any(t.data_ptr() == inputs[0].data_ptr() and t.shape == inputs[0].shape for t in seen)
    assert not any(t.shape in ((32, 64), (16, 32)) for t in seen)  # never a full weight
    y2, g2 = _grads(model, lambda m, x: torch.utils.checkpoint.checkpoint(m, x, use_reentrant=False))
    for y, g in ((y1, g1), (y2, g2)):
        assert torch.allclose(y, y0, atol=1e-6)
        for got, want in zip(g, g0):
            assert torch.allclose(got, want, atol=1e-5)


def test_a_torchao_int8_weight_before_0_16_is_read_from_its_tensor_impl():
    """torchao before 0.16 made int8 weight-only weights as ``AffineQuantizedTensor`` with the int8 values under
    ``tensor_impl.int_data`` (no ``qdata``); the installed torchao cannot build one, so a stand-in of that shape."""
    from types import SimpleNamespace

    from lightning_adapters.core.quant import _torchao_kind

    old = type("AffineQuantizedTensor", (), {"__module__": "torchao.dtypes.affine_quantized_tensor"})
    weight = old()
    weight.dtype = torch.bfloat16
    weight.tensor_impl = SimpleNamespace(int_data=torch.zeros(2, 2, dtype=torch.int8))
    assert _torchao_kind(weight) == "int8"
    weight.tensor_impl = SimpleNamespace(int_data=torch.zeros(2, 2, dtype=torch.uint8))
    assert _torchao_kind(weight) == "other"


def test_only_torchao_s_int8_tensor_classes_read_as_int8():
    """Another torchao tensor class with floating values and int8 data (a quantization scheme the methods do not
    know) is ``"other"``, not int8 weight-only; so is an ``AffineQuantizedTensor`` with integer values."""
    from lightning_adapters.core.quant import _torchao_kind

    other = type("SomeQuantizedTensor", (), {"__module__": "torchao.quantization.some"})()
    other.dtype = torch.bfloat16
    other.qdata = torch.zeros(2, 2, dtype=torch.int8)
    assert _torchao_kind(other) == "other"
    old = type("AffineQuantizedTensor", (), {"__module__": "torchao.dtypes.affine_quantized_tensor"})()
    old.dtype = torch.int8
    old.qdata = torch.zeros(2, 2, dtype=torch.int8)
    assert _torchao_kind(old) == "other"
