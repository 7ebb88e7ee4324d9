"""Export at the end of ``fit``: a PEFT-format adapter directory and a merged plain model.

``export_merged`` merges into a copy, so the trained model in memory keeps its adapter (merging and unmerging
in place would round a bf16 base twice). Both exports are written by rank zero; under FSDP the adapter tensors
are gathered first, with every rank taking part.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from lightning_adapters.core.inject import eject
from lightning_adapters.interop.peft import save_peft

if TYPE_CHECKING:
    from lightning_adapters.lightning.runtime import AdapterRuntime


def export_merged(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write a plain copy of an injected ``model`` with its adapter merged into the base weights.

    A transformers model is written with ``save_pretrained`` (loadable with ``from_pretrained``); any other
    module as ``model.safetensors`` (``safetensors.torch.load_model`` into a fresh instance). ``model`` itself is
    left untouched. The files are written into a scratch directory inside ``directory`` and renamed into place
    one by one, so a failure midway never leaves a half-written file where a previous export's file was.

    Args:
        model: The injected model (not sharded).
        directory: Output directory (created if needed).

    Returns:
        The directory.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    plain = eject(copy.deepcopy(model), merge=True)
    # Inside ``directory``: the same file system, so each rename below is atomic.
    scratch = Path(tempfile.mkdtemp(prefix=".export-", suffix=".tmp", dir=directory))
    try:
        if hasattr(plain, "save_pretrained"):
            plain.save_pretrained(scratch)
        else:
            from safetensors.torch import save_model

            save_model(plain, str(scratch / "model.safetensors"))
        written = sorted(scratch.iterdir())  # save_pretrained writes plain files, no sub-directories
        for f in written:
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        for f in written:
            os.replace(f, directory / f.name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return directory


def export_at_fit_end(trainer: Any, pl_module: nn.Module, runtime: AdapterRuntime) -> None:
    """Write the exports the runtime's options ask for."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    opts = runtime.options
    if not (opts.export_peft_dir or opts.export_merged_dir):
        return
    target = runtime.injected_target(pl_module)
    if opts.export_peft_dir:
        if any(hasattr(p, "device_mesh") for p in target.parameters()):
            # save_peft gathers DTensors collectively, so every rank runs it; only rank zero keeps the files.
            if trainer.is_global_zero:
                save_peft(target, opts.export_peft_dir)
            else:
                with tempfile.TemporaryDirectory() as scratch:
                    save_peft(target, scratch)
        elif isinstance(trainer.strategy.model, FullyShardedDataParallel):
            with FullyShardedDataParallel.summon_full_params(trainer.strategy.model, writeback=False):
                if trainer.is_global_zero:
                    save_peft(target, opts.export_peft_dir)
        elif trainer.is_global_zero:
            save_peft(target, opts.export_peft_dir)
    if opts.export_merged_dir and trainer.is_global_zero:
        export_merged(target, opts.export_merged_dir)
    trainer.strategy.barrier("lightning_adapters.export")
