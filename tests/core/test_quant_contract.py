"""``core.quant`` on its own: what each of its functions promises about a quantized base.

Truths: the quantizers themselves (bitsandbytes quantizing a weight as its layer does, torchao's int8 weight-only
config, torchao's NF4 layout), bitsandbytes' exact dequantizing kernel, the float computation with the dequantized
weight, the definition of the error ``requantize_`` returns, and the FSDP2 rules listed in ``fsdp2_kept_whole``'s
docstring. Layers are small and every random draw is seeded.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightning_adapters as la
from lightning_adapters.core import quant
from lightning_adapters.core.quant import (
    QuantizedWeight,
    base_linear,
    compute_dtype_of,
    dequantized_weight,
    fsdp2_kept_whole,
    quant_scheme,
    requantize_,
    run_on_stand_in,
    stand_in,
)
from lightning_adapters.errors import UnsupportedLayerError

bnb = pytest.importorskip("bitsandbytes")
pytest.importorskip("torchao")


def _linear(out_f: int = 32, in_f: int = 64, bias: bool = True, dtype: torch.dtype = torch.float32) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(in_f, out_f, bias=bias).to(dtype)


def _quantized(scheme: str, out_f: int = 32, in_f: int = 64, bias: bool = True, dtype=torch.float32, **kw):
    """One ``lightning_adapters.quantize`` layer (bitsandbytes layers replace the Linear, torchao ones keep it)."""
    model = la.quantize(nn.Sequential(_linear(out_f, in_f, bias, dtype)), scheme, skip=[], **kw)
    return model[0]


def _bnb_4bit_layer(weight: torch.Tensor, bias: torch.Tensor | None = None, quant_type: str = "nf4") -> nn.Module:
    """A ``Linear4bit`` built as a user or a loader builds it: bitsandbytes' own defaults (no compute dtype, its
    bf16-packed CPU kernel allowed), quantized by the move to its device."""
    out_f, in_f = weight.shape
    layer = bnb.nn.Linear4bit(in_f, out_f, bias=bias is not None, quant_type=quant_type, device="meta")
    layer.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, quant_type=quant_type, module=layer)
    layer.bias = None if bias is None else nn.Parameter(bias.clone())
    return layer.to("cpu")


def _nf4(shape: tuple[int, int], block: int, scaler_block: int, dtype: torch.dtype = torch.float32) -> nn.Linear:
    """An ``nn.Linear`` whose weight is a torchao ``NF4Tensor`` (as torchtune builds QLoRA bases)."""
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

    layer = _linear(*shape, bias=False, dtype=dtype)
    layer.weight = nn.Parameter(to_nf4(layer.weight.detach(), block, scaler_block), requires_grad=False)
    return layer


# ------------------------------------------------------------------------------------------------------------
# Which weights FSDP2 must keep whole


class _Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(64, elementwise_affine=False)  # a "weight" entry that is None
        self.act = nn.ReLU()  # no weight at all
        self.bnb4 = _quantized("nf4")
        self.bnb8 = _quantized("int8")
        self.ao_int8 = _quantized("torchao_int8")
        self.plain = _linear()
        # NF4 pieces (rows, 4-bit bytes, block scales, scale-of-scales) per shape:
        self.nf4_even = _nf4((64, 32), 64, 16)  # 64, 1024, 32, 2: splits over 2, not over 3 (rows)
        self.nf4_scales_odd = _nf4((64, 16), 64, 16)  # 64, 512, 16, 1: one scale-of-scales
        self.nf4_rows_odd = _nf4((33, 64), 64, 11)  # 33, 1056, 33, 3: not over 2; over 3, though 64 columns


@pytest.mark.parametrize(
    "mesh, kept",
    [
        (1, {"bnb4", "bnb8", "ao_int8", "nf4_even", "nf4_scales_odd", "nf4_rows_odd"}),
        (2, {"bnb4", "bnb8", "ao_int8", "nf4_scales_odd", "nf4_rows_odd"}),
        (3, {"bnb4", "bnb8", "ao_int8", "nf4_even", "nf4_scales_odd"}),
    ],
)
def test_fsdp2_keeps_whole_exactly_the_quantized_weights_it_cannot_shard(mesh, kept):
    """bitsandbytes weights and torchao int8 always; NF4 on a one-rank mesh, or when its rows or any of its three
    tensors do not split evenly over the mesh (the columns do not matter); float weights never."""
    model = _Mixed()
    got = fsdp2_kept_whole(model, mesh)
    names = {n for n, m in model.named_children() if getattr(m, "weight", None) is not None and m.weight in got}
    assert names == kept
    assert len(got) == len(kept)  # nothing else (no None, no float weight)


# ------------------------------------------------------------------------------------------------------------
# Which scheme a layer reads as, and in which dtype it computes


def test_a_torchao_weight_of_another_scheme_is_refused_naming_it_and_the_supported_ones():
    from torchao.quantization import Float8WeightOnlyConfig, quantize_

    layer = _linear(dtype=torch.bfloat16)
    quantize_(layer, Float8WeightOnlyConfig())
    with pytest.raises(UnsupportedLayerError, match=r"Float8Tensor.*NF4Tensor.*Int8WeightOnlyConfig"):
        quant_scheme(layer)


def _int8_with_activations(kind: str) -> nn.Linear:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    from torchao.quantization.granularity import PerRow

    layer = _linear()
    if kind == "dynamic":
        quantize_(layer, Int8DynamicActivationInt8WeightConfig())
    else:  # a weight-only Int8Tensor whose input is scaled first (as SmoothQuant-style flows build it)
        w = type(_quantized("torchao_int8").weight).from_hp(
            layer.weight.detach(), PerRow(), act_pre_scale=torch.ones(64)
        )
        layer.weight = nn.Parameter(w, requires_grad=False)
    return layer


@pytest.mark.parametrize("kind", ["dynamic", "pre-scaled"])
def test_a_torchao_int8_weight_that_also_quantizes_or_scales_activations_is_refused(kind):
    """Not int8 weight-only: a merge would re-quantize it weight-only and drop what it does to the input."""
    layer = _int8_with_activations(kind)
    assert layer.weight.qdata.dtype == torch.int8
    with pytest.raises(UnsupportedLayerError, match=r"Int8Tensor.*Int8WeightOnlyConfig"):
        quant_scheme(layer)


def test_a_torchao_affine_tensor_holding_no_int8_data_reads_as_another_scheme():
    """torchao's older ``AffineQuantizedTensor`` keeps its values in ``tensor_impl`` (and the newer one in
    ``qdata``); one with neither is not int8 weight-only."""
    from lightning_adapters.core.quant import _torchao_kind

    weight = type("AffineQuantizedTensor", (), {"__module__": "torchao.dtypes.affine_quantized_tensor"})()
    weight.dtype = torch.bfloat16
    assert _torchao_kind(weight) == "other"


def test_a_4bit_layer_without_a_compute_dtype_computes_in_the_dtype_it_quantized():
    """bitsandbytes builds ``Linear4bit`` with ``compute_dtype=None``; its quantization state records the dtype of
    the weight it quantized (bf16 here), which is the dtype the layer computes in until its first forward."""
    layer = _bnb_4bit_layer(_linear(dtype=torch.bfloat16).weight.detach())
    assert layer.compute_dtype is None
    assert compute_dtype_of(layer) == torch.bfloat16
    assert dequantized_weight(layer).dtype == torch.bfloat16


@pytest.mark.parametrize("bias", [True, False])
def test_an_int8_layer_computes_in_its_bias_dtype_else_float32(bias):
    layer = _quantized("int8", bias=bias, dtype=torch.bfloat16)
    assert compute_dtype_of(layer) == (torch.bfloat16 if bias else torch.float32)


def test_a_pending_layer_s_float_weight_is_read_in_the_dtype_asked_and_as_a_copy():
    layer = bnb.nn.Linear4bit(64, 32, bias=False, quant_type="nf4")
    w = dequantized_weight(layer, torch.bfloat16)
    assert w.dtype == torch.bfloat16 and torch.equal(w, layer.weight.data.to(torch.bfloat16))
    w.fill_(1.0)
    assert not torch.equal(layer.weight.data, torch.ones_like(layer.weight.data))


# ------------------------------------------------------------------------------------------------------------
# Re-quantizing a merged weight


def _nudge(*shape: int) -> torch.Tensor:
    """A small change to a weight, as a merge makes."""
    return 0.01 * torch.randn(shape, generator=torch.Generator().manual_seed(1))


def _state_settings(layer: nn.Module) -> tuple:
    s = layer.weight.quant_state
    return s.blocksize, s.nested, s.quant_type, s.dtype, layer.weight.data.dtype


def _bf16_storage() -> nn.Module:
    """4-bit data stored as bf16 (what FSDP-QLoRA builds, so the weight shards like the bf16 parameters)."""
    layer = bnb.nn.Linear4bit(64, 32, bias=False, quant_type="nf4", quant_storage=torch.bfloat16, device="meta")
    layer.weight = bnb.nn.Params4bit(
        _linear().weight.detach(), requires_grad=False, quant_type="nf4", quant_storage=torch.bfloat16, module=layer
    )
    return layer.to("cpu")


FOUR_BIT = {
    "nf4-block128": lambda: _quantized("nf4", blocksize=128),
    "fp4-block32": lambda: _quantized("fp4", blocksize=32),
    "nf4-double": lambda: _quantized("nf4", double_quant=True),
    "nf4-bf16-weight": lambda: _quantized("nf4", dtype=torch.bfloat16),
    "nf4-bf16-compute": lambda: _quantized("nf4", compute_dtype=torch.bfloat16),
    "nf4-bf16-storage": _bf16_storage,
}


@pytest.mark.parametrize("case", list(FOUR_BIT))
def test_requantizing_a_4bit_layer_keeps_its_settings_and_reports_the_error_it_adds(case):
    """``requantize_`` quantizes with the layer's own block size, type, double quantization, dtype and storage dtype
    (its dequantized weight re-quantizes to itself), and returns ``max |dequantized_weight(layer) − w|`` measured in
    float32, whatever the layer computes in."""
    layer = FOUR_BIT[case]()
    scheme = layer.weight.quant_type
    settings = _state_settings(layer)
    w0 = dequantized_weight(layer, torch.float32)
    assert requantize_(layer, w0) <= 1e-4
    assert _state_settings(layer) == settings
    assert quant_scheme(layer) == scheme
    torch.testing.assert_close(dequantized_weight(layer, torch.float32), w0, rtol=0, atol=1e-4)
    w = w0 + _nudge(*w0.shape)
    error = requantize_(layer, w)
    assert _state_settings(layer) == settings
    assert error == (dequantized_weight(layer, torch.float32) - w).abs().max().item()
    assert error > 0


@pytest.mark.parametrize("forward_first", [False, True], ids=["scales-on-weight", "scales-on-state"])
def test_requantizing_an_int8_layer_gives_what_bitsandbytes_makes_of_that_weight(forward_first):
    """Rows absmax-scaled from the fp16 weight, as ``Int8Params`` quantizes; the scales go where the layer keeps
    them (on the weight until its first forward moves them to its state) and the layer computes with them."""
    layer = _quantized("int8")
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(2))
    if forward_first:
        with torch.no_grad():
            layer(x)
        assert layer.weight.SCB is None and layer.state.SCB is not None
    w = dequantized_weight(layer, torch.float32) + _nudge(32, 64)
    error = requantize_(layer, w)
    fresh = nn.Linear(64, 32)
    with torch.no_grad():
        fresh.weight.copy_(w)
        fresh.bias.copy_(layer.bias)
    want = la.quantize(nn.Sequential(fresh), "int8", skip=[])[0]
    assert torch.equal(layer.weight.data, want.weight.data)
    assert torch.equal(quant._int8_scales(layer), want.weight.SCB)
    assert error == (dequantized_weight(want, torch.float32) - w).abs().max().item()
    layer.train(), want.train()
    torch.testing.assert_close(layer(x), want(x), rtol=0, atol=0)


def test_requantizing_a_torchao_int8_layer_gives_torchao_s_own_int8_weight_in_the_layer_s_dtype():
    """A bf16, non-square layer: the new weight is torchao's int8 weight-only quantization of the merged weight
    cast to bf16, still bf16 and (out, in)."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    layer = _quantized("torchao_int8", out_f=16, in_f=64, dtype=torch.bfloat16)
    w = dequantized_weight(layer, torch.float32) + _nudge(16, 64)
    error = requantize_(layer, w)
    want = nn.Linear(64, 16, bias=False, dtype=torch.bfloat16)
    with torch.no_grad():
        want.weight.copy_(w)
    quantize_(want, Int8WeightOnlyConfig())
    assert quant_scheme(layer) == "torchao_int8" and not layer.weight.requires_grad
    assert layer.weight.dtype == torch.bfloat16 and layer.weight.shape == (16, 64)
    assert torch.equal(layer.weight.dequantize(), want.weight.dequantize())
    assert error == (want.weight.dequantize().float() - w).abs().max().item()


def test_requantizing_a_torchao_nf4_layer_keeps_its_blocks_and_dtype():
    """Blocks of 64 values, 16 scales per scale-of-scales, bf16 (not ``quantize``'s defaults): the new frozen weight is
    torchao's own NF4 of the merged weight cast to bf16, in those blocks."""
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

    layer = _nf4((64, 32), 64, 16, dtype=torch.bfloat16)
    w = dequantized_weight(layer, torch.float32) + _nudge(64, 32)
    error = requantize_(layer, w)
    new = layer.weight
    assert type(new).__name__ == "NF4Tensor" and not new.requires_grad
    assert (new.block_size, new.scaler_block_size, new.dtype) == (64, 16, torch.bfloat16)
    want = to_nf4(w.to(torch.bfloat16), 64, 16).get_original_weight()
    assert torch.equal(new.get_original_weight(), want)
    assert error == (want.float() - w).abs().max().item()


@pytest.mark.parametrize("granularity", ["per-tensor", "per-group"])
def test_requantizing_a_torchao_int8_layer_keeps_its_blocks(granularity):
    """One scale for the whole weight, or one per 16 columns: the merged weight is quantized in the same blocks."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerGroup, PerTensor

    config = Int8WeightOnlyConfig(granularity=PerTensor() if granularity == "per-tensor" else PerGroup(16))
    layer = _linear(bias=False)
    quantize_(layer, config)
    block = list(layer.weight.block_size)
    assert block != [1, 64]
    w = dequantized_weight(layer, torch.float32) + _nudge(32, 64)
    requantize_(layer, w)
    want = _linear(bias=False)
    with torch.no_grad():
        want.weight.copy_(w)
    quantize_(want, config)
    assert list(layer.weight.block_size) == block
    assert torch.equal(layer.weight.dequantize(), want.weight.dequantize())


@pytest.mark.parametrize("granularity", ["per-row", "per-tensor"])
def test_requantizing_a_torchao_int8_layer_ignores_a_default_device_context(granularity):
    """Merging inside ``with torch.device("meta"):`` (a user building the next model there): the layer's weight is
    still requantized on its own (CPU) device, as torchao quantizes the merged weight outside the context."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerRow, PerTensor

    config = Int8WeightOnlyConfig(granularity=PerTensor() if granularity == "per-tensor" else PerRow())
    layer = _linear(out_f=16, bias=False, dtype=torch.bfloat16)
    quantize_(layer, config)
    w = dequantized_weight(layer, torch.float32) + _nudge(16, 64)
    with torch.device("meta"):
        error = requantize_(layer, w)
    want = _linear(out_f=16, bias=False, dtype=torch.bfloat16)
    with torch.no_grad():
        want.weight.copy_(w)
    quantize_(want, config)
    assert layer.weight.device.type == "cpu" and quant_scheme(layer) == "torchao_int8"
    assert torch.equal(layer.weight.dequantize(), want.weight.dequantize())
    assert error == (want.weight.dequantize().float() - w).abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_requantizing_a_pending_layer_stores_the_weight_in_its_own_dtype_and_adds_no_quantization_error(dtype):
    layer = bnb.nn.Linear4bit(64, 32, bias=False, quant_type="nf4").to(dtype)
    assert quant._pending(layer) and layer.weight.dtype == dtype
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    assert requantize_(layer, w) == 0.0
    assert layer.weight.dtype == dtype and torch.equal(layer.weight.data, w.to(dtype))


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_requantizing_a_layer_without_outputs_adds_no_error(scheme):
    layer = _quantized(scheme, out_f=0)
    assert requantize_(layer, torch.zeros(0, 64)) == 0.0


# ------------------------------------------------------------------------------------------------------------
# bitsandbytes' 4-bit storage layout and quantization state


def test_a_copy_of_a_4bit_layer_that_ran_its_packed_cpu_kernel_reads_the_same_weight():
    """``copy.deepcopy`` (a reference model) gives the copy's weight and the copy's layer two separate states; an
    inference forward of the copy on an AVX512-BF16 CPU repacks the weight's, not the layer's. Reading the copy
    unpacks it: the weight of the original, up to the rounding of its scales that the repacking did."""
    original = _bnb_4bit_layer(_linear().weight.detach())
    w = bnb.functional.dequantize_4bit(original.weight.data, original.weight.quant_state)
    twin = copy.deepcopy(original).eval()
    with torch.no_grad():
        twin(torch.randn(2, 64))
    if not getattr(twin.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("bitsandbytes did not repack the weight on this CPU")
    assert twin.quant_state is not twin.weight.quant_state
    torch.testing.assert_close(dequantized_weight(twin, torch.float32), w, rtol=0, atol=1e-3)


def test_a_4bit_weight_that_lost_its_state_reads_it_from_the_layer():
    """As bitsandbytes' forward does (FSDP replaces the weight's ``Parameter``, the layer still holds the state)."""
    layer = _quantized("nf4")
    state = layer.weight.quant_state
    w = dequantized_weight(layer, torch.float32)
    layer.quant_state, layer.weight.quant_state = state, None
    torch.testing.assert_close(dequantized_weight(layer, torch.float32), w, rtol=0, atol=0)
    assert layer.weight.quant_state is state


def test_a_4bit_weight_never_quantized_is_refused_saying_how_to_quantize_it():
    layer = _quantized("nf4")
    layer.quant_state = layer.weight.quant_state = None
    with pytest.raises(UnsupportedLayerError, match=r"never quantized.*move it to its device"):
        dequantized_weight(layer)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_the_stand_in_of_a_4bit_layer_keeps_its_exact_kernel_for_inference(quant_type):
    """A ``Linear4bit`` as bitsandbytes builds it would repack its weight for the bf16 CPU kernel at its first
    inference forward; once a stand-in is made of it, the layer's own forward computes with the exact weight."""
    layer = _bnb_4bit_layer(_linear().weight.detach(), quant_type=quant_type).eval()
    w = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    view = stand_in(layer)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y = layer(x)
    torch.testing.assert_close(y, x @ w.t(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(view.weight, w, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------------------
# Keeping and restoring a quantized weight


def _int8_after_a_forward() -> nn.Module:
    layer = _quantized("int8")
    with torch.no_grad():
        layer(torch.randn(2, 64))  # bitsandbytes moves the scales from the weight to the layer's state
    return layer


KEPT = {
    "pending": lambda: bnb.nn.Linear4bit(64, 32, quant_type="nf4"),
    "nf4": lambda: _quantized("nf4"),
    "fp4": lambda: _quantized("fp4"),
    "int8": lambda: _quantized("int8"),
    "int8-after-forward": _int8_after_a_forward,
    "torchao_nf4": lambda: _nf4((32, 64), 64, 16),
    "torchao_int8": lambda: _quantized("torchao_int8"),
}


@pytest.mark.parametrize("case", list(KEPT))
def test_a_kept_weight_is_put_back_bit_exactly_after_a_requantization(case):
    """``QuantizedWeight.of`` before a merge's ``requantize_``, ``restore`` after: the dequantized weight and the
    layer's own output are those from before, for every scheme (and, pending, the float weight itself)."""
    layer = KEPT[case]()
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(2))
    w0 = dequantized_weight(layer, torch.float32)
    with torch.no_grad():  # a copy of a bitsandbytes int8 layer: its forward would move its scales
        y0 = None if case == "pending" else (copy.deepcopy(layer) if case == "int8" else layer)(x)
    kept = QuantizedWeight.of(layer)
    requantize_(layer, w0 + _nudge(32, 64))
    assert not torch.equal(dequantized_weight(layer, torch.float32), w0)
    kept.restore(layer)
    assert torch.equal(dequantized_weight(layer, torch.float32), w0)
    if y0 is not None:
        with torch.no_grad():
            assert torch.equal(layer(x), y0)


@pytest.mark.parametrize("double_quant", [False, True])
def test_a_kept_4bit_weight_is_a_copy_the_layer_s_later_changes_do_not_reach(double_quant):
    """``QuantizedWeight.of`` then anything written into the layer's state in place (its scales, the scales of its
    scales): ``restore`` puts back the weight from the time of the copy."""
    layer = _quantized("nf4", double_quant=double_quant)
    w = dequantized_weight(layer, torch.float32)
    kept = QuantizedWeight.of(layer)
    state = layer.weight.quant_state
    state.absmax.add_(1)
    if double_quant:
        state.state2.absmax.mul_(2)
        state.offset.add_(1)
    layer.weight.data.zero_()
    assert not torch.equal(dequantized_weight(layer, torch.float32), w)
    kept.restore(layer)
    assert torch.equal(dequantized_weight(layer, torch.float32), w)


# ------------------------------------------------------------------------------------------------------------
# The base term of a method


def test_base_linear_without_the_bias_on_the_quantized_kernel():
    """Inference (no gradient to the input): the quantized layer's own kernel, less its bias when asked; a base
    without a bias gives the same with or without."""
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(2))
    for bias in (True, False):
        model = nn.Sequential(_quantized("nf4", bias=bias))
        la.inject(model, la.LoRAConfig(r=2, target_modules=["0"]))  # gives the layer its own forward to call
        layer = model[0]
        w = dequantized_weight(layer, torch.float32)
        view = stand_in(layer, torch.float32)
        with torch.no_grad():
            got = base_linear(view, x, with_bias=False)
            torch.testing.assert_close(got, x @ w.t(), rtol=1e-5, atol=1e-5)
            want = x @ w.t() + (layer.bias if bias else 0)
            torch.testing.assert_close(base_linear(view, x), want, rtol=1e-5, atol=1e-5)


def test_base_linear_without_the_bias_keeps_the_input_dtype_of_the_quantized_kernel():
    """A bf16 input to a layer computing in float32: its own forward returns bf16 (and has made its bias float32);
    the product without the bias is bf16 too, as DoRA's ``W x`` term expects."""
    model = nn.Sequential(_quantized("nf4"))
    la.inject(model, la.LoRAConfig(r=2, target_modules=["0"]))
    layer = model[0]
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    view = stand_in(layer, torch.bfloat16)
    with torch.no_grad():
        got = base_linear(view, x, with_bias=False)
    assert got.dtype == torch.bfloat16
    want = x.float() @ dequantized_weight(layer, torch.float32).t()
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)


def test_base_linear_in_training_casts_the_float32_bias_to_the_compute_dtype():
    """A 4-bit base computing in bf16 keeps a float32 bias until its own forward casts it; a method's training
    product (the input needs its gradient) adds it in the input's dtype, as that forward does."""
    layer = _quantized("nf4", compute_dtype=torch.bfloat16)
    assert layer.bias.dtype == torch.float32
    view = stand_in(layer, torch.bfloat16)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16).requires_grad_(True)
    out = base_linear(view, x)
    w = dequantized_weight(layer, torch.bfloat16)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, F.linear(x, w, layer.bias.to(torch.bfloat16)))
    (gx,) = torch.autograd.grad(out.float().sum(), x)
    torch.testing.assert_close(gx, torch.ones(3, 32, dtype=torch.bfloat16) @ w)
    torch.testing.assert_close(base_linear(view, x, with_bias=False), F.linear(x, w))


# ------------------------------------------------------------------------------------------------------------
# Running a method on the stand-in


def test_run_on_stand_in_takes_its_input_by_keyword_and_then_uses_the_compute_dtype():
    layer = _quantized("nf4", compute_dtype=torch.bfloat16)
    x = torch.randn(3, 64)
    got = run_on_stand_in(layer, lambda view, x=None: (view.weight.dtype, F.linear(x, view.weight.float())), x=x)
    assert got[0] == torch.bfloat16
    torch.testing.assert_close(got[1], x @ dequantized_weight(layer, torch.bfloat16).float().t())


def test_run_on_stand_in_with_integer_input_uses_the_compute_dtype():
    layer = _quantized("nf4")
    ids = torch.tensor([1, 2, 3])
    assert run_on_stand_in(layer, lambda view, i: view.weight.dtype, ids) == torch.float32


def test_backward_rebuilds_each_saved_slice_of_the_weight_from_one_dequantization(monkeypatch):
    """Two slices of the weight saved in forward (the second one starts inside it): backward hands each the right
    values, dequantizing the base once for both; the gradient is that of the float computation."""
    layer = _quantized("nf4")
    w = dequantized_weight(layer, torch.float32)

    def fn(view, x):
        return torch.cat([F.linear(x, view.weight[:5]), F.linear(x, view.weight[5:])], dim=-1)

    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(2), requires_grad=True)
    y = run_on_stand_in(layer, fn, x)
    calls = []
    real = quant.dequantized_weight
    monkeypatch.setattr(quant, "dequantized_weight", lambda *a, **k: calls.append(1) or real(*a, **k))
    g = torch.randn(3, 32, generator=torch.Generator().manual_seed(3))
    (gx,) = torch.autograd.grad(y, x, g)
    assert len(calls) == 1
    torch.testing.assert_close(y, x @ w.t())
    torch.testing.assert_close(gx, g @ w)


def test_backward_rebuilds_the_saved_weight_in_the_dtype_it_was_saved_in():
    """A bf16 input to a layer computing in float32: the stand-in's weight is bf16, and so is the weight backward
    rebuilds (the input's gradient is the bf16 product)."""
    layer = _quantized("nf4")
    w = dequantized_weight(layer, torch.bfloat16)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16).requires_grad_(True)
    y = run_on_stand_in(layer, lambda view, x: F.linear(x, view.weight), x)
    g = torch.randn(3, 32, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    (gx,) = torch.autograd.grad(y, x, g)
    assert gx.dtype == torch.bfloat16
    torch.testing.assert_close(gx, g @ w, rtol=0, atol=0)


@pytest.mark.parametrize("grad_mode", [True, False])
@pytest.mark.parametrize("x_requires_grad", [True, False])
def test_the_quantized_kernel_runs_unless_a_gradient_must_reach_the_input(grad_mode, x_requires_grad):
    from lightning_adapters.core.quant import runs_own_kernel

    layer = _quantized("nf4")
    x = torch.randn(2, 64, requires_grad=x_requires_grad)
    with torch.set_grad_enabled(grad_mode):
        assert runs_own_kernel(stand_in(layer), x) is not (grad_mode and x_requires_grad)
        assert runs_own_kernel(_linear(), x) is False  # a float base has no quantized kernel


@pytest.mark.parametrize("training", [True, False])
def test_an_int8_layer_in_eval_mode_runs_its_own_kernel_even_for_an_input_needing_its_gradient(training):
    """bitsandbytes' int8 inference product also quantizes the input, so it is not the dequantized product; its own
    Function differentiates it. In training its product is the dequantized one, which the methods compute."""
    from lightning_adapters.core.quant import runs_own_kernel

    torch.manual_seed(0)
    model = la.quantize(nn.Sequential(nn.Linear(64, 32)), "int8", skip=[])
    with torch.no_grad():
        plain = model[0].train(training)(torch.randn(2, 64, generator=torch.Generator().manual_seed(1)))
    la.inject(model, la.LoRAConfig(r=2, target_modules=["0"]))
    layer = model[0].train(training)
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    assert runs_own_kernel(stand_in(layer), x) is not training
    y = base_linear(stand_in(layer), x)
    (gx,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(y, plain, rtol=0, atol=0 if not training else 1e-6)
    w = dequantized_weight(layer, torch.float32)
    torch.testing.assert_close(gx, torch.ones(2, 32) @ w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "weight_dtype,compute_dtype,other",
    [
        (torch.float32, None, False),
        (torch.float32, torch.float32, False),
        (torch.float32, torch.bfloat16, True),
        (torch.float32, torch.float16, True),
        (torch.bfloat16, torch.float32, True),  # the kernel dequantizes straight into float32, not through bf16
        (torch.float16, torch.float32, True),
    ],
)
def test_a_4bit_layer_computing_in_another_dtype_than_the_input_runs_its_own_kernel(weight_dtype, compute_dtype, other):
    """bitsandbytes' 4-bit forward casts the input to its ``compute_dtype`` and the output back: where its product is
    not the dequantized one in the input's dtype, it is the base term (differentiated by its own Function), in
    training too."""
    from lightning_adapters.core.quant import computes_in_another_dtype, runs_own_kernel

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32).to(weight_dtype))
    model = la.quantize(model, "nf4", skip=[], compute_dtype=compute_dtype).train()
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    with torch.no_grad():
        plain = model[0](x)
    la.inject(model, la.LoRAConfig(r=2, target_modules=["0"]))
    assert computes_in_another_dtype(stand_in(model[0]), x) is other
    assert runs_own_kernel(stand_in(model[0]), x) is other
    y = model(x)  # B = 0: the base term alone
    torch.testing.assert_close(y, plain, rtol=0, atol=0 if other else 1e-6)
    (gx,) = torch.autograd.grad(y.sum(), x)
    assert gx.dtype == torch.float32 and torch.isfinite(gx).all()


def test_a_saved_tensor_without_storage_is_kept_as_it_is():
    """A sparse tensor saved beside the weight has no storage to compare; it is not the weight, and backward gets
    it back unchanged."""
    layer = _quantized("nf4")
    w = dequantized_weight(layer, torch.float32)
    s = torch.randn(5, 3, generator=torch.Generator().manual_seed(4)).relu().to_sparse()
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(2), requires_grad=True)
    y = run_on_stand_in(layer, lambda view, x: torch.sparse.mm(s, F.linear(x, view.weight)), x)
    g = torch.randn(5, 32, generator=torch.Generator().manual_seed(3))
    (gx,) = torch.autograd.grad(y, x, g)
    torch.testing.assert_close(gx, s.to_dense().t() @ g @ w)


def test_an_adapted_quantized_layer_called_with_a_keyword_input():
    """``layer(x=h)`` (bitsandbytes' forward names its input ``x``): active, it adds the adapter; disabled, it is the
    quantized layer's own output."""
    torch.manual_seed(0)
    model = la.quantize(nn.Sequential(nn.Linear(64, 32)), "nf4", skip=[])
    h = torch.randn(3, 64)
    with torch.no_grad():
        plain = model[0](h)
    la.inject(model, la.LoRAConfig(r=2, target_modules=["0"]))
    with torch.no_grad():
        model[0].adapter["default"].lora_B.normal_()
        adapted = model[0](h)
        assert not torch.allclose(adapted, plain)
        torch.testing.assert_close(model[0](x=h), adapted, rtol=0, atol=0)
        with la.disabled(model):
            torch.testing.assert_close(model[0](x=h), plain, rtol=0, atol=0)
