"""The method registry and the two interfaces a method implements to plug into the engine.

A method is one object registered under its name:

- a ``LayerMethod`` adapts single modules (LoRA, LoHa, LoKr, OFT, BOFT, AdaLoRA): ``inject`` resolves the
  targets, asks the method for one ``AdapterLayer`` per target and attaches them; merging, state, PEFT tensors
  and switching are then done per layer by the engine;
- a ``ModelMethod`` changes the model as a whole (Llama-Adapter's prompts and hooks on attention modules):
  ``inject`` hands it the model and keeps the ``ModelAdapter`` it returns, one per injected adapter (so one per
  adapter name), which answers everything the engine asks about that instance afterwards.

Both kinds share ``Method``'s members: names, config class, PEFT translation, training hooks. Abstract members are
required; the others have defaults a method overrides only when it needs to. ``inject`` uses the registry to build
adapters, ``save_peft``/``load_peft`` to translate, the Hydra ConfigStore stores each config class, and the
contract test suite parametrizes over ``available_methods()``.

Discovery is the only list of methods: the registry imports every public module of ``lightning_adapters.methods``
(a method file registers itself when imported), then every module named by an ``lightning_adapters.methods`` entry
point of an installed distribution (a method shipped in another package). A module that registers nothing (a
helper such as ``methods/lora_init.py``) is harmless.
"""

from __future__ import annotations

import abc
import importlib
import importlib.metadata
import pkgutil
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from lightning_adapters.errors import AdapterConfigError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from lightning_adapters.config import AdapterConfig
    from lightning_adapters.core.layer import AdapterLayer
    from lightning_adapters.schedules import TrainingSchedule

METHODS_PACKAGE = "lightning_adapters.methods"
ENTRY_POINT_GROUP = "lightning_adapters.methods"


class Method(abc.ABC):
    """What every method declares: its names, its config class, and how that config reads and writes PEFT's
    ``adapter_config.json``. A method subclasses ``LayerMethod`` or ``ModelMethod``, not this class.

    Attributes:
        name: Registry name, e.g. ``"lora"``; also the ``method`` Hydra option.
        config_cls: The method's config dataclass (a subclass of ``AdapterConfig``).
        peft_type: PEFT's ``peft_type`` string, e.g. ``"LORA"``.
        training_hooks: A schedule class, built as ``cls(model, config, name)`` (``name``: the adapter trained) once
            per fit, holding the method's training-time logic (``lightning_adapters.schedules.TrainingSchedule``; the
            Lightning integration drives it), or ``None`` when the method needs nothing from the training loop.
    """

    name: str
    config_cls: type[AdapterConfig]
    peft_type: str
    training_hooks: type[TrainingSchedule] | None = None

    @abc.abstractmethod
    def config_to_peft(self, config: AdapterConfig) -> dict[str, Any]:
        """The method's own fields of ``adapter_config.json`` for ``config`` (``peft_type`` included); the shared
        fields (targets, ``modules_to_save``, versions) are written by ``save_peft``."""
        ...

    @abc.abstractmethod
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

    def peft_config_extra(self, root: nn.Module, name: str) -> dict[str, Any]:
        """Fields of ``adapter_config.json`` that depend on the injected model's live state rather than on its
        config (AdaLoRA's learned ``rank_pattern``); ``root`` is the module ``inject`` was called on and ``name``
        the adapter being written (the model may hold others of the same method)."""
        return {}


class LayerMethod(Method):
    """A method that adapts single modules, one ``AdapterLayer`` per targeted module.

    Attributes:
        supported_types: Base module types the method adapts (``isinstance`` checks); ``inject`` refuses any
            other matched module before changing the model.
        default_targets: Per ``model_type`` (e.g. ``"llama"``) the target suffixes used when the config's
            ``target_modules`` is None.
    """

    supported_types: tuple[type, ...]
    default_targets: Mapping[str, Sequence[str]] = {}

    @abc.abstractmethod
    def create_layer(self, base: nn.Module, config: AdapterConfig, module_name: str) -> AdapterLayer:
        """The adapter layer for the targeted module ``base`` (named ``module_name`` in the model), built without
        changing ``base``; a value that does not fit the module raises here, before anything is attached."""
        ...

    def extra_layers(self, model: nn.Module, config: AdapterConfig, targets: list[str]) -> dict[str, AdapterLayer]:
        """Layers ``config`` adds besides its targets (LoRA's trainable-token rows and ``target_parameters``), by
        module name, built before anything is attached. By default none."""
        return {}


class ModelAdapter(abc.ABC):
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

    @abc.abstractmethod
    def eject(self, root: nn.Module) -> None:
        """Remove every module and hook this instance added: ``root`` is as before its injection."""
        ...

    @abc.abstractmethod
    def apply_dtype(self, root: nn.Module, config: AdapterConfig) -> None:
        """Cast the instance's tensors to the adapter dtype policy (``core.dtypes.adapter_dtype_for``)."""
        ...

    @abc.abstractmethod
    def summary_rows(self, root: nn.Module) -> list[tuple[str, str, str, int]]:
        """Rows of ``summary``: ``(module name, base type, adapter type, parameter count)`` per holder."""
        ...

    @abc.abstractmethod
    def peft_config(self, fields: dict[str, Any]) -> dict[str, Any]:
        """``adapter_config.json``'s fields rewritten with what the injection resolved (e.g. the attention module
        name when the config left it to the architecture's default)."""
        ...

    @abc.abstractmethod
    def peft_state(self, root: nn.Module) -> dict[str, torch.Tensor]:
        """The instance's tensors under PEFT's key names, without the ``base_model.model.`` prefix."""
        ...

    @abc.abstractmethod
    def load_peft_state(self, root: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        """Copy PEFT-named tensors into the instance (keys and shapes already checked against ``peft_state``)."""
        ...


class ModelMethod(Method):
    """A method that changes the model as a whole rather than module by module (Llama-Adapter)."""

    @abc.abstractmethod
    def inject(self, model: nn.Module, config: AdapterConfig, name: str) -> ModelAdapter:
        """Add the adapter instance called ``name`` to ``model`` and return its handle.

        Everything is validated before the model changes; on a later failure ``inject`` restores the model from its
        snapshot, so this needs no rollback of its own.
        """
        ...


_REGISTRY: dict[str, Method] = {}
_BUILTIN_LOADED = False
_PLUGINS_LOADED = False


def register(method: Method) -> Method:
    """Add a method to the registry; a name can be registered once.

    Returns:
        ``method``.

    Raises:
        AdapterConfigError: Another object is already registered under ``method.name``, ``method`` is neither a
            ``LayerMethod`` nor a ``ModelMethod`` instance, or it lacks one of the attributes they require.
    """
    if not isinstance(method, (LayerMethod, ModelMethod)):
        raise AdapterConfigError(
            f"register: {method!r} is neither a LayerMethod nor a ModelMethod; subclass one of them "
            "(lightning_adapters.registry) and register an instance"
        )
    required = ("name", "config_cls", "peft_type") + (("supported_types",) if isinstance(method, LayerMethod) else ())
    missing = [a for a in required if not hasattr(method, a)]
    if missing:
        raise AdapterConfigError(f"register: {type(method).__name__} does not set {missing}; set them on the class")
    if method.name in _REGISTRY and _REGISTRY[method.name] is not method:
        raise AdapterConfigError(f"method {method.name!r} is already registered; register each method once")
    _REGISTRY[method.name] = method
    _allow_in_weights_only_loads(method.config_cls)
    return method


def _allow_in_weights_only_loads(config_cls: type) -> None:
    """Let ``torch.load(weights_only=True)`` rebuild ``config_cls`` (plain data): a LightningModule that keeps its
    adapter config in ``save_hyperparameters()`` writes it into every checkpoint, which Lightning (resume,
    ``load_from_checkpoint``, ``validate(ckpt_path=...)``) and ``restore_from_checkpoint`` load weights-only."""
    import torch

    add = getattr(torch.serialization, "add_safe_globals", None)
    if add is not None:
        add([config_cls])


def method_modules() -> list[str]:
    """Dotted names of the public modules of ``lightning_adapters.methods``, from every folder on its ``__path__``."""
    package = importlib.import_module(METHODS_PACKAGE)
    names = {info.name for info in pkgutil.iter_modules(package.__path__) if not info.name.startswith("_")}
    return [f"{METHODS_PACKAGE}.{name}" for name in sorted(names)]


def _load_builtin() -> None:
    global _BUILTIN_LOADED
    if _BUILTIN_LOADED:
        return
    _BUILTIN_LOADED = True
    for module in method_modules():
        importlib.import_module(module)


def _load_plugins() -> None:
    global _PLUGINS_LOADED
    if _PLUGINS_LOADED:
        return
    _PLUGINS_LOADED = True
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = entry.dist.name if entry.dist is not None else "an unknown distribution"
        try:
            loaded = entry.load()
        except Exception as err:
            raise AdapterConfigError(
                f"the {ENTRY_POINT_GROUP} entry point {entry.name!r} = {entry.value!r} of {dist} failed to import "
                f"({type(err).__name__}: {err}); fix or uninstall that package"
            ) from err
        # ``module:object`` names a method object; a bare module registered its methods while importing.
        if isinstance(loaded, Method):
            register(loaded)


def _load_all() -> None:
    _load_builtin()
    _load_plugins()


def builtin_configs() -> dict[str, type[AdapterConfig]]:
    """``{class name: config class}`` of every method shipped in ``lightning_adapters.methods`` (imports them).

    ``lightning_adapters`` exports these (``la.LoRAConfig``, ...); plugin methods' configs stay in their own packages.
    """
    _load_builtin()
    return {
        m.config_cls.__name__: m.config_cls
        for m in _REGISTRY.values()
        if m.config_cls.__module__.startswith(METHODS_PACKAGE + ".")
    }


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
