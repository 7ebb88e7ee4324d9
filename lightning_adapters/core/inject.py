"""inject, eject, merge, unmerge, disabled, freezing and the summary table.

Every entry point validates everything first and mutates second, so a bad config or a layer that cannot be
adapted leaves the model exactly as it was. ``inject`` also snapshots the module tree before its first change and
puts it back on any exception (even ``KeyboardInterrupt``), so it never leaves a half-adapted model.

A model may hold several named adapters (``inject(model, config, name=...)``). The model they were injected into
(the *root*) keeps a ``ModelAdapters`` entry outside its module tree and state dict: one ``InjectionRecord`` per
name, which names are active and which are trainable. The named functions that switch, delete, scale and train
adapters live in ``core/named.py``.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_adapters.config import AdapterConfig
from lightning_adapters.core.dtypes import adapter_dtype_for
from lightning_adapters.core.layer import (
    ADAPTER_ATTR,
    DEFAULT_NAME,
    AdapterLayer,
    AdapterSet,
    adapter_set,
    attach,
    attach_blocked,
    detach,
    is_adapted,
)
from lightning_adapters.core.quant import QuantizedWeight, is_quantized, stand_in
from lightning_adapters.core.quant_ops import (
    check_unmergeable,
    dequantize_model,
    forget_hf_quantization,
    forget_quantized_merge,
    merge_quantized,
    unmerge_quantized,
)
from lightning_adapters.core.targeting import check_adaptable, resolve_targets, saves_module
from lightning_adapters.errors import (
    AdapterConfigError,
    AdapterStateError,
    AdapterTypeError,
    MergeError,
    NotMergeableError,
    TargetError,
    UnsupportedLayerError,
)
from lightning_adapters.registry import LayerMethod, ModelAdapter, spec_for_config

RECORD_ATTR = "_la_adapters"
log = logging.getLogger("lightning_adapters")


@dataclass
class InjectionRecord:
    """What ``inject`` did to a model, kept on the model (outside the module tree and its state dict).

    Attributes:
        config: The validated copy of the config the adapter was built from.
        method: The method's registry name.
        targets: Names of the adapted modules.
        modules_to_save: Names of the modules trained in full.
        original_requires_grad: Every parameter's ``requires_grad`` before ``inject`` (``eject`` gives it back).
        model_adapter: The instance a whole-model method (``ModelMethod``) returned; ``None`` for per-layer ones.
        resolved_peft_fields: Fields of ``adapter_config.json`` resolved after injection (AdaLoRA's ``total_step``
            when the config left it to the trainer, EVA's ``rank_pattern``/``alpha_pattern``); ``save_peft`` writes
            them over every other value of those fields.
        name: The adapter's name (``inject(..., name=...)``).
    """

    config: AdapterConfig
    method: str
    targets: list[str]
    modules_to_save: list[str]
    original_requires_grad: dict[str, bool] = field(default_factory=dict)
    model_adapter: ModelAdapter | None = None
    resolved_peft_fields: dict[str, Any] = field(default_factory=dict)

    name: str = DEFAULT_NAME

    @property
    def holders(self) -> list[str]:
        """Modules a whole-model adapter added (trainable, part of the adapter state); empty for per-layer ones."""
        return list(self.model_adapter.holders) if self.model_adapter is not None else []


@dataclass
class ModelAdapters:
    """The named adapters of one root module, in injection order.

    Attributes:
        records: ``{name: InjectionRecord}``.
        active: Names whose layers act in the forward (the first injected one until ``set_active``).
        trainable: Names whose tensors require grad (the first injected one until ``set_trainable``).
    """

    records: dict[str, InjectionRecord] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)
    trainable: list[str] = field(default_factory=list)


def check_module(model: Any, what: str) -> None:
    """Refuse anything that is not an ``nn.Module`` with a library error naming it.

    Raises:
        AdapterTypeError: ``model`` is ``None``, a dict, a path, a class rather than an instance, ...
    """
    if not isinstance(model, nn.Module):
        shown = repr(model)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        hint = " (a class: instantiate it first)" if isinstance(model, type) else ""
        raise AdapterTypeError(
            f"{what}: model must be a torch.nn.Module instance, got {type(model).__name__} {shown}{hint}"
        )


def check_materialized(model: nn.Module, what: str) -> None:
    """Refuse a model whose adapted weights or adapter tensors live on the meta device (no values to merge).

    Raises:
        AdapterStateError: Naming the first such tensor and how to materialise it.
    """
    for name, adapter, base, layer in adapter_layers(model):
        tensors = list(layer.base_weights(base).items()) + [
            (f"{ADAPTER_ATTR}.{adapter}.{n}", t) for n, t in layer.named_parameters()
        ]
        for tname, t in tensors:
            if t.is_meta:
                raise AdapterStateError(
                    f"{what}: {name}.{tname} is on the meta device (its values were never loaded), so there is "
                    f"nothing to {what}; materialise the model first (model.to_empty(device=...) then load its "
                    f"weights, or build it without device='meta')"
                )


def _view_of(t: torch.Tensor) -> tuple[Any, ...]:
    # What tells two tensors over one storage apart: where they start, their dtype, shape and strides.
    return t.data_ptr(), t.dtype, t.shape, t.stride()


class ModelSnapshot:
    """Enough of a module tree to put it back exactly after a failed in-place change.

    Per module: its class, its attribute dict and a shallow copy of every dict attribute (``_modules``,
    ``_parameters``, ``_buffers``, the hook dicts), restored into the same dict objects so hook handles stay
    valid. Per parameter: ``requires_grad`` and the tensor behind ``.data``. Values written in place are not
    copied unless named with ``keep_values``: the other changes this undoes (class swaps, new children, hooks,
    freezing, ``.data`` casts) never write values.
    """

    def __init__(self, model: nn.Module) -> None:
        self.modules = [
            (m, type(m), dict(m.__dict__), {k: (v, dict(v)) for k, v in m.__dict__.items() if isinstance(v, dict)})
            for m in model.modules()
        ]
        self.params = [(p, p.requires_grad, p.data) for p in model.parameters()]
        self.values: list[tuple[torch.Tensor, torch.Tensor]] = []

    def keep_values(self, t: torch.Tensor) -> None:
        """Also copy ``t``'s values, to be written back by ``restore`` (for a change made in place)."""
        self.values.append((t, t.detach().clone()))

    def restore(self) -> None:
        """Put every module and parameter back as it was when the snapshot was taken."""
        for m, cls, attrs, containers in self.modules:
            if type(m) is not cls:
                m.__class__ = cls
            for obj, content in containers.values():
                obj.clear()
                obj.update(content)
            m.__dict__.clear()
            m.__dict__.update(attrs)
        for p, flag, data in self.params:
            if _view_of(p.data) != _view_of(data):
                p.data = data
            p.requires_grad_(flag)
        with torch.no_grad():
            for t, copy in self.values:
                t.copy_(copy)


def check_writable(layers: list[tuple[str, nn.Module, AdapterLayer]], what: str) -> None:
    """Refuse base weights that are inference tensors while inference mode is off (they cannot change in place).

    Raises:
        AdapterStateError: Naming the first such weight and the two ways out.
    """
    if torch.is_inference_mode_enabled():
        return
    for name, base, _ in layers:
        weight = base._parameters.get("weight")
        if weight is not None and weight.is_inference():
            raise AdapterStateError(
                f"{what}: {name}.weight is an inference tensor (the model was built or loaded under "
                f"torch.inference_mode()), which cannot be changed in place outside inference mode; call {what} "
                f"inside `with torch.inference_mode():`, or build the model outside it"
            )


def compiled_inner(model: nn.Module) -> nn.Module | None:
    """The module a ``torch.compile`` wrapper (``OptimizedModule``) runs, else ``None``."""
    compiled = getattr(getattr(torch, "_dynamo", None), "eval_frame", None)
    wrapper = getattr(compiled, "OptimizedModule", None)
    return model._orig_mod if wrapper is not None and isinstance(model, wrapper) else None


def get_adapters(model: nn.Module) -> ModelAdapters | None:
    """The ``ModelAdapters`` entry of ``model`` itself (not of a sub-module)."""
    return model.__dict__.get(RECORD_ATTR)


def find_roots(model: nn.Module) -> list[tuple[str, nn.Module, ModelAdapters]]:
    """Every ``(prefix, root, ModelAdapters)`` of injected modules inside ``model`` (itself included)."""
    out = []
    for name, mod in model.named_modules(remove_duplicate=True):
        entry = mod.__dict__.get(RECORD_ATTR)
        if entry is not None:
            out.append((name, mod, entry))
    return out


def find_records(model: nn.Module) -> list[tuple[str, nn.Module, InjectionRecord]]:
    """Every ``(prefix, root, record)`` of the adapters inside ``model`` (itself included), one per name."""
    return [(name, mod, rec) for name, mod, entry in find_roots(model) for rec in entry.records.values()]


def adapter_layers(
    model: nn.Module, names: list[str] | None = None
) -> Iterator[tuple[str, str, nn.Module, AdapterLayer]]:
    """``(module name, adapter name, base module, layer)`` for every adapter layer in ``model``.

    Args:
        names: Only the layers of these adapters (``None``: all).
    """
    for module_name, mod in model.named_modules():
        if is_adapted(mod):
            for adapter, layer in adapter_set(mod)._modules.items():
                if names is None or adapter in names:
                    yield module_name, adapter, mod, getattr(layer, "_fsdp_wrapped_module", layer)


def adapted_modules(model: nn.Module, names: list[str] | None = None) -> Iterator[tuple[str, nn.Module, AdapterLayer]]:
    """``(module name, base module, layer)`` for every adapter layer in ``model`` (one per adapter name).

    Args:
        names: Only the layers of these adapters (``None``: all).
    """
    for module_name, _, mod, layer in adapter_layers(model, names):
        yield module_name, mod, layer


def _configs_equal(a: AdapterConfig, b: AdapterConfig) -> bool:
    return type(a) is type(b) and a.to_dict() == b.to_dict()


def _resolve_modules_to_save(model: nn.Module, config: AdapterConfig, method: str) -> list[str]:
    if not config.modules_to_save:
        return []
    names = [n for n, _ in model.named_modules() if n and saves_module(n, config.modules_to_save)]
    missing = [m for m in config.modules_to_save if not any(saves_module(n, [m]) for n in names)]
    if missing:
        raise TargetError(f"{method}: modules_to_save entries {missing} match no module of the model")
    # Keep the outermost match only: saving a module saves its children (an entry matching only such a child is
    # covered by its parent's entry).
    return [n for n in names if not any(n.startswith(o + ".") for o in names if o != n)]


def _base_dtype(module: nn.Module) -> torch.dtype:
    for p in module.parameters(recurse=False):
        return p.dtype
    for p in module.parameters():
        return p.dtype
    return torch.float32


_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*")
RESERVED_NAMES = ("__base__",)


def check_name(name: Any, what: str) -> str:
    """Refuse an adapter name that cannot be a module name in the ``adapter`` set (returns it).

    Raises:
        AdapterConfigError: Not a string, empty, with characters other than letters, digits, ``_`` and ``-``,
            reserved (``"__base__"``), or an attribute of the set (``"keys"``, ``"train"``, ...).
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name in RESERVED_NAMES or hasattr(AdapterSet, name):
        why = "reserved" if name in RESERVED_NAMES else "not usable"
        raise AdapterConfigError(
            f"{what}: adapter name {name!r} is {why}; use a string of letters, digits, '_' and '-' that is not "
            f"{list(RESERVED_NAMES)} nor an nn.ModuleDict attribute, e.g. 'default' or 'task_b'"
        )
    return name


def _add_to_existing(model: nn.Module, name: str) -> ModelAdapters | None:
    """The root entry a new adapter ``name`` joins (``None`` for a first adapter); refuses what cannot be added."""
    roots = find_roots(model)
    if not roots:
        if any(is_adapted(m) for m in model.modules()):
            raise AdapterConfigError("model already contains adapter layers; eject them before injecting again")
        return None
    prefix, _, entry = roots[0]
    if prefix:
        raise AdapterConfigError(
            f"model already has adapters injected into its sub-module {prefix!r} ({list(entry.records)}); inject "
            f"the new adapter into that sub-module too, or call lightning_adapters.eject(model) first"
        )
    if name in entry.records:
        raise AdapterConfigError(
            f"model already has an adapter named {name!r} ({entry.records[name].method}) with a different config; "
            f"pick another name (inject(model, config, name='...')), or remove it first: lightning_adapters.delete("
            f"model, {name!r}) while another one is active, or lightning_adapters.eject(model) to remove every adapter"
        )
    merged = [a for _, a, _, layer in adapter_layers(model) if layer.merged]
    if merged:
        raise AdapterConfigError(
            f"inject {name!r}: adapter {merged[0]!r} is merged into the base weights, which a new adapter would be "
            f"built on; call lightning_adapters.unmerge(model) first"
        )
    return entry


def inject(model: nn.Module, config: AdapterConfig, name: str = DEFAULT_NAME) -> nn.Module:
    """Add the adapter ``config`` describes to ``model`` in place, under ``name``, and freeze everything else.

    Base parameter names and values are untouched; the adapter's tensors appear under
    ``<module>.adapter.<name>.*``. The first adapter of a model is active and trainable; a further one (another
    name, any method) is added inactive and frozen: choose with ``set_active`` and ``set_trainable``. Injecting the
    same config under the same name again is a no-op; another config under a taken name raises.

    Args:
        model: Any ``nn.Module`` (a transformers model, a plain PyTorch model, a LightningModule's sub-module).
        config: A method config such as ``LoRAConfig(r=8, target_modules=["q_proj", "v_proj"])``.
        name: The adapter's name (letters, digits, ``_``, ``-``); ``"default"`` unless given.

    Returns:
        ``model``, for chaining.

    Raises:
        AdapterTypeError: ``model`` is not an ``nn.Module`` or ``config`` is not an adapter config.
        AdapterConfigError: ``name`` is taken by another config or not usable, a config value does not fit a layer,
            or the new adapter cannot share a module or tensor with the adapters already there (named).
        TargetError: ``target_modules`` matches nothing (the message lists the closest names).
        UnsupportedLayerError: A matched module has a type the method cannot adapt.

    Any exception raised while adapting (a layer that cannot be built, a failing hook, ``KeyboardInterrupt``)
    restores the model's module tree, classes, hooks, parameters and ``requires_grad`` flags before it propagates.
    """
    check_module(model, "inject")
    if not isinstance(config, AdapterConfig):
        raise AdapterTypeError(f"config must be an adapter config such as LoRAConfig(...), got {type(config).__name__}")
    check_name(name, "inject")
    inner = compiled_inner(model)
    if inner is not None and get_adapters(model) is None:
        # A torch.compile wrapper: the adapters live in the module it runs (where they already are when the model
        # was injected before compiling), so its keys are those of the plain model under ``_orig_mod.`` and
        # save_peft / load_peft read the same files either way. Dynamo sees the change through its guards.
        inject(inner, config, name=name)
        return model
    # Work on a validated copy: fields set after construction (cfg.r = 0) skipped __post_init__'s checks, and the
    # record must keep describing the adapters really built when the caller edits their object later (cfg.r = 8).
    config = copy.deepcopy(config)
    config.__post_init__()
    spec = spec_for_config(config)
    entry = get_adapters(model)
    if entry is not None and name in entry.records and _configs_equal(entry.records[name].config, config):
        return model
    entry = _add_to_existing(model, name)
    others = [] if entry is None else list(entry.records.values())

    to_save = _resolve_modules_to_save(model, config, spec.name)
    _check_shared_tensors(name, to_save, others)
    snapshot = ModelSnapshot(model)
    try:
        original_rg = {n: p.requires_grad for n, p in model.named_parameters()}
        if others:
            original_rg = dict(others[0].original_requires_grad)
        model_adapter = None
        if not isinstance(spec, LayerMethod):
            _check_in_place_tensors(model, name, config, to_save, [], others)
            model_adapter = spec.inject(model, config, name)
            targets = model_adapter.targets
        else:
            skip = {n for n, _ in model.named_modules() if any(n == s or n.startswith(s + ".") for s in to_save)}
            targets = resolve_targets(
                model,
                config.target_modules,
                config.exclude_modules,
                method=spec.name,
                default_targets=spec.default_targets or None,
                skip=skip,
                layers_to_transform=config.layers_to_transform,
                layers_pattern=config.layers_pattern,
                none_selects_nothing=bool(getattr(config, "target_parameters", None)),
            )
            modules = {n: model.get_submodule(n) for n in targets}
            bad = {n: type(m).__name__ for n, m in modules.items() if not isinstance(m, spec.supported_types)}
            if bad:
                supported = sorted(t.__name__ for t in spec.supported_types)
                raise UnsupportedLayerError(
                    f"{spec.name}: cannot adapt {bad}; supported layer types are {supported}. "
                    f"Narrow target_modules or add these names to exclude_modules"
                )
            check_adaptable(model, targets, spec.name, spec.supported_types)
            extra_built = spec.extra_layers(model, config, targets)
            modules.update({n: model.get_submodule(n) for n in extra_built})
            taken = [n for n, m in modules.items() if attach_blocked(m)]
            if taken:
                raise AdapterConfigError(
                    f"{spec.name}: {taken} already have an attribute {ADAPTER_ATTR!r}, where the adapter would go; "
                    f"rename that attribute or add these modules to exclude_modules"
                )
            # Build every layer before attaching any: a layer that cannot be built fails before any change.
            # A quantized base is built on as its dequantized stand-in (core/quant.py): same shapes, float weight.
            layers = {n: spec.create_layer(stand_in(m), config, n) for n, m in modules.items() if n in targets}
            layers.update(extra_built)
            _check_base_changes(name, layers, modules)
            _check_in_place_tensors(model, name, config, to_save, list(layers), others)
            for n, layer in layers.items():
                if layer.changes_base_on_attach and is_quantized(modules[n]):
                    raise UnsupportedLayerError(
                        f"{spec.name}: {n!r} is a quantized base, which an init that rewrites the base weight "
                        f"(init_weights={getattr(config, 'init_weights', None)!r}) cannot write exactly; use the "
                        "default init there, or dequantize that layer (lightning_adapters.quantize(..., skip=[...]))"
                    )
            for n, layer in layers.items():
                if layer.changes_base_on_attach:  # a residual init writes W − s·B0·A0 into the base
                    snapshot.keep_values(modules[n].weight)
                attach(modules[n], layer, name)
                layer.apply_dtype(adapter_dtype_for(_base_dtype(modules[n]), config))
        record = InjectionRecord(
            config=config,
            method=spec.name,
            targets=list(targets),
            modules_to_save=to_save,
            original_requires_grad=original_rg,
            model_adapter=model_adapter,
            name=name,
        )
        if entry is None:
            entry = ModelAdapters(active=[name], trainable=[name])
            model.__dict__[RECORD_ATTR] = entry
        entry.records[name] = record
        sync_active(model)
        apply_trainability(model)
    except BaseException:
        snapshot.restore()  # a first adapter's entry goes with the root's __dict__; a joined entry loses the record
        if others:
            entry.records.pop(name, None)
        raise
    return model


def _check_shared_tensors(name: str, to_save: list[str], others: list[InjectionRecord]) -> None:
    # modules_to_save are trained in place (not copied per adapter): two adapters cannot both own one.
    for rec in others:
        owned = rec.modules_to_save
        shared = [m for m in to_save if any(m == o or m.startswith(o + ".") or o.startswith(m + ".") for o in owned)]
        if shared:
            raise AdapterConfigError(
                f"inject {name!r}: modules_to_save {shared} are already saved by adapter {rec.name!r}; a module is "
                f"trained in place, so only one adapter may own it: leave them out of this config's modules_to_save"
            )


def _in_place_tensors(root: nn.Module, biases: list[str], to_save: list[str]) -> dict[int, tuple[str, str]]:
    """``{id(tensor): (its name, "" for a bias or its modules_to_save module)}`` of the base tensors an adapter trains
    in place."""
    out = {id(root.get_parameter(n)): (n, "") for n in biases}
    for m in to_save:
        for n, p in root.get_submodule(m).named_parameters():
            out.setdefault(id(p), (f"{m}.{n}", m))
    return out


def _check_in_place_tensors(
    model: nn.Module,
    name: str,
    config: AdapterConfig,
    to_save: list[str],
    layer_modules: list[str],
    others: list[InjectionRecord],
) -> None:
    # Base biases a ``bias`` option trains and modules_to_save are trained in place, not copied per adapter (PEFT
    # allows a single adapter with ``bias``): a tensor another adapter already trains would end up in both adapters'
    # saved files with whichever values were trained last. (modules_to_save against modules_to_save is refused by
    # _check_shared_tensors, by module.)
    if not others:
        return
    mode = getattr(config, "bias", "none")
    if mode == "all":
        adapter_ids = {id(p) for _, _, layer in adapted_modules(model) for p in layer.parameters()}
        biases = [
            n for n, p in model.named_parameters() if (n == "bias" or n.endswith(".bias")) and id(p) not in adapter_ids
        ]
    elif mode != "none":
        biases = [
            f"{m}.bias" if m else "bias"
            for m in layer_modules
            if isinstance(getattr(model.get_submodule(m), "bias", None), nn.Parameter)
        ]
    else:
        biases = []
    new = _in_place_tensors(model, biases, to_save)
    for rec in others:
        owned = _in_place_tensors(model, trained_biases(model, rec), rec.modules_to_save)
        shared = [(new[i], owned[i]) for i in new if i in owned]
        if not shared:
            continue
        (_, mine), (_, theirs) = shared[0]
        mine_label = "modules_to_save" if mine else f"bias={mode!r}"
        theirs_label = "modules_to_save" if theirs else f"bias={getattr(rec.config, 'bias', 'none')!r}"
        saved = mine or theirs
        fix = "use bias='none' in one of them" + (f", or leave {saved!r} out of modules_to_save" if saved else "")
        names = [t for (t, _), _ in shared]
        raise AdapterConfigError(
            f"inject {name!r}: {mine_label} would train {names[:3]}{' ...' if len(names) > 3 else ''} in place, "
            f"which adapter {rec.name!r} already trains ({theirs_label}); a base tensor trained in place belongs to "
            f"one adapter only (PEFT allows one adapter with bias): {fix}"
        )


def _rewrites_base(layer: AdapterLayer) -> bool:
    # Before attach: ``changes_base_on_attach``; once attached (or with a data-driven residual init still to come),
    # a method's own ``rewrites_base`` (LoRA's), since ``changes_base_on_attach`` is false after ``on_attach``.
    return bool(layer.changes_base_on_attach or getattr(layer, "rewrites_base", False))


def _check_base_changes(name: str, layers: dict[str, AdapterLayer], modules: dict[str, nn.Module]) -> None:
    # An init that rewrites the base weight (PiSSA, OLoRA, CorDA, LoftQ) would change what the other adapters of
    # the module are applied to, whichever of them came first.
    for n, layer in layers.items():
        mod = modules[n]
        if not is_adapted(mod):
            continue
        holders = list(adapter_set(mod)._modules.items())
        changing = [a for a, other in holders if _rewrites_base(other)]
        if _rewrites_base(layer) or changing:
            who = f"adapter {changing[0]!r}" if changing else f"adapter {name!r}"
            raise AdapterConfigError(
                f"inject {name!r}: {n!r} already holds adapter {holders[0][0]!r}, and {who} uses an init that "
                f"rewrites the base weight (residual init), which would change the other adapter's base; use "
                f"init_weights=True for one of them, or exclude {n!r} (exclude_modules)"
            )


def sync_active(model: nn.Module) -> None:
    """Write the root's active names into every adapter set and whole-model switch under it (flags only)."""
    for _, root, entry in find_roots(model):
        active = tuple(entry.active)
        for _, mod in root.named_modules():
            if is_adapted(mod):
                adapters = adapter_set(mod)
                adapters.active = tuple(n for n in active if n in adapters._modules)
        for rec in entry.records.values():
            for n in rec.holders:
                root.get_submodule(n).active = rec.name in active


def trained_biases(root: nn.Module, rec: InjectionRecord) -> list[str]:
    """Names (relative to ``root``) of the base biases the config's ``bias`` option trains, as PEFT's ``bias`` does.

    ``"all"``: every parameter called ``bias`` in the model; ``"<method>_only"`` (``"lora_only"``, ...): the biases
    of the adapted modules; ``"none"`` (and methods without the option): none. Adapter parameters are not listed
    (they train anyway).
    """
    mode = getattr(rec.config, "bias", "none")
    if mode == "none":
        return []
    if mode == "all":
        adapter_ids = {id(p) for _, _, layer in adapted_modules(root) for p in layer.parameters()}
        return [
            n for n, p in root.named_parameters() if (n == "bias" or n.endswith(".bias")) and id(p) not in adapter_ids
        ]
    return [
        f"{name}.bias" if name else "bias"
        for name, base, _ in adapted_modules(root, [rec.name])
        if isinstance(getattr(base, "bias", None), nn.Parameter)
    ]


def apply_trainability(model: nn.Module) -> None:
    """Freeze every parameter except the trainable adapters' tensors, ``modules_to_save`` and ``bias``-trained ones
    (a pure function of the configs and the trainable names)."""
    roots = find_roots(model)
    if not roots:
        return
    trainable: set[int] = set()
    for _prefix, root, entry in roots:
        for rec in entry.records.values():
            if rec.name not in entry.trainable:
                continue
            for _, _, layer in adapted_modules(root, [rec.name]):
                trainable.update(id(p) for p in layer.parameters())
            trainable.update(id(root.get_parameter(n)) for n in trained_biases(root, rec))
            trainable.update(_record_trainable(root, rec))
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)


def _record_trainable(root: nn.Module, rec: InjectionRecord) -> set[int]:
    # Ids of the whole modules an adapter trains: whole-model methods' holders and modules_to_save.
    names = rec.holders + rec.modules_to_save
    return {id(p) for n in names for p in root.get_submodule(n).parameters()}


def apply_dtype_policy(model: nn.Module) -> None:
    """Re-apply each adapter's dtype policy (e.g. after Lightning's ``bf16-true`` cast the whole module)."""
    for _, root, rec in find_records(model):
        for _, base, layer in adapted_modules(root, [rec.name]):
            layer.apply_dtype(adapter_dtype_for(_base_dtype(base), rec.config))
        # Whole-model methods (no per-layer adapters) re-apply their own policy.
        if rec.model_adapter is not None:
            rec.model_adapter.apply_dtype(root, rec.config)


def known_names(model: nn.Module) -> list[str]:
    """Names of every adapter in ``model``, in injection order."""
    return [rec.name for _, _, rec in find_records(model)]


def check_names(model: nn.Module, names: Any, what: str, *, allow_empty: bool = False) -> list[str]:
    """``names`` (one name or a list of them) as a list, refused unless each is an adapter of ``model``, once.

    Raises:
        AdapterConfigError: Naming the unknown or repeated name and the known ones.
        AdapterTypeError: ``names`` is neither a string nor a list/tuple of strings.
    """
    known = known_names(model)
    if not known:
        raise AdapterConfigError(f"{what}: model has no adapters; call lightning_adapters.inject(model, config) first")
    given = [names] if isinstance(names, str) else names
    if not isinstance(given, (list, tuple)) or not all(isinstance(n, str) for n in given):
        raise AdapterTypeError(
            f"{what}: adapter names must be a string or a list of strings, got {names!r}; the model has {known}"
        )
    if not given and not allow_empty:
        raise AdapterConfigError(f"{what}: got no adapter name; pass one or more of {known}")
    unknown = [n for n in given if n not in known]
    if unknown:
        raise AdapterConfigError(f"{what}: unknown adapter name {unknown[0]!r}; the model has {known}")
    repeated = sorted({n for n in given if given.count(n) > 1})
    if repeated:
        raise AdapterConfigError(f"{what}: adapter {repeated[0]!r} is named twice in {list(given)}; name it once")
    return list(given)


def active_names(model: nn.Module) -> list[str]:
    """The active adapter names of every root in ``model``, in order."""
    return [n for _, _, entry in find_roots(model) for n in entry.active]


def check_stackable(model: nn.Module, acting: dict[int, list[tuple[str, str, AdapterLayer]]], what: str) -> None:
    """Refuse a module on which several layers would act together while one of them is not additive.

    Args:
        acting: ``{id(module): [(module name, adapter name, layer), ...]}`` of the layers that would act.

    Raises:
        AdapterConfigError: Naming the module, the adapters and why the layer cannot stack.
    """
    for group in acting.values():
        if len(group) < 2:
            continue
        for module_name, adapter, layer in group:
            if not layer.additive:
                others = [a for _, a, _ in group if a != adapter]
                raise AdapterConfigError(
                    f"{what}: adapters {[a for _, a, _ in group]} would act together on {module_name!r}, but "
                    f"{adapter!r} ({type(layer).__name__}) cannot stack: {layer.not_additive_reason}. Activate or "
                    f"merge it without {others}, or target other modules with one of them"
                )


def merge(model: nn.Module, names: Any = None, *, safe: bool = False, keep_original: bool = False) -> nn.Module:
    """Fold adapters into their base weights; forward then runs the plain base forward for them.

    Args:
        names: The adapters to merge (one name or a list); ``None``: the active ones. Merged adapters act whatever
            ``set_active`` says until ``unmerge``; several merged into one module must be additive (as for
            stacking).

    Exactness: ``unmerge`` recomputes ΔW and subtracts it (or inverts the rotation/scaling), in fp32 for a
    half-precision base on CPU, so the base comes back up to rounding: for additive methods each element within
    ``u·(|W + ΔW| + |W|)`` of its original value, ``u`` the base dtype's unit roundoff (2⁻²⁴ fp32, 2⁻¹¹ fp16,
    2⁻⁸ bf16), and bit-exact wherever ``ΔW`` is 0. Rows a merge scales by 0 (DoRA, BOFT) are kept and put back
    bit-exactly. ``eject(model)`` without ``merge`` never merged, so it returns the exact original weights.

    Quantized bases (``lightning_adapters.quantize``, bitsandbytes/torchao layers): the weight is dequantized, merged
    and quantized again with the layer's own settings. That re-quantization changes the merged weight by up to
    one quantization step; the largest change per layer is logged and returned by
    ``lightning_adapters.merge_errors(model)``. ``unmerge`` then needs ``keep_original``.

    Args:
        safe: Check each merged weight in the base's own dtype (so an fp16 overflow to ``inf`` counts) before it
            is written. On a refusal every layer this call merged gets its weight back from a copy taken just
            before its merge: bit-exact, at the cost of holding one copy of each merged weight during the call.
            Without ``safe`` no copy is kept.
        keep_original: Keep the quantized weight of each quantized base from before the merge, so ``unmerge`` (and
            ``disabled``) can put it back bit-exactly. Costs one quantized weight per layer; no effect on float bases.

    Raises:
        MergeError: ``safe`` and a merged weight would be non-finite (the message names the layer).
        NotMergeableError: The method has no weight-space form.
        AdapterStateError: An adapted weight or adapter tensor is on the meta device.
        AdapterTypeError: ``model`` is not an ``nn.Module``.
    """
    check_module(model, "merge")
    if names is None:
        names = active_names(model)
    elif find_records(model):
        names = check_names(model, names, "merge")
    for prefix, _, rec in find_records(model):
        if rec.name in names and rec.model_adapter is not None:
            where = f" on {prefix!r}" if prefix else ""
            raise NotMergeableError(
                f"the {rec.method} adapter{where} is not mergeable: the method has no weight-space form; "
                f"keep the adapter attached (or eject it with merge=False)"
            )
    layers = [(n, b, layer) for n, a, b, layer in adapter_layers(model, names)]
    for name, _, layer in layers:
        if not layer.mergeable:
            raise_not_mergeable(name, layer)
        if layer.strength != 1.0 and not layer.merged:
            raise MergeError(
                f"merge: {name!r} of an adapter scaled by set_scale to {layer.strength:g}; merging folds the "
                f"unscaled adapter, so set_scale(model, name, 1.0) first"
            )
    acting: dict[int, list[tuple[str, str, AdapterLayer]]] = {}
    active = set(active_names(model))
    for module_name, adapter, base, layer in adapter_layers(model):
        if layer.merged or adapter in names or (adapter in active and layer.enabled):
            acting.setdefault(id(base), []).append((module_name, adapter, layer))
    check_stackable(model, acting, "merge")
    check_materialized(model, "merge")
    check_writable([t for t in layers if not t[2].merged], "merge")
    done: list[tuple[nn.Module, AdapterLayer, dict[str, torch.Tensor] | QuantizedWeight | None]] = []
    errors: dict[str, float] = {}
    try:
        for name, base, layer in layers:
            if layer.merged:
                continue
            if is_quantized(base):
                done.append((base, layer, QuantizedWeight.of(base)))
                try:
                    errors[name] = merge_quantized(base, layer, safe=safe, keep_original=keep_original)
                except MergeError as err:
                    raise MergeError(f"merge of {name!r} refused: {err}") from err
                continue
            if safe:
                # Registered before the merge runs, so even an interrupted write is undone from the copy.
                done.append((base, layer, {n: t.detach().clone() for n, t in layer.base_weights(base).items()}))
            try:
                layer.merge(base, safe=safe)
            except MergeError as err:
                raise MergeError(f"merge of {name!r} refused: {err}") from err
            if not safe:
                done.append((base, layer, None))
    except BaseException:
        for base, layer, original in reversed(done):
            if isinstance(original, QuantizedWeight):
                original.restore(base)
                forget_quantized_merge(base, layer)
                layer.forget_merge()
                layer.merged = False
                continue
            if original is None:
                layer.unmerge(base)
                continue
            with torch.no_grad():
                live = layer.base_weights(base)
                for n, t in original.items():
                    live[n].copy_(t)
            layer.forget_merge()
            layer.merged = False
        raise
    if errors:
        worst = max(errors, key=errors.get)
        log.info(
            "merge: re-quantizing %d quantized base(s) added up to %.3g to a merged weight (largest on %r); "
            "lightning_adapters.merge_errors(model) lists them",
            len(errors),
            errors[worst],
            worst,
        )
    return model


def raise_not_mergeable(name: str, layer: AdapterLayer) -> None:
    raise NotMergeableError(
        f"{type(layer).__name__} on {name!r} is not mergeable: {layer.not_mergeable_reason}; "
        f"keep the adapter attached (or eject it with merge=False)"
    )


def unmerge(model: nn.Module) -> nn.Module:
    """Undo ``merge``: the base weights return to their values before the merge (up to rounding, see ``merge``)."""
    check_module(model, "unmerge")
    check_materialized(model, "unmerge")
    check_writable([t for t in adapted_modules(model) if t[2].merged], "unmerge")
    check_unmergeable(list(adapted_modules(model)), "unmerge")
    # Reverse order: several adapters merged into one module come out in the opposite order they went in.
    for _, base, layer in reversed(list(adapted_modules(model))):
        if layer.merged:
            unmerge_layer(base, layer)
    return model


def unmerge_layer(base: nn.Module, layer: AdapterLayer) -> None:
    """``layer.unmerge(base)``, or for a quantized base the weight kept by ``merge(keep_original=True)``."""
    if is_quantized(base):
        unmerge_quantized(base, layer)
    else:
        layer.unmerge(base)


def merge_layer(base: nn.Module, layer: AdapterLayer) -> None:
    """``layer.merge(base)``, re-quantizing a quantized base (keeping its weight so ``unmerge_layer`` is exact)."""
    if is_quantized(base):
        merge_quantized(base, layer, keep_original=True)
    else:
        layer.merge(base)


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model: adapters are switched off (and merged ones unmerged) inside the block.

    ``modules_to_save`` and ``bias``-trained biases are trained in place: they keep their trained values here.
    """
    check_module(model, "disabled")
    layers = list(adapted_modules(model))
    check_unmergeable(layers, "disabled")
    remerge = [(b, layer) for _, b, layer in layers if layer.merged]
    # Latest merge first: adapters merged into one quantized base come out without re-quantizing the others.
    for base, layer in reversed(remerge):
        unmerge_layer(base, layer)
    # Whole-model adapters carry their ``enabled`` flag on their holder modules.
    switches = [layer for _, _, layer in layers] + [
        root.get_submodule(n) for _, root, rec in find_records(model) for n in rec.holders
    ]
    previous = [s.enabled for s in switches]
    for s in switches:
        s.enabled = False
    try:
        yield model
    finally:
        for s, was in zip(switches, previous):
            s.enabled = was
        for base, layer in remerge:
            merge_layer(base, layer)


def eject(model: nn.Module, merge: bool = False, *, safe: bool = False, dtype: torch.dtype | None = None) -> nn.Module:
    """Remove every adapter and return the plain model (with the active adapters merged in if ``merge``).

    Without ``merge`` the base weights, classes and ``requires_grad`` flags are those from before ``inject``.

    Args:
        merge: Fold the active adapters (and those already merged) into the base weights before removing them;
            the inactive ones are dropped, as PEFT's ``merge_and_unload`` does.
        safe: With ``merge``: as ``merge(model, safe=True)``; a refused merge raises ``MergeError`` and leaves the
            model injected and exactly as it was.
        dtype: Replace every quantized base layer (``lightning_adapters.quantize``) by a plain ``nn.Linear`` with
            its dequantized weight in this dtype (e.g. ``torch.bfloat16`` for serving), merging into that weight
            without re-quantizing. ``None`` keeps quantized layers quantized (a merge re-quantizes). Float layers
            are not changed.
    """
    check_module(model, "eject")
    records = find_records(model)
    layers = list(adapted_modules(model))
    if not torch.is_inference_mode_enabled():
        # Giving requires_grad back to an inference tensor fails outside inference mode: refuse before any change.
        frozen = [
            n
            for _, root, rec in records
            for n, p in root.named_parameters()
            if rec.original_requires_grad.get(n) and not p.requires_grad and p.is_inference()
        ]
        if frozen:
            raise AdapterStateError(
                f"eject: {frozen[0]!r} is an inference tensor (the model was built under torch.inference_mode()) "
                f"whose requires_grad=True can only be given back inside inference mode; call eject inside "
                f"`with torch.inference_mode():`"
            )
    if not merge:
        check_unmergeable(layers, "eject")
    quantized = dequantize_model(model, dtype) if dtype is not None else []
    try:
        if merge:
            globals()["merge"](model, safe=safe)
        else:
            unmerge(model)
    except BaseException:
        for parent, leaf, module in quantized:  # a refused merge leaves the quantized layers in place
            setattr(parent, leaf, module)
        raise
    if quantized:
        forget_hf_quantization(model)
    for _, root, rec in records:
        if rec.model_adapter is not None:
            rec.model_adapter.eject(root)
    for _, adapter, base, layer in list(adapter_layers(model)):
        layer.on_eject(base, merged=layer.merged)
        detach(base, adapter)
    for _, root, rec in records:
        for n, p in root.named_parameters():
            if n in rec.original_requires_grad:
                p.requires_grad_(rec.original_requires_grad[n])
        root.__dict__.pop(RECORD_ATTR, None)
    return model


def summary(model: nn.Module) -> str:
    """A table of adapted modules and their parameter counts, with totals, the trainable % and the adapters' names.

    With several adapters a layer's row names its adapter (``LoRALayer[b]``); the last line lists every adapter
    with its method and whether it is active and trainable.
    """
    check_module(model, "summary")
    rows = []
    several = len(known_names(model)) > 1
    for name, adapter, base, layer in adapter_layers(model):
        n = sum(p.numel() for p in layer.parameters())
        kind = f"{type(layer).__name__}[{adapter}]" if several else type(layer).__name__
        rows.append((name, type(base).__mro__[1].__name__, kind, n))
    for prefix, root, rec in find_records(model):
        for m in rec.modules_to_save:
            full = f"{prefix}.{m}" if prefix else m
            n = sum(p.numel() for p in root.get_submodule(m).parameters())
            rows.append((full, type(root.get_submodule(m)).__name__, "modules_to_save", n))
        if rec.model_adapter is not None:
            for holder, *cells in rec.model_adapter.summary_rows(root):
                rows.append((f"{prefix}.{holder}" if prefix else holder, *cells))
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    w = max([len(r[0]) for r in rows] + [6])
    lines = [f"{'module':<{w}}  {'base':<12}  {'adapter':<18}  {'params':>10}"]
    lines += [f"{r[0]:<{w}}  {r[1]:<12}  {r[2]:<18}  {r[3]:>10,}" for r in rows]
    pct = 100.0 * trainable / total if total else 0.0
    lines.append(f"trainable params: {trainable:,} of {total:,} ({pct:.4f}%)")
    described = []
    for _, _, entry in find_roots(model):
        for name, rec in entry.records.items():
            flags = [f for f, on in (("active", name in entry.active), ("trainable", name in entry.trainable)) if on]
            described.append(f"{name} ({rec.method}{'; ' + ', '.join(flags) if flags else ''})")
    if described:
        lines.append("adapters: " + ", ".join(described))
    return "\n".join(lines)


def config_of(model: nn.Module, name: str | None = None) -> AdapterConfig:
    """The config adapter ``name`` of ``model`` (or of its injected sub-module) was injected with.

    Args:
        name: The adapter; ``None``: the first one injected.
    """
    check_module(model, "config_of")
    recs = find_records(model)
    if not recs:
        raise AdapterConfigError("model has no adapters; call lightning_adapters.inject(model, config) first")
    if name is None:
        return recs[0][2].config
    (chosen,) = check_names(model, [name], "config_of")
    return next(rec.config for _, _, rec in recs if rec.name == chosen)
