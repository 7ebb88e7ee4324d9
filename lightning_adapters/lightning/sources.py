"""Adapters loaded into a model before a fit (``AdapterCallback(init_from={name: source})``).

A source is a PEFT directory (``adapter_config.json`` + weights, e.g. a ``save_peft`` or ``export_peft_dir``
output or a hub adapter) or an adapter checkpoint written by this integration (a ``.ckpt`` of ``ModelCheckpoint``
or ``trainer.save_checkpoint``). Either is loaded under the name it is given: a checkpoint holding one adapter
gives that one whatever it was called; a checkpoint holding several gives the one of that name. Keys are
relative to the module the adapters go into (for a checkpoint: the sub-module it was trained on, its ``module``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from lightning_adapters.config import AdapterConfig
from lightning_adapters.core.inject import adapter_layers, eject, find_records, inject
from lightning_adapters.core.layer import ADAPTER_ATTR
from lightning_adapters.core.named import delete
from lightning_adapters.core.state import adapter_prefixes, is_adapter_key, load_adapter_state_dict
from lightning_adapters.errors import AdapterConfigError, AdapterStateError
from lightning_adapters.interop.peft import CONFIG_NAME, load_peft, read_peft_dir
from lightning_adapters.lightning.checkpoint import (
    METADATA_KEY,
    check_metadata_entry,
    check_state_entry,
    config_from_entry,
    load_checkpoint_file,
    saved_adapters,
)
from lightning_adapters.lightning.scope import inner_config
from lightning_adapters.registry import get_method_by_peft_type


def check_source(name: str, path: object) -> str:
    """``path`` as a string if it can be a source (an existing PEFT directory or file); else a clear error.

    Raises:
        AdapterConfigError: Not a path, or nothing there, naming ``name`` and what is expected.
    """
    if not isinstance(path, (str, os.PathLike)) or not str(path).strip():
        raise AdapterConfigError(
            f"init_from[{name!r}] must be the path of a PEFT directory or an adapter checkpoint (.ckpt), got {path!r}"
        )
    p = Path(path)
    if not (p.is_file() or (p / CONFIG_NAME).is_file() or (p / name / CONFIG_NAME).is_file()):
        raise AdapterConfigError(
            f"init_from[{name!r}] = {str(path)!r} is neither a PEFT directory (with {CONFIG_NAME}) nor an adapter "
            "checkpoint file; pass the directory save_peft / export_peft_dir wrote, or a .ckpt of this integration"
        )
    return str(path)


def load_adapter(target: nn.Module, name: str, path: str) -> None:
    """Inject the adapter stored at ``path`` into ``target`` as ``name`` and load its tensors (nothing on failure).

    Raises:
        AdapterConfigError: ``path`` is no source (``check_source``), or the adapter cannot join ``target``'s.
        AdapterStateError: The file is unreadable, holds no adapter of that name, or does not fit ``target``.
    """
    path = check_source(name, path)
    if Path(path).is_dir():
        load_peft(target, path, name=name)
    else:
        _load_from_checkpoint(target, name, path)


def stored_config(name: str, path: str) -> AdapterConfig:
    """The config of the adapter ``load_adapter(target, name, path)`` would load, read without loading it.

    Raises:
        AdapterConfigError: ``path`` is no source, or the PEFT config is not supported.
        AdapterStateError: The file is unreadable or holds no adapter of that name.
    """
    path = check_source(name, path)
    if Path(path).is_dir():
        # A directory of several adapters holds the others in sub-folders named after them (as load_peft reads it).
        folder = Path(path) / name if (Path(path) / name / CONFIG_NAME).is_file() else Path(path)
        config_dict, _ = read_peft_dir(folder)
        return get_method_by_peft_type(config_dict["peft_type"]).config_from_peft(config_dict)
    meta, _, held, source = _read_checkpoint(name, path)
    return config_from_entry(held[source], path)


def _read_checkpoint(name: str, path: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], str]:
    # (metadata, state, {adapter: entry}, the adapter of the file that ``name`` is loaded from)
    checkpoint = load_checkpoint_file(path)
    meta = checkpoint.get(METADATA_KEY) if isinstance(checkpoint, dict) else None
    if meta is None:
        raise AdapterStateError(
            f"init_from[{name!r}] = {path!r} is not an adapter checkpoint of AdapterCallback/AdapterMixin (no "
            f"'{METADATA_KEY}' entry); pass one of those, or a PEFT directory"
        )
    check_metadata_entry(meta, path)
    state = check_state_entry(checkpoint, path)
    held = saved_adapters(meta, path)
    if len(held) == 1:
        (source,) = held
    elif name in held:
        source = name
    else:
        raise AdapterStateError(
            f"init_from[{name!r}] = {path!r} holds the adapters {sorted(held)}; name the one to load as one of them"
        )
    return meta, state, held, source


def _load_from_checkpoint(target: nn.Module, name: str, path: str) -> None:
    meta, state, held, source = _read_checkpoint(name, path)
    config = inner_config(target, config_from_entry(held[source], path))
    # The file's keys: "<module>." + the target's keys, the source's name in place of ``name`` in layer keys.
    prefix = f"{meta['module']}." if meta.get("module") else ""
    had = bool(find_records(target))
    inject(target, config, name=name)
    try:
        renamed = {}  # live layer-key prefix -> (name-free prefix, the file's prefix)
        for module_name, _, _, _ in adapter_layers(target, [name]):
            base = f"{module_name}." if module_name else ""
            stored = f"{base}{ADAPTER_ATTR}.{source}." if "adapters" in meta else f"{base}{ADAPTER_ATTR}."
            renamed[f"{base}{ADAPTER_ATTR}.{name}."] = (f"{base}{ADAPTER_ATTR}.", stored)
        tensors, missing = {}, []
        own = adapter_prefixes(target, [name])
        for live in target.state_dict():
            if not is_adapter_key(live, own):
                continue
            key = stored = live
            for live_prefix, (free_prefix, stored_prefix) in renamed.items():
                if live.startswith(live_prefix):
                    key = free_prefix + live[len(live_prefix) :]
                    stored = stored_prefix + live[len(live_prefix) :]
                    break
            if prefix + stored in state:
                tensors[key] = state[prefix + stored]
            else:
                missing.append(prefix + stored)
        if missing:
            raise AdapterStateError(
                f"init_from[{name!r}] = {path!r} lacks {sorted(missing)[:6]} for its {held[source]['method']} "
                f"adapter {source!r} on this model; pass the model (sub-module) that adapter was trained on"
            )
        load_adapter_state_dict(target, tensors, name=name)
    except BaseException:
        if had:
            delete(target, name)
        else:
            eject(target)
        raise
