"""Adapter state: which tensors belong to the adapter, loading them strictly, and the base fingerprint."""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from lightning_adapters.core.inject import adapted_modules, find_records
from lightning_adapters.core.layer import ADAPTER_ATTR
from lightning_adapters.errors import AdapterStateError


def adapter_prefixes(model: nn.Module) -> list[str]:
    """Key prefixes (with trailing dot) of every adapter child and ``modules_to_save`` module in ``model``."""
    prefixes = [f"{name}.{ADAPTER_ATTR}." if name else f"{ADAPTER_ATTR}." for name, _, _ in adapted_modules(model)]
    for prefix, _, rec in find_records(model):
        for m in rec.modules_to_save + list(rec.extra.get("trainable_modules", [])):
            full = f"{prefix}.{m}" if prefix else m
            prefixes.append(full + ".")
    return prefixes


def is_adapter_key(key: str, prefixes: list[str]) -> bool:
    """Whether a state-dict key falls under one of ``prefixes`` (structure, never a substring test)."""
    return any(key.startswith(p) for p in prefixes)


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors (and ``modules_to_save`` tensors) of ``model``, keyed as in ``model.state_dict()``.

    Tensors are detached references to the live ones, as ``state_dict()`` gives them.
    """
    prefixes = adapter_prefixes(model)
    if not prefixes:
        raise AdapterStateError("model has no adapters; call lightning_adapters.inject(model, config) first")
    return {k: v for k, v in model.state_dict().items() if is_adapter_key(k, prefixes)}


def load_adapter_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], strict: bool = True) -> None:
    """Copy adapter tensors into an injected ``model``; every key and shape is checked before anything changes.

    Args:
        state_dict: As produced by ``adapter_state_dict`` (keys relative to ``model``).
        strict: Refuse missing and unexpected keys (shape mismatches are always refused).

    Raises:
        AdapterStateError: Missing, unexpected or mis-shaped keys, listed by name.
    """
    expected = adapter_state_dict(model)
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    shapes = {
        k: (tuple(state_dict[k].shape), tuple(v.shape))
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    }
    problems = []
    if strict and missing:
        problems.append(f"missing keys {missing[:10]}{' ...' if len(missing) > 10 else ''}")
    if strict and unexpected:
        problems.append(f"unexpected keys {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
    if shapes:
        problems.append("shape mismatches " + ", ".join(f"{k}: got {g}, model has {e}" for k, (g, e) in shapes.items()))
    if problems:
        raise AdapterStateError(
            "adapter state does not fit the model: "
            + "; ".join(problems)
            + ". Check that the state was saved from the same method config and base model"
        )
    live = dict(model.named_parameters())
    live.update(dict(model.named_buffers()))
    with torch.no_grad():
        for k, v in state_dict.items():
            if k in expected and k in live:
                live[k].copy_(v.to(device=live[k].device, dtype=live[k].dtype))


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
        h.update(f"{name}:{tuple(t.shape)};".encode())
        # Values are sampled from plain tensors only (a sharded DTensor's local slice differs per rank) and
        # rounded to bf16, so the same base cast to bf16 by Lightning's precision plugin keeps its fingerprint.
        if sampled < 8 and t.numel() > 0 and t.is_floating_point() and not hasattr(t, "to_local"):
            flat = t.detach().reshape(-1)
            sample = flat[: min(64, flat.numel())].to(torch.bfloat16).float().cpu()
            h.update(sample.numpy().tobytes())
            sampled += 1
    return h.hexdigest()[:16]
