"""LoKr: low-rank Kronecker product adaptation, as in PEFT's ``LoKrConfig``.

Maths (Yeh et al. 2024, "Navigating Text-To-Image Customization: From LyCORIS Fine-Tuning to Model
Evaluation"; KronA, Edalati et al. 2022). For a base weight ``W (out, in)`` with ``out = a·b`` and ``in = c·d``::

    ΔW = s · w1 ⊗ w2,     w1 (a, c) "small",  w2 (b, d) "big",  s = alpha / r

``(a, b) = factorization(out, f)`` and ``(c, d) = factorization(in, f)``: the divisor pair nearest the square
root (``f = decompose_factor = -1``), or ``(f, dim/f)`` when ``f`` divides ``dim``, else the nearest pair with
the smaller factor ``<= f``. ``w2`` is stored low-rank as ``w2_a (b, r) · w2_b (r, d)`` when
``r < max(b, d)/2``; with ``decompose_both`` so is ``w1`` (``w1_a (a, r) · w1_b (r, c)``) when
``r < max(a, c)/2``. PEFT scales by ``alpha / r`` even when both factors are full (LyCORIS uses 1 there).

Init ``True``: ``w1`` (or ``w1_a``) ``= 0``, the rest kaiming-uniform; ``"lycoris"``: ``w2`` (or ``w2_b``) ``= 0``;
``False``: all random (not identity).

Convolutions (weight ``(out, in/groups, *k)``): ``c·d = in/groups``; a low-rank ``w2_b`` is ``(r, d·prod(k))``
and a full ``w2`` is ``(b, d, *k)``. With ``use_effective_conv2d`` (kernel > 1, low-rank ``w2``) ``w2`` is the
Tucker form ``w2[q, j, ...] = Σ t2[i, l, ...] w2_b[l, j] w2_a[i, q]`` with ``t2 (r, r, *k)`` (Conv1d:
``(r, r, k, 1)``; PEFT crashes on that case, it works here). On Conv1d with a full ``w2`` PEFT forms
``torch.kron`` of ``w1`` read as ``(1, a, c)`` with ``w2 (b, d, k)``, which is not channel-aligned; it is
reproduced here so PEFT adapters give the same outputs. Transformers ``Conv1D`` is handled as a Linear of the
same ``in``/``out`` (factors in the Linear layout); PEFT refuses ``Conv1D``, so such an adapter loads here only.

Training options (PEFT semantics): ``rank_dropout`` zeroes whole output rows of ``ΔW``, divided by the mask
mean only with ``rank_dropout_scale``; ``module_dropout`` skips the whole adapter for a training forward.

Speed: on Linear/Conv1D the update is applied through the Kronecker identity ``(w1 ⊗ w2) vec(X) =
vec(w1 · X · w2ᵀ)`` with ``x`` read as ``X (c, d)``, which costs a few percent of the base product, and added
in place to the base output; ``ΔW`` is never formed (``kernels.kronecker``). An autograd Function recomputes
the small intermediates in backward instead of keeping them. When that path would cost more than folding (large
batches without gradients, tiny layers), ``ΔW`` is folded into the base weight as LoHa does; convolutions always
fold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_adapters.config import (
    LowRankConfig,
    check_choice,
    check_probability,
    peft_layer_selection,
)
from lightning_adapters.core.dtypes import working_dtype
from lightning_adapters.core.layer import AdapterLayer
from lightning_adapters.core.quant import runs_own_kernel
from lightning_adapters.core.targeting import LINEAR_TYPES
from lightning_adapters.errors import AdapterConfigError
from lightning_adapters.kernels.folded import delta_forward, delta_term, grad_needed, separate_forward
from lightning_adapters.kernels.kronecker import kron_linear, kron_pays
from lightning_adapters.methods._common import (
    add_delta_,
    check_rank,
    in_out_features,
    kaiming_uniform_,
    layer_kind,
)
from lightning_adapters.methods._lycoris import cp_factor, module_dropped, rank_dropout_multipliers
from lightning_adapters.registry import LayerMethod, register


@dataclass
class LoKrConfig(LowRankConfig):
    """LoKr hyper-parameters (the same names as PEFT's ``LoKrConfig``).

    Attributes:
        r: Rank of the low-rank Kronecker factors.
        alpha: Scaling numerator; ``ΔW`` is scaled by ``alpha / r``.
        rank_dropout: Training-time probability of dropping an output row of ``ΔW``.
        module_dropout: Training-time probability of skipping the whole adapter for one forward.
        use_effective_conv2d: Tucker form of a low-rank ``w2`` for convolutions with a kernel larger than 1.
        decompose_both: Also store ``w1`` low-rank when ``r < max(a, c)/2``.
        decompose_factor: ``-1`` (split each dimension near its square root) or a positive factor ``f``.
        rank_dropout_scale: Divide the kept rows by the kept fraction during rank dropout.
        init_weights: ``True`` (``w1 = 0``), ``"lycoris"`` (``w2 = 0``) or ``False`` (all random, not identity).
        rank_pattern: ``{module regex: r}`` per-module ranks.
        alpha_pattern: ``{module regex: alpha}`` per-module alphas.
    """

    method_name = "lokr"

    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False
    init_weights: Any = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_probability(self.rank_dropout, "rank_dropout", "lokr")
        check_probability(self.module_dropout, "module_dropout", "lokr")
        for name in ("use_effective_conv2d", "decompose_both", "rank_dropout_scale"):
            check_choice(getattr(self, name), name, "lokr", (True, False))
        check_choice(self.init_weights, "init_weights", "lokr", (True, False, "lycoris"))
        f = self.decompose_factor
        if not isinstance(f, int) or isinstance(f, bool) or not (f == -1 or f >= 1):
            raise AdapterConfigError(
                f"lokr: decompose_factor must be -1 (split near the square root) or an integer >= 1, got {f!r}"
            )


# ------------------------------------------------------------------------------------------------------------
# Pure functions


def factorization(dim: int, factor: int = -1) -> tuple[int, int]:
    """Split ``dim`` into ``(m, n)`` with ``m·n = dim``, PEFT's rule.

    ``factor > 0`` dividing ``dim`` gives ``(factor, dim/factor)`` as is. Otherwise the divisors of ``dim`` are
    walked upwards from 1, stopping past the square root or, for ``factor > 0``, before exceeding ``factor``;
    the last pair is returned ordered ``m <= n``. E.g. 768 -> (24, 32), 127 -> (1, 127), (128, 4) -> (4, 32).
    """
    if factor > 0 and dim % factor == 0:
        return factor, dim // factor
    limit = dim if factor == -1 else factor
    m, n = 1, dim
    while m < n:
        nxt = m + 1
        while dim % nxt:
            nxt += 1
        if nxt > limit:
            break
        m, n = nxt, dim // nxt
    return min(m, n), max(m, n)


def kron_weight(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """``w1 ⊗ w2`` laid out as PEFT's ``torch.kron`` lays it out (before the reshape to the kernel).

    w1 (a, c) with w2 (b, m) -> (a·b, c·m); w2 (b, d, kh, kw) -> (a·b, c·d, kh, kw) (``w1`` as (a, c, 1, 1));
    w2 (b, d, k) -> (b, a·d, c·k) (``w1`` as (1, a, c): PEFT's Conv1d layout). Written as a broadcast product,
    which needs no contiguous inputs (``torch.kron`` fails on some strided ones).
    """
    a, c = w1.shape
    if w2.dim() == 2:
        b, m = w2.shape
        return (w1[:, None, :, None] * w2[None, :, None, :]).reshape(a * b, c * m)
    if w2.dim() == 4:
        b, d = w2.shape[:2]
        return (w1[:, None, :, None, None, None] * w2[None, :, None, :]).reshape(a * b, c * d, *w2.shape[2:])
    b, d, k = w2.shape
    return (w1[None, :, None, :, None] * w2[:, None, :, None, :]).reshape(b, a * d, c * k)


# ------------------------------------------------------------------------------------------------------------
# Layer


class LoKrLayer(AdapterLayer):
    """LoKr on one Linear, transformers Conv1D, Conv1d or Conv2d module.

    Parameters use PEFT's names and layouts: ``lokr_w1 (a, c)`` or ``lokr_w1_a (a, r)`` + ``lokr_w1_b (r, c)``;
    ``lokr_w2 (b, d[, *k])`` or ``lokr_w2_a (b, r)`` + ``lokr_w2_b (r, d·prod(k))``; Tucker form
    ``lokr_t2 (r, r, *k)``, ``lokr_w2_a (r, b)``, ``lokr_w2_b (r, d)``.
    """

    additive = True
    dense_term = True

    def __init__(self, base: nn.Module, config: LoKrConfig, name: str) -> None:
        super().__init__()
        self.kind = layer_kind(base)
        in_f, out_f = in_out_features(base)
        r = config.rank_for(name)
        check_rank(r, (base.weight.numel() // out_f, out_f), name, "lokr")
        alpha = config.alpha_for(name)
        self.r, self.alpha, self.scale = r, alpha, alpha / r
        self.rank_dropout = float(config.rank_dropout)
        self.rank_dropout_scale = bool(config.rank_dropout_scale)
        self.module_dropout = float(config.module_dropout)
        self.in_features, self.out_features = in_f, out_f
        dev = base.weight.device
        dt = working_dtype(base.weight.dtype)
        conv = self.kind in ("conv1d", "conv2d")
        kernel: tuple[int, ...] = tuple(base.kernel_size) if conv else ()
        n_in = in_f // base.groups if conv else in_f
        a, b = factorization(out_f, config.decompose_factor)
        c, d = factorization(n_in, config.decompose_factor)
        self.abcd = (a, b, c, d)
        self.full_w1 = not (config.decompose_both and r < max(a, c) / 2)
        self.full_w2 = r >= max(b, d) / 2
        # A 1-wide kernel has no spatial factor, so the Tucker form is skipped there (as PEFT does).
        self.use_cp = conv and bool(config.use_effective_conv2d) and math.prod(kernel) != 1 and not self.full_w2
        self.delta_shape = (out_f, in_f) if self.kind == "conv1d_t" else tuple(base.weight.shape)

        def param(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(shape, device=dev, dtype=dt))

        if self.full_w1:
            self.lokr_w1 = param(a, c)
        else:
            self.lokr_w1_a, self.lokr_w1_b = param(a, r), param(r, c)
        if self.full_w2:
            self.lokr_w2 = param(b, d, *kernel)
        elif self.use_cp:
            core = kernel if self.kind == "conv2d" else (kernel[0], 1)
            self.lokr_t2, self.lokr_w2_a, self.lokr_w2_b = param(r, r, *core), param(r, b), param(r, d)
        else:
            self.lokr_w2_a, self.lokr_w2_b = param(b, r), param(r, d * math.prod(kernel))
        self._init(config.init_weights)

    def _init(self, mode: Any) -> None:
        with torch.no_grad():
            for _, p in self.named_parameters():
                kaiming_uniform_(p)
            if mode is True:
                nn.init.zeros_(self.lokr_w1 if self.full_w1 else self.lokr_w1_a)
            elif mode == "lycoris":
                nn.init.zeros_(self.lokr_w2 if self.full_w2 else self.lokr_w2_b)

    def _names(self) -> list[str]:
        """PEFT names of this layer's tensors, in ``_delta`` argument order."""
        w1 = ["lokr_w1"] if self.full_w1 else ["lokr_w1_a", "lokr_w1_b"]
        if self.full_w2:
            w2 = ["lokr_w2"]
        elif self.use_cp:
            w2 = ["lokr_t2", "lokr_w2_a", "lokr_w2_b"]
        else:
            w2 = ["lokr_w2_a", "lokr_w2_b"]
        return w1 + w2

    def _factors(self) -> list[torch.Tensor]:
        return [getattr(self, n) for n in self._names()]

    def _w1(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """The small factor (a, c) from the head of ``tensors``."""
        return tensors[0] if self.full_w1 else tensors[0] @ tensors[1]  # (a, r) @ (r, c)

    def _delta(self, *tensors: torch.Tensor) -> torch.Tensor:
        """ΔW (out, in[/g], *k) from ``_factors()`` and, in training with rank dropout, a row mask (out,)."""
        n = len(self._names())
        factors, mask = list(tensors[:n]), (tensors[n] if len(tensors) > n else None)
        w1 = self._w1(factors) * self.scale  # scale the small factor, not the full-size product
        rest = factors[1 if self.full_w1 else 2 :]
        if self.full_w2:
            w2 = rest[0]
        elif self.use_cp:
            w2 = cp_factor(*rest)  # (b, d, *core)
        else:
            w2 = rest[0] @ rest[1]  # (b, r) @ (r, d·prod(k))
        dw = kron_weight(w1, w2).reshape(self.delta_shape)
        if mask is not None:
            dw = dw * mask.view(-1, *([1] * (dw.dim() - 1)))
        return dw

    def delta_weight(self) -> torch.Tensor:
        """ΔW in the base weight's own layout ((in, out) for Conv1D)."""
        dw = self._delta(*self._factors())
        return dw.t() if self.kind == "conv1d_t" else dw

    def additive_delta(self, base: nn.Module) -> torch.Tensor:
        return self.delta_weight()

    # --- merge -------------------------------------------------------------------------------------------

    def merge(self, base: nn.Module, *, safe: bool = False) -> None:
        with torch.no_grad():
            add_delta_(base.weight, self.delta_weight(), safe=safe)
        self.merged = True

    def unmerge(self, base: nn.Module) -> None:
        with torch.no_grad():
            add_delta_(base.weight, self.delta_weight(), sign=-1.0)
        self.merged = False

    # --- forward -----------------------------------------------------------------------------------------

    def _kron_is_cheaper(self, n_tokens: int, needs_grad: bool) -> bool:
        """Whether this layer runs the Kronecker path rather than folding (``kernels.kronecker.kron_pays``)."""
        a, b, c, d = self.abcd
        return kron_pays(a, b, c, d, None if self.full_w2 else self.r, n_tokens, needs_grad)

    def adapted_forward(self, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if module_dropped(self.training, self.module_dropout):
            return base._la_base_forward(x)
        tensors = self._factors()
        dt = tensors[0].dtype
        if runs_own_kernel(base, x):
            # A quantized base whose input needs no gradient: its own kernel gives the base term exactly, then ΔW x.
            return separate_forward(base, self.kind, x, self._delta(*tensors))
        mask = None
        if self.training and self.rank_dropout > 0.0:
            mask = rank_dropout_multipliers(
                self.out_features, self.rank_dropout, self.rank_dropout_scale, dt, tensors[0].device
            )
        same_dtype = x.dtype == dt and base.weight.dtype == dt
        if self.kind in ("linear", "conv1d_t"):
            needs_grad = grad_needed(base, x, tensors)
            if not same_dtype or self._kron_is_cheaper(x.numel() // x.shape[-1], needs_grad):
                return self._forward_kron(base, x, tensors, mask, same_dtype, needs_grad)
        return delta_forward(base, self.kind, x, tensors + ([] if mask is None else [mask]), self._delta)

    def delta_output(self, base: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """``op(x, ΔW)``, the term ``adapted_forward`` adds (``None`` when module dropout skips the adapter)."""
        if module_dropped(self.training, self.module_dropout):
            return None
        tensors = self._factors()
        if self.training and self.rank_dropout > 0.0:
            dt = tensors[0].dtype
            mask = rank_dropout_multipliers(
                self.out_features, self.rank_dropout, self.rank_dropout_scale, dt, tensors[0].device
            )
            tensors = [*tensors, mask]
        return delta_term(base, self.kind, x, self._delta(*tensors))

    def _forward_kron(
        self,
        base: nn.Module,
        x: torch.Tensor,
        tensors: list[torch.Tensor],
        mask: torch.Tensor | None,
        same_dtype: bool,
        needs_grad: bool,
    ) -> torch.Tensor:
        w1 = self._w1(tensors)  # (a, c)
        if self.full_w2:
            a2, b2 = tensors[-1], None  # (b, d)
        else:
            a2, b2 = tensors[-2], tensors[-1]  # (b, r), (r, d)
        a2 = a2 * self.scale  # scale a small factor, not the output
        return kron_linear(base, self.kind, x, w1, a2, b2, mask, fused=same_dtype, needs_grad=needs_grad)

    # --- PEFT layout ---------------------------------------------------------------------------------------

    def peft_state(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, n).detach() for n in self._names()}

    def load_peft_state(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for k, v in state.items():
                p = getattr(self, k)
                p.copy_(v.to(dtype=p.dtype, device=p.device))

    def extra_repr(self) -> str:
        a, b, c, d = self.abcd
        w1 = "w1" if self.full_w1 else "w1_a·w1_b"
        w2 = "w2" if self.full_w2 else ("tucker w2" if self.use_cp else "w2_a·w2_b")
        return f"{self.kind}, ({a}x{c}) ⊗ ({b}x{d}), {w1}, {w2}, r={self.r}, scale={self.scale:g}, merged={self.merged}"


# ------------------------------------------------------------------------------------------------------------
# PEFT config translation


def _to_peft(cfg: LoKrConfig) -> dict[str, Any]:
    return {
        "peft_type": "LOKR",
        "r": cfg.r,
        "alpha": cfg.alpha,
        "rank_dropout": cfg.rank_dropout,
        "module_dropout": cfg.module_dropout,
        "use_effective_conv2d": cfg.use_effective_conv2d,
        "decompose_both": cfg.decompose_both,
        "decompose_factor": cfg.decompose_factor,
        "rank_dropout_scale": cfg.rank_dropout_scale,
        "init_weights": cfg.init_weights,
        "rank_pattern": dict(cfg.rank_pattern),
        "alpha_pattern": dict(cfg.alpha_pattern),
        "layers_to_transform": cfg.layers_to_transform,
        "layers_pattern": cfg.layers_pattern,
    }


def _from_peft(d: dict[str, Any]) -> LoKrConfig:
    init = d.get("init_weights", True)
    return LoKrConfig(
        r=d.get("r", 8),
        alpha=d.get("alpha", 8),
        rank_dropout=d.get("rank_dropout", 0.0) or 0.0,
        module_dropout=d.get("module_dropout", 0.0) or 0.0,
        use_effective_conv2d=bool(d.get("use_effective_conv2d", False)),
        decompose_both=bool(d.get("decompose_both", False)),
        decompose_factor=int(d.get("decompose_factor", -1)),
        rank_dropout_scale=bool(d.get("rank_dropout_scale", False)),
        init_weights=init if init == "lycoris" else bool(init),
        rank_pattern=d.get("rank_pattern") or {},
        alpha_pattern=d.get("alpha_pattern") or {},
        **peft_layer_selection(d),
        target_modules=d.get("target_modules"),
        exclude_modules=d.get("exclude_modules"),
        modules_to_save=d.get("modules_to_save"),
    )


class LoKrMethod(LayerMethod):
    """LoKr in the registry."""

    name = "lokr"
    config_cls = LoKrConfig
    peft_type = "LOKR"
    supported_types = LINEAR_TYPES + (nn.Conv1d, nn.Conv2d)
    create_layer = LoKrLayer
    config_to_peft = staticmethod(_to_peft)
    config_from_peft = staticmethod(_from_peft)


register(LoKrMethod())
