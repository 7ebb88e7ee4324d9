"""Per-sample routing: each row of a batch goes through the adapter named for it.

``with per_sample(model, ["a", "b", "__base__", "a"]):`` makes every adapted module split its input's first
dimension (the batch) into one group of rows per name. How a module combines the groups depends on its layers:

- every layer that acts is additive with a low-rank term (LoRA without DoRA, AdaLoRA): the base runs once on the
  whole batch and each group's term is added to its own rows (``index_add``), so the base matmul is not split;
- otherwise (LoHa and LoKr, whose term is a weight-sized ``ΔW`` applied to the rows and so costs a second base
  matmul; OFT, BOFT, DoRA, trainable tokens): each group runs the module with its own adapter on its rows (LoHa
  and LoKr fold ``W + ΔW`` there, as a single adapter does) and the outputs are put back in row order.

A row named ``"__base__"``, or named after an adapter that does not hold the module, gets the base output there.
Outputs (and gradients) equal running each row alone with its adapter active. The routing is a flag on each
``AdapterSet``, read by the forward: the module tree never changes, and ``generate`` works inside the block as long
as the batch keeps its rows (greedy decoding and sampling do; beam search multiplies the rows and is refused by the
shape check).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_adapters.core.inject import adapter_layers, check_module, find_records, known_names
from lightning_adapters.core.layer import ADAPTER_ATTR, AdapterLayer, AdapterSet, is_adapted
from lightning_adapters.errors import AdapterConfigError, AdapterStateError, AdapterTypeError

BASE = "__base__"


@dataclass
class Routing:
    """Which rows of the batch go to which adapter, as one module's forward reads it.

    Attributes:
        batch: Number of rows routed (the input's first dimension must equal it).
        groups: ``(adapter name or BASE, row indices)`` per distinct name, in first-appearance order.
        inverse: Positions that put the concatenated group outputs back in row order.
    """

    batch: int
    groups: list[tuple[str, torch.Tensor]]
    inverse: torch.Tensor
    _on_device: dict[torch.device, tuple[list[tuple[str, torch.Tensor]], torch.Tensor]] = field(default_factory=dict)

    def forward(self, module: nn.Module, adapters: AdapterSet, args: tuple, kwargs: dict) -> Any:
        """The routed output of ``module`` (called by the adapted forward while the routing is set)."""
        return routed_forward(module, adapters, self, args, kwargs)

    def on(self, device: torch.device) -> tuple[list[tuple[str, torch.Tensor]], torch.Tensor]:
        """``groups`` and ``inverse`` with their index tensors on ``device`` (moved once per device)."""
        if device not in self._on_device:
            self._on_device[device] = (
                [(n, idx.to(device)) for n, idx in self.groups],
                self.inverse.to(device),
            )
        return self._on_device[device]


def _routing_of(names: list[str]) -> Routing:
    groups: dict[str, list[int]] = {}
    for row, name in enumerate(names):
        groups.setdefault(name, []).append(row)
    order = [row for rows in groups.values() for row in rows]
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
    return Routing(
        batch=len(names),
        groups=[(n, torch.tensor(rows, dtype=torch.long)) for n, rows in groups.items()],
        inverse=inverse,
    )


def _check_names(model: nn.Module, names: Any) -> list[str]:
    known = known_names(model)
    if not known:
        raise AdapterConfigError(
            "per_sample: model has no adapters; call lightning_adapters.inject(model, config) first"
        )
    if isinstance(names, str) or not isinstance(names, Sequence) or not all(isinstance(n, str) for n in names):
        raise AdapterTypeError(
            f"per_sample: names must be a list with one adapter name (or {BASE!r}) per row of the batch, got "
            f"{names!r}; the model has {known}"
        )
    if not names:
        raise AdapterConfigError(f"per_sample: got an empty list of names; give one name per row, from {known}")
    unknown = sorted({n for n in names if n != BASE and n not in known})
    if unknown:
        raise AdapterConfigError(
            f"per_sample: unknown adapter name {unknown[0]!r}; use one of {known}, or {BASE!r} for the base model"
        )
    return list(names)


def _check_layers(model: nn.Module, used: set[str]) -> None:
    for _, _, rec in find_records(model):
        if rec.name in used and rec.model_adapter is not None:
            raise AdapterConfigError(
                f"per_sample: adapter {rec.name!r} ({rec.method}) adapts the whole model, not single layers, so its "
                f"rows cannot be routed; route only per-layer adapters (lora, loha, lokr, adalora, oft, boft)"
            )
    for module_name, adapter, _, layer in adapter_layers(model):
        if layer.merged:
            raise AdapterStateError(
                f"per_sample: adapter {adapter!r} is merged into {module_name!r}, where it acts on every row; call "
                f"lightning_adapters.unmerge(model) first"
            )
        if adapter in used and not layer.routable:
            raise AdapterConfigError(
                f"per_sample: adapter {adapter!r} cannot route rows on {module_name!r} ({type(layer).__name__}): "
                f"{layer.not_routable_reason}; route only adapters that target layers whose input starts with the "
                f"batch dimension"
            )


@contextlib.contextmanager
def per_sample(model: nn.Module, names: Sequence[str]) -> Iterator[nn.Module]:
    """Run row ``i`` of every batch through adapter ``names[i]`` (``"__base__"``: the base model) inside the block.

    Every adapted module's input must have ``len(names)`` rows in its first dimension. Which adapters are active
    outside the block is not changed.

    Args:
        names: One adapter name (or ``"__base__"``) per row of the batch.

    Raises:
        AdapterConfigError: An unknown name, an empty list, a whole-model adapter (Llama-Adapter) or a layer that
            cannot split rows (LoRA on ``nn.MultiheadAttention`` or on raw parameters) among the routed adapters.
        AdapterStateError: An adapter is merged (``unmerge`` first), or the model is already routed.
        AdapterTypeError: ``names`` is not a list of strings.
    """
    check_module(model, "per_sample")
    chosen = _check_names(model, names)
    _check_layers(model, set(chosen))
    sets = [m._modules[ADAPTER_ATTR] for m in model.modules() if is_adapted(m)]
    if any(s.routing is not None for s in sets):
        raise AdapterStateError("per_sample: the model is already routed per sample; leave the outer block first")
    routing = _routing_of(chosen)
    for s in sets:
        s.routing = routing
    try:
        yield model
    finally:
        for s in sets:
            s.routing = None


def _rows(value: Any, batch: int, idx: torch.Tensor) -> Any:
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
        return value.index_select(0, idx)
    return value


def _acting(adapters: AdapterSet, name: str) -> AdapterLayer | None:
    layer = adapters._modules.get(name) if name != BASE else None
    if layer is None:
        return None
    inner = getattr(layer, "_fsdp_wrapped_module", layer)
    return layer if inner.enabled else None


def routed_forward(module: nn.Module, adapters: AdapterSet, routing: Routing, args: tuple, kwargs: dict) -> Any:
    """The output of an adapted module whose rows are routed to different adapters (see the module docstring)."""
    x = args[0] if args else next(iter(kwargs.values()), None)
    if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[0] != routing.batch:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise AdapterStateError(
            f"per_sample: {type(module).__name__} got an input of shape {shape}, whose first dimension is not the "
            f"{routing.batch} rows routed; give one name per row of the batch (beam search multiplies the rows: "
            f"use greedy decoding or sampling, or repeat each name once per beam)"
        )
    groups, inverse = routing.on(x.device)
    acting = [(idx, _acting(adapters, name)) for name, idx in groups]
    layers = [layer for _, layer in acting if layer is not None]
    if not layers:
        return module._la_base_forward(*args, **kwargs)
    inners = [getattr(layer, "_fsdp_wrapped_module", layer) for layer in layers]
    if all(inner.additive and not inner.dense_term for inner in inners):
        out = module._la_base_forward(*args, **kwargs)
        for idx, layer in acting:
            if layer is None:
                continue
            inner = getattr(layer, "_fsdp_wrapped_module", layer)
            sub_args = tuple(_rows(a, routing.batch, idx) for a in args)
            sub_kwargs = {k: _rows(v, routing.batch, idx) for k, v in kwargs.items()}
            term = inner.delta_output(module, *sub_args, **sub_kwargs)
            if term is not None:
                term = term if inner.strength == 1.0 else term * inner.strength
                out = out.index_add(0, idx, term.to(out.dtype))
        return out
    outs = []
    for idx, layer in acting:
        sub_args = tuple(_rows(a, routing.batch, idx) for a in args)
        sub_kwargs = {k: _rows(v, routing.batch, idx) for k, v in kwargs.items()}
        if layer is None:
            outs.append(module._la_base_forward(*sub_args, **sub_kwargs))
            continue
        inner = getattr(layer, "_fsdp_wrapped_module", layer)
        if inner.strength == 1.0:
            # Through the wrapper when there is one (FSDP1 gathers the layer's parameters on call).
            outs.append(
                inner.adapted_forward(module, *sub_args, **sub_kwargs)
                if inner is layer
                else layer(module, *sub_args, **sub_kwargs)
            )
        else:
            base = module._la_base_forward(*sub_args, **sub_kwargs)
            term = inner.delta_output(module, *sub_args, **sub_kwargs)  # None: the layer adds nothing this time
            outs.append(base if term is None else base + (term * inner.strength).to(base.dtype))
    return torch.cat(outs, dim=0).index_select(0, inverse)
