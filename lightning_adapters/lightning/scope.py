"""What the Lightning integration trains and saves around the adapted module.

The rule, for ``AdapterCallback(config, module="encoder")`` and ``AdapterMixin`` with ``adapter_module``:

- The adapter goes into the named sub-module; everything in it is frozen except the adapter (and the
  ``modules_to_save`` found inside it).
- Every parameter of the LightningModule *outside* that sub-module that still requires grad after injection (a
  new task head, a learned temperature) trains in full, and is saved in every checkpoint together with the
  buffers of its module, so resuming and ``restore_from_checkpoint`` give back the trained head.
- ``modules_to_save`` may name modules outside the sub-module too (``modules_to_save=["head"]``): they are made
  trainable and saved the same way. Entries that match inside the sub-module keep their usual meaning.

With ``module=None`` the whole LightningModule is the base: everything not adapted and not in ``modules_to_save``
is frozen. A direct child of the LightningModule that was trainable before injection and ends up frozen (no
adapter in it, not in ``modules_to_save``), or that is itself a single layer given an adapter by
``"all-linear"``, is almost always a new task head frozen at its random initialisation; the integration warns
about it, naming the fix.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from lightning_adapters.config import AdapterConfig
from lightning_adapters.core.inject import InjectionRecord, adapted_modules
from lightning_adapters.core.layer import is_adapted
from lightning_adapters.core.targeting import saves_module
from lightning_adapters.errors import AdapterConfigError, TargetError


def inside(name: str, module: str) -> bool:
    """Whether module ``name`` of the LightningModule lies in the sub-module ``module`` (``""``: everything)."""
    return not module or name == module or name.startswith(module + ".")


def _outside_names(root: nn.Module, module: str) -> list[str]:
    # Modules beside the sub-module: neither in it nor one of its ancestors (saving an ancestor saves the base).
    return [n for n, _ in root.named_modules() if n and not inside(n, module) and not module.startswith(n + ".")]


def inner_config(target: nn.Module, config: AdapterConfig) -> AdapterConfig:
    """``config`` with only the ``modules_to_save`` entries that select a module inside ``target``."""
    entries = config.modules_to_save or []
    names = [n for n, _ in target.named_modules() if n]
    inner = [e for e in entries if any(saves_module(n, [e]) for n in names)]
    if inner == entries:
        return config
    return dataclasses.replace(config, modules_to_save=inner or None)


def split_modules_to_save(root: nn.Module, module: str, config: AdapterConfig) -> tuple[AdapterConfig, list[str]]:
    """Split ``config.modules_to_save`` into the config injected into ``module`` and the modules beside it.

    Args:
        root: The LightningModule.
        module: Dotted name of the sub-module the adapter goes into (``""``: the whole LightningModule).
        config: The user's config.

    Returns:
        The config for ``inject`` into the sub-module (``config`` itself when nothing lies outside), and the
        names, relative to ``root``, of the outermost modules beside the sub-module that an entry selects.

    Raises:
        TargetError: An entry matches no module inside or beside the sub-module.
    """
    entries = config.modules_to_save or []
    if not module or not entries:
        return config, []
    target = root.get_submodule(module)
    inner_names = [n for n, _ in target.named_modules() if n]
    outer_names = _outside_names(root, module)
    inner, outer, unmatched = [], [], []
    for entry in entries:
        if any(saves_module(n, [entry]) for n in inner_names):
            inner.append(entry)
        elif any(saves_module(n, [entry]) for n in outer_names):
            outer.extend(n for n in outer_names if saves_module(n, [entry]))
        else:
            unmatched.append(entry)
    if unmatched:
        raise TargetError(
            f"modules_to_save entries {unmatched} match no module of the LightningModule, neither inside "
            f"module={module!r} nor beside it; use module names such as {_examples(outer_names + inner_names)}"
        )
    outer = [n for n in dict.fromkeys(outer) if not any(n.startswith(o + ".") for o in outer if o != n)]
    return inner_config(target, config), outer


def _examples(names: list[str], limit: int = 6) -> list[str]:
    return sorted(names, key=lambda n: (n.count("."), n))[:limit]


def outside_state(root: nn.Module, module: str, saved_modules: list[str]) -> tuple[set[str], list[str]]:
    """The state-dict keys beside the sub-module that train and are saved.

    Args:
        root: The LightningModule, injected.
        module: The adapted sub-module (``""``: the whole LightningModule, so nothing lies beside it).
        saved_modules: Modules beside it named by ``modules_to_save`` (all their tensors are saved).

    Returns:
        Exact keys (the parameters and buffers of every module beside the sub-module that has a parameter
        requiring grad), and key prefixes (one per saved module, with a trailing dot).
    """
    if not module:
        return set(), []
    keys: set[str] = set()
    for name, mod in root.named_modules():
        if inside(name, module):
            continue
        own = dict(mod.named_parameters(recurse=False))
        if any(p.requires_grad for p in own.values()):
            prefix = f"{name}." if name else ""
            persistent = [b for b, _ in mod.named_buffers(recurse=False) if b not in mod._non_persistent_buffers_set]
            keys.update(prefix + k for k in [*own, *persistent])
    return keys, [f"{n}." for n in saved_modules]


def frozen_parts(root: nn.Module, record: InjectionRecord) -> tuple[list[str], list[str]]:
    """Direct children of a wholly injected LightningModule that look like a task head frozen by mistake.

    Args:
        root: The LightningModule, injected with ``module=None``.
        record: Its injection record.

    Returns:
        ``(frozen, low_rank)``: children that were trainable before injection, hold no adapter, are not in
        ``modules_to_save`` and are now frozen; and children that are themselves one layer that
        ``target_modules="all-linear"`` gave an adapter (their weights frozen, only a low-rank update trains).
    """
    frozen, low_rank = [], []
    saved = record.modules_to_save
    for name, child in root.named_children():
        params = dict(child.named_parameters())
        was_trainable = any(record.original_requires_grad.get(f"{name}.{n}", False) for n in params)
        if not params or not was_trainable or any(inside(name, s) for s in saved):
            continue
        if is_adapted(child):
            if record.config.target_modules == "all-linear":
                low_rank.append(name)
        elif not any(True for _ in adapted_modules(child)) and not any(p.requires_grad for p in params.values()):
            frozen.append(name)
    return frozen, low_rank


def _accepts_modules_to_save(config: AdapterConfig, names: list[str]) -> bool:
    try:
        dataclasses.replace(config, modules_to_save=names)
    except AdapterConfigError:
        return False  # e.g. Llama-Adapter, whose PEFT format has no modules_to_save
    return True


def frozen_parts_message(root: nn.Module, frozen: list[str], low_rank: list[str], config: AdapterConfig) -> str:
    """The warning for ``frozen_parts``' findings, naming each module and the fixes that work for ``config``."""

    def describe(names: list[str]) -> str:
        out = []
        for n in names:
            mod = root.get_submodule(n)
            kind = type(mod).__mro__[1] if is_adapted(mod) else type(mod)  # the base class of an adapted layer
            adapter_ids = {id(p) for _, _, layer in adapted_modules(mod) for p in layer.parameters()}
            count = sum(p.numel() for p in mod.parameters() if id(p) not in adapter_ids)
            out.append(f"{n!r} ({kind.__name__}, {count:,} parameters)")
        return ", ".join(out)

    parts = []
    if frozen:
        parts.append(
            f"{describe(frozen)} was trainable before injection and is now frozen at its current values: it holds "
            "no adapter and is not in modules_to_save, so it never trains"
        )
    if low_rank:
        parts.append(
            f"{describe(low_rank)} got a {type(config).__name__} adapter from target_modules='all-linear': its "
            "weights stay frozen "
            "at their current values and only a low-rank update trains"
        )
    names = frozen + low_rank
    beside = (
        "adapt only the backbone with AdapterCallback(config, module='<backbone attribute>') (AdapterMixin: "
        "adapter_module), which trains and checkpoints everything beside it that requires grad"
    )
    fix = f"modules_to_save={names!r} in the config, or {beside}" if _accepts_modules_to_save(config, names) else beside
    return (
        "lightning_adapters: "
        + "; ".join(parts)
        + f". If this is a new task head, train it in full: {fix}. If it is meant to stay frozen, call "
        "requires_grad_(False) on it in __init__ and this warning goes away"
    )
