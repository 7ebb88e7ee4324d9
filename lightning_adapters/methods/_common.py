"""Helpers shared by several method files (imported functions, never base classes to inherit maths from)."""

from __future__ import annotations

import math
import re
from typing import Any

import torch
from torch import nn

from lightning_adapters.core.targeting import Conv1D


def layer_kind(base: nn.Module) -> str:
    """``"linear"``, ``"conv1d_t"`` (transformers Conv1D), ``"embedding"``, ``"conv1d"`` or ``"conv2d"``."""
    if Conv1D is not None and isinstance(base, Conv1D):
        return "conv1d_t"
    if isinstance(base, nn.Linear):
        return "linear"
    if isinstance(base, nn.Embedding):
        return "embedding"
    if isinstance(base, nn.Conv1d):
        return "conv1d"
    if isinstance(base, nn.Conv2d):
        return "conv2d"
    raise TypeError(f"unsupported layer type {type(base).__name__}")


def in_out_features(base: nn.Module) -> tuple[int, int]:
    """``(in, out)`` of a Linear/Conv1D/Conv layer (channels for convs), ``(num_embeddings, dim)`` for Embedding."""
    kind = layer_kind(base)
    if kind == "linear":
        return base.in_features, base.out_features
    if kind == "conv1d_t":
        return base.weight.shape[0], base.weight.shape[1]
    if kind == "embedding":
        return base.num_embeddings, base.embedding_dim
    return base.in_channels, base.out_channels


def weight_as_out_in(base: nn.Module) -> torch.Tensor:
    """The base weight as ``(out, in)`` (a transposed view for Conv1D, unchanged for others)."""
    w = base.weight
    return w.t() if layer_kind(base) == "conv1d_t" else w


def pattern_value(pattern: dict[str, Any], module_name: str, default: Any) -> Any:
    """PEFT's ``rank_pattern``/``alpha_pattern`` lookup: the first key matching the end of the module name."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


def kaiming_uniform_(t: torch.Tensor) -> torch.Tensor:
    """``nn.Linear``'s default init (kaiming-uniform with a=√5), on any tensor with fan-in = ``prod(shape[1:])``."""
    nn.init.kaiming_uniform_(t, a=math.sqrt(5))
    return t


def check_finite(t: torch.Tensor, what: str) -> None:
    """Raise ``ValueError`` if ``t`` has NaN/Inf (used by ``merge(safe=True)`` before any write)."""
    if not torch.isfinite(t).all():
        raise ValueError(f"{what} has non-finite values (NaN or Inf); the base weights were left unchanged")


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """fp32 for half tensors on CPU (half matmuls are slow there), else the tensor's own dtype."""
    if t.device.type == "cpu" and t.dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return t.dtype


def add_delta_(weight: torch.Tensor, delta: torch.Tensor, *, sign: float = 1.0, safe: bool = False) -> None:
    """``weight += sign · delta`` in place, computed in ``compute_dtype`` (merge/unmerge of additive methods).

    With ``safe`` the result is checked to be finite before ``weight`` is written, so a bad ΔW changes nothing.
    """
    cd = compute_dtype(weight)
    with torch.no_grad():
        new = weight.to(cd) + delta.to(cd) * sign
        if safe:
            check_finite(new, "merged weight")
        weight.copy_(new.to(weight.dtype))
