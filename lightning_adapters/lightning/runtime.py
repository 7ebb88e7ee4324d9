"""The per-module adapter runtime that ``AdapterCallback`` and ``AdapterMixin`` share.

Lightning 2.6 runs, in this order: callbacks' and the module's ``setup``; the module's ``configure_model``
(inside the sharding and precision init contexts); the checkpoint restore (non-sharded strategies);
``strategy.setup`` (precision ``convert_module``, DDP/FSDP wrapping, ``configure_optimizers``); ``on_fit_start``;
the restore of sharded strategies; ``on_train_start``. Injection must follow the user's ``configure_model`` (a
model may be built there) and precede the restore and the optimizers, and the checkpoint filter must run for
weights-only saves too, where callbacks' ``on_save_checkpoint`` is skipped. A callback alone cannot do either.

So the integration swaps the LightningModule's class for a subclass, as ``core.layer`` does for adapted layers
(``callback.swap_class``): ``Adapter<UserModule>`` runs the user's ``configure_model``, ``training_step`` and
checkpoint hooks, then this runtime's adapter work. Loop events (fit start, optimizer steps, epoch ends, fit end)
are driven from ``AdapterCallback``, which runs before ``ModelCheckpoint`` (Lightning moves checkpoint callbacks
last), so a checkpoint taken at a step or epoch end already holds the method schedule's updated state.
``AdapterMixin`` adds that callback itself through ``configure_callbacks`` when the trainer has none.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_adapters.config import AdapterConfig
from lightning_adapters.core.inject import (
    DEFAULT_NAME,
    InjectionRecord,
    apply_trainability,
    check_name,
    check_names,
    find_records,
    inject,
    known_names,
    summary,
)
from lightning_adapters.core.named import active, set_active, set_trainable, trainable
from lightning_adapters.core.state import adapter_prefixes, base_fingerprint, is_adapter_key
from lightning_adapters.errors import AdapterConfigError, AdapterStateError, TargetError
from lightning_adapters.lightning import checkpoint as ckpt
from lightning_adapters.lightning import data_init, scope, sources, strategies
from lightning_adapters.lightning.hooks import ScheduleDriver
from lightning_adapters.quant import prepare_for_kbit_training, quantize_for_precision_plugin
from lightning_adapters.registry import get_method
from lightning_adapters.schedules import TrainingSchedule

RUNTIME_ATTR = "_la_runtime"
# Wrappers whose attribute state dicts leave out (FSDP1's and activation checkpointing's state-dict hooks drop them).
# ``torch.compile``'s ``_orig_mod.`` is not one: a compiled sub-module's keys keep it.
_WRAPPER_ATTRS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


@dataclass
class AdapterOptions:
    """What the integration does besides injecting (set through ``AdapterCallback``'s arguments).

    Attributes:
        module: Dotted name of the sub-module to inject into (``None``: the whole LightningModule).
        name: Name of the adapter the fit trains.
        init_from: ``{adapter name: source}``: adapters loaded into the module before ``name`` is injected, each
            from a PEFT directory or an adapter checkpoint of this integration (``sources``); frozen unless the
            name is ``name``, whose training then starts from the loaded tensors.
        active: Adapters acting during the fit (``None``: every adapter of the module).
        save: Adapters whose tensors checkpoints hold (``None``: every adapter of the module).
        export_peft_dir: Write the adapter in PEFT's format here at the end of ``fit``.
        export_merged_dir: Write a plain copy of the injected module with the adapter merged in at the end of ``fit``.
        gradient_checkpointing: Switch on non-reentrant gradient checkpointing of a transformers model at injection.
        verbose: Print the adapter summary on rank zero after injection.
    """

    module: str | None = None
    name: str = DEFAULT_NAME
    init_from: dict[str, str] = field(default_factory=dict)
    active: list[str] | None = None
    save: list[str] | None = None
    export_peft_dir: str | None = None
    export_merged_dir: str | None = None
    gradient_checkpointing: bool = False
    verbose: bool = True


def _config_class(path: Any) -> type:
    import lightning_adapters

    if not isinstance(path, str) or not path:
        raise AdapterConfigError(f"class_path must be the name of a config class such as 'LoRAConfig', got {path!r}")
    module_name, _, name = path.rpartition(".")
    try:
        owner = importlib.import_module(module_name) if module_name else lightning_adapters
        cls = getattr(owner, name)
    except (ImportError, AttributeError):
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, AdapterConfig) and cls is not AdapterConfig):
        raise AdapterConfigError(
            f"class_path {path!r} is not an adapter config class; use one of lightning_adapters.LoRAConfig, "
            "LoHaConfig, LoKrConfig, OFTConfig, BOFTConfig, AdaLoRAConfig, LlamaAdapterConfig"
        )
    return cls


def as_config(value: Any) -> AdapterConfig:
    """An adapter config from a config object or from the mappings a YAML file (LightningCLI) gives.

    Accepted: a config such as ``LoRAConfig(r=8)``; ``{"method": "lora", "r": 8, ...}`` (the method's registry
    name plus its fields); jsonargparse's ``{"class_path": "lightning_adapters.LoRAConfig", "init_args": {...}}``
    (``class_path`` may also be the bare class name).

    Raises:
        AdapterConfigError: Naming the unknown method, class or field, or the bad value.
    """
    if isinstance(value, AdapterConfig):
        return value
    if not isinstance(value, Mapping):
        raise AdapterConfigError(
            "expected an adapter config such as LoRAConfig(r=8), or a mapping such as {method: lora, r: 8}, got "
            f"{type(value).__name__}: {value!r}"
        )
    data = dict(value)
    if "class_path" in data:
        extra = sorted(set(data) - {"class_path", "init_args"})
        if extra:
            raise AdapterConfigError(
                f"unexpected keys {extra} next to class_path in {value!r}; put the config's fields under init_args"
            )
        cls = _config_class(data["class_path"])
        fields = data.get("init_args") or {}
    elif "method" in data:
        method = data.pop("method")
        cls = get_method(method.lower() if isinstance(method, str) else method).config_cls
        fields = data
    else:
        raise AdapterConfigError(
            f"an adapter config given as a mapping needs 'method' (e.g. {{method: lora, r: 8}}) or 'class_path' "
            f"(e.g. {{class_path: lightning_adapters.LoRAConfig, init_args: {{r: 8}}}}), got {value!r}"
        )
    if not isinstance(fields, Mapping):
        raise AdapterConfigError(f"init_args of {cls.__name__} must be a mapping of its fields, got {fields!r}")
    known = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(str(k) for k in fields if k not in known)
    if unknown:
        raise AdapterConfigError(f"{cls.__name__} has no field {unknown}; its fields are {known}")
    return cls(**dict(fields))


def adapter_sources(value: Any, name: str) -> dict[str, str]:
    """``init_from`` as ``{adapter name: path}``: a bare path is ``{name: path}``; each path is checked to exist.

    Raises:
        AdapterConfigError: Not a path or a mapping of adapter names to paths, an unusable name, or a path that is
            neither a PEFT directory nor a checkpoint file.
    """
    if value is None:
        return {}
    if isinstance(value, (str, os.PathLike)):
        value = {name: value}
    if not isinstance(value, Mapping):
        raise AdapterConfigError(
            f"init_from must be a path or a mapping {{adapter name: path}} such as {{'a': 'runs/a/peft'}}, "
            f"got {value!r}"
        )
    return {check_name(n, "init_from"): sources.check_source(n, p) for n, p in value.items()}


def adapter_list(value: Any, what: str) -> list[str] | None:
    """``active``/``save`` as a list of adapter names (``None`` stays ``None``: every adapter).

    Raises:
        AdapterConfigError: Not a name or a list of names.
    """
    if value is None:
        return None
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise AdapterConfigError(f"{what} must be an adapter name or a list of them (or None for all), got {value!r}")
    return list(names)


def _rank_zero_info(message: str) -> None:
    from lightning.pytorch.utilities.rank_zero import rank_zero_info

    rank_zero_info(message)


def _has_dtensor(module: nn.Module) -> bool:
    return any(hasattr(p, "device_mesh") for p in module.parameters())


class AdapterRuntime:
    """Injection, checkpoint filtering and method-hook driving for one LightningModule.

    Args:
        config: The adapter config to inject.
        options: Where to inject and what else to do.
    """

    def __init__(self, config: AdapterConfig | Mapping[str, Any] | None, options: AdapterOptions) -> None:
        # None: the trained adapter is loaded from ``options.init_from``, its config with it.
        self.config = as_config(config) if config is not None else None
        self.options = options
        # The config injected into the sub-module: ``config`` less the modules_to_save that lie beside it.
        self.inject_config = self.config
        # Trainable state beside the sub-module (see ``scope``): exact keys and the modules_to_save prefixes.
        self.outside_keys: set[str] = set()
        self.outside_prefixes: list[str] = []
        # What attach_runtime changed on the module, undone when a fit fails before injection.
        self.attached: tuple[bool, Any, bool] | None = None
        self.fingerprint: str | None = None
        self.shapes: dict[str, list[int]] = {}
        self.hooks: ScheduleDriver | None = None
        self.pending_hooks_state: dict[str, Any] | None = None
        self.manual_regularization = False
        self.last_step = 0
        self._prepared: nn.Module | None = None
        self.grads_checked = False
        self._warned: set[str] = set()

    # --- where the adapter lives ---------------------------------------------------------------------------

    def target(self, pl_module: nn.Module) -> nn.Module | None:
        """The module to inject into, or ``None`` while it does not exist yet."""
        if not self.options.module:
            return pl_module
        try:
            return pl_module.get_submodule(self.options.module)
        except AttributeError:
            return None

    def injected_target(self, pl_module: nn.Module) -> nn.Module:
        """The injected module; raises if injection has not happened."""
        target = self.target(pl_module)
        if target is None or not find_records(target):
            raise AdapterStateError(
                "the LightningModule has no adapters yet: they are injected when the Trainer configures the model "
                "(fit/validate/test/predict) or by calling inject_adapters()"
            )
        return target

    def key_prefix(self) -> str:
        """Prefix of the target's keys inside the LightningModule's state dict."""
        return f"{self.options.module}." if self.options.module else ""

    def adapter_key_prefixes(self, pl_module: nn.Module, names: list[str] | None = None) -> list[str]:
        """Adapter key prefixes relative to the LightningModule, as its state dict names them (of ``names`` only).

        Module names under FSDP1 or activation-checkpoint wrappers contain the wrappers' attributes; state dicts
        leave them out, and so do these prefixes.
        """
        prefix = self.key_prefix()
        out = []
        for p in adapter_prefixes(self.injected_target(pl_module), names):
            for wrapper in _WRAPPER_ATTRS:
                p = p.replace(wrapper, "")
            out.append(prefix + p)
        return out

    def saved_keys(self, pl_module: nn.Module, names: list[str] | None = None) -> Callable[[str], bool]:
        """Predicate on the LightningModule's state-dict keys: adapter tensors and trainable state beside them.

        Args:
            pl_module: The LightningModule.
            names: Only these adapters' tensors (``None``: the adapters ``options.save`` names, else every one).
        """
        if names is None:
            names = self.saved_names(pl_module)
        prefixes = self.adapter_key_prefixes(pl_module, names) + self.outside_prefixes
        exact = set(self.outside_keys)
        return lambda key: key in exact or is_adapter_key(key, prefixes)

    def saved_names(self, pl_module: nn.Module) -> list[str]:
        """The adapters checkpoints hold: ``options.save``, else every adapter of the module."""
        names = known_names(self.injected_target(pl_module))
        return [n for n in names if n in self.options.save] if self.options.save is not None else names

    def record(self, target: nn.Module, name: str | None = None) -> InjectionRecord:
        """The injection record of adapter ``name`` (default: the trained one) in ``target``."""
        name = self.options.name if name is None else name
        return next(rec for _, _, rec in find_records(target) if rec.name == name)

    # --- injection -----------------------------------------------------------------------------------------

    def inject(self, pl_module: nn.Module, *, defer: bool = False) -> bool:
        """Inject (idempotently) into the target; with ``defer``, a target that is not built yet is not an error.

        Returns:
            Whether the target is injected after the call.
        """
        target = self.target(pl_module)
        if target is None:
            if defer:
                return False
            children = [n for n, _ in pl_module.named_children()]
            raise AdapterConfigError(
                f"AdapterCallback(module={self.options.module!r}): the LightningModule has no sub-module of that "
                f"name after configure_model; pass the attribute path of the model to adapt (its sub-modules: "
                f"{children}), or module=None for the whole LightningModule"
            )
        if self.options.init_from and not _has_dtensor(target):
            self._load_sources(target)
        try:
            self.inject_config, outside = scope.split_modules_to_save(pl_module, self.options.module or "", self.config)
        except TargetError:
            if defer:
                return False
            raise
        if find_records(target):
            inject(target, self.inject_config, name=self.options.name)  # same config: no-op; another: a clear error
            apply_trainability(target)
            self._train_outside(pl_module, outside)
            if self._prepared is not target:
                # Injected here after loading ``init_from``, or by the user (la.inject) before the trainer ran.
                self._after_injection(pl_module, target)
            return True
        if _has_dtensor(target):
            raise AdapterConfigError(
                "the model was sharded (fully_shard) in configure_model before the adapters were injected, so the "
                "adapters would not be sharded with it. Inject first: call self.inject_adapters() (AdapterMixin) "
                "before fully_shard, or drop the fully_shard calls and let the integration shard the model with "
                "lightning_adapters.adapter_parallelize_fn"
            )
        quantize_for_precision_plugin(pl_module._trainer, pl_module)
        try:
            inject(target, self.inject_config, name=self.options.name)
        except TargetError:
            if defer:
                return False
            raise
        self._train_outside(pl_module, outside)
        self._after_injection(pl_module, target)
        return True

    def _load_sources(self, target: nn.Module) -> None:
        """Load the ``init_from`` adapters the module does not hold yet; take the trained one's config if needed."""
        present = set(known_names(target))
        for name, path in self.options.init_from.items():
            if name not in present:
                sources.load_adapter(target, name, path)
        if self.options.name in self.options.init_from:
            loaded = self.record(target).config
            if self.config is None:
                self.config = loaded
            elif type(loaded) is not type(self.config) or loaded.to_dict() != self.config.to_dict():
                raise AdapterConfigError(
                    f"adapter {self.options.name!r} loaded from {self.options.init_from[self.options.name]!r} has "
                    f"the config {loaded!r}, not the one given ({self.config!r}); pass config=None to train it "
                    "with the config it was saved with"
                )

    def _assign_roles(self, target: nn.Module) -> None:
        """Make the trained adapter the only trainable one and ``options.active`` (default: every one) act."""
        names = known_names(target)
        if self.options.save is not None:
            check_names(target, self.options.save, "AdapterCallback(save=...)")
            if self.options.name not in self.options.save:
                raise AdapterConfigError(
                    f"AdapterCallback(save={self.options.save!r}) leaves out the adapter it trains, "
                    f"{self.options.name!r}; its checkpoints could not resume the fit: add it"
                )
        set_trainable(target, self.options.name)
        chosen = self.options.active if self.options.active is not None else names
        try:
            set_active(target, chosen)
        except AdapterConfigError as err:
            if self.options.active is not None:
                raise
            raise AdapterConfigError(
                f"{err}. AdapterCallback makes every adapter of the module act together unless told otherwise "
                f"({names}); pass active=[...] (AdapterMixin: adapter_active) with the ones that should act"
            ) from None

    def _train_outside(self, pl_module: nn.Module, saved_modules: list[str]) -> None:
        for name in saved_modules:
            pl_module.get_submodule(name).requires_grad_(True)
        self.outside_keys, self.outside_prefixes = scope.outside_state(
            pl_module, self.options.module or "", saved_modules
        )

    def _after_injection(self, pl_module: nn.Module, target: nn.Module) -> None:
        self._prepared = target
        pl_module.strict_loading = False
        trainer = pl_module._trainer
        local = self._local_fingerprint(target)
        # Ranks may initialise the base differently before DDP broadcasts rank 0's weights: use rank 0's fingerprint.
        self.fingerprint = trainer.strategy.broadcast(local) if trainer is not None else local
        self.shapes = ckpt.expected_shapes(pl_module, self.saved_keys(pl_module), self.shapes)
        prepare_for_kbit_training(target)  # a quantized base: norms, heads and adapters in fp32 (no-op otherwise)
        if self.options.gradient_checkpointing:
            strategies.enable_gradient_checkpointing(target)
        self._assign_roles(target)
        if not self.options.module:
            record = self.record(target)
            frozen, low_rank = scope.frozen_parts(target, record)
            if frozen or low_rank:
                self.warn_once("frozen-parts", scope.frozen_parts_message(target, frozen, low_rank, record.config))
        if self.options.verbose:
            beside = sorted(self.outside_keys) + self.outside_prefixes
            extra = f"\ntrained in full beside {self.options.module!r}: {beside}" if beside else ""
            _rank_zero_info(
                f"lightning_adapters: injected {type(self.config).__name__} as {self.options.name!r}\n"
                + summary(target)
                + extra
            )

    @staticmethod
    def _local_fingerprint(target: nn.Module) -> str | None:
        if any(t.device.type == "meta" for t in target.state_dict().values()):
            return None  # a meta-device model has no values yet; the fingerprint is taken at the first save
        return base_fingerprint(target)

    def after_configure_model(self, pl_module: nn.Module) -> None:
        """Inject after the user's ``configure_model`` and prepare the strategy (called on every stage)."""
        self.inject(pl_module)
        data_init.initialize_in_fit(pl_module, self.injected_target(pl_module), self.config)
        trainer = pl_module._trainer
        if trainer is not None:
            strategies.prepare_strategy(
                trainer,
                pl_module,
                self.injected_target(pl_module),
                merged_export=bool(self.options.export_merged_dir),
            )

    # --- checkpoints ---------------------------------------------------------------------------------------

    def on_save_checkpoint(self, pl_module: nn.Module, checkpoint: dict[str, Any]) -> None:
        """Keep only adapter tensors in ``checkpoint["state_dict"]`` and add the adapter metadata."""
        target = self.injected_target(pl_module)
        if self.fingerprint is None:
            self.fingerprint = self._local_fingerprint(target)
        names = self.saved_names(pl_module)
        saved = self.saved_keys(pl_module, names)
        meta = ckpt.build_metadata(
            adapters={n: self._described(target, n) for n in names},
            name=self.options.name,
            active=active(target),
            trainable=trainable(target),
            module=self.options.module or "",
            fingerprint=self.fingerprint,
            shapes=ckpt.expected_shapes(pl_module, saved, self.shapes),
        )
        ckpt.filter_checkpoint(checkpoint, meta, saved)

    def _described(self, target: nn.Module, name: str) -> tuple[str, AdapterConfig]:
        # The trained adapter is described by the user's config (its modules_to_save beside the sub-module too).
        rec = self.record(target, name)
        return rec.method, self.config if name == self.options.name else rec.config

    def on_load_checkpoint(self, pl_module: nn.Module, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint from another base or config, check every adapter key and shape; restore which
        adapters act and train."""
        target = self.injected_target(pl_module)
        ckpt.validate_checkpoint(
            checkpoint,
            pl_module,
            adapters={n: self._described(target, n) for n in known_names(target)},
            fingerprint=self.fingerprint,
            expected=lambda names: ckpt.expected_shapes(pl_module, self.saved_keys(pl_module, names), self.shapes),
        )
        meta = checkpoint.get(ckpt.METADATA_KEY) or {}
        if "active" in meta and "trainable" in meta:
            names = known_names(target)
            missing = [n for n in meta["active"] + meta["trainable"] if n not in names]
            if missing:
                raise AdapterStateError(
                    f"the checkpoint's adapters {meta['active']} act and {meta['trainable']} train, but this model "
                    f"has no {missing} (it has {names}); load them before resuming (AdapterCallback(init_from=...))"
                )
            set_active(target, meta["active"])
            set_trainable(target, meta["trainable"])

    # --- method training hooks -----------------------------------------------------------------------------

    def start_fit(self, trainer: Any, pl_module: nn.Module) -> None:
        """Create this fit's method schedule (if the method has one) and run the fit-start checks."""
        target = self.injected_target(pl_module)
        self.grads_checked = False
        self.manual_regularization = False
        strategies.check_optimizers(trainer, pl_module, target, self.key_prefix())
        strategies.handle_input_grads(target)
        method = self.record(target).method
        schedule_cls = get_method(method).training_hooks
        schedule = schedule_cls(target, self.config, self.options.name) if schedule_cls is not None else None
        self.hooks = ScheduleDriver(schedule) if schedule is not None else None
        if self.hooks is not None:
            self.hooks.setup(trainer)
            self.apply_pending_state()

    @property
    def schedule(self) -> TrainingSchedule | None:
        """This fit's method schedule (e.g. ``AdaLoRASchedule``), or None."""
        return self.hooks.schedule if self.hooks is not None else None

    def apply_pending_state(self) -> None:
        """Hand restored schedule state over once the schedule exists (after ``start``, which cannot overwrite it)."""
        if self.hooks is not None and self.pending_hooks_state is not None:
            self.hooks.load_state_dict(self.pending_hooks_state)
            self.pending_hooks_state = None

    def hooks_state(self) -> dict[str, Any]:
        """The method schedule's state for the callback's checkpoint entry."""
        return {"training_hooks": self.hooks.state_dict() if self.hooks is not None else None}

    def load_hooks_state(self, state: Mapping[str, Any]) -> None:
        """Keep restored schedule state until the schedule exists."""
        hooks_state = state.get("training_hooks")
        if hooks_state is not None:
            self.pending_hooks_state = dict(hooks_state)
            self.apply_pending_state()

    def after_batch(self, trainer: Any, pl_module: nn.Module) -> None:
        """Report every optimizer step (not every batch: accumulation) to the schedule, while gradients exist."""
        step = trainer.global_step
        if step > self.last_step:
            if self.hooks is not None:
                self.hooks.on_optimizer_step_end(trainer, step - 1)
            self.last_step = step

    def loss_term(self) -> torch.Tensor | None:
        """The method's regularisation term for the current batch (``None``: nothing to add)."""
        return self.hooks.loss_term() if self.hooks is not None else None

    def add_loss_term(self, pl_module: Any, output: Any) -> Any:
        """Add the method's loss term to what ``training_step`` returned (a tensor or a dict with ``"loss"``)."""
        if self.hooks is None or self.manual_regularization:
            return output
        term = self.hooks.loss_term()
        if term is None:
            return output
        if not pl_module.automatic_optimization:
            self.warn_once(
                "manual-opt",
                "the adapter method has a regularisation term, but with manual optimization training_step's "
                "return value is not backpropagated: add self.adapter_regularization() (AdapterMixin) to your loss",
            )
            return output
        if isinstance(output, torch.Tensor):
            return output + term
        if isinstance(output, Mapping) and "loss" in output:
            return {**output, "loss": output["loss"] + term}
        return output

    def warn_once(self, key: str, message: str) -> None:
        """Warn with ``message`` once per runtime (rank zero)."""
        if key not in self._warned:
            self._warned.add(key)
            from lightning.pytorch.utilities.rank_zero import rank_zero_warn

            rank_zero_warn(message)


# ------------------------------------------------------------------------------------------------------------
# The module class swap


def get_runtime(pl_module: nn.Module) -> AdapterRuntime:
    """The runtime of ``pl_module``, created from ``AdapterMixin.adapter_config`` on first use."""
    runtime = pl_module.__dict__.get(RUNTIME_ATTR)
    if runtime is None:
        config = getattr(pl_module, "adapter_config", None)
        options = _mixin_options(pl_module, AdapterOptions())
        if config is None and options.name not in options.init_from:
            raise AdapterConfigError(
                f"{type(pl_module).__name__} has no adapter config: set self.adapter_config = LoRAConfig(...) in "
                "__init__ (AdapterMixin), or pass one to AdapterCallback(config)"
            )
        runtime = AdapterRuntime(config, options)
        pl_module.__dict__[RUNTIME_ATTR] = runtime
    return runtime


def _mixin_options(pl_module: nn.Module, options: AdapterOptions) -> AdapterOptions:
    """``options`` completed with an ``AdapterMixin`` module's ``adapter_*`` attributes (a conflict is an error)."""
    unset = {"module": None, "name": DEFAULT_NAME, "init_from": None, "active": None, "save": None}
    for key, empty in unset.items():
        mine = getattr(pl_module, f"adapter_{key}", empty)
        if key == "name":
            check_name(mine, "adapter_name")
        elif key == "init_from":
            mine = adapter_sources(mine, options.name) if mine is not None else None
        elif key in ("active", "save"):
            mine = adapter_list(mine, f"adapter_{key}")
        given = getattr(options, key)
        if mine in (empty, given) or (key == "init_from" and not mine):
            continue
        if given not in (empty, {}):
            raise AdapterConfigError(
                f"AdapterCallback({key}={given!r}) differs from the module's adapter_{key}={mine!r}; give it in one "
                "place"
            )
        setattr(options, key, mine)
    return options


def attach_runtime(
    pl_module: nn.Module, config: AdapterConfig | Mapping[str, Any] | None, options: AdapterOptions
) -> AdapterRuntime:
    """Give ``pl_module`` a runtime for ``config`` (or reuse its mixin's); the caller then swaps its class.

    ``detach_runtime`` undoes this while nothing is injected yet (a fit that fails before injection).
    """
    existing = pl_module.__dict__.get(RUNTIME_ATTR)
    options = _mixin_options(pl_module, options)
    own = getattr(pl_module, "adapter_config", None)
    own = None if own is None else as_config(own)
    config = None if config is None else as_config(config)
    if config is None:
        config = own if own is not None else (existing.config if existing is not None else None)
    if config is None and options.name not in options.init_from:
        raise AdapterConfigError(
            "AdapterCallback needs a config: AdapterCallback(LoRAConfig(...)), a LightningModule with "
            "AdapterMixin whose adapter_config is set, or init_from={name: source} for the trained adapter"
        )
    for other, where in ((own, "the module's adapter_config"), (existing and existing.config, "an earlier setup")):
        if (
            other is not None
            and config is not None
            and (type(other) is not type(config) or other.to_dict() != config.to_dict())
        ):
            raise AdapterConfigError(
                f"AdapterCallback config {config!r} differs from {where} {other!r}; give the config in one place"
            )
    if options.module is not None and not isinstance(options.module, str):
        raise AdapterConfigError(
            f"module must be the dotted attribute name of a sub-module (e.g. 'model') or None, got {options.module!r}"
        )
    created = existing is None
    if created:
        existing = AdapterRuntime(config, options)
        pl_module.__dict__[RUNTIME_ATTR] = existing
    else:
        existing.options = options
    swapped = not getattr(type(pl_module), "_la_swapped", False)
    if existing.attached is None and existing._prepared is None:
        existing.attached = (swapped, pl_module.strict_loading, created)
    # Lightning then loads adapter-only state dicts non-strictly; ``on_load_checkpoint`` checks the adapter keys.
    pl_module.strict_loading = False
    return existing


def detach_runtime(pl_module: nn.Module) -> bool:
    """Undo ``attach_runtime`` if nothing was injected: the module's class, ``strict_loading`` and runtime.

    Returns:
        Whether the module was restored (an injected module keeps its runtime and class).
    """
    runtime = pl_module.__dict__.get(RUNTIME_ATTR)
    if runtime is None or runtime.attached is None or runtime._prepared is not None:
        return False
    swapped, strict_loading, created = runtime.attached
    runtime.attached = None
    if swapped:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pl_module.__class__ = type(pl_module).__bases__[1]
    pl_module.strict_loading = strict_loading
    if created:
        del pl_module.__dict__[RUNTIME_ATTR]
    return True
