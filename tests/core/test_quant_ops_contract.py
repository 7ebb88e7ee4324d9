"""Merging into quantized bases and turning them back into plain layers (``lightning_adapters.core.quant_ops``).

Truths: the closed form of a LoRA merge (``W + (alpha/r)·B·A``, computed here in float32 from the dequantized
weight); ``merge_errors``' definition (the largest ``|re-quantized − merged|`` element); the quantized weight
from before a merge (an unmerge or a refused merge gives it back bit-exactly, and leaves no attribute behind on
the base); and ``eject(dtype=...)``'s promise: every quantized layer, wherever it sits, becomes a plain
``nn.Linear`` holding its dequantized weight, with its bias (or none) and its ``requires_grad`` flags.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lightning_adapters as la
from lightning_adapters.core.inject import adapter_layers
from lightning_adapters.core.quant import dequantized_weight, quant_scheme
from tests.helpers import randomize_adapter

pytest.importorskip("bitsandbytes")


class QF(nn.Module):
    """A float layer ``f`` before a layer ``q`` that gets quantized (``named_modules`` lists ``f`` first)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.f = nn.Linear(64, 64)
        self.q = nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.q(torch.tanh(self.f(x)))


def _qf(scheme: str = "nf4", **kw) -> QF:
    return la.quantize(QF().train(), scheme, skip=["f"], **kw)


def _packed(module: nn.Module) -> torch.Tensor:
    """The quantized storage of a bitsandbytes layer (integers: compared bit-exactly, NaN or not)."""
    return module.weight.data.clone()


def _poison(model: nn.Module, module: str, adapter: str = "default") -> None:
    with torch.no_grad():
        model.get_submodule(module).adapter[adapter].lora_B[0, 0] = float("nan")


# --- merge_quantized -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_a_safe_merge_refuses_a_non_finite_adapter_on_a_quantized_base_and_changes_nothing(scheme):
    model = _qf(scheme)
    la.inject(model, la.LoRAConfig(r=2, target_modules=["q"]))
    randomize_adapter(model, std=0.05)
    _poison(model, "q")
    before = _packed(model.q)
    attrs = set(vars(model.q))
    with pytest.raises(la.MergeError, match=r"merge of 'q' refused: merged weight has \d+ non-finite values"):
        la.merge(model, safe=True)
    assert not model.q.adapter["default"].merged
    assert torch.equal(_packed(model.q), before)
    assert set(vars(model.q)) == attrs and la.merge_errors(model) == {}


def test_disabled_puts_back_a_merge_that_was_made_without_safe():
    """An unsafe merge of non-finite values was accepted; ``disabled`` takes it out inside the block and on exit puts
    back the very same quantized weight, without refusing it then."""
    model = _qf("nf4")
    la.inject(model, la.LoRAConfig(r=2, target_modules=["q"]))
    randomize_adapter(model, std=0.05)
    _poison(model, "q")
    original = _packed(model.q)
    la.merge(model, keep_original=True)
    merged = _packed(model.q)
    with la.disabled(model):
        assert torch.equal(_packed(model.q), original)
    assert model.q.adapter["default"].merged
    assert torch.equal(_packed(model.q), merged)
    la.unmerge(model)
    assert torch.equal(_packed(model.q), original)


def test_a_merge_into_a_base_computing_in_bf16_is_done_in_float32():
    """The merged weight is ``W + s·B·A`` in float32, whatever dtype the base computes in; ``merge_errors`` is the
    largest distance of the re-quantized weight to exactly that."""
    model = _qf("nf4", compute_dtype=torch.bfloat16)
    la.inject(model, la.LoRAConfig(r=2, alpha=4, target_modules=["q"]))
    randomize_adapter(model, std=0.05)
    layer = model.q.adapter["default"]
    want = dequantized_weight(model.q, torch.float32) + 2.0 * (layer.lora_B.detach() @ layer.lora_A.detach())
    la.merge(model)
    got = dequantized_weight(model.q, torch.float32)
    error = la.merge_errors(model)["q"]
    assert 0 < error < 0.1
    assert abs(error - float((got - want).abs().max())) < 1e-6


# --- bookkeeping of merges on a quantized base ---------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_a_kept_merge_and_its_unmerge_leave_the_base_as_it_was(scheme):
    model = _qf(scheme)
    la.inject(model, la.LoRAConfig(r=2, target_modules=["q"]))
    randomize_adapter(model, std=0.05)
    before = _packed(model.q)
    attrs = set(vars(model.q))
    la.merge(model, keep_original=True)
    assert set(la.merge_errors(model)) == {"q"}
    la.unmerge(model)
    assert torch.equal(_packed(model.q), before)
    assert set(vars(model.q)) == attrs and la.merge_errors(model) == {}


def test_a_failed_merge_leaves_no_record_on_the_quantized_base(monkeypatch):
    model = QF()
    model.g = nn.Linear(64, 64)  # after q in the merge order
    la.quantize(model, "nf4", skip=["f", "g"])
    la.inject(model, la.LoRAConfig(r=2, target_modules=["q", "g"]))
    randomize_adapter(model, std=0.05)
    before = _packed(model.q)
    attrs = set(vars(model.q))
    _fail_merge(monkeypatch, model, "g", "default")
    with pytest.raises(RuntimeError, match="merge failed"):
        la.merge(model, keep_original=True)
    assert torch.equal(_packed(model.q), before)
    assert set(vars(model.q)) == attrs and la.merge_errors(model) == {}


def _fail_merge(monkeypatch: pytest.MonkeyPatch, model: nn.Module, module: str, adapter: str) -> None:
    def boom(*args, **kwargs):
        raise RuntimeError("merge failed")

    monkeypatch.setattr(model.get_submodule(module).adapter[adapter], "merge", boom)


def test_a_failed_merge_of_a_second_adapter_keeps_the_first_one_s_kept_weight(monkeypatch):
    """``a`` is merged into ``q`` keeping the original; merging ``b`` (on ``q``, then on ``g``) fails at ``g``. The
    roll-back forgets ``b``'s merge only: ``a`` still unmerges bit-exactly."""
    model = QF()
    model.g = nn.Linear(64, 64)
    la.quantize(model, "nf4", skip=["f", "g"])
    la.inject(model, la.LoRAConfig(r=2, target_modules=["q"]), name="a")
    la.inject(model, la.LoRAConfig(r=2, target_modules=["q", "g"]), name="b")
    randomize_adapter(model, std=0.05)
    la.set_trainable(model, "b")
    randomize_adapter(model, std=0.05, seed=1)
    original = _packed(model.q)
    la.merge(model, "a", keep_original=True)
    after_a = _packed(model.q)
    _fail_merge(monkeypatch, model, "g", "b")
    with pytest.raises(RuntimeError, match="merge failed"):
        la.merge(model, "b", keep_original=True)
    assert torch.equal(_packed(model.q), after_a)
    assert {(m, a): layer.merged for m, a, _, layer in adapter_layers(model)} == {
        ("q", "a"): True,
        ("q", "b"): False,
        ("g", "b"): False,
    }
    assert set(la.merge_errors(model)) == {"q"}
    la.unmerge(model)
    assert torch.equal(_packed(model.q), original)


# --- check_unmergeable ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("call", ["unmerge", "disabled"])
def test_a_merge_without_the_kept_weight_is_refused_naming_the_layer_after_a_float_one(call):
    """The float layer ``f`` comes first and is merged too; the refusal still finds ``q`` and names it, before any
    change."""
    model = _qf("nf4")
    la.inject(model, la.LoRAConfig(r=2, target_modules=["f", "q"]))
    randomize_adapter(model, std=0.05)
    la.merge(model)
    f_weight = model.f.weight.detach().clone()
    q_packed = _packed(model.q)
    with pytest.raises(la.MergeError, match=rf"^{call}: 'q' is a quantized base with the adapter merged"):
        if call == "unmerge":
            la.unmerge(model)
        else:
            with la.disabled(model):
                pass
    assert all(layer.merged for _, _, _, layer in adapter_layers(model))
    assert torch.equal(model.f.weight, f_weight) and torch.equal(_packed(model.q), q_packed)


def test_unmerge_quantized_itself_refuses_a_merge_whose_weight_was_not_kept():
    """Called directly (``unmerge``, ``disabled`` and ``eject`` check every layer first), it refuses before any change,
    naming the layer it was given."""
    from lightning_adapters.core.quant_ops import merge_quantized, unmerge_quantized

    model = _qf("nf4")
    la.inject(model, la.LoRAConfig(r=2, target_modules=["q"]))
    randomize_adapter(model, std=0.05)
    layer = model.q.adapter["default"]
    merge_quantized(model.q, layer, keep_original=False)
    merged = _packed(model.q)
    with pytest.raises(la.MergeError, match=r"^unmerge: 'q' is a quantized base .*keep_original=True"):
        unmerge_quantized(model.q, layer, "q")
    assert layer.merged and torch.equal(_packed(model.q), merged)


# --- dequantize_model (eject with dtype) ---------------------------------------------------------------------------


class Tree(nn.Module):
    """A quantized layer nested two levels down, and one without bias shared by two attributes."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.block = nn.Sequential(nn.Sequential(nn.Linear(64, 64)), nn.Tanh())
        self.shared = nn.Linear(64, 64, bias=False)
        self.again = self.shared

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.again(torch.tanh(self.shared(self.block(x))))


@pytest.mark.parametrize("merge", [False, True])
def test_eject_with_a_dtype_replaces_nested_and_shared_quantized_layers_by_plain_ones(merge):
    plain_keys = Tree().state_dict().keys()
    model = la.quantize(Tree(), "nf4", skip=[])
    assert model.again is model.shared and quant_scheme(model.block[0][0]) == "nf4"
    la.inject(model, la.LoRAConfig(r=2, target_modules=["block.0.0"]))
    randomize_adapter(model, std=0.05)
    x = torch.randn(3, 64)
    with torch.no_grad():
        if merge:
            want = model(x)
        else:
            with la.disabled(model):
                want = model(x)
    weights = {n: dequantized_weight(model.get_submodule(n), torch.float32) for n in ("block.0.0", "shared")}
    rng = torch.random.get_rng_state()
    out = la.eject(model, merge=merge, dtype=torch.float32)
    assert torch.equal(torch.random.get_rng_state(), rng)  # nothing was initialised at random
    assert type(out.block[0][0]) is nn.Linear and type(out.shared) is nn.Linear and out.again is out.shared
    assert out.shared.bias is None and out.state_dict().keys() == plain_keys
    assert torch.equal(out.shared.weight, weights["shared"])
    if not merge:
        assert torch.equal(out.block[0][0].weight, weights["block.0.0"])
    with torch.no_grad():
        torch.testing.assert_close(out(x), want, atol=1e-5, rtol=1e-5)


def test_eject_with_a_dtype_keeps_the_flags_of_quantized_layers_outside_the_adapted_part():
    """Adapters injected into ``outer[0]`` only, ``eject`` called on ``outer``: the quantized layer beside them is
    made plain too, frozen as it was (its bias frozen by the user, its weight by the quantization)."""
    torch.manual_seed(0)
    outer = nn.Sequential(nn.Sequential(nn.Linear(64, 64)), nn.Linear(64, 64))
    la.quantize(outer, "nf4", skip=[])
    outer[1].bias.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in outer[1].named_parameters()}
    assert flags == {"weight": False, "bias": False}
    la.inject(outer[0], la.LoRAConfig(r=2, target_modules=["0"]))
    weight = dequantized_weight(outer[1], torch.float32)
    la.eject(outer, merge=True, dtype=torch.float32)
    assert type(outer[1]) is nn.Linear and type(outer[0][0]) is nn.Linear
    assert {n: p.requires_grad for n, p in outer[1].named_parameters()} == flags
    assert torch.equal(outer[1].weight, weight)
    trainable_side = nn.Sequential(nn.Sequential(nn.Linear(64, 64)), nn.Linear(64, 64))
    la.quantize(trainable_side, "nf4", skip=[])
    assert trainable_side[1].bias.requires_grad
    la.inject(trainable_side[0], la.LoRAConfig(r=2, target_modules=["0"]))
    la.eject(trainable_side, merge=True, dtype=torch.float32)
    assert trainable_side[1].bias.requires_grad and not trainable_side[1].weight.requires_grad


# --- forget_hf_quantization ----------------------------------------------------------------------------------------


def _hf_quantized_llama() -> nn.Module:
    """A tiny Llama quantized to NF4 and marked as transformers marks a model it loaded 4-bit (its quantizer, the
    config's ``quantization_config``, ``is_quantized``)."""
    from transformers import BitsAndBytesConfig
    from transformers.quantizers import AutoHfQuantizer

    from tests.helpers import tiny_llama

    model = la.quantize(tiny_llama(), "nf4")
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    model.hf_quantizer = AutoHfQuantizer.from_config(config)
    model.config.quantization_config = config
    model.is_quantized = True
    la.inject(model, la.LoRAConfig(r=2, target_modules=["q_proj", "v_proj"]))
    return model


def test_eject_to_a_plain_dtype_drops_transformers_record_of_the_quantization():
    """Once no layer is quantized, ``save_pretrained`` must not write a ``quantization_config``."""
    model = _hf_quantized_llama()
    plain = la.eject(model, merge=True, dtype=torch.float32)
    assert not any(quant_scheme(m) for m in plain.modules())
    assert not hasattr(plain, "hf_quantizer") and not hasattr(plain.config, "quantization_config")
    assert plain.is_quantized is False
    assert "quantization_config" not in plain.config.to_dict()


def test_eject_that_keeps_the_layers_quantized_keeps_transformers_record():
    model = _hf_quantized_llama()
    quantizer = model.hf_quantizer
    kept = la.eject(model, merge=True)
    assert any(quant_scheme(m) for m in kept.modules())
    assert kept.hf_quantizer is quantizer and kept.is_quantized is True
    assert kept.config.quantization_config.load_in_4bit


def test_transformers_record_stays_while_a_layer_is_still_quantized():
    from lightning_adapters.core.quant_ops import forget_hf_quantization

    model = _hf_quantized_llama()
    quantizer = model.hf_quantizer
    forget_hf_quantization(model)
    assert model.hf_quantizer is quantizer and model.is_quantized is True
    assert model.config.quantization_config.load_in_4bit
