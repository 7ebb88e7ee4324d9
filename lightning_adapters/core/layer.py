"""Adapter layers and how they attach to a base module without renaming its parameters.

A targeted module keeps its own ``weight``/``bias`` and its class identity: injection swaps its class for a
subclass (``AdaptedLinear`` for ``nn.Linear``, ...) whose ``forward`` hands over to the adapter child
registered as ``<module>.adapter``. So ``isinstance(m, nn.Linear)`` still holds, ``<mod>.weight`` keeps its
key, adapter state lives under ``<mod>.adapter.*``, and ``eject`` restores the original class. Owning the
forward (rather than adding a forward hook after it) lets a method fold ΔW into the base matmul or rotate the
input, which is where the speed over PEFT comes from. Adapters are switched off with flags, never by changing
the module tree, so a compiled model stays valid.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from lightning_adapters.core.quant import is_quantized, run_on_stand_in
from lightning_adapters.errors import AdapterError, NotMergeableError

ADAPTER_ATTR = "adapter"


class AdapterLayer(nn.Module):
    """Base class of the per-module adapter children.

    Subclasses implement ``adapted_forward`` (the full output of the adapted module) and, if mergeable,
    ``delta_weight``-style ``merge``/``unmerge``; ``peft_state``/``load_peft_state`` translate to PEFT's
    suffixes and layouts.

    Attributes:
        merged: Whether the adapter is folded into the base weights.
        enabled: False inside ``disabled()``.
    """

    mergeable: bool = True
    # Why a layer with ``mergeable = False`` cannot merge (completes "... is not mergeable: <reason>").
    not_mergeable_reason: str = "the method has no weight-space form"

    def __init__(self) -> None:
        super().__init__()
        self.merged = False
        self.enabled = True

    def adapted_forward(self, base: nn.Module, *args: Any, **kwargs: Any) -> Any:
        """Output of ``base`` with the adapter applied."""
        raise NotImplementedError

    def forward(self, base: nn.Module, *args: Any, **kwargs: Any) -> Any:
        """``adapted_forward``, for wrappers that act on module calls (FSDP1 gathers the adapter's parameters)."""
        return self.adapted_forward(base, *args, **kwargs)

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


def _adapted_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    adapter = self._modules[ADAPTER_ATTR]
    if adapter.merged or not adapter.enabled:
        return self._la_base_forward(*args, **kwargs)
    if isinstance(adapter, AdapterLayer):
        return adapter.adapted_forward(self, *args, **kwargs)
    # A wrapper around the layer (FSDP1's FullyShardedDataParallel): calling it gathers the parameters first.
    return adapter(self, *args, **kwargs)


def _adapted_forward_quantized(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    # The adapter computes with a dequantized stand-in of this quantized base (core/quant.py).
    return run_on_stand_in(self, _adapted_forward, *args, **kwargs)


_CLASS_CACHE: dict[tuple[type, bool], type] = {}


def adapted_class(base_cls: type, quantized: bool = False) -> type:
    """The subclass of ``base_cls`` that routes ``forward`` through the ``adapter`` child.

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
    """Whether ``module`` carries an adapter installed by ``attach``."""
    return getattr(type(module), "_la_adapted", False) and isinstance(
        _unwrap(module._modules.get(ADAPTER_ATTR)), AdapterLayer
    )


def attach(module: nn.Module, layer: AdapterLayer) -> None:
    """Install ``layer`` on ``module`` (class swap + ``adapter`` child)."""
    if ADAPTER_ATTR in module._modules or hasattr(module, ADAPTER_ATTR):
        raise AdapterError(
            f"{type(module).__name__} already has an attribute {ADAPTER_ATTR!r}; cannot attach an adapter to it"
        )
    layer.train(module.training)
    module.add_module(ADAPTER_ATTR, layer)
    module.__class__ = adapted_class(type(module), quantized=is_quantized(module))
    layer.on_attach(module)


def detach(module: nn.Module) -> AdapterLayer:
    """Remove the adapter from ``module`` and restore its original class; returns the removed layer."""
    layer = module._modules.pop(ADAPTER_ATTR)
    module.__class__ = type(module).__mro__[1]
    return layer


def get_adapter(module: nn.Module) -> AdapterLayer:
    """The adapter child of an adapted module."""
    return _unwrap(module._modules[ADAPTER_ATTR])
