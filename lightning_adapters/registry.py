"""The method registry and the two protocols a method implements to plug into the engine.

A method is one object registered under its name:

- a ``LayerMethod`` adapts single modules (LoRA, LoHa, LoKr, OFT, BOFT, AdaLoRA): ``inject`` resolves the
  targets, asks the method for one ``AdapterLayer`` per target and attaches them; merging, state, PEFT tensors
  and switching are then done per layer by the engine;
- a ``ModelMethod`` changes the model as a whole (Llama-Adapter's prompts and hooks on attention modules):
  ``inject`` hands it the model and keeps the ``ModelAdapter`` it returns, one per injected adapter (so one per
  adapter name), which answers everything the engine asks about that instance afterwards.

Both kinds translate configs to and from PEFT's ``adapter_config.json`` with the same four members. Members with
a body are optional: a method overrides them only when it needs to. ``inject`` uses the registry to build
adapters, ``save_peft``/``load_peft`` to translate, the Hydra ConfigStore stores each config class, and the
contract test suite parametrizes over ``available_methods()``.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from lightning_adapters.errors import AdapterConfigError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from lightning_adapters.config import AdapterConfig
    from lightning_adapters.core.layer import AdapterLayer
    from lightning_adapters.schedules import TrainingSchedule

_METHOD_MODULES = ("lora", "loha", "lokr", "oft", "boft", "adalora", "llama_adapter")


class PeftTranslation(Protocol):
    """How a method's config reads and writes PEFT's ``adapter_config.json`` (members of both method kinds).

    Attributes:
        name: Registry name, e.g. ``"lora"``; also the ``method`` Hydra option.
        config_cls: The method's config dataclass (a subclass of ``AdapterConfig``).
        peft_type: PEFT's ``peft_type`` string, e.g. ``"LORA"``.
        training_hooks: A schedule class, built as ``cls(model, config)`` once per fit, holding the method's
            training-time logic (``lightning_adapters.schedules.TrainingSchedule``; the Lightning integration drives
            it), or ``None`` when the method needs nothing from the training loop.
    """

    name: str
    config_cls: type[AdapterConfig]
    peft_type: str
    training_hooks: type[TrainingSchedule] | None = None

    def config_to_peft(self, config: AdapterConfig) -> dict[str, Any]:
        """The method's own fields of ``adapter_config.json`` for ``config`` (``peft_type`` included); the shared
        fields (targets, ``modules_to_save``, versions) are written by ``save_peft``."""
        ...

    def config_from_peft(self, fields: dict[str, Any]) -> AdapterConfig:
        """Our config from the fields of a PEFT ``adapter_config.json`` (already type-checked by ``load_peft``).

        Raises:
            AdapterConfigError: A PEFT option this library does not implement, naming it and the fix.
        """
        ...

    def prepare_peft_load(
        self, config: AdapterConfig, fields: dict[str, Any], tensors: dict[str, torch.Tensor]
    ) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
        """Adjust the config (and tensors) ``load_peft`` is about to inject from what the file holds, e.g. ranks
        or layouts that only the tensor shapes reveal. By default both are returned unchanged."""
        return config, tensors

    def peft_config_extra(self, root: nn.Module) -> dict[str, Any]:
        """Fields of ``adapter_config.json`` that depend on the injected model's live state rather than on its
        config (AdaLoRA's learned ``rank_pattern``); ``root`` is the module ``inject`` was called on."""
        return {}


@runtime_checkable
class LayerMethod(PeftTranslation, Protocol):
    """A method that adapts single modules, one ``AdapterLayer`` per targeted module.

    Attributes:
        supported_types: Base module types the method adapts (``isinstance`` checks); ``inject`` refuses any
            other matched module before changing the model.
        default_targets: Per ``model_type`` (e.g. ``"llama"``) the target suffixes used when the config's
            ``target_modules`` is None.
    """

    supported_types: tuple[type, ...]
    default_targets: Mapping[str, Sequence[str]] = {}

    def create_layer(self, base: nn.Module, config: AdapterConfig, module_name: str) -> AdapterLayer:
        """The adapter layer for the targeted module ``base`` (named ``module_name`` in the model), built without
        changing ``base``; a value that does not fit the module raises here, before anything is attached."""
        ...

    def extra_layers(self, model: nn.Module, config: AdapterConfig, targets: list[str]) -> dict[str, AdapterLayer]:
        """Layers ``config`` adds besides its targets (LoRA's trainable-token rows and ``target_parameters``), by
        module name, built before anything is attached. By default none."""
        return {}


@runtime_checkable
class ModelAdapter(Protocol):
    """One injected instance of a ``ModelMethod``: what it added to the model and how to drive it.

    ``inject`` keeps it in the adapter's ``InjectionRecord``; module names are relative to the module ``inject``
    was called on (``root`` below). Whole-model adapters have no weight-space form, so ``merge`` refuses them.

    Attributes:
        targets: Names of the modules the adapter changed (e.g. the adapted attention modules).
        holders: Names of the modules the adapter added. They hold all its parameters (trainable, saved by
            ``adapter_state_dict``, sharded as a unit) and an ``enabled`` flag that ``disabled`` switches off.
    """

    targets: list[str]
    holders: list[str]

    def eject(self, root: nn.Module) -> None:
        """Remove every module and hook this instance added: ``root`` is as before its injection."""
        ...

    def apply_dtype(self, root: nn.Module, config: AdapterConfig) -> None:
        """Cast the instance's tensors to the dtype policy (``lightning_adapters.dtypes.adapter_dtype_for``)."""
        ...

    def summary_rows(self, root: nn.Module) -> list[tuple[str, str, str, int]]:
        """Rows of ``summary``: ``(module name, base type, adapter type, parameter count)`` per holder."""
        ...

    def peft_config(self, fields: dict[str, Any]) -> dict[str, Any]:
        """``adapter_config.json``'s fields rewritten with what the injection resolved (e.g. the attention module
        name when the config left it to the architecture's default)."""
        ...

    def peft_state(self, root: nn.Module) -> dict[str, torch.Tensor]:
        """The instance's tensors under PEFT's key names, without the ``base_model.model.`` prefix."""
        ...

    def load_peft_state(self, root: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        """Copy PEFT-named tensors into the instance (keys and shapes already checked against ``peft_state``)."""
        ...


@runtime_checkable
class ModelMethod(PeftTranslation, Protocol):
    """A method that changes the model as a whole rather than module by module (Llama-Adapter)."""

    def inject(self, model: nn.Module, config: AdapterConfig, name: str) -> ModelAdapter:
        """Add the adapter instance called ``name`` to ``model`` and return its handle.

        Everything is validated before the model changes; on a later failure ``inject`` restores the model from its
        snapshot, so this needs no rollback of its own.
        """
        ...


Method = LayerMethod | ModelMethod

_REGISTRY: dict[str, Method] = {}
_LOADED = False


def register(method: Method) -> Method:
    """Add a method to the registry; a name can be registered once.

    Returns:
        ``method``, so a method file can write ``METHOD = register(LoRA())``.

    Raises:
        AdapterConfigError: Another object is already registered under ``method.name``, or ``method`` is neither
            a ``LayerMethod`` nor a ``ModelMethod``.
    """
    if not isinstance(method, (LayerMethod, ModelMethod)):
        raise AdapterConfigError(
            f"register: {method!r} is neither a LayerMethod (create_layer, supported_types, ...) nor a ModelMethod "
            "(inject); subclass one of the protocols in lightning_adapters.registry"
        )
    if method.name in _REGISTRY and _REGISTRY[method.name] is not method:
        raise AdapterConfigError(f"method {method.name!r} is already registered; register each method once")
    _REGISTRY[method.name] = method
    return method


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


def get_method(name: str) -> Method:
    """The method registered under ``name``; a clear error lists the known names otherwise."""
    _load_all()
    if name not in _REGISTRY:
        raise AdapterConfigError(f"unknown adapter method {name!r}; choose one of {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def spec_for_config(config: AdapterConfig) -> Method:
    """The method whose config class is ``type(config)``."""
    _load_all()
    for method in _REGISTRY.values():
        if type(config) is method.config_cls:
            return method
    raise AdapterConfigError(
        f"{type(config).__name__} is not a registered adapter config; use one of "
        f"{[m.config_cls.__name__ for m in _REGISTRY.values()]}"
    )


def get_method_by_peft_type(peft_type: str) -> Method:
    """The method for PEFT's ``peft_type`` string (e.g. ``"LORA"``)."""
    _load_all()
    for method in _REGISTRY.values():
        if method.peft_type == peft_type:
            return method
    known = sorted(m.peft_type for m in _REGISTRY.values())
    raise AdapterConfigError(f"PEFT adapter type {peft_type!r} is not supported; supported types: {known}")
