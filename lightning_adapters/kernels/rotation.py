"""Block rotations for orthogonal fine-tuning (OFT, BOFT): the exact Cayley map and block-diagonal products.

``cayley`` turns skew blocks into rotations with a batched inverse (``UnitSkewInverse``: vectorised
Gauss-Jordan elimination for blocks up to ``GAUSS_JORDAN_MAX_BLOCK``, LAPACK above, and a backward of two batched
products). ``rotate_features`` multiplies row vectors by a chain of block-diagonal matrices, each acting on the
blocks of its own layout of the feature axis (``BlockRotation``), without ever building a ``d×d`` matrix.
``rotated_linear`` runs ``F.linear(x · R, W, b)`` and rotates whichever of ``x`` and ``W`` is smaller: the tokens
(fewer tokens than outputs, or a trainable base), or the weight (``RotatedLinear``, whose backward takes the
gradient of ``x·R`` from ``gy·W``, token-major for blocks of at least ``TOKEN_MAJOR_MIN_BLOCK`` features).
Every kernel saves only its inputs and the blocks for backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Largest block inverted by the batched elimination rather than LAPACK.
GAUSS_JORDAN_MAX_BLOCK = 8


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


class UnitSkewInverse(torch.autograd.Function):
    """``(I + S)⁻¹`` with the backward ``−A⁻ᵀ G A⁻ᵀ`` (two batched products, no second solve)."""

    @staticmethod
    def forward(ctx, a):  # noqa: D102 - autograd protocol
        # Small blocks: the vectorised elimination; large ones: LAPACK (few matrices, real arithmetic).
        inv = unit_skew_inverse(a) if a.shape[-1] <= GAUSS_JORDAN_MAX_BLOCK else torch.linalg.inv(a)
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
    return 2.0 * UnitSkewInverse.apply(q + eye) - eye


def _series_steps(q: torch.Tensor, coeffs: tuple[float, ...]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``Y = Q²`` and the steps of Horner's rule in ``Y`` for ``I + Σ_{k=1..K} c_k Q^k`` (K = len(coeffs) ≥ 2).

    With ``c_0 = 1`` the polynomial is ``Σ_j C_j Y^j``, ``C_j = c_{2j} I + c_{2j+1} Q`` (j = 0 … ⌊K/2⌋), evaluated
    as ``H_j = C_j + Y H_{j+1}`` down to ``R = H_0``. The top step costs no product: ``H_J = C_J`` for odd K, and
    ``H_{J−1} = C_{J−1} + c_K Y`` for even K. Returns ``(Y, [H_top, …, H_0])``, each (n, b, b).
    """
    a = (1.0, *coeffs)  # a[k]: coefficient of Q^k
    top = len(coeffs)
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device).expand_as(q)

    def chunk(j: int) -> torch.Tensor:  # C_j = a_{2j} I + a_{2j+1} Q
        odd = a[2 * j + 1] if 2 * j + 1 <= top else 0.0
        return torch.add(eye * a[2 * j], q, alpha=odd)

    y = torch.bmm(q, q)
    j = top // 2
    if top % 2:
        hs = [chunk(j)]  # H_J = C_J
    else:
        j -= 1
        hs = [chunk(j).add_(y, alpha=a[top])]  # H_{J−1} = C_{J−1} + c_K Y
    for i in range(j - 1, -1, -1):
        hs.append(torch.baddbmm(chunk(i), y, hs[-1]))  # H_i = C_i + Y H_{i+1}
    return y, hs


class NeumannSeries(torch.autograd.Function):
    """``R = I + Σ_k c_k Q^k`` for blocks ``Q`` (n, b, b), keeping only ``Q`` for backward.

    Horner's rule in ``Y = Q²`` (``_series_steps``): PEFT's default 5 terms (``2Q + 2Q² + 2Q³ + Q⁴``) take 2 batched
    products where Horner in ``Q`` or PEFT's powers take 3. The backward recomputes the steps (products of b×b
    blocks, nothing next to a layer's GEMMs) instead of keeping them, then runs the rule in reverse: with
    ``G_0 = ∂R`` and ``G_{j+1} = Yᵀ G_j``, ``∂Q = Σ_j c_{2j+1} G_j + ∂Y Qᵀ + Qᵀ ∂Y`` and ``∂Y = Σ_j G_j H_{j+1}ᵀ``
    (``c_K G_{J−1}`` for the even top step). Autograd through the products would keep every step.
    """

    @staticmethod
    def forward(ctx, q, coeffs):  # noqa: ANN001, ANN205 - autograd protocol
        ctx.coeffs = coeffs
        ctx.save_for_backward(q)
        return _series_steps(q, coeffs)[1][-1]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # noqa: ANN001, ANN205 - autograd protocol
        (q,) = ctx.saved_tensors
        # Under autocast the forward's products ran in the autocast dtype; the backward (which autocast would
        # reach too when it runs inside the autocast region) works in Q's dtype, the dtype of the gradient it returns.
        with torch.autocast(q.device.type, enabled=False):
            return NeumannSeries._grad_q(q, grad.to(q.dtype), ctx.coeffs), None

    @staticmethod
    def _grad_q(q: torch.Tensor, grad: torch.Tensor, coeffs: list[float]) -> torch.Tensor:
        a, top = (1.0, *coeffs), len(coeffs)
        y, hs = _series_steps(q, coeffs)  # [H_top, …, H_0]
        y_t = y.transpose(1, 2)
        g = grad.contiguous()  # G_0
        grad_q = g * a[1]  # c_1 G_0
        grad_y = None
        for j in range(len(hs) - 1):  # H_j = C_j + Y H_{j+1}
            h_next_t = hs[-2 - j].transpose(1, 2)  # H_{j+1}ᵀ
            grad_y = torch.bmm(g, h_next_t) if grad_y is None else grad_y.baddbmm_(g, h_next_t)
            g = torch.bmm(y_t, g)  # G_{j+1}
            if 2 * (j + 1) + 1 <= top:
                grad_q.add_(g, alpha=a[2 * (j + 1) + 1])  # c_{2j+3} G_{j+1} from C_{j+1}
        if top % 2 == 0:  # the top step H_{J−1} = C_{J−1} + c_K Y
            grad_y = g * a[top] if grad_y is None else grad_y.add_(g, alpha=a[top])
        q_t = q.transpose(1, 2)
        return grad_q.baddbmm_(grad_y, q_t).baddbmm_(q_t, grad_y)  # + ∂Y Qᵀ + Qᵀ ∂Y


def recomputes_series(device: torch.device) -> bool:
    """Policy: the series keeps only ``Q`` and recomputes its steps in backward (``NeumannSeries``) on the CPU;
    elsewhere autograd keeps the steps.

    On the CPU a step is bound by arithmetic: the recomputed b×b products are nothing next to a layer's GEMMs,
    and the memory they save keeps OFT's peak under PEFT's on the reference workloads. On a GPU a step of these
    models is bound by the host launching kernels (an H200 runs a 1B Llama's adapted layers faster than Python
    queues them): there the node's Python backward per layer is the cost (OFT 1.03× PEFT's step), and the steps
    autograd keeps, ``r·b²`` elements per layer, are nothing next to the layer's activations.
    """
    return device.type == "cpu"


def neumann_series(q: torch.Tensor, coeffs: list[float]) -> torch.Tensor:
    """``I + Σ_k coeffs[k−1] Q^k`` for blocks ``q`` (n, b, b) -> (n, b, b); see ``NeumannSeries`` and
    ``recomputes_series``."""
    if len(coeffs) >= 2:
        if recomputes_series(q.device):
            return NeumannSeries.apply(q, tuple(coeffs))
        return _series_steps(q, tuple(coeffs))[1][-1]
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device).expand_as(q)
    return torch.add(eye, q, alpha=coeffs[0]) if coeffs else eye.clone()


# Block rotations of a feature axis, computed feature-major: a batch of rows x (T, d) is handled as xᵀ (d, T),
# so every layout change below keeps the token axis contiguous and every block multiply is a (b×b)·(b×T)
# product with a long inner dimension. The feature axis is split into canonical dims ``axis`` = (f_0, …, f_k)
# (d = f_0·…·f_k); a layout is ``(order, n)``: the canonical dims in storage order, of which the first ``n``
# number the blocks and the rest index a feature inside its block. OFT uses axis (r, b) and the natural layout
# ((0, 1), 1), which needs no copy at all; BOFT's butterfly factors split the axis further (``methods.boft``).


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


class BlockRotation(torch.autograd.Function):
    """Rows ``x`` (T, d) through ``chain_forward``; only ``x`` and the blocks are saved for backward.

    One factor of consecutive-feature blocks of at least ``TOKEN_MAJOR_MIN_BLOCK`` features (OFT) runs token-major
    (``natural_block_rotate`` and ``natural_block_grads``): the rotated rows and ``∂x`` come back contiguous
    (T, d), so the base layer's GEMM and autograd's sum of ``∂x`` over the input's consumers (q, k, v) read plain
    rows, not the (d, T) storage of the feature-major chain.
    """

    @staticmethod
    def forward(ctx, x, axis, layouts, *blocks):  # noqa: D102 - autograd protocol
        ctx.axis, ctx.layouts = axis, layouts
        ctx.save_for_backward(x, *blocks)
        if _token_major(axis, layouts):
            return natural_block_rotate(x, blocks[0])
        return chain_forward(x.t(), axis, layouts, list(blocks)).t()

    @staticmethod
    def backward(ctx, grad):  # noqa: D102 - autograd protocol
        x, *blocks = ctx.saved_tensors
        need = ctx.needs_input_grad
        if _token_major(ctx.axis, ctx.layouts):
            dx, d_blocks = natural_block_grads(x, grad, blocks[0], need[0], need[3])
            return (dx, None, None, d_blocks)
        dx, grads = chain_backward(x.t(), grad.t(), ctx.axis, ctx.layouts, blocks, need[0], list(need[3:]))
        return (dx.t() if dx is not None else None, None, None, *grads)


NATURAL_2D = block_layout([0], [1])  # axis (n, b): n blocks of b consecutive features (OFT, BOFT with m = 1)
# Smallest block for which the token-major backward beats the feature-major one: a (T, b) @ (b, b) product with
# a tiny b (BOFT's 4) wastes most of each BLAS call, while (b, b) @ (b, T) keeps the long T axis innermost.
TOKEN_MAJOR_MIN_BLOCK = 16


def _token_major(axis: tuple[int, ...], layouts: tuple) -> bool:
    """Whether a rotation runs token-major: one factor of consecutive-feature blocks of at least
    ``TOKEN_MAJOR_MIN_BLOCK`` features."""
    return layouts == (NATURAL_2D,) and len(axis) == 2 and axis[1] >= TOKEN_MAJOR_MIN_BLOCK


def natural_block_rotate(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """Rows ``x`` (T, d) times ``blockdiag(blocks)`` (n, b, b), token-major -> contiguous (T, d).

    The blocks of every row are used in place as a strided (n, T, b) batch; the product is copied back to rows.
    """
    n, b = blocks.shape[0], blocks.shape[1]
    return torch.bmm(x.reshape(-1, n, b).transpose(0, 1), blocks).transpose(0, 1).reshape(x.shape)


def natural_block_grads(
    x: torch.Tensor, g: torch.Tensor, blocks: torch.Tensor, need_x: bool, need_blocks: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``x · blockdiag(blocks)`` for rows ``x`` (..., d) given ``g`` (T, d), the gradient of the
    product, token-major: ``∂Q_k = x_kᵀ g_k`` (n, b, b) and ``∂x_k = g_k Q_kᵀ`` (contiguous, shaped like ``x``).

    The blocks of ``g`` and ``x`` are used in place as strided (n, T, b) batches (rows of b contiguous values, which
    BLAS reads without a copy); no (d, T) transpose is ever made.
    """
    n, b = blocks.shape[0], blocks.shape[1]
    dt = blocks.dtype
    g3 = g.to(dt).reshape(-1, n, b).transpose(0, 1)  # (n, T, b), a strided view
    d_blocks = torch.bmm(x.to(dt).reshape(-1, n, b).permute(1, 2, 0), g3) if need_blocks else None  # (n, b, b)
    dx = None
    if need_x:
        dx = torch.bmm(g3, blocks.transpose(1, 2)).transpose(0, 1).reshape(x.shape).to(x.dtype)  # (T, n, b)
    return dx, d_blocks


def natural_block_backward(
    x: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor, blocks: torch.Tensor, need_x: bool, need_blocks: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Backward of ``F.linear(x · blockdiag(Q), W)`` for one factor of consecutive-feature blocks, token-major.

    The gradient w.r.t. ``x·R`` is ``gy·W``, taken in the base layer's own GEMM layout (T, out) @ (out, d), then
    ``natural_block_grads``: ``∂x`` comes back token-major and contiguous, so autograd's sum over x's consumers
    (q, k, v) stays a plain add.
    """
    g = torch.mm(grad.reshape(-1, grad.shape[-1]), weight)  # (T, d)
    return natural_block_grads(x, g, blocks, need_x, need_blocks)


class RotatedLinear(torch.autograd.Function):
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
        if _token_major(ctx.axis, ctx.layouts):
            dx, grad_blocks = natural_block_backward(x, weight, grad, blocks[0], need[0], need[5])
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
    out = BlockRotation.apply(x2, tuple(axis), layouts, *(blk for _, blk in steps))
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
    return RotatedLinear.apply(x, weight, bias, tuple(axis), layouts, *(blk for _, blk in steps))
