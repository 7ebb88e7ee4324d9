"""Adapter-only Lightning checkpoints: the filter, the metadata, the resume checks and ``restore_from_checkpoint``.

A checkpoint written through the integration keeps Lightning's layout (so ``ModelCheckpoint``'s top-k,
``save_last``, loggers and ``fit(ckpt_path=...)`` work unchanged), but ``checkpoint["state_dict"]`` holds only
the adapter and ``modules_to_save`` tensors, and ``checkpoint["lightning_adapters"]`` says what they belong to::

    {"format": 1, "library_version": "0.1.0", "method": "lora", "config": {...}, "module": "model",
     "base_fingerprint": "3f2a...", "adapter_shapes": {"model.layers.0.q_proj.adapter.lora_A": [8, 64], ...}}

Keys and shapes are relative to the LightningModule; ``module`` is the injected sub-module (``""``: the whole
LightningModule). Which keys are adapter keys is read from the injection record, never from name substrings.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lightning_adapters.core.inject import eject, find_records, inject
from lightning_adapters.core.state import base_fingerprint, is_adapter_key, load_adapter_state_dict
from lightning_adapters.errors import AdapterStateError
from lightning_adapters.registry import get_method

if TYPE_CHECKING:
    from lightning_adapters.lightning.runtime import AdapterRuntime

METADATA_KEY = "lightning_adapters"
FORMAT_VERSION = 1


def _shape(t: Any) -> list[int]:
    return [int(s) for s in t.shape]


def _list(keys: list[str], limit: int = 6) -> str:
    keys = sorted(keys)
    return f"{keys[:limit]}{f' and {len(keys) - limit} more' if len(keys) > limit else ''}"


def expected_shapes(pl_module: nn.Module, runtime: AdapterRuntime) -> dict[str, list[int]]:
    """Full (global) shape of every adapter tensor, keyed as in the LightningModule's state dict.

    FSDP1 flattens parameters and gathers the whole model in ``state_dict()``, so under it the shapes recorded
    at injection are used; elsewhere ``state_dict()`` only returns references (DTensors report global shapes).
    """
    from torch.distributed.fsdp import FullyShardedDataParallel

    if any(isinstance(m, FullyShardedDataParallel) for m in pl_module.modules()):
        return dict(runtime.shapes)
    prefixes = runtime.adapter_key_prefixes(pl_module)
    return {k: _shape(v) for k, v in pl_module.state_dict().items() if is_adapter_key(k, prefixes)}


def build_metadata(pl_module: nn.Module, runtime: AdapterRuntime) -> dict[str, Any]:
    """The ``checkpoint["lightning_adapters"]`` entry for the current adapter."""
    from lightning_adapters import __version__

    target = runtime.injected_target(pl_module)
    record = find_records(target)[0][2]
    return {
        "format": FORMAT_VERSION,
        "library_version": __version__,
        "method": record.method,
        "config": runtime.config.to_dict(),
        "module": runtime.options.module or "",
        "base_fingerprint": runtime.fingerprint,
        "adapter_shapes": expected_shapes(pl_module, runtime),
    }


def filter_checkpoint(checkpoint: dict[str, Any], pl_module: nn.Module, runtime: AdapterRuntime) -> None:
    """Drop every non-adapter tensor from ``checkpoint["state_dict"]``, check the rest, add the metadata.

    Raises:
        AdapterStateError: An adapter tensor is missing, a rank's shard or empty where the full tensor is due.
    """
    meta = build_metadata(pl_module, runtime)
    state = checkpoint.get("state_dict", {})
    prefixes = runtime.adapter_key_prefixes(pl_module)
    kept = {k: v for k, v in state.items() if is_adapter_key(k, prefixes)}
    # Sharded strategies gather the state on rank 0 only; other ranks hold an empty dict and write nothing.
    if state:
        shapes = meta["adapter_shapes"]
        missing = [k for k in shapes if k not in kept]
        bad = [f"{k}: {_shape(v)} (full shape {shapes[k]})" for k, v in kept.items() if _shape(v) != shapes[k]]
        sharded = [k for k, v in kept.items() if hasattr(v, "device_mesh")]
        if missing or bad or sharded:
            raise AdapterStateError(
                "refusing to write an adapter checkpoint that would not restore: "
                + "; ".join(
                    part
                    for part in (
                        f"missing {_list(missing)}" if missing else "",
                        f"partial or empty tensors {bad[:6]}" if bad else "",
                        f"still-sharded tensors {_list(sharded)}" if sharded else "",
                    )
                    if part
                )
                + ". With FSDP, save full state dicts (the integration sets this up for FSDPStrategy and "
                "ModelParallelStrategy; keep the strategy's checkpoint settings at their adapter defaults)"
            )
    checkpoint["state_dict"] = kept
    checkpoint[METADATA_KEY] = meta


def _config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    # A field the current config leaves at None is filled at fit time (e.g. AdaLoRA's total_step): not a change.
    diffs = []
    for name in sorted(set(saved) | set(current)):
        now, then = current.get(name), saved.get(name)
        if now is not None and now != then:
            diffs.append(f"{name}: checkpoint {then!r}, now {now!r}")
    return diffs


def check_metadata(meta: dict[str, Any], method: str, config_dict: dict[str, Any], fingerprint: str | None) -> None:
    """Refuse a checkpoint trained with another method, config or base model.

    Raises:
        AdapterStateError: Naming what differs and how to proceed.
    """
    if meta.get("method") != method:
        raise AdapterStateError(
            f"the checkpoint holds a {meta.get('method')!r} adapter but this model uses {method!r}; resume with the "
            "config the checkpoint was trained with, or start a new run without ckpt_path"
        )
    diffs = _config_differences(meta.get("config", {}), config_dict)
    if diffs:
        raise AdapterStateError(
            f"the checkpoint was trained with a different {method} config ({'; '.join(diffs)}); resume with the "
            "same config, or start a new run without ckpt_path"
        )
    saved_fp = meta.get("base_fingerprint")
    if saved_fp is not None and fingerprint is not None and saved_fp != fingerprint:
        raise AdapterStateError(
            f"the checkpoint was trained on a different base model (fingerprint {saved_fp}, this model "
            f"{fingerprint}): the adapter only makes sense on the base it was trained on. Load the same base "
            "weights (same checkpoint and revision) before resuming"
        )


def validate_checkpoint(checkpoint: dict[str, Any], pl_module: nn.Module, runtime: AdapterRuntime) -> None:
    """The strict half of non-strict loading: metadata, every adapter key and shape, no unknown key."""
    target = runtime.injected_target(pl_module)
    method = find_records(target)[0][2].method
    expected = expected_shapes(pl_module, runtime)
    meta = checkpoint.get(METADATA_KEY)
    if meta is not None:
        check_metadata(meta, method, runtime.config.to_dict(), runtime.fingerprint)
        saved = meta.get("adapter_shapes", {})
        missing = sorted(set(expected) - set(saved))
        extra = sorted(set(saved) - set(expected))
        bad = [f"{k}: checkpoint {saved[k]}, model {v}" for k, v in expected.items() if k in saved and saved[k] != v]
        if missing or extra or bad:
            raise AdapterStateError(
                "the checkpoint's adapter does not fit this model: "
                + "; ".join(
                    p
                    for p in (
                        f"missing {_list(missing)}" if missing else "",
                        f"unexpected {_list(extra)}" if extra else "",
                        f"mis-shaped {bad[:6]}" if bad else "",
                    )
                    if p
                )
                + ". Resume with the model and config the checkpoint was trained with"
            )
    # Sharded strategies have already loaded the tensors and removed "state_dict" from the checkpoint.
    state = checkpoint.get("state_dict")
    if state is None:
        return
    model_keys = set(pl_module.state_dict())
    missing = [k for k in expected if k not in state]
    unknown = [k for k in state if k not in model_keys]
    bad = [f"{k}: {_shape(state[k])} vs {v}" for k, v in expected.items() if k in state and _shape(state[k]) != v]
    if missing or unknown or bad:
        origin = "" if meta is not None else " (it was not written by lightning_adapters)"
        raise AdapterStateError(
            f"the checkpoint{origin} does not hold this model's adapter: "
            + "; ".join(
                p
                for p in (
                    f"missing adapter keys {_list(missing)}" if missing else "",
                    f"keys the model does not have {_list(unknown)}" if unknown else "",
                    f"mis-shaped {bad[:6]}" if bad else "",
                )
                if p
            )
            + ". Resume from a checkpoint that AdapterCallback/AdapterMixin wrote for this model and config, or "
            "start a new run without ckpt_path"
        )


def load_checkpoint_file(path: str | os.PathLike, weights_only: bool = True) -> dict[str, Any]:
    """Read a Lightning checkpoint file onto the CPU."""
    path = Path(path)
    if path.is_dir():
        raise AdapterStateError(
            f"{path} is a directory (a sharded checkpoint); adapter checkpoints are single files: train with the "
            "integration's defaults, which save full adapter state dicts"
        )
    if not path.is_file():
        raise AdapterStateError(f"checkpoint file {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as err:
        if weights_only and "weights_only" in str(err):
            raise AdapterStateError(
                f"{path} holds objects that torch.load(weights_only=True) refuses ({str(err).splitlines()[0]}); "
                "if you trust the file, pass weights_only=False"
            ) from err
        reason = f"{type(err).__name__}: {str(err).splitlines()[0]}" if str(err) else type(err).__name__
        raise AdapterStateError(
            f"{path} is not a readable checkpoint ({reason}); "
            "it may be truncated (a copy or write that did not finish) or not a torch checkpoint. Use another "
            "checkpoint of the run (e.g. the previous top-k file) or write it again"
        ) from err


def restore_from_checkpoint(
    model: nn.Module, ckpt_path: str | os.PathLike, *, check_base: bool = True, weights_only: bool = True
) -> nn.Module:
    """Inject the adapter of a Lightning adapter checkpoint into a base model and load its tensors.

    Args:
        model: Either a LightningModule of the class that was trained, or the bare model that was adapted (the
            sub-module named by ``AdapterCallback(module=...)``), freshly built with the same base weights.
        ckpt_path: A ``.ckpt`` written by ``ModelCheckpoint``/``trainer.save_checkpoint`` with the integration.
        check_base: Refuse a base model whose fingerprint differs from the one the adapter was trained on.
        weights_only: Passed to ``torch.load``.

    Returns:
        ``model``, injected, with the trained adapter loaded and ready for inference, merging or export.

    Raises:
        AdapterStateError: Not an adapter checkpoint (or unreadable), a different base, or keys that do not fit.
    """
    from lightning.pytorch import LightningModule

    checkpoint = load_checkpoint_file(ckpt_path, weights_only=weights_only)
    meta = checkpoint.get(METADATA_KEY)
    if meta is None:
        raise AdapterStateError(
            f"{ckpt_path} has no '{METADATA_KEY}' entry: it was not written by AdapterCallback/AdapterMixin"
        )
    spec = get_method(meta["method"])
    config = spec.config_cls(**meta["config"])
    module = meta.get("module", "")
    prefix = f"{module}." if module else ""
    if isinstance(model, LightningModule):
        target = model.get_submodule(module) if module else model
    elif not module:
        raise AdapterStateError(
            "the adapter was injected into the whole LightningModule, so its keys are relative to it; pass an "
            "instance of the trained LightningModule class (not the bare model) to restore_from_checkpoint"
        )
    else:
        target = model
    inject(target, config)
    try:
        if check_base:
            check_metadata(meta, spec.name, config.to_dict(), base_fingerprint(target))
        state = {k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
        load_adapter_state_dict(target, state, strict=True)
    except BaseException:
        eject(target)
        raise
    return model
