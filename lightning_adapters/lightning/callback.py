"""``AdapterCallback``: parameter-efficient fine-tuning for any LightningModule, added to the Trainer.

Example::

    trainer = L.Trainer(callbacks=[
        la.AdapterCallback(la.LoRAConfig(r=8, target_modules=["q_proj", "v_proj"]), module="model"),
        ModelCheckpoint(save_top_k=2, save_last=True),
    ])
    trainer.fit(MyModule())            # MyModule knows nothing about adapters

The callback injects into the module (or the named sub-module) as soon as it exists: at ``setup`` when it was
built in ``__init__``, else right after the module's ``configure_model``. It freezes the base, prints the
summary, checks at fit start that the optimizer holds every adapter parameter, keeps checkpoints adapter-only
(with the stock ``ModelCheckpoint`` and ``trainer.save_checkpoint``, weights-only saves included), refuses to
resume onto another base or config, drives a method's training hooks (AdaLoRA) and can export at fit end.

Several named adapters: the callback trains one (``name``) and can load others first, from PEFT directories or
from its own checkpoints, e.g. to train ``b`` on top of a frozen ``a``::

    la.AdapterCallback(la.LoRAConfig(r=8), module="model", name="b", init_from={"a": "runs/a/peft"})

Every adapter acts unless ``active`` says otherwise; only ``name`` trains. Checkpoints hold every adapter (or
those ``save`` names) under its name, with which act and which train, and resuming restores all of it.
"""

from __future__ import annotations

import copyreg
import os
import sys
import warnings
from collections.abc import Mapping
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn
from typing_extensions import override

from lightning_adapters.config import AdapterConfig
from lightning_adapters.core.inject import DEFAULT_NAME, check_name
from lightning_adapters.core.layer import ADAPTER_ATTR
from lightning_adapters.errors import AdapterTypeError
from lightning_adapters.lightning import export, strategies
from lightning_adapters.lightning.runtime import (
    RUNTIME_ATTR,
    AdapterOptions,
    AdapterRuntime,
    adapter_list,
    adapter_sources,
    as_config,
    attach_runtime,
    detach_runtime,
    get_runtime,
)


class AdapterCallback(Callback):
    """Inject an adapter into a LightningModule and make training, checkpoints and export adapter-aware.

    Args:
        config: The adapter config, e.g. ``LoRAConfig(r=8)``, or the same as a mapping, as a LightningCLI YAML
            gives it: ``{method: lora, r: 8}`` or ``{class_path: lightning_adapters.LoRAConfig, init_args: {r: 8}}``
            (a mapping is read when the trainer sets up, so a bad value fails there with the library's message).
            ``None`` takes it from an ``AdapterMixin`` module's ``adapter_config``, or from ``init_from[name]``.
        module: Dotted name of the sub-module to adapt (e.g. ``"encoder"``); ``None`` adapts the whole module.
            Parameters of the LightningModule outside it that require grad (a task head) train in full and are
            saved in every checkpoint; ``modules_to_save`` may name such modules too.
        export_peft_dir: At the end of ``fit``, write the adapter of ``module`` here in PEFT's format
            (``PeftModel.from_pretrained(base, export_peft_dir)`` loads it; keys are relative to ``module``, or to
            the whole LightningModule with ``module=None``).
        export_merged_dir: At the end of ``fit``, write a plain copy of the adapted module with the adapter merged
            in (``save_pretrained`` for transformers models, else ``model.safetensors``).
        gradient_checkpointing: Switch on non-reentrant gradient checkpointing of the (transformers) model.
        verbose: Print the adapter summary on rank zero after injection.
        name: Name of the adapter this callback injects and trains.
        init_from: Adapters to load into ``module`` before ``name`` is injected: ``{adapter name: source}``, each
            source a PEFT directory (``save_peft``/``export_peft_dir`` output, a hub adapter) or an adapter
            checkpoint of this integration (a checkpoint holding several adapters gives the one of that name).
            They stay frozen. ``init_from[name]`` (or a bare path, short for ``{name: path}``) starts the trained
            adapter from the stored one instead of a fresh init; ``config`` may then be ``None``.
        active: The adapters that act during the fit: a name or a list (``None``: every adapter of the module,
            stacked). Only ``name`` trains either way.
        save: The adapters checkpoints and the PEFT export hold (``None``: every one; resuming then needs no
            ``init_from`` file). The export has PEFT's layout: ``default`` at the root, the others in sub-folders.
    """

    def __init__(
        self,
        config: Mapping[str, Any] | AdapterConfig | None,
        module: str | None = None,
        *,
        export_peft_dir: str | os.PathLike | None = None,
        export_merged_dir: str | os.PathLike | None = None,
        gradient_checkpointing: bool = False,
        verbose: bool = True,
        name: str = DEFAULT_NAME,
        init_from: str | os.PathLike | Mapping[str, str | os.PathLike] | None = None,
        active: str | list[str] | None = None,
        save: str | list[str] | None = None,
    ) -> None:
        super().__init__()
        if config is not None and not isinstance(config, (AdapterConfig, Mapping)):
            raise AdapterTypeError(
                "config must be an adapter config such as LoRAConfig(...) or a mapping such as "
                f"{{'method': 'lora', 'r': 8}}, got {type(config).__name__}"
            )
        self._config = config
        check_name(name, "AdapterCallback")
        self.options = AdapterOptions(
            module=module,
            name=name,
            init_from=adapter_sources(init_from, name),
            active=adapter_list(active, "active"),
            save=adapter_list(save, "save"),
            export_peft_dir=None if export_peft_dir is None else str(export_peft_dir),
            export_merged_dir=None if export_merged_dir is None else str(export_merged_dir),
            gradient_checkpointing=gradient_checkpointing,
            verbose=verbose,
        )
        self._runtime: AdapterRuntime | None = None

    @property
    def config(self) -> AdapterConfig | None:
        """The adapter config (a mapping given to ``__init__`` is converted on first access)."""
        if self._config is not None and not isinstance(self._config, AdapterConfig):
            self._config = as_config(self._config)
        return self._config

    def _rt(self, pl_module: LightningModule) -> AdapterRuntime:
        return self._runtime if self._runtime is not None else get_runtime(pl_module)

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._runtime = attach_runtime(pl_module, self.config, self.options)
        swap_class(pl_module, trainer)
        # A model built in __init__ is adapted now (before a configure_model that may shard it); one built in
        # configure_model is adapted right after it.
        self._runtime.inject(pl_module, defer=True)

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._rt(pl_module).start_fit(trainer, pl_module)

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        runtime = self._rt(pl_module)
        runtime.last_step = trainer.global_step
        runtime.apply_pending_state()

    @override
    def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        runtime = self._rt(pl_module)
        if not runtime.grads_checked:
            runtime.grads_checked = True
            message = strategies.check_gradients(trainer, runtime.injected_target(pl_module), runtime.key_prefix())
            if message is not None:
                runtime.warn_once("dead-grads", message)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._rt(pl_module).after_batch(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        runtime = self._rt(pl_module)
        if runtime.hooks is not None:
            runtime.hooks.on_train_epoch_end(trainer)

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        runtime = self._rt(pl_module)
        beside = sorted(runtime.outside_keys) + runtime.outside_prefixes
        if beside and (runtime.options.export_peft_dir or runtime.options.export_merged_dir):
            runtime.warn_once(
                "export-beside",
                f"the exports hold {runtime.options.module!r} only; {beside[:6]} trained beside it are in the "
                "Lightning checkpoints: la.restore_from_checkpoint(YourModule(), ckpt) restores everything",
            )
        if _weights_go_back_to_an_unaware_module(trainer, runtime):
            runtime.warn_once(
                "spawned",
                f"strategy {type(trainer.strategy).__name__} ran the fit in processes it started (spawn/fork), and "
                "Lightning hands the trained weights back to the LightningModule in the launching process, which "
                "has no adapter layers there: that module keeps its untrained adapter-free copy. After fit, restore "
                "it with la.restore_from_checkpoint(model, trainer.checkpoint_callback.best_model_path), or use "
                "strategy='ddp' (processes started from the script) or the AdapterMixin route, whose module takes "
                "the adapter back",
            )
        export.export_at_fit_end(
            trainer,
            runtime.injected_target(pl_module),
            peft_dir=runtime.options.export_peft_dir,
            merged_dir=runtime.options.export_merged_dir,
            names=runtime.saved_names(pl_module),
        )

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        # A fit that failed before injection (e.g. a bad module name) leaves the module as it was given.
        if detach_runtime(pl_module):
            self._runtime = None

    @override
    def state_dict(self) -> dict[str, Any]:
        return self._runtime.hooks_state() if self._runtime is not None else {}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._runtime is not None:
            self._runtime.load_hooks_state(state_dict)


def _weights_go_back_to_an_unaware_module(trainer: Trainer, runtime: Any) -> bool:
    """Whether this fit runs in processes Lightning started itself and the launching process's module is one the
    callback swapped here (not an AdapterMixin module, which injects when the weights come back)."""
    from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher

    launcher = getattr(trainer.strategy, "launcher", None)
    return isinstance(launcher, _MultiProcessingLauncher) and bool(runtime.attached and runtime.attached[0])


# ------------------------------------------------------------------------------------------------------------
# The module class swap (here, beside the callback it adds, so runtime.py imports neither)


# The segment every adapter tensor's key holds (``<module>.adapter.<name>.<tensor>``).
_ADAPTER_SEGMENT = f".{ADAPTER_ATTR}."


class _ModuleHooks:
    """Methods placed in front of the user's LightningModule class; each calls the user's own method first."""

    _la_swapped = True

    def __reduce_ex__(self, protocol: Any) -> Any:
        # The swapped class is made at run time in this process; a process that unpickles the module (a spawned
        # DDP worker, torch.load) makes its own from the user's class and these hooks, whatever it is named there.
        reduced = super().__reduce_ex__(protocol)
        cls = type(self)
        hooks, plain = cls.__bases__
        # A user class pickle cannot find by name (defined in a function) stays pickled as the swapped class.
        if isinstance(reduced, tuple) and reduced[0] is copyreg.__newobj__ and reduced[1][:1] == (cls,):
            if _found_by_name(plain):
                return (_new_swapped, (plain, hooks, *reduced[1][1:]), *reduced[2:])
        return reduced

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        out = super().training_step(*args, **kwargs)
        return get_runtime(self).add_loss_term(self, out)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        get_runtime(self).on_save_checkpoint(self, checkpoint)

    def load_state_dict(self, state_dict: Mapping[str, Any], *args: Any, **kwargs: Any) -> Any:
        # Weights of an adapted module arriving before injection (the launching process of a spawned DDP fit
        # receives rank 0's state dict this way): inject first, so the adapter tensors have a place to go.
        runtime = self.__dict__.get(RUNTIME_ATTR)
        if runtime is None and getattr(self, "adapter_config", None) is not None:
            runtime = get_runtime(self)
        if runtime is not None and runtime._prepared is None:
            # Only for adapter tensors of the target: other extra keys (a larger pretrained file loaded with
            # strict=False) must not inject early, before the weights an init such as PiSSA reads are loaded.
            extra = set(state_dict) - set(self.state_dict())
            if any(k.startswith(runtime.key_prefix()) and _ADAPTER_SEGMENT in f".{k}" for k in extra):
                runtime.inject(self, defer=True)
        return super().load_state_dict(state_dict, *args, **kwargs)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        get_runtime(self).on_load_checkpoint(self, checkpoint)
        super().on_load_checkpoint(checkpoint)

    def configure_callbacks(self) -> Any:
        own = super().configure_callbacks()
        trainer = self._trainer
        if trainer is not None and any(isinstance(cb, AdapterCallback) for cb in trainer.callbacks):
            return own
        own = list(own) if isinstance(own, (list, tuple)) else ([] if own is None else [own])
        return [*own, AdapterCallback(None)]


class AdapterModuleHooks(_ModuleHooks):
    """The hooks, with injection right after the user's ``configure_model`` (Lightning runs it on every stage)."""

    def configure_model(self) -> None:
        super().configure_model()
        get_runtime(self).after_configure_model(self)


class AdapterSetupHooks(_ModuleHooks):
    """The hooks for a module without ``configure_model`` whose precision plugin refuses the init context Lightning
    opens around that hook (``BitsandbytesPrecision`` with ``ignore_modules``): the step that follows
    ``configure_model`` runs at the end of the module's ``setup`` instead, the hook Lightning calls just before."""

    def setup(self, stage: str) -> None:
        super().setup(stage)
        get_runtime(self).after_configure_model(self)


_CLASS_CACHE: dict[tuple[type, type], type] = {}


def init_context_refused(pl_module: nn.Module, trainer: Any) -> bool:
    """Whether adding a ``configure_model`` to ``pl_module`` would make Lightning fail: it runs an overridden
    ``configure_model`` inside the precision plugin's ``module_init_context``, which ``BitsandbytesPrecision``
    refuses when ``ignore_modules`` is set. A module with its own ``configure_model`` meets that refusal anyway."""
    from lightning.pytorch.utilities.model_helpers import is_overridden

    plugin = getattr(trainer, "precision_plugin", None)
    if type(plugin).__name__ != "BitsandbytesPrecision" or not getattr(plugin, "ignore_modules", None):
        return False
    return not is_overridden("configure_model", pl_module, parent=LightningModule)


def swap_class(pl_module: nn.Module, trainer: Any = None) -> None:
    """Put the hooks in front of ``pl_module``'s class (once; picklable, like ``core.layer``):
    ``AdapterModuleHooks``, or ``AdapterSetupHooks`` where the trainer's precision plugin refuses
    ``configure_model`` (``init_context_refused``).
    """
    cls = type(pl_module)
    if getattr(cls, "_la_swapped", False):
        return
    hooks = AdapterSetupHooks if init_context_refused(pl_module, trainer) else AdapterModuleHooks
    swapped = _swapped_class(cls, hooks)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pl_module.__class__ = swapped


def _swapped_class(cls: type, hooks: type) -> type:
    """The class ``hooks`` + ``cls`` (made once per process, named in this module so it pickles)."""
    if (cls, hooks) not in _CLASS_CACHE:
        module = sys.modules[__name__]
        name = f"Adapter{cls.__name__}"
        while hasattr(module, name):
            name += "_"
        new = type(name, (hooks, cls), {"__module__": __name__, "__qualname__": name})
        setattr(module, name, new)
        _CLASS_CACHE[(cls, hooks)] = new
    return _CLASS_CACHE[(cls, hooks)]


def _found_by_name(cls: type) -> bool:
    """Whether pickle finds ``cls`` by its module and qualified name (not a class defined inside a function)."""
    found: Any = sys.modules.get(cls.__module__)
    for part in cls.__qualname__.split("."):
        found = getattr(found, part, None)
    return found is cls


def _new_swapped(cls: type, hooks: type, *args: Any) -> Any:
    """Unpickling: a new instance of the swapped class of ``cls`` (its state is set afterwards, as usual)."""
    swapped = _swapped_class(cls, hooks)
    return swapped.__new__(swapped, *args)
