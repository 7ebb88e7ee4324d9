"""The method registry: method name -> config class, layer factory and PEFT translation.

A method registers one ``MethodSpec``. ``inject`` uses it to build layers, ``save_peft``/``load_peft`` use it
to translate configs and tensors, the Hydra ConfigStore stores its config class, and the contract test suite
parametrizes over ``available_methods()``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lightning_adapters.errors import AdapterConfigError

if TYPE_CHECKING:
    from torch import nn

    from lightning_adapters.config import AdapterConfig

_METHOD_MODULES = ("lora", "loha", "lokr", "oft", "boft", "adalora", "llama_adapter")


@dataclass
class MethodSpec:
    """Everything the engine needs to know about one method.

    Attributes:
        name: Registry name, e.g. ``"lora"``; also the ``method`` Hydra option.
        config_cls: The method's config dataclass.
        peft_type: PEFT's ``peft_type`` string, e.g. ``"LORA"``.
        supported_types: Base module types the method adapts (``isinstance`` checks).
        create_layer: ``(base_module, config, module_name) -> AdapterLayer``.
        config_to_peft: Our config -> the fields of PEFT's ``adapter_config.json``.
        config_from_peft: PEFT's ``adapter_config.json`` dict -> our config.
        inject_model: Optional whole-model injection, for methods that do not adapt single layers
            (Llama-Adapter). Signature ``(model, config) -> (adapted module names, extra)``; it validates
            everything before changing the model, and ``extra`` becomes ``InjectionRecord.extra``
            (``"eject"``, ``"trainable_modules"``, ``"switch_modules"``, ``"apply_dtype"``, ``"mergeable"``,
            ``"summary_rows"``, ``"peft_config"``).
        default_targets: Per ``model_type`` default target suffixes, used when ``target_modules`` is None.
        peft_state: Optional whole-model ``root -> {module.suffix: tensor}`` in PEFT's names, for methods whose
            state is not per adapted layer; by default each layer's ``peft_state`` is used.
        load_peft_state: Inverse of ``peft_state`` (``(root, tensors) -> None``), shapes already checked.
        prepare_peft_load: ``(config, peft_config_dict, tensors) -> (config, tensors)``, run before injection
            by ``load_peft`` (e.g. AdaLoRA resizes ranks from a ``rank_pattern``).
        peft_config_extra: Optional ``root -> dict`` of ``adapter_config.json`` fields that depend on the
            injected model's live state rather than on the config (AdaLoRA's learned ``rank_pattern``).
        extra_layers: Optional ``(model, config, targets) -> {module name: AdapterLayer}`` of layers a config adds
            besides its targets (LoRA's trainable-token rows), built before anything is attached.
        training_hooks: Optional schedule class ``(model, config) -> TrainingSchedule`` holding the method's
            training-time logic (``lightning_adapters/schedules.py``); the Lightning integration drives it.
    """

    name: str
    config_cls: type
    peft_type: str
    supported_types: tuple[type, ...] = ()
    create_layer: Callable[..., nn.Module] | None = None
    config_to_peft: Callable[[Any], dict] | None = None
    config_from_peft: Callable[[dict], Any] | None = None
    inject_model: Callable[..., tuple[list[str], dict[str, Any]]] | None = None
    default_targets: dict[str, list[str]] = field(default_factory=dict)
    peft_state: Callable[[Any], dict] | None = None
    load_peft_state: Callable[..., None] | None = None
    prepare_peft_load: Callable[..., tuple] | None = None
    peft_config_extra: Callable[[Any], dict] | None = None
    extra_layers: Callable[..., dict] | None = None
    training_hooks: type | None = None


_REGISTRY: dict[str, MethodSpec] = {}
_LOADED = False


def register(spec: MethodSpec) -> MethodSpec:
    """Add a method to the registry; a name can be registered once."""
    if spec.name in _REGISTRY and _REGISTRY[spec.name] is not spec:
        raise AdapterConfigError(f"method {spec.name!r} is already registered; register each method once")
    _REGISTRY[spec.name] = spec
    return spec


def _load_all() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    for mod in _METHOD_MODULES:
        importlib.import_module(f"lightning_adapters.methods.{mod}")


def available_methods() -> list[str]:
    """Names of every registered method, in registration order."""
    _load_all()
    return list(_REGISTRY)


def get_method(name: str) -> MethodSpec:
    """The spec registered under ``name``; a clear error lists the known names otherwise."""
    _load_all()
    if name not in _REGISTRY:
        raise AdapterConfigError(f"unknown adapter method {name!r}; choose one of {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def spec_for_config(config: AdapterConfig) -> MethodSpec:
    """The spec whose config class is ``type(config)``."""
    _load_all()
    for spec in _REGISTRY.values():
        if type(config) is spec.config_cls:
            return spec
    raise AdapterConfigError(
        f"{type(config).__name__} is not a registered adapter config; use one of "
        f"{[s.config_cls.__name__ for s in _REGISTRY.values()]}"
    )


def get_method_by_peft_type(peft_type: str) -> MethodSpec:
    """The spec for PEFT's ``peft_type`` string (e.g. ``"LORA"``)."""
    _load_all()
    for spec in _REGISTRY.values():
        if spec.peft_type == peft_type:
            return spec
    known = sorted(s.peft_type for s in _REGISTRY.values())
    raise AdapterConfigError(f"PEFT adapter type {peft_type!r} is not supported; supported types: {known}")
