"""The contract on quantized bases: every method × every scheme, on a Linear layer.

Truths: the quantized layer's own forward (identity at init), finite gradients that reach only the adapter, a
merge whose output differs from the unmerged one by no more than the re-quantization error ``merge_errors``
reports (``|E x|_i <= max|E| · ||x||_1``), a bit-exact ``keep_original`` unmerge, an exact state round trip, and
``eject(merge=True, dtype=...)`` equal to the unmerged adapted output up to that dtype's rounding. Models run in
train mode (the configs have no dropout): there bitsandbytes' own forward is the dequantized product for every
scheme, while its int8 inference kernel also quantizes the activations.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lightning_adapters as la
from lightning_adapters.core.quant import dequantized_weight, is_quantized
from tests.helpers import randomize_adapter

pytest.importorskip("bitsandbytes")
pytest.importorskip("torchao")

SCHEMES = ["nf4", "fp4", "int8", "torchao_nf4"]
IN, OUT = 128, 128

METHODS = {
    "lora": lambda: la.LoRAConfig(r=4, alpha=8, target_modules=["layer"]),
    "rslora": lambda: la.LoRAConfig(r=4, alpha=8, use_rslora=True, target_modules=["layer"]),
    "dora": lambda: la.LoRAConfig(r=4, alpha=8, use_dora=True, target_modules=["layer"]),
    "adalora": lambda: la.AdaLoRAConfig(init_r=4, target_r=2, alpha=8.0, target_modules=["layer"]),
    "loha": lambda: la.LoHaConfig(r=4, alpha=8, target_modules=["layer"]),
    "lokr": lambda: la.LoKrConfig(r=4, alpha=8, target_modules=["layer"]),
    "oft": lambda: la.OFTConfig(oft_block_size=8, target_modules=["layer"]),
    "boft": lambda: la.BOFTConfig(boft_block_size=8, boft_n_butterfly_factor=2, target_modules=["layer"]),
}
CASES = [pytest.param(m, s, id=f"{m}-{s}") for m in METHODS for s in SCHEMES]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(IN, OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def _quantized(scheme: str, seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return la.quantize(Net().train(), scheme, skip=[])


def _x(seed: int = 1) -> torch.Tensor:
    return torch.randn(3, 5, IN, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("method,scheme", CASES)
def test_identity_training_step_and_state_round_trip(method: str, scheme: str) -> None:
    model, x = _quantized(scheme), _x()
    assert is_quantized(model.layer)
    base_out = model(x)
    la.inject(model, METHODS[method]())
    assert torch.allclose(model(x), base_out, atol=1e-5), (model(x) - base_out).abs().max()
    # A training step: finite gradients on the adapter only, and on the input (checkpointing needs them).
    randomize_adapter(model, seed=2)
    xg = x.clone().requires_grad_(True)
    model(xg).pow(2).mean().backward()
    adapter = set(la.adapter_state_dict(model))
    assert adapter and all(k.startswith("layer.adapter.") for k in adapter)
    for n, p in model.named_parameters():
        if n in adapter and p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), n
        else:
            assert p.grad is None, n
    assert xg.grad is not None and torch.isfinite(xg.grad).all()
    # The adapter state names no quantized tensor and loads exactly into a fresh quantized model.
    out = model(x)
    sd = {k: v.clone() for k, v in la.adapter_state_dict(model).items()}
    assert not any(v.dtype in (torch.uint8, torch.int8) for v in sd.values())  # (AdaLoRA keeps a bool rank mask)
    fresh = _quantized(scheme)
    la.inject(fresh, METHODS[method]())
    la.load_adapter_state_dict(fresh, sd)
    assert torch.equal(fresh(x), out)


@pytest.mark.parametrize("method,scheme", CASES)
def test_merge_within_reported_error_and_unmerge(method: str, scheme: str) -> None:
    model, x = _quantized(scheme), _x()
    la.inject(model, METHODS[method]())
    randomize_adapter(model, std=0.05)
    out = model(x)
    twin = copy.deepcopy(model)
    before = dequantized_weight(model.layer, torch.float32)
    la.merge(model)
    errors = la.merge_errors(model)
    assert set(errors) == {"layer"} and errors["layer"] > 0
    bound = errors["layer"] * x.abs().sum(-1, keepdim=True) + 1e-5  # |E x|_i <= max|E| · ||x||_1
    assert ((model(x) - out).abs() <= bound).all(), ((model(x) - out).abs() - bound).max()
    with pytest.raises(la.MergeError, match="keep_original=True"):
        la.unmerge(model)
    with pytest.raises(la.MergeError):
        with la.disabled(model):
            pass
    assert torch.allclose(model(x), out, atol=float(bound.max()))  # the refusals changed nothing
    # keep_original: unmerge puts the quantized weight back bit-exactly.
    la.merge(twin, keep_original=True)
    la.unmerge(twin)
    assert torch.equal(dequantized_weight(twin.layer, torch.float32), before)
    assert torch.allclose(twin(x), out, atol=1e-5)
    with la.disabled(twin):
        assert torch.equal(twin(x), _quantized(scheme)(x))


# eject's dequantization is method-independent (the merge itself is covered above): every scheme once, and the
# kinds of merge (additive, DoRA's rescaling, a rotation, a Hadamard product) on one scheme each.
EJECT_CASES = [("lora", s) for s in SCHEMES] + [("dora", "nf4"), ("oft", "int8"), ("boft", "fp4"), ("loha", "fp4")]


@pytest.mark.parametrize("method,scheme", [pytest.param(m, s, id=f"{m}-{s}") for m, s in EJECT_CASES])
def test_eject_dequantized(method: str, scheme: str) -> None:
    model, x = _quantized(scheme), _x()
    la.inject(model, METHODS[method]())
    randomize_adapter(model, std=0.05)
    out = model(x)
    plain = la.eject(copy.deepcopy(model), merge=True, dtype=torch.float32)
    assert type(plain.layer) is nn.Linear and plain.layer.weight.dtype == torch.float32
    assert torch.allclose(plain(x), out, atol=1e-4), (plain(x) - out).abs().max()
    half = la.eject(copy.deepcopy(model), merge=True, dtype=torch.bfloat16)
    assert half.layer.weight.dtype == torch.bfloat16
    assert torch.allclose(half(x.bfloat16()).float(), out, atol=0.1)
    base = la.eject(model, dtype=torch.float32)  # without merge: the dequantized base
    assert type(base.layer) is nn.Linear
    assert torch.allclose(base(x), _quantized(scheme)(x), atol=1e-5)


@pytest.mark.parametrize("method", ["dora", "oft", "loha"])
def test_gradients_equal_the_dequantized_float_model_and_no_weight_is_kept(method: str) -> None:
    """The adapted quantized layer computes what the same adapter on a float layer holding the dequantized weight
    computes (outputs, input and adapter gradients), and keeps no full-precision weight for backward: saved
    tensors that reach the surrounding hooks (activation checkpointing's) are never weight-sized."""
    model, x = _quantized("nf4"), _x()
    float_model = Net().train()
    with torch.no_grad():
        float_model.layer.weight.copy_(dequantized_weight(model.layer, torch.float32))
        float_model.layer.bias.copy_(model.layer.bias)
    for m in (model, float_model):
        la.inject(m, METHODS[method]())
    randomize_adapter(model, seed=4)
    la.load_adapter_state_dict(float_model, la.adapter_state_dict(model))
    shapes: list[torch.Size] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        shapes.append(t.shape)
        return t

    xq, xf = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yq = model(xq)
    assert shapes and all(s.numel() < IN * OUT for s in shapes), shapes
    yf = float_model(xf)
    assert torch.allclose(yq, yf, atol=1e-5)
    yq.pow(2).sum().backward()
    yf.pow(2).sum().backward()
    assert torch.allclose(xq.grad, xf.grad, atol=1e-4)
    fgrads = {n: p.grad for n, p in float_model.named_parameters() if p.requires_grad}
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.allclose(p.grad, fgrads[n], atol=1e-4), n


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_two_adapters_merged_into_one_quantized_base_unmerge_exactly(scheme: str) -> None:
    # Each merge re-quantizes on top of the previous one; unmerge (and disabled) must walk them back in reverse
    # order to the quantized weight from before the first, and a refusal must leave the model as it was.
    model, x = _quantized(scheme), _x()
    la.inject(model, METHODS["lora"]())
    la.inject(model, METHODS["loha"](), name="b")
    randomize_adapter(model, std=0.05)
    la.set_active(model, ["default", "b"])
    out = model(x)
    before = dequantized_weight(model.layer, torch.float32)
    la.merge(model, keep_original=True)
    merged = model(x)
    assert not torch.equal(dequantized_weight(model.layer, torch.float32), before)
    with la.disabled(model):
        assert torch.equal(dequantized_weight(model.layer, torch.float32), before)
    assert torch.equal(model(x), merged)
    la.unmerge(model)
    assert torch.equal(dequantized_weight(model.layer, torch.float32), before)
    assert torch.allclose(model(x), out, atol=1e-5)
    # Merged in the other order than the model lists them: unmerge still gets back to the first weight.
    la.merge(model, names=["b"], keep_original=True)
    la.merge(model, names=["default"], keep_original=True)
    assert set(la.merge_errors(model)) == {"layer"}
    la.unmerge(model)
    assert torch.equal(dequantized_weight(model.layer, torch.float32), before)
    assert la.merge_errors(model) == {}
    # Only the second merge kept its original: unmerge is refused before anything changes.
    la.merge(model, names=["default"])
    la.merge(model, names=["b"], keep_original=True)
    weight = dequantized_weight(model.layer, torch.float32)
    with pytest.raises(la.MergeError, match="keep_original=True"):
        la.unmerge(model)
    assert torch.equal(dequantized_weight(model.layer, torch.float32), weight)
    assert all(layer.merged for layer in model.layer.adapter.values())
