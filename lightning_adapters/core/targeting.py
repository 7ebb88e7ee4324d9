"""Which modules a config targets: suffix lists, full-match regexes and ``"all-linear"``."""

from __future__ import annotations

import difflib
import re
from typing import Any

from torch import nn

from lightning_adapters.errors import TargetError

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # transformers is a hard dependency; this keeps the engine importable without it
    Conv1D = None

LINEAR_TYPES: tuple[type, ...] = (nn.Linear,) + ((Conv1D,) if Conv1D is not None else ())

# PEFT's per-architecture defaults for LoRA-like methods when target_modules is None.
DEFAULT_TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "gpt2": ["c_attn"],
}


def name_matches(name: str, selector: Any) -> bool:
    """Whether module ``name`` is selected by a suffix list or full-match regex ``selector``."""
    if selector is None:
        return False
    if isinstance(selector, str):
        return re.fullmatch(selector, name) is not None
    return any(name == s or name.endswith("." + s) for s in selector)


def output_head_names(model: nn.Module) -> set[str]:
    """Names of a transformers model's output embedding (``lm_head``), excluded by ``"all-linear"``."""
    get_out = getattr(model, "get_output_embeddings", None)
    if get_out is None:
        return set()
    try:
        head = get_out()
    except (AttributeError, NotImplementedError):
        return set()
    if head is None:
        return set()
    return {n for n, m in model.named_modules() if m is head}


def resolve_targets(
    model: nn.Module,
    target_modules: Any,
    exclude_modules: Any,
    *,
    method: str,
    default_targets: dict[str, list[str]] | None = None,
    skip: set[str] | None = None,
) -> list[str]:
    """Names of the modules ``target_modules`` selects, minus ``exclude_modules`` and ``skip``.

    Raises:
        TargetError: Nothing matched; the message shows the closest module names.
    """
    skip = skip or set()
    if target_modules is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        table = default_targets if default_targets is not None else DEFAULT_TARGETS
        if model_type not in table:
            raise TargetError(
                f"{method}: target_modules is None and there is no default for model type {model_type!r}; "
                f"set target_modules (known defaults: {sorted(table)})"
            )
        target_modules = table[model_type]
    names: list[str] = []
    if target_modules == "all-linear":
        heads = output_head_names(model)
        names = [n for n, m in model.named_modules() if isinstance(m, LINEAR_TYPES) and n not in heads]
    else:
        names = [n for n, _ in model.named_modules() if n and name_matches(n, target_modules)]
    names = [n for n in names if not name_matches(n, exclude_modules) and n not in skip]
    if not names:
        all_names = [n for n, _ in model.named_modules() if n]
        wanted = [target_modules] if isinstance(target_modules, str) else list(target_modules)
        close: list[str] = []
        for w in wanted:
            leaf_names = sorted({n.rsplit(".", 1)[-1] for n in all_names})
            close += difflib.get_close_matches(w, leaf_names, n=3, cutoff=0.4)
        hint = f"closest module names: {sorted(set(close))}" if close else f"some module names: {all_names[:8]}"
        raise TargetError(
            f"{method}: target_modules={target_modules!r} matched no module "
            f"(exclude_modules={exclude_modules!r}); {hint}"
        )
    return names
