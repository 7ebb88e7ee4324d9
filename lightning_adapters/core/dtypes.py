"""The adapter dtype policy, in one place.

Adapters are small, and half-precision updates of small tensors lose most of their value (an fp16 step of ``1e-4``
on a weight of ``1`` rounds away), so by default an adapter on a half-precision base keeps its tensors in fp32, as
PEFT does (``autocast_adapter_dtype``); on an fp32 or fp64 base it uses the base's dtype. A config can force a
dtype with ``adapter_dtype``. Layers are built and their weight-space maths done in ``working_dtype`` of the base
(fp32 for half precision), and ``inject`` then casts them to ``adapter_dtype_for`` (again after a ``bf16-true``
Lightning cast, through ``apply_dtype_policy``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from lightning_adapters.config import AdapterConfig

HALF_DTYPES = (torch.float16, torch.bfloat16)


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype adapter tensors are built and computed in for a base tensor of ``dtype``: fp32 for half precision
    and for non-floating (quantized) storage, else ``dtype`` itself."""
    if dtype in HALF_DTYPES or not dtype.is_floating_point:
        return torch.float32
    return dtype


def adapter_dtype_for(base_dtype: torch.dtype, config: AdapterConfig) -> torch.dtype:
    """The dtype an adapter's tensors are kept in: ``config.adapter_dtype`` if set, else ``working_dtype(base)``."""
    if config.adapter_dtype is not None:
        return getattr(torch, config.adapter_dtype)
    return working_dtype(base_dtype)
