"""Adapter state: which tensors belong to the adapter, loading them strictly, and the base fingerprint.

Two key layouts (both keyed relative to the model, base keys unchanged):

- **the model's own keys** (``adapter_state_dict(model)``): ``<module>.adapter.<name>.<tensor>``, a subset of
  ``model.state_dict()`` that carries the adapter names; ``modules_to_save`` and trained biases keep their base
  keys. It round-trips through ``load_adapter_state_dict(model, sd)``, whatever the number of adapters.
- **one adapter, name-free** (``adapter_state_dict(model, name="a")``): ``<module>.adapter.<tensor>``, the layout
  of the single-adapter state dicts and checkpoints written before adapters had names. It loads into any adapter
  with the same targets: ``load_adapter_state_dict(model, sd, name="b")``, and with ``name=None`` into a model
  that holds one adapter (so old checkpoints still load).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from lightning_adapters.core.inject import (
    adapter_layers,
    check_module,
    check_names,
    find_records,
    known_names,
    trained_biases,
)
from lightning_adapters.core.layer import ADAPTER_ATTR
from lightning_adapters.core.report import StateReport
from lightning_adapters.errors import AdapterStateError, AdapterTypeError


def _layer_prefix(module_name: str, adapter: str | None) -> str:
    # ``<module>.adapter.<name>.`` (the model's own keys) or, without a name, ``<module>.adapter.``.
    tail = f"{ADAPTER_ATTR}.{adapter}." if adapter is not None else f"{ADAPTER_ATTR}."
    return f"{module_name}.{tail}" if module_name else tail


def adapter_prefixes(model: nn.Module, names: list[str] | None = None) -> list[str]:
    """Key prefixes (with trailing dot) of every adapter layer and ``modules_to_save`` module in ``model``, and the
    exact keys (no trailing dot) of the base biases the config's ``bias`` option trains, as ``model.state_dict()``
    names them.

    Args:
        names: Only those of these adapters (``None``: all).
    """
    prefixes = [_layer_prefix(module_name, adapter) for module_name, adapter, _, _ in adapter_layers(model, names)]
    for prefix, root, rec in find_records(model):
        if names is not None and rec.name not in names:
            continue
        for m in rec.modules_to_save + rec.holders:
            full = f"{prefix}.{m}" if prefix else m
            prefixes.append(full + ".")
        prefixes += [f"{prefix}.{n}" if prefix else n for n in trained_biases(root, rec)]
    return prefixes


def is_adapter_key(key: str, prefixes: list[str]) -> bool:
    """Whether a state-dict key falls under one of ``prefixes`` (a prefix ending in ``.``) or is one of the exact
    keys among them (structure, never a substring test)."""
    return any(key.startswith(p) if p.endswith(".") else key == p for p in prefixes)


def name_free_keys(model: nn.Module, name: str) -> dict[str, str]:
    """``{model key: name-free key}`` of the layer tensors of adapter ``name`` (``...adapter.<name>.x`` ->
    ``...adapter.x``), read from ``model.state_dict()``'s keys."""
    out = {}
    keys = list(model.state_dict(keep_vars=True))
    pairs = [(_layer_prefix(m, adapter), _layer_prefix(m, None)) for m, adapter, _, _ in adapter_layers(model, [name])]
    # Whole-model methods hold theirs at ``<module>.adapter.<name>`` too (Llama-Adapter's prompts).
    tail = f".{ADAPTER_ATTR}.{name}"
    for prefix, _, rec in find_records(model):
        if rec.name == name:
            held = [f"{prefix}.{m}" if prefix else m for m in rec.holders]
            pairs += [(m + ".", m[: -len(name)]) for m in held if m.endswith(tail)]
    for live, free in pairs:
        out.update({k: free + k[len(live) :] for k in keys if k.startswith(live)})
    return out


def _selected(model: nn.Module, name: str | None, what: str) -> list[str]:
    if name is None:
        known = known_names(model)
        if not known:
            raise AdapterStateError("model has no adapters; call lightning_adapters.inject(model, config) first")
        return known
    if not isinstance(name, str):
        raise AdapterTypeError(f"{what}: name must be one adapter name (a string) or None, got {name!r}")
    return check_names(model, name, what)


def adapter_state_dict(model: nn.Module, name: str | None = None) -> dict[str, torch.Tensor]:
    """The adapter tensors (and ``modules_to_save`` tensors) of ``model``.

    Tensors are detached references to the live ones, as ``state_dict()`` gives them. Keys: see the module
    docstring (the model's own keys, or name-free for one named adapter).

    Args:
        name: The adapter to return, name-free; ``None``: every adapter of the model, keyed as in
            ``model.state_dict()``.

    Raises:
        AdapterStateError: The model has no adapters.
        AdapterConfigError: ``name`` is not one of the model's adapters.
    """
    check_module(model, "adapter_state_dict")
    selected = _selected(model, name, "adapter_state_dict")
    prefixes = adapter_prefixes(model, selected)
    state = {k: v for k, v in model.state_dict().items() if is_adapter_key(k, prefixes)}
    if name is not None:
        free = name_free_keys(model, name)
        state = {free.get(k, k): v for k, v in state.items()}
    return state


def _kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    if dtype.is_complex:
        return "complex"
    return "floating" if dtype.is_floating_point else "integer"


def value_problem(
    key: str, value: Any, target: torch.Tensor, check_finite: bool = True, finite_hint: str = ""
) -> str | None:
    """Why ``value`` cannot be copied into the live tensor ``target`` (``None`` if it can), naming ``key``.

    Checked: a dense tensor with values (not meta), the shape, the dtype kind (a float parameter takes floats, a
    bool mask takes bools or 0/1 values, an integer buffer takes integers) and, with ``check_finite``, no NaN/Inf
    in floating values, neither as given nor once cast to ``target``'s dtype (``finite_hint`` is appended to that
    message). Devices may differ: values are moved to
    ``target``'s device.
    """
    if not isinstance(value, torch.Tensor):
        shown = repr(value)
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        return f"{key}: a {type(value).__name__} ({shown}), not a torch.Tensor"
    if value.is_meta:
        return f"{key}: a meta tensor (shape only, no values); load the real values"
    if value.layout != torch.strided:
        return f"{key}: a {str(value.layout).removeprefix('torch.')} tensor; pass a dense tensor (.to_dense())"
    if tuple(value.shape) != tuple(target.shape):
        return f"{key}: got {tuple(value.shape)}, model has {tuple(target.shape)}"
    got, want = _kind(value.dtype), _kind(target.dtype)
    name = str(value.dtype).removeprefix("torch.")
    if want == "bool" and got != "bool":
        if got == "complex" or not bool(((value == 0) | (value == 1)).all()):
            return f"{key}: a {name} tensor with values other than 0/1 for a bool mask; pass a bool tensor"
    elif want != "bool" and got != want:
        return f"{key}: dtype {name} ({got}) for a {want} tensor ({str(target.dtype).removeprefix('torch.')})"
    if check_finite and got == "floating":
        if not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            return f"{key}: {bad} non-finite values (NaN/Inf){finite_hint}"
        # A finite value can still overflow the model's dtype (1e6 into an fp16 adapter, 1e300 float64 into fp32).
        cast = value.to(target.dtype) if want == "floating" else value
        if not bool(torch.isfinite(cast).all()):
            bad = int((~torch.isfinite(cast)).sum())
            return f"{key}: {bad} values overflow to inf as {str(target.dtype).removeprefix('torch.')}{finite_hint}"
    return None


def load_adapter_state_dict(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    strict: bool = True,
    *,
    name: str | None = None,
    check_finite: bool = True,
) -> None:
    """Copy adapter tensors into an injected ``model``; every key and value is checked before anything changes.

    The values are first converted (device, dtype) into staged copies, then copied into the model, so neither a
    bad value nor a failing conversion (e.g. out of device memory) leaves some tensors loaded and others not.

    Args:
        state_dict: As produced by ``adapter_state_dict`` (keys relative to ``model``): one adapter's name-free
            keys, or the named keys of several.
        strict: Refuse missing and unexpected keys (bad values of known keys are always refused).
        name: Load into this adapter only, from a one-adapter state (e.g. ``adapter_state_dict(model, name="a")``
            loads into ``"b"``); ``None``: into every adapter of the model.
        check_finite: Refuse NaN/Inf in floating values (an adapter holding them turns every output into NaN).

    Raises:
        AdapterTypeError: ``model`` is not a module or ``state_dict`` is not a mapping.
        AdapterStateError: Missing or unexpected keys, or values that are not tensors, are meta tensors, have
            another shape or dtype kind, or are non-finite; all listed by key. Also a model whose adapter tensors
            are on the meta device.
    """
    check_module(model, "load_adapter_state_dict")
    if not isinstance(state_dict, Mapping):
        raise AdapterTypeError(
            f"load_adapter_state_dict: state_dict must be a mapping of names to tensors (as adapter_state_dict "
            f"returns), got {type(state_dict).__name__}"
        )
    selected = _selected(model, name, "load_adapter_state_dict")
    expected = adapter_state_dict(model, name)
    bad_keys = [k for k in state_dict if not isinstance(k, str)]
    if bad_keys:
        raise AdapterStateError(
            f"adapter state keys must be strings such as the ones adapter_state_dict returns; got {bad_keys[:5]}"
        )
    if name is None and len(selected) == 1:
        # A one-adapter model also takes the name-free layout (state dicts and checkpoints from before names).
        own = {v: k for k, v in name_free_keys(model, selected[0]).items()}
        state_dict = {own.get(k, k): v for k, v in state_dict.items()}
        free: dict[str, str] = {}
    else:
        free = name_free_keys(model, name) if name is not None else {}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    given = {k: state_dict[k] for k in expected if k in state_dict}
    misshaped = {
        k for k, v in given.items() if isinstance(v, torch.Tensor) and tuple(v.shape) != tuple(expected[k].shape)
    }
    shapes = [value_problem(k, given[k], expected[k]) for k in sorted(misshaped)]
    hint = "; pass check_finite=False to load them anyway"
    values = [value_problem(k, v, expected[k], check_finite, hint) for k, v in given.items() if k not in misshaped]
    values = [v for v in values if v is not None]
    problems = []
    if strict and (missing or unexpected):
        # Shapes and values are reported below with their values (value_problem), so the report holds the keys only.
        problems.append(StateReport(missing=missing, unexpected=unexpected).describe(limit=10))
    if shapes:
        problems.append("shape mismatches " + ", ".join(shapes[:10]) + (" ..." if len(shapes) > 10 else ""))
    if values:
        problems.append("bad values " + "; ".join(values[:10]) + (" ..." if len(values) > 10 else ""))
    if problems:
        several = (
            f". The model holds several adapters {selected}: a state of one adapter (adapter_state_dict(model, "
            f"name=...)) loads with load_adapter_state_dict(model, sd, name=...)"
            if len(selected) > 1 and unexpected and strict
            else ""
        )
        raise AdapterStateError(
            "adapter state does not fit the model: "
            + "; ".join(problems)
            + several
            + ". Check that the state was saved from the same method config and base model"
        )
    merged = [module_name for module_name, _, _, layer in adapter_layers(model, selected) if layer.merged]
    if merged:
        raise AdapterStateError(
            f"the adapters of {merged[:5]}{' ...' if len(merged) > 5 else ''} are merged into the base weights; "
            "loading new values now would keep the old adapter in the base (and a later unmerge would subtract the "
            "new one, corrupting the base). Call lightning_adapters.unmerge(model) first, load, then merge again"
        )
    live = dict(model.named_parameters(remove_duplicate=False))
    live.update(dict(model.named_buffers(remove_duplicate=False)))
    own = {v: k for k, v in free.items()}  # name-free key -> the model's own key
    targets = {k: live[own.get(k, k)] for k in expected if k in state_dict and own.get(k, k) in live}
    meta = [k for k, t in targets.items() if t.is_meta]
    if meta:
        raise AdapterStateError(
            f"the model's adapter tensors {meta[:5]} are on the meta device, so loading into them would keep no "
            f"values; materialise the model first (model.to_empty(device=...) then load its weights)"
        )
    # Staged copies: converting can fail (device memory) and values may alias live tensors; neither may leave a
    # half-loaded adapter.
    staged = {k: state_dict[k].to(device=t.device, dtype=t.dtype, copy=True) for k, t in targets.items()}
    with torch.no_grad():
        for k, t in targets.items():
            t.copy_(staged[k])


def base_fingerprint(model: nn.Module) -> str:
    """A short hash of the frozen base: parameter names, shapes and a bf16-rounded sample of values of a few tensors.

    It identifies the base a checkpoint was trained on without reading every weight.
    """
    prefixes = adapter_prefixes(model)
    h = hashlib.sha256()
    sampled = 0
    for name, t in model.state_dict().items():
        if is_adapter_key(name, prefixes):
            continue
        # A torch.compile wrapper adds ``_orig_mod.`` to the names of the same base: leave it out.
        h.update(f"{name.replace('_orig_mod.', '')}:{tuple(t.shape)};".encode())
        # Values are sampled from plain tensors only (a sharded DTensor's local slice differs per rank; a quantized
        # tensor subclass such as torchao's NF4Tensor cannot be sliced) and rounded to bf16, so the same base cast
        # to bf16 by Lightning's precision plugin keeps its fingerprint.
        if sampled < 8 and t.numel() > 0 and t.is_floating_point() and type(t) is torch.Tensor:
            flat = t.detach().reshape(-1)
            sample = flat[: min(64, flat.numel())].to(torch.bfloat16).float().cpu()
            h.update(sample.numpy().tobytes())
            sampled += 1
    return h.hexdigest()[:16]
