"""Merging into quantized bases, undoing it, and turning quantized layers back into plain ones.

``merge`` on a quantized base: dequantize ``W`` (float32), let the method merge into it as into any float base,
quantize the result with the layer's own settings. Re-quantizing rounds the merged weight again, so the merged
model differs from the unmerged one by that rounding; ``merge_quantized`` returns its largest absolute value per
layer (``lightning_adapters.merge`` logs it, ``merge_errors`` reads it back). The quantized weight from before the
merge is kept only on request (``keep_original``); without it an unmerge cannot be exact and is refused.
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_adapters.core.layer import ADAPTER_ATTR, AdapterLayer, adapted_class, is_adapted
from lightning_adapters.core.quant import QuantizedWeight, dequantized_weight, is_quantized, requantize_, stand_in
from lightning_adapters.errors import MergeError

# On a merged quantized base: one ``(layer, quantized weight from before its merge or None)`` per merged adapter, in
# merge order (several adapters merge on top of each other, each re-quantizing), and the error the last
# re-quantization added. Plain attributes of the base module, outside its state dict.
ORIGINAL_ATTR = "_la_quant_original"
ERROR_ATTR = "_la_quant_merge_error"


def _merges(base: nn.Module) -> list[tuple[AdapterLayer, QuantizedWeight | None]]:
    return base.__dict__.setdefault(ORIGINAL_ATTR, [])


def _kept(base: nn.Module, layer: AdapterLayer) -> tuple[int, QuantizedWeight | None] | None:
    """``(position, kept weight)`` of ``layer``'s merge into ``base``; ``None`` when no merge of it is recorded."""
    for i, (merged, original) in enumerate(base.__dict__.get(ORIGINAL_ATTR) or []):
        if merged is layer:
            return i, original
    return None


def merge_quantized(base: nn.Module, layer: AdapterLayer, *, safe: bool = False, keep_original: bool = False) -> float:
    """Merge ``layer`` into the quantized ``base``: dequantize, merge, re-quantize; returns the added error.

    On any exception the base keeps its quantized weight from before the call.
    """
    original = QuantizedWeight.of(base)
    try:
        view = stand_in(base, torch.float32, weight=dequantized_weight(base, torch.float32))
        layer.merge(view, safe=safe)
        error = requantize_(base, view.weight)
    except BaseException:
        original.restore(base)
        layer.forget_merge()
        layer.merged = False
        raise
    _merges(base).append((layer, original if keep_original else None))
    base.__dict__[ERROR_ATTR] = error
    return error


def forget_quantized_merge(base: nn.Module, layer: AdapterLayer) -> None:
    """Drop the record of ``layer``'s merge into ``base`` (its merge was rolled back by restoring the weight)."""
    kept = _kept(base, layer)
    if kept is not None:
        del _merges(base)[kept[0]]
    if not base.__dict__.get(ORIGINAL_ATTR):
        base.__dict__.pop(ORIGINAL_ATTR, None)
        base.__dict__.pop(ERROR_ATTR, None)


def check_unmergeable(layers: list[tuple[str, nn.Module, AdapterLayer]], what: str) -> None:
    """Refuse, before any change, to unmerge a layer merged into a quantized base without its original kept.

    Raises:
        MergeError: Naming the layer and the two ways out.
    """
    for name, base, layer in layers:
        if not (layer.merged and is_quantized(base)):
            continue
        kept = _kept(base, layer)
        if kept is None or kept[1] is None:
            raise MergeError(
                f"{what}: {name!r} is a quantized base with the adapter merged and re-quantized, so the original "
                "quantized weight cannot be recovered exactly (nothing was changed); merge with "
                "lightning_adapters.merge(model, keep_original=True) to be able to unmerge, or eject with "
                "merge=True (dtype=torch.bfloat16 gives a dequantized merged model)"
            )


def unmerge_quantized(base: nn.Module, layer: AdapterLayer, name: str = "") -> None:
    """Put back the quantized weight kept by ``merge_quantized(keep_original=True)`` (bit-exact).

    Adapters merged after ``layer`` into the same base are merged again on top (each keeps its own kept weight or
    lack of one), so unmerging in reverse merge order re-quantizes nothing.
    """
    check_unmergeable([(name, base, layer)], "unmerge")
    position, original = _kept(base, layer)
    later = _merges(base)[position + 1 :]
    original.restore(base)
    del _merges(base)[position:]
    layer.forget_merge()
    layer.merged = False
    for merged, kept in later:
        merged.forget_merge()
        merged.merged = False
        merge_quantized(base, merged, keep_original=kept is not None)
    if not _merges(base):
        base.__dict__.pop(ORIGINAL_ATTR, None)
        base.__dict__.pop(ERROR_ATTR, None)


def merge_errors(model: nn.Module) -> dict[str, float]:
    """``{layer name: max |re-quantized − merged weight|}`` of the quantized bases the last ``merge`` wrote."""
    return {
        name: m.__dict__[ERROR_ATTR]
        for name, m in model.named_modules()
        if m.__dict__.get(ERROR_ATTR) is not None and m.__dict__.get(ORIGINAL_ATTR)
    }


def dequantize_model(model: nn.Module, dtype: torch.dtype) -> list[tuple[nn.Module, str, nn.Module]]:
    """Replace every quantized base in ``model`` by a plain ``nn.Linear`` in ``dtype``.

    An adapted base keeps its adapter (also attached to the plain layer, still merged or not): a merge kept
    reversible (``keep_original``) is undone first, so merging afterwards happens in full precision without the
    re-quantization error.

    Returns:
        ``(parent, attribute, quantized module)`` per replaced slot: ``setattr(parent, attribute, module)`` puts the
        quantized layers back (they are not changed, except for an undone reversible merge).
    """
    replaced: dict[int, nn.Module] = {}
    slots = []
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if not name or not is_quantized(module):
            continue
        if id(module) not in replaced:
            replaced[id(module)] = _plain_copy(module, dtype)
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        slots.append((parent, leaf, module))
        setattr(parent, leaf, replaced[id(module)])
    return slots


def _plain_copy(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    adapted = is_adapted(module)
    # The reversible merges on top come out (latest first); a merge without its kept weight stays in the weight.
    merges = module.__dict__.get(ORIGINAL_ATTR) or []
    while merges and merges[-1][1] is not None:
        unmerge_quantized(module, merges[-1][0])
    weight = dequantized_weight(module, dtype)
    plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
    plain.weight = nn.Parameter(weight, requires_grad=module.weight.requires_grad)
    if module.bias is not None:
        plain.bias = nn.Parameter(module.bias.detach().to(dtype), requires_grad=module.bias.requires_grad)
    plain.train(module.training)
    if adapted:
        plain.add_module(ADAPTER_ATTR, module._modules[ADAPTER_ATTR])
        plain.__class__ = adapted_class(nn.Linear)
    return plain


def forget_hf_quantization(model: nn.Module) -> None:
    """Drop transformers' record of a quantization (``config.quantization_config``, ``hf_quantizer``) once no layer
    of ``model`` is quantized any more, so ``save_pretrained`` writes a plain model."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and not any(is_quantized(m) for m in model.modules()):
        quantizer.remove_quantization_config(model)
