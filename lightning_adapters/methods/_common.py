"""Helpers shared by several method files (imported functions, never base classes to inherit maths from)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lightning_adapters.core.targeting import Conv1D
from lightning_adapters.errors import AdapterConfigError, MergeError, UnsupportedLayerError


def layer_kind(base: nn.Module) -> str:
    """``"linear"``, ``"conv1d_t"`` (transformers Conv1D), ``"embedding"`` or ``"conv1d"``/``"conv2d"``/``"conv3d"``."""
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
    if isinstance(base, nn.Conv3d):
        return "conv3d"
    raise UnsupportedLayerError(f"unsupported layer type {type(base).__name__}")


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


def draw_(t: torch.Tensor, init: Callable[..., Any], **kwargs: Any) -> torch.Tensor:
    """Fill ``t`` in place with the random ``init`` (an ``nn.init`` function), drawn from the CPU generator.

    Whatever device ``t`` is on, the values are drawn on the CPU and copied, as PEFT does (it builds adapter
    weights on the CPU and moves them): one seed gives the same adapter on the CPU, on a GPU and under any
    strategy (Lightning builds a single-device model under a CUDA default-device context, a sharded one on the
    CPU). Meta tensors and DTensors are filled where they are.
    """
    if t.device.type in ("cpu", "meta") or _is_dtensor(t):
        init(t, **kwargs)
        return t
    cpu = torch.empty(t.shape, dtype=t.dtype, device="cpu")  # explicit: a default-device context may be set
    init(cpu, **kwargs)
    with torch.no_grad():
        t.copy_(cpu)
    return t


def _is_dtensor(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(t, DTensor)


def kaiming_uniform_(t: torch.Tensor) -> torch.Tensor:
    """``nn.Linear``'s default init (kaiming-uniform with a=√5), on any tensor with fan-in = ``prod(shape[1:])``.

    Drawn from the CPU generator whatever ``t``'s device (``draw_``).
    """
    return draw_(t, nn.init.kaiming_uniform_, a=math.sqrt(5))


def check_finite(t: torch.Tensor, what: str) -> None:
    """Raise ``MergeError`` if ``t`` has NaN/Inf (used by ``merge(safe=True)`` before any write)."""
    if not torch.isfinite(t).all():
        bad = int((~torch.isfinite(t)).sum())
        raise MergeError(
            f"{what} has {bad} non-finite values (NaN or Inf) in {str(t.dtype).removeprefix('torch.')}; the base "
            f"weights were left unchanged. Check the adapter tensors for NaN/Inf, or keep a half-precision base "
            f"unmerged when the merged values overflow its range"
        )


def write_weight_(weight: torch.Tensor, new: torch.Tensor, *, safe: bool = False) -> None:
    """Copy ``new`` into ``weight``; with ``safe`` the values are checked in ``weight``'s own dtype first.

    Checking after the cast matters for half-precision bases: an fp32 sum of 7e4 is finite, but its fp16 value
    is ``inf``.
    """
    cast = new.to(weight.dtype)
    if safe:
        check_finite(cast, "merged weight")
    weight.copy_(cast)


def _out_dim(kind: str) -> int:
    # Conv1D (in, out) and Embedding (V, d) keep their outputs in columns; every other layout in rows.
    return 1 if kind in ("conv1d_t", "embedding") else 0


def unscalable_rows(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(out,) bool: the rows a merge scales by ``scale`` that unmerge cannot divide back in a ``dtype`` weight.

    A NaN scale, or one smaller in magnitude than ``dtype``'s smallest normal number (0 included, and every scale
    whose reciprocal overflows): the scaled row would be stored with subnormal precision (or as 0), and dividing it
    by the scale would not give the original back. Non-floating (quantized) storage is judged as float32.
    """
    s = scale.detach().reshape(-1).to(torch.float64)
    tiny = torch.finfo(dtype if dtype.is_floating_point else torch.float32).tiny
    return s.isnan() | (s.abs() < tiny)


def stash_rows(weight: torch.Tensor, which: torch.Tensor, kind: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Copies of the output slices ``which`` (out,) bool of ``weight``: ``(indices, values)``, or ``(None, None)``.

    Used by merges that scale outputs and cannot unscale some factors (DoRA, BOFT; ``unscalable_rows``): unmerge
    puts them back.
    """
    if not bool(which.any()):
        return None, None
    idx = which.nonzero().reshape(-1).to(weight.device)
    return idx, weight.detach().index_select(_out_dim(kind), idx).clone()


def restore_rows_(weight: torch.Tensor, idx: torch.Tensor | None, rows: torch.Tensor | None, kind: str) -> None:
    """Put back the slices ``stash_rows`` kept (no-op when it kept none)."""
    if idx is not None:
        weight.index_copy_(_out_dim(kind), idx.to(weight.device), rows.to(device=weight.device, dtype=weight.dtype))


# A rank-like value this many times above a layer's largest dimension is refused before anything is allocated.
RANK_LIMIT_FACTOR = 16


def check_rank(value: int, dims: tuple[int, ...], name: str, method: str, field: str = "r", why: str = "") -> None:
    """Refuse a rank far above the layer's dimensions (``r=10**12`` would only fail in the allocator, if at all).

    A rank above ``min(dims)`` adds no expressiveness; up to ``RANK_LIMIT_FACTOR × max(dims)`` is still allowed
    (PEFT allows any rank, and adapters saved with it must load), beyond that the value is a mistake. ``why``
    replaces the rank explanation in the message (e.g. for Llama-Adapter's prompt length).
    """
    limit = RANK_LIMIT_FACTOR * max(dims)
    if value > limit:
        why = why or f"more than {min(dims)} ranks add no expressiveness"
        raise AdapterConfigError(
            f"{method}: {field}={value} on {name!r} is far above the layer's dimensions {tuple(dims)} (at most "
            f"{limit} is accepted, nothing was allocated); {why}, so use {field} <= {min(dims)}"
        )


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
        write_weight_(weight, weight.to(cd) + delta.to(cd) * sign, safe=safe)


# --- orthogonal methods (OFT, BOFT) ------------------------------------------------------------------------


def divisors(d: int) -> list[int]:
    """Every divisor of ``d`` in increasing order."""
    small = [k for k in range(1, math.isqrt(d) + 1) if d % k == 0]
    return sorted(set(small + [d // k for k in small]))


def rotated_size(base: nn.Module, kind: str) -> tuple[int, str]:
    """Size of the space OFT/BOFT rotate on ``base`` and how to describe it in errors."""
    if kind == "linear":
        return base.in_features, f"in_features={base.in_features}"
    if kind == "embedding":
        return base.embedding_dim, f"embedding_dim={base.embedding_dim}"
    kh, kw = base.kernel_size
    cin = base.in_channels // base.groups
    return cin * kh * kw, f"flattened kernel size {cin * kh * kw} (in_channels/groups={cin} × {kh}×{kw})"


def block_dropout_mask(n: int, p: float, device: torch.device) -> torch.Tensor:
    """Boolean (n,) mask with exactly ``⌊p·n⌋`` randomly chosen True entries (the blocks to drop)."""
    k = int(p * n)
    return torch.randperm(n, device=device) < k


def tensor_key(t: torch.Tensor) -> tuple:
    """What identifies the values of ``t`` for a cache: its storage, version counter, dtype, device and shape."""
    return (t.data_ptr(), t._version, t.dtype, t.device, tuple(t.shape))


def keyed_cache(holder: Any, attr: str, key: tuple, compute: Callable[[], Any]) -> Any:
    """``compute()``, kept on ``holder.<attr>`` as ``(key, value)`` and returned again while ``key`` is unchanged.

    ``value`` is a tensor or a sequence of tensors. One computed under ``inference_mode`` is not returned outside
    it (it cannot enter an autograd graph there): it is computed again and replaces the entry. The attribute may be
    absent (a module pickled before its cache existed).
    """
    cached = getattr(holder, attr, None)
    if cached is not None and cached[0] == key:
        first = cached[1][0] if isinstance(cached[1], (tuple, list)) else cached[1]
        if not (first.is_inference() and not torch.is_inference_mode_enabled()):
            return cached[1]
    value = compute()
    setattr(holder, attr, (key, value))
    return value
