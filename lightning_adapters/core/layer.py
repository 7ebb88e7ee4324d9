"""Adapter layers and how they attach to a base module without renaming its parameters.

A targeted module keeps its own ``weight``/``bias`` and its class identity: injection swaps its class for a
subclass (``AdaptedLinear`` for ``nn.Linear``, ...) whose ``forward`` hands over to the named adapter layers
held in an ``AdapterSet`` child registered as ``<module>.adapter``. So ``isinstance(m, nn.Linear)`` still holds,
``<mod>.weight`` keeps its key, the state of the adapter named ``a`` lives under ``<mod>.adapter.a.*``, and
``eject`` restores the original class. Owning the forward (rather than adding a forward hook after it) lets a
method fold ΔW into the base matmul or rotate the input, which is where the speed over PEFT comes from.

Which adapters act is a flag of the set (``AdapterSet.active``), never a change of the module tree, so a compiled
model stays valid when the active adapters change (Dynamo guards on the flag and recompiles). One acting layer
runs its own ``adapted_forward`` (the fast paths); several act as ``base(x) + Σ strength_i · delta_output_i(x)``,
which only additive layers (``AdapterLayer.additive``) can do.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from lightning_adapters.core.quant import is_quantized, run_on_stand_in
from lightning_adapters.errors import AdapterError, NotMergeableError

ADAPTER_ATTR = "adapter"
DEFAULT_NAME = "default"


class AdapterLayer(nn.Module):
    """Base class of the per-module adapter children.

    Subclasses implement ``adapted_forward`` (the full output of the adapted module) and, if mergeable,
    ``delta_weight``-style ``merge``/``unmerge``; ``peft_state``/``load_peft_state`` translate to PEFT's
    suffixes and layouts. An additive layer (output = base output + a term of its own) sets ``additive`` and
    implements ``delta_output``: it can then act together with other additive layers on the same module and be
    scaled by ``set_scale``.

    Attributes:
        merged: Whether the adapter is folded into the base weights.
        enabled: False inside ``disabled()``.
        strength: Multiplier of the layer's term when it acts through ``delta_output`` (``set_scale``).
    """

    mergeable: bool = True
    additive: bool = False
    # Whether ``per_sample`` can split the module's input rows among adapters (its input starts with the batch).
    routable: bool = True
    not_routable_reason: str = ""
    # Whether ``delta_output`` costs as much as the base op (it builds a weight-sized ΔW and applies it to x):
    # ``per_sample`` then runs each group of rows through its own folded ``W + ΔW`` instead of the base once plus
    # one term per group, which would do the base op's arithmetic twice.
    dense_term: bool = False
    # Why a layer with ``additive = False`` cannot act together with another one (completes "... cannot stack: ").
    not_additive_reason: str = "its output is not the base output plus a term of its own"
    # Why a layer with ``mergeable = False`` cannot merge (completes "... is not mergeable: <reason>").
    not_mergeable_reason: str = "the method has no weight-space form"

    def __init__(self) -> None:
        super().__init__()
        self.merged = False
        self.enabled = True
        self.strength = 1.0

    def adapted_forward(self, base: nn.Module, *args: Any, **kwargs: Any) -> Any:
        """Output of ``base`` with the adapter applied."""
        raise NotImplementedError

    def delta_output(self, base: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor | None:
        """The layer's additive term, ``adapted_forward(...) - base(...)`` computed on its own (``None``: zero).

        Only for layers with ``additive = True``; used when several layers act on one module, or the layer's
        ``strength`` is not 1.
        """
        raise NotImplementedError(f"{type(self).__name__} is not additive: {self.not_additive_reason}")

    def forward(self, base: nn.Module, *args: Any, **kwargs: Any) -> Any:
        """``adapted_forward``, for wrappers that act on module calls (FSDP1 gathers the adapter's parameters)."""
        return self.adapted_forward(base, *args, **kwargs)

    def additive_delta(self, base: nn.Module) -> torch.Tensor:
        """The ``ΔW`` (in ``base.weight``'s layout) of an additive layer: its output is ``base``'s with ``W + ΔW``.

        What ``merge`` adds and ``lightning_adapters.to_lora`` converts; a layer without one raises
        ``NotMergeableError`` saying why.
        """
        raise NotMergeableError(f"{type(self).__name__} has no additive weight-space ΔW: {self.not_additive_reason}")

    def merge(self, base: nn.Module, *, safe: bool = False) -> None:
        """Fold the adapter into ``base``'s weights (``safe``: refuse non-finite results, changing nothing)."""
        raise NotMergeableError(f"{type(self).__name__} cannot be merged into the base weights")

    def unmerge(self, base: nn.Module) -> None:
        """Undo ``merge``."""
        raise NotMergeableError(f"{type(self).__name__} cannot be merged into the base weights")

    def base_weights(self, base: nn.Module) -> dict[str, torch.Tensor]:
        """The base tensors ``merge`` writes, by name relative to ``base`` (``merge(safe=True)`` copies them)."""
        return {"weight": base.weight}

    def forget_merge(self) -> None:
        """Drop whatever ``merge`` kept for ``unmerge`` (after the base weight was restored from a copy)."""

    @property
    def changes_base_on_attach(self) -> bool:
        """Whether ``on_attach`` will write the base weight's values (``inject`` then keeps a copy to roll back)."""
        return False

    def on_attach(self, base: nn.Module) -> None:
        """Called once the layer is installed on ``base`` (an init that changes the base weight does it here)."""

    def on_eject(self, base: nn.Module, merged: bool) -> None:
        """Called before the layer is removed by ``eject``; ``merged`` says whether the adapter was folded in."""

    def peft_state(self) -> dict[str, torch.Tensor]:
        """Tensors under PEFT's key suffixes and layouts (e.g. ``{"lora_A.weight": A}``)."""
        return {k: v for k, v in self.state_dict().items()}

    def load_peft_state(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of ``peft_state``: copy PEFT-named tensors into this layer (shapes already checked)."""
        self.load_state_dict(state)

    def peft_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes ``peft_state`` would produce, without computing it."""
        return {k: tuple(v.shape) for k, v in self.peft_state().items()}

    def apply_dtype(self, dtype: torch.dtype) -> None:
        """Cast the adapter's floating tensors to ``dtype``."""
        for p in self.parameters(recurse=True):
            if p.is_floating_point():
                p.data = p.data.to(dtype)
        for name, b in self.named_buffers(recurse=True):
            if b.is_floating_point():
                mod_name, _, attr = name.rpartition(".")
                mod = self.get_submodule(mod_name) if mod_name else self
                setattr(mod, attr, b.to(dtype))

    def extra_repr(self) -> str:
        return f"merged={self.merged}"


class AdapterSet(nn.ModuleDict):
    """The named adapter layers of one adapted module, registered as ``<module>.adapter``.

    Attributes:
        active: Names of the layers that act, in order (a flag read by the forward, so switching adapters never
            changes the module tree). Names without a layer here are left out by ``set_active``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.active: tuple[str, ...] = ()
        # Set inside ``per_sample`` (a ``core.routing.Routing``): rows of the batch go to different adapters.
        self.routing: Any = None

    def extra_repr(self) -> str:
        return f"active={list(self.active)}"


def _call(adapter: nn.Module, base: nn.Module, args: tuple, kwargs: dict) -> Any:
    if isinstance(adapter, AdapterLayer):
        return adapter.adapted_forward(base, *args, **kwargs)
    # A wrapper around the layer (FSDP1's FullyShardedDataParallel): calling it gathers the parameters first.
    return adapter(base, *args, **kwargs)


def _adapted_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    adapters = self._modules[ADAPTER_ATTR]
    if adapters.routing is not None:
        return adapters.routing.forward(self, adapters, args, kwargs)
    active = adapters.active
    if len(active) == 1:
        # One adapter: its own forward, with every fast path of the method (the single-adapter case).
        adapter = adapters._modules[active[0]]
        if adapter.merged or not adapter.enabled:
            return self._la_base_forward(*args, **kwargs)
        if adapter.strength == 1.0:
            return _call(adapter, self, args, kwargs)
        layers = [adapter]
    else:
        layers = [a for a in (adapters._modules[n] for n in active) if not a.merged and a.enabled]
        if not layers:
            return self._la_base_forward(*args, **kwargs)
        if len(layers) == 1 and layers[0].strength == 1.0:
            return _call(layers[0], self, args, kwargs)
    # Several additive layers, or a scaled one: base(x) + Σ strength_i · term_i(x) (set_active/set_scale checked
    # that every layer here is additive).
    out = self._la_base_forward(*args, **kwargs)
    for adapter in layers:
        term = _unwrap(adapter).delta_output(self, *args, **kwargs)
        if term is not None:
            out = out + (term if adapter.strength == 1.0 else term * adapter.strength).to(out.dtype)
    return out


def _adapted_forward_quantized(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    # The adapter computes with a dequantized stand-in of this quantized base (core/quant.py).
    return run_on_stand_in(self, _adapted_forward, *args, **kwargs)


_CLASS_CACHE: dict[tuple[type, bool], type] = {}


def adapted_class(base_cls: type, quantized: bool = False) -> type:
    """The subclass of ``base_cls`` that routes ``forward`` through the ``adapter`` set.

    Classes are created once per base class and published in this module under a unique name, so an adapted
    model can still be pickled (``torch.save(model)``). ``quantized``: the base holds a quantized weight, so the
    adapter runs on its dequantized stand-in (``core.quant.run_on_stand_in``).
    """
    if (base_cls, quantized) in _CLASS_CACHE:
        return _CLASS_CACHE[(base_cls, quantized)]
    name = f"Adapted{'Quantized' if quantized else ''}{base_cls.__name__}"
    module = sys.modules[__name__]
    while hasattr(module, name):
        name += "_"
    cls = type(
        name,
        (base_cls,),
        {
            "forward": _adapted_forward_quantized if quantized else _adapted_forward,
            "_la_base_forward": base_cls.forward,
            "_la_adapted": True,
            "__module__": __name__,
            "__qualname__": name,
        },
    )
    setattr(module, name, cls)
    _CLASS_CACHE[(base_cls, quantized)] = cls
    return cls


def _unwrap(child: nn.Module | None) -> nn.Module | None:
    # FSDP1 replaces a wrapped child by a FullyShardedDataParallel that holds it as ``_fsdp_wrapped_module``.
    return getattr(child, "_fsdp_wrapped_module", child)


def is_adapted(module: nn.Module) -> bool:
    """Whether ``module`` carries adapters installed by ``attach``."""
    return getattr(type(module), "_la_adapted", False) and isinstance(module._modules.get(ADAPTER_ATTR), AdapterSet)


def attach_blocked(module: nn.Module) -> bool:
    """Whether ``module`` has an attribute ``adapter`` of its own, where the adapter set would go."""
    if is_adapted(module):
        return False
    return ADAPTER_ATTR in module._modules or hasattr(module, ADAPTER_ATTR)


def attach(module: nn.Module, layer: AdapterLayer, name: str = DEFAULT_NAME) -> None:
    """Install ``layer`` on ``module`` under ``name`` (class swap + ``adapter`` set on the first one).

    The layer does not act until ``name`` is in the set's ``active`` names.
    """
    if attach_blocked(module):
        raise AdapterError(
            f"{type(module).__name__} already has an attribute {ADAPTER_ATTR!r}; cannot attach an adapter to it"
        )
    layer.train(module.training)
    if not is_adapted(module):
        adapters = AdapterSet()
        adapters.train(module.training)
        module.add_module(ADAPTER_ATTR, adapters)
        module.__class__ = adapted_class(type(module), quantized=is_quantized(module))
    adapters = module._modules[ADAPTER_ATTR]
    if name in adapters._modules:
        raise AdapterError(f"{type(module).__name__} already holds an adapter named {name!r}")
    adapters.add_module(name, layer)
    layer.on_attach(module)


def detach(module: nn.Module, name: str | None = None) -> AdapterLayer:
    """Remove the adapter ``name`` (``None``: the only one) from ``module``; returns the removed layer.

    The last one removed takes the ``adapter`` set with it and restores the module's original class.
    """
    adapters = module._modules[ADAPTER_ATTR]
    if name is None:
        (name,) = list(adapters._modules)
    layer = adapters._modules.pop(name)
    adapters.active = tuple(n for n in adapters.active if n != name)
    if not adapters._modules:
        del module._modules[ADAPTER_ATTR]
        module.__class__ = type(module).__mro__[1]
    return layer


def adapter_set(module: nn.Module) -> AdapterSet:
    """The ``AdapterSet`` of an adapted module."""
    return module._modules[ADAPTER_ATTR]

