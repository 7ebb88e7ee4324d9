"""Quantized base layers: recognising them, their dequantized weight, re-quantizing a merge, and the stand-in the
methods compute with.

Supported bases (all ``nn.Linear`` underneath, so every method that adapts a Linear adapts them):

- bitsandbytes ``Linear4bit`` (``nf4``/``fp4``, with or without double quantisation, any compute dtype) and
  ``Linear8bitLt`` with int8 weights (``has_fp16_weights=False``), built by ``lightning_adapters.quantize`` or
  loaded by transformers with a ``BitsAndBytesConfig``;
- a plain ``nn.Linear`` whose weight is a torchao ``NF4Tensor`` (as torchtune builds its QLoRA bases) or a torchao
  int8 weight-only tensor (``quantize_(model, Int8WeightOnlyConfig())``, transformers' ``TorchAoConfig``).

How a method runs on one: the adapted forward hands the method a *dequantized stand-in* of the base
(``DequantizedLinear``): same ``bias``, ``in_features``/``out_features``, adapter children and ``training`` flag,
but ``weight`` is the dequantized ``W`` (computed on first use, in the input's dtype) and its ``_la_base_forward``
is the quantized layer's own forward. So a method's maths is unchanged (``F.linear(x, W)``, ``W + ΔW``, a rotated
``W``). Where no gradient has to flow back to the input through the base, for a bitsandbytes int8 layer in eval
mode, and for a 4-bit layer computing in another dtype than its input (``runs_own_kernel``), methods take the base
term from the quantized layer's own kernel (``base_linear``), so the output is exactly the quantized model's;
otherwise LoRA and AdaLoRA train through ``kernels.quantized``, and so does DoRA whenever autograd records in
training (its weight norm needs the dequantized weight anyway, and the layers' own training product is then the
dequantized one).
Memory stays that of the quantized base: while the method runs, autograd's saved-tensor hooks store every saved
view of the dequantized ``W`` as a token and dequantize again in backward (as bitsandbytes' own matmul does), so no
layer keeps a full-precision copy of its weight between forward and backward. bitsandbytes 4-bit layers keep their
storage layout (see ``_bnb_4bit_state``).

Merging: ``W`` is dequantized (float32), the method merges into it as into any float base, and the result is
quantized again with the layer's own settings (``requantize_``); the largest absolute change that re-quantizing
adds to the merged weight is returned so ``merge`` can report it. Unmerge cannot be exact after that, so it is
refused unless the quantized weight from before the merge was kept (``QuantizedWeight``).
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_adapters.errors import UnsupportedLayerError

# Schemes ``quant_scheme`` reports (and ``lightning_adapters.quantize`` builds).
BNB_SCHEMES = ("nf4", "fp4", "int8")
TORCHAO_SCHEMES = ("torchao_nf4", "torchao_int8")
SCHEMES = BNB_SCHEMES + TORCHAO_SCHEMES


def _bnb() -> Any:
    """The bitsandbytes module if it was imported (a bitsandbytes layer cannot exist otherwise), else None."""
    return sys.modules.get("bitsandbytes")


def _torchao_kind(weight: Any) -> str | None:
    """``"nf4"`` / ``"int8"`` for a torchao weight tensor, ``"other"`` for another torchao tensor, else None."""
    cls = type(weight)
    if cls is nn.Parameter or cls is torch.Tensor:  # the plain case first: torch.compile traces it without a break
        return None
    if not cls.__module__.startswith("torchao"):
        return None
    if cls.__name__ == "NF4Tensor":
        return "nf4"
    if cls.__name__ == "Int8Tensor" or (cls.__name__ == "AffineQuantizedTensor" and weight.dtype.is_floating_point):
        qdata = getattr(weight, "qdata", None)
        if qdata is None:
            qdata = getattr(getattr(weight, "tensor_impl", None), "int_data", None)
        # Weight-only: torchao's Int8Tensor also carries dynamic activation quantization
        # (Int8DynamicActivationInt8WeightConfig) or a pre-scale of the input; a merge re-quantizing weight-only
        # would silently drop them.
        weight_only = (
            getattr(weight, "act_quant_kwargs", None) is None and getattr(weight, "act_pre_scale", None) is None
        )
        if qdata is not None and qdata.dtype == torch.int8 and weight_only:
            return "int8"
    return "other"


def quant_scheme(module: nn.Module) -> str | None:
    """The quantization scheme of a base layer (one of ``SCHEMES``), or None for a plain floating layer.

    Raises:
        UnsupportedLayerError: A quantized layer of a kind the methods cannot run on (a bitsandbytes
            ``Linear8bitLt`` that still trains fp16 weights, a torchao tensor other than NF4 / int8 weight-only).
    """
    bnb = _bnb()
    if bnb is not None:
        if isinstance(module, bnb.nn.Linear4bit):
            return module.weight.quant_type
        if isinstance(module, bnb.nn.Linear8bitLt):
            if module.state.has_fp16_weights:
                raise UnsupportedLayerError(
                    f"a bitsandbytes Linear8bitLt with has_fp16_weights=True (weights {module.weight.dtype}, "
                    "quantized on the fly and trained themselves) is not a frozen quantized base; build it with "
                    "has_fp16_weights=False (lightning_adapters.quantize(model, 'int8') does) and move it to its "
                    "device to quantize it"
                )
            return "int8"
    if not isinstance(module, nn.Linear):
        return None
    kind = _torchao_kind(module._parameters.get("weight"))
    if kind is None:
        return None
    if kind == "other":
        raise UnsupportedLayerError(
            f"the torchao weight type {type(module.weight).__name__} (or its settings) is not supported as an "
            "adapter base; use an NF4Tensor (to_nf4) or int8 weight-only quantization (Int8WeightOnlyConfig, whose "
            "activations stay in floating point), or a bitsandbytes layer"
        )
    return f"torchao_{kind}"


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module`` is a quantized base layer the methods run on (see ``quant_scheme``)."""
    return quant_scheme(module) is not None


def compute_dtype_of(module: nn.Module) -> torch.dtype:
    """The floating dtype a quantized base computes in (its ``compute_dtype``, or its dequantized dtype)."""
    scheme = quant_scheme(module)
    if scheme in ("nf4", "fp4"):
        if module.compute_dtype is not None:
            return module.compute_dtype
        return module.weight.quant_state.dtype if module.weight.quant_state is not None else torch.float32
    if scheme == "int8":
        return torch.float32 if module.bias is None else module.bias.dtype
    return module.weight.dtype


def fsdp2_kept_whole(model: nn.Module, mesh_size: int) -> set[nn.Parameter]:
    """The quantized base weights of ``model`` that FSDP2 (``fully_shard``) must leave whole: its ``ignored_params``.

    Kept whole (each rank holds the full weight at its quantized size, as without FSDP):

    - bitsandbytes weights: their quantization state lives on the ``Parameter`` object (``Params4bit.quant_state``,
      ``Int8Params.CB``/``SCB``), which ``fully_shard`` replaces by a plain sharded tensor;
    - torchao tensors other than ``NF4Tensor`` (torchao 0.18's int8 weight-only tensor cannot be split);
    - torchao ``NF4Tensor`` weights on a one-rank mesh: torch 2.13's world-size-1 path of ``fully_shard`` copies
      only the first of the three tensors NF4's all-gather extension returns (pytorch/pytorch#197999), so its
      ``fsdp_post_all_gather`` fails; and NF4 weights whose rows, 4-bit data, block scales or scale-of-scales do
      not split evenly over ``mesh_size`` ranks (torchao's ``aten.split`` asserts so).

    Every other NF4 weight is sharded through torchao's all-gather extension.
    """
    kept: set[nn.Parameter] = set()
    for m in model.modules():
        w = m._parameters.get("weight")
        if w is None:
            continue
        if type(w).__module__.startswith("bitsandbytes"):
            kept.add(w)
            continue
        kind = _torchao_kind(w)
        if kind is None:
            continue
        if kind != "nf4" or mesh_size == 1:
            kept.add(w)
            continue
        inner = ("quantized_data", "quantized_scalers", "quantization_factor")
        if w.size(0) % mesh_size or any(getattr(w, a).numel() % mesh_size for a in inner):
            kept.add(w)
    return kept


# ------------------------------------------------------------------------------------------------------------
# Dequantize / re-quantize


def _bnb_4bit_state(module: nn.Module) -> Any:
    """The layer's ``QuantState`` in bitsandbytes' storage layout, which the layer then keeps.

    On x86 CPUs with AVX512-BF16, an inference forward of ``Linear4bit`` repacks the weight for a bf16 CPU kernel,
    rounding its scales (unpacking changes the dequantized weight by up to ~1e-2 of its range); its own
    ``state_dict`` unpacks it first, and so does this. The layer is then told not to repack (its inference uses
    the exact dequantizing kernel), so merging, dequantizing and the adapted forward all see one weight.
    """
    bnb = _bnb()
    weight = module.weight
    if weight.quant_state is None and getattr(module, "quant_state", None) is not None:
        weight.quant_state = module.quant_state
    state = weight.quant_state
    if state is None:
        raise UnsupportedLayerError(
            "a bitsandbytes Linear4bit whose weight was never quantized (no quant_state): move it to its device "
            "(module.to('cpu') or .cuda()) to quantize it first"
        )
    if getattr(state, "packing_format_for_cpu", False):
        weight.data, state = bnb.functional._convert_weight_packed_for_cpu_inverse(weight.data, state)
        weight.quant_state = state
    module.support_avx512bf16_for_cpu = False
    return state


def _int8_scales(module: nn.Module) -> torch.Tensor:
    """Row scales (out,) of a ``Linear8bitLt`` (kept on the weight until its first forward, then on its state)."""
    scb = getattr(module.weight, "SCB", None)
    return module.state.SCB if scb is None else scb


def dequantized_weight(module: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The weight of a quantized base as a plain (out, in) tensor, in ``dtype`` (default: ``compute_dtype_of``).

    The result is a new tensor: writing it never changes the base.
    """
    scheme = quant_scheme(module)
    dtype = dtype or compute_dtype_of(module)
    if _pending(module):
        # Quantized when it moves to its device (Lightning's BitsandbytesPrecision layers): a copy of the float
        # weight, since callers write into the result (the quantized Functions fold ``s·B·A`` into it in place).
        return module.weight.data.to(dtype, copy=True).reshape(module.out_features, module.in_features)
    if scheme in ("nf4", "fp4"):
        state = _bnb_4bit_state(module)
        w = _bnb().functional.dequantize_4bit(module.weight.data, state)
    elif scheme == "int8":
        w = _bnb().functional.int8_vectorwise_dequant(module.weight.data, _int8_scales(module))
    elif scheme == "torchao_nf4":
        w = module.weight.get_original_weight()
    elif scheme == "torchao_int8":
        w = module.weight.dequantize()
    else:
        raise UnsupportedLayerError(f"{type(module).__name__} is not a quantized base layer")
    return w.to(dtype).reshape(module.out_features, module.in_features)


def _pending(module: nn.Module) -> bool:
    """Whether a bitsandbytes layer still holds its float weight, to be quantized when it moves to its device."""
    w = module._parameters.get("weight")
    return getattr(w, "bnb_quantized", True) is False or (type(w).__name__ == "Int8Params" and w.dtype != torch.int8)


def requantize_(module: nn.Module, weight: torch.Tensor) -> float:
    """Quantize ``weight`` (out, in) into ``module`` with the module's own settings; returns the error this adds.

    bitsandbytes layers keep their ``Parameter`` object (its data and quantization state are replaced);
    torchao ones get a new frozen ``Parameter`` holding the new quantized tensor.

    Returns:
        ``max |dequantize(quantize(weight)) − weight|`` over the layer's elements.
    """
    scheme = quant_scheme(module)
    w = weight.detach()
    if _pending(module):
        module.weight.data = w.to(module.weight.dtype).reshape(module.weight.shape).clone()
        return 0.0
    if scheme in ("nf4", "fp4"):
        old = _bnb_4bit_state(module)
        p = module.weight
        packed, state = _bnb().functional.quantize_4bit(
            w.to(device=p.device, dtype=old.dtype).contiguous(),
            blocksize=old.blocksize,
            compress_statistics=old.nested,
            quant_type=old.quant_type,
            quant_storage=p.data.dtype,
        )
        p.data, p.quant_state = packed, state
        if getattr(module, "quant_state", None) is not None:
            module.quant_state = state
    elif scheme == "int8":
        # As Int8Params quantizes: rows absmax-scaled from the fp16 weight.
        cb, scb, _ = _bnb().functional.int8_vectorwise_quant(w.to(device=module.weight.device, dtype=torch.float16))
        module.weight.data = cb
        if module.weight.SCB is not None or module.state.SCB is None:
            module.weight.CB, module.weight.SCB = cb, scb
        else:
            module.state.CB, module.state.SCB = cb, scb
    elif scheme == "torchao_nf4":
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

        old = module.weight
        new = to_nf4(w.to(old.dtype).contiguous(), old.block_size, old.scaler_block_size)
        module.weight = nn.Parameter(new, requires_grad=False)
    elif scheme == "torchao_int8":
        module.weight = nn.Parameter(_torchao_int8(w.to(module.weight.dtype), module.weight), requires_grad=False)
    else:
        raise UnsupportedLayerError(f"{type(module).__name__} is not a quantized base layer")
    back = dequantized_weight(module, torch.float32)
    return float((back - w.to(back)).abs().max()) if back.numel() else 0.0


def _torchao_int8(w: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``w`` quantized as torchao's int8 weight-only scheme, in the blocks ``like`` has: one scale per row (the
    default), one for the whole tensor, or one per group of columns."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    block = list(like.block_size)
    if block == [1, w.shape[1]]:
        config = Int8WeightOnlyConfig()
    else:
        from torchao.quantization.granularity import PerGroup, PerTensor

        config = Int8WeightOnlyConfig(granularity=PerTensor() if block == list(w.shape) else PerGroup(block[1]))
    tmp = nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=w.dtype, device=w.device)
    with torch.no_grad():
        tmp.weight.copy_(w)
    quantize_(tmp, config)
    return tmp.weight.detach()


@dataclass
class QuantizedWeight:
    """A copy of a quantized base's weight (and its quantization state), to put back bit-exactly."""

    scheme: str
    tensors: dict[str, Any]

    @classmethod
    def of(cls, module: nn.Module) -> QuantizedWeight:
        """Copy ``module``'s quantized weight."""
        scheme = quant_scheme(module)
        if _pending(module):
            return cls("pending", {"data": module.weight.data.clone()})
        if scheme in ("nf4", "fp4"):
            state = _bnb_4bit_state(module)
            return cls(scheme, {"data": module.weight.data.clone(), "state": copy.deepcopy(state)})
        if scheme == "int8":
            return cls(scheme, {"data": module.weight.data.clone(), "scb": _int8_scales(module).clone()})
        return cls(scheme, {"weight": module.weight})

    def restore(self, module: nn.Module) -> None:
        """Put the copied weight back into ``module``."""
        t = self.tensors
        if self.scheme == "pending":
            module.weight.data = t["data"]
        elif self.scheme in ("nf4", "fp4"):
            module.weight.data, module.weight.quant_state = t["data"], t["state"]
            if getattr(module, "quant_state", None) is not None:
                module.quant_state = t["state"]
        elif self.scheme == "int8":
            module.weight.data = t["data"]
            if module.weight.SCB is not None or module.state.SCB is None:
                module.weight.CB, module.weight.SCB = t["data"], t["scb"]
            else:
                module.state.CB, module.state.SCB = t["data"], t["scb"]
        else:
            module.weight = t["weight"]  # torchao: requantize_ replaced the Parameter, the old one is untouched


# ------------------------------------------------------------------------------------------------------------
# The dequantized stand-in


class DequantizedLinear(nn.Linear):
    """What a method sees of a quantized base: the base itself, except that ``weight`` is the dequantized ``W``.

    Never built with ``__init__``: ``stand_in`` fills its ``__dict__`` with the real module's containers, so its
    adapter children, bias, parameters and hooks are the real ones. ``weight`` is dequantized on first access (in
    the dtype given to ``stand_in``) and kept for the rest of the call; ``materialize`` sets it to a given tensor
    (a merge writes into it). ``_la_base_forward`` runs the quantized layer's own forward.
    """

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        w = self.__dict__["_la_w"]
        if w is None:
            w = dequantized_weight(self.__dict__["_la_real"], self.__dict__["_la_dtype"])
            self.__dict__["_la_w"] = w
        return w

    def _la_base_forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.__dict__["_la_real"]._la_base_forward(*args, **kwargs)
        # bitsandbytes returns a view made inside its autograd Function, which the methods' in-place sums may not
        # write to (PEFT clones it too). Every supported base is a Linear: its output is a tensor.
        return out.clone() if out._is_view() else out


def quantized_base(base: nn.Module) -> nn.Module | None:
    """The quantized layer behind a stand-in (what a method's ``base`` is on a quantized layer), else None."""
    return base.__dict__["_la_real"] if isinstance(base, DequantizedLinear) else None


def runs_own_kernel(base: nn.Module, x: torch.Tensor) -> bool:
    """Whether the base term of a quantized stand-in comes from the quantized layer's own forward: when no gradient
    has to flow back to ``x`` through it (so its inference kernels, e.g. bitsandbytes' packed CPU kernel, give the
    base output exactly as the plain quantized model computes it). Also where the layer's own product is not the
    dequantized one in ``x``'s dtype, its own autograd Function giving ``x`` its gradient (so the adapted model equals
    the quantized one with or without autograd, as in PEFT): a bitsandbytes int8 layer in eval mode (its inference
    product also quantizes the input), and a bitsandbytes 4-bit layer whose ``compute_dtype`` is not ``x``'s (it
    computes in that dtype and casts back, e.g. bf16 layers fed the float32 activations of k-bit training)."""
    real = quantized_base(base)
    if real is None:
        return False
    if not (torch.is_grad_enabled() and x.requires_grad):
        return True
    if _pending(real):
        return False
    if quant_scheme(real) == "int8":
        return not real.training
    return computes_in_another_dtype(base, x)


def computes_in_another_dtype(base: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``base`` is the stand-in of a bitsandbytes 4-bit layer whose own product is not the dequantized one in
    ``x``'s dtype (what the methods' training Functions compute): its ``compute_dtype`` is not ``x``'s (its forward
    casts ``x`` to that dtype and the output back), or it quantized a narrower weight than ``x`` (its 4-bit kernel
    dequantizes straight into the compute dtype, where ``dequantize_4bit`` rounds to the stored dtype first: a bf16
    model's layers computing in float32, transformers' default)."""
    real = quantized_base(base)
    if real is None or _pending(real) or quant_scheme(real) not in ("nf4", "fp4"):
        return False
    state = real.weight.quant_state or getattr(real, "quant_state", None)
    stored = x.dtype if state is None else state.dtype
    return (real.compute_dtype or stored) != x.dtype or stored.itemsize < x.dtype.itemsize


def base_linear(base: nn.Module, x: torch.Tensor, with_bias: bool = True) -> torch.Tensor:
    """``x Wᵀ (+ b)`` of a Linear base, as the base itself computes it.

    A plain base: ``F.linear``. A quantized stand-in: the quantized layer's own forward when ``runs_own_kernel``;
    else (``x`` needs its gradient) ``F.linear`` with the dequantized weight, which is what the quantized layer's
    training matmul computes, and whose saved weight ``run_on_stand_in`` re-dequantizes in backward.
    """
    real = quantized_base(base)
    if real is not None and runs_own_kernel(base, x):
        out = real._la_base_forward(x)
        return out if with_bias or base.bias is None else out - base.bias.to(out.dtype)
    bias = base.bias if with_bias else None
    if real is not None and bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)  # as the quantized layers cast their bias to the compute dtype
    return F.linear(x, base.weight, bias)


def stand_in(module: nn.Module, dtype: torch.dtype | None = None, weight: torch.Tensor | None = None) -> nn.Module:
    """A ``DequantizedLinear`` for the quantized ``module`` (the module itself when it is not quantized).

    Args:
        module: The base layer.
        dtype: The dtype its ``weight`` is dequantized to (default: ``compute_dtype_of(module)``).
        weight: A tensor to use as its weight instead of dequantizing on access (a merge writes into it).
    """
    scheme = quant_scheme(module)
    if scheme is None:
        return module
    if scheme in ("nf4", "fp4") and not _pending(module):
        _bnb_4bit_state(module)  # bitsandbytes' storage layout, kept (see there)
    view = DequantizedLinear.__new__(DequantizedLinear)
    d = view.__dict__
    d.update(module.__dict__)
    d["_la_real"], d["_la_dtype"], d["_la_w"] = module, dtype or compute_dtype_of(module), weight
    return view


def _same_storage(t: torch.Tensor, w: torch.Tensor) -> bool:
    try:
        return t.untyped_storage().data_ptr() == w.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return False


class _Redequantize:
    """A saved view of a stand-in's dequantized weight, rebuilt from the quantized base when backward needs it.

    The tokens of one forward share a cache, so a weight saved several times is dequantized once in backward.
    """

    __slots__ = ("cache", "dtype", "module", "offset", "size", "stride")

    def __init__(self, module: nn.Module, t: torch.Tensor, w: torch.Tensor, cache: dict[str, torch.Tensor]) -> None:
        self.module, self.cache, self.dtype = module, cache, w.dtype
        self.size, self.stride = t.size(), t.stride()
        self.offset = t.storage_offset() - w.storage_offset()

    def unpack(self) -> torch.Tensor:
        w = self.cache.get("w")
        if w is None:
            w = dequantized_weight(self.module, self.dtype)
            self.cache["w"] = w
        return w.as_strided(self.size, self.stride, w.storage_offset() + self.offset)


def run_on_stand_in(module: nn.Module, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """``fn(stand_in(module), *args, **kwargs)`` with the dequantized weight never kept for backward.

    Saved tensors that are views of the stand-in's dequantized weight are stored as ``_Redequantize`` tokens;
    every other saved tensor goes to the saved-tensor hooks already active (activation checkpointing's), if any.
    """
    x = args[0] if args else None
    dtype = x.dtype if isinstance(x, torch.Tensor) and x.is_floating_point() else None
    view = stand_in(module, dtype)
    outer_pack, outer_unpack = _outer_hooks()
    cache: dict[str, torch.Tensor] = {}

    def pack(t: torch.Tensor) -> Any:
        w = view.__dict__["_la_w"]
        if w is not None and t.device == w.device and _same_storage(t, w):
            return _Redequantize(module, t, w, cache)
        return (outer_pack(t),) if outer_pack is not None else t  # a tuple: what the outer hooks packed

    def unpack(packed: Any) -> torch.Tensor:
        if isinstance(packed, _Redequantize):
            return packed.unpack()
        if isinstance(packed, tuple):
            return outer_unpack(packed[0])
        return packed

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        return fn(view, *args, **kwargs)


def _outer_hooks() -> tuple[Any, Any]:
    """The saved-tensor hooks active around the call (non-reentrant activation checkpointing's), or ``(None, None)``."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    if top is None:
        return None, None
    hooks = top(False)
    return hooks if hooks is not None else (None, None)
