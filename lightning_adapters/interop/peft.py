"""Hugging Face PEFT's on-disk format: ``adapter_config.json`` + ``adapter_model.safetensors``.

``save_peft`` writes what PEFT 0.21's ``save_pretrained`` writes for a ``PeftModel`` around the same base
(keys ``base_model.model.<module>.<suffix>``, PEFT's field names), so ``PeftModel.from_pretrained`` loads it;
``load_peft`` reads such a directory (with or without the ``base_model.model.`` prefix), injects the matching
method and loads the tensors. Per-method names and layouts come from the registry (``MethodSpec`` and each
layer's ``peft_state``).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_adapters.core.inject import adapted_modules, eject, find_records, inject
from lightning_adapters.errors import AdapterConfigError, AdapterStateError
from lightning_adapters.registry import get_method, get_method_by_peft_type

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
PEFT_VERSION = "0.21.2"


def _full(t: torch.Tensor) -> torch.Tensor:
    """A full, contiguous CPU copy (gathers a sharded DTensor; all ranks must call this together)."""
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.detach().to("cpu").contiguous().clone()


def _single_record(model: nn.Module):
    recs = find_records(model)
    if not recs:
        raise AdapterConfigError("model has no adapters; call lightning_adapters.inject(model, config) first")
    if len(recs) > 1:
        raise AdapterConfigError(f"model has adapters on several sub-modules {[r[0] for r in recs]}; save each one")
    return recs[0]


def peft_tensors(model: nn.Module, save_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The adapter tensors under PEFT's key names (``base_model.model.<module>.<suffix>``)."""
    prefix, root, rec = _single_record(model)
    spec = get_method(rec.method)
    out: dict[str, torch.Tensor] = {}
    if spec.peft_state is not None:
        items = spec.peft_state(root).items()
    else:
        items = (
            (f"{name}.{suffix}", t)
            for name, _, layer in adapted_modules(root)
            for suffix, t in layer.peft_state().items()
        )
    for key, t in items:
        out[PEFT_PREFIX + key] = t
    for m in rec.modules_to_save:
        for k, t in root.get_submodule(m).state_dict().items():
            out[f"{PEFT_PREFIX}{m}.{k}"] = t
    out = {k: _full(v) for k, v in out.items()}
    if save_dtype is not None:
        out = {k: v.to(save_dtype) if v.is_floating_point() else v for k, v in out.items()}
    return out


def peft_config_dict(model: nn.Module) -> dict[str, Any]:
    """The ``adapter_config.json`` content PEFT would write for this adapter."""
    _, root, rec = _single_record(model)
    spec = get_method(rec.method)
    cfg = rec.config
    d = spec.config_to_peft(cfg)
    if spec.peft_config_extra is not None:
        d.update(spec.peft_config_extra(root))
    target = cfg.target_modules
    if target == "all-linear" or target is None:
        # PEFT resolves these before saving; write the resolved names so any loader selects the same modules.
        target = sorted(rec.targets)
    base_cfg = getattr(root, "config", None)
    d.update(
        {
            "target_modules": target,
            "exclude_modules": cfg.exclude_modules,
            "modules_to_save": list(cfg.modules_to_save) if cfg.modules_to_save else None,
            "task_type": None,
            "inference_mode": True,
            "base_model_name_or_path": getattr(base_cfg, "_name_or_path", None) or None,
            "revision": None,
            "peft_version": PEFT_VERSION,
        }
    )
    # A whole-model method can rewrite fields it resolved at injection (e.g. Llama-Adapter's attention name).
    if "peft_config" in rec.extra:
        d = rec.extra["peft_config"](d)
    return {k: d[k] for k in sorted(d)}


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file next to ``path`` and rename it over ``path`` (never half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_peft(model: nn.Module, directory: str | os.PathLike, save_dtype: torch.dtype | None = None) -> Path:
    """Write the adapter of ``model`` in PEFT's format; ``PeftModel.from_pretrained(base, directory)`` loads it.

    Everything is computed before the first byte is written, and each file is written to a temporary name
    and renamed, so a failure never leaves a half-written adapter where a good one was.

    Args:
        model: A model injected with ``lightning_adapters.inject`` (or ``load_peft``).
        directory: Output directory (created if needed).
        save_dtype: Cast floating tensors to this dtype in the file (default: keep the adapter dtype).

    Returns:
        The directory path.
    """
    from safetensors.torch import save as st_save

    directory = Path(directory)
    tensors = peft_tensors(model, save_dtype)
    config_bytes = (json.dumps(peft_config_dict(model), indent=2, sort_keys=True) + "\n").encode()
    weights_bytes = st_save(tensors, metadata={"format": "pt"})
    atomic_write_bytes(directory / WEIGHTS_NAME, weights_bytes)
    atomic_write_bytes(directory / CONFIG_NAME, config_bytes)
    return directory


def read_peft_dir(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read and validate a PEFT adapter directory: its config dict and its tensors (prefix removed)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    cfg_path, w_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not cfg_path.is_file():
        raise AdapterStateError(f"{cfg_path} does not exist; a PEFT adapter directory holds {CONFIG_NAME}")
    if not w_path.is_file():
        alt = directory / "adapter_model.bin"
        hint = " (only safetensors files are read: re-save it with safe_serialization=True)" if alt.exists() else ""
        raise AdapterStateError(f"{w_path} does not exist{hint}")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as err:
        raise AdapterStateError(f"{cfg_path} is not valid JSON ({err}); re-save the adapter") from err
    if not isinstance(config, dict) or "peft_type" not in config:
        raise AdapterStateError(f"{cfg_path} has no 'peft_type' field; it is not a PEFT adapter config")
    try:
        tensors = load_file(str(w_path))
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterStateError(
            f"{w_path} is not a readable safetensors file ({err}); it may be truncated or in another format"
        ) from err
    stripped = {}
    for k, v in tensors.items():
        stripped[k[len(PEFT_PREFIX) :] if k.startswith(PEFT_PREFIX) else k] = v
    return config, stripped


def load_peft(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Inject the adapter described by a PEFT directory into ``model`` and load its weights.

    Every key and shape is checked; on any mismatch the injection is undone and ``model`` is left as it was.

    Returns:
        ``model``, injected and with the adapter trainable.

    Raises:
        AdapterStateError: Unreadable directory, or missing / unexpected / mis-shaped tensors.
        AdapterConfigError: An unknown or unsupported ``peft_type`` or PEFT option.
    """
    config_dict, tensors = read_peft_dir(directory)
    spec = get_method_by_peft_type(config_dict["peft_type"])
    config = spec.config_from_peft(config_dict)
    if spec.prepare_peft_load is not None:
        config, tensors = spec.prepare_peft_load(config, config_dict, tensors)
    if find_records(model):
        raise AdapterConfigError("model already has adapters; eject them before load_peft")
    inject(model, config)
    try:
        _load_tensors(model, tensors, spec)
    except BaseException:
        eject(model)
        raise
    return model


def _load_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], spec) -> None:
    _, root, rec = _single_record(model)
    expected: dict[str, tuple[int, ...]] = {}
    if spec.peft_state is not None:
        expected.update({k: tuple(v.shape) for k, v in spec.peft_state(root).items()})
    else:
        for name, _, layer in adapted_modules(root):
            for suffix, shape in layer.peft_shapes().items():
                expected[f"{name}.{suffix}"] = shape
    for m in rec.modules_to_save:
        for k, t in root.get_submodule(m).state_dict().items():
            expected[f"{m}.{k}"] = tuple(t.shape)
    # PEFT writes full base embedding / lm_head matrices next to the adapter when they are targeted
    # (``save_embedding_layers``); they load into the base layer as PEFT loads them.
    base_layer_keys = {}
    for name, base, _ in adapted_modules(root):
        key = f"{name}.base_layer.weight"
        if key in tensors:
            base_layer_keys[key] = base
            expected[key] = tuple(base.weight.shape)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    bad = {
        k: (tuple(tensors[k].shape), s) for k, s in expected.items() if k in tensors and tuple(tensors[k].shape) != s
    }
    if missing or unexpected or bad:
        parts = []
        if missing:
            parts.append(f"missing {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
        if bad:
            parts.append("mis-shaped " + ", ".join(f"{k}: file {f}, model {e}" for k, (f, e) in list(bad.items())[:8]))
        raise AdapterStateError(
            f"PEFT {spec.peft_type} adapter does not fit the model: "
            + "; ".join(parts)
            + ". Check the adapter was trained on this base model architecture"
        )
    if spec.load_peft_state is not None:
        spec.load_peft_state(root, tensors)
    else:
        for name, _, layer in adapted_modules(root):
            prefix = name + "."
            layer.load_peft_state(
                {
                    k[len(prefix) :]: v
                    for k, v in tensors.items()
                    if k.startswith(prefix) and k[len(prefix) :] in layer.peft_shapes()
                }
            )
    with torch.no_grad():
        for key, base in base_layer_keys.items():
            base.weight.copy_(tensors[key].to(dtype=base.weight.dtype, device=base.weight.device))
        for m in rec.modules_to_save:
            mod = root.get_submodule(m)
            for k, t in list(mod.named_parameters()) + list(mod.named_buffers()):
                key = f"{m}.{k}"
                if key in tensors:
                    t.copy_(tensors[key].to(dtype=t.dtype, device=t.device))
