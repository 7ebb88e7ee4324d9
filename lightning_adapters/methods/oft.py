"""OFT: orthogonal fine-tuning with a block-diagonal rotation of the layer's input space.

Maths (Qiu et al. 2023, "Controlling Text-to-Image Diffusion by Orthogonal Finetuning"; the Cayley-Neumann
form from Qiu et al. 2025, "Orthogonal Finetuning Made Scalable"). The input space of a layer (size ``d``) is
cut into ``r`` contiguous blocks of ``b`` features (``r·b = d``). Each block owns the ``b(b−1)/2`` strictly upper
triangular entries ``u`` of a skew-symmetric matrix ``Q = U − Uᵀ`` and turns it into a rotation::

    exact Cayley     R = (I − Q)(I + Q)⁻¹                                    (orthogonal)
    Cayley-Neumann   R = I + 2Q + 2Q² + … + 2Q^{n−2} + Q^{n−1}  ≈ (I + Q)(I − Q)⁻¹

The Neumann series (PEFT's default) truncates the *transpose* of the exact map, so switching the flag on a
trained adapter reverses its rotation, and it is orthogonal only up to the truncation error. Both conventions
are PEFT 0.21's, kept for interop (including its quirk that ``n = 3`` sums the same terms as ``n = 4``).
With ``R_bd = blockdiag(R_1 … R_r)`` (one shared block repeated with ``block_share``)::

    Linear   y = W (R_bdᵀ x) + b,         i.e.  W' = W · R_bdᵀ
    Conv2d   W' = W · R_bdᵀ  on the kernel flattened to (out, C/groups · kh · kw), then the base convolution
    Embedding  y = E[x] · R_bd,           i.e.  E' = E · R_bd   (the output is rotated)

``u = 0`` at init, so ``R = I`` and the layer starts as the base. PEFT 0.21 rotates unfolded input patches of a
Conv2d and folds them back, which is neither the identity at init nor its own merge for kernels > 1; rotating
the kernel instead is exact for every kernel size, stride, dilation and group count, and merges exactly.

COFT (constrained OFT) keeps each block's ``Q`` in the Frobenius ball of radius ``eps/√(#parameter blocks)``:
the forward uses the projected ``Q`` and the gradient passes straight through the projection (the gradient
PEFT gets), but the stored parameter is never rewritten inside ``forward``, so optimizer state, EMA copies,
FSDP shards and ``torch.compile`` see an ordinary parameter. ``module_dropout = p`` replaces ``⌊p·r⌋`` random
blocks of ``R_bd`` by the identity in each training forward (PEFT builds this layer but never calls it).

Speed and memory: no ``d×d`` matrix is ever built. A Linear computes ``F.linear(x·R_bd, W)`` as
``F.linear(x, W·R_bdᵀ)`` when it has at least as many tokens as outputs (rotating ``W`` is then the smaller
job), and rotates the tokens otherwise; each rotation is one batched ``b×b`` multiply. Both paths save only
the layer input for backward and get the block gradients from ``gy·W``, the product a frozen linear's
backward computes anyway. Unmerge inverts the blocks (the Neumann ``R`` is not exactly orthogonal).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
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
    peft_bias,
    peft_layer_selection,
)
from lightning_adapters.core.layer import AdapterLayer
from lightning_adapters.errors import AdapterConfigError
from lightning_adapters.methods._common import layer_kind, write_weight_
from lightning_adapters.registry import MethodSpec, register


@dataclass
class OFTConfig(AdapterConfig):
    """OFT hyper-parameters, named as PEFT 0.21's ``OFTConfig``.

    Attributes:
        r: Number of blocks per layer; set exactly one of ``r`` and ``oft_block_size`` (the other 0).
        oft_block_size: Features per block (``r · oft_block_size`` = the layer's input size).
        use_cayley_neumann: Truncated Neumann series (PEFT's default, approximately orthogonal) instead of the
            exact Cayley map; see the module docstring for the convention.
        num_cayley_neumann_terms: Terms of the Neumann series (>= 2).
        block_share: One block's parameters shared by every block of a layer.
        coft: Constrained OFT: keep each block's skew matrix within radius ``eps`` (scaled by the block count).
        eps: COFT radius.
        module_dropout: Probability of replacing a block's rotation by the identity in a training forward.
        init_weights: ``True`` (identity at init) or ``False`` (parameters ~ N(0, 0.1), not the identity).
        auto_adjust: PEFT's silent behaviour: replace an ``r`` or ``oft_block_size`` that does not divide a
            layer by the nearest divisor (with a warning) instead of raising. ``load_peft`` sets it, so PEFT
            adapters load with the shapes PEFT gave them; it is not written to PEFT's config file.
        bias: Train base biases too, as PEFT's ``bias``: ``"none"``, ``"all"`` (every bias in the model) or
            ``"oft_only"`` (the biases of the adapted modules). They are saved with the adapter; merging, ejecting or
            ``disabled()`` does not undo their training.
    """

    r: int = 0
    oft_block_size: int = 32
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = 5
    block_share: bool = False
    coft: bool = False
    eps: float = 6e-5
    module_dropout: float = 0.0
    init_weights: bool = True
    auto_adjust: bool = False
    bias: str = "none"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(self.bias, "bias", "oft", ("none", "all", "oft_only"))
        check_positive_int(self.r, "r", "oft", allow_zero=True)
        check_positive_int(self.oft_block_size, "oft_block_size", "oft", allow_zero=True)
        if (self.r == 0) == (self.oft_block_size == 0):
            raise AdapterConfigError(
                f"oft: set exactly one of r (number of blocks) and oft_block_size (features per block), the other "
                f"to 0; got r={self.r}, oft_block_size={self.oft_block_size}"
            )
        check_positive_int(self.num_cayley_neumann_terms, "num_cayley_neumann_terms", "oft")
        if self.num_cayley_neumann_terms < 2:
            raise AdapterConfigError(
                f"oft: num_cayley_neumann_terms={self.num_cayley_neumann_terms} makes every rotation the identity "
                "(the adapter could not learn); use 2 or more (PEFT's default is 5)"
            )
        check_positive_float(self.eps, "eps", "oft")
        check_probability(self.module_dropout, "module_dropout", "oft")
        for name in ("use_cayley_neumann", "block_share", "coft", "init_weights", "auto_adjust"):
            if not isinstance(getattr(self, name), bool):
                raise AdapterConfigError(f"oft: {name} must be True or False, got {getattr(self, name)!r}")


# ------------------------------------------------------------------------------------------------------------
# Pure functions


def divisors(d: int) -> list[int]:
    """Every divisor of ``d`` in increasing order."""
    small = [k for k in range(1, math.isqrt(d) + 1) if d % k == 0]
    return sorted(set(small + [d // k for k in small]))


def peft_nearest_divisor(d: int, value: int) -> int:
    """PEFT's auto-adjustment: ``d`` if ``value >= d``, else the divisor of ``d`` nearest ``value`` (ties: lower)."""
    if value >= d:
        return d
    lower = value
    while lower > 1 and d % lower:
        lower -= 1
    higher = value
    while d % higher:
        higher += 1
    return lower if value - lower <= higher - value else higher


def skew_symmetric(upper: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, b: int) -> torch.Tensor:
    """Blocks of strictly-upper entries (n, b(b−1)/2) -> skew-symmetric ``Q = U − Uᵀ`` (n, b, b)."""
    u = upper.new_zeros(upper.shape[0], b, b)
    u[:, rows, cols] = upper
    return u - u.transpose(1, 2)


def unit_skew_inverse(a: torch.Tensor) -> torch.Tensor:
    """Inverse of ``I + S`` blocks (n, b, b), ``S`` skew, by Gauss-Jordan elimination vectorised over the batch.

    LAPACK inverts one matrix per call, which for hundreds of 4×4 blocks costs far more than the arithmetic.
    No pivoting is needed: the symmetric part of ``I + S`` and of every Schur complement is ⪰ I, so every
    pivot is ≥ 1.
    """
    n, b, _ = a.shape
    eye = torch.eye(b, dtype=a.dtype, device=a.device)
    aug = torch.cat([a, eye.expand(n, b, b)], dim=2)  # (n, b, 2b) = [A | I]
    for k in range(b):
        row = aug[:, k, :] / aug[:, k, k : k + 1]  # (n, 2b): pivot row scaled to a unit pivot
        col = aug[:, :, k] - eye[k]  # (n, b): what to remove from each row (row k becomes the scaled row)
        aug = aug - col[:, :, None] * row[:, None, :]
    return aug[:, :, b:]


class _UnitSkewInverse(torch.autograd.Function):
    """``(I + S)⁻¹`` with the backward ``−A⁻ᵀ G A⁻ᵀ`` (two batched products, no second solve)."""

    @staticmethod
    def forward(ctx, a):  # noqa: D102 - autograd protocol
        # Small blocks: the vectorised elimination; large ones: LAPACK (few matrices, real arithmetic).
        inv = unit_skew_inverse(a) if a.shape[-1] <= 8 else torch.linalg.inv(a)
        ctx.save_for_backward(inv)
        return inv

    @staticmethod
    def backward(ctx, grad):  # noqa: D102 - autograd protocol
        (inv,) = ctx.saved_tensors
        inv_t = inv.transpose(1, 2)
        return -torch.bmm(torch.bmm(inv_t, grad), inv_t)


def cayley(q: torch.Tensor) -> torch.Tensor:
    """Exact Cayley map of skew blocks (n, b, b): ``(I − Q)(I + Q)⁻¹ = 2(I + Q)⁻¹ − I`` (n, b, b), orthogonal."""
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device)
    return 2.0 * _UnitSkewInverse.apply(q + eye) - eye


def neumann_coefficients(terms: int) -> list[float]:
    """Coefficients of ``Q, Q², …`` in PEFT's truncated series of ``(I + Q)(I − Q)⁻¹`` with ``terms`` terms."""
    if terms <= 1:
        return []
    if terms == 2:
        return [2.0]
    top = max(3, terms - 1)  # PEFT's loop always reaches Q³: 3 and 4 terms give the same series
    return [2.0] * (top - 1) + [1.0]


def cayley_neumann(q: torch.Tensor, terms: int) -> torch.Tensor:
    """``I + Σ_k c_k Q^k`` (n, b, b) with PEFT's Neumann coefficients."""
    out = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device).expand_as(q).clone()
    power = None
    for c in neumann_coefficients(terms):
        power = q if power is None else torch.bmm(power, q)  # (n, b, b) @ (n, b, b)
        out = out + c * power
    return out


def coft_project(upper: torch.Tensor, eps: float) -> torch.Tensor:
    """Scale each block's skew matrix (given by its upper entries (n, m)) into the Frobenius ball eps/√n."""
    radius = eps / math.sqrt(upper.shape[0])
    norm = upper.norm(dim=1, keepdim=True) * math.sqrt(2.0)  # ||U − Uᵀ||_F = √2 · ||u||
    return upper * torch.where(norm > radius, radius / norm.clamp_min(1e-30), torch.ones_like(norm))


# Block rotations of a feature axis, computed feature-major: a batch of rows x (T, d) is handled as xᵀ (d, T),
# so every layout change below keeps the token axis contiguous and every block multiply is a (b×b)·(b×T)
# product with a long inner dimension. The feature axis is split into canonical dims ``axis`` = (f_0, …, f_k)
# (d = f_0·…·f_k); a layout is ``(order, n)``: the canonical dims in storage order, of which the first ``n``
# number the blocks and the rest index a feature inside its block. OFT uses axis (r, b) and the natural layout
# ((0, 1), 1), which needs no copy at all; BOFT's butterfly factors split the axis further (boft.py).


def block_layout(block_dims: list[int], inner_dims: list[int]) -> tuple[tuple[int, ...], int]:
    """The layout whose blocks are numbered by ``block_dims`` and filled by ``inner_dims`` (indices of ``axis``)."""
    return (*block_dims, *inner_dims), len(block_dims)


def reorder(t: torch.Tensor, axis: tuple[int, ...], src: tuple[int, ...], dst: tuple[int, ...]) -> torch.Tensor:
    """Features of ``t`` (d, C) stored in canonical order ``src`` -> stored in order ``dst`` (d, C).

    A copy only when the orders differ; each copied run is a whole column of C contiguous values.
    """
    if src == dst:
        return t
    if t.stride(0) == 1 and t.shape[1] > 1:
        t = t.contiguous()  # a transposed view (d, C) of rows (C, d): PyTorch's blocked 2-D transpose first
    cols = t.shape[1]
    view = t.reshape(*[axis[c] for c in src], cols)
    return view.permute(*[src.index(c) for c in dst], len(src)).reshape(-1, cols)


def chain_forward(t: torch.Tensor, axis: tuple[int, ...], layouts: tuple, blocks: list[torch.Tensor]) -> torch.Tensor:
    """Columns of ``t`` (d, C) as row vectors times ``blockdiag(blocks[0]) ⋯ blockdiag(blocks[-1])`` -> (d, C).

    Each ``blocks[k]`` (n, b, b) acts on the blocks of ``layouts[k]``: a column ``x`` becomes ``Q_kᵀ x`` block-wise.
    """
    natural = tuple(range(len(axis)))
    cur, order = t, natural
    for (lay, _), blk in zip(layouts, blocks):
        cur, order = reorder(cur, axis, order, lay), lay
        n, b, _ = blk.shape
        cur = torch.bmm(blk.transpose(1, 2), cur.reshape(n, b, -1)).reshape(n * b, -1)  # (n, b, b) @ (n, b, C)
    return reorder(cur, axis, order, natural)


def chain_backward(
    t: torch.Tensor,
    grad: torch.Tensor,
    axis: tuple[int, ...],
    layouts: tuple,
    blocks: list[torch.Tensor],
    need_t: bool,
    need_blocks: list[bool],
) -> tuple[torch.Tensor | None, list[torch.Tensor | None]]:
    """Gradients of ``chain_forward(t)`` w.r.t. ``t`` (d, C) and every block (n, b, b), given ``grad`` (d, C).

    The input of every factor is recomputed from ``t`` rather than kept from the forward.
    """
    natural = tuple(range(len(axis)))
    inputs, cur, order = [], t, natural
    for (lay, _), blk in zip(layouts, blocks):
        cur, order = reorder(cur, axis, order, lay), lay
        n, b, _ = blk.shape
        inputs.append(cur.reshape(n, b, -1))  # (n, b, C): the input of this factor, block by block
        if len(inputs) < len(blocks):
            cur = torch.bmm(blk.transpose(1, 2), inputs[-1]).reshape(n * b, -1)
    g = reorder(grad, axis, natural, order)
    grads: list[torch.Tensor | None] = [None] * len(blocks)
    for k in reversed(range(len(blocks))):
        n, b, _ = blocks[k].shape
        gk = g.reshape(n, b, -1)  # (n, b, C)
        if need_blocks[k]:
            grads[k] = torch.bmm(inputs[k], gk.transpose(1, 2))  # (n, b, C) @ (n, C, b) -> (n, b, b)
        if k == 0 and not need_t:
            return None, grads
        g = torch.bmm(blocks[k], gk).reshape(n * b, -1)  # (n, b, b) @ (n, b, C)
        prev = layouts[k - 1][0] if k else natural
        g, order = reorder(g, axis, order, prev), prev
    return g, grads


class _BlockRotation(torch.autograd.Function):
    """Rows ``x`` (T, d) through ``chain_forward``; only ``x`` and the blocks are saved for backward."""

    @staticmethod
    def forward(ctx, x, axis, layouts, *blocks):  # noqa: D102 - autograd protocol
        ctx.axis, ctx.layouts = axis, layouts
        ctx.save_for_backward(x, *blocks)
        return chain_forward(x.t(), axis, layouts, list(blocks)).t()

    @staticmethod
    def backward(ctx, grad):  # noqa: D102 - autograd protocol
        x, *blocks = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, grads = chain_backward(x.t(), grad.t(), ctx.axis, ctx.layouts, blocks, need[0], list(need[3:]))
        return (dx.t() if dx is not None else None, None, None, *grads)


_NATURAL_2D = block_layout([0], [1])  # axis (n, b): n blocks of b consecutive features (OFT, BOFT with m = 1)
# Smallest block for which the token-major backward beats the feature-major one: a (T, b) @ (b, b) product with
# a tiny b (BOFT's 4) wastes most of each BLAS call, while (b, b) @ (b, T) keeps the long T axis innermost.
TOKEN_MAJOR_MIN_BLOCK = 16


def _natural_block_backward(
    x: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor, blocks: torch.Tensor, need_x: bool, need_blocks: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Backward of ``F.linear(x · blockdiag(Q), W)`` for one factor of consecutive-feature blocks, token-major.

    The gradient w.r.t. ``x·R`` is ``gy·W``, taken in the base layer's own GEMM layout (T, out) @ (out, d). Its
    blocks are then used in place as strided (n, T, b) batches (rows of b contiguous values, which BLAS reads
    without a copy): ``∂Q_k = x_kᵀ g_k`` and ``∂x_k = g_k Q_kᵀ``. No (d, T) transpose is ever made, and ``∂x``
    comes back token-major and contiguous, so autograd's sum over x's consumers (q, k, v) stays a plain add.
    """
    n, b = blocks.shape[0], blocks.shape[1]
    dt = blocks.dtype
    x2 = x.reshape(-1, x.shape[-1])
    g = torch.mm(grad.reshape(-1, grad.shape[-1]), weight).to(dt)  # (T, d)
    g3 = g.view(-1, n, b).transpose(0, 1)  # (n, T, b), a strided view
    d_blocks = torch.bmm(x2.to(dt).view(-1, n, b).permute(1, 2, 0), g3) if need_blocks else None  # (n, b, b)
    dx = None
    if need_x:
        dx = torch.bmm(g3, blocks.transpose(1, 2)).transpose(0, 1).reshape(x.shape).to(x.dtype)  # (T, n, b)
    return dx, d_blocks


class _RotatedLinear(torch.autograd.Function):
    """``F.linear(x · R, W, bias)`` computed as ``F.linear(x, W·Rᵀ, bias)`` for a frozen ``W`` and bias.

    Rotating ``W`` (out·d values) instead of every token (T·d) is cheaper when out ≤ T. The backward needs
    ``gy·W``, the gradient w.r.t. ``x·R``, in place of the product ``gy·W'`` a plain linear would compute for
    ``x``; it is computed transposed, (d, T), which is the layout the rotation's gradients want.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, axis, layouts, *blocks):  # noqa: D102 - autograd protocol
        ctx.axis, ctx.layouts = axis, layouts
        ctx.save_for_backward(x, weight, *blocks)
        dt = blocks[0].dtype
        # (W·Rᵀ)ᵀ = R·Wᵀ: the columns of Wᵀ through the transposed factors in reverse order.
        back = [blk.transpose(1, 2) for blk in reversed(blocks)]
        w_rot_t = chain_forward(weight.t().to(dt), axis, tuple(reversed(layouts)), back)  # (d, out)
        return F.linear(x, w_rot_t.t().to(weight.dtype), bias)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102 - autograd protocol
        x, weight, *blocks = ctx.saved_tensors
        need = ctx.needs_input_grad
        dt = blocks[0].dtype
        if ctx.layouts == (_NATURAL_2D,) and len(ctx.axis) == 2 and ctx.axis[1] >= TOKEN_MAJOR_MIN_BLOCK:
            dx, grad_blocks = _natural_block_backward(x, weight, grad, blocks[0], need[0], need[5])
            return (dx, None, None, None, None, grad_blocks)
        g_t = torch.mm(weight.t(), grad.reshape(-1, grad.shape[-1]).t()).to(dt)  # (d, out) @ (out, T) = (gy·W)ᵀ
        x_t = x.reshape(-1, x.shape[-1]).t().to(dt)  # (d, T)
        dx_t, grads = chain_backward(x_t, g_t, ctx.axis, ctx.layouts, blocks, need[0], list(need[5:]))
        dx = dx_t.t().reshape(x.shape).to(x.dtype) if dx_t is not None else None
        return (dx, None, None, None, None, *grads)


def rotate_features(x: torch.Tensor, steps: list[tuple[tuple, torch.Tensor]], axis: tuple[int, ...]) -> torch.Tensor:
    """Row vectors times a product of block-diagonal matrices, never building a d×d matrix.

    Args:
        x: (..., d) with d = prod(``axis``).
        steps: ``(layout, blocks)`` applied left to right: ``x ← x · blockdiag(blocks)``, the blocks (n, b, b)
            acting on the groups of features the layout forms.
        axis: The canonical split of the feature axis (f_0, …, f_k).

    Returns:
        (..., d), the rotated rows.
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])  # (T, d)
    layouts = tuple(layout for layout, _ in steps)
    out = _BlockRotation.apply(x2, tuple(axis), layouts, *(blk for _, blk in steps))
    return out.reshape(*lead, x.shape[-1])


def rotated_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    steps: list[tuple[tuple, torch.Tensor]],
    axis: tuple[int, ...],
) -> torch.Tensor:
    """``F.linear(rotate_features(x, steps, axis), weight, bias)``, rotating whichever of x and W is smaller.

    x (..., d) in the base dtype, weight (out, d), blocks in the adapter dtype -> (..., out).
    """
    tokens = x.numel() // max(x.shape[-1], 1)
    trainable_base = weight.requires_grad or (bias is not None and bias.requires_grad)
    if tokens < weight.shape[0] or (trainable_base and torch.is_grad_enabled()):
        dt = steps[0][1].dtype
        return F.linear(rotate_features(x.to(dt), steps, axis).to(x.dtype), weight, bias)
    layouts = tuple(layout for layout, _ in steps)
    return _RotatedLinear.apply(x, weight, bias, tuple(axis), layouts, *(blk for _, blk in steps))


def block_dropout_mask(n: int, p: float, device: torch.device) -> torch.Tensor:
    """Boolean (n,) mask with exactly ``⌊p·n⌋`` randomly chosen True entries (the blocks to drop)."""
    k = int(p * n)
    return torch.randperm(n, device=device) < k


# ------------------------------------------------------------------------------------------------------------
# Layer


def rotated_size(base: nn.Module, kind: str) -> tuple[int, str]:
    """Size of the space OFT/BOFT rotate on ``base`` and how to describe it in errors."""
    if kind == "linear":
        return base.in_features, f"in_features={base.in_features}"
    if kind == "embedding":
        return base.embedding_dim, f"embedding_dim={base.embedding_dim}"
    kh, kw = base.kernel_size
    cin = base.in_channels // base.groups
    return cin * kh * kw, f"flattened kernel size {cin * kh * kw} (in_channels/groups={cin} × {kh}×{kw})"


def resolve_blocks(config: OFTConfig, d: int, what: str, name: str) -> tuple[int, int]:
    """``(r, b)`` with ``r · b = d`` from the config, or a clear error listing the sizes that fit the layer."""
    given, field = (config.oft_block_size, "oft_block_size") if config.oft_block_size else (config.r, "r")
    if d % given == 0 and given <= d:
        value = given
    elif config.auto_adjust:
        value = peft_nearest_divisor(d, given)
        warnings.warn(
            f"oft: {field}={given} does not divide {what} of {name!r}; using {value} (PEFT's nearest divisor)",
            stacklevel=3,
        )
    else:
        valid = [k for k in divisors(d) if (k > 1 if field == "oft_block_size" else k < d)]
        raise AdapterConfigError(
            f"oft: {field}={given} does not divide {what} of {name!r}; valid {field} values for this layer: "
            f"{valid} (or set auto_adjust=True to take the nearest divisor, as PEFT does silently)"
        )
    b = value if field == "oft_block_size" else d // value
    if b < 2 and not config.auto_adjust:
        valid = [k for k in divisors(d) if k < d] if field == "r" else [k for k in divisors(d) if k > 1]
        raise AdapterConfigError(
            f"oft: {field}={given} gives blocks of 1 feature on {name!r} ({what}), which cannot rotate; "
            f"valid {field} values for this layer: {valid}"
        )
    return d // b, b


_OFT_LAYOUT = block_layout([0], [1])  # the natural order: r blocks of b consecutive features


class OFTLayer(AdapterLayer):
    """OFT on one Linear, Embedding or Conv2d module.

    The parameter ``oft_R`` has PEFT's layout: (r, b(b−1)/2), one row of strictly-upper entries per block, or
    (1, b(b−1)/2) with ``block_share``.
    """

    def __init__(self, base: nn.Module, config: OFTConfig, name: str) -> None:
        super().__init__()
        self.kind = layer_kind(base)
        d, what = rotated_size(base, self.kind)
        self.r, self.block_size = resolve_blocks(config, d, what, name)
        self.d = d
        self.block_share = config.block_share
        self.use_cayley_neumann = config.use_cayley_neumann
        self.num_terms = config.num_cayley_neumann_terms
        self.coft, self.eps = config.coft, float(config.eps)
        self.module_dropout = float(config.module_dropout)
        b = self.block_size
        dt = torch.float32 if base.weight.dtype in (torch.float16, torch.bfloat16) else base.weight.dtype
        n_param_blocks = 1 if self.block_share else self.r
        self.oft_R = nn.Parameter(torch.zeros(n_param_blocks, b * (b - 1) // 2, device=base.weight.device, dtype=dt))
        if config.init_weights is False:
            with torch.no_grad():
                nn.init.normal_(self.oft_R, mean=0.0, std=0.1)
        rows, cols = torch.triu_indices(b, b, 1, device=base.weight.device)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)

    # --- rotation ------------------------------------------------------------------------------------------

    def effective_params(self) -> torch.Tensor:
        """``oft_R`` as the forward uses it: projected into the COFT ball (straight-through gradient) if ``coft``."""
        w = self.oft_R
        if not self.coft:
            return w
        with torch.no_grad():
            projected = coft_project(w, self.eps)
        return w + (projected - w).detach()

    def rotation_blocks(self, dtype: torch.dtype | None = None, dropout: bool = False) -> torch.Tensor:
        """The ``r`` rotation blocks (r, b, b) of ``R_bd`` (shared blocks repeated), in ``dtype``."""
        w = self.effective_params()
        cd = dtype or (torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype)
        q = skew_symmetric(w.to(cd), self.rows, self.cols, self.block_size)  # (n, b, b)
        rot = cayley_neumann(q, self.num_terms) if self.use_cayley_neumann else cayley(q)
        if self.block_share:
            rot = rot.expand(self.r, -1, -1)
        if dropout:
            eye = torch.eye(self.block_size, dtype=rot.dtype, device=rot.device)
            drop = block_dropout_mask(self.r, self.module_dropout, rot.device)
            rot = torch.where(drop[:, None, None], eye, rot)
        return rot

    # --- forward -------------------------------------------------------------------------------------------

    def rotate(self, x: torch.Tensor, blocks: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        """Rows of ``x`` (..., d) times ``R_bd`` (or ``R_bdᵀ``)."""
        blocks = blocks.transpose(1, 2) if transpose else blocks
        return rotate_features(x, [(_OFT_LAYOUT, blocks)], (self.r, self.block_size))

    def adapted_forward(self, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
        dropout = self.training and self.module_dropout > 0.0
        blocks = self.rotation_blocks(dropout=dropout).to(self.oft_R.dtype)  # (r, b, b)
        dt = blocks.dtype
        if self.kind == "embedding":
            out = base._la_base_forward(x)  # (..., d)
            return self.rotate(out.to(dt), blocks).to(out.dtype)
        w = base.weight
        if self.kind == "conv2d":
            w_rot = self.rotate(w.reshape(w.shape[0], -1).to(dt), blocks, transpose=True)  # W·R_bdᵀ (out, d)
            return base._conv_forward(x, w_rot.reshape(w.shape).to(w.dtype), base.bias)
        return rotated_linear(x, w, base.bias, [(_OFT_LAYOUT, blocks)], (self.r, self.block_size))

    # --- merge ---------------------------------------------------------------------------------------------

    def _merged(self, w: torch.Tensor, inverse: bool) -> torch.Tensor:
        """``W·R_bdᵀ`` (``E·R_bd`` for Embedding), or its inverse, computed in float64."""
        blocks = self.rotation_blocks(dtype=torch.float64)
        if inverse:
            blocks = torch.linalg.inv(blocks)  # the Neumann R is not exactly orthogonal
        w64 = w.detach().to(torch.float64)
        if self.kind == "embedding":
            return self.rotate(w64, blocks)
        return self.rotate(w64.reshape(w.shape[0], -1), blocks, transpose=True).reshape(w.shape)

    def merge(self, base: nn.Module, *, safe: bool = False) -> None:
        w = base.weight
        with torch.no_grad():
            write_weight_(w, self._merged(w, inverse=False), safe=safe)
        self.merged = True

    def unmerge(self, base: nn.Module) -> None:
        w = base.weight
        with torch.no_grad():
            w.copy_(self._merged(w, inverse=True).to(w.dtype))
        self.merged = False

    # --- PEFT layout ---------------------------------------------------------------------------------------

    def _peft_key(self) -> str:
        return "oft_embedding_R.weight" if self.kind == "embedding" else "oft_R.weight"

    def peft_state(self) -> dict[str, torch.Tensor]:
        # COFT: write the projected values, which is what PEFT holds after any forward.
        return {self._peft_key(): self.effective_params().detach()}

    def peft_shapes(self) -> dict[str, tuple[int, ...]]:
        return {self._peft_key(): tuple(self.oft_R.shape)}

    def load_peft_state(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.oft_R.copy_(state[self._peft_key()].to(dtype=self.oft_R.dtype, device=self.oft_R.device))

    def extra_repr(self) -> str:
        mode = f"neumann({self.num_terms})" if self.use_cayley_neumann else "cayley"
        share = ", block_share" if self.block_share else ""
        coft = f", coft(eps={self.eps:g})" if self.coft else ""
        return f"{self.kind}, r={self.r}, block_size={self.block_size}, {mode}{share}{coft}, merged={self.merged}"


# ------------------------------------------------------------------------------------------------------------
# PEFT config translation


def _to_peft(cfg: OFTConfig) -> dict[str, Any]:
    return {
        "peft_type": "OFT",
        "r": cfg.r,
        "oft_block_size": cfg.oft_block_size,
        "use_cayley_neumann": cfg.use_cayley_neumann,
        "num_cayley_neumann_terms": cfg.num_cayley_neumann_terms,
        "block_share": cfg.block_share,
        "coft": cfg.coft,
        "eps": cfg.eps,
        "module_dropout": cfg.module_dropout,
        "init_weights": cfg.init_weights,
        "bias": cfg.bias,
        "fan_in_fan_out": False,
        "layers_to_transform": cfg.layers_to_transform,
        "layers_pattern": cfg.layers_pattern,
    }


def _from_peft(d: dict[str, Any]) -> OFTConfig:
    if "oft_block_size" not in d:
        raise AdapterConfigError(
            "oft: the adapter config has no 'oft_block_size', so it was saved by PEFT < 0.14, whose OFT format "
            "PEFT itself no longer reads; retrain the adapter with a recent PEFT or with lightning_adapters"
        )
    return OFTConfig(
        r=d.get("r", 0) or 0,
        oft_block_size=d.get("oft_block_size", 0) or 0,
        use_cayley_neumann=d.get("use_cayley_neumann", True),
        num_cayley_neumann_terms=d.get("num_cayley_neumann_terms", 5),
        block_share=d.get("block_share", False),
        coft=d.get("coft", False),
        eps=d.get("eps", 6e-5),
        module_dropout=d.get("module_dropout", 0.0) or 0.0,
        init_weights=d.get("init_weights", True),
        auto_adjust=True,
        bias=peft_bias(d, "oft_only"),
        **peft_layer_selection(d),
        target_modules=d.get("target_modules"),
        exclude_modules=d.get("exclude_modules"),
        modules_to_save=d.get("modules_to_save"),
    )


SPEC = register(
    MethodSpec(
        name="oft",
        config_cls=OFTConfig,
        peft_type="OFT",
        supported_types=(nn.Linear, nn.Embedding, nn.Conv2d),
        create_layer=OFTLayer,
        config_to_peft=_to_peft,
        config_from_peft=_from_peft,
    )
)
