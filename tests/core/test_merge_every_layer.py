"""``merge`` folds every layer it is asked to, and a failure part-way undoes every layer it had folded.

The layer loop of ``core.inject.merge`` has three kinds of step (a layer already merged is skipped, a quantized
base is merged and re-quantized, a float base is merged in place) and its roll-back one per kind of copy; a step
that ended the loop early instead of going on to the next layer was a surviving mutant (docs/MUTATION.md, seed
23). Truths: every layer's ``merged`` flag, the output of the unmerged model (float: up to fp32 rounding;
quantized: within the re-quantization error ``merge_errors`` reports), and the weights from before the call.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lightning_adapters as la
from lightning_adapters.core.inject import adapter_layers
from tests.helpers import randomize_adapter


class Three(nn.Module):
    """Three layers in a row; ``named_modules`` (the merge order) lists them as written: q1, q2, f."""

    def __init__(self) -> None:
        super().__init__()
        self.q1 = nn.Linear(64, 64)
        self.q2 = nn.Linear(64, 64)
        self.f = nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.f(torch.tanh(self.q2(torch.tanh(self.q1(x)))))


def _model(scheme: str | None) -> Three:
    """q1 and q2 quantized with ``scheme`` (``"pending"``: bitsandbytes ``Linear4bit`` layers built but not yet
    moved to a device, so still holding their float weight, as Lightning's ``BitsandbytesPrecision`` builds them)."""
    torch.manual_seed(0)
    model = Three().train()
    if scheme == "pending":
        bnb = pytest.importorskip("bitsandbytes")
        for name in ("q1", "q2"):
            layer = bnb.nn.Linear4bit(64, 64, quant_type="nf4")
            layer.load_state_dict(getattr(model, name).state_dict())
            setattr(model, name, layer.train())
    elif scheme is not None:
        pytest.importorskip("bitsandbytes")
        la.quantize(model, scheme, skip=["f"])
    return model


QUANTIZED = ["nf4", "int8", "pending"]


def _merged(model: nn.Module) -> dict[tuple[str, str], bool]:
    return {(m, a): layer.merged for m, a, _, layer in adapter_layers(model)}


def _fail_on(monkeypatch: pytest.MonkeyPatch, model: nn.Module, module: str, adapter: str = "default") -> None:
    """Make the merge of one layer raise, as an out-of-memory error would (the merge loop must then roll back)."""
    layer = model.get_submodule(module).adapter[adapter]

    def boom(*args, **kwargs):
        raise RuntimeError("merge failed")

    monkeypatch.setattr(layer, "merge", boom)


def test_merging_more_adapters_goes_past_the_layers_already_merged():
    """``merge(["a", "b"])`` after ``merge("a")``: a's layers come first on every module and are skipped; b's layers
    after them are all merged, and the model computes what both adapters acting unmerged compute."""
    model = _model(None)
    for name in ("a", "b"):
        la.inject(model, la.LoRAConfig(r=2, target_modules=["q1", "q2", "f"]), name=name)
    randomize_adapter(model, std=0.05)
    x = torch.randn(4, 64)
    la.set_active(model, ["a", "b"])
    want = model(x)
    la.merge(model, "a")
    la.merge(model, ["a", "b"])
    assert all(_merged(model).values()), _merged(model)
    torch.testing.assert_close(model(x), want, rtol=1e-4, atol=1e-5)


def test_a_failed_merge_unmerges_every_float_layer_it_had_merged(monkeypatch):
    """Without ``safe`` no copy is kept: the roll-back unmerges each folded layer by subtraction (fp32: up to
    rounding), every one of them, not only the last."""
    model = _model(None)
    la.inject(model, la.LoRAConfig(r=2, target_modules=["q1", "q2", "f"]))
    randomize_adapter(model, std=0.05)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "adapter" not in n}
    _fail_on(monkeypatch, model, "f")
    with pytest.raises(RuntimeError, match="merge failed"):
        la.merge(model)
    assert not any(_merged(model).values()), _merged(model)
    for n, p in model.named_parameters():
        if n in before:
            torch.testing.assert_close(p, before[n], rtol=0, atol=1e-6, msg=n)


@pytest.mark.parametrize("scheme", ["nf4", "int8"])  # a pending layer cannot run its forward before it moves
def test_merge_goes_on_after_a_quantized_base_and_folds_every_layer(scheme):
    """Each layer on its own input: a quantized one moves by at most its reported error, ``|E h|_i <= max|E| ·
    ||h||_1``; the float one after them is folded up to fp32 rounding."""
    model = _model(scheme)
    la.inject(model, la.LoRAConfig(r=2, target_modules=["q1", "q2", "f"]))
    randomize_adapter(model, std=0.05)
    h0 = torch.randn(4, 64)
    with torch.no_grad():
        h1 = torch.tanh(model.q1(h0))
        h2 = torch.tanh(model.q2(h1))
        want = {"q1": model.q1(h0), "q2": model.q2(h1), "f": model.f(h2)}
    f_before = model.f.weight.detach().clone()
    la.merge(model)
    assert all(_merged(model).values()), _merged(model)
    errors = la.merge_errors(model)
    assert set(errors) == {"q1", "q2"}
    assert not torch.equal(model.f.weight, f_before)
    with torch.no_grad():
        for m, h in (("q1", h0), ("q2", h1)):
            bound = errors[m] * h.abs().sum(-1, keepdim=True) + 1e-5
            assert ((model.get_submodule(m)(h) - want[m]).abs() <= bound).all(), m
        torch.testing.assert_close(model.f(h2), want["f"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scheme", QUANTIZED)
def test_a_failed_merge_puts_back_every_quantized_base_it_had_merged(monkeypatch, scheme):
    """The quantized bases merged before the failing layer get their quantized (or, pending, float) weight back
    bit-exactly."""
    from lightning_adapters.core.quant import dequantized_weight

    model = _model(scheme)
    la.inject(model, la.LoRAConfig(r=2, target_modules=["q1", "q2", "f"]))
    randomize_adapter(model, std=0.05)
    before = {m: dequantized_weight(model.get_submodule(m), torch.float32) for m in ("q1", "q2")}
    _fail_on(monkeypatch, model, "f")
    with pytest.raises(RuntimeError, match="merge failed"):
        la.merge(model)
    assert not any(_merged(model).values()), _merged(model)
    for m, w in before.items():
        assert torch.equal(dequantized_weight(model.get_submodule(m), torch.float32), w), m
    assert la.merge_errors(model) == {}


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_a_quantized_merge_that_fails_to_requantize_leaves_the_base_and_the_layer_unmerged(monkeypatch, scheme):
    """``merge_quantized`` on its own (``disabled`` and ``unmerge`` re-merge through it): the layer's merge
    succeeded on the dequantized copy, re-quantizing failed; the base keeps its quantized weight, the layer is not
    merged and no merge is recorded, so a later merge and unmerge work as usual."""
    from lightning_adapters.core import quant_ops
    from lightning_adapters.core.quant import dequantized_weight

    model = _model(scheme)
    la.inject(model, la.LoRAConfig(r=2, target_modules=["q1"]))
    randomize_adapter(model, std=0.05)
    layer = model.q1.adapter["default"]
    before = dequantized_weight(model.q1, torch.float32)

    def boom(*args, **kwargs):
        raise RuntimeError("requantize failed")

    with monkeypatch.context() as patch:
        patch.setattr(quant_ops, "requantize_", boom)
        with pytest.raises(RuntimeError, match="requantize failed"):
            quant_ops.merge_quantized(model.q1, layer, keep_original=True)
    assert layer.merged is False
    assert torch.equal(dequantized_weight(model.q1, torch.float32), before)
    assert la.merge_errors(model) == {}
    la.merge(model, keep_original=True)
    la.unmerge(model)
    assert layer.merged is False and torch.equal(dequantized_weight(model.q1, torch.float32), before)


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_disabled_on_a_merged_quantized_base_merges_it_again_keeping_the_original(scheme):
    """``disabled`` unmerges a ``keep_original`` merge and merges it again on exit, again keeping the original: the
    base inside is the one from before the merge, and ``unmerge`` afterwards is still bit-exact."""
    from lightning_adapters.core.quant import dequantized_weight

    model = _model(scheme)
    la.inject(model, la.LoRAConfig(r=2, target_modules=["q1"]))
    randomize_adapter(model, std=0.05)
    before = dequantized_weight(model.q1, torch.float32)
    la.merge(model, keep_original=True)
    with la.disabled(model):
        assert torch.equal(dequantized_weight(model.q1, torch.float32), before)
    assert model.q1.adapter["default"].merged
    la.unmerge(model)
    assert torch.equal(dequantized_weight(model.q1, torch.float32), before)


def test_a_double_quantized_base_stays_double_quantized_after_a_merge():
    """The re-quantization of a merge keeps the base's settings, its quantized scales (QLoRA's double quantization)
    among them."""
    pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    model = Three().train()
    la.quantize(model, "nf4", skip=["f"], double_quant=True)
    assert model.q1.weight.quant_state.nested
    la.inject(model, la.LoRAConfig(r=2, target_modules=["q1", "q2", "f"]))
    randomize_adapter(model, std=0.05)
    la.merge(model)
    assert model.q1.weight.quant_state.nested and model.q2.weight.quant_state.nested


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_eject_with_merge_undoes_a_kept_quantized_merge_and_merges_in_full_precision(scheme):
    """``eject(merge=True)`` of a model merged with ``keep_original`` puts the quantized weights back first and merges
    into their dequantized float copies: the plain model computes what the unmerged adapted model computed, without
    the re-quantization error of the quantized merge."""
    model = _model(scheme)
    la.inject(model, la.LoRAConfig(r=2, target_modules=["q1", "q2", "f"]))
    randomize_adapter(model, std=0.05)
    x = torch.randn(4, 64)
    with torch.no_grad():
        want = model(x)
    la.merge(model, keep_original=True)
    plain = la.eject(model, merge=True, dtype=torch.float32)
    assert type(plain.q1) is nn.Linear and type(plain.q2) is nn.Linear
    with torch.no_grad():
        assert torch.allclose(plain(x), want, atol=1e-5), (plain(x) - want).abs().max()


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_an_adapted_quantized_base_s_class_says_it_is_quantized(scheme):
    """The adapted class of a quantized base is its own (``AdaptedQuantized<base class>``), also when the float
    class of the same name was made first."""
    model = _model(scheme)
    la.inject(model, la.LoRAConfig(r=2, target_modules=["q1", "f"]))
    base = {"nf4": "Linear4bit", "int8": "Linear8bitLt"}[scheme]
    assert type(model.q1).__name__ == f"AdaptedQuantized{base}" and type(model.f).__name__ == "AdaptedLinear"


def test_a_failed_eject_with_merge_puts_the_quantized_layers_back(monkeypatch):
    """``eject(merge=True, dtype=...)`` swaps the quantized bases for float copies before merging; a merge that
    fails puts the quantized modules themselves back in their slots, and the error is the merge's."""
    model = _model("nf4")
    la.inject(model, la.LoRAConfig(r=2, target_modules=["q1", "q2", "f"]))
    q1, q2 = model.q1, model.q2
    _fail_on(monkeypatch, model, "f")
    with pytest.raises(RuntimeError, match="merge failed"):
        la.eject(model, merge=True, dtype=torch.float32)
    assert model.q1 is q1 and model.q2 is q2


def test_a_merge_updates_the_quantization_state_a_4bit_layer_holds_itself():
    """A bitsandbytes ``Linear4bit`` may hold its quantization state on itself too (``module.quant_state``, which its
    forward falls back on when the weight lost its own, as under FSDP); a merge that re-quantizes replaces both."""
    pytest.importorskip("bitsandbytes")
    model = _model("nf4")
    model.q1.quant_state = model.q1.weight.quant_state
    la.inject(model, la.LoRAConfig(r=2, target_modules=["q1", "q2"]))
    randomize_adapter(model, std=0.05)
    la.merge(model)
    assert model.q1.quant_state is model.q1.weight.quant_state


def test_an_unmerge_puts_back_the_quantization_state_a_4bit_layer_holds_itself():
    """An unmerge of a ``keep_original`` merge puts the kept state back on the weight and, where the layer holds its
    own (``module.quant_state``), there too: the two stay one object."""
    pytest.importorskip("bitsandbytes")
    model = _model("nf4")
    model.q1.quant_state = model.q1.weight.quant_state
    la.inject(model, la.LoRAConfig(r=2, target_modules=["q1", "q2"]))
    randomize_adapter(model, std=0.05)
    la.merge(model, keep_original=True)
    la.unmerge(model)
    assert model.q1.quant_state is not None and model.q1.quant_state is model.q1.weight.quant_state


def test_a_quantized_base_s_stand_in_is_dequantized_to_the_input_s_dtype():
    """The adapter of a quantized base sees its weight in the dtype of the input, not the layer's compute dtype."""
    pytest.importorskip("bitsandbytes")
    from lightning_adapters.core.quant import compute_dtype_of, run_on_stand_in

    model = _model("nf4")
    assert compute_dtype_of(model.q1) != torch.bfloat16
    seen = run_on_stand_in(model.q1, lambda view, x: view.weight.dtype, torch.randn(2, 64, dtype=torch.bfloat16))
    assert seen == torch.bfloat16


def test_a_bitsandbytes_int8_layer_not_yet_on_its_device_reads_as_pending():
    """``Linear8bitLt`` built without fp16 weights holds its float weight in an ``Int8Params`` until it moves to its
    device (as Lightning's ``BitsandbytesPrecision`` builds it): pending, unlike one ``quantize`` made."""
    bnb = pytest.importorskip("bitsandbytes")
    from lightning_adapters.core.quant import _pending

    layer = bnb.nn.Linear8bitLt(64, 64, has_fp16_weights=False)
    assert type(layer.weight).__name__ == "Int8Params" and layer.weight.dtype != torch.int8
    assert _pending(layer)
    model = _model("int8")
    assert model.q1.weight.dtype == torch.int8 and not _pending(model.q1)


def test_a_merged_torchao_nf4_base_stays_frozen():
    """A merge into a torchao NF4 base puts a new quantized ``Parameter`` in its place, frozen like the old one."""
    pytest.importorskip("torchao")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 128), nn.Linear(128, 4))
    la.quantize(model, "torchao_nf4", skip=["1"])
    la.inject(model, la.LoRAConfig(r=2, target_modules=["0", "1"]))
    randomize_adapter(model, std=0.05)
    old = model[0].weight
    la.merge(model)
    assert model[0].weight is not old and not model[0].weight.requires_grad


def test_a_merge_into_a_torchao_int8_base_requantizes_it_to_int8_weight_only():
    """A merge into a torchao int8 weight-only base re-quantizes the merged weight in the same scheme: the output
    matches the adapted model's before the merge within the int8 rounding, and the weight is int8 again."""
    pytest.importorskip("torchao")
    from lightning_adapters.core.quant import quant_scheme

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 128), nn.Linear(128, 4))
    la.quantize(model, "torchao_int8", skip=["1"])
    la.inject(model, la.LoRAConfig(r=2, target_modules=["0", "1"]))
    randomize_adapter(model, std=0.05)
    x = torch.randn(3, 128)
    with torch.no_grad():
        before = model(x)
        la.merge(model)
        after = model(x)
    assert quant_scheme(model[0]) == "torchao_int8" and not model[0].weight.requires_grad
    torch.testing.assert_close(after, before, atol=0.05, rtol=0.05)


def test_a_4bit_weight_repacked_by_an_inference_forward_is_read_in_its_storage_layout():
    """On x86 CPUs with AVX512-BF16, an inference forward of ``Linear4bit`` repacks its weight for a CPU kernel;
    reading the layer's state unpacks it again, to the data it held before (the repacking rounded its scales)."""
    pytest.importorskip("bitsandbytes")
    from lightning_adapters.core.quant import _bnb_4bit_state

    model = _model("nf4").eval()
    layer = model.q1
    data = layer.weight.data.clone()
    layer.support_avx512bf16_for_cpu = True  # as bitsandbytes sets it on such a CPU (quantize turned it off)
    with torch.no_grad():
        layer(torch.randn(2, 64, dtype=torch.bfloat16))
    if not getattr(layer.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("bitsandbytes did not repack the weight on this CPU")
    state = _bnb_4bit_state(layer)
    assert not getattr(state, "packing_format_for_cpu", False) and layer.weight.quant_state is state
    assert torch.equal(layer.weight.data, data)
