"""AdaLoRA: SVD-form low-rank updates whose ranks are reallocated during training by importance.

Maths (Zhang et al. 2023, "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning", ICLR). Every adapted
weight ``W (out, in)`` gets an update in singular-value form::

    ΔW = B · (A ⊙ E) · α / (ranknum + 1e-5),    A (r, in), E (r, 1), B (out, r),   r = init_r

``A`` and ``B`` play the right/left singular vectors and ``E`` the singular values; ``E = 0`` at init, so the
layer starts as the base. ``ranknum`` is fixed at ``init_r`` (PEFT's convention, kept so exported adapters give
the same outputs in PEFT): pruning a rank does not rescale the others. For ``nn.Conv2d`` ``A`` is
``(r, in·kh·kw)`` and ``ΔW`` is reshaped to the kernel ``(out, in, kh, kw)``.

Rank allocation. A triplet ``i`` is ``(A_i, E_i, B_{:,i})``. After every optimizer step, for every element ``w``
of A, E and B::

    I   = |w · ∂L/∂w|                       sensitivity
    Ī  ← β1·Ī + (1−β1)·I                    smoothed sensitivity
    Ū  ← β2·Ū + (1−β2)·|I − Ī|              uncertainty (with the new Ī)
    s   = Ī · Ū                              element score
    S_i = s(E_i) + mean_j s(A_ij) + mean_k s(B_ki)    triplet score

The budget (total kept triplets) falls from ``init_r·n`` to ``target_r·n`` (``n`` adapted matrices) on a cubic
curve between ``tinit`` and ``T − tfinal``::

    b(t) = init_b                                                  t ≤ tinit
    b(t) = ⌊(init_b − target_b)·(1 − (t − tinit)/(T − tfinal − tinit))³ + target_b⌋
    b(t) = target_b                                                t > T − tfinal

When masking, every ``E_i`` whose score is at most the ``(init_b − b)``-th smallest score over all matrices is
set to 0 (ties can prune a little more). Masking is soft: pruned ``E_i`` stay trainable and can come back,
until the final mask at ``t = T − tfinal``, which is re-applied after every later step. The orthogonal
regulariser ``R = mean over all A and B of ‖A Aᵀ − I‖_F and ‖Bᵀ B − I‖_F`` keeps A and B near-orthogonal;
``orth_reg_weight · R`` is added to the training loss.

In ``schedule="step"`` time ``t`` counts optimizer steps and masks happen every ``deltaT`` steps (PEFT's exact
schedule); in ``schedule="epoch"`` it counts completed epochs and masks happen at epoch ends. ``RankAllocator``
tracks importance and masks; ``AdaLoRASchedule`` is the whole run (sizing, both schedules, the regulariser, the
rank history, checkpoint state) behind the ``lightning_adapters.schedules.TrainingSchedule`` protocol, which the
Lightning integration drives and logs. A hand-written loop can use either (``allocator.step(t)`` after
``optimizer.step()`` and before ``zero_grad()`` is PEFT's ``update_and_allocate(t)``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_adapters.config import (
    AdapterConfig,
    check_choice,
    check_positive_float,
    check_positive_int,
    check_probability,
    pattern_dict,
    peft_bias,
    peft_layer_selection,
)
from lightning_adapters.core.dtypes import working_dtype
from lightning_adapters.core.inject import adapted_modules, find_records
from lightning_adapters.core.layer import AdapterLayer
from lightning_adapters.core.quant import quantized_base, runs_own_kernel
from lightning_adapters.core.targeting import LINEAR_TYPES
from lightning_adapters.errors import AdapterConfigError, AdapterStateError
from lightning_adapters.interop.peft_fields import check_peft_fields
from lightning_adapters.kernels.lowrank import fused_linear_applies, lowrank_linear
from lightning_adapters.kernels.quantized import quantized_lowrank_applies, quantized_lowrank_linear
from lightning_adapters.methods._common import add_delta_, check_rank, draw_, in_out_features, layer_kind
from lightning_adapters.registry import LayerMethod, register
from lightning_adapters.schedules import Heatmap, ScheduleReport

SCHEDULES = ("step", "epoch")
RANKNUM_EPS = 1e-5


@dataclass
class AdaLoRAConfig(AdapterConfig):
    """AdaLoRA hyper-parameters (PEFT's ``AdaLoraConfig`` names in brackets where they differ).

    Attributes:
        init_r: Rank every matrix starts with.
        target_r: Average rank per matrix at the end; the final budget is ``target_r × #matrices``.
        tinit: Warm-up length before any pruning (steps, or epochs with ``schedule="epoch"``).
        tfinal: Length of the final phase trained with the final mask (same unit).
        deltaT: Prune every ``deltaT`` steps (or epochs) during the cubic decay.
        beta1: EMA factor of the sensitivity, in (0, 1).
        beta2: EMA factor of the uncertainty, in (0, 1).
        orth_reg_weight: Weight of the orthogonal regulariser added to the training loss (0 turns it off).
        total_step: Schedule length: optimizer steps (``"step"``) or epochs (``"epoch"``). ``None`` takes it from
            the trainer (``estimated_stepping_batches`` or ``max_epochs``).
        alpha: Scaling numerator (``lora_alpha``); the update is scaled by ``alpha / init_r``.
        dropout: Dropout on the adapter's input (``lora_dropout``).
        init_weights: ``True``: ``E = 0``, ``A, B ~ N(0, 0.02)`` (identity at init); ``False``: all ``N(0, 1)``
            (``init_lora_weights``).
        schedule: ``"step"`` (PEFT's schedule in optimizer steps) or ``"epoch"`` (one reallocation per epoch end,
            the budget decaying across epochs).
        rank_pattern: ``{module name: [keep flags] * init_r}``: ranks already pruned (filled from a PEFT
            ``rank_pattern`` by ``load_peft``); usually left empty.
        bias: Train base biases too, as PEFT's ``bias``: ``"none"``, ``"all"`` (every bias in the model) or
            ``"lora_only"`` (the biases of the adapted modules). They are saved with the adapter; merging, ejecting or
            ``disabled()`` does not undo their training.
    """

    init_r: int = 12
    target_r: int = 8
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    alpha: float = 8.0
    dropout: float = 0.0
    init_weights: bool = True
    schedule: str = "step"
    rank_pattern: dict[str, list[bool]] = field(default_factory=dict)
    bias: str = "none"

    def __post_init__(self) -> None:
        super().__post_init__()
        m = "adalora"
        check_choice(self.bias, "bias", m, ("none", "all", "lora_only"))
        check_positive_int(self.init_r, "init_r", m)
        check_positive_int(self.target_r, "target_r", m)
        if self.target_r > self.init_r:
            raise AdapterConfigError(
                f"{m}: target_r={self.target_r} is larger than init_r={self.init_r}; ranks are only ever pruned, "
                f"so set target_r <= init_r (or raise init_r)"
            )
        check_positive_int(self.tinit, "tinit", m, allow_zero=True)
        check_positive_int(self.tfinal, "tfinal", m, allow_zero=True)
        check_positive_int(self.deltaT, "deltaT", m)
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 < v < 1.0):
                raise AdapterConfigError(f"{m}: {name} must be strictly between 0 and 1 (e.g. 0.85), got {v!r}")
        check_positive_float(self.orth_reg_weight, "orth_reg_weight", m, allow_zero=True)
        if self.total_step is not None:
            check_positive_int(self.total_step, "total_step", m)
            check_schedule(self.tinit, self.tfinal, self.total_step, self.schedule)
        check_positive_float(self.alpha, "alpha", m)
        check_probability(self.dropout, "dropout", m)
        check_choice(self.init_weights, "init_weights", m, (True, False))
        check_choice(self.schedule, "schedule", m, SCHEDULES)
        self.rank_pattern = pattern_dict(self.rank_pattern, "rank_pattern", m, regex_keys=False)
        for k, v in self.rank_pattern.items():
            flags = list(v)
            if len(flags) != self.init_r or not all(isinstance(f, bool) for f in flags):
                raise AdapterConfigError(
                    f"{m}: rank_pattern[{k!r}] must be a list of init_r={self.init_r} booleans, got {v!r}"
                )
            self.rank_pattern[k] = flags


def check_schedule(tinit: int, tfinal: int, total: int, schedule: str) -> None:
    """Raise unless the budget has room to decay: ``tinit + tfinal < total``."""
    if tinit + tfinal >= total:
        unit = "optimizer steps" if schedule == "step" else "epochs"
        raise AdapterConfigError(
            f"adalora: impossible schedule tinit={tinit} + tfinal={tfinal} >= total_step={total} ({unit}); "
            f"the rank budget needs tinit + tfinal < total_step: lower tinit/tfinal or train longer"
        )


# ------------------------------------------------------------------------------------------------------------
# Pure functions


def budget_schedule(
    t: int, init_budget: int, target_budget: int, tinit: int, tfinal: int, total: int, delta_t: int
) -> tuple[int, bool]:
    """The budget at time ``t`` and whether the cubic phase masks at ``t`` (every ``delta_t``)."""
    if t <= tinit:
        return init_budget, False
    if t > total - tfinal:
        return target_budget, True
    frac = 1 - (t - tinit) / (total - tfinal - tinit)
    return int((init_budget - target_budget) * (frac**3) + target_budget), t % delta_t == 0


def update_importance(
    sensitivity: torch.Tensor, ema: torch.Tensor, unc: torch.Tensor, beta1: float, beta2: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One EMA step: new smoothed sensitivity ``Ī`` and uncertainty ``Ū`` (all tensors shaped like the weight)."""
    ema = beta1 * ema + (1 - beta1) * sensitivity
    unc = beta2 * unc + (1 - beta2) * (sensitivity - ema).abs()
    return ema, unc


def triplet_scores(score_a: torch.Tensor, score_e: torch.Tensor, score_b: torch.Tensor) -> torch.Tensor:
    """``S_i = s(E_i) + mean_j s(A_ij) + mean_k s(B_ki)``: A (r, in), E (r, 1), B (out, r) -> (r,)."""
    a = score_a.mean(dim=1)  # (r,)
    b = score_b.mean(dim=0)  # (r,)
    return score_e.view(-1) + (a + b)


def masks_for_budget(scores: dict[str, torch.Tensor], n_prune: int) -> dict[str, torch.Tensor]:
    """Keep masks ``{name: bool (r,)}`` pruning the ``n_prune`` lowest triplet scores over all matrices.

    Every score at most the ``n_prune``-th smallest is pruned, so ties prune more than ``n_prune``.
    """
    if n_prune <= 0:
        return {k: torch.ones_like(v, dtype=torch.bool) for k, v in scores.items()}
    threshold = torch.kthvalue(torch.cat([v.view(-1) for v in scores.values()]), k=n_prune)[0].item()
    return {k: ~(v <= threshold) for k, v in scores.items()}


def orthogonal_regularizer(layers: list[AdaLoRALayer]) -> torch.Tensor:
    """``mean over every A and B of ‖A Aᵀ − I‖_F and ‖Bᵀ B − I‖_F`` (both Gram matrices r×r)."""
    total = None
    n = 0
    for layer in layers:
        for gram in (layer.lora_A @ layer.lora_A.T, layer.lora_B.T @ layer.lora_B):  # (r, r)
            eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
            term = torch.norm(gram - eye, p="fro")
            total = term if total is None else total + term
            n += 1
    return total / n


def module_name_from_peft_key(key: str) -> str:
    """``"model.x.q_proj.lora_E"`` or ``"...lora_E.<adapter>"`` (PEFT's rank_pattern keys) -> ``"model.x.q_proj"``."""
    m = re.fullmatch(r"(.+)\.lora_E(\.[^.]+)?", key)
    if m is None:
        raise AdapterConfigError(f"adalora: rank_pattern key {key!r} is not PEFT's '<module>.lora_E' form")
    return m.group(1)


# ------------------------------------------------------------------------------------------------------------
# Layer


class AdaLoRALayer(AdapterLayer):
    """AdaLoRA's SVD-form update on one ``nn.Linear``, transformers ``Conv1D`` or ``nn.Conv2d``.

    Parameters in PEFT's layouts: ``lora_A`` (r, in[·kh·kw]), ``lora_E`` (r, 1), ``lora_B`` (out, r), with
    ``r = init_r``; buffers ``rank_mask`` (r,) bool (kept ranks, saved) and ``ranknum`` (1,) = init_r (not saved).
    """

    additive = True

    def __init__(self, base: nn.Module, config: AdaLoRAConfig, name: str) -> None:
        super().__init__()
        self.kind = layer_kind(base)
        in_f, out_f = in_out_features(base)
        if self.kind == "conv2d":
            if base.groups != 1:
                raise AdapterConfigError(
                    f"adalora: Conv2d {name!r} has groups={base.groups}; AdaLoRA's A (r, in·kh·kw) needs groups=1, "
                    f"so exclude this module (exclude_modules=[{name.rsplit('.', 1)[-1]!r}])"
                )
            in_f = in_f * base.kernel_size[0] * base.kernel_size[1]
        r = config.init_r
        check_rank(r, (in_f, out_f), name, "adalora", "init_r")
        self.r, self.alpha = r, float(config.alpha)
        self.dropout_p = float(config.dropout)
        dev = base.weight.device
        dt = working_dtype(base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(r, in_f, device=dev, dtype=dt))
        self.lora_B = nn.Parameter(torch.empty(out_f, r, device=dev, dtype=dt))
        self.lora_E = nn.Parameter(torch.empty(r, 1, device=dev, dtype=dt))
        with torch.no_grad():
            if config.init_weights:
                draw_(self.lora_A, nn.init.normal_, mean=0.0, std=0.02)
                draw_(self.lora_B, nn.init.normal_, mean=0.0, std=0.02)
                nn.init.zeros_(self.lora_E)
            else:
                for p in (self.lora_A, self.lora_B, self.lora_E):
                    draw_(p, nn.init.normal_)
        keep = torch.tensor(config.rank_pattern.get(name, [True] * r), dtype=torch.bool, device=dev)
        self.register_buffer("rank_mask", keep)
        with torch.no_grad():
            self.lora_E.masked_fill_(~keep.view(-1, 1), 0.0)  # ranks pruned by the pattern start empty
        self.register_buffer("ranknum", torch.full((1,), float(r), device=dev, dtype=dt), persistent=False)

    # --- weight-space form -------------------------------------------------------------------------------

    def _svd_product(self) -> torch.Tensor:
        """``B (out, r) @ (A ⊙ E) (r, in) · α / (ranknum + ε)`` -> (out, in[·kh·kw])."""
        return self.lora_B @ (self.lora_A * self.lora_E) * self.alpha / (self.ranknum + RANKNUM_EPS)

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        """ΔW in the base weight's own layout: (out, in), (in, out) for Conv1D, (out, in, kh, kw) for Conv2d."""
        dw = self._svd_product()
        if self.kind == "conv1d_t":
            return dw.t()
        return dw.reshape(base.weight.shape)

    def additive_delta(self, base: nn.Module) -> torch.Tensor:
        return self.delta_weight(base)

    def merge(self, base: nn.Module, *, safe: bool = False) -> None:
        with torch.no_grad():
            add_delta_(base.weight, self.delta_weight(base), safe=safe)
        self.merged = True

    def unmerge(self, base: nn.Module) -> None:
        with torch.no_grad():
            add_delta_(base.weight, self.delta_weight(base), sign=-1.0)
        self.merged = False

    # --- forward -----------------------------------------------------------------------------------------

    def adapted_forward(self, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
        real = quantized_base(base)
        if real is not None:
            if not runs_own_kernel(base, x) and quantized_lowrank_applies(x, self.lora_A):
                # Training on a quantized base: W dequantized inside one Function, in forward and in backward.
                xd = F.dropout(x, self.dropout_p, True) if self.dropout_p > 0.0 and self.training else None
                scale = self.alpha / (self.r + RANKNUM_EPS)  # ranknum is init_r, fixed
                return quantized_lowrank_linear(x, xd, base.bias, self.lora_A * self.lora_E, self.lora_B, scale, real)
        elif self.kind != "conv2d" and fused_linear_applies(x, base.weight, self.lora_A):
            # The low-rank kernel with A' = A ⊙ E (autograd splits ∂A' into ∂A and ∂E): the scale folded
            # into the base weight or applied to the rank-r factor, rank-r products thin side first.
            weight = base.weight.t() if self.kind == "conv1d_t" else base.weight  # (out, in)
            xd = F.dropout(x, self.dropout_p, True) if self.dropout_p > 0.0 and self.training else None
            scale = self.alpha / (self.r + RANKNUM_EPS)  # ranknum is init_r, fixed
            return lowrank_linear(x, xd, weight, base.bias, self.lora_A * self.lora_E, self.lora_B, scale)
        out = base._la_base_forward(x)
        xd = x if x.dtype == self.lora_A.dtype else x.to(self.lora_A.dtype)
        if self.dropout_p > 0.0 and self.training:
            xd = F.dropout(xd, self.dropout_p, True)
        if self.kind == "conv2d":
            dw = self._svd_product().reshape(base.weight.shape)  # (out, in, kh, kw)
            # The base's own conv call, so padding_mode (reflect/replicate/circular) and string padding hold too.
            delta = base._conv_forward(xd, dw, None)
        else:
            # Same operations and rounding as PEFT, so training runs match it bit for bit; the scale and the sum
            # are applied in place (the same arithmetic without two output-sized temporaries).
            h = xd @ (self.lora_A * self.lora_E).T  # (..., r)
            delta = (h @ self.lora_B.T).mul_(self.alpha).div_(self.ranknum + RANKNUM_EPS)  # (..., out)
        # Added in place in the promoted dtype and rounded once: PEFT's ``result +=``, bit for bit on half bases.
        return out.add_(delta)  # no backward reads ``out``: linear and conv keep their inputs

    def delta_output(self, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``B (A ⊙ E) x · α / (ranknum + ε)``: the term ``adapted_forward`` adds."""
        xd = x if x.dtype == self.lora_A.dtype else x.to(self.lora_A.dtype)
        if self.dropout_p > 0.0 and self.training:
            xd = F.dropout(xd, self.dropout_p, True)
        if self.kind == "conv2d":
            return base._conv_forward(xd, self._svd_product().reshape(base.weight.shape), None)
        h = xd @ (self.lora_A * self.lora_E).T  # (..., r)
        return (h @ self.lora_B.T) * self.alpha / (self.ranknum + RANKNUM_EPS)  # (..., out)

    # --- rank masks --------------------------------------------------------------------------------------

    def apply_mask(self, keep: torch.Tensor) -> None:
        """Record ``keep`` (r,) bool as the kept ranks and zero the singular values of the others."""
        with torch.no_grad():
            self.rank_mask.copy_(keep.to(self.rank_mask.device))
            self.lora_E.masked_fill_(_like(self.lora_E, ~self.rank_mask.view(-1, 1)), 0.0)

    @property
    def kept_rank(self) -> int:
        """Number of kept triplets."""
        return int(self.rank_mask.sum())

    # --- PEFT layout: tensors sliced to the exported ranks ------------------------------------------------

    def export_mask(self) -> torch.Tensor:
        """Ranks an export holds (r,) bool: the kept ones, and pruned ones whose ``E`` is not 0.

        Masking is soft, so a pruned ``E_i`` regrows between masks and the forward uses it; exporting only the
        kept ranks would give PEFT another adapter than the one in memory. The ``rank_pattern`` written with the
        export is this mask, so the file, PEFT's model and ``load_peft``'s model all equal the model in memory.
        """
        return self.rank_mask | (_full(self.lora_E.detach()).reshape(-1) != 0)

    def peft_state(self) -> dict[str, torch.Tensor]:
        keep = self.export_mask()
        return {
            "lora_A": _full(self.lora_A.detach())[keep],
            "lora_B": _full(self.lora_B.detach())[:, keep],
            "lora_E": _full(self.lora_E.detach())[keep],
        }

    def peft_shapes(self) -> dict[str, tuple[int, ...]]:
        k = int(self.export_mask().sum())
        return {"lora_A": (k, self.lora_A.shape[1]), "lora_B": (self.lora_B.shape[0], k), "lora_E": (k, 1)}

    def load_peft_state(self, state: dict[str, torch.Tensor]) -> None:
        keep = self.rank_mask
        with torch.no_grad():
            for p in (self.lora_A, self.lora_B, self.lora_E):
                p.zero_()
            self.lora_A[keep] = state["lora_A"].to(dtype=self.lora_A.dtype, device=self.lora_A.device)
            self.lora_B[:, keep] = state["lora_B"].to(dtype=self.lora_B.dtype, device=self.lora_B.device)
            self.lora_E[keep] = state["lora_E"].to(dtype=self.lora_E.dtype, device=self.lora_E.device)

    def extra_repr(self) -> str:
        return f"{self.kind}, init_r={self.r}, kept={self.kept_rank}, alpha={self.alpha:g}, merged={self.merged}"


def adalora_layers(model: nn.Module, adapter: str | None = None) -> dict[str, AdaLoRALayer]:
    """``{module name: layer}`` of every AdaLoRA layer in ``model`` (of adapter ``adapter`` only), in module order.

    Without ``adapter``, a model holding several AdaLoRA adapters gives the layers of one of them per module: pass
    the adapter's name there.
    """
    names = None if adapter is None else [adapter]
    return {name: layer for name, _, layer in adapted_modules(model, names) if isinstance(layer, AdaLoRALayer)}


def rank_pattern(model: nn.Module, adapter: str | None = None) -> dict[str, list[bool]]:
    """The kept-rank flags of every AdaLoRA matrix, ``{module name: [bool] * init_r}`` (of ``adapter`` only)."""
    return {name: layer.rank_mask.tolist() for name, layer in adalora_layers(model, adapter).items()}


# ------------------------------------------------------------------------------------------------------------
# Rank allocation


class RankAllocator:
    """Importance tracking and budget masking over every AdaLoRA layer of a model.

    In a hand-written loop call ``step(t)`` after ``optimizer.step()`` and before ``zero_grad()`` (it reads
    ``.grad``), with ``t`` the 0-based optimizer step: this is PEFT's ``update_and_allocate`` schedule.

    Args:
        model: The injected model.
        config: Its ``AdaLoRAConfig``.
        total: Schedule length (defaults to ``config.total_step``).
        adapter: The adapter whose layers are allocated, in a model holding several (``None``: every AdaLoRA layer).

    Attributes:
        init_budget: ``init_r × #matrices``.
        target_budget: ``target_r × #matrices``.
        final_pattern: The final keep masks once the final mask was taken (re-applied after every later step).
        last_pattern: The masks of the latest allocation (``None`` before the first).
    """

    def __init__(
        self, model: nn.Module, config: AdaLoRAConfig, total: int | None = None, *, adapter: str | None = None
    ) -> None:
        self.model = model
        self.config = config
        self.layers = adalora_layers(model, adapter)
        if not self.layers:
            raise AdapterConfigError("adalora: the model has no AdaLoRA layers; inject an AdaLoRAConfig first")
        self.total = total if total is not None else config.total_step
        if self.total is None:
            raise AdapterConfigError("adalora: total_step is unknown; pass total= or set AdaLoRAConfig.total_step")
        check_schedule(config.tinit, config.tfinal, self.total, config.schedule)
        self.init_budget = sum(layer.r for layer in self.layers.values())
        self.target_budget = config.target_r * len(self.layers)
        self.final_pattern: dict[str, torch.Tensor] | None = None
        self.last_pattern: dict[str, torch.Tensor] | None = None
        self.updates = 0
        self.reset_importance()

    def reset_importance(self) -> None:
        """Forget the smoothed sensitivity and uncertainty."""
        self.ema: dict[str, dict[str, torch.Tensor]] = {}
        self.unc: dict[str, dict[str, torch.Tensor]] = {}

    def budget(self, t: int) -> tuple[int, bool]:
        """``budget_schedule`` with this allocator's sizes and config."""
        c = self.config
        return budget_schedule(t, self.init_budget, self.target_budget, c.tinit, c.tfinal, self.total, c.deltaT)

    def update_importance(self) -> None:
        """Fold the current ``|w · ∇w|`` of every A, E and B into the EMAs (a missing gradient counts as 0)."""
        with torch.no_grad():
            for name, layer in self.layers.items():
                ema = self.ema.setdefault(name, {})
                unc = self.unc.setdefault(name, {})
                for pname in ("lora_A", "lora_B", "lora_E"):
                    p = getattr(layer, pname)
                    grad = p.grad if p.grad is not None else torch.zeros_like(p)
                    sens = (p * grad).abs()
                    if pname not in ema:
                        ema[pname] = torch.zeros_like(p)
                        unc[pname] = torch.zeros_like(p)
                    ema[pname], unc[pname] = update_importance(
                        sens, ema[pname], unc[pname], self.config.beta1, self.config.beta2
                    )
        self.updates += 1

    def scores(self) -> dict[str, torch.Tensor]:
        """Triplet scores ``{name: (r,)}``; identical on every rank under ``torch.distributed`` (rank 0's)."""
        out = {}
        for name, layer in self.layers.items():
            if name not in self.ema:
                out[name] = torch.zeros(layer.r, dtype=layer.lora_E.dtype, device=layer.lora_E.device)
                continue
            s = {k: self.ema[name][k] * self.unc[name][k] for k in self.ema[name]}
            out[name] = _full(triplet_scores(s["lora_A"], s["lora_E"], s["lora_B"]))
        return _broadcast_from_rank0(out)

    def allocate(self, budget: int) -> dict[str, torch.Tensor]:
        """Mask every layer down to ``budget`` kept triplets (more with ties); returns the keep masks."""
        masks = masks_for_budget(self.scores(), self.init_budget - budget)
        self.apply(masks)
        self.last_pattern = masks
        return masks

    def apply(self, masks: dict[str, torch.Tensor]) -> None:
        """Apply keep masks to the layers (zeroing the pruned singular values)."""
        for name, keep in masks.items():
            self.layers[name].apply_mask(keep)

    def finalize(self) -> dict[str, torch.Tensor]:
        """Take the final mask at ``target_budget`` and reset the importance (PEFT's step ``T − tfinal``)."""
        masks = self.allocate(self.target_budget)
        self.final_pattern = masks
        self.reset_importance()
        return masks

    def step(self, t: int) -> tuple[int, dict[str, torch.Tensor] | None]:
        """PEFT's ``update_and_allocate(t)`` (``t`` = 0-based optimizer step); returns ``(budget, masks or None)``.

        One deviation: if step ``T − tfinal`` was never seen (e.g. a run resumed past it without allocator
        state), the first later step takes the final mask instead of reusing a stale one.
        """
        cut = self.total - self.config.tfinal
        if t < cut:
            self.update_importance()
            budget, now = self.budget(t)
            return budget, self.allocate(budget) if now else None
        if self.final_pattern is None:
            return self.target_budget, self.finalize()
        self.apply(self.final_pattern)
        return self.target_budget, None

    def state_dict(self) -> dict[str, Any]:
        """EMAs, masks and counters, for checkpoints."""

        def masks(p: dict[str, torch.Tensor] | None) -> dict[str, list[bool]] | None:
            return None if p is None else {k: v.tolist() for k, v in p.items()}

        return {
            "ema": {n: {k: v.detach().clone() for k, v in d.items()} for n, d in self.ema.items()},
            "unc": {n: {k: v.detach().clone() for k, v in d.items()} for n, d in self.unc.items()},
            "final_pattern": masks(self.final_pattern),
            "last_pattern": masks(self.last_pattern),
            "rank_mask": {n: layer.rank_mask.tolist() for n, layer in self.layers.items()},
            "updates": self.updates,
            "total": self.total,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of ``state_dict``; the layer names, flags and shapes must be this model's (checked first).

        Raises:
            AdapterStateError: A missing entry, other layer names, flags that are not ``init_r`` 0/1 values, or
                importance tensors of another shape; nothing is changed.
        """
        fields = ("ema", "unc", "final_pattern", "last_pattern", "rank_mask", "updates", "total")
        missing = [f for f in fields if f not in state] if isinstance(state, dict) else list(fields)
        if missing:
            raise AdapterStateError(
                f"adalora: allocator state lacks {missing}; resume from a checkpoint the AdaLoRA hooks wrote"
            )
        names = set(state["rank_mask"])
        if names != set(self.layers):
            raise AdapterStateError(
                f"adalora: allocator state is for modules {sorted(names)[:6]}, the model has "
                f"{sorted(self.layers)[:6]}; resume with the same model and target_modules"
            )
        problems = []
        for where in ("rank_mask", "final_pattern", "last_pattern"):
            for n, flags in (state.get(where) or {}).items():
                ok = n in self.layers and isinstance(flags, (list, tuple)) and len(flags) == self.layers[n].r
                if not ok or not all(f in (0, 1) for f in flags):
                    problems.append(
                        f"{where}[{n!r}]={flags!r:.60} (want {self.layers[n].r if n in self.layers else '?'} 0/1 flags)"
                    )
        for where in ("ema", "unc"):
            for n, sub in state[where].items():
                for k, v in sub.items():
                    want = getattr(self.layers[n], k, None) if n in self.layers else None
                    if not isinstance(v, torch.Tensor) or want is None or tuple(v.shape) != tuple(want.shape):
                        problems.append(f"{where}[{n!r}][{k!r}] does not fit the layer's {k}")
        if problems:
            raise AdapterStateError(
                f"adalora: allocator state does not fit the model: {'; '.join(problems[:6])}; resume from a "
                "checkpoint written for this model and config"
            )

        def to_dev(d: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
            return {n: {k: v.to(getattr(self.layers[n], k).device) for k, v in sub.items()} for n, sub in d.items()}

        def masks(p: dict[str, list[bool]] | None) -> dict[str, torch.Tensor] | None:
            if p is None:
                return None
            return {k: torch.tensor(v, dtype=torch.bool) for k, v in p.items()}

        self.ema, self.unc = to_dev(state["ema"]), to_dev(state["unc"])
        self.final_pattern = masks(state["final_pattern"])
        self.last_pattern = masks(state["last_pattern"])
        self.updates = int(state["updates"])
        self.total = int(state["total"])
        with torch.no_grad():
            for n, flags in state["rank_mask"].items():
                self.layers[n].rank_mask.copy_(torch.tensor(flags, dtype=torch.bool))


def _full(t: torch.Tensor) -> torch.Tensor:
    # Under FSDP2 the scores come from sharded parameters (DTensors): every rank needs all of them.
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _like(param: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # A full mask laid out as ``param`` is (its shard of rows under FSDP2), for in-place masking.
    if hasattr(param, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(mask, param.device_mesh, param.placements)
    return mask


def _broadcast_from_rank0(scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Under an initialised process group, replace every rank's scores by rank 0's (so masks agree exactly)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return scores
    names = list(scores)
    flat = torch.cat([scores[n].reshape(-1) for n in names]).contiguous()  # (sum of r,)
    dist.broadcast(flat, src=0)
    out, i = {}, 0
    for n in names:
        k = scores[n].numel()
        out[n] = flat[i : i + k].view_as(scores[n])
        i += k
    return out


# ------------------------------------------------------------------------------------------------------------
# The whole training run


def resolve_total(config: AdaLoRAConfig, length: float | None) -> int:
    """The schedule length: ``config.total_step``, else the run's ``length`` (optimizer steps or epochs).

    Raises:
        AdapterConfigError: ``total_step`` is None and ``length`` is unknown or unbounded, naming what to set.
    """
    if config.total_step is not None:
        return int(config.total_step)
    if config.schedule == "step":
        if length is None or not math.isfinite(length):
            raise AdapterConfigError(
                "adalora: total_step=None but the trainer's number of optimizer steps is unbounded; "
                "set Trainer(max_epochs=...) or max_steps, or AdaLoRAConfig.total_step"
            )
        return int(length)
    if length is None or length < 0:
        raise AdapterConfigError(
            "adalora: schedule='epoch' with total_step=None needs Trainer(max_epochs=N); "
            "or set AdaLoRAConfig.total_step to the number of epochs"
        )
    return int(length)


def rank_history_table(names: list[str], history: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """Columns ``[t, global_step, budget, kept, <module>...]`` and one row per reallocation."""
    columns = ["t", "global_step", "budget", "kept", *names]
    rows = [[h["t"], h["global_step"], h["budget"], sum(h["ranks"]), *h["ranks"]] for h in history]
    return columns, rows


class AdaLoRASchedule:
    """AdaLoRA over a whole run: sizing, the step or epoch schedule, the regulariser, rank history and state.

    It implements ``lightning_adapters.schedules.TrainingSchedule`` (the method's ``training_hooks``): the Lightning
    integration builds one per fit, calls ``start`` with the trainer's number of optimizer steps (``"step"``) or
    epochs (``"epoch"``) when ``total_step`` is None, adds ``loss_term()`` to every training loss, calls
    ``after_optimizer_step`` once per optimizer step (gradient accumulation counted right) and ``after_epoch`` at
    every epoch end, and logs what they return and ``report()``. A run too short for ``tinit + tfinal``
    (``fast_dev_run``, a one-epoch smoke test) trains without reallocation; ``start`` returns a notice saying so.

    Args:
        model: The module ``inject`` was called on with an ``AdaLoRAConfig``.
        config: That config.
        adapter: The adapter trained, in a model holding several (``None``: every AdaLoRA layer).

    Attributes:
        allocator: The ``RankAllocator`` (created by ``start``; None in a run without reallocation).
        reallocate: Whether this run reallocates ranks (False when it is too short).
        history: One entry per reallocation: ``{"t", "global_step", "budget", "ranks"}`` (``ranks`` in the order of
            ``names``).
        names: Module names of the adapted matrices.
        last_epoch: The last epoch end seen (epoch mode; a resumed run may reach the same end twice).
    """

    def __init__(self, model: nn.Module, config: AdaLoRAConfig, adapter: str | None = None) -> None:
        self.model = model
        self.config = config
        self.adapter = adapter
        self.names = list(adalora_layers(model, adapter))
        if not self.names:
            raise AdapterConfigError("adalora: the model has no AdaLoRA layers; inject an AdaLoRAConfig first")
        self.allocator: RankAllocator | None = None
        self.reallocate = True
        self.history: list[dict[str, Any]] = []
        self.last_epoch = 0
        self._pending: dict[str, Any] | None = None

    @property
    def length_unit(self) -> str | None:
        """``"optimizer_steps"`` or ``"epochs"``: what ``start`` needs; None when ``total_step`` is set."""
        if self.config.total_step is not None:
            return None
        return "optimizer_steps" if self.config.schedule == "step" else "epochs"

    def start(self, length: float | None = None) -> str | None:
        """Size the schedule for a run of ``length`` optimizer steps or epochs; a notice if it is too short.

        Raises:
            AdapterConfigError: The length is needed and unknown, or the schedule does not fit ``total_step``.
        """
        cfg = self.config
        total = resolve_total(cfg, length)
        if cfg.total_step is None and cfg.tinit + cfg.tfinal >= total:
            # A run the trainer made too short for the schedule (fast_dev_run, a smoke test, one epoch): it still
            # trains, at the initial rank; an explicit total_step was validated with the config.
            self.reallocate = False
            unit = ("optimizer step" if cfg.schedule == "step" else "epoch") + ("" if total == 1 else "s")
            return (
                f"adalora: this run has {total} {unit}, too few for tinit={cfg.tinit} + tfinal={cfg.tfinal}; "
                f"training without rank reallocation (every layer keeps init_r={cfg.init_r})"
            )
        self.reallocate = True
        check_schedule(cfg.tinit, cfg.tfinal, total, cfg.schedule)
        if self.allocator is None:
            self.allocator = RankAllocator(self.model, cfg, total, adapter=self.adapter)
        self.allocator.total = total
        if self._pending is not None:
            self._apply_state(self._pending)
            self._pending = None
        recs = [rec for _, _, rec in find_records(self.model) if self.adapter in (None, rec.name)]
        if recs and cfg.schedule == "step":
            # save_peft writes the resolved schedule length when the config left it to the trainer.
            recs[0].resolved_peft_fields["total_step"] = total
        return None

    def _require(self) -> RankAllocator:
        if self.allocator is None:
            raise AdapterStateError("adalora: the schedule was used before start(length) was called")
        return self.allocator

    @property
    def rank_pattern(self) -> dict[str, list[bool]]:
        """The current keep flags of every adapted matrix."""
        return rank_pattern(self.model, self.adapter)

    def loss_term(self) -> torch.Tensor | None:
        """``orth_reg_weight · R_orth`` (None when the weight is 0)."""
        w = self.config.orth_reg_weight
        if w == 0:
            return None
        return w * orthogonal_regularizer(list(adalora_layers(self.model, self.adapter).values()))

    def after_optimizer_step(self, step: int, global_step: int | None = None) -> dict[str, float] | None:
        """Importance update and, in step mode, PEFT's masking at ``step``; the allocation's metrics, if any.

        Args:
            step: The 0-based optimizer step that just ran (gradients still present).
            global_step: The loop's step counter to record in the history (default ``step``).
        """
        if not self.reallocate:
            return None
        alloc = self._require()
        if self.config.schedule == "step":
            budget, masks = alloc.step(step)
            return None if masks is None else self._record(step, step if global_step is None else global_step, budget)
        if alloc.final_pattern is None:
            alloc.update_importance()
        else:
            alloc.apply(alloc.final_pattern)
        return None

    def after_epoch(self, epoch: int, global_step: int | None = None) -> dict[str, float] | None:
        """In epoch mode the one reallocation after ``epoch`` completed epochs; its metrics, if any.

        Idempotent per epoch: a resumed run may reach the same epoch end twice.
        """
        if not self.reallocate or self.config.schedule != "epoch":
            return None
        alloc = self._require()
        if epoch <= self.last_epoch:
            return None
        self.last_epoch = epoch
        if alloc.final_pattern is not None:
            return None
        at = epoch if global_step is None else global_step
        if epoch >= alloc.total - self.config.tfinal:
            alloc.finalize()
            return self._record(epoch, at, alloc.target_budget)
        budget, now = alloc.budget(epoch)
        if not now:
            return None
        alloc.allocate(budget)
        return self._record(epoch, at, budget)

    def _record(self, t: int, global_step: int, budget: int) -> dict[str, float]:
        layers = adalora_layers(self.model, self.adapter)
        ranks = [layers[n].kept_rank for n in self.names]
        self.history.append({"t": int(t), "global_step": int(global_step), "budget": int(budget), "ranks": ranks})
        metrics = {"adalora/budget": float(budget), "adalora/kept": float(sum(ranks))}
        metrics.update({f"adalora/rank/{n}": float(r) for n, r in zip(self.names, ranks)})
        return metrics

    def report(self) -> ScheduleReport | None:
        """The rank history: a table (one row per reallocation) and a heatmap of kept rank, layers × reallocations."""
        if not self.history:
            return None
        columns, rows = rank_history_table(self.names, self.history)
        heatmap = Heatmap(
            values=[[float(h["ranks"][i]) for h in self.history] for i in range(len(self.names))],
            row_labels=list(self.names),
            column_labels=[str(h["t"]) for h in self.history],
            vmax=float(self.config.init_r),
            title="AdaLoRA kept rank per matrix",
            xlabel="reallocation (t)",
            colorbar="kept rank",
        )
        return ScheduleReport("adalora/ranks", columns, rows, "adalora/rank_heatmap", heatmap)

    def state_dict(self) -> dict[str, Any]:
        """EMAs, masks, counters and history, so a resumed run continues exactly."""
        if self.allocator is None and self._pending is not None:
            return self._pending  # resumed into a run without reallocation: keep the loaded state as it was
        return {
            "allocator": None if self.allocator is None else self.allocator.state_dict(),
            "history": [dict(h, ranks=list(h["ranks"])) for h in self.history],
            "last_epoch": self.last_epoch,
            "names": list(self.names),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of ``state_dict``, before or after ``start``.

        Raises:
            AdapterStateError: The state is for other modules.
        """
        if list(state.get("names", [])) != self.names:
            raise AdapterStateError(
                f"adalora: the checkpoint's AdaLoRA state is for modules {state.get('names', [])[:6]}, this model "
                f"has {self.names[:6]}; resume with the same model and target_modules"
            )
        if self.allocator is None:
            self._pending = state
        else:
            self._apply_state(state)

    def _apply_state(self, state: dict[str, Any]) -> None:
        alloc = self._require()
        total = alloc.total
        if state["allocator"] is not None:
            alloc.load_state_dict(state["allocator"])
            alloc.total = total
        self.history = [dict(h, ranks=list(h["ranks"])) for h in state["history"]]
        self.last_epoch = int(state["last_epoch"])


# ------------------------------------------------------------------------------------------------------------
# PEFT config translation


def _to_peft(cfg: AdaLoRAConfig) -> dict[str, Any]:
    total = cfg.total_step if cfg.total_step is not None else cfg.tinit + cfg.tfinal + 1
    return {
        "peft_type": "ADALORA",
        "init_r": cfg.init_r,
        "target_r": cfg.target_r,
        "tinit": cfg.tinit,
        "tfinal": cfg.tfinal,
        "deltaT": cfg.deltaT,
        "beta1": cfg.beta1,
        "beta2": cfg.beta2,
        "orth_reg_weight": cfg.orth_reg_weight,
        "total_step": total,
        "r": 8,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "init_lora_weights": cfg.init_weights,
        "rank_pattern": None,
        "layers_to_transform": cfg.layers_to_transform,
        "layers_pattern": cfg.layers_pattern,
        "bias": cfg.bias,
        "fan_in_fan_out": False,
        "use_dora": False,
    }


def _peft_config_extra(root: nn.Module, name: str) -> dict[str, Any]:
    """The exported ``rank_pattern`` of adapter ``name`` in PEFT's key format (left out while nothing is pruned).

    The pattern is each layer's ``export_mask`` (the ranks the file holds), not its ``rank_mask``.
    """
    layers = adalora_layers(root, name)
    masks = {name: layer.export_mask() for name, layer in layers.items()}
    out: dict[str, Any] = {}
    if any(not bool(m.all()) for m in masks.values()):
        out["rank_pattern"] = {f"{name}.lora_E": m.tolist() for name, m in masks.items()}
    return out


def _from_peft(d: dict[str, Any]) -> AdaLoRAConfig:
    check_peft_fields("adalora", d)
    pattern = {module_name_from_peft_key(k): list(v) for k, v in (d.get("rank_pattern") or {}).items()}
    alpha = d.get("lora_alpha", 8)
    init_r = d.get("init_r", 12)
    tinit, tfinal, total = d.get("tinit", 0), d.get("tfinal", 0), d.get("total_step")
    if total is not None and tinit + tfinal >= total:
        total = None  # a schedule PEFT itself would reject; the tensors still load for inference
    return AdaLoRAConfig(
        init_r=init_r,
        target_r=min(d.get("target_r", 8), init_r),
        tinit=tinit,
        tfinal=tfinal,
        deltaT=d.get("deltaT", 1),
        beta1=d.get("beta1", 0.85),
        beta2=d.get("beta2", 0.85),
        orth_reg_weight=d.get("orth_reg_weight", 0.5),
        total_step=total,
        alpha=alpha if alpha > 0 else float(init_r),
        dropout=d.get("lora_dropout", 0.0) or 0.0,
        init_weights=bool(d.get("init_lora_weights", True)),
        rank_pattern=pattern,
        bias=peft_bias(d, "lora_only"),
        **peft_layer_selection(d),
        target_modules=d.get("target_modules"),
        exclude_modules=d.get("exclude_modules"),
        modules_to_save=d.get("modules_to_save"),
    )


# PEFT's AdaLoRA defaults per architecture (no mistral/qwen2 entries, unlike LoRA).
_DEFAULT_TARGETS: dict[str, list[str] | str] = {
    "t5": ["q", "k", "v", "o", "wi", "wo"],
    "mt5": ["q", "k", "v", "o", "wi_0", "wi_1", "wo"],
    "bart": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gpt2": ["c_attn"],
    "bloom": ["query_key_value"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "gpt_neo": ["q_proj", "v_proj"],
    "llama": ["q_proj", "v_proj"],
    "llama4": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "key", "value", "dense"],
    "deberta-v2": ["query_proj", "key_proj", "value_proj", "dense"],
    "gpt_bigcode": ["c_attn"],
    "deberta": ["in_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "gemma4": ".*language_model\\..*\\.(q_proj|v_proj)",
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
}


class AdaLoRAMethod(LayerMethod):
    """AdaLoRA in the registry."""

    name = "adalora"
    config_cls = AdaLoRAConfig
    peft_type = "ADALORA"
    supported_types = LINEAR_TYPES + (nn.Conv2d,)
    default_targets = _DEFAULT_TARGETS
    create_layer = AdaLoRALayer
    config_to_peft = staticmethod(_to_peft)
    config_from_peft = staticmethod(_from_peft)
    peft_config_extra = staticmethod(_peft_config_extra)
    training_hooks = AdaLoRASchedule


register(AdaLoRAMethod())

__all__ = [
    "AdaLoRAConfig",
    "AdaLoRALayer",
    "AdaLoRASchedule",
    "RankAllocator",
    "adalora_layers",
    "budget_schedule",
    "masks_for_budget",
    "orthogonal_regularizer",
    "rank_history_table",
    "rank_pattern",
    "resolve_total",
    "triplet_scores",
    "update_importance",
]
