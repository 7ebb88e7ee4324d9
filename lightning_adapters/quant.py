"""``quantize``: turn the Linear layers of a plain model into quantized bases (QLoRA's 4-bit NF4 and friends).

Schemes::

    "nf4" / "fp4"     bitsandbytes Linear4bit (4-bit NormalFloat / FloatingPoint, blockwise absmax scales;
                      ``double_quant`` also quantizes the scales, QLoRA's "double quantization")
    "int8"            bitsandbytes Linear8bitLt with int8 weights and per-row scales (LLM.int8() without outliers)
    "torchao_nf4"     the layer stays an ``nn.Linear`` whose weight becomes a torchao ``NF4Tensor`` (torchtune's QLoRA)
    "torchao_int8"    the layer stays an ``nn.Linear`` with torchao's int8 weight-only tensor (per-row scales)

bitsandbytes 0.45+ runs all of its layers on CPU (x86) as well as on CUDA, so the same model trains on both. Models
that transformers loaded with a ``BitsAndBytesConfig`` or ``TorchAoConfig`` already hold such layers; every method
of this library adapts them as they are (``lightning_adapters.core.quant``).
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
from torch import nn

from lightning_adapters.config import check_regex
from lightning_adapters.core.inject import check_module, find_records
from lightning_adapters.core.layer import is_adapted
from lightning_adapters.core.quant import SCHEMES, is_quantized, quant_scheme
from lightning_adapters.core.targeting import module_aliases, name_matches, output_head_names
from lightning_adapters.errors import AdapterConfigError, AdapterStateError, TargetError

# torchao NF4 quantizes its block scales in groups of this many (its default; torchao's own NF4 copy, used by
# deepcopy, assumes it).
TORCHAO_SCALER_BLOCK = 256
# Blocksizes bitsandbytes' 4-bit kernels accept.
BNB_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
# Weight dtypes each scheme's quantizer takes (bitsandbytes' 4-bit and torchao's int8 refuse float64).
_HALF_OR_SINGLE = (torch.float32, torch.float16, torch.bfloat16)
_WEIGHT_DTYPES = {"nf4": _HALF_OR_SINGLE, "fp4": _HALF_OR_SINGLE, "torchao_int8": _HALF_OR_SINGLE}


def _require(package: str, scheme: str) -> Any:
    try:
        return importlib.import_module(package)
    except ImportError as err:
        pip = "bitsandbytes" if package == "bitsandbytes" else "torchao"
        raise AdapterConfigError(
            f"quantize: scheme {scheme!r} needs the {pip} package, which is not installed; "
            f"pip install {pip} (or lightning_adapters[quant])"
        ) from err


def _dtype(value: Any, what: str) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    dt = getattr(torch, str(value).removeprefix("torch."), None)
    if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
        raise AdapterConfigError(
            f"quantize: {what}={value!r} is not a floating dtype; use 'float32', 'bfloat16' or 'float16'"
        )
    return dt


def _skip(value: Any) -> list[str] | str | None:
    """``skip`` checked: None, a full-match regex string, or a list of non-empty name suffixes (may be empty)."""
    if value is None:
        return None
    if isinstance(value, str):
        check_regex(value, value, "quantize: skip")
        return value
    try:
        items = list(value)
    except TypeError:
        items = None
    if items is None or not all(isinstance(v, str) and v for v in items):
        raise AdapterConfigError(
            f"quantize: skip={value!r} must be a list of module name suffixes or a full-match regex string, "
            "e.g. skip=['lm_head'] (skip=[] quantizes every Linear)"
        )
    return items


def quantize(
    model: nn.Module,
    scheme: str = "nf4",
    *,
    skip: list[str] | str | None = None,
    compute_dtype: torch.dtype | str | None = None,
    double_quant: bool = False,
    blocksize: int = 64,
) -> nn.Module:
    """Quantize the ``nn.Linear`` layers of ``model`` in place (before ``inject``); returns ``model``.

    Args:
        model: A plain (not yet injected) model on the device it will run on (CPU or CUDA).
        scheme: ``"nf4"``, ``"fp4"``, ``"int8"`` (bitsandbytes), ``"torchao_nf4"`` or ``"torchao_int8"``.
        skip: Layers kept in full precision: a list of name suffixes or a full-match regex, as ``target_modules``.
            Default: the model's output head (``lm_head``), as transformers does.
        compute_dtype: The dtype the 4-bit layers compute in (bitsandbytes' ``bnb_4bit_compute_dtype``); default
            the dtype of each weight. Refused for the other schemes, whose layers compute in the input's dtype.
        double_quant: Also quantize the 4-bit scales (QLoRA's double quantization; bitsandbytes 4-bit only).
        blocksize: Elements per 4-bit scale (bitsandbytes and torchao NF4).

    Returns:
        ``model``. bitsandbytes layers replace the ``nn.Linear`` modules (same names, same parameter keys);
        torchao ones keep the module and swap its weight.

    Raises:
        AdapterConfigError: An unknown scheme or dtype, a blocksize that does not fit, a ``skip`` that is neither
            a list of names nor a valid regex, a weight dtype the scheme cannot quantize (float64 for ``"nf4"``,
            ``"fp4"`` and ``"torchao_int8"``), a missing package, or a model that already holds adapters (quantize
            first, then inject). Every check runs before the first layer is replaced.
        AdapterStateError: A weight on the meta device (no values to quantize).
        TargetError: No Linear layer is left to quantize.
    """
    check_module(model, "quantize")
    if scheme not in SCHEMES:
        raise AdapterConfigError(f"quantize: scheme={scheme!r} is not one of {list(SCHEMES)}")
    compute_dtype = _dtype(compute_dtype, "compute_dtype")
    if compute_dtype is not None and scheme not in ("nf4", "fp4"):
        raise AdapterConfigError(
            f"quantize: compute_dtype={compute_dtype} applies to bitsandbytes 4-bit layers ('nf4', 'fp4'), not "
            f"{scheme!r}, whose layers compute in their input's dtype; leave compute_dtype=None (cast the model to "
            "choose the dtype)"
        )
    if double_quant and scheme not in ("nf4", "fp4"):
        raise AdapterConfigError(
            f"quantize: double_quant=True applies to bitsandbytes 4-bit scales ('nf4', 'fp4'), not {scheme!r}"
        )
    if scheme in ("nf4", "fp4") and blocksize not in BNB_BLOCKSIZES:
        raise AdapterConfigError(f"quantize: blocksize={blocksize!r} must be one of {list(BNB_BLOCKSIZES)}")
    if find_records(model) or any(is_adapted(m) for m in model.modules()):
        raise AdapterConfigError(
            "quantize: the model already holds adapters; quantize the plain model first, then inject "
            "(lightning_adapters.eject(model) removes them)"
        )
    skip = _skip(skip)
    skip = sorted(output_head_names(model)) if skip is None else skip
    chosen = [
        (names, m)
        for names, m in module_aliases(model)
        if type(m) is nn.Linear and not is_quantized(m) and not any(name_matches(n, skip) for n in names if n)
    ]
    if not chosen:
        done = [f"{n!r} ({quant_scheme(m)})" for n, m in model.named_modules() if is_quantized(m)]
        already = f"; already quantized: {', '.join(done[:4])}{', ...' if len(done) > 4 else ''}" if done else ""
        raise TargetError(f"quantize: no plain nn.Linear layer left to quantize (skip={skip!r}){already}")
    for names, m in chosen:
        if m.weight.is_meta:
            raise AdapterStateError(
                f"quantize: {names[0]}.weight is on the meta device (no values); load the weights first"
            )
        allowed = _WEIGHT_DTYPES.get(scheme)
        if allowed is not None and m.weight.dtype not in allowed:
            raise AdapterConfigError(
                f"quantize: {names[0]!r} has a {m.weight.dtype} weight, which scheme {scheme!r} cannot quantize "
                f"(it takes {', '.join(str(d) for d in allowed)}); cast the model first (e.g. model.float()) or add "
                "the layer to skip"
            )
        if scheme == "torchao_nf4" and m.weight.numel() % (blocksize * TORCHAO_SCALER_BLOCK):
            raise AdapterConfigError(
                f"quantize: {names[0]!r} has {m.weight.numel()} weights, which torchao's NF4 cannot split into "
                f"whole groups of {TORCHAO_SCALER_BLOCK} blocks of {blocksize}; add it to skip (or use 'nf4', "
                "bitsandbytes' NF4, which takes any size)"
            )
    bnb = _require("bitsandbytes", scheme) if scheme in ("nf4", "fp4", "int8") else None
    if scheme.startswith("torchao"):
        _require("torchao", scheme)
    for names, m in chosen:
        if scheme in ("nf4", "fp4"):
            new = _bnb_4bit(bnb, m, scheme, compute_dtype, double_quant, blocksize)
        elif scheme == "int8":
            new = _bnb_int8(bnb, m)
        else:
            _torchao(m, scheme, blocksize)
            continue
        for name in names:
            parent_name, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent_name), leaf, new)
    return model


def _bnb_4bit(
    bnb: Any, m: nn.Linear, scheme: str, compute_dtype: torch.dtype | None, double_quant: bool, blocksize: int
) -> nn.Module:
    device = m.weight.device
    new = bnb.nn.Linear4bit(
        m.in_features,
        m.out_features,
        bias=m.bias is not None,
        compute_dtype=compute_dtype or m.weight.dtype,
        compress_statistics=double_quant,
        quant_type=scheme,
        device="meta",
    )
    new.weight = bnb.nn.Params4bit(
        m.weight.detach().clone(),
        requires_grad=False,
        quant_type=scheme,
        blocksize=blocksize,
        compress_statistics=double_quant,
        module=new,
    )
    new.bias = None if m.bias is None else nn.Parameter(m.bias.detach().clone(), requires_grad=m.bias.requires_grad)
    new.train(m.training)
    # Keep bitsandbytes' storage layout: its bf16-packed CPU inference kernel rounds the scales (core/quant.py).
    new.support_avx512bf16_for_cpu = False
    return new.to(device)  # bitsandbytes quantizes when the weight moves to its device


def _bnb_int8(bnb: Any, m: nn.Linear) -> nn.Module:
    device = m.weight.device
    new = bnb.nn.Linear8bitLt(
        m.in_features, m.out_features, bias=m.bias is not None, has_fp16_weights=False, threshold=0.0, device="meta"
    )
    new.weight = bnb.nn.Int8Params(m.weight.detach().cpu().clone(), requires_grad=False, has_fp16_weights=False)
    new.bias = None if m.bias is None else nn.Parameter(m.bias.detach().clone(), requires_grad=m.bias.requires_grad)
    new.train(m.training)
    return new.to(device)  # quantized on the move (from CPU)


def _torchao(m: nn.Linear, scheme: str, blocksize: int) -> None:
    w = m.weight.detach()
    if scheme == "torchao_nf4":
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

        m.weight = nn.Parameter(to_nf4(w.contiguous(), blocksize, TORCHAO_SCALER_BLOCK), requires_grad=False)
        return
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    quantize_(m, Int8WeightOnlyConfig())


def prepare_for_kbit_training(model: nn.Module) -> list[str]:
    """Put the parts of a quantized model that train or normalise in float32, as PEFT's
    ``prepare_model_for_kbit_training`` does; returns the names of the parameters it cast.

    Every float16/bfloat16 parameter outside the quantized layers (layer norms, embeddings, the output head,
    adapters) becomes float32 in place (the ``Parameter`` objects are kept, so an optimizer built before still
    holds them): half-precision norms and heads on a 4-bit base lose the small updates QLoRA trains. A model without
    quantized layers is not changed. ``AdapterCallback`` calls this itself after injecting into a quantized model;
    the input-gradient hook that reentrant gradient checkpointing needs is installed by the callback as for any
    frozen base.
    """
    check_module(model, "prepare_for_kbit_training")
    quantized = [m for m in model.modules() if is_quantized(m)]
    if not quantized:
        return []
    inside = {id(p) for m in quantized for p in m.parameters(recurse=False)}
    cast = []
    for name, p in model.named_parameters():
        if id(p) not in inside and p.dtype in (torch.float16, torch.bfloat16):
            p.data = p.data.to(torch.float32)
            cast.append(name)
    return cast


def quantize_for_precision_plugin(trainer: Any, module: nn.Module) -> None:
    """Let Lightning's ``BitsandbytesPrecision`` swap ``module``'s Linear layers for its bitsandbytes layers now,
    before adapters are injected into them (it would otherwise replace the adapted layers later, in
    ``strategy.setup``, dropping their adapters). No-op for any other precision plugin or an already converted
    module; the weights are quantized when the strategy moves the model to its CUDA device."""
    plugin = getattr(getattr(trainer, "strategy", None), "precision_plugin", None)
    if type(plugin).__name__ == "BitsandbytesPrecision":
        plugin.convert_module(module)
