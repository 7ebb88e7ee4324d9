"""New LoRA adapters made from existing ones: weighted combinations (``combine``) and conversions (``to_lora``).

Both add a named LoRA adapter to the model (inactive and frozen, as any further ``inject`` does) that can then be
activated, scaled, trained, merged and saved like any other.

``combine`` equals PEFT 0.21's ``LoraModel.add_weighted_adapter`` for every ``combination_type`` it offers. Per
adapted module, with weights ``w_i`` and LoRA scalings ``s_i`` (times the adapter's ``set_scale`` factor, as PEFT's
``set_scale`` rewrites the scaling it reads):

- ``linear`` (all ranks equal): ``A = Σ sgn(w_i s_i)·√|w_i s_i|·A_i``, ``B = Σ √|w_i s_i|·B_i``. The product
  ``B A`` holds cross terms ``B_i A_j``: it is *not* ``Σ w_i ΔW_i`` unless the adapters share factors.
- ``cat``: ``A = [w_1 s_1 A_1; w_2 s_2 A_2; ...]``, ``B = [B_1, B_2, ...]``, so ``B A = Σ w_i ΔW_i`` exactly, with rank
  ``Σ r_i``.
- ``svd``: the rank-``r`` truncated SVD ``U S Vᵀ`` of ``Σ w_i ΔW_i``: ``B = U S``, ``A = Vᵀ`` (optionally clamped to a
  quantile of their entries).
- ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune`` (and their ``_svd`` forms): the same task-arithmetic
  family with pruning (``density``) and, for TIES, a sign election (``majority_sign_method``); the plain forms act
  on the ``A`` and ``B`` factors separately (as ``linear``), the ``_svd`` forms on ``ΔW_i`` then truncate as ``svd``.
  DARE drops entries at random: pass ``seed`` (or seed torch's global generator, which PEFT uses) to reproduce it.

The combined adapter has ``alpha = r`` (scaling 1). Where PEFT copies the first adapter's ``use_rslora``/``use_dora``/
init into the new config (so an rsLoRA source makes PEFT's combination ``√r`` times too strong, and a residual init
rewrites the base again), the combined adapter here is a plain LoRA; sources with DoRA, ``lora_bias``, residual
inits, ``modules_to_save``, trainable tokens or ``target_parameters`` are refused, since their extra state has no
combination.

``to_lora`` turns any additive adapter with a weight-space ``ΔW`` (LoHa, LoKr, AdaLoRA, LoRA itself) into a LoRA by
the truncated SVD of each layer's ``ΔW``, as PEFT's ``convert_to_lora`` does (``B = U S``, ``A = Vᵀ``, scaling 1), and
reports the relative Frobenius error ``‖ΔW − B A‖ / ‖ΔW‖`` per layer and over the whole adapter. ``ΔW`` is the term
that acts, so a source scaled by ``set_scale`` is converted at that strength (as PEFT's ``get_delta_weight`` does).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_adapters.core.inject import (
    adapter_layers,
    check_module,
    check_name,
    check_names,
    config_of,
    find_records,
    inject,
    known_names,
)
from lightning_adapters.core.named import delete
from lightning_adapters.errors import AdapterConfigError, AdapterTypeError, NotMergeableError
from lightning_adapters.methods.lora import CONV_KINDS, LoRAConfig, LoRALayer

COMBINATIONS = (
    "linear",
    "cat",
    "svd",
    "ties",
    "ties_svd",
    "dare_linear",
    "dare_linear_svd",
    "dare_ties",
    "dare_ties_svd",
    "magnitude_prune",
    "magnitude_prune_svd",
)
_SAME_RANK = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
_NEEDS_DENSITY = tuple(c for c in COMBINATIONS if c not in ("linear", "cat", "svd"))
SIGN_METHODS = ("total", "frequency")

# ------------------------------------------------------------------------------------------------------------
# Pure functions: task arithmetic and its pruned forms, on a list of same-shaped tensors


def weighted_sum(tensors: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """``Σ_i weights[i] · tensors[i]``: (n,) weights and n tensors of one shape -> that shape."""
    stacked = torch.stack(tensors)  # (n, *shape)
    return (stacked * weights.reshape(-1, *([1] * (stacked.dim() - 1)))).sum(dim=0)


def prune_magnitude(t: torch.Tensor, density: float) -> torch.Tensor:
    """``t`` with all but its ``int(density · numel)`` largest-magnitude entries set to 0 (``density >= 1``: ``t``)."""
    if density >= 1:
        return t
    keep = torch.zeros(t.numel(), dtype=t.dtype, device=t.device)
    keep[torch.topk(t.abs().reshape(-1), k=int(density * t.numel()), largest=True).indices] = 1
    return t * keep.reshape(t.shape)


def prune_random(t: torch.Tensor, density: float, generator: torch.Generator | None) -> torch.Tensor:
    """DARE: each entry of ``t`` kept with probability ``density`` and rescaled by ``1/density`` (``>= 1``: ``t``)."""
    if density >= 1:
        return t
    keep = torch.bernoulli(torch.full_like(t, density), generator=generator)
    return t * keep / density


def elect_signs(stacked: torch.Tensor, method: str) -> torch.Tensor:
    """TIES' sign election over dim 0 of ``stacked`` (n, *shape): where each entry agrees with the majority sign
    (by summed value, ``"total"``, or by count, ``"frequency"``; ties go to +) -> bool (n, *shape)."""
    signs = stacked.sign()
    votes = stacked.sum(dim=0) if method == "total" else signs.sum(dim=0)
    return signs == torch.where(votes >= 0, 1, -1)


def disjoint_mean(weighted: torch.Tensor, agree: torch.Tensor) -> torch.Tensor:
    """Mean over dim 0 of the entries that agree with the elected sign (0 where none does)."""
    kept = agree.sum(dim=0)
    return (weighted * agree).sum(dim=0) / torch.clamp(kept, min=1.0)


def merge_tasks(
    how: str,
    tensors: list[torch.Tensor],
    weights: torch.Tensor,
    density: float | None,
    sign_method: str,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """One tensor from ``tensors`` by the task-arithmetic rule ``how`` (a ``COMBINATIONS`` name without ``_svd``)."""
    if how in ("linear", "svd"):
        return weighted_sum(tensors, weights)
    assert density is not None  # checked by combine
    if how.startswith("dare"):
        tensors = [prune_random(t, density, generator) for t in tensors]
    else:
        tensors = [prune_magnitude(t, density) for t in tensors]
    if how in ("dare_linear", "magnitude_prune"):
        return weighted_sum(tensors, weights)
    stacked = torch.stack(tensors)  # (n, *shape)
    agree = elect_signs(stacked, sign_method)
    return disjoint_mean(stacked * weights.reshape(-1, *([1] * (stacked.dim() - 1))), agree)


def truncated_svd(
    delta: torch.Tensor, r: int, *, clamp: float | None = None, full_matrices: bool = True, driver: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` with ``B A`` the best rank-``r`` approximation of ``delta (out, n)``: ``B = U S (out, r)``,
    ``A = Vᵀ (r, n)``; columns/rows past ``min(out, n)`` are 0. ``clamp``: clip both to the ``clamp`` quantile of
    their entries' values (and its negative)."""
    U, S, Vh = torch.linalg.svd(delta, full_matrices=full_matrices, driver=driver)
    k = min(r, S.shape[0])
    B = delta.new_zeros(delta.shape[0], r)
    A = delta.new_zeros(r, delta.shape[1])
    B[:, :k] = U[:, :k] @ torch.diag(S[:k])  # (out, k)
    A[:k] = Vh[:k]  # (k, n)
    if clamp is not None:
        hi = torch.quantile(torch.cat([B[:, :k].flatten(), A[:k].flatten()]), clamp)
        B, A = B.clamp(-hi, hi), A.clamp(-hi, hi)
    return A, B


# ------------------------------------------------------------------------------------------------------------
# Layout helpers: a layer's ΔW as a matrix (out, in·k) and back to LoRA's factor shapes


def _as_matrix(delta: torch.Tensor, kind: str) -> torch.Tensor:
    """ΔW in the base weight's layout -> (out, in·prod(k)): Conv1D (in, out) and Embedding (V, d) are transposed."""
    if kind in ("conv1d_t", "embedding"):
        return delta.t()
    return delta.reshape(delta.shape[0], -1)


def _factor_shapes(base: nn.Module, kind: str, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of LoRA's ``lora_A`` and ``lora_B`` of rank ``r`` on ``base`` (ungrouped)."""
    if kind in CONV_KINDS:
        k = tuple(base.kernel_size)
        return (r, base.in_channels, *k), (base.out_channels, r) + (1,) * len(k)
    w = base.weight
    out_f, in_f = (w.shape[1], w.shape[0]) if kind in ("conv1d_t", "embedding") else (w.shape[0], w.shape[1])
    return (r, in_f), (out_f, r)


def _target_regex(names: list[str]) -> str:
    """A full-match ``target_modules`` regex selecting exactly the modules ``names``."""
    return "|".join(re.escape(n) for n in sorted(names))


def _fresh_lora_config(first: Any, r: int, targets: list[str], rank_pattern: dict[str, int] | None = None) -> Any:
    """A plain LoRA config (scaling 1: ``alpha = r``) on exactly ``targets``, keeping ``first``'s adapter dtype."""
    pattern = dict(rank_pattern or {})
    return LoRAConfig(
        r=r,
        alpha=r,
        target_modules=_target_regex(targets),
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        adapter_dtype=getattr(first, "adapter_dtype", None),
    )


def _write_factors(model: nn.Module, name: str, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Copy ``{module: (A, B)}`` into the LoRA layers of adapter ``name``."""
    with torch.no_grad():
        for module_name, _, _, layer in adapter_layers(model, [name]):
            A, B = factors[module_name]
            layer.lora_A.copy_(A.reshape(layer.lora_A.shape).to(layer.lora_A.dtype))
            layer.lora_B.copy_(B.reshape(layer.lora_B.shape).to(layer.lora_B.dtype))


def _add_adapter(
    model: nn.Module, config: Any, name: str, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
) -> None:
    """Inject ``config`` as ``name`` and load ``factors``; a failure while loading removes ``name`` again."""
    inject(model, config, name=name)
    try:
        _write_factors(model, name, factors)
    except BaseException:
        delete(model, name)
        raise


def _check_new_name(model: nn.Module, name: Any, what: str) -> str:
    check_name(name, what)
    if name in known_names(model):
        raise AdapterConfigError(
            f"{what}: the model already has an adapter named {name!r}; pick a new name for the result (or "
            f"lightning_adapters.delete(model, {name!r}) first)"
        )
    return name


# ------------------------------------------------------------------------------------------------------------
# combine


def _check_lora_source(model: nn.Module, name: str, what: str) -> None:
    """Refuse an adapter ``combine`` cannot read as plain LoRA factors, naming what it holds and the way out."""
    rec = next(rec for _, _, rec in find_records(model) if rec.name == name)
    if rec.method != "lora":
        raise AdapterConfigError(
            f"{what}: adapter {name!r} is a {rec.method} adapter; only LoRA adapters combine (PEFT's "
            f"add_weighted_adapter). Convert it first: lightning_adapters.to_lora(model, {name!r}, r=..., "
            f"name='{name}_lora')"
        )
    cfg = rec.config
    extras = {
        "use_dora=True": cfg.use_dora,
        "lora_bias=True": cfg.lora_bias,
        f"modules_to_save={rec.modules_to_save}": bool(rec.modules_to_save),
        f"bias={cfg.bias!r}": cfg.bias != "none",
        "trainable_token_indices": bool(cfg.trainable_token_indices),
        "target_parameters": bool(cfg.target_parameters),
    }
    held = [k for k, on in extras.items() if on]
    if held:
        raise AdapterConfigError(
            f"{what}: adapter {name!r} has {held[0]}, whose extra state has no weighted combination; combine "
            "adapters trained without it"
        )
    for module_name, _, _, layer in adapter_layers(model, [name]):
        if not isinstance(layer, LoRALayer):
            raise AdapterConfigError(
                f"{what}: adapter {name!r} adapts {module_name!r} with {type(layer).__name__}, which has no "
                f"lora_A/lora_B pair to combine; exclude that module when training adapters to combine"
            )
        if layer.groups > 1:
            raise AdapterConfigError(
                f"{what}: adapter {name!r} adapts the grouped conv {module_name!r} (groups={layer.groups}), whose "
                "block-diagonal factors do not combine; exclude grouped convs from adapters to combine"
            )
        if layer.init_A is not None or layer.loftq_original is not None:
            raise AdapterConfigError(
                f"{what}: adapter {name!r} was initialised with init_weights={layer.init_mode!r}, which changed the "
                f"base weight of {module_name!r}; its factors alone are not its ΔW. Save it with "
                "save_peft(..., convert_to_lora=True) and load that as a plain LoRA to combine it"
            )
        if layer.needs_data:
            layer.check_initialized()


def _check_weights(model: nn.Module, weights: Any, what: str) -> dict[str, float]:
    if not isinstance(weights, Mapping) or not weights:
        raise AdapterTypeError(
            f"{what}: weights must be a non-empty mapping {{adapter name: weight}} such as {{'a': 0.7, 'b': 0.3}}, "
            f"got {weights!r}"
        )
    names = check_names(model, list(weights), what)
    out = {}
    for n in names:
        w = weights[n]
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise AdapterConfigError(f"{what}: the weight of adapter {n!r} must be a finite number, got {w!r}")
        out[n] = float(w)
    return out


def _acting_scale(layer: LoRALayer) -> float:
    """The factor the layer's ``B·A`` acts with: its LoRA scaling times its ``set_scale`` strength (PEFT's
    ``scaling``, which its ``set_scale`` rewrites and ``add_weighted_adapter`` reads)."""
    return layer.scale * layer.strength


def _max_rank(model: nn.Module, name: str) -> int:
    """The rank PEFT allots an adapter when combining: its config's ``r`` or its largest ``rank_pattern`` value."""
    cfg = config_of(model, name)
    return max([cfg.r, *cfg.rank_pattern.values()])


def combine(
    model: nn.Module,
    weights: Mapping[str, float],
    name: str,
    how: str = "svd",
    *,
    rank: int | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    svd_driver: str | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
    seed: int | None = None,
) -> nn.Module:
    """Add LoRA adapter ``name``: a weighted combination of the model's LoRA adapters (PEFT's
    ``add_weighted_adapter``; the rules are in the module docstring).

    The new adapter is inactive and frozen: ``set_active(model, name)`` to use it, ``set_trainable`` to train it.
    With a single adapter every ``how`` is ``linear``, as in PEFT.

    Args:
        weights: ``{adapter name: weight}``, in the order the adapters are combined; weights may be negative.
        name: Name of the new adapter (letters, digits, ``_``, ``-``; not taken).
        how: One of ``COMBINATIONS``: ``"linear"``, ``"cat"``, ``"svd"``, ``"ties"``, ``"ties_svd"``,
            ``"dare_linear"``, ``"dare_linear_svd"``, ``"dare_ties"``, ``"dare_ties_svd"``, ``"magnitude_prune"``,
            ``"magnitude_prune_svd"``.
        rank: Rank of an ``*svd`` result (default: the largest rank of the combined adapters).
        svd_clamp: Quantile (0..1) at which the ``*svd`` factors are clipped; ``None``: no clipping.
        svd_full_matrices: Passed to ``torch.linalg.svd``.
        svd_driver: ``torch.linalg.svd``'s cuSOLVER driver on CUDA (``"gesvd"``, ``"gesvdj"``, ``"gesvda"``).
        density: Fraction of entries kept (0..1) by the pruning forms (``ties``, ``dare_*``, ``magnitude_prune``).
        majority_sign_method: TIES' sign election: ``"total"`` (summed values) or ``"frequency"`` (counts).
        seed: Seed of DARE's random drops (``None``: torch's global generator as it stands at the call). The drops
            are drawn before the new adapter is built; PEFT draws them after initialising its new layers from the
            global generator, so it reproduces them when that generator holds the same state at its first drop.

    Returns:
        ``model``.

    Raises:
        AdapterConfigError: An unknown or non-LoRA adapter (or one with DoRA, ``lora_bias``, a residual init,
            ``modules_to_save``, ...), a taken ``name``, an unknown ``how``, ranks that differ for a same-rank form,
            a missing or out-of-range ``density``/``svd_clamp``/``rank``, or an unknown ``majority_sign_method``.
        AdapterTypeError: ``weights`` is not a non-empty mapping.
    """
    what = "combine"
    check_module(model, what)
    chosen = _check_weights(model, weights, what)
    _check_new_name(model, name, what)
    if how not in COMBINATIONS:
        raise AdapterConfigError(f"{what}: how={how!r} is not a combination; use one of {list(COMBINATIONS)}")
    for n in chosen:
        _check_lora_source(model, n, what)
    if len(chosen) == 1:
        how = "linear"
    if how in _NEEDS_DENSITY and (
        isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 <= density <= 1
    ):
        raise AdapterConfigError(
            f"{what}: how={how!r} prunes entries and needs density, the fraction kept, in [0, 1] (e.g. 0.5); got "
            f"{density!r}"
        )
    if majority_sign_method not in SIGN_METHODS:
        raise AdapterConfigError(
            f"{what}: majority_sign_method={majority_sign_method!r} is not one of {list(SIGN_METHODS)}"
        )
    if svd_clamp is not None and (isinstance(svd_clamp, bool) or not 0 <= svd_clamp <= 1):
        raise AdapterConfigError(f"{what}: svd_clamp={svd_clamp!r} must be a quantile in [0, 1] or None")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise AdapterConfigError(f"{what}: rank={rank!r} must be a positive integer or None")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise AdapterTypeError(f"{what}: seed must be an integer or None, got {seed!r}")
    ranks = {n: _max_rank(model, n) for n in chosen}
    if how in _SAME_RANK and len(set(ranks.values())) > 1:
        raise AdapterConfigError(
            f"{what}: how={how!r} adds the factors themselves, so every adapter needs the same rank; got {ranks}. "
            "Use how='cat' or how='svd'"
        )
    if how in _SAME_RANK:
        new_rank = next(iter(ranks.values()))
    elif how == "cat":
        new_rank = sum(ranks.values())
    else:
        new_rank = rank or max(ranks.values())

    # Per module, the layers of the chosen adapters in the order of ``weights``.
    per_module: dict[str, tuple[nn.Module, list[tuple[LoRALayer, float]]]] = {}
    for module_name, adapter, base, layer in adapter_layers(model, list(chosen)):
        per_module.setdefault(module_name, (base, []))[1].append((layer, adapter))
    ordered = {
        m: (base, [(layer, chosen[a]) for a in chosen for layer, b in pairs if b == a])
        for m, (base, pairs) in per_module.items()
    }
    if how in _SAME_RANK:
        for m, (_, pairs) in ordered.items():
            odd = {layer.r for layer, _ in pairs} - {new_rank}
            if odd:
                raise AdapterConfigError(
                    f"{what}: how={how!r} needs rank {new_rank} on every module, but {m!r} has rank {odd.pop()} "
                    "(rank_pattern); use how='cat' or how='svd'"
                )
    generator = None
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    with torch.no_grad():
        for m, (base, pairs) in ordered.items():
            first = pairs[0][0]
            if seed is not None and generator is None:
                generator = torch.Generator(device=first.lora_A.device).manual_seed(seed)
            a_shape, b_shape = _factor_shapes(base, first.kind, new_rank)
            if how == "cat":
                A = first.lora_A.new_zeros(a_shape)
                B = first.lora_B.new_zeros(b_shape)
                As = torch.cat([layer.lora_A * w * _acting_scale(layer) for layer, w in pairs], dim=0)
                Bs = torch.cat([layer.lora_B for layer, _ in pairs], dim=1)
                A[: As.shape[0]] = As
                B[:, : Bs.shape[1]] = Bs
            elif how.endswith("svd"):
                deltas = [
                    layer.lora_B.reshape(layer.lora_B.shape[0], -1)
                    @ layer.lora_A.reshape(layer.r, -1)
                    * _acting_scale(layer)
                    for layer, _ in pairs
                ]  # (out, in·k) each
                w = torch.tensor([w for _, w in pairs]).to(deltas[0].device)
                delta = merge_tasks(how.removesuffix("_svd"), deltas, w, density, majority_sign_method, generator)
                A, B = truncated_svd(
                    delta, new_rank, clamp=svd_clamp, full_matrices=svd_full_matrices, driver=svd_driver
                )
            else:
                scaled = [w * _acting_scale(layer) for layer, w in pairs]
                # √|w·s| on both factors, the sign on A only (B·A then carries w·s once per adapter).
                w_a = torch.tensor([math.sqrt(abs(v)) * (1 if v >= 0 else -1) for v in scaled])
                w_b = torch.tensor([math.sqrt(abs(v)) for v in scaled])
                dtype = first.lora_A.dtype
                A = merge_tasks(
                    how,
                    [layer.lora_A for layer, _ in pairs],
                    w_a.to(first.lora_A.device),
                    density,
                    majority_sign_method,
                    generator,
                ).to(dtype)
                B = merge_tasks(
                    how,
                    [layer.lora_B for layer, _ in pairs],
                    w_b.to(first.lora_B.device),
                    density,
                    majority_sign_method,
                    generator,
                ).to(dtype)
            factors[m] = (A, B)
    config = _fresh_lora_config(config_of(model, next(iter(chosen))), new_rank, list(ordered))
    _add_adapter(model, config, name, factors)
    return model


# ------------------------------------------------------------------------------------------------------------
# to_lora


@dataclass
class LoRAConversion:
    """What ``to_lora`` built and how close it is.

    Attributes:
        name: The new LoRA adapter.
        source: The converted adapter.
        ranks: Rank of the new LoRA per module.
        errors: Relative Frobenius error ``‖ΔW − B A‖ / ‖ΔW‖`` per module (0 where ``ΔW`` is 0 and matched).
        error: The same over the whole adapter: ``√(Σ ‖ΔW − B A‖²) / √(Σ ‖ΔW‖²)``.
    """

    name: str
    source: str
    ranks: dict[str, int]
    errors: dict[str, float]
    error: float


def _energy_rank(S: torch.Tensor, threshold: float) -> int:
    """The smallest ``k`` whose top singular values hold ``threshold`` of ``Σ S²`` (at least 1)."""
    energy = torch.cumsum(S.double() ** 2, dim=0)
    if float(energy[-1]) == 0.0:
        return 1
    return min(int(torch.searchsorted(energy, threshold * energy[-1]).item()) + 1, S.shape[0])


def to_lora(model: nn.Module, source: str, r: int | float, name: str | None = None) -> LoRAConversion:
    """Add a LoRA adapter approximating adapter ``source`` by the truncated SVD of each layer's ``ΔW``.

    Works for every adapter whose layers add a weight-space ``ΔW`` to the base (LoHa, LoKr, AdaLoRA, LoRA without
    DoRA/``lora_bias``). The LoRA has scaling 1 (``alpha = r``); per layer ``B = U S``, ``A = Vᵀ`` (PEFT's
    ``convert_to_lora``). With ``r`` at least a layer's ``min(out, in·k)`` that layer is exact (extra ranks are 0).
    The new adapter is inactive and frozen, like any further adapter; the source is left as it is.

    Args:
        source: The adapter to convert.
        r: The LoRA rank (an int ``>= 1``), or a float in ``(0, 1]``: per layer the smallest rank whose singular
            values hold that fraction of ``‖ΔW‖²`` (the ranks go to ``rank_pattern``).
        name: The new adapter's name (default ``"<source>_lora"``).

    Returns:
        A ``LoRAConversion`` with the per-module ranks and relative errors, and the overall error.

    Raises:
        AdapterConfigError: Unknown ``source``, a taken ``name``, a bad ``r``, or a layer with no additive ``ΔW``
            (OFT/BOFT rotations, DoRA, Llama-Adapter, grouped convs), named.
    """
    what = "to_lora"
    check_module(model, what)
    if not isinstance(source, str):
        raise AdapterTypeError(f"{what}: source must be one adapter name (a string), got {source!r}")
    (source,) = check_names(model, source, what)
    name = f"{source}_lora" if name is None else name
    _check_new_name(model, name, what)
    if isinstance(r, bool) or not isinstance(r, (int, float)) or (isinstance(r, int) and r < 1):
        raise AdapterConfigError(f"{what}: r must be a rank >= 1 or an energy fraction in (0, 1], got {r!r}")
    if isinstance(r, float) and not 0 < r <= 1:
        raise AdapterConfigError(
            f"{what}: a float r is the fraction of ‖ΔW‖² to keep and must be in (0, 1], got {r!r} (pass an int for a "
            "fixed rank)"
        )
    layers = list(adapter_layers(model, [source]))
    if not layers:
        rec = next(rec for _, _, rec in find_records(model) if rec.name == source)
        raise AdapterConfigError(
            f"{what}: adapter {source!r} ({rec.method}) adapts the model as a whole and has no per-layer ΔW to "
            "convert; only additive per-layer adapters (lora, loha, lokr, adalora) can be"
        )
    deltas: dict[str, torch.Tensor] = {}
    kinds: dict[str, str] = {}
    with torch.no_grad():
        for module_name, _, base, layer in layers:
            kind = getattr(layer, "kind", None)
            if kind in CONV_KINDS and base.groups > 1:
                raise AdapterConfigError(
                    f"{what}: {module_name!r} is a grouped conv (groups={base.groups}); a LoRA of its ΔW would not be "
                    "block-diagonal like the base kernel. Exclude grouped convs from the adapter to convert"
                )
            try:
                dw = layer.additive_delta(base) * layer.strength  # the ΔW that acts, set_scale included
            except NotMergeableError as err:
                raise AdapterConfigError(
                    f"{what}: adapter {source!r} cannot become a LoRA on {module_name!r}: {err}"
                ) from err
            deltas[module_name] = _as_matrix(dw, kind).float()  # (out, in·k); SVD needs fp32 or fp64
            kinds[module_name] = kind
        factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        ranks: dict[str, int] = {}
        for module_name, delta in deltas.items():
            if isinstance(r, float):
                S = torch.linalg.svdvals(delta)
                ranks[module_name] = _energy_rank(S, r)
            else:
                ranks[module_name] = r
            A, B = truncated_svd(delta, ranks[module_name], full_matrices=False)
            factors[module_name] = (A, B)
    top = max(ranks.values())
    pattern = {re.escape(m): k for m, k in ranks.items() if k != top} if isinstance(r, float) else None
    config = _fresh_lora_config(config_of(model, source), top, list(deltas), pattern)
    _add_adapter(model, config, name, factors)
    errors: dict[str, float] = {}
    num = den = 0.0
    with torch.no_grad():
        for module_name, _, _, layer in adapter_layers(model, [name]):
            delta = deltas[module_name]
            err = (delta - _as_matrix(layer.delta_weight(), kinds[module_name]).float()).norm().item()
            ref = delta.norm().item()
            errors[module_name] = err / ref if ref > 0 else (0.0 if err == 0 else math.inf)
            num += err**2
            den += ref**2
    overall = math.sqrt(num) / math.sqrt(den) if den > 0 else (0.0 if num == 0 else math.inf)
    return LoRAConversion(name=name, source=source, ranks=ranks, errors=errors, error=overall)
