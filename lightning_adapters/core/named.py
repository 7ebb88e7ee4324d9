"""Several named adapters on one model: which act, which train, how strongly, and removing one.

``inject(model, config, name=...)`` adds adapters; these functions choose among them. Every one validates all its
arguments before it changes anything, and only flips flags (``AdapterSet.active``, ``requires_grad``, a layer's
``strength``): the module tree stays as it is, so a ``torch.compile``d model stays valid (Dynamo guards on the
flags and recompiles for a new combination).

Stacking (``set_active(model, ["a", "b"])``): on a module held by several active adapters the output is
``base(x) + Σ term_i(x)``, which needs every one of them to be additive (LoRA without DoRA, LoHa, LoKr, AdaLoRA;
Llama-Adapter instances add their prompt terms). OFT/BOFT rotations, DoRA, trainable tokens, LoRA on
``nn.MultiheadAttention`` and on raw parameters are refused there, naming the module: composing rotations would
depend on an order PEFT does not define. Adapters on different modules always combine.
"""

from __future__ import annotations

from torch import nn

from lightning_adapters.core.inject import (
    AdapterLayer,
    ModelAdapters,
    active_names,
    adapter_layers,
    apply_trainability,
    check_module,
    check_names,
    check_stackable,
    find_roots,
    known_names,
    sync_active,
)
from lightning_adapters.core.layer import detach
from lightning_adapters.errors import AdapterConfigError, AdapterStateError, AdapterTypeError


def _entry(model: nn.Module) -> tuple[nn.Module, ModelAdapters]:
    """The module holding the adapter records of ``model``: only called after ``check_names``, which refuses a
    model without adapters."""
    _, root, entry = find_roots(model)[0]
    return root, entry


def _refuse_merged(model: nn.Module, what: str) -> None:
    merged = sorted({adapter for _, adapter, _, layer in adapter_layers(model) if layer.merged})
    if merged:
        raise AdapterStateError(
            f"{what}: adapters {merged} are merged into the base weights, where they act whatever is active; call "
            f"lightning_adapters.unmerge(model) first"
        )


def adapter_names(model: nn.Module) -> list[str]:
    """Names of every adapter of ``model``, in injection order (empty without adapters)."""
    check_module(model, "adapter_names")
    return known_names(model)


def active(model: nn.Module) -> list[str]:
    """Names of the active adapters of ``model`` (those whose layers act in the forward), in order."""
    check_module(model, "active")
    return active_names(model)


def set_active(model: nn.Module, names: str | list[str]) -> nn.Module:
    """Make ``names`` the active adapters: one name, or several that act together (stacked).

    Stacked adapters add their terms where they share a module (see the module docstring); a module on which a
    non-additive one would share is refused before anything changes. Trainability is not changed
    (``set_trainable``).

    Args:
        names: ``"a"`` or ``["a", "b"]``.

    Returns:
        ``model``.

    Raises:
        AdapterConfigError: An unknown or repeated name, no name, or adapters that cannot stack on a module.
        AdapterStateError: An adapter is merged (``unmerge`` first).
        AdapterTypeError: ``names`` is not a string or a list of strings.
    """
    check_module(model, "set_active")
    chosen = check_names(model, names, "set_active")
    _refuse_merged(model, "set_active")
    acting: dict[int, list[tuple[str, str, AdapterLayer]]] = {}
    for module_name, adapter, base, layer in adapter_layers(model, chosen):
        acting.setdefault(id(base), []).append((module_name, adapter, layer))
    check_stackable(model, acting, "set_active")
    _, entry = _entry(model)
    entry.active = chosen
    sync_active(model)
    return model


def set_trainable(model: nn.Module, names: str | list[str]) -> nn.Module:
    """Make only ``names``' tensors (layers, ``modules_to_save``, trained biases) require grad.

    Everything else is frozen, the other adapters included. Which adapters act is not changed (``set_active``).

    Args:
        names: ``"b"`` or a list of names; ``[]`` freezes every adapter.

    Raises:
        AdapterConfigError: An unknown or repeated name.
        AdapterTypeError: ``names`` is not a string or a list of strings.
    """
    check_module(model, "set_trainable")
    chosen = check_names(model, names, "set_trainable", allow_empty=True)
    _, entry = _entry(model)
    entry.trainable = chosen
    apply_trainability(model)
    return model


def trainable(model: nn.Module) -> list[str]:
    """Names of the adapters whose tensors require grad (``set_trainable``)."""
    check_module(model, "trainable")
    return [n for _, _, entry in find_roots(model) for n in entry.trainable]


def set_scale(model: nn.Module, name: str, scale: float) -> nn.Module:
    """Multiply the term adapter ``name`` adds to each module's output by ``scale`` (inference strength).

    ``1.0`` restores the trained adapter and its fast paths; ``0.0`` switches it off while it stays active. Only
    additive adapters (LoRA without DoRA, LoHa, LoKr, AdaLoRA) can be scaled. A scaled adapter cannot be merged.

    Raises:
        AdapterConfigError: Unknown ``name``, a non-finite ``scale``, or a layer of the adapter is not additive.
        AdapterStateError: The adapter is merged (``unmerge`` first).
        AdapterTypeError: ``scale`` is not a real number.
    """
    check_module(model, "set_scale")
    if not isinstance(name, str):
        raise AdapterTypeError(f"set_scale: name must be one adapter name (a string), got {name!r}")
    (chosen,) = check_names(model, name, "set_scale")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise AdapterTypeError(f"set_scale: scale must be a real number such as 0.5, got {scale!r}")
    if scale != scale or scale in (float("inf"), float("-inf")):
        raise AdapterConfigError(f"set_scale: scale must be finite, got {scale!r}")
    layers = list(adapter_layers(model, [chosen]))
    merged = [m for m, _, _, layer in layers if layer.merged]
    if merged:
        raise AdapterStateError(
            f"set_scale: adapter {chosen!r} is merged into the base weights (e.g. {merged[0]!r}); call "
            f"lightning_adapters.unmerge(model) first"
        )
    _, entry = _entry(model)
    rec = entry.records[chosen]
    if not layers:
        raise AdapterConfigError(
            f"set_scale: adapter {chosen!r} ({rec.method}) adapts the whole model, not single layers; only additive "
            f"per-layer adapters (lora, loha, lokr, adalora) can be scaled"
        )
    for module_name, _, _, layer in layers:
        if not layer.additive:
            raise AdapterConfigError(
                f"set_scale: adapter {chosen!r} cannot be scaled on {module_name!r} ({type(layer).__name__}): "
                f"{layer.not_additive_reason}; only additive adapters (LoRA without DoRA, LoHa, LoKr, AdaLoRA) can"
            )
    for _, _, _, layer in layers:
        layer.strength = float(scale)
    return model


def scale_of(model: nn.Module, name: str) -> float:
    """The ``set_scale`` factor of adapter ``name`` (1.0 unless changed)."""
    check_module(model, "scale_of")
    (chosen,) = check_names(model, name, "scale_of")
    return next((layer.strength for _, _, _, layer in adapter_layers(model, [chosen])), 1.0)


def delete(model: nn.Module, name: str) -> nn.Module:
    """Remove adapter ``name`` from ``model``; the others stay as they are.

    The model is then what injecting only the remaining adapters would have made (module tree, state dict,
    outputs); ``requires_grad`` of what the deleted adapter trained goes back to frozen. Its ``modules_to_save`` and
    ``bias``-trained biases were trained in place and keep their values.

    Raises:
        AdapterConfigError: Unknown ``name``, or it is active (``set_active`` to the others first, or ``eject`` to
            remove every adapter).
        AdapterStateError: An adapter is merged (``unmerge`` first).
    """
    check_module(model, "delete")
    if not isinstance(name, str):
        raise AdapterTypeError(f"delete: name must be one adapter name (a string), got {name!r}")
    (chosen,) = check_names(model, name, "delete")
    root, entry = _entry(model)
    if chosen in entry.active:
        others = [n for n in entry.records if n != chosen]
        hint = f"set_active(model, {others[0]!r}) first" if others else "eject(model) to remove the only adapter"
        raise AdapterConfigError(f"delete: adapter {chosen!r} is active; call lightning_adapters.{hint}")
    _refuse_merged(model, "delete")
    for _, adapter, base, layer in list(adapter_layers(root, [chosen])):
        layer.on_eject(base, merged=False)
        detach(base, adapter)
    whole_model = entry.records[chosen].model_adapter
    if whole_model is not None:
        whole_model.eject(root)
    del entry.records[chosen]
    entry.trainable = [n for n in entry.trainable if n != chosen]
    apply_trainability(model)
    return model
