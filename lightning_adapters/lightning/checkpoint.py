"""Adapter-only Lightning checkpoints: the filter, the metadata, the resume checks and ``restore_from_checkpoint``.

A checkpoint written through the integration keeps Lightning's layout (so ``ModelCheckpoint``'s top-k,
``save_last``, loggers and ``fit(ckpt_path=...)`` work unchanged), but ``checkpoint["state_dict"]`` holds only
the adapter and ``modules_to_save`` tensors, and ``checkpoint["lightning_adapters"]`` says what they belong to::

    {"format": 2, "library_version": "0.1.0", "method": "lora", "config": {...}, "module": "model",
     "name": "b", "adapters": {"a": {"method": "lora", "config": {...}}, "b": {...}},
     "active": ["a", "b"], "trainable": ["b"],
     "base_fingerprint": "3f2a...", "adapter_shapes": {"model.layers.0.q_proj.adapter.b.lora_A": [8, 64], ...}}

Keys and shapes are relative to the LightningModule; ``module`` is the injected sub-module (``""``: the whole
LightningModule). ``adapters`` lists every adapter the file holds (the fit may save fewer than the module has);
``name`` is the one the fit trained, and ``method``/``config`` are its own (format 1 files hold one adapter and
only these). Which keys are adapter keys is read from the injection records, never from name substrings.
"""

from __future__ import annotations

import dataclasses
import os
import re
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_adapters.config import AdapterConfig
from lightning_adapters.core.inject import DEFAULT_NAME, check_module, eject, find_records, inject, known_names
from lightning_adapters.core.layer import ADAPTER_ATTR
from lightning_adapters.core.named import delete, set_active, set_trainable
from lightning_adapters.core.report import StateReport, key_list
from lightning_adapters.core.state import (
    adapter_prefixes,
    base_fingerprint,
    is_adapter_key,
    load_adapter_state_dict,
    name_free_keys,
)
from lightning_adapters.errors import AdapterConfigError, AdapterStateError
from lightning_adapters.lightning.scope import inner_config
from lightning_adapters.registry import LayerMethod, get_method

METADATA_KEY = "lightning_adapters"
# Under DeepSpeed the checkpoint is the engine's directory; its client state keeps the adapter tensors here.
DEEPSPEED_ADAPTER_KEY = "lightning_adapters_state_dict"
# The engine's file holding rank 0's client state, below DeepSpeedStrategy's tag "checkpoint": ZeRO 1-2, then 3.
DEEPSPEED_STATES = (
    Path("checkpoint") / "mp_rank_00_model_states.pt",
    Path("checkpoint") / "zero_pp_rank_0_mp_rank_00_model_states.pt",
)
FORMAT_VERSION = 2


def _shape(t: Any) -> list[int]:
    return [int(s) for s in t.shape]


def expected_shapes(
    pl_module: nn.Module, saved: Callable[[str], bool], recorded: Mapping[str, list[int]]
) -> dict[str, list[int]]:
    """Full (global) shape of every saved tensor, keyed as in the LightningModule's state dict.

    Args:
        pl_module: The LightningModule.
        saved: Which of its state-dict keys a checkpoint holds (adapter tensors and what trains beside them).
        recorded: The shapes taken at injection, used under FSDP1, which flattens parameters and gathers the
            whole model in ``state_dict()``; elsewhere ``state_dict()`` only returns references (DTensors report
            global shapes).
    """
    from torch.distributed.fsdp import FullyShardedDataParallel

    if any(isinstance(m, FullyShardedDataParallel) for m in pl_module.modules()):
        return dict(recorded)
    # keep_vars: ZeRO-3 parameters are empty partitions that carry their full shape as ds_shape.
    state = pl_module.state_dict(keep_vars=True)
    return {k: [int(s) for s in getattr(v, "ds_shape", v.shape)] for k, v in state.items() if saved(k)}


def build_metadata(
    *,
    adapters: dict[str, tuple[str, AdapterConfig]],
    name: str,
    active: list[str],
    trainable: list[str],
    module: str,
    fingerprint: str | None,
    shapes: dict[str, list[int]],
) -> dict[str, Any]:
    """The ``checkpoint["lightning_adapters"]`` entry (see the module docstring for the fields).

    Args:
        adapters: ``{name: (method, config)}`` of the adapters the checkpoint holds, in the module's order.
        name: The adapter the fit trains.
        active: The adapters acting.
        trainable: The adapters training.
        module: The injected sub-module (``""``: the whole LightningModule).
        fingerprint: The base model's fingerprint.
        shapes: Full shape of every saved tensor.
    """
    from lightning_adapters import __version__

    method, config = adapters.get(name, next(iter(adapters.values())))
    return {
        "format": FORMAT_VERSION,
        "library_version": __version__,
        "method": method,
        "config": config.to_dict(),
        "module": module,
        "name": name,
        "adapters": {n: {"method": m, "config": c.to_dict()} for n, (m, c) in adapters.items()},
        "active": list(active),
        "trainable": list(trainable),
        "base_fingerprint": fingerprint,
        "adapter_shapes": shapes,
    }


def saved_adapters(meta: dict[str, Any], where: str, sole: str = DEFAULT_NAME) -> dict[str, dict[str, Any]]:
    """``{name: {"method", "config"}}`` of the adapters a checkpoint holds (format 1: its one adapter as ``sole``).

    Raises:
        AdapterStateError: An ``adapters`` entry that is not what the integration writes.
    """
    if "adapters" not in meta:
        return {sole: {"method": meta["method"], "config": meta["config"]}}
    adapters = meta["adapters"]
    ok = (
        isinstance(adapters, dict)
        and adapters
        and all(
            isinstance(n, str)
            and isinstance(e, dict)
            and isinstance(e.get("method"), str)
            and isinstance(e.get("config"), dict)
            for n, e in adapters.items()
        )
    )
    if not ok:
        raise AdapterStateError(
            f"{where}: '{METADATA_KEY}'['adapters'] must map adapter names to {{'method': str, 'config': dict}}, got "
            f"{adapters!r:.200}; the file was edited or damaged"
        )
    for key in ("active", "trainable"):
        names = meta.get(key, [])
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise AdapterStateError(
                f"{where}: '{METADATA_KEY}'[{key!r}] must be a list of adapter names, got {names!r}; the file was "
                "edited or damaged"
            )
    return adapters


def filter_checkpoint(checkpoint: dict[str, Any], meta: dict[str, Any], saved: Callable[[str], bool]) -> None:
    """Keep only the ``saved`` tensors of ``checkpoint["state_dict"]``, check them against ``meta``, add ``meta``.

    Raises:
        AdapterStateError: An adapter tensor is missing, a rank's shard or empty where the full tensor is due.
    """
    state = checkpoint.get("state_dict", {})
    kept = {k: v for k, v in state.items() if saved(k)}
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
                        f"missing {key_list(missing, 6)}" if missing else "",
                        f"partial or empty tensors {bad[:6]}" if bad else "",
                        f"still-sharded tensors {key_list(sharded, 6)}" if sharded else "",
                    )
                    if part
                )
                + ". With FSDP, save full state dicts (the integration sets this up for FSDPStrategy and "
                "ModelParallelStrategy; keep the strategy's checkpoint settings at their adapter defaults)"
            )
    checkpoint["state_dict"] = kept
    checkpoint[METADATA_KEY] = meta


def _field_defaults(method: str) -> dict[str, Any]:
    # The default of every field of the method's config (fields built by a factory included).
    out = {}
    for f in dataclasses.fields(get_method(method).config_cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def _config_differences(saved: dict[str, Any], current: dict[str, Any], defaults: dict[str, Any]) -> list[str]:
    # A field the current config leaves at None is filled at fit time (e.g. AdaLoRA's total_step): not a change.
    # A field the saved config lacks was added to the library after the checkpoint was written, which then ran
    # with its default (``config_from_entry`` rebuilds it the same way).
    diffs = []
    for name in sorted(set(saved) | set(current)):
        now, then = current.get(name), saved.get(name, defaults.get(name))
        if now is not None and now != then:
            diffs.append(f"{name}: checkpoint {then!r}, now {now!r}")
    return diffs


def check_metadata_entry(meta: Any, where: str) -> None:
    """Refuse a ``checkpoint["lightning_adapters"]`` entry that is not what the integration writes.

    Args:
        meta: The entry.
        where: How to name the checkpoint in the message (its path, or "the checkpoint").

    Raises:
        AdapterStateError: Naming the missing or mistyped key.
    """
    if not isinstance(meta, dict):
        raise AdapterStateError(
            f"{where}: the '{METADATA_KEY}' entry must be a dict, got {type(meta).__name__}; the file was edited or "
            "damaged. Use a checkpoint written by AdapterCallback/AdapterMixin"
        )
    for key, kind in (("method", str), ("config", dict)):
        if key not in meta:
            raise AdapterStateError(
                f"{where}: the '{METADATA_KEY}' entry has no {key!r} key (it holds {sorted(meta)}); the file was "
                "edited or damaged. Use a checkpoint written by AdapterCallback/AdapterMixin"
            )
        if not isinstance(meta[key], kind):
            raise AdapterStateError(
                f"{where}: '{METADATA_KEY}'[{key!r}] must be a {kind.__name__}, got {meta[key]!r}; the file was "
                "edited or damaged"
            )
    for key in ("module", "base_fingerprint"):
        if meta.get(key) is not None and not isinstance(meta[key], str):
            raise AdapterStateError(f"{where}: '{METADATA_KEY}'[{key!r}] must be a string, got {meta[key]!r}")
    shapes = meta.get("adapter_shapes", {})
    if not isinstance(shapes, dict):
        raise AdapterStateError(f"{where}: '{METADATA_KEY}'['adapter_shapes'] must be a dict, got {shapes!r}")


def check_state_entry(checkpoint: dict[str, Any], where: str) -> dict[str, torch.Tensor]:
    """The checkpoint's ``state_dict``, refused unless it is a dict of tensors.

    Raises:
        AdapterStateError: No ``state_dict`` key, or a value that is not a tensor (named).
    """
    if "state_dict" not in checkpoint:
        raise AdapterStateError(
            f"{where} has no 'state_dict' key (it holds {sorted(map(str, checkpoint))}); the file was edited or "
            "damaged. Use a checkpoint written by AdapterCallback/AdapterMixin"
        )
    state = checkpoint["state_dict"]
    if not isinstance(state, dict):
        raise AdapterStateError(f"{where}: 'state_dict' must be a dict of tensors, got {type(state).__name__}")
    bad = [f"{k} ({type(v).__name__})" for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise AdapterStateError(
            f"{where}: 'state_dict' values must be tensors; got {', '.join(bad[:6])}; the file was edited or damaged"
        )
    return state


def check_metadata(
    meta: dict[str, Any],
    method: str,
    config_dict: dict[str, Any],
    fingerprint: str | None,
    *,
    name: str | None = None,
) -> None:
    """Refuse a checkpoint trained with another method, config or base model.

    Args:
        meta: The checkpoint's metadata entry.
        method: The model's method (of adapter ``name``).
        config_dict: The model's config (of adapter ``name``), as ``to_dict`` gives it.
        fingerprint: The model's base fingerprint (None: not checked).
        name: Compare with this adapter of the file (None: the file's trained adapter).

    Raises:
        AdapterStateError: Naming what differs and how to proceed.
    """
    check_metadata_entry(meta, "the checkpoint")
    held = {} if name is None else saved_adapters(meta, "the checkpoint", name)
    entry = meta if name is None else held[name]
    which = f" for adapter {name!r}" if len(held) > 1 else ""
    if entry.get("method") != method:
        raise AdapterStateError(
            f"the checkpoint holds a {entry.get('method')!r} adapter{which} but this model uses {method!r}; resume "
            "with the config the checkpoint was trained with, or start a new run without ckpt_path"
        )
    diffs = _config_differences(entry.get("config", {}), config_dict, _field_defaults(method))
    if diffs:
        raise AdapterStateError(
            f"the checkpoint was trained with a different {method} config ({'; '.join(diffs)}){which}; resume with "
            "the same config, or start a new run without ckpt_path"
        )
    saved_fp = meta.get("base_fingerprint")
    if saved_fp is not None and fingerprint is not None and saved_fp != fingerprint:
        raise AdapterStateError(
            f"the checkpoint was trained on a different base model (fingerprint {saved_fp}, this model "
            f"{fingerprint}): the adapter only makes sense on the base it was trained on. Load the same base "
            "weights (same checkpoint and revision) before resuming"
        )


def upgrade_unnamed_keys(checkpoint: dict[str, Any], pl_module: nn.Module) -> None:
    """Rename the keys of a checkpoint written before adapters had names, in place, for a one-adapter model.

    Such checkpoints key the adapter's tensors ``<module>.adapter.<tensor>``; the model's own keys are
    ``<module>.adapter.<name>.<tensor>``. Keys that are not of that form are left as they are.
    """
    names = known_names(pl_module)
    if len(names) != 1:
        return
    own = {free: live for live, free in name_free_keys(pl_module, names[0]).items()}
    state = checkpoint.get("state_dict")
    if isinstance(state, dict):
        checkpoint["state_dict"] = {own.get(k, k): v for k, v in state.items()}
    meta = checkpoint.get(METADATA_KEY)
    if isinstance(meta, dict) and isinstance(meta.get("adapter_shapes"), dict):
        meta["adapter_shapes"] = {own.get(k, k): v for k, v in meta["adapter_shapes"].items()}


def validate_checkpoint(
    checkpoint: dict[str, Any],
    pl_module: nn.Module,
    *,
    adapters: dict[str, tuple[str, AdapterConfig]],
    fingerprint: str | None,
    expected: Callable[[list[str]], dict[str, list[int]]],
) -> None:
    """The strict half of non-strict loading: metadata, every adapter key and shape, no unknown key.

    Args:
        checkpoint: The checkpoint being restored.
        pl_module: The LightningModule it is restored into.
        adapters: ``{name: (method, config)}`` of every adapter of the model.
        fingerprint: The base model's fingerprint (None: not known, not checked).
        expected: ``expected_shapes`` of the LightningModule for the given adapters' tensors.
    """
    upgrade_unnamed_keys(checkpoint, pl_module)
    meta = checkpoint.get(METADATA_KEY)
    names = list(adapters)
    if meta is not None:
        check_metadata_entry(meta, "the checkpoint")
        held = saved_adapters(meta, "the checkpoint", names[0] if len(names) == 1 else DEFAULT_NAME)
        unknown = [n for n in held if n not in adapters]
        if unknown:
            raise AdapterStateError(
                f"the checkpoint holds adapters {unknown} this model does not have (it has {names}); add them before "
                "resuming (AdapterCallback(init_from={name: source}) loads one), or resume with the setup the "
                "checkpoint was written with"
            )
        for n in held:
            method, config = adapters[n]
            check_metadata(meta, method, config.to_dict(), fingerprint, name=n if "adapters" in meta else None)
        names = list(held)
    expected = expected(names)
    if meta is not None:
        report = StateReport.compare(meta.get("adapter_shapes", {}), expected)
        if report:
            raise AdapterStateError(
                f"the checkpoint's adapter does not fit this model: {report.describe(given='checkpoint')}. Resume "
                "with the model and config the checkpoint was trained with"
            )
    # Sharded strategies have already loaded the tensors and removed "state_dict" from the checkpoint.
    if "state_dict" not in checkpoint and _strategy_loads_state(pl_module):
        return
    state = check_state_entry(checkpoint, "the checkpoint")
    # Other tensors of the model may be in the checkpoint too (a full save); only keys it does not have are wrong.
    report = StateReport.compare({k: _shape(v) for k, v in state.items()}, expected, allowed=pl_module.state_dict())
    if report:
        origin = "" if meta is not None else " (it was not written by lightning_adapters)"
        raise AdapterStateError(
            f"the checkpoint{origin} does not hold this model's adapter: {report.describe(given='checkpoint')}. "
            "Resume from a checkpoint that AdapterCallback/AdapterMixin wrote for this model and config, or start a "
            "new run without ckpt_path"
        )


def _strategy_loads_state(pl_module: nn.Module) -> bool:
    trainer = getattr(pl_module, "_trainer", None)
    if trainer is None:
        return False
    names = {c.__name__ for c in type(trainer.strategy).__mro__}
    return bool(names & {"FSDPStrategy", "ModelParallelStrategy", "DeepSpeedStrategy"})


# What torch's weights-only unpickler says of bytes that are not a pickle (a truncated or foreign file), as opposed
# to a pickle holding objects it refuses to build.
_DAMAGED_PICKLE = ("Unsupported operand", "String is too long", "persistent id", "truncated")


def load_checkpoint_file(path: str | os.PathLike, weights_only: bool = True) -> dict[str, Any]:
    """Read a Lightning checkpoint file onto the CPU."""
    path = Path(path)
    states = next((path / f for f in DEEPSPEED_STATES if (path / f).is_file()), None)
    if states is not None:
        return _deepspeed_client_state(path, states, weights_only)
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
        text = str(err)
        # torch's weights-only unpickler explains itself after "WeightsUnpickler error:": an object it will not
        # build (a global, a reduce, a class not allowlisted) or bytes that are no pickle at all.
        found = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
        detail = found.group(1).split(". ")[0].rstrip(".") if found else None
        damaged = detail is not None and any(m in detail for m in _DAMAGED_PICKLE)
        if weights_only and "weights_only" in text and not damaged:
            raise AdapterStateError(
                f"{path} holds objects that torch.load(weights_only=True) refuses ({detail or text.splitlines()[0]}); "
                "if you trust the file, pass weights_only=False"
            ) from err
        first = detail or (text.splitlines()[0] if text else "")
        reason = f"{type(err).__name__}: {first}" if first else type(err).__name__
        raise AdapterStateError(
            f"{path} is not a readable checkpoint ({reason}); "
            "it may be truncated (a copy or write that did not finish) or not a torch checkpoint. Use another "
            "checkpoint of the run (e.g. the previous top-k file) or write it again"
        ) from err


def _deepspeed_client_state(path: Path, states_file: Path, weights_only: bool) -> dict[str, Any]:
    """The adapter checkpoint inside a DeepSpeed checkpoint directory written with the integration."""
    states = load_checkpoint_file(states_file, weights_only=weights_only)
    if DEEPSPEED_ADAPTER_KEY not in states or METADATA_KEY not in states:
        raise AdapterStateError(
            f"{path} is a DeepSpeed checkpoint written without lightning_adapters (no {DEEPSPEED_ADAPTER_KEY!r} in "
            f"{states_file.relative_to(path)}); train with AdapterCallback/AdapterMixin under DeepSpeedStrategy"
        )
    return {**states, "state_dict": states[DEEPSPEED_ADAPTER_KEY]}


def config_from_entry(meta: dict[str, Any], where: str) -> AdapterConfig:
    """The config of a checkpoint's metadata entry (or of one of its ``adapters`` entries).

    Raises:
        AdapterStateError: An unknown method, unknown fields, or values the config refuses, naming the file.
    """
    try:
        spec = get_method(meta["method"])
    except AdapterConfigError as err:
        raise AdapterStateError(f"{where}: {err}") from None
    fields = {f.name for f in dataclasses.fields(spec.config_cls) if f.init}
    unknown = sorted(str(k) for k in meta["config"] if k not in fields)
    if unknown:
        raise AdapterStateError(
            f"{where}: the {spec.name} config in the checkpoint has unknown fields {unknown}; it was written by "
            f"another version of lightning_adapters (library_version {meta.get('library_version')!r}) or edited"
        )
    try:
        return spec.config_cls(**meta["config"])
    except AdapterConfigError as err:
        raise AdapterStateError(f"{where}: the checkpoint's {spec.name} config is invalid: {err}") from None


def _modules_of(state: dict[str, Any], meta: dict[str, Any]) -> list[str]:
    # The top-level names a user can pass as ``module`` for this checkpoint.
    names = {k.split(".", 1)[0] for k in state if "." in k}
    if meta.get("module"):
        names.add(meta["module"])
    return sorted(names)


def _adapted_names(keys: Any) -> list[str]:
    # ``<module>.adapter.<tensor>`` -> ``<module>``: the modules the adapter was attached to.
    marker = f".{ADAPTER_ATTR}."
    return sorted({k[: k.index(marker)] for k in keys if marker in k})


def _needs_configure_model(model: nn.Module, sub: str, adapter_keys: Any, beside_keys: Any) -> bool:
    # True when the modules the checkpoint adapted, or the other tensors it saved (a head in modules_to_save or
    # beside the adapted module), do not exist yet: a model, or only its head, built in configure_model.
    try:
        target = model.get_submodule(sub) if sub else model
    except AttributeError:
        return True
    names = {n for n, _ in target.named_modules()}
    if any(n not in names for n in _adapted_names(adapter_keys)):
        return True
    # The other saved tensors (modules_to_save, trained biases) are plain tensors of the model.
    live = model.state_dict().keys()
    sub_prefix = f"{sub}." if sub else ""
    saved = [sub_prefix + k for k in adapter_keys if f".{ADAPTER_ATTR}." not in k]
    return any(k not in live for k in [*saved, *beside_keys])


def _restore_eva_ranks(
    target: nn.Module, name: str, config: AdapterConfig, adapter: Mapping[str, torch.Tensor], marker: str
) -> None:
    """Give the EVA layers of the freshly injected adapter ``name`` the ranks EVA chose in training, without its data.

    EVA (``init_weights="eva"``) sets each layer's rank from the training batches; the checkpoint keeps the result
    in the shapes of the saved ``lora_A`` (rank, in), and a layer EVA gave rank 0 has no tensors there. EVA's own
    last step is replayed with those tensors as its components: the same ranks and alphas (``alpha · r' / r`` under
    ``eva_adjust_scaling_factors``), the rank-0 layers' adapters removed and the record's ``rank_pattern`` /
    ``alpha_pattern`` set as in training, so the saved tensors then load and ``save_peft`` writes what the trained
    model would. Nothing happens when a saved ``lora_A`` does not fit ``(rank, in)`` or none is saved: the loader
    then reports the mismatch.
    """
    from lightning_adapters.core.inject import adapted_modules
    from lightning_adapters.methods import lora_eva

    layers = {
        module: (base, layer)
        for module, base, layer in adapted_modules(target, [name])
        if getattr(layer, "init_mode", None) == "eva" and getattr(layer, "needs_data", False)
    }
    saved = {module: adapter.get(f"{module}{marker}lora_A") for module in layers}
    fits = all(
        a is None or (isinstance(a, torch.Tensor) and a.dim() == 2 and a.shape[1] == layers[m][1].in_features)
        for m, a in saved.items()
    )
    if not layers or not fits or all(a is None for a in saved.values()):
        return
    comps = {m: a.detach() if a is not None else torch.zeros(0, layers[m][1].in_features) for m, a in saved.items()}
    with torch.no_grad():
        lora_eva.apply_components(target, layers, comps, config.eva_adjust_scaling_factors, name)


def _check_beside(model: nn.Module, beside: dict[str, torch.Tensor], where: str) -> None:
    live = model.state_dict()
    # Only the saved tensors are expected: a key the model lacks is unexpected, the rest of the model is not asked for.
    report = StateReport.compare({k: _shape(v) for k, v in beside.items()}, {k: live[k] for k in beside if k in live})
    if report:
        raise AdapterStateError(
            f"{where}: the tensors trained beside the adapter do not fit this model: "
            f"{report.describe(given='checkpoint')}. Pass an instance of the LightningModule class that was trained"
        )


def _locate(state: dict[str, torch.Tensor], role: str, trained: str, meta: dict[str, Any], where: str) -> tuple:
    """Split the checkpoint for a model that is the trained LightningModule's sub-module ``role``.

    Returns:
        ``(sub, adapter, beside, derived)``: where in the model the adapter goes; its tensors, keyed relative to
        that sub-module; the tensors trained beside it, keyed relative to the model; and, when the model is only
        a part of the adapted sub-module, the exact module names to adapt there (else ``None``).
    """
    role_prefix = f"{role}." if role else ""
    if not role or role == trained or trained.startswith(role_prefix):
        # The model holds the whole adapted sub-module (and maybe what was trained beside it).
        sub = trained[len(role_prefix) :]
        rel = {k[len(role_prefix) :]: v for k, v in state.items() if k.startswith(role_prefix)}
        sub_prefix = f"{sub}." if sub else ""
        adapter = {k[len(sub_prefix) :]: v for k, v in rel.items() if k.startswith(sub_prefix)}
        beside = {k: v for k, v in rel.items() if not k.startswith(sub_prefix)}
        return sub, adapter, beside, None
    if not trained or role.startswith(trained + "."):
        # The model is a part of the adapted sub-module: adapt exactly the modules the checkpoint adapted there.
        adapter = {k[len(role_prefix) :]: v for k, v in state.items() if k.startswith(role_prefix)}
        if not adapter:
            raise AdapterStateError(
                f"{where} holds no adapter tensors under module={role!r}; its tensors lie under "
                f"{_modules_of(state, meta)}: pass one of these with the matching sub-module, or the LightningModule"
            )
        return "", adapter, {}, _adapted_names(adapter)
    raise AdapterStateError(
        f"module={role!r} does not hold the adapter of {where}, which was injected into {trained!r}; pass "
        f"module={trained!r} with that sub-module, or the LightningModule itself"
    )


def _load_named(target: nn.Module, state: dict[str, torch.Tensor], names: list[str], check_finite: bool) -> None:
    """Load ``state`` (keys as ``target.state_dict()`` names them) into adapters ``names``, each strictly."""
    if len(names) == 1 and len(known_names(target)) == 1:
        load_adapter_state_dict(target, state, strict=True, check_finite=check_finite)
        return
    for name in names:
        free = name_free_keys(target, name)
        own = adapter_prefixes(target, [name])
        part = {free.get(k, k): v for k, v in state.items() if k in free or is_adapter_key(k, own)}
        load_adapter_state_dict(target, part, strict=True, name=name, check_finite=check_finite)


def restore_from_checkpoint(
    model: nn.Module,
    ckpt_path: str | os.PathLike,
    *,
    module: str | None = None,
    check_base: bool = True,
    weights_only: bool = True,
    check_finite: bool = True,
) -> nn.Module:
    """Inject the adapter of a Lightning adapter checkpoint into a model and load its trained tensors.

    A LightningModule whose model does not exist yet is given its ``configure_model`` call first, as the Trainer
    would. Everything is checked before ``model`` changes, and a call refused after injection is rolled back: a
    refused call leaves ``model`` as it was, an adapter it already had included.

    Args:
        model: A LightningModule of the class that was trained (the adapter, its ``modules_to_save`` and the
            tensors trained beside the adapted sub-module, e.g. a task head, are restored), or a bare model: by
            default the sub-module the adapter was injected into (``AdapterCallback(module=...)``), freshly built
            with the same base weights.
        ckpt_path: A ``.ckpt`` written by ``ModelCheckpoint``/``trainer.save_checkpoint`` with the integration,
            or the checkpoint directory they write under ``DeepSpeedStrategy`` (its adapter tensors were gathered
            from every ZeRO partition when it was saved). An EVA adapter (``init_weights="eva"``) gets the ranks
            EVA chose in training from the saved tensors, without its data.
        module: Which sub-module of the trained LightningModule ``model`` is, when not the default (``""``: the
            whole LightningModule). E.g. with an adapter injected into the whole LightningModule,
            ``restore_from_checkpoint(encoder, ckpt, module="backbone")`` restores the part of it inside
            ``self.backbone`` onto the bare encoder (``la.save_peft(encoder, dir)`` then writes a PEFT adapter
            for the encoder alone).
        check_base: Refuse a base model whose fingerprint differs from the one the adapter was trained on (checked
            when ``model`` holds the whole adapted sub-module).
        weights_only: Passed to ``torch.load``.
        check_finite: Refuse adapter tensors that are NaN or infinite (or overflow the model's dtype); False loads
            them as they are, as ``load_adapter_state_dict(..., check_finite=False)`` does.

    Returns:
        ``model``, injected, with the trained adapter loaded and ready for inference, merging or export.

    Raises:
        AdapterStateError: Not an adapter checkpoint (or unreadable or edited), a different base, keys that do not
            fit, or a ``module`` that does not hold the adapter.
        AdapterConfigError: ``ckpt_path`` is not a path or ``module`` not a name.
        AdapterTypeError: ``model`` is not an ``nn.Module``.
    """
    from lightning.pytorch import LightningModule

    check_module(model, "restore_from_checkpoint")
    if not isinstance(ckpt_path, (str, os.PathLike)) or not str(os.fspath(ckpt_path)).strip():
        raise AdapterConfigError(
            f"restore_from_checkpoint: ckpt_path must be the path of a .ckpt file (a non-empty str or os.PathLike), "
            f"got {ckpt_path!r}"
        )
    if module is not None and not isinstance(module, str):
        raise AdapterConfigError(f"module must be a dotted sub-module name such as 'model' or None, got {module!r}")
    where = str(ckpt_path)
    checkpoint = load_checkpoint_file(ckpt_path, weights_only=weights_only)
    if not isinstance(checkpoint, dict):
        raise AdapterStateError(f"{where} holds a {type(checkpoint).__name__}, not a Lightning checkpoint")
    meta = checkpoint.get(METADATA_KEY)
    if meta is None:
        raise AdapterStateError(
            f"{where} has no '{METADATA_KEY}' entry: it was not written by AdapterCallback/AdapterMixin"
        )
    check_metadata_entry(meta, where)
    state = check_state_entry(checkpoint, where)
    full_config = config_from_entry(meta, where)
    trained = meta.get("module") or ""
    is_lightning = isinstance(model, LightningModule)
    if module is None and not is_lightning and not trained:
        raise AdapterStateError(
            "the adapter was injected into the whole LightningModule, so its keys are relative to it; pass an "
            "instance of the trained LightningModule class, or name the sub-module this model is with module=..., "
            f"one of {_modules_of(state, meta)}"
        )
    role = (module if module is not None else ("" if is_lightning else trained)).strip(".")
    sub, adapter, beside, derived = _locate(state, role, trained, meta, where)
    role_prefix = f"{role}." if role else ""
    left_out = sorted(k for k in state if not k.startswith(role_prefix))

    had_adapter = bool(find_records(model))
    if is_lightning and _needs_configure_model(model, sub, adapter, beside):
        model.configure_model()
    try:
        target = model.get_submodule(sub) if sub else model
    except AttributeError:
        raise AdapterStateError(
            f"{type(model).__name__} has no sub-module {sub!r}, where the adapter of {where} was injected; pass an "
            "instance of the trained LightningModule class, or that sub-module itself"
        ) from None
    _check_beside(model, beside, where)
    held = saved_adapters(meta, where)
    configs = {}
    for name, entry in held.items():
        config = inner_config(target, full_config if name == meta.get("name") else config_from_entry(entry, where))
        if derived is not None and isinstance(get_method(entry["method"]), LayerMethod):
            # Only the modules the checkpoint adapted with this adapter, inside the model given.
            marker = f".{ADAPTER_ATTR}.{name}." if "adapters" in meta else f".{ADAPTER_ATTR}."
            exact = "|".join(re.escape(n) for n in _adapted_names(k for k in adapter if marker in k))
            config = dataclasses.replace(config, target_modules=exact, exclude_modules=None)
        configs[name] = config

    sub_prefix = f"{sub}." if sub else ""
    originals = {
        k: v.detach().clone()
        for k, v in model.state_dict(keep_vars=True).items()
        if k in beside or (k.startswith(sub_prefix) and k[len(sub_prefix) :] in adapter)
    }
    injected = []
    try:
        for name, config in configs.items():
            new = name not in known_names(target)
            inject(target, config, name=name)  # a conflicting adapter already there is refused before any change
            if new:
                injected.append(name)
                marker = f".{ADAPTER_ATTR}.{name}." if "adapters" in meta else f".{ADAPTER_ATTR}."
                _restore_eva_ranks(target, name, config, adapter, marker)
        if check_base and derived is None:
            fingerprint = base_fingerprint(target)
            for name, config in configs.items():
                check_metadata(
                    meta,
                    held[name]["method"],
                    (full_config if name == meta.get("name") else config).to_dict(),
                    fingerprint,
                    name=name if "adapters" in meta else None,
                )
        _load_named(target, adapter, list(configs), check_finite)
        live = model.state_dict(keep_vars=True)
        with torch.no_grad():
            for k, v in beside.items():
                live[k].copy_(v.to(device=live[k].device, dtype=live[k].dtype))
        if meta.get("active") and meta.get("trainable") is not None:
            set_active(target, [n for n in meta["active"] if n in configs] or list(configs))
            set_trainable(target, [n for n in meta["trainable"] if n in configs])
    except BaseException:
        live = model.state_dict(keep_vars=True)
        with torch.no_grad():
            for k, v in originals.items():
                live[k].copy_(v)
        if not had_adapter:
            for _, root, _ in find_records(model):
                eject(root)
        else:
            for name in reversed(injected):
                delete(target, name)
        raise
    if left_out:
        warnings.warn(
            f"{where} also holds tensors trained outside module={role!r} that this model does not contain: "
            f"{key_list(left_out, 6)}; pass an instance of the trained LightningModule to restore them too",
            stacklevel=2,
        )
    return model
