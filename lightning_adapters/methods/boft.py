"""BOFT: butterfly orthogonal fine-tuning, a product of permuted block-diagonal rotations and an output scale.

Maths (Liu et al. 2024, "Parameter-Efficient Orthogonal Finetuning via Butterfly Factorization"). The input
space of a layer (size ``d = N·b``) is rotated by ``m`` butterfly factors (``boft_n_butterfly_factor``)::

    R = B_{m−1} ⋯ B_1 B_0,        B_i = P_i · blockdiag(Q_{i,1} … Q_{i,N}) · P_iᵀ
    Q = (I − S)(I + S)⁻¹,         S = ½(R_raw − R_rawᵀ)          (exact Cayley: every Q, hence R, is orthogonal)
    y = s ⊙ (W (Rᵀ x)) + b,       i.e.  W' = diag(s) · W · Rᵀ    (the bias is not scaled)

``R_raw`` are full b×b matrices (PEFT's ``boft_R``, shape (m, N, b, b)), of which only the skew part is used;
``s`` (``boft_s``) is one scale per output, (out, 1) for Linear and (1, out) for Conv2d as PEFT stores them.
``R_raw = 0`` and ``s = 1`` at init, so the layer starts as the base.

The permutations are PEFT's: ``P_0 = I``; for ``i ≥ 1`` the features are cut into groups of ``b·2^i`` and
half-blocks of ``b/2``, and ``P_i`` lists the even-numbered half-blocks of each group before the odd ones. As
``x·P_i`` puts ``x[P_i⁻¹]`` in order, every block of ``B_i`` joins two half-blocks ``2^{i−1}·b`` features apart
(the butterfly's doubling stride). ``m > 1`` needs an even ``b`` and ``N`` divisible by ``2^{m−1}``. PEFT runs
``m > 1`` only through a JIT-compiled CUDA extension and otherwise silently uses ``m = 1`` (the extension does
not even compile against torch 2.11); here every ``m`` runs in plain PyTorch on any device.

Speed: PEFT builds dense d×d permutation and rotation matrices in every forward. Here a permutation is never
materialised: each factor is one batched ``b×b`` multiply in a layout of the features where its blocks are
contiguous (``butterfly_layouts``), so going from one factor to the next is a single strided copy. A Linear
rotates whichever of its input and its weight is smaller (``kernels.rotation.rotated_linear``) and saves only its
input for backward (and the unscaled output, for the gradient of ``s``). Conv2d rotates the kernel flattened to
(out, C/groups·kh·kw) (any stride, padding, dilation and groups; PEFT ignores dilation and rejects groups),
which merges exactly.

``boft_dropout = p``: in each training forward, one random factor has ``⌊p·N⌋`` random blocks replaced by the
identity (PEFT's multiplicative dropout).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_adapters.config import (
    AdapterConfig,
    check_choice,
    check_positive_int,
    check_probability,
    peft_bias,
    peft_layer_selection,
)
from lightning_adapters.core.dtypes import working_dtype
from lightning_adapters.core.layer import AdapterLayer
from lightning_adapters.core.quant import base_linear, quantized_base
from lightning_adapters.errors import AdapterConfigError
from lightning_adapters.kernels.rotation import block_layout, cayley, rotate_features, rotated_linear
from lightning_adapters.methods._common import (
    block_dropout_mask,
    divisors,
    draw_,
    keyed_cache,
    layer_kind,
    restore_rows_,
    rotated_size,
    stash_rows,
    tensor_key,
    unscalable_rows,
    write_weight_,
)
from lightning_adapters.registry import LayerMethod, register


@dataclass
class BOFTConfig(AdapterConfig):
    """BOFT hyper-parameters, named as PEFT 0.21's ``BOFTConfig``.

    Attributes:
        boft_block_size: Features per block ``b``; set exactly one of ``boft_block_size`` and ``boft_block_num``
            (the other 0).
        boft_block_num: Blocks per factor ``N`` (``N · b`` = the layer's input size).
        boft_n_butterfly_factor: Number of butterfly factors ``m`` (1 = OFT with an output scale).
        boft_dropout: Probability of replacing a block of one random factor by the identity in a training forward.
        init_weights: ``True`` (identity at init) or ``False`` (``R_raw`` ~ N(0, 0.1), ``s`` ~ N(1, 0.1)).
        bias: Train base biases too, as PEFT's ``bias``: ``"none"``, ``"all"`` (every bias in the model) or
            ``"boft_only"`` (the biases of the adapted modules). They are saved with the adapter; merging, ejecting or
            ``disabled()`` does not undo their training.
    """

    boft_block_size: int = 4
    boft_block_num: int = 0
    boft_n_butterfly_factor: int = 1
    boft_dropout: float = 0.0
    init_weights: bool = True
    bias: str = "none"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(self.bias, "bias", "boft", ("none", "all", "boft_only"))
        check_positive_int(self.boft_block_size, "boft_block_size", "boft", allow_zero=True)
        check_positive_int(self.boft_block_num, "boft_block_num", "boft", allow_zero=True)
        if (self.boft_block_size == 0) == (self.boft_block_num == 0):
            raise AdapterConfigError(
                "boft: set exactly one of boft_block_size (features per block) and boft_block_num (blocks per "
                f"factor), the other to 0; got boft_block_size={self.boft_block_size}, "
                f"boft_block_num={self.boft_block_num}"
            )
        check_positive_int(self.boft_n_butterfly_factor, "boft_n_butterfly_factor", "boft")
        check_probability(self.boft_dropout, "boft_dropout", "boft")
        if not isinstance(self.init_weights, bool):
            raise AdapterConfigError(f"boft: init_weights must be True or False, got {self.init_weights!r}")


# ------------------------------------------------------------------------------------------------------------
# Pure functions


def butterfly_permutation(d: int, b: int, i: int) -> torch.Tensor:
    """PEFT's permutation of factor ``i`` as indices (d,): position ``j`` of ``x·P_i`` holds ``x[perm[j]]``.

    Within groups of ``b·2^i`` features, half-blocks of ``b/2`` are reordered evens first, then odds
    (the identity for ``i = 0``). Used to check the layouts, never in a forward.
    """
    if i == 0:
        return torch.arange(d)
    h, per_group = b // 2, 2 ** (i + 1)
    halves = torch.arange(d).reshape(-1, per_group, h)  # (groups, half-blocks, h)
    order = torch.cat([torch.arange(0, per_group, 2), torch.arange(1, per_group, 2)])
    return halves[:, order].reshape(-1)


def butterfly_matrix(blocks: list[torch.Tensor], b: int) -> torch.Tensor:
    """Dense ``R = B_{m−1} ⋯ B_0`` (d, d) from the factors' blocks (N, b, b): for tests and inspection only."""
    d = blocks[0].shape[0] * b
    out = torch.eye(d, dtype=blocks[0].dtype, device=blocks[0].device)
    for i, blk in enumerate(blocks):
        perm = butterfly_permutation(d, b, i).to(blk.device)
        p = torch.zeros(d, d, dtype=blk.dtype, device=blk.device)
        p[torch.arange(d), perm] = 1.0  # (x·P)[perm[j]] = x[j]
        out = p @ torch.block_diag(*blk.unbind(0)) @ p.T @ out
    return out


def butterfly_layouts(m: int, n: int, b: int) -> tuple[tuple[int, ...], list[tuple]]:
    """The canonical split of the feature axis and the block layout of every factor (see ``kernels.rotation.reorder``).

    For ``m > 1`` the axis is (G, c_{m−1}, …, c_0, h): ``G = N/2^{m−1}`` groups, one bit ``c_j`` per factor and
    half-blocks of ``h = b/2``. Factor ``i`` pairs the two half-blocks that differ in bit ``c_i``; its blocks are
    numbered by the other dims in order, which is PEFT's block order, so ``boft_R`` is used as stored. Factor 0
    (and ``m = 1``) is the natural order: b consecutive features per block.
    """
    if m == 1:
        return (n, b), [block_layout([0], [1])]
    bit = {j: 1 + (m - 1 - j) for j in range(m)}  # canonical dim of c_j
    axis = (n // 2 ** (m - 1), *([2] * m), b // 2)
    layouts = [block_layout([0] + [bit[j] for j in range(m - 1, -1, -1) if j != i], [bit[i], m + 1]) for i in range(m)]
    return axis, layouts


def check_butterfly(d: int, b: int, m: int, name: str, what: str) -> None:
    """Raise a clear error unless ``m`` butterfly factors of ``b``-blocks fit a rotated space of size ``d``."""
    n = d // b
    if m == 1:
        return
    if b % 2 == 0 and n % 2 ** (m - 1) == 0:
        return
    fits_m = [k for k in range(1, 2 + int(math.log2(max(n, 1)))) if k == 1 or (b % 2 == 0 and n % 2 ** (k - 1) == 0)]
    sizes = [s for s in divisors(d) if s % 2 == 0 and (d // s) % 2 ** (m - 1) == 0]
    raise AdapterConfigError(
        f"boft: boft_n_butterfly_factor={m} needs an even block size and a block count divisible by "
        f"2^{m - 1}={2 ** (m - 1)}, but {name!r} ({what}) has block size {b} and {n} blocks; "
        f"butterfly factors this layer can hold with block size {b}: {fits_m}; block sizes that allow "
        f"{m} factors here: {sizes}"
    )


# ------------------------------------------------------------------------------------------------------------
# Layer


class BOFTLayer(AdapterLayer):
    """BOFT on one Linear or Conv2d module; ``boft_R`` (m, N, b, b) and ``boft_s`` in PEFT's layouts."""

    not_additive_reason = "it rotates and scales the base weight (s ⊙ W R), not a term added to the base output"

    def __init__(self, base: nn.Module, config: BOFTConfig, name: str) -> None:
        super().__init__()
        self.kind = layer_kind(base)
        d, what = rotated_size(base, self.kind)
        given, field = (
            (config.boft_block_size, "boft_block_size")
            if config.boft_block_size
            else (config.boft_block_num, "boft_block_num")
        )
        if d % given or given > d:
            valid = [k for k in divisors(d) if (k > 1 if field == "boft_block_size" else k < d)]
            raise AdapterConfigError(
                f"boft: {field}={given} does not divide {what} of {name!r}; valid {field} values for this layer: "
                f"{valid}"
            )
        b = given if field == "boft_block_size" else d // given
        if b < 2:
            valid = [k for k in divisors(d) if (k > 1 if field == "boft_block_size" else k < d)]
            raise AdapterConfigError(
                f"boft: {field}={given} gives blocks of 1 feature on {name!r} ({what}), which cannot rotate; "
                f"valid {field} values for this layer: {valid}"
            )
        m = config.boft_n_butterfly_factor
        check_butterfly(d, b, m, name, what)
        self.d, self.block_size, self.block_num, self.m = d, b, d // b, m
        self.axis, self.layouts = butterfly_layouts(m, d // b, b)
        self.dropout_p = float(config.boft_dropout)
        out = base.weight.shape[0]
        dev = base.weight.device
        dt = working_dtype(base.weight.dtype)
        self.boft_R = nn.Parameter(torch.zeros(m, self.block_num, b, b, device=dev, dtype=dt))
        s_shape = (1, out) if self.kind == "conv2d" else (out, 1)
        self.boft_s = nn.Parameter(torch.ones(s_shape, device=dev, dtype=dt))
        if config.init_weights is False:
            with torch.no_grad():
                draw_(self.boft_R, nn.init.normal_, mean=0.0, std=0.1)
                draw_(self.boft_s, nn.init.normal_, mean=1.0, std=0.1)
        # Plain attributes, not buffers: no dtype policy or cast may round the copies merge keeps.
        self.merge_rows_idx: torch.Tensor | None = None
        self.merge_rows: torch.Tensor | None = None
        # Eval-mode factor blocks: (key of boft_R, blocks); see ``forward_blocks``.
        self._blocks_cache: tuple[tuple, list[torch.Tensor]] | None = None

    def train(self, mode: bool = True) -> BOFTLayer:
        """``nn.Module.train``; also drops the eval-mode factor blocks."""
        self._blocks_cache = None
        return super().train(mode)

    # --- rotation ------------------------------------------------------------------------------------------

    def factor_blocks(self, dtype: torch.dtype | None = None, dropout: bool = False) -> list[torch.Tensor]:
        """The orthogonal blocks ``Q_i`` (N, b, b) of every factor ``i``, in PEFT's block order."""
        raw = self.boft_R
        cd = dtype or working_dtype(raw.dtype)
        raw = raw.to(cd)
        skew = 0.5 * (raw - raw.transpose(-1, -2))  # (m, N, b, b)
        q = cayley(skew.reshape(-1, self.block_size, self.block_size)).reshape(skew.shape)
        if dropout:
            eye = torch.eye(self.block_size, dtype=q.dtype, device=q.device)
            which = torch.randint(self.m, (1,), device=q.device)  # the one factor that gets dropout
            drop = block_dropout_mask(self.block_num, self.dropout_p, q.device)
            mask = (torch.arange(self.m, device=q.device) == which)[:, None] & drop[None, :]  # (m, N)
            q = torch.where(mask[..., None, None], eye, q)
        return list(q.unbind(0))

    def forward_blocks(self) -> list[torch.Tensor]:
        """The forward's factor blocks in ``boft_R``'s dtype; kept in eval mode while no gradient flows to ``boft_R``.

        Keyed by ``boft_R``'s storage, version counter, dtype, device and shape: an optimizer step, a state load, a
        cast or any in-place write through autograd-visible ops rebuilds them (the butterfly layout is fixed at
        injection). Not kept: training mode (dropout), inside ``torch.compile``, and a forward that records autograd
        for ``boft_R``.
        """
        R = self.boft_R
        if self.training or torch.compiler.is_compiling() or (R.requires_grad and torch.is_grad_enabled()):
            dropout = self.training and self.dropout_p > 0.0
            return [q.to(R.dtype) for q in self.factor_blocks(dropout=dropout)]
        return keyed_cache(self, "_blocks_cache", tensor_key(R), lambda: [q.to(R.dtype) for q in self.factor_blocks()])

    def rotate(self, x: torch.Tensor, blocks: list[torch.Tensor], transpose: bool = False) -> torch.Tensor:
        """Rows of ``x`` (..., d) times ``R`` (``transpose``: times ``Rᵀ``), one batched multiply per factor."""
        # x·R applies B_{m−1} first and B_0 last; x·Rᵀ applies B_0ᵀ first.
        steps = [(self.layouts[i], blocks[i]) for i in range(self.m - 1, -1, -1)]
        if transpose:
            steps = [(layout, blk.transpose(1, 2)) for layout, blk in reversed(steps)]
        return rotate_features(x, steps, self.axis)

    def _scale(self) -> torch.Tensor:
        return self.boft_s.reshape(-1)  # (out,)

    # --- forward -------------------------------------------------------------------------------------------

    def adapted_forward(self, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
        blocks = self.forward_blocks()
        dt = self.boft_R.dtype
        w = base.weight
        if self.kind == "conv2d":
            w_rot = self.rotate(w.reshape(w.shape[0], -1).to(dt), blocks, transpose=True)  # W·Rᵀ (out, d)
            w_new = (w_rot * self._scale()[:, None]).reshape(w.shape).to(w.dtype)
            return base._conv_forward(x, w_new, base.bias)
        steps = [(self.layouts[i], blocks[i]) for i in range(self.m - 1, -1, -1)]  # x·R: B_{m−1} first
        if quantized_base(base) is not None:
            # A quantized base: rotate the input and run the layer's own product (no rotated weight-sized copy).
            z = base_linear(base, rotate_features(x.to(dt), steps, self.axis).to(x.dtype), with_bias=False)
        else:
            z = rotated_linear(x, w, None, steps, self.axis)  # W (Rᵀ x), no bias: (..., out)
        s = self._scale().to(z.dtype)
        return z * s if base.bias is None else torch.addcmul(base.bias, z, s)

    # --- merge ---------------------------------------------------------------------------------------------

    def _merged(self, w: torch.Tensor, inverse: bool) -> torch.Tensor:
        """``diag(s)·W·Rᵀ`` or its inverse ``diag(1/s)·W·R`` (R orthogonal), computed in float64.

        The inverse leaves rows with ``s = 0`` at 0 (their originals are restored from the copy ``merge`` kept).
        """
        blocks = self.factor_blocks(dtype=torch.float64)
        s = self.boft_s.detach().to(torch.float64).reshape(-1, 1)  # (out, 1)
        w2 = w.detach().to(torch.float64).reshape(w.shape[0], -1)
        if inverse:
            inv = 1.0 / s
            return self.rotate(w2 * torch.where(torch.isfinite(inv), inv, 0.0), blocks).reshape(w.shape)
        return (self.rotate(w2, blocks, transpose=True) * s).reshape(w.shape)

    def merge(self, base: nn.Module, *, safe: bool = False) -> None:
        w = base.weight
        with torch.no_grad():
            new = self._merged(w, inverse=False)
            # A row scaled by s = 0 (or by a subnormal s) is lost in the product: keep its original for unmerge.
            lost = unscalable_rows(self.boft_s, w.dtype)
            idx, rows = stash_rows(w, lost, self.kind)
            write_weight_(w, new, safe=safe)
            self.merge_rows_idx, self.merge_rows = idx, rows
        self.merged = True

    def unmerge(self, base: nn.Module) -> None:
        w = base.weight
        with torch.no_grad():
            w.copy_(self._merged(w, inverse=True).to(w.dtype))
            restore_rows_(w, self.merge_rows_idx, self.merge_rows, self.kind)
        self.forget_merge()
        self.merged = False

    def forget_merge(self) -> None:
        self.merge_rows_idx = self.merge_rows = None

    # --- PEFT layout ---------------------------------------------------------------------------------------

    def peft_state(self) -> dict[str, torch.Tensor]:
        return {"boft_R": self.boft_R.detach(), "boft_s": self.boft_s.detach()}

    def load_peft_state(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for key in ("boft_R", "boft_s"):
                p = getattr(self, key)
                p.copy_(state[key].to(dtype=p.dtype, device=p.device))

    def extra_repr(self) -> str:
        return (
            f"{self.kind}, block_size={self.block_size}, block_num={self.block_num}, m={self.m}, merged={self.merged}"
        )


# ------------------------------------------------------------------------------------------------------------
# PEFT config translation


def _to_peft(cfg: BOFTConfig) -> dict[str, Any]:
    return {
        "peft_type": "BOFT",
        "boft_block_size": cfg.boft_block_size,
        "boft_block_num": cfg.boft_block_num,
        "boft_n_butterfly_factor": cfg.boft_n_butterfly_factor,
        "boft_dropout": cfg.boft_dropout,
        "init_weights": cfg.init_weights,
        "bias": cfg.bias,
        "fan_in_fan_out": False,
        "layers_to_transform": cfg.layers_to_transform,
        "layers_pattern": cfg.layers_pattern,
    }


def _from_peft(d: dict[str, Any]) -> BOFTConfig:
    return BOFTConfig(
        boft_block_size=d.get("boft_block_size", 4) or 0,
        boft_block_num=d.get("boft_block_num", 0) or 0,
        boft_n_butterfly_factor=d.get("boft_n_butterfly_factor", 1),
        boft_dropout=d.get("boft_dropout", 0.0) or 0.0,
        init_weights=d.get("init_weights", True),
        bias=peft_bias(d, "boft_only"),
        **peft_layer_selection(d),
        target_modules=d.get("target_modules"),
        exclude_modules=d.get("exclude_modules"),
        modules_to_save=d.get("modules_to_save"),
    )


def _prepare_peft_load(
    config: BOFTConfig, config_dict: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> tuple[BOFTConfig, dict[str, torch.Tensor]]:
    """Use the factor count the tensors were trained with: PEFT without its CUDA extension saves ``m = 1``
    tensors under a config that still says ``m > 1``."""
    counts = {t.shape[0] for k, t in tensors.items() if k.endswith(".boft_R") and t.dim() == 4}
    if len(counts) == 1:
        (m,) = counts
        if m != config.boft_n_butterfly_factor:
            warnings.warn(
                f"boft: the adapter config says boft_n_butterfly_factor={config.boft_n_butterfly_factor} but its "
                f"tensors hold {m} factor(s) (PEFT falls back to 1 without its CUDA extension); loading m={m}",
                stacklevel=2,
            )
            config.boft_n_butterfly_factor = m
    return config, tensors


class BOFTMethod(LayerMethod):
    """BOFT in the registry."""

    name = "boft"
    config_cls = BOFTConfig
    peft_type = "BOFT"
    supported_types = (nn.Linear, nn.Conv2d)
    create_layer = BOFTLayer
    config_to_peft = staticmethod(_to_peft)
    config_from_peft = staticmethod(_from_peft)
    prepare_peft_load = staticmethod(_prepare_peft_load)


register(BOFTMethod())
