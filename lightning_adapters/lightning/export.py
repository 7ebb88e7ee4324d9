"""Export at the end of ``fit``: a PEFT-format adapter directory and a merged plain model.

Both go through ``lightning_adapters.core.files.replace_directory`` (each directory replaced as a whole) and
refuse non-finite weights, so a diverged run never overwrites a good export.

``export_merged`` merges into a copy, so the trained model in memory keeps its adapter (merging and unmerging
in place would round a bf16 base twice). Both exports are written by rank zero; under FSDP the adapter tensors
are gathered first, with every rank taking part.
"""

from __future__ import annotations

import copy
import fnmatch
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_adapters.core.files import replace_directory, target_directory
from lightning_adapters.core.inject import eject
from lightning_adapters.core.quant import quant_scheme
from lightning_adapters.errors import AdapterConfigError, AdapterStateError, UnsupportedLayerError
from lightning_adapters.interop.peft import save_peft
from lightning_adapters.lightning.strategies import gathered, is_zero3

# What a merged export owns in its directory: transformers' config files and every weight-file layout
# save_pretrained writes (a previous export's shards must not survive next to a new single file).
_MERGED_NAMES = frozenset({"config.json", "generation_config.json", "model.safetensors"})
_MERGED_PATTERNS = ("model-*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin", "pytorch_model*.json")


def _merged_owned(name: str) -> bool:
    return name in _MERGED_NAMES or any(fnmatch.fnmatchcase(name, p) for p in _MERGED_PATTERNS)


def export_merged(
    model: nn.Module, directory: str | os.PathLike, *, safe: bool = True, dtype: torch.dtype | None = None
) -> Path:
    """Write a plain copy of an injected ``model`` with its adapter merged into the base weights.

    A transformers model is written with ``save_pretrained`` (loadable with ``from_pretrained``); any other
    module as ``model.safetensors`` (``safetensors.torch.load_model`` into a fresh instance). ``model`` itself is
    left untouched. The export's files are replaced together (``lightning_adapters.core.files``): a failure or a
    crash at any point leaves the previous export whole, concurrent exports to one directory take turns, and
    other files in the directory are kept.

    Args:
        model: The injected model (not sharded, not on the meta device).
        directory: Output directory (created if needed).
        safe: Check every floating tensor of the merged copy is finite before touching ``directory``, so a
            diverged adapter (or a merge that overflows a half-precision base) never replaces a good export.
        dtype: Dequantize the quantized base layers (``lightning_adapters.quantize``, bitsandbytes/torchao) into
            plain ``nn.Linear`` layers of this dtype and merge there, without re-quantizing (as ``eject(dtype=)``);
            ``None`` keeps them quantized, which a transformers model may only do when transformers quantized it
            (its ``config.quantization_config`` lets ``from_pretrained`` rebuild the layers).

    Returns:
        The directory.

    Raises:
        AdapterConfigError: A bad ``directory``, or ``dtype=None`` on a transformers model holding layers
            quantized by ``lightning_adapters.quantize`` (nothing is written).
        AdapterStateError: ``model`` is on the meta device, or (``safe``) the merged weights are not finite.
    """
    target = target_directory(directory, "export_merged")
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_meta:
            raise AdapterStateError(
                f"export_merged: {name!r} is on the meta device (the model was built without weights); "
                "materialize and load the weights before exporting"
            )
    if dtype is None and hasattr(model, "save_pretrained"):
        _check_quantized_reloads(model)
    plain = eject(copy.deepcopy(model), merge=True, dtype=dtype)
    if safe:
        for name, t in plain.state_dict().items():
            if t.is_floating_point() and not _finite(t):
                raise AdapterStateError(
                    f"export_merged: merged tensor {name!r} holds {int((~torch.isfinite(t)).sum())} non-finite "
                    f"values (NaN/inf); nothing was written to {str(directory)!r}. Check the adapter (a diverged "
                    "run, or a merge overflowing a half-precision base) or pass safe=False to write it anyway"
                )

    def fill(staging: Path) -> None:
        if hasattr(plain, "save_pretrained"):
            plain.save_pretrained(staging)
        else:
            from safetensors.torch import save_model

            save_model(plain, str(staging / "model.safetensors"))

    replace_directory(target, fill, owned=_merged_owned)
    return Path(directory)


def _scheme(module: nn.Module) -> str | None:
    try:
        return quant_scheme(module)
    except UnsupportedLayerError:
        return "unsupported"


def _check_quantized_reloads(model: nn.Module) -> None:
    """Refuse to write a transformers model whose quantized layers ``from_pretrained`` could not rebuild.

    transformers rebuilds quantized layers only from the ``quantization_config`` its loader recorded; layers
    quantized by ``lightning_adapters.quantize`` have none, so their packed / int8 tensors would load as plain
    weights (an int8 one silently, as its integer codes).
    """
    if getattr(getattr(model, "config", None), "quantization_config", None) is not None:
        return
    held = [(n, s) for n, m in model.named_modules() if (s := _scheme(m)) is not None]
    if held:
        name, scheme = held[0]
        more = f" and {len(held) - 1} more" if len(held) > 1 else ""
        raise AdapterConfigError(
            f"export_merged: {name!r}{more} hold quantized weights ({scheme}) that no quantization_config of the "
            "model describes (quantized by lightning_adapters.quantize, not by transformers' loader), so "
            "from_pretrained would read them as plain weights; pass dtype=torch.bfloat16 (or torch.float32) to "
            "export them dequantized, with the adapter merged in full precision"
        )


def _finite(t: torch.Tensor) -> bool:
    """Whether every value of ``t`` is finite; a quantized tensor subclass (torchao) is checked dequantized."""
    if type(t) not in (torch.Tensor, nn.Parameter) and hasattr(t, "dequantize"):
        t = t.dequantize()
    return bool(torch.isfinite(t).all())


def export_at_fit_end(
    trainer: Any,
    target: nn.Module,
    *,
    peft_dir: str | None = None,
    merged_dir: str | None = None,
    names: list[str] | None = None,
) -> None:
    """Write ``target`` (the injected module) in PEFT's format to ``peft_dir`` and merged to ``merged_dir``.

    ``names`` are the adapters the PEFT export holds (``None``: every one; PEFT's layout, ``default`` at the root and
    the others in sub-folders named after them); the merged copy folds in the adapters that act.

    Every rank calls it (sharded tensors are gathered collectively); rank zero writes.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel

    if not (peft_dir or merged_dir):
        return
    if peft_dir:
        if any(hasattr(p, "device_mesh") for p in target.parameters()):
            # save_peft gathers DTensors collectively, so every rank runs it; only rank zero keeps the files.
            if trainer.is_global_zero:
                save_peft(target, peft_dir, safe=True, names=names)
            else:
                with tempfile.TemporaryDirectory() as scratch:  # its lock file too lands inside scratch
                    save_peft(target, Path(scratch) / "adapter", safe=True, names=names)
        elif isinstance(trainer.strategy.model, FullyShardedDataParallel):
            with FullyShardedDataParallel.summon_full_params(trainer.strategy.model, writeback=False):
                if trainer.is_global_zero:
                    save_peft(target, peft_dir, safe=True, names=names)
        elif is_zero3(trainer.strategy):
            with gathered(trainer.strategy, (p for p in target.parameters() if p.requires_grad)):
                if trainer.is_global_zero:
                    save_peft(target, peft_dir, safe=True, names=names)
        elif trainer.is_global_zero:
            save_peft(target, peft_dir, safe=True, names=names)
    if merged_dir and trainer.is_global_zero:
        export_merged(target, merged_dir)
    trainer.strategy.barrier("lightning_adapters.export")
