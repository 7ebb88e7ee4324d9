"""LoHa: low-rank Hadamard product adaptation (FedPara), as in PEFT's ``LoHaConfig``.

Maths (Hyeon-Woo et al. 2022, "FedPara: Low-Rank Hadamard Product for Communication-Efficient Federated
Learning"; used for fine-tuning by LyCORIS). For a base weight ``W (out, in)``::

    ΔW = s · (w1_a · w1_b) ⊙ (w2_a · w2_b),    w1_a, w2_a (out, r),  w1_b, w2_b (r, in),  s = alpha / r

The Hadamard product of two rank-``r`` matrices can reach rank ``r²`` with ``2r(out + in)`` parameters.
``w2_b = 0`` at init (the others kaiming-uniform), so the layer starts as the base; only ``w2_b`` receives
gradient at the first step. ``init_weights=False`` makes every factor random (not identity).

Convolutions (weight ``(out, in/groups, *k)``): by default ``in`` above is ``in/groups · prod(k)`` and ``ΔW``
is reshaped to the kernel. With ``use_effective_conv2d`` and a kernel larger than 1, each factor is the CP /
Tucker form of FedPara's Proposition 3::

    W_k[p, q, ...] = Σ_{i,j} t_k[i, j, ...] · w_kb[j, q] · w_ka[i, p],   t_k (r, r, *k),  w_ka (r, out),  w_kb (r, in)

(Conv1d stores ``t_k`` as ``(r, r, k, 1)``, as PEFT does.) Transformers ``Conv1D`` is handled as a Linear of the
same ``in``/``out`` (factors in the Linear layout); PEFT itself refuses ``Conv1D``, so a LoHa saved from such
a layer loads here but not in PEFT.

Training options (PEFT semantics): ``rank_dropout`` drops whole output rows of ``ΔW`` with a Bernoulli mask
and divides by the mask mean (always rescaled, unlike LoKr); ``module_dropout`` skips the whole adapter for a
training forward with that probability.

Speed: ``ΔW`` is folded into the base weight, so a forward is one product with ``W + ΔW`` (see ``kernels.folded``)
instead of PEFT's base product plus a second full-size product with ``ΔW``; the factors get their exact
gradient from ``∂L/∂(W + ΔW)``. On Linear/Conv1D layers where it needs fewer multiply-adds (wide layers, small
``r``), the update is instead applied as the rank-``r²`` product ``ΔW = A·B`` of ``kernels.hadamard``,
added in place to the base output, so no full-size tensor is formed at all.

PEFT's gradients of ``hada_w1_a``/``hada_w2_a`` in the ``use_effective_conv2d`` form are wrong (its
hand-written backward pairs each factor with the other factor's core); ours are the true gradients of the
same ``ΔW``.
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
from lightning_adapters.kernels.folded import delta_forward, delta_term, grad_needed, separate_forward
from lightning_adapters.kernels.hadamard import khatri_rao_factors, rank_r2_linear, rank_r2_pays
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
class LoHaConfig(LowRankConfig):
    """LoHa hyper-parameters (the same names as PEFT's ``LoHaConfig``).

    Attributes:
        r: Rank of each of the two Hadamard factors.
        alpha: Scaling numerator; ``ΔW`` is scaled by ``alpha / r``.
        rank_dropout: Training-time probability of dropping an output row of ``ΔW`` (kept rows are divided by
            the kept fraction).
        module_dropout: Training-time probability of skipping the whole adapter for one forward.
        use_effective_conv2d: CP/Tucker factors for convolutions with a kernel larger than 1 (FedPara Prop. 3).
        init_weights: ``True`` (``w2_b = 0``: identity at init) or ``False`` (all factors random).
        rank_pattern: ``{module regex: r}`` per-module ranks.
        alpha_pattern: ``{module regex: alpha}`` per-module alphas.
    """

    method_name = "loha"

    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    init_weights: Any = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_probability(self.rank_dropout, "rank_dropout", "loha")
        check_probability(self.module_dropout, "module_dropout", "loha")
        check_choice(self.use_effective_conv2d, "use_effective_conv2d", "loha", (True, False))
        check_choice(self.init_weights, "init_weights", "loha", (True, False))


# ------------------------------------------------------------------------------------------------------------
# Pure functions


def scale_rows(w: torch.Tensor, row_scale: float | torch.Tensor, out_axis: int) -> torch.Tensor:
    """A 2-D factor with its output axis scaled by ``row_scale`` (a number, or one value per output)."""
    if isinstance(row_scale, torch.Tensor):
        return w * row_scale.unsqueeze(1 - out_axis)
    return w * row_scale


def hadamard_delta(
    w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor, w2b: torch.Tensor, row_scale: float | torch.Tensor
) -> torch.Tensor:
    """``ΔW = diag(row_scale) · (w1a·w1b) ⊙ (w2a·w2b)``.

    w1a, w2a (out, r); w1b, w2b (r, n) -> (out, n). ``row_scale`` is ``s`` or an ``(out,)`` tensor (``s`` times
    the rank-dropout multipliers); it scales the small ``w1a`` rather than the full-size product.
    """
    w1a = scale_rows(w1a, row_scale, out_axis=0)
    return (w1a @ w1b) * (w2a @ w2b)  # (out, r) @ (r, n) ⊙ (out, r) @ (r, n) -> (out, n)


def hadamard_delta_cp(
    t1: torch.Tensor,
    w1a: torch.Tensor,
    w1b: torch.Tensor,
    t2: torch.Tensor,
    w2a: torch.Tensor,
    w2b: torch.Tensor,
    row_scale: float | torch.Tensor,
) -> torch.Tensor:
    """``ΔW = diag(row_scale) · W_1 ⊙ W_2`` with CP factors; w_ka (r, out) -> (out, in, *k)."""
    w1a = scale_rows(w1a, row_scale, out_axis=1)  # (r, out): output p is column p
    return cp_factor(t1, w1a, w1b) * cp_factor(t2, w2a, w2b)


# ------------------------------------------------------------------------------------------------------------
# Layer


class LoHaLayer(AdapterLayer):
    """LoHa on one Linear, transformers Conv1D, Conv1d or Conv2d module.

    Parameters use PEFT's names and layouts: ``hada_w1_a``/``hada_w2_a`` (out, r), ``hada_w1_b``/``hada_w2_b``
    (r, in/groups·prod(k)); with the CP form ``hada_t1``/``hada_t2`` (r, r, *k) and ``hada_w*_a`` (r, out),
    ``hada_w*_b`` (r, in/groups).
    """

    additive = True
    dense_term = True

    def __init__(self, base: nn.Module, config: LoHaConfig, name: str) -> None:
        super().__init__()
        self.kind = layer_kind(base)
        in_f, out_f = in_out_features(base)
        r = config.rank_for(name)
        check_rank(r, (base.weight.numel() // out_f, out_f), name, "loha")
        alpha = config.alpha_for(name)
        self.r, self.alpha, self.scale = r, alpha, alpha / r
        self.rank_dropout = float(config.rank_dropout)
        self.module_dropout = float(config.module_dropout)
        self.in_features, self.out_features = in_f, out_f
        dev = base.weight.device
        dt = working_dtype(base.weight.dtype)
        self.use_cp = False
        n_in = in_f
        if self.kind in ("conv1d", "conv2d"):
            kernel = tuple(base.kernel_size)
            n_in = in_f // base.groups
            # A 1-wide kernel has no spatial factor: PEFT keeps the flat form there, whatever the flag says.
            self.use_cp = bool(config.use_effective_conv2d) and math.prod(kernel) != 1
            core = kernel if self.kind == "conv2d" else (kernel[0], 1)
            if not self.use_cp:
                n_in = n_in * math.prod(kernel)
        self.delta_shape = (out_f,) + tuple(base.weight.shape[1:]) if self.kind != "conv1d_t" else (out_f, in_f)

        def param(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(shape, device=dev, dtype=dt))

        if self.use_cp:
            self.hada_w1_a, self.hada_w1_b = param(r, out_f), param(r, n_in)
            self.hada_w2_a, self.hada_w2_b = param(r, out_f), param(r, n_in)
            self.hada_t1, self.hada_t2 = param(r, r, *core), param(r, r, *core)
        else:
            self.hada_w1_a, self.hada_w1_b = param(out_f, r), param(r, n_in)
            self.hada_w2_a, self.hada_w2_b = param(out_f, r), param(r, n_in)
        self._init(config.init_weights)

    def _init(self, mode: bool) -> None:
        with torch.no_grad():
            for p in self._factors():
                kaiming_uniform_(p)
            if mode:
                nn.init.zeros_(self.hada_w2_b)

    def _factors(self) -> list[torch.Tensor]:
        """The factor tensors in ``_delta`` argument order."""
        ab = [self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b]
        return [self.hada_t1, *ab[:2], self.hada_t2, *ab[2:]] if self.use_cp else ab

    def _delta(self, *tensors: torch.Tensor) -> torch.Tensor:
        """ΔW (out, in[/g], *k) from ``_factors()`` and, in training with rank dropout, a row-scale tensor."""
        if len(tensors) == len(self._factors()) + 1:
            *factors, row_scale = tensors
        else:
            factors, row_scale = tensors, self.scale
        if self.use_cp:
            dw = hadamard_delta_cp(*factors, row_scale)  # (out, in, *core)
        else:
            dw = hadamard_delta(*factors, row_scale)  # (out, n)
        return dw.reshape(self.delta_shape)

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

    def adapted_forward(self, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if module_dropped(self.training, self.module_dropout):
            return base._la_base_forward(x)
        tensors = self._factors()
        dt = tensors[0].dtype
        if runs_own_kernel(base, x):
            # A quantized base whose input needs no gradient: its own kernel gives the base term exactly, then ΔW x.
            return separate_forward(base, self.kind, x, self._delta(*tensors))
        if self.training and self.rank_dropout > 0.0:
            keep = rank_dropout_multipliers(self.out_features, self.rank_dropout, True, dt, tensors[0].device)
            tensors = [*tensors, keep * self.scale]
        if self.kind in ("linear", "conv1d_t") and self._rank_r2_is_cheaper(x, grad_needed(base, x, tensors)):
            return self._forward_rank_r2(base, x, tensors)
        return delta_forward(base, self.kind, x, tensors, self._delta)

    def delta_output(self, base: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """``op(x, ΔW)``, the term ``adapted_forward`` adds (``None`` when module dropout skips the adapter)."""
        if module_dropped(self.training, self.module_dropout):
            return None
        tensors = self._factors()
        if self.training and self.rank_dropout > 0.0:
            dt = tensors[0].dtype
            keep = rank_dropout_multipliers(self.out_features, self.rank_dropout, True, dt, tensors[0].device)
            tensors = [*tensors, keep * self.scale]
        return delta_term(base, self.kind, x, self._delta(*tensors))

    def _rank_r2_is_cheaper(self, x: torch.Tensor, needs_grad: bool) -> bool:
        """Whether this layer runs the rank-``r²`` form rather than folding (``kernels.hadamard.rank_r2_pays``)."""
        return rank_r2_pays(self.r, self.in_features, self.out_features, x.numel() // x.shape[-1], needs_grad)

    def _forward_rank_r2(self, base: nn.Module, x: torch.Tensor, tensors: list[torch.Tensor]) -> torch.Tensor:
        """``base(x) + A (B x)`` with ``ΔW = A·B`` the Khatri-Rao form of the Hadamard product."""
        w1a = scale_rows(tensors[0], tensors[4] if len(tensors) > 4 else self.scale, out_axis=0)
        a, b = khatri_rao_factors(w1a, *tensors[1:4])
        return rank_r2_linear(base, x, a, b)

    # --- PEFT layout ---------------------------------------------------------------------------------------

    def peft_state(self) -> dict[str, torch.Tensor]:
        names = ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"] + (["hada_t1", "hada_t2"] if self.use_cp else [])
        return {n: getattr(self, n).detach() for n in names}

    def load_peft_state(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for k, v in state.items():
                p = getattr(self, k)
                p.copy_(v.to(dtype=p.dtype, device=p.device))

    def extra_repr(self) -> str:
        cp = ", cp" if self.use_cp else ""
        return f"{self.kind}, r={self.r}, scale={self.scale:g}{cp}, merged={self.merged}"


# ------------------------------------------------------------------------------------------------------------
# PEFT config translation


def _to_peft(cfg: LoHaConfig) -> dict[str, Any]:
    return {
        "peft_type": "LOHA",
        "r": cfg.r,
        "alpha": cfg.alpha,
        "rank_dropout": cfg.rank_dropout,
        "module_dropout": cfg.module_dropout,
        "use_effective_conv2d": cfg.use_effective_conv2d,
        "init_weights": cfg.init_weights,
        "rank_pattern": dict(cfg.rank_pattern),
        "alpha_pattern": dict(cfg.alpha_pattern),
        "layers_to_transform": cfg.layers_to_transform,
        "layers_pattern": cfg.layers_pattern,
    }


def _from_peft(d: dict[str, Any]) -> LoHaConfig:
    return LoHaConfig(
        r=d.get("r", 8),
        alpha=d.get("alpha", 8),
        rank_dropout=d.get("rank_dropout", 0.0) or 0.0,
        module_dropout=d.get("module_dropout", 0.0) or 0.0,
        use_effective_conv2d=bool(d.get("use_effective_conv2d", False)),
        init_weights=bool(d.get("init_weights", True)),
        rank_pattern=d.get("rank_pattern") or {},
        alpha_pattern=d.get("alpha_pattern") or {},
        **peft_layer_selection(d),
        target_modules=d.get("target_modules"),
        exclude_modules=d.get("exclude_modules"),
        modules_to_save=d.get("modules_to_save"),
    )


class LoHaMethod(LayerMethod):
    """LoHa in the registry."""

    name = "loha"
    config_cls = LoHaConfig
    peft_type = "LOHA"
    supported_types = LINEAR_TYPES + (nn.Conv1d, nn.Conv2d)
    create_layer = LoHaLayer
    config_to_peft = staticmethod(_to_peft)
    config_from_peft = staticmethod(_from_peft)


register(LoHaMethod())
