"""LoRA: low-rank adaptation, with the rsLoRA scaling and the DoRA magnitude/direction split.

Maths (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"). For a base weight
``W (out, in)`` the adapted layer computes::

    y = W x + b + s · B A x,        A (r, in), B (out, r),  s = alpha / r      (rsLoRA: s = alpha / sqrt(r))

``B = 0`` at init, so the layer starts as the base. ``ΔW = s·B·A`` can be merged into ``W`` exactly.
With ``lora_bias`` (PEFT's option) ``B`` also has a bias ``b_B (out,)``, zero at init:
``y = W x + b + s · (B A x + b_B)``, merged as ``b += s · b_B``.

Convolutions: ``A`` is a conv with the base kernel, stride, padding, dilation and groups (``r`` channels out),
``B`` a 1×1 conv with the base groups, so ``ΔW`` has the base kernel's exact shape and merges for any
dilation and group count. Embeddings: ``A (r, V) = 0`` and ``B (d, r) ~ N(0, 1)``, ``y = E[x] + s·A^T[x]·B^T``.

DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation") keeps a learnable magnitude ``m`` per
output and renormalises the adapted weight row-wise::

    y = m / ||W + s·B·A||_row ⊙ (W x + s · B A x) + b

with the norm detached from the graph (the paper's §4.3), as PEFT does. A row whose ``W + s·B·A`` is exactly zero
has no direction: its factor ``m / ||·||`` is taken as 0 (PEFT computes ``0/0 = NaN`` there), which keeps the
layer the base at init and every gradient finite; merging such a row keeps a copy of it, so unmerge restores it.

Speed (Linear and Conv1D): the layer runs as one hand-written autograd Function, ``kernels.lowrank``
(rank-r products thin side first, the folded ``W + s·B·A`` where it pays, no gradient nobody asked for), DoRA as
``kernels.dora`` (one product by the folded weight it needs for the norm anyway, ``f`` applied to the weight rather
than to activations in backward); the plain differentiable form in ``_forward_linear`` is the reference they equal,
used for mixed dtypes, autocast and (DoRA) a trainable base weight. On a quantized base, training runs
``kernels.quantized``'s Functions (the weight dequantized in forward and again in backward, LoRA's and DoRA's folds
into it); without autograd the plain form takes the base term from the quantized layer's own kernel. In eval mode
the DoRA norm is cached until a weight it depends on changes (``_dora_norm``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_adapters.config import (
    LowRankConfig,
    check_choice,
    check_positive_int,
    check_probability,
    peft_bias,
    peft_layer_selection,
)
from lightning_adapters.core.dtypes import working_dtype
from lightning_adapters.core.layer import AdapterLayer
from lightning_adapters.core.quant import base_linear, computes_in_another_dtype, quantized_base, runs_own_kernel
from lightning_adapters.core.targeting import LINEAR_TYPES
from lightning_adapters.errors import AdapterConfigError, AdapterStateError, NotMergeableError
from lightning_adapters.interop.peft_fields import check_peft_fields
from lightning_adapters.kernels.dora import autograd_records, dora_factor, dora_fused_applies, dora_linear, row_norm
from lightning_adapters.kernels.lowrank import fused_linear_applies, lowrank_linear
from lightning_adapters.kernels.quantized import (
    quantized_dora_applies,
    quantized_dora_linear,
    quantized_lowrank_applies,
    quantized_lowrank_linear,
)
from lightning_adapters.methods import lora_data, lora_eva, lora_init, lora_mha, lora_params, trainable_tokens
from lightning_adapters.methods._common import (
    check_finite,
    check_rank,
    compute_dtype,
    draw_,
    in_out_features,
    kaiming_uniform_,
    layer_kind,
    restore_rows_,
    stash_rows,
    tensor_key,
    unscalable_rows,
    weight_as_out_in,
    write_weight_,
)
from lightning_adapters.registry import LayerMethod, register


@dataclass
class LoRAConfig(LowRankConfig):
    """LoRA hyper-parameters (PEFT's ``LoraConfig`` names in brackets where they differ).

    Attributes:
        r: Rank of the update.
        alpha: Scaling numerator (``lora_alpha``); the update is scaled by ``alpha / r``.
        dropout: Dropout on the adapter's input (``lora_dropout``); not applied on Embedding (as PEFT).
        use_rslora: Scale by ``alpha / sqrt(r)`` (rank-stabilised LoRA).
        use_dora: Weight-decomposed LoRA (a learnable magnitude per output).
        init_weights: ``True`` (A kaiming-uniform, B = 0), ``"gaussian"`` (A ~ N(0, 1/r), B = 0), ``False``
            (both random: not identity at init), ``"pissa"``, ``"pissa_niter_<K>"``, ``"olora"`` (the adapter
            takes the weight's principal part, the base keeps the residual), ``"orthogonal"`` (B·A = 0 with
            neither zero), ``"loftq"`` (the base weight becomes its bitsandbytes-quantised value, the adapter holds
            the quantisation error), ``"corda"``, ``"eva"`` (from the layer inputs of a few batches: see
            ``lightning_adapters.initialize_from_data``) (``init_lora_weights``; maths in ``lora_init``,
            ``lora_data`` and ``lora_eva``).
        corda_method: CorDA's ``"ipm"`` (adapt along the inputs' principal directions) or ``"kpm"`` (the least
            used ones, preserving knowledge) (``corda_config.corda_method``).
        eva_rho: EVA's rank redistribution bound (>= 1): a layer may end with up to ``round(rho·r)`` ranks
            (``eva_config.rho``; 1 keeps every layer's rank).
        eva_tau: EVA's convergence threshold in [0, 1]: the cosine similarity of a layer's components between two
            consecutive batches at which it stops (``eva_config.tau``).
        eva_use_label_mask: EVA skips the token positions whose ``labels`` are ``eva_label_mask_value``
            (``eva_config.use_label_mask``).
        eva_label_mask_value: The label of the positions EVA skips (``eva_config.label_mask_value``).
        eva_whiten: Divide EVA's components by the square roots of their singular values
            (``eva_config.whiten``).
        eva_adjust_scaling_factors: Multiply a layer's alpha by ``new_r / r`` after EVA's redistribution, keeping
            its scale ``alpha / r`` (``eva_config.adjust_scaling_factors``).
        loftq_bits: LoftQ's quantisation: 4 (NF4) or 8 (int8) (``loftq_config.loftq_bits``).
        loftq_iter: LoftQ's alternations of quantisation and SVD (``loftq_config.loftq_iter``).
        init_batches: How many train batches a Lightning fit reads for a data-driven init (``"corda"``, ``"eva"``;
            EVA cycles them until its components converge).
        rank_pattern: ``{module regex: r}`` per-module ranks.
        alpha_pattern: ``{module regex: alpha}`` per-module alphas.
        grouped_conv_layout: How LoRA adapts a conv with ``groups > 1``: ``"mergeable"`` (default: ``A`` grouped
            like the base, so ΔW has the base kernel's shape and merges; saved as PEFT's ungrouped ``A`` with zeros
            across groups) or ``"peft"`` (PEFT's own layer: ``A`` an ungrouped conv reading every input channel,
            ``B`` a grouped 1×1 conv; more expressive, but its ΔW is not a grouped kernel, so it cannot be merged,
            as in PEFT). ``load_peft`` picks ``"peft"`` by itself for a file whose ``lora_A`` mixes groups.
        trainable_token_indices: Embedding rows trained in full besides the LoRA (e.g. new special tokens): a
            list of token ids of the model's input embedding, or ``{embedding module name: ids}``; a head tied to
            the embedding shares the rows (see ``methods.trainable_tokens``).
        bias: Train base biases too, as PEFT's ``bias``: ``"none"``, ``"all"`` (every bias in the model) or
            ``"lora_only"`` (the biases of the adapted modules). They are saved with the adapter; merging, ejecting or
            ``disabled()`` does not undo their training.
        lora_bias: A trainable bias on ``lora_B`` (PEFT's ``lora_bias``), added to the base bias by ``merge`` (so a
            base layer without a bias cannot merge). Not with DoRA, Embedding or an ``init_weights`` other than
            True/False (as PEFT).
        target_parameters: ``nn.Parameter``s adapted besides ``target_modules``, as ``"<module>.<parameter>"``
            suffixes, e.g. ``["experts.gate_up_proj", "experts.down_proj"]`` for the fused 3-D expert weights of
            transformers MoE blocks (one LoRA per expert; see ``methods.lora_params``).
    """

    method_name = "lora"

    dropout: float = 0.0
    use_rslora: bool = False
    use_dora: bool = False
    init_weights: Any = True
    corda_method: str = "ipm"
    eva_rho: float = 2.0
    eva_tau: float = 0.99
    eva_use_label_mask: bool = True
    eva_label_mask_value: int = -100
    eva_whiten: bool = False
    eva_adjust_scaling_factors: bool = True
    loftq_bits: int = 4
    loftq_iter: int = 1
    init_batches: int = 4
    grouped_conv_layout: str = "mergeable"
    trainable_token_indices: Any = None
    bias: str = "none"
    lora_bias: bool = False
    target_parameters: Any = None

    def __post_init__(self) -> None:
        # target_modules=[] is valid only when target_parameters names what to adapt (as in PEFT).
        only_params = isinstance(self.target_modules, (list, tuple)) and not self.target_modules
        only_params = only_params and bool(self.target_parameters)
        if only_params:
            self.target_modules = None
        super().__post_init__()
        check_choice(self.bias, "bias", "lora", ("none", "all", "lora_only"))
        check_choice(self.lora_bias, "lora_bias", "lora", (False, True))
        check_choice(self.use_dora, "use_dora", "lora", (False, True))
        check_choice(self.use_rslora, "use_rslora", "lora", (False, True))
        if self.lora_bias and self.use_dora:
            raise AdapterConfigError("lora: lora_bias=True does not work with use_dora=True (PEFT refuses it too)")
        if self.lora_bias and self.init_weights not in (True, False):
            raise AdapterConfigError(
                f"lora: lora_bias=True needs init_weights True or False (as in PEFT), got {self.init_weights!r}"
            )
        if only_params:
            self.target_modules = []
        check_probability(self.dropout, "dropout", "lora")
        lora_init.check_init_weights(self.init_weights)
        trainable_tokens.check_indices(self.trainable_token_indices, "lora")
        lora_params.check_target_parameters(self.target_parameters)
        if self.target_parameters is not None:
            self.target_parameters = list(self.target_parameters)
        if isinstance(self.trainable_token_indices, dict):
            self.trainable_token_indices = {k: list(v) for k, v in self.trainable_token_indices.items()}
        elif self.trainable_token_indices is not None:
            self.trainable_token_indices = list(self.trainable_token_indices)
        if self.grouped_conv_layout not in GROUPED_CONV_LAYOUTS:
            raise AdapterConfigError(
                f"lora: grouped_conv_layout={self.grouped_conv_layout!r} is not one of {GROUPED_CONV_LAYOUTS}; use "
                "'mergeable' (A grouped as the base conv, mergeable) or 'peft' (PEFT's ungrouped A, not mergeable)"
            )
        if self.corda_method not in lora_data.CORDA_METHODS:
            raise AdapterConfigError(
                f"lora: corda_method must be one of {list(lora_data.CORDA_METHODS)}, got {self.corda_method!r}"
            )
        check_positive_int(self.init_batches, "init_batches", "lora")
        lora_eva.check_options(self)
        check_choice(self.loftq_bits, "loftq_bits", "lora", lora_init.LOFTQ_BITS)
        check_positive_int(self.loftq_iter, "loftq_iter", "lora")
        if self.init_weights == "orthogonal":
            odd = {"r": self.r} if self.r % 2 else {}
            odd.update({f"rank_pattern[{k!r}]": v for k, v in self.rank_pattern.items() if v % 2})
            if odd:
                raise AdapterConfigError(
                    f"lora: init_weights='orthogonal' needs even ranks (A and B take alternate rows of an r x r "
                    f"orthogonal matrix), got {odd}; use an even r"
                )


GROUPED_CONV_LAYOUTS = ("mergeable", "peft")

CONV_KINDS = ("conv1d", "conv2d", "conv3d")
_CONV_FN = {"conv1d": F.conv1d, "conv2d": F.conv2d, "conv3d": F.conv3d}

# ------------------------------------------------------------------------------------------------------------
# Pure functions


def lora_scale(alpha: float, r: int, use_rslora: bool) -> float:
    """``alpha / r``, or ``alpha / sqrt(r)`` for rsLoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def conv_delta_weight(A: torch.Tensor, B: torch.Tensor, groups: int, scale: float) -> torch.Tensor:
    """ΔW of a grouped conv LoRA.

    A (r, in/g, *k) and B (out, r/g, 1...) -> (out, in/g, *k): per group ``B_g (out/g, r/g) @ A_g (r/g, in/g·k)``.
    """
    r, out = A.shape[0], B.shape[0]
    a = A.reshape(groups, r // groups, -1)  # (g, r/g, in/g·k)
    b = B.reshape(groups, out // groups, r // groups)  # (g, out/g, r/g)
    return (torch.bmm(b, a) * scale).reshape(out, *A.shape[1:])  # (out, in/g, *k)


def grouped_to_dense_A(A: torch.Tensor, groups: int) -> torch.Tensor:
    """PEFT's layout of a grouped conv's ``lora_A``: one ungrouped conv whose off-group weights are zero.

    A (r, in/g, *k) -> (r, in, *k): row block ``j`` (r/g rows) keeps its weights on input block ``j`` only, so the
    ungrouped conv computes exactly what the grouped one does.
    """
    r, in_g, *k = A.shape
    a = A.reshape(groups, r // groups, in_g, *k)  # (g, r/g, in/g, *k)
    dense = A.new_zeros(groups, r // groups, groups, in_g, *k)  # (g, r/g, g, in/g, *k)
    idx = torch.arange(groups, device=A.device)
    dense[idx, :, idx] = a
    return dense.reshape(r, groups * in_g, *k)


def dense_to_grouped_A(A: torch.Tensor, groups: int) -> torch.Tensor | None:
    """Inverse of ``grouped_to_dense_A``: (r, in, *k) -> (r, in/g, *k), or None if a weight crosses groups."""
    r, in_f, *k = A.shape
    blocks = A.reshape(groups, r // groups, groups, in_f // groups, *k)  # (g, r/g, g, in/g, *k)
    idx = torch.arange(groups, device=A.device)
    diagonal = blocks[idx, :, idx]  # (g, r/g, in/g, *k)
    off = blocks.clone()
    off[idx, :, idx] = 0
    if bool(off.any()):
        return None
    return diagonal.reshape(r, in_f // groups, *k)


def _conv_ungrouped(base: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x`` convolved with ``weight`` (r, in, *k) using the base conv's stride, padding (mode) and dilation, but
    one group: PEFT's ``lora_A`` of a grouped conv."""
    conv = _CONV_FN[layer_kind(base)]
    if base.padding_mode != "zeros":
        x = F.pad(x, base._reversed_padding_repeated_twice, mode=base.padding_mode)
        return conv(x, weight, None, base.stride, 0, base.dilation, 1)
    return conv(x, weight, None, base.stride, base.padding, base.dilation, 1)


def linear_delta_weight(A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """ΔW = s · B (out, r) @ A (r, in) -> (out, in)."""
    return (B @ A) * scale


# ------------------------------------------------------------------------------------------------------------
# Layer


def embed_scale(base: nn.Module) -> torch.Tensor | float | None:
    """The scalar ``embed_scale`` an embedding multiplies its lookup by in its own forward (transformers'
    ``*ScaledWordEmbedding``: BART, Gemma 3, ...), or ``None`` (absent or not one number)."""
    scale = getattr(base, "embed_scale", None)
    if isinstance(scale, bool) or not isinstance(scale, (int, float, torch.Tensor)):
        return None
    if isinstance(scale, torch.Tensor) and scale.numel() != 1:
        return None
    return scale


def _scaled_embedding(base: nn.Module, term: torch.Tensor) -> torch.Tensor:
    # The base forward scales the looked-up rows of W, so ΔW's rows get the same factor (merging W + ΔW agrees).
    scale = embed_scale(base)
    if scale is None:
        return term
    return term * (scale.to(term.dtype) if isinstance(scale, torch.Tensor) else scale)


class LoRALayer(AdapterLayer):
    """LoRA (optionally DoRA) on one Linear, Conv1D, Embedding, Conv1d or Conv2d module.

    Parameters are stored in PEFT's layouts: ``lora_A`` (r, in[/g, *k]), ``lora_B`` (out, r[/g, 1...]);
    Embedding: ``lora_A`` (r, V), ``lora_B`` (d, r); DoRA ``magnitude`` (out,) or (1, out, 1[, 1]) for convs.
    """

    def __init__(self, base: nn.Module, config: LoRAConfig, name: str) -> None:
        super().__init__()
        self.kind = layer_kind(base)
        in_f, out_f = in_out_features(base)
        r = config.rank_for(name)
        k_numel = math.prod(base.kernel_size) if self.kind in CONV_KINDS else 1
        check_rank(r, (in_f * k_numel, out_f), name, "lora")
        alpha = config.alpha_for(name)
        self.r, self.alpha = r, alpha
        self.use_rslora = bool(config.use_rslora)
        self.scale = lora_scale(alpha, r, self.use_rslora)
        self.dropout_p = float(config.dropout)
        self.use_dora = bool(config.use_dora)
        # Stacking adds delta_output terms; DoRA's output is not the base output plus a term of its own.
        self.additive = not self.use_dora
        self.not_additive_reason = "DoRA rescales every output row of W + ΔW by its learned magnitude"
        self.in_features, self.out_features = in_f, out_f
        dev = base.weight.device
        dt = working_dtype(base.weight.dtype)
        self.groups = 1
        self.name = name
        # PEFT's grouped-conv layer (A ungrouped, B grouped): see LoRAConfig.grouped_conv_layout.
        self.peft_layout = False
        if self.kind in CONV_KINDS:
            self.groups = base.groups
            if r % self.groups:
                valid = [k * self.groups for k in range(1, 5)]
                raise AdapterConfigError(
                    f"lora: r={r} on {name!r} must be divisible by the conv's groups={self.groups}; use r in {valid}"
                )
            self.peft_layout = self.groups > 1 and config.grouped_conv_layout == "peft"
            if self.peft_layout and self.use_dora:
                raise AdapterConfigError(
                    f"lora: use_dora=True with grouped_conv_layout='peft' on the grouped conv {name!r} is refused: "
                    "DoRA needs the adapted weight W + ΔW, which this layout has no grouped form of; use "
                    "grouped_conv_layout='mergeable' or use_dora=False"
                )
            if self.peft_layout:
                self.mergeable = False
                self.not_mergeable_reason = (
                    f"its LoRA uses PEFT's grouped-conv layout (grouped_conv_layout='peft': lora_A reads all "
                    f"{in_f} input channels, the base conv has groups={self.groups}), so ΔW is not a kernel of the "
                    "grouped base conv; PEFT cannot merge it either"
                )
            k = tuple(base.kernel_size)
            a_shape = (r, in_f if self.peft_layout else in_f // self.groups, *k)
            b_shape = (out_f, r // self.groups) + (1,) * len(k)
        elif self.kind == "embedding":
            a_shape, b_shape = (r, in_f), (out_f, r)
            if self.use_dora and embed_scale(base) is not None:
                raise AdapterConfigError(
                    f"lora: use_dora=True on the scaled embedding {name!r} ({type(base).__name__}, embed_scale) is "
                    "not supported; set use_dora=False or leave it out of target_modules"
                )
        else:
            a_shape, b_shape = (r, in_f), (out_f, r)
        self.lora_A = nn.Parameter(torch.empty(a_shape, device=dev, dtype=dt))
        self.lora_B = nn.Parameter(torch.empty(b_shape, device=dev, dtype=dt))
        self.lora_B_bias: nn.Parameter | None = None
        if config.lora_bias:
            if self.kind == "embedding":
                raise AdapterConfigError(
                    f"lora: lora_bias=True is not supported on the Embedding {name!r} (PEFT refuses it too); "
                    "leave it out of target_modules or set lora_bias=False"
                )
            self.lora_B_bias = nn.Parameter(torch.empty(out_f, device=dev, dtype=dt))
        if self.lora_B_bias is not None and getattr(base, "bias", None) is None:
            # Checked by merge() before any layer is written.
            self.mergeable = False
            self.not_mergeable_reason = (
                "it has no bias, so its lora_bias=True adapter cannot merge (the merge adds s·b_B to the base "
                "bias); train it with lora_bias=False to merge"
            )
        # Residual inits (PiSSA, OLoRA, CorDA) keep their initial factors: the base becomes W − s·B0·A0 when the
        # layer is attached, and gets s·B0·A0 back on eject (and in save_peft(convert_to_lora=True)).
        self.register_buffer("init_A", None, persistent=False)
        self.register_buffer("init_B", None, persistent=False)
        self.init_mode: Any = config.init_weights
        self.corda_method = config.corda_method
        self.loftq_bits, self.loftq_iter = config.loftq_bits, config.loftq_iter
        # LoftQ: the quantised base Q (until on_attach writes it), then the original W (so eject can restore it).
        # Plain attributes in the base's dtype, outside the state dict and the adapter dtype policy.
        self.loftq_base: torch.Tensor | None = None
        self.loftq_original: torch.Tensor | None = None
        # A data-driven init (CorDA, EVA) is pending until initialize_from_data runs: until then the layer refuses
        # to run, merge or convert, since its residual base or its rank is unknown (an adapter trained with it
        # would be wrong).
        self.needs_data = config.init_weights in lora_init.DATA_INITS and self.kind in ("linear", "conv1d_t")
        self.module_name = name
        self.residual_applied = False
        self._init(config.init_weights, base, name)
        if self.use_dora:
            with torch.no_grad():
                # The adapted weight at init is W itself (W_res + s·B0·A0 = W for the residual inits), or LoftQ's
                # Q + s·B·A (PEFT's DoRA reads the base after LoftQ replaced it).
                w = weight_as_out_in(base).to(compute_dtype(base.weight)) if self.init_A is not None else None
                if self.loftq_base is not None:
                    cd = compute_dtype(base.weight)
                    w = self.loftq_base.to(cd) + lora_init.lora_delta(self.lora_A, self.lora_B, self.scale).to(cd)
                norm = row_norm(w if w is not None else self._merged_weight_fp(base))  # (out,)
            if self.kind in CONV_KINDS:
                norm = norm.reshape(1, out_f, *([1] * (base.weight.dim() - 2)))
            self.magnitude = nn.Parameter(norm.to(dt))
        self.register_buffer("merge_norm", None, persistent=False)
        # DoRA's eval-mode weight norm: (key of the tensors it was computed from, norm); see ``_dora_norm``.
        self._norm_cache: tuple[tuple, torch.Tensor] | None = None
        # The factor m / norm for that cached norm: (norm, key of m, factor); see ``_dora_factor``.
        self._factor_cache: tuple[torch.Tensor, tuple, torch.Tensor] | None = None
        # DoRA rows whose factor is 0 cannot be recovered by dividing: merge keeps them (indices, values).
        # Plain attributes, not buffers: no dtype policy or cast may round the copies.
        self.merge_rows_idx: torch.Tensor | None = None
        self.merge_rows: torch.Tensor | None = None

    def _init(self, mode: Any, base: nn.Module, name: str) -> None:
        family = lora_init.base_mode(mode)
        if mode == "eva" and not self.needs_data:
            mode = True  # EVA reads Linear/Conv1D inputs only; PEFT gives the other layers the default init
        if self.kind in CONV_KINDS and mode not in (True, False, "gaussian"):
            raise AdapterConfigError(
                f"lora: init_weights={mode!r} works on Linear and Conv1D layers, not on the convolution {name!r} "
                "(PEFT has no conv form either); add it to exclude_modules or use init_weights=True"
            )
        if self.kind == "conv1d_t" and family == "olora":
            raise AdapterConfigError(
                f"lora: init_weights='olora' on the transformers Conv1D {name!r} is refused: PEFT 0.21 factors the "
                "stored (in, out) weight, giving factors of the wrong shapes, so no PEFT file could match; use "
                "'pissa' there or add it to exclude_modules"
            )
        if self.kind != "embedding" and family in ("pissa", "olora"):
            with torch.no_grad():
                A, B = lora_init.weight_factors(mode, weight_as_out_in(base), self.r, self.scale)
                self.lora_A.copy_(A)
                self.lora_B.copy_(B)
            self.init_A, self.init_B = A.to(self.lora_A), B.to(self.lora_B)
            return
        if family == "loftq":
            self._check_loftq(base, name)
            with torch.no_grad():
                q, A, B = lora_init.loftq_factors(weight_as_out_in(base), self.r, self.loftq_bits, self.loftq_iter)
                self.lora_A.copy_(A)
                self.lora_B.copy_(B)
            self.loftq_base = q.to(base.weight.dtype)
            return
        if self.kind != "embedding" and family == "orthogonal":
            with torch.no_grad():
                A, B = lora_init.orthogonal_factors(self.r, self.in_features, self.out_features)
                self.lora_A.copy_(A.to(base.weight.dtype))  # PEFT stores them in the base dtype
                self.lora_B.copy_(B.to(base.weight.dtype))
            return
        with torch.no_grad():
            if self.kind == "embedding":
                if mode is False:
                    draw_(self.lora_A, nn.init.normal_)
                else:
                    nn.init.zeros_(self.lora_A)
                draw_(self.lora_B, nn.init.normal_)
                return
            if mode == "gaussian":
                draw_(self.lora_A, nn.init.normal_, std=1.0 / self.r)
            else:
                kaiming_uniform_(self.lora_A)
            if mode is False:
                kaiming_uniform_(self.lora_B)
            else:
                nn.init.zeros_(self.lora_B)
            if self.lora_B_bias is not None:
                if mode is False:  # nn.Linear's / nn.Conv's default bias init for lora_B's fan-in
                    bound = 1.0 / math.sqrt(math.prod(self.lora_B.shape[1:]))
                    draw_(self.lora_B_bias, nn.init.uniform_, a=-bound, b=bound)
                else:
                    nn.init.zeros_(self.lora_B_bias)

    def _check_loftq(self, base: nn.Module, name: str) -> None:
        if self.kind != "linear":
            raise AdapterConfigError(
                f"lora: init_weights='loftq' works on nn.Linear layers, not on the {type(base).__name__} {name!r} "
                "(PEFT's LoftQ has no correct form there either); add it to exclude_modules or use init_weights=True"
            )
        weight = base.weight
        if not weight.is_floating_point() or getattr(weight, "quant_state", None) is not None or weight.is_meta:
            raise AdapterConfigError(
                f"lora: init_weights='loftq' needs the full-precision weight of {name!r}, which is quantised or "
                "has no values; inject LoftQ on the plain model (it writes the quantised values into the base "
                "itself), or load a trained LoftQ adapter onto its quantised base as a plain LoRA"
            )

    # --- residual inits --------------------------------------------------------------------------------------

    def set_residual(self, base: nn.Module, A0: torch.Tensor, B0: torch.Tensor) -> None:
        """Make ``A0``, ``B0`` the initial factors of a residual init: the base becomes ``W − s·B0·A0``.

        Any previous residual is added back first, so calling it again (a data-driven re-init) starts from ``W``.
        """
        with torch.no_grad():
            if self.residual_applied:
                self._add_to_base(base, lora_init.lora_delta(self.init_A, self.init_B, self.scale))
            self.init_A, self.init_B = A0.to(self.lora_A), B0.to(self.lora_B)
            self._add_to_base(base, -lora_init.lora_delta(self.init_A, self.init_B, self.scale))
        self.residual_applied = True

    def _add_to_base(self, base: nn.Module, delta: torch.Tensor) -> None:
        """``W += delta`` for ``delta (out, in)`` in float32 (float64 for a float64 base), written back in the base
        layout and dtype."""
        w = base.weight
        d = delta.t() if self.kind == "conv1d_t" else delta
        cd = torch.promote_types(w.dtype, torch.float32)
        w.copy_((w.to(cd) + d.to(w.device, cd)).to(w.dtype))

    def set_rank(self, r: int, alpha: float) -> None:
        """Give the layer rank ``r`` and scaling numerator ``alpha`` (EVA's redistribution): new ``lora_A (r, in)``
        and ``lora_B = 0 (out, r)`` on the same device and dtype; the caller writes ``lora_A``."""
        if self.kind not in ("linear", "conv1d_t") or self.init_A is not None or self.merged:
            raise AdapterStateError(f"lora: the rank of {self.module_name!r} cannot change (not a plain LoRA Linear)")
        like = self.lora_A
        self.lora_A = nn.Parameter(torch.zeros(r, self.in_features, device=like.device, dtype=like.dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=like.device, dtype=like.dtype))
        self.r, self.alpha = r, float(alpha)
        self.scale = lora_scale(self.alpha, r, self.use_rslora)

    @property
    def changes_base_on_attach(self) -> bool:
        return (self.init_A is not None and not self.residual_applied) or self.loftq_base is not None

    @property
    def rewrites_base(self) -> bool:
        """Whether this layer's init writes the base weight: on attach (PiSSA, OLoRA, LoftQ), already (attached
        with such an init) or at its data-driven init (CorDA). No other adapter may share its module."""
        return (
            self.changes_base_on_attach
            or self.residual_applied
            or self.loftq_original is not None
            or (self.needs_data and lora_init.is_residual(self.init_mode))
        )

    def on_attach(self, base: nn.Module) -> None:
        """Apply a residual init's ``W − s·B0·A0``, or LoftQ's ``Q``, to the base (after every layer was built
        without error)."""
        if self.init_A is not None and not self.residual_applied:
            self.set_residual(base, self.init_A, self.init_B)
        if self.loftq_base is not None:
            with torch.no_grad():
                self.loftq_original = base.weight.detach().clone()
                base.weight.copy_(self.loftq_base)
            self.loftq_base = None

    def on_eject(self, base: nn.Module, merged: bool) -> None:
        """Without ``merged``, give a residual init's ``s·B0·A0`` back to the base, or LoftQ's original ``W``,
        restoring ``W``."""
        if self.residual_applied and not merged:
            with torch.no_grad():
                self._add_to_base(base, lora_init.lora_delta(self.init_A, self.init_B, self.scale))
            self.residual_applied = False
        if self.loftq_original is not None and not merged:
            with torch.no_grad():
                base.weight.copy_(self.loftq_original)
        self.loftq_original = None

    # --- weight-space form -------------------------------------------------------------------------------

    def delta_weight(self) -> torch.Tensor:
        """ΔW in the base weight's own layout: (out, in), (in, out) for Conv1D, (V, d) for Embedding, kernels."""
        self._check_mergeable()
        A, B = self.lora_A, self.lora_B
        if self.kind in CONV_KINDS:
            return conv_delta_weight(A, B, self.groups, self.scale)
        dw = linear_delta_weight(A, B, self.scale)  # (out, in) or (d, V)
        return dw.t() if self.kind in ("conv1d_t", "embedding") else dw

    def additive_delta(self, base: nn.Module) -> torch.Tensor:
        """``s·B·A`` in the base layout (LoRA without DoRA; ``lora_bias`` adds a bias term no ΔW holds)."""
        if not self.additive:
            raise NotMergeableError(f"LoRA on {self.name!r} has no additive ΔW: {self.not_additive_reason}")
        if self.lora_B_bias is not None:
            raise NotMergeableError(
                f"LoRA on {self.name!r} has lora_bias=True: its output adds s·b_B, which a weight ΔW does not hold"
            )
        return self.delta_weight()

    def _merged_weight_fp(self, base: nn.Module) -> torch.Tensor:
        """``W + ΔW`` as (out, ...) in the compute dtype (for DoRA norms)."""
        w = base.weight
        dw = self.delta_weight().to(compute_dtype(w))
        w = w.to(dw.dtype) + dw
        if self.kind in ("conv1d_t", "embedding"):
            w = w.t()
        return w

    def _dora_norm(self, base: nn.Module) -> torch.Tensor:
        """Detached ``||W + ΔW||`` per output, shaped like ``magnitude``; cached in eval mode.

        The cache is keyed by the storage, version counter, dtype and shape of ``W``, ``A`` and ``B`` and by the
        scale: any in-place write through autograd-visible ops (an optimizer step, ``load_state_dict``,
        ``load_adapter_state_dict``, merge/unmerge, ``copy_`` under ``no_grad``) bumps a version counter, and a
        replaced tensor or ``.to()`` changes the storage, so a stale norm is never used. ``train()`` drops it. Not
        cached: training mode (the weights change every step), quantized bases (their stand-in weight is rebuilt
        per call), inside ``torch.compile`` (the norm is part of the compiled graph), and writes through ``.data``,
        which autograd does not count either.
        """
        key = None
        if not self.training and not torch.compiler.is_compiling() and quantized_base(base) is None:
            m = self.magnitude
            key = (
                self.scale,
                m.dtype,
                tuple(m.shape),
                *(tensor_key(t) for t in (base.weight, self.lora_A, self.lora_B)),
            )
            cached = getattr(self, "_norm_cache", None)  # absent on a layer pickled before the cache existed
            # A norm computed under inference_mode cannot enter an autograd graph outside it.
            usable = cached is not None and not (cached[1].is_inference() and not torch.is_inference_mode_enabled())
            if usable and cached[0] == key:
                return cached[1]
        with torch.no_grad():
            n = row_norm(self._merged_weight_fp(base))
        n = n.reshape(self.magnitude.shape).to(self.magnitude.dtype)
        self._norm_cache = None if key is None else (key, n)
        return n

    def _dora_factor(self, base: nn.Module) -> torch.Tensor:
        """``m / ‖W + ΔW‖`` (``dora_factor``) shaped like ``magnitude``; cached with the eval-mode norm
        (``_cached_factor``)."""
        n = self._dora_norm(base)
        factor = self._cached_factor(n)
        return dora_factor(self.magnitude, n) if factor is None else factor

    def _cached_factor(self, n: torch.Tensor | None) -> torch.Tensor | None:
        """The factor ``m / n`` for the norm ``n`` that ``_dora_norm`` returned, kept beside its cached norm; None
        where none is kept (no cached norm, or a gradient flows to ``m``).

        Keyed by that norm and by ``m``'s storage, version counter, dtype and shape (as the norm's key), so an eval
        forward does not rebuild it from the same tensors in every layer call.
        """
        m = self.magnitude
        norm_cache = getattr(self, "_norm_cache", None)  # absent on a layer pickled before the cache existed
        if n is None or norm_cache is None or norm_cache[1] is not n or (m.requires_grad and torch.is_grad_enabled()):
            return None
        key = tensor_key(m)
        cached = getattr(self, "_factor_cache", None)
        if cached is not None and cached[0] is n and cached[1] == key:
            factor = cached[2]
            # A factor computed under inference_mode cannot enter an autograd graph outside it.
            if not (factor.is_inference() and not torch.is_inference_mode_enabled()):
                return factor
        factor = dora_factor(m, n)
        self._factor_cache = (n, key, factor)
        return factor

    def train(self, mode: bool = True) -> LoRALayer:
        """``nn.Module.train``; also drops the eval-mode DoRA norm and factor caches."""
        self._norm_cache = self._factor_cache = None
        return super().train(mode)

    def _check_mergeable(self) -> None:
        if self.peft_layout:
            raise NotMergeableError(f"LoRA on {self.name!r} cannot be merged: {self.not_mergeable_reason}")

    def merge(self, base: nn.Module, *, safe: bool = False) -> None:
        self._check_mergeable()
        self.check_initialized()
        w = base.weight
        cd = compute_dtype(w)
        with torch.no_grad():
            dw = self.delta_weight().to(cd)
            if not self.use_dora:
                new_bias = self._merged_bias(base, 1.0)
                if safe and new_bias is not None:
                    check_finite(new_bias, "merged bias")  # before anything is written
                write_weight_(w, w.to(cd) + dw, safe=safe)
                if new_bias is not None:
                    base.bias.copy_(new_bias)
                self.merged = True
                return
            norm = self._dora_norm(base)
            factor = dora_factor(self.magnitude, norm).to(cd)  # (out,) or (1, out, 1...)
            new = _scale_rows(w.to(cd) + dw, factor, self.kind)
            # Rows scaled by 0 (or by a factor too small to divide back in the weight's dtype): keep the originals.
            lost = unscalable_rows(factor, w.dtype)
            idx, rows = stash_rows(w, lost, self.kind)
            write_weight_(w, new, safe=safe)
            self.merge_norm, self.merge_rows_idx, self.merge_rows = norm, idx, rows
        self.merged = True

    def unmerge(self, base: nn.Module) -> None:
        w = base.weight
        cd = compute_dtype(w)
        with torch.no_grad():
            dw = self.delta_weight().to(cd)
            if not self.use_dora:
                w.copy_((w.to(cd) - dw).to(w.dtype))
                new_bias = self._merged_bias(base, -1.0)
                if new_bias is not None:
                    base.bias.copy_(new_bias)
                self.merged = False
                return
            inv = 1.0 / dora_factor(self.magnitude, self.merge_norm).to(cd)
            inv = torch.where(torch.isfinite(inv), inv, torch.zeros_like(inv))
            w.copy_((_scale_rows(w.to(cd), inv, self.kind) - dw).to(w.dtype))
            restore_rows_(w, self.merge_rows_idx, self.merge_rows, self.kind)
            self.merge_norm = self.merge_rows_idx = self.merge_rows = None
        self.merged = False

    def _merged_bias(self, base: nn.Module, sign: float) -> torch.Tensor | None:
        """``b ± s·b_B`` in the base bias dtype, or None without ``lora_bias``."""
        if self.lora_B_bias is None:
            return None
        if base.bias is None:
            raise NotMergeableError(f"LoRA on {self.name!r} cannot be merged: {self.not_mergeable_reason}")
        cd = compute_dtype(base.bias)
        return (base.bias.to(cd) + sign * self.scale * self.lora_B_bias.to(cd)).to(base.bias.dtype)

    def forget_merge(self) -> None:
        self.merge_norm = self.merge_rows_idx = self.merge_rows = None

    # --- forward -----------------------------------------------------------------------------------------

    def check_initialized(self) -> None:
        """Raise while a data-driven init (CorDA, EVA) has not run: the residual base (CorDA) or the rank (EVA) it
        trains with is not there yet."""
        if self.needs_data:
            if self.init_mode == "eva":
                elsewhere = (
                    "To use a trained EVA adapter elsewhere, save it with save_peft and load it with load_peft (the "
                    "file holds EVA's ranks in rank_pattern)"
                )
            else:
                elsewhere = (
                    "To use a trained CorDA adapter elsewhere, run it on the training's first batches before loading "
                    "the adapter state, or save it with save_peft(..., convert_to_lora=True) and load that onto the "
                    "plain base"
                )
            raise AdapterStateError(
                f"lora: {self.module_name!r} was injected with init_weights={self.init_mode!r} and has not been "
                "initialised from data: call lightning_adapters.initialize_from_data(model, batches) before running, "
                "merging or converting it (a Lightning fit does it from its first init_batches train batches). "
                + elsewhere
            )

    def adapted_forward(self, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.needs_data:
            self.check_initialized()
        if self.kind == "embedding":
            return self._forward_embedding(base, x)
        if self.kind in CONV_KINDS:
            return self._forward_conv(base, x)
        return self._forward_linear(base, x)

    def delta_output(self, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``s·B A x`` (plus ``s·b_B`` with ``lora_bias``): the term ``adapted_forward`` adds (LoRA without DoRA)."""
        if self.needs_data:
            self.check_initialized()
        if self.kind == "embedding":
            h = self._embed(base, x, self.lora_A.t())  # (..., V) lookup in Aᵀ (V, r) -> (..., r)
            return _scaled_embedding(base, F.linear(h, self.lora_B) * self.scale)  # (..., d)
        xd = self._dropped(x)
        if self.kind in CONV_KINDS:
            # (N, r, *spatial_out): PEFT's layout reads every input channel, else the base conv's own grouping.
            grouped = not self.peft_layout
            h = base._conv_forward(xd, self.lora_A, None) if grouped else _conv_ungrouped(base, xd, self.lora_A)
            return _CONV_FN[self.kind](h, self.lora_B, self.lora_B_bias, groups=self.groups) * self.scale
        return F.linear(F.linear(xd, self.lora_A), self.lora_B, self.lora_B_bias) * self.scale  # (..., out)

    def _dropped(self, x: torch.Tensor) -> torch.Tensor:
        if self.dropout_p > 0.0 and self.training:
            x = F.dropout(x, self.dropout_p, True)
        return x if x.dtype == self.lora_A.dtype else x.to(self.lora_A.dtype)

    def _base_linear(self, base: nn.Module, x: torch.Tensor, with_bias: bool = True) -> torch.Tensor:
        if self.kind == "linear":
            return base_linear(base, x, with_bias)  # a quantized base computes it with its own kernel
        # The other kind that reaches here: transformers' Conv1D, weight (in, out).
        bias = base.bias if with_bias else None
        x2 = x.reshape(-1, x.shape[-1])
        out = torch.mm(x2, base.weight) if bias is None else torch.addmm(bias, x2, base.weight)
        return out.view(*x.shape[:-1], out.shape[-1])

    def _forward_linear(self, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
        real = quantized_base(base)
        if real is not None:
            if not self.use_dora and not runs_own_kernel(base, x) and quantized_lowrank_applies(x, self.lora_A):
                # Training on a quantized base: W dequantized inside one Function, in forward and in backward.
                xd = F.dropout(x, self.dropout_p, True) if self.dropout_p > 0.0 and self.training else None
                bias = base.bias
                if self.lora_B_bias is not None:
                    bias = self.scale * self.lora_B_bias if bias is None else bias + self.scale * self.lora_B_bias
                return quantized_lowrank_linear(x, xd, bias, self.lora_A, self.lora_B, self.scale, real)
            # DoRA under autograd on a quantized base: one Function, W dequantized in forward and in backward, its
            # norm from the folded weight (a quantized base's norm is never cached). Not in eval mode for an input
            # that needs no gradient: there the base term stays the quantized layer's own inference kernel (int8's
            # also quantizes the input), as without autograd; its training product is the dequantized one.
            if (
                self.use_dora
                and (self.training or not runs_own_kernel(base, x))
                and not computes_in_another_dtype(base, x)
            ):
                A, B, m = self.lora_A, self.lora_B, self.magnitude
                if quantized_dora_applies(x, A, m) and autograd_records(x, base.bias, A, B, m):
                    xd = F.dropout(x, self.dropout_p, True) if self.dropout_p > 0.0 and self.training else None
                    return quantized_dora_linear(x, xd, base.bias, A, B, m, self.scale, real)
        elif self.use_dora and dora_fused_applies(x, base.weight, self.lora_A, self.magnitude):
            weight = base.weight.t() if self.kind == "conv1d_t" else base.weight  # (out, in)
            xd = F.dropout(x, self.dropout_p, True) if self.dropout_p > 0.0 and self.training else None
            # Training computes the norm from the folded weight it multiplies by anyway; eval reads the cache.
            norm = None if self.training else self._dora_norm(base)
            factor = None if norm is None else self._cached_factor(norm)
            A, B, m = self.lora_A, self.lora_B, self.magnitude
            return dora_linear(x, xd, weight, base.bias, A, B, m, self.scale, norm, factor)
        elif not self.use_dora and fused_linear_applies(x, base.weight, self.lora_A):
            weight = base.weight.t() if self.kind == "conv1d_t" else base.weight  # (out, in)
            dropped = self.dropout_p > 0.0 and self.training
            xd = F.dropout(x, self.dropout_p, True) if dropped else None
            bias = base.bias
            if self.lora_B_bias is not None:  # s·b_B folds into the base bias: y = x Wᵀ + (b + s·b_B) + s·B A x
                bias = self.scale * self.lora_B_bias if bias is None else bias + self.scale * self.lora_B_bias
            return lowrank_linear(x, xd, weight, bias, self.lora_A, self.lora_B, self.scale)
        if self.use_dora:
            xd = self._dropped(x)
            return self._forward_linear_dora(base, x, xd, F.linear(xd, self.lora_A))
        # The base product first, then the adapter's, in PEFT's order: compiled, both trace the same graph.
        out = self._base_linear(base, x)  # (..., out)
        h = F.linear(self._dropped(x), self.lora_A)  # (..., in) @ (in, r) -> (..., r)
        # Summed in the promoted dtype and rounded once, as PEFT does (bit for bit on a half base).
        return (out + F.linear(h, self.lora_B, self.lora_B_bias) * self.scale).to(out.dtype)

    def _forward_linear_dora(self, base: nn.Module, x: torch.Tensor, xd: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        factor = self._dora_factor(base)  # (out,)
        lora = F.linear(h, self.lora_B) * self.scale  # (..., out)
        if self.dropout_p > 0.0 and self.training:
            # PEFT's form when the adapter sees a dropped input: base(x) + (m/n − 1)·W·x_d + (m/n)·s·B·A·x_d.
            out = self._base_linear(base, x)
            wx_d = self._base_linear(base, xd.to(base.weight.dtype), with_bias=False)
            return (out + _dora_extra(factor, wx_d, lora)).to(out.dtype)
        # base(x) + (m/n)·(W·x + s·B·A·x) − W·x: exactly the base output while m = n and B = 0.
        out = self._base_linear(base, x)
        wx = out if base.bias is None else out - base.bias
        return (out + _dora_extra(factor, wx, lora)).to(out.dtype)

    def _forward_conv(self, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
        conv = _CONV_FN[self.kind]
        xd = self._dropped(x)
        if self.peft_layout:
            h = _conv_ungrouped(base, xd, self.lora_A)  # (N, r, *spatial_out): A reads every input channel
        else:
            h = base._conv_forward(xd, self.lora_A, None)  # (N, r, *spatial_out): same stride/padding/dilation/groups
        lora = conv(h, self.lora_B, self.lora_B_bias, groups=self.groups) * self.scale  # (N, out, *spatial_out)
        if self.use_dora:
            factor = self._dora_factor(base)  # (1, out, 1...)
            if self.dropout_p > 0.0 and self.training:
                out = self._la_base(base, x)
                wx_d = base._conv_forward(xd.to(base.weight.dtype), base.weight, None)
                return (out + _dora_extra(factor, wx_d, lora)).to(out.dtype)
            out = self._la_base(base, x)
            wx = out if base.bias is None else out - base.bias.reshape(1, -1, *([1] * (out.dim() - 2)))
            return (out + _dora_extra(factor, wx, lora)).to(out.dtype)
        # In place, in the promoted dtype, rounded once: PEFT's sum, bit for bit on a half base.
        return self._la_base(base, x).add_(lora)

    @staticmethod
    def _la_base(base: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return base._la_base_forward(x)

    def _embed(self, base: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # The base's padding_idx and gradient scaling, but a dense gradient: ``weight`` is a transposed view of
        # ``lora_A``, which a sparse gradient cannot flow back through (``max_norm`` bases are refused at inject).
        return F.embedding(x, weight, base.padding_idx, None, base.norm_type, base.scale_grad_by_freq, False)

    def _forward_embedding(self, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
        out = self._la_base(base, x)  # (..., d)
        h = self._embed(base, x, self.lora_A.t())  # (..., V) lookup in Aᵀ (V, r) -> (..., r)
        lora = _scaled_embedding(base, F.linear(h, self.lora_B) * self.scale)  # (..., r) @ (r, d) -> (..., d)
        if self.use_dora:
            factor = self._dora_factor(base)  # (d,)
            # In the promoted (wider) dtype: a bf16 adapter must not round a float32 base's output (PEFT's neither).
            return (factor * (out + lora)).to(out.dtype)
        return (out + lora).to(out.dtype)

    # --- PEFT layout ---------------------------------------------------------------------------------------

    def peft_state(self) -> dict[str, torch.Tensor]:
        if self.kind == "embedding":
            out = {"lora_embedding_A": self.lora_A, "lora_embedding_B": self.lora_B}
        else:
            if self.groups > 1 and self.use_dora:
                raise AdapterConfigError(
                    f"DoRA on a conv with groups={self.groups} has no PEFT equivalent (PEFT 0.21 computes the "
                    "DoRA weight norm of a grouped conv differently, so the file would load with other outputs); "
                    "use use_dora=False there (exclude_modules), or keep this adapter with adapter_state_dict"
                )
            # PEFT's grouped conv LoRA keeps A ungrouped (in -> r); ours is grouped, written as its exact
            # block-diagonal equivalent.
            grouped = self.groups > 1 and not self.peft_layout
            a = grouped_to_dense_A(self.lora_A.detach(), self.groups) if grouped else self.lora_A
            out = {"lora_A.weight": a, "lora_B.weight": self.lora_B}
            if self.lora_B_bias is not None:
                out["lora_B.bias"] = self.lora_B_bias
        if self.use_dora:
            out["lora_magnitude_vector"] = self.magnitude
        return {k: v.detach() for k, v in out.items()}

    def peft_shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self.peft_state().items()}

    def load_peft_state(self, state: dict[str, torch.Tensor]) -> None:
        state = dict(state)
        if self.groups > 1 and not self.peft_layout and "lora_A.weight" in state:
            grouped = dense_to_grouped_A(state["lora_A.weight"], self.groups)
            if grouped is None:
                raise AdapterStateError(
                    f"lora_A.weight mixes input channels across the conv's {self.groups} groups (an ungrouped A, "
                    "as PEFT trains it), which grouped_conv_layout='mergeable' cannot hold; inject with "
                    "grouped_conv_layout='peft' (load_peft does so by itself for such files)"
                )
            state["lora_A.weight"] = grouped
        names = {
            "lora_embedding_A": "lora_A",
            "lora_embedding_B": "lora_B",
            "lora_A.weight": "lora_A",
            "lora_B.weight": "lora_B",
            "lora_magnitude_vector": "magnitude",
            "lora_B.bias": "lora_B_bias",
        }
        with torch.no_grad():
            for k, v in state.items():
                p = getattr(self, names[k])
                p.copy_(v.to(dtype=p.dtype, device=p.device))

    def extra_repr(self) -> str:
        dora = ", dora" if self.use_dora else ""
        dora += ", peft grouped-conv layout" if self.peft_layout else ""
        return f"{self.kind}, r={self.r}, scale={self.scale:g}{dora}, merged={self.merged}"


def _dora_extra(factor: torch.Tensor, wx: torch.Tensor, lora: torch.Tensor) -> torch.Tensor:
    """DoRA's plain form minus the base output: ``f ⊙ (W x + s·B A x) − W x`` = ``(f − 1) ⊙ W x + f ⊙ s·B A x``.

    ``f`` (out,) or (1, out, 1...); ``W x`` and ``s·B A x`` (..., out) or (N, out, ...), each in its own dtype (the
    sum takes the wider). Written this way autograd keeps one (rows, out) tensor for ``∂m``, the sum, where the
    two-product form keeps both terms (with a bf16 base and fp32 adapters a bf16 and an fp32 one, PEFT's choice; a
    cast ``W x`` made that two fp32 ones, 5% more peak memory than PEFT on the bf16 decoder). Exactly 0 while
    ``f = 1`` and ``B = 0``.
    """
    return torch.sub(factor * (wx + lora), wx)


def _scale_rows(w: torch.Tensor, factor: torch.Tensor, kind: str) -> torch.Tensor:
    """Multiply every output slice of a base-layout weight by ``factor``."""
    f = factor.reshape(-1)
    if kind in ("conv1d_t", "embedding"):
        return w * f.reshape(1, -1)  # (in, out) / (V, d): outputs are columns
    return w * f.reshape(-1, *([1] * (w.dim() - 1)))


# ------------------------------------------------------------------------------------------------------------
# PEFT config translation


def _to_peft(cfg: LoRAConfig) -> dict[str, Any]:
    return {
        "peft_type": "LORA",
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "use_rslora": cfg.use_rslora,
        "use_dora": cfg.use_dora,
        "init_lora_weights": cfg.init_weights,
        **({"corda_config": {"corda_method": cfg.corda_method}} if cfg.init_weights == "corda" else {}),
        **({"eva_config": lora_eva.peft_eva_config(cfg)} if cfg.init_weights == "eva" else {}),
        **(
            {"loftq_config": {"loftq_bits": cfg.loftq_bits, "loftq_iter": cfg.loftq_iter}}
            if cfg.init_weights == "loftq"
            else {}
        ),
        "rank_pattern": dict(cfg.rank_pattern),
        "alpha_pattern": dict(cfg.alpha_pattern),
        "layers_to_transform": cfg.layers_to_transform,
        "layers_pattern": cfg.layers_pattern,
        "bias": cfg.bias,
        "fan_in_fan_out": False,
        "lora_bias": cfg.lora_bias,
        "trainable_token_indices": cfg.trainable_token_indices,
        "target_parameters": cfg.target_parameters,
    }


def _from_peft(d: dict[str, Any]) -> LoRAConfig:
    check_peft_fields("lora", d)
    init = lora_init.init_from_peft(d.get("init_lora_weights", True))
    loftq = d.get("loftq_config") or {}
    return LoRAConfig(
        **({"loftq_bits": loftq.get("loftq_bits", 4), "loftq_iter": loftq.get("loftq_iter", 1)} if loftq else {}),
        r=d.get("r", 8),
        alpha=d.get("lora_alpha", 8),
        dropout=d.get("lora_dropout", 0.0) or 0.0,
        use_rslora=d.get("use_rslora", False),
        use_dora=d.get("use_dora", False),
        init_weights=init,
        rank_pattern=d.get("rank_pattern") or {},
        alpha_pattern=d.get("alpha_pattern") or {},
        trainable_token_indices=d.get("trainable_token_indices"),
        bias=peft_bias(d, "lora_only"),
        lora_bias=d.get("lora_bias", False),
        **peft_layer_selection(d),
        target_parameters=d.get("target_parameters") or None,
        target_modules=d.get("target_modules"),
        exclude_modules=d.get("exclude_modules"),
        modules_to_save=d.get("modules_to_save"),
    )


def _create_layer(base: nn.Module, config: LoRAConfig, name: str) -> AdapterLayer:
    """A ``LoRALayer``, or for ``nn.MultiheadAttention`` the layer adapting its two projection weights."""
    if isinstance(base, nn.MultiheadAttention):
        if config.lora_bias:
            raise AdapterConfigError(
                f"lora: lora_bias=True is not supported on the nn.MultiheadAttention {name!r} (PEFT refuses it too); "
                f"use lora_bias=False or exclude_modules=[{name!r}]"
            )
        return lora_mha.LoRAMultiheadAttentionLayer(base, config, name, lora_scale)
    return LoRALayer(base, config, name)


def _extra_layers(model: nn.Module, config: LoRAConfig, targets: list[str]) -> dict[str, AdapterLayer]:
    """Layers besides the targets: trainable-token rows and LoRA on ``target_parameters``."""
    tokens = trainable_tokens.token_layers(model, config, targets)
    params = lora_params.param_layers(model, config, targets, lora_scale)
    both = sorted(set(tokens) & set(params))
    if both:
        raise AdapterConfigError(f"lora: {both} are in trainable_token_indices and target_parameters; choose one")
    return {**tokens, **params}


def _prepare_peft_load(
    config: LoRAConfig, config_dict: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> tuple[LoRAConfig, dict[str, torch.Tensor]]:
    """Select PEFT's grouped-conv layout when a grouped conv's ``lora_A`` in the file mixes groups.

    A grouped conv's LoRA is recognised by its shapes: ``lora_A`` (r, in, *k) and ``lora_B`` (out, r/g, 1...)
    with ``g = r / lora_B.shape[1] > 1``. Files whose ``A`` is block-diagonal (ours, or PEFT's trained that way)
    keep the mergeable layout.
    """
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight") or a.dim() < 3:
            continue
        b = tensors.get(key[: -len("lora_A.weight")] + "lora_B.weight")
        if b is None or b.dim() != a.dim() or b.shape[1] == 0 or a.shape[0] % b.shape[1]:
            continue
        groups = a.shape[0] // b.shape[1]
        if groups > 1 and a.shape[1] % groups == 0 and dense_to_grouped_A(a, groups) is None:
            return dataclasses.replace(config, grouped_conv_layout="peft"), tensors
    return config, tensors


class LoRAMethod(LayerMethod):
    """LoRA in the registry."""

    name = "lora"
    config_cls = LoRAConfig
    peft_type = "LORA"
    supported_types = LINEAR_TYPES + (nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention)
    create_layer = staticmethod(_create_layer)
    extra_layers = staticmethod(_extra_layers)
    config_to_peft = staticmethod(_to_peft)
    config_from_peft = staticmethod(_from_peft)
    prepare_peft_load = staticmethod(_prepare_peft_load)


register(LoRAMethod())
