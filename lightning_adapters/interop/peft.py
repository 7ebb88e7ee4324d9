"""Hugging Face PEFT's on-disk format: ``adapter_config.json`` + ``adapter_model.safetensors``.

``save_peft`` writes what PEFT 0.21's ``save_pretrained`` writes for a ``PeftModel`` around the same base
(keys ``base_model.model.<module>.<suffix>``, PEFT's field names), so ``PeftModel.from_pretrained`` loads it;
``load_peft`` reads such a directory (with or without the ``base_model.model.`` prefix), injects the matching
method and loads the tensors. Several adapters take PEFT's layout: the adapter named ``default`` at the root of the
directory, every other one in a sub-folder named after it (``<dir>/<name>/adapter_config.json``), each file keyed
without adapter names, as PEFT's ``save_pretrained`` writes and its ``load_adapter(<dir>/<name>, name)`` reads.
Per-method names and layouts come from the registry (the method's ``config_to_peft``/``config_from_peft`` members,
and each layer's or ``ModelAdapter``'s ``peft_state``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_adapters.config import pattern_value
from lightning_adapters.core.files import read_files, replace_directory, target_directory, write_file
from lightning_adapters.core.inject import (
    adapted_modules,
    check_module,
    check_name,
    check_names,
    compiled_inner,
    eject,
    find_records,
    get_adapters,
    inject,
    trained_biases,
)
from lightning_adapters.core.layer import DEFAULT_NAME
from lightning_adapters.core.named import delete
from lightning_adapters.core.report import StateReport
from lightning_adapters.core.state import value_problem
from lightning_adapters.core.targeting import saves_module
from lightning_adapters.errors import AdapterConfigError, AdapterStateError
from lightning_adapters.interop.peft_fields import check_peft_fields
from lightning_adapters.registry import get_method, get_method_by_peft_type

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."
PEFT_VERSION = "0.21.2"


def _full(t: torch.Tensor) -> torch.Tensor:
    """A full, contiguous CPU copy (gathers a sharded DTensor; all ranks must call this together)."""
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.detach().to("cpu").contiguous().clone()


def _records(model: nn.Module) -> list:
    """Every ``(prefix, root, record)`` of ``model``'s adapters, all on one root."""
    recs = find_records(model)
    if not recs:
        raise AdapterConfigError("model has no adapters; call lightning_adapters.inject(model, config) first")
    if len({r[0] for r in recs}) > 1:
        raise AdapterConfigError(f"model has adapters on several sub-modules {[r[0] for r in recs]}; save each one")
    return recs


def _record(model: nn.Module, name: str | None = None, what: str = "save_peft"):
    """The ``(prefix, root, record)`` of adapter ``name`` (``None``: the model's only adapter)."""
    recs = _records(model)
    if name is None:
        if len(recs) > 1:
            raise AdapterConfigError(
                f"the model holds several adapters {[r[2].name for r in recs]}; name the one to use (name=...)"
            )
        return recs[0]
    (chosen,) = check_names(model, name, what)
    return next(r for r in recs if r[2].name == chosen)


def peft_tensors(model: nn.Module, name: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors of adapter ``name`` (``None``: the only one) under PEFT's key names
    (``base_model.model.<module>.<suffix>``, no adapter name), as CPU copies.

    Raises:
        AdapterStateError: A tensor is on the meta device (a model built without its weights).
    """
    prefix, root, rec = _record(model, name)
    out: dict[str, torch.Tensor] = {}
    if rec.model_adapter is not None:
        out.update({PEFT_PREFIX + k: t for k, t in rec.model_adapter.peft_state(root).items()})
    else:
        for name, _, layer in adapted_modules(root, [rec.name]):
            try:
                state = layer.peft_state()
            except AdapterConfigError as err:  # the layer has no PEFT form: say which one
                raise AdapterConfigError(f"{rec.method}: cannot save {name!r} in PEFT's format: {err}") from err
            out.update({f"{PEFT_PREFIX}{name}.{suffix}": t for suffix, t in state.items()})
    for m in rec.modules_to_save:
        for k, t in root.get_submodule(m).state_dict().items():
            out[f"{PEFT_PREFIX}{m}.{k}"] = t
    for key, param in peft_bias_params(root, rec).items():
        out[PEFT_PREFIX + key] = param.detach()
    for k, v in out.items():
        if v.is_meta:
            raise AdapterStateError(
                f"save_peft: tensor {k!r} is on the meta device (the model was built without weights); materialize "
                "and load the weights (e.g. model.to_empty(device='cpu') then load_state_dict) before saving"
            )
    return {k: _full(v) for k, v in out.items()}


def peft_bias_params(root: nn.Module, rec: Any) -> dict[str, nn.Parameter]:
    """The base biases the config's ``bias`` option trains, under PEFT's keys (without ``base_model.model.``).

    PEFT moves an adapted module's own parameters under ``base_layer``, so its bias is ``<module>.base_layer.bias``;
    any other bias keeps its name.
    """
    adapted = {name for name, _, _ in adapted_modules(root, [rec.name])}
    out = {}
    for name in trained_biases(root, rec):
        module = name[: -len(".bias")] if name != "bias" else ""
        key = (f"{module}.base_layer.bias" if module else "base_layer.bias") if module in adapted else name
        out[key] = root.get_parameter(name)
    return out


def peft_config_dict(model: nn.Module, name: str | None = None) -> dict[str, Any]:
    """The ``adapter_config.json`` content PEFT would write for adapter ``name`` (``None``: the only one)."""
    _, root, rec = _record(model, name)
    spec = get_method(rec.method)
    cfg = rec.config
    d = spec.config_to_peft(cfg)
    d.update(spec.peft_config_extra(root, rec.name))
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
    # Fields resolved after the config was written: at injection by a whole-model method (Llama-Adapter's attention
    # name), or later (AdaLoRA's schedule length, EVA's ranks).
    if rec.model_adapter is not None:
        d = rec.model_adapter.peft_config(d)
    d.update(rec.resolved_peft_fields)
    return {k: d[k] for k in sorted(d)}


def _sorted(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _sorted(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [_sorted(v) for v in value]
    return value


def _written_order(config: dict[str, Any], adapted: list[str]) -> dict[str, Any]:
    """``config`` with its keys sorted at every depth, as PEFT's ``save_pretrained`` writes them, except a
    ``rank_pattern`` / ``alpha_pattern`` whose sorted order would give an adapted module another value.

    Their keys are regexes tried in file order, first match wins (PEFT's rule, and ``load_peft``'s): sorted,
    ``{"q_proj": 2, "layers.1.q_proj": 3}`` would give ``layers.1.q_proj`` 3 instead of 2, and the file would
    not load (PEFT's own files have that flaw). Such a pattern keeps the order it was given.
    """
    out = {}
    for key in sorted(config):
        value = config[key]
        if key in ("rank_pattern", "alpha_pattern") and isinstance(value, dict):
            ordered = _sorted(value)
            if any(pattern_value(ordered, n, None) != pattern_value(value, n, None) for n in adapted):
                out[key] = value
                continue
        out[key] = _sorted(value)
    return out


def _save_dtype(value: Any) -> torch.dtype | None:
    """``save_dtype`` as a floating torch dtype (a name such as ``"bfloat16"`` is accepted), else an error."""
    if value is None:
        return None
    dtype = value
    if isinstance(value, str):
        dtype = _SAVE_DTYPES.get(value.removeprefix("torch."))
    if dtype not in _SAVE_DTYPES.values():
        names = ", ".join(f"torch.{n}" for n in _SAVE_DTYPES)
        raise AdapterConfigError(
            f"save_peft: save_dtype={value!r} is not a floating dtype the file can hold; use one of {names} "
            "(or its name as a string), or None to keep the adapter's dtype"
        )
    return dtype


_SAVE_DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}


def _check_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    """Refuse non-finite floating tensors (checked on the CPU copies about to be written)."""
    for key, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise AdapterStateError(
                f"{what}: tensor {key!r} holds {int((~torch.isfinite(t)).sum())} non-finite values (NaN/inf); "
                "nothing was written. Fix the training run (lower the learning rate, check the loss) or pass "
                "safe=False to write it anyway"
            )


# Files a PEFT save owns: a previous save's pickle weights would contradict the new safetensors file.
_PEFT_FILES = frozenset({CONFIG_NAME, WEIGHTS_NAME, PICKLE_WEIGHTS_NAME})


def save_peft(
    model: nn.Module,
    directory: str | os.PathLike,
    save_dtype: torch.dtype | str | None = None,
    *,
    safe: bool = False,
    convert_to_lora: bool = False,
    names: str | list[str] | None = None,
) -> Path:
    """Write the adapters of ``model`` in PEFT's format; ``PeftModel.from_pretrained(base, directory)`` loads it.

    The adapter named ``default`` goes to ``directory`` itself, every other one to ``directory/<name>`` (PEFT's
    layout: ``PeftModel.load_adapter(f"{directory}/{name}", adapter_name=name)`` and ``load_peft(model,
    directory, name=name)`` read it back).

    Everything is computed and checked before the disk is touched, and the files of every adapter written are
    replaced together (``lightning_adapters.core.files.replace_directory``): a failure or a crash at any point leaves
    the previous adapters loadable, never new weights next to an old config. Saves of the same directory from
    several threads or processes take turns. Other files in the directory are kept, and so are the sub-folders of
    adapters this call does not write.

    Args:
        model: A model injected with ``lightning_adapters.inject`` (or ``load_peft``).
        directory: Output directory (created if needed).
        save_dtype: Cast floating tensors to this dtype in the file (``torch.float16``/``bfloat16``/``float32``/
            ``float64`` or its name; default: keep the adapter dtype). A value that overflows the dtype is refused.
        safe: Also refuse tensors that are already non-finite (NaN/inf) in the model.
        convert_to_lora: LoRA only: write a residual-init adapter (PiSSA, OLoRA, CorDA: the base holds
            ``W − s·B0·A0``) as a plain LoRA of twice the rank that applies to the *unmodified* base, as PEFT's
            ``save_pretrained(path_initial_model_for_weight_conversion=...)`` does.
        names: The adapters to write (one name or a list); ``None``: every adapter of the model.

    Returns:
        The directory path.

    Raises:
        AdapterConfigError: A bad ``directory`` or ``save_dtype``.
        AdapterStateError: Tensors on the meta device, values that do not fit ``save_dtype``, or (``safe=True``)
            non-finite values.
    """
    from safetensors.torch import save as st_save

    check_module(model, "save_peft")
    target = target_directory(directory, "save_peft")
    dtype = _save_dtype(save_dtype)
    recs = _records(model)
    chosen = [r[2].name for r in recs] if names is None else check_names(model, names, "save_peft")
    files: dict[str, tuple[bytes, bytes]] = {}
    for name in chosen:
        tensors = peft_tensors(model, name)
        peft_config = peft_config_dict(model, name)
        if convert_to_lora:
            tensors, peft_config = _as_plain_lora(model, tensors, peft_config, name)
        if safe:
            _check_finite(tensors, "save_peft")
        if dtype is not None:
            cast = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
            for k, v in cast.items():
                finite = bool(torch.isfinite(tensors[k]).all())
                if v.is_floating_point() and not bool(torch.isfinite(v).all()) and finite:
                    raise AdapterStateError(
                        f"save_peft: tensor {k!r} overflows {dtype} (largest magnitude "
                        f"{tensors[k].abs().max().item():.4g}) in adapter {name!r}; save in torch.float32 or bfloat16"
                    )
            tensors = cast
        _, root, rec = _record(model, name)
        adapted = [n for n, _, _ in adapted_modules(root, [rec.name])]
        config_bytes = (json.dumps(_written_order(peft_config, adapted), indent=2) + "\n").encode()
        files[name] = (config_bytes, st_save(tensors, metadata={"format": "pt"}))

    def fill(staging: Path) -> None:
        for name, (config_bytes, weights_bytes) in files.items():
            folder = staging if name == DEFAULT_NAME else staging / name
            folder.mkdir(exist_ok=True)
            write_file(folder / WEIGHTS_NAME, weights_bytes)
            write_file(folder / CONFIG_NAME, config_bytes)

    # The root's PEFT files belong to this save when it writes ``default``; a sub-folder when it writes that adapter.
    written = set(files) - {DEFAULT_NAME}
    root_files = _PEFT_FILES if DEFAULT_NAME in files else frozenset()
    replace_directory(target, fill, owned=lambda entry: entry in root_files or entry in written)
    return Path(directory)


def _as_plain_lora(
    model: nn.Module, tensors: dict[str, torch.Tensor], config: dict[str, Any], name: str | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from lightning_adapters.methods import lora_init

    _, root, rec = _record(model, name)
    if rec.method != "lora":
        raise AdapterConfigError(
            f"save_peft(convert_to_lora=True) rewrites LoRA adapters initialised with PiSSA/OLoRA/CorDA; adapter "
            f"{rec.name!r} is a {rec.method} adapter. Drop convert_to_lora, or pass names= without it"
        )
    layers = {name: layer for name, _, layer in adapted_modules(root, [rec.name]) if hasattr(layer, "lora_A")}
    return lora_init.convert_to_plain_lora(layers, tensors, config, PEFT_PREFIX)


def read_peft_dir(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read and validate a PEFT adapter directory: its config dict and its tensors (prefix removed).

    Holds the directory's shared lock while reading, so a concurrent ``save_peft`` cannot swap the files
    between the config and the weights.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load

    if not isinstance(directory, (str, os.PathLike)) or not str(os.fspath(directory)).strip():
        raise AdapterConfigError(
            f"load_peft: directory must be the path of a PEFT adapter directory (a non-empty str or os.PathLike), "
            f"got {directory!r}"
        )
    directory = Path(directory)
    cfg_path, w_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    raw = read_files(directory, (CONFIG_NAME, WEIGHTS_NAME))
    pickled = False
    if raw[CONFIG_NAME] is not None and raw[WEIGHTS_NAME] is None:
        # PEFT's pickle format (save_pretrained(safe_serialization=False)); read with its config from one version.
        raw = read_files(directory, (CONFIG_NAME, PICKLE_WEIGHTS_NAME))
        pickled = raw[PICKLE_WEIGHTS_NAME] is not None
        w_path = directory / PICKLE_WEIGHTS_NAME if pickled else w_path
    config_raw = raw[CONFIG_NAME]
    # The second read (pickle fallback) holds no entry for the safetensors name.
    weights_raw = raw.get(PICKLE_WEIGHTS_NAME if pickled else WEIGHTS_NAME)
    if config_raw is None:
        inside = sorted(p.parent.name for p in directory.glob(f"*/{CONFIG_NAME}"))
        hint = (
            f"; it holds the adapters {inside} in sub-folders: load one with load_peft(model, directory, name=...)"
            if inside
            else ""
        )
        raise AdapterStateError(f"{cfg_path} does not exist; a PEFT adapter directory holds {CONFIG_NAME}{hint}")
    if weights_raw is None:
        raise AdapterStateError(
            f"{w_path} does not exist as a file (nor {PICKLE_WEIGHTS_NAME}); a PEFT adapter directory holds its "
            f"weights in {WEIGHTS_NAME} or {PICKLE_WEIGHTS_NAME}"
        )
    try:
        config = json.loads(config_raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise AdapterStateError(f"{cfg_path} is not UTF-8 text ({err}); re-save the adapter") from err
    except json.JSONDecodeError as err:
        raise AdapterStateError(f"{cfg_path} is not valid JSON ({err}); re-save the adapter") from err
    if not isinstance(config, dict):
        raise AdapterStateError(
            f"{cfg_path} holds a JSON {type(config).__name__}, not an object; it is not a PEFT adapter config"
        )
    if "peft_type" not in config:
        raise AdapterStateError(f"{cfg_path} has no 'peft_type' field; it is not a PEFT adapter config")
    if not isinstance(config["peft_type"], str):
        raise AdapterConfigError(f"{cfg_path}: field 'peft_type' must be a string, got {config['peft_type']!r}")
    if pickled:
        tensors = _load_pickled_state(w_path, weights_raw)
    else:
        try:
            tensors = load(weights_raw)
        except (SafetensorError, OSError, ValueError) as err:
            raise AdapterStateError(
                f"{w_path} is not a readable safetensors file ({err}); it may be truncated or in another format"
            ) from err
    stripped = {}
    for k, v in tensors.items():
        stripped[k[len(PEFT_PREFIX) :] if k.startswith(PEFT_PREFIX) else k] = v
    return config, stripped


def _load_pickled_state(path: Path, raw: bytes) -> dict[str, torch.Tensor]:
    """The ``{name: tensor}`` of a pickled ``adapter_model.bin``, read with ``weights_only=True`` (no code runs).

    Raises:
        AdapterStateError: Naming the file, when it is not a readable pickle of a flat dict of tensors.
    """
    import io
    import pickle

    try:
        obj = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, AttributeError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise AdapterStateError(
            f"{path} is not a readable PyTorch state dict ({first}); it may be truncated, or hold Python objects "
            f"other than tensors (only weights_only=True pickles are read: nothing in the file is executed)"
        ) from err
    if not isinstance(obj, dict):
        raise AdapterStateError(
            f"{path} holds a {type(obj).__name__}, not a state dict of tensors ({{name: tensor}}); re-save the adapter"
        )
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise AdapterStateError(
            f"{path} is not a state dict of tensors: entries {bad[:5]!r} are not (name, tensor) pairs; re-save the "
            "adapter"
        )
    # A pickle may share storage between entries or hold views; the loaders copy values, so plain copies are safe.
    return {k: v.detach().clone().contiguous() for k, v in obj.items()}


_JSON_KIND = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", dict: "an object"}


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    return _JSON_KIND.get(type(value), f"a {type(value).__name__}")


def check_peft_config_types(path: Path, config: dict[str, Any], spec: Any) -> None:
    """Check the JSON type of every field ``spec`` translates, before any of it is used.

    The expected types are those of the fields this library itself writes for a default config of the method
    (PEFT writes the same kinds): integers stay integers (``true`` is not 1), numbers accept integers, booleans
    must be booleans (``init_*`` also takes PEFT's named initialisations, a string), objects are objects.
    Target lists and patterns are checked element by element.

    Raises:
        AdapterConfigError: Naming ``path``, the field, its value and the type expected.
    """

    def bad(field: str, value: Any, want: str) -> AdapterConfigError:
        return AdapterConfigError(
            f"{path}: field {field!r} must be {want}, got {_json_kind(value)} ({value!r}); fix or re-save the file"
        )

    defaults = spec.config_to_peft(spec.config_cls())
    for field, default in defaults.items():
        if field not in config or default is None:
            continue
        value = config[field]
        if isinstance(default, bool):
            if not isinstance(value, bool) and not (field.startswith("init_") and isinstance(value, str)):
                raise bad(
                    field, value, "a boolean" + (" or an initialisation name" if field.startswith("init_") else "")
                )
        elif isinstance(default, int):
            if isinstance(value, bool) or not isinstance(value, int):
                raise bad(field, value, "an integer")
        elif isinstance(default, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise bad(field, value, "a number")
        elif isinstance(default, str):
            if not isinstance(value, str):
                raise bad(field, value, "a string")
        elif isinstance(default, dict) and value is not None and not isinstance(value, dict):
            raise bad(field, value, "an object (or null)")
    for field in ("target_modules", "exclude_modules", "modules_to_save"):
        value = config.get(field)
        names_ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        if value is None or names_ok or (field != "modules_to_save" and isinstance(value, str)):
            continue
        raise bad(field, value, "a list of module names" + (" or a regex string" if field != "modules_to_save" else ""))
    for field, kinds, want in (("rank_pattern", (int,), "integers"), ("alpha_pattern", (int, float), "numbers")):
        pattern = config.get(field)
        # Only where the method writes per-module numbers (LoRA, LoHa, LoKr); AdaLoRA's rank_pattern holds
        # per-module rank masks and is checked by its own loader.
        if not isinstance(pattern, dict) or not isinstance(defaults.get(field), dict):
            continue
        for key, value in pattern.items():
            if isinstance(value, bool) or not isinstance(value, kinds):
                raise bad(f"{field}[{key!r}]", value, f"one of {want}")


def load_peft(
    model: nn.Module, directory: str | os.PathLike, name: str | None = None, *, check_finite: bool = True
) -> nn.Module:
    """Inject the adapter described by a PEFT directory into ``model``, as adapter ``name``, and load its weights.

    The model may already hold other adapters: the new one joins them inactive and frozen (as ``inject`` adds a
    further adapter, and PEFT's ``load_adapter``); a model's first adapter is active and trainable. Every key,
    shape and value is checked; on any mismatch the new adapter is removed and ``model`` is left as it was.

    Args:
        directory: A PEFT adapter directory. For a directory holding several adapters (``save_peft``'s and PEFT's
            layout: ``default`` at the root, the others in sub-folders named after them), ``name`` picks the
            sub-folder ``directory/<name>`` when it holds an adapter, else the adapter at the root is loaded under
            ``name``.
        name: The adapter's name in ``model`` (``None``: ``"default"``); it must not be taken.
        check_finite: Refuse NaN/inf values in the file, and values that overflow the dtype they are loaded into
            (as ``load_adapter_state_dict`` does).

    Returns:
        ``model``, with the adapter loaded.

    Raises:
        AdapterStateError: Unreadable directory, missing / unexpected / mis-shaped tensors, non-floating tensors,
            or (``check_finite``) non-finite values.
        AdapterConfigError: An unknown or unsupported ``peft_type`` or PEFT option, ``directory`` not a path, or
            ``name`` taken or not usable as an adapter name.
        AdapterTypeError: ``model`` is not an ``nn.Module``.
    """
    check_module(model, "load_peft")
    inner = compiled_inner(model)
    if inner is not None and get_adapters(model) is None:
        load_peft(inner, directory, name, check_finite=check_finite)  # a torch.compile wrapper: as inject does
        return model
    name = DEFAULT_NAME if name is None else check_name(name, "load_peft")
    taken = [r[2].name for r in find_records(model)]
    if name in taken:
        raise AdapterConfigError(
            f"load_peft: the model already has an adapter named {name!r}; load this one under another name "
            f"(load_peft(model, directory, name='...')), or lightning_adapters.delete(model, {name!r}) first"
        )
    directory = _adapter_folder(directory, name)
    config_dict, tensors = read_peft_dir(directory)
    spec = get_method_by_peft_type(config_dict["peft_type"])
    check_peft_fields(Path(directory) / CONFIG_NAME, config_dict)
    check_peft_config_types(Path(directory) / CONFIG_NAME, config_dict, spec)
    try:
        config = spec.config_from_peft(config_dict)
    except AdapterConfigError as err:
        raise AdapterConfigError(_in_peft_terms(Path(directory) / CONFIG_NAME, str(err))) from err
    config, tensors = spec.prepare_peft_load(config, config_dict, tensors)
    config = _drop_unmatched_modules_to_save(model, config)
    _check_not_a_sub_module(model, directory, tensors)
    inject(model, config, name=name)
    try:
        _load_tensors(model, tensors, spec, check_finite, name)
    except BaseException:
        if taken:
            delete(model, name)
        else:
            eject(model)
        raise
    return model


# Our names of the PEFT fields that are spelled differently here, as a refusal of a file's value names them.
_OUR_NAMES = {"alpha": "lora_alpha", "dropout": "lora_dropout", "init_weights": "init_lora_weights"}


def _in_peft_terms(path: Path, message: str) -> str:
    """A config refusal of a PEFT file's value: the file, and PEFT's name of a field called otherwise here."""
    head, _, rest = message.partition(": ")
    field = rest.split(" ", 1)[0] if rest else ""
    if field in _OUR_NAMES:
        message = f"{head}: {_OUR_NAMES[field]} (our {field}){rest[len(field) :]}"
    return f"{path}: {message}"


def _drop_unmatched_modules_to_save(model: nn.Module, config: Any) -> Any:
    """``config`` without the ``modules_to_save`` entries that match no module of ``model``, as PEFT skips them.

    PEFT's task wrappers add their head names to the field (``["classifier", "score"]`` for sequence and token
    classification, ``["qa_outputs"]`` for question answering) and write them to the file whatever the model has:
    a BERT classifier's adapter lists ``score``, which BERT lacks. An entry written by ``inject`` still has to
    match (a typo there is refused).
    """
    entries = getattr(config, "modules_to_save", None)
    if not entries:
        return config
    names = [n for n, _ in model.named_modules() if n]
    kept = [e for e in entries if any(saves_module(n, [e]) for n in names)]
    if len(kept) == len(entries):
        return config
    return dataclasses.replace(config, modules_to_save=kept or None)


def _adapter_folder(directory: Any, name: str) -> Any:
    """``directory/<name>`` when it holds an adapter config (PEFT's layout for a non-default adapter), else
    ``directory``."""
    if name == DEFAULT_NAME or not isinstance(directory, (str, os.PathLike)) or not str(os.fspath(directory)).strip():
        return directory
    folder = Path(directory) / name
    return folder if (folder / CONFIG_NAME).is_file() else directory


def _check_not_a_sub_module(model: nn.Module, directory: str | os.PathLike, tensors: dict[str, torch.Tensor]) -> None:
    """Refuse a file written from a larger model that holds ``model`` as one of its sub-modules.

    E.g. the training app's export is keyed by its task module (``backbone.encoder...``, ``head.weight``): on the bare
    encoder no key names one of its modules, while every key under ``backbone.`` does once that prefix is removed.
    """
    names = [n for n, _ in model.named_modules() if n]

    def fits(key: str) -> bool:
        return any(key.startswith(n + ".") for n in names)

    if not names or any(fits(k) for k in tensors):
        return
    for outer in sorted({k.split(".", 1)[0] for k in tensors if "." in k}):
        inner = [k[len(outer) + 1 :] for k in tensors if k.startswith(outer + ".")]
        if all(fits(k) for k in inner):
            beside = sorted({k.split(".", 1)[0] for k in tensors if not k.startswith(outer + ".")})
            raise AdapterStateError(
                f"{directory} was saved from a model that holds this {type(model).__name__} as its sub-module "
                f"{outer!r} (its keys start with '{outer}.'"
                + (f", and it also holds {beside} beside it" if beside else "")
                + "), so none of its keys fit this model. Load it onto that larger model (for the training app's "
                "export, lightning_adapters.app.load_task(run)); for this model alone, restore the Lightning "
                f"checkpoint onto it with la.restore_from_checkpoint(model, ckpt, module={outer!r}) and save_peft "
                "that"
            )


def _check_values(
    root: nn.Module, rec, tensors: dict[str, torch.Tensor], expected: dict[str, Any], spec, check_finite: bool
) -> None:
    """Refuse values a copy would silently convert or that would make every output NaN, before any copy.

    Adapter tensors must be finite floats; ``modules_to_save`` and base-layer tensors must have the dtype kind
    of the model tensor they go into (an integer buffer takes integers).
    """
    live = dict(root.state_dict(keep_vars=True))
    for name, base, _ in adapted_modules(root, [rec.name]):
        if isinstance(getattr(base, "weight", None), torch.Tensor):
            live[f"{name}.base_layer.weight"] = base.weight
    problems = []
    for key in expected:
        value = tensors[key]
        target = live.get(key)
        if target is None:  # an adapter tensor in PEFT's layout: a float of the adapter's own shape
            target = torch.empty(value.shape, dtype=torch.float32, device="meta")
        problem = value_problem(key, value, target, check_finite)
        if problem is not None:
            problems.append(problem)
    if problems:
        raise AdapterStateError(
            f"PEFT {spec.peft_type} adapter holds values the model cannot take: "
            + "; ".join(problems[:8])
            + (" ..." if len(problems) > 8 else "")
            + ". Re-save the adapter from a model whose tensors are finite floats (or pass check_finite=False to "
            "load non-finite values anyway)"
        )


def _submodule(root: nn.Module, name: str) -> nn.Module | None:
    try:
        return root.get_submodule(name)
    except AttributeError:
        return None


def _embedding_layers(model: nn.Module) -> set[int]:
    """Ids of the model's input and output embedding layers (transformers' accessors; none for other models), the
    layers whose full weights PEFT's ``save_embedding_layers`` writes."""
    found = set()
    for accessor in ("get_input_embeddings", "get_output_embeddings"):
        try:
            layer = getattr(model, accessor)() if callable(getattr(model, accessor, None)) else None
        except (NotImplementedError, AttributeError):
            layer = None
        if isinstance(getattr(layer, "weight", None), torch.Tensor):
            found.add(id(layer))
    return found


def _load_tensors(
    model: nn.Module, tensors: dict[str, torch.Tensor], spec, check_finite: bool = True, name: str = DEFAULT_NAME
) -> None:
    _, root, rec = _record(model, name, "load_peft")
    expected: dict[str, tuple[int, ...]] = {}
    if rec.model_adapter is not None:
        expected.update({k: tuple(v.shape) for k, v in rec.model_adapter.peft_state(root).items()})
    else:
        for name, _, layer in adapted_modules(root, [rec.name]):
            try:
                shapes = layer.peft_shapes()
            except AdapterConfigError as err:
                raise AdapterConfigError(f"{spec.name}: cannot load {name!r} from PEFT's format: {err}") from err
            for suffix, shape in shapes.items():
                expected[f"{name}.{suffix}"] = shape
    for m in rec.modules_to_save:
        for k, t in root.get_submodule(m).state_dict().items():
            expected[f"{m}.{k}"] = tuple(t.shape)
    biases = peft_bias_params(root, rec)
    expected.update({k: tuple(p.shape) for k, p in biases.items()})
    if biases and rec.modules_to_save:
        # With bias="all" PEFT also writes the biases inside its modules_to_save wrapper (the trained copy, again,
        # and the untouched original); ``<module>.bias`` already holds the trained one.
        wrapped = tuple(f"{m}.{w}." for m in rec.modules_to_save for w in ("modules_to_save", "original_module"))
        tensors = {k: v for k, v in tensors.items() if not (k.startswith(wrapped) and k.endswith("bias"))}
    # PEFT writes full base embedding / lm_head matrices next to the adapter when they are targeted
    # (``save_embedding_layers``); they load into the base layer as PEFT loads them.
    base_layer_keys = {}
    for name, base, _ in adapted_modules(root, [rec.name]):
        key = f"{name}.base_layer.weight"
        if key in tensors:
            base_layer_keys[key] = base
            expected[key] = tuple(base.weight.shape)
    # A file PEFT wrote from a model holding several adapters also carries those full matrices for the input and
    # output embeddings only the *other* adapters wrap; PEFT's own load leaves them out where this adapter wraps
    # nothing, and so does this one (their shape must still fit the model's layer).
    embeddings = _embedding_layers(root)
    for key in tensors.keys() - expected.keys():
        module = key.removesuffix(".base_layer.weight")
        if module != key and id(_submodule(root, module)) in embeddings:
            expected[key] = tuple(root.get_submodule(module).weight.shape)
    report = StateReport.compare(tensors, expected)
    if report:
        raise AdapterStateError(
            f"PEFT {spec.peft_type} adapter does not fit the model: {report.describe(given='file')}"
            + ". Check the adapter was trained on this base model architecture"
        )
    _check_values(root, rec, tensors, expected, spec, check_finite)
    if rec.model_adapter is not None:
        rec.model_adapter.load_peft_state(root, tensors)
    else:
        for name, _, layer in adapted_modules(root, [rec.name]):
            prefix = name + "."
            try:
                layer.load_peft_state(
                    {
                        k[len(prefix) :]: v
                        for k, v in tensors.items()
                        if k.startswith(prefix) and k[len(prefix) :] in layer.peft_shapes()
                    }
                )
            except AdapterStateError as err:
                raise AdapterStateError(f"PEFT {spec.peft_type} adapter, module {name!r}: {err}") from err
    with torch.no_grad():
        for key, base in base_layer_keys.items():
            base.weight.copy_(tensors[key].to(dtype=base.weight.dtype, device=base.weight.device))
        for key, param in biases.items():
            param.copy_(tensors[key].to(dtype=param.dtype, device=param.device))
        for m in rec.modules_to_save:
            mod = root.get_submodule(m)
            for k, t in list(mod.named_parameters()) + list(mod.named_buffers()):
                key = f"{m}.{k}"
                if key in tensors:
                    t.copy_(tensors[key].to(dtype=t.dtype, device=t.device))
