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
backward computes anyway (``kernels.rotation``). Unmerge inverts the blocks (the Neumann ``R`` is not exactly
orthogonal).
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
    check_positive_float,
    check_positive_int,
    check_probability,
    peft_bias,
    peft_layer_selection,
)
from lightning_adapters.core.dtypes import working_dtype
from lightning_adapters.core.layer import AdapterLayer
from lightning_adapters.core.quant import base_linear, quantized_base
from lightning_adapters.errors import AdapterConfigError
from lightning_adapters.kernels.rotation import block_layout, cayley, neumann_series, rotate_features, rotated_linear
from lightning_adapters.methods._common import (
    block_dropout_mask,
    divisors,
    draw_,
    keyed_cache,
    layer_kind,
    rotated_size,
    tensor_key,
    write_weight_,
)
from lightning_adapters.registry import LayerMethod, register


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


def skew_gather(b: int, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(index, sign)`` (b·b,) such that ``upper[:, index] · sign`` is ``Q = U − Uᵀ`` read row-major.

    Entry ``(i, j)`` takes upper entry ``k`` of ``(i, j)`` (``i < j``, sign +1) or of ``(j, i)`` (``i > j``, sign −1);
    the diagonal reads entry 0 with sign 0.
    """
    rows, cols = torch.triu_indices(b, b, 1, device=device)
    k = torch.arange(rows.numel(), device=device)
    index = torch.zeros(b, b, dtype=torch.long, device=device)
    sign = torch.zeros(b, b, device=device)
    index[rows, cols], index[cols, rows] = k, k
    sign[rows, cols], sign[cols, rows] = 1.0, -1.0
    return index.view(-1), sign.view(-1)


def skew_symmetric(upper: torch.Tensor, index: torch.Tensor, sign: torch.Tensor, b: int) -> torch.Tensor:
    """Blocks of strictly-upper entries (n, b(b−1)/2) -> skew-symmetric ``Q = U − Uᵀ`` (n, b, b).

    One gather and one in-place sign flip (``skew_gather``): half the time of scattering into zeros and subtracting
    the transpose, forward and backward.
    """
    if upper.shape[1] == 0:
        # Blocks of size 1 have no upper entries: Q = 0, still on the autograd graph of the empty parameter.
        return upper.new_zeros(upper.shape[0], b, b) + upper.sum()
    q = torch.index_select(upper, 1, index).mul_(sign.to(upper.dtype))  # (n, b·b)
    return q.view(upper.shape[0], b, b)


def neumann_coefficients(terms: int) -> list[float]:
    """Coefficients of ``Q, Q², …`` in PEFT's truncated series of ``(I + Q)(I − Q)⁻¹`` with ``terms`` terms."""
    if terms <= 1:
        return []
    if terms == 2:
        return [2.0]
    top = max(3, terms - 1)  # PEFT's loop always reaches Q³: 3 and 4 terms give the same series
    return [2.0] * (top - 1) + [1.0]


def cayley_neumann(q: torch.Tensor, terms: int) -> torch.Tensor:
    """``I + Σ_k c_k Q^k`` (n, b, b) with PEFT's Neumann coefficients, by Horner's rule in ``Q²``.

    One autograd node that keeps only ``Q`` for backward (``kernels.rotation.NeumannSeries``): 2 batched products
    for PEFT's default 5 terms where summing powers takes 3, and no intermediate kept (autograd through Horner's
    products in ``Q`` kept every step, more than PEFT's powers).
    """
    return neumann_series(q, neumann_coefficients(terms))


def coft_project(upper: torch.Tensor, eps: float) -> torch.Tensor:
    """Scale each block's skew matrix (given by its upper entries (n, m)) into the Frobenius ball eps/√n."""
    radius = eps / math.sqrt(upper.shape[0])
    norm = upper.norm(dim=1, keepdim=True) * math.sqrt(2.0)  # ||U − Uᵀ||_F = √2 · ||u||
    return upper * torch.where(norm > radius, radius / norm.clamp_min(1e-30), torch.ones_like(norm))


# ------------------------------------------------------------------------------------------------------------
# Layer


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

    not_additive_reason = "it rotates the base weight (W R), which is not a term added to the base output"

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
        dt = working_dtype(base.weight.dtype)
        n_param_blocks = 1 if self.block_share else self.r
        self.oft_R = nn.Parameter(torch.zeros(n_param_blocks, b * (b - 1) // 2, device=base.weight.device, dtype=dt))
        if config.init_weights is False:
            with torch.no_grad():
                draw_(self.oft_R, nn.init.normal_, mean=0.0, std=0.1)
        index, sign = skew_gather(b, base.weight.device)
        self.register_buffer("skew_index", index, persistent=False)
        self.register_buffer("skew_sign", sign, persistent=False)
        # Eval-mode rotation blocks: (key of oft_R, blocks); see ``forward_blocks``.
        self._blocks_cache: tuple[tuple, torch.Tensor] | None = None

    def train(self, mode: bool = True) -> OFTLayer:
        """``nn.Module.train``; also drops the eval-mode rotation blocks."""
        self._blocks_cache = None
        return super().train(mode)

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
        cd = dtype or working_dtype(w.dtype)
        q = skew_symmetric(w.to(cd), self.skew_index, self.skew_sign, self.block_size)  # (n, b, b)
        rot = cayley_neumann(q, self.num_terms) if self.use_cayley_neumann else cayley(q)
        if self.block_share:
            rot = rot.expand(self.r, -1, -1)
        if dropout:
            eye = torch.eye(self.block_size, dtype=rot.dtype, device=rot.device)
            drop = block_dropout_mask(self.r, self.module_dropout, rot.device)
            rot = torch.where(drop[:, None, None], eye, rot)
        return rot

    def forward_blocks(self) -> torch.Tensor:
        """The forward's rotation blocks (r, b, b) in ``oft_R``'s dtype; kept in eval mode while no gradient flows
        to ``oft_R``.

        Keyed by ``oft_R``'s storage, version counter, dtype, device and shape: an optimizer step, a state load, a cast
        or any in-place write through autograd-visible ops rebuilds them (the other inputs, the layer's block layout
        and series settings, are fixed at injection). Not kept: training mode (block dropout, changing weights),
        inside ``torch.compile``, and a forward that records autograd for ``oft_R``.
        """
        R = self.oft_R
        if self.training or torch.compiler.is_compiling() or (R.requires_grad and torch.is_grad_enabled()):
            dropout = self.training and self.module_dropout > 0.0
            return self.rotation_blocks(dropout=dropout).to(R.dtype)
        return keyed_cache(self, "_blocks_cache", tensor_key(R), lambda: self.rotation_blocks().to(R.dtype))

    # --- forward -------------------------------------------------------------------------------------------

    def rotate(self, x: torch.Tensor, blocks: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        """Rows of ``x`` (..., d) times ``R_bd`` (or ``R_bdᵀ``)."""
        blocks = blocks.transpose(1, 2) if transpose else blocks
        return rotate_features(x, [(_OFT_LAYOUT, blocks)], (self.r, self.block_size))

    def adapted_forward(self, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
        blocks = self.forward_blocks()  # (r, b, b)
        dt = blocks.dtype
        if self.kind == "embedding":
            out = base._la_base_forward(x)  # (..., d)
            return self.rotate(out.to(dt), blocks).to(out.dtype)
        if quantized_base(base) is not None:
            # A quantized base: rotate the input and run the layer's own product (no rotated weight-sized copy).
            return base_linear(base, self.rotate(x.to(dt), blocks).to(x.dtype))
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


class OFTMethod(LayerMethod):
    """OFT in the registry."""

    name = "oft"
    config_cls = OFTConfig
    peft_type = "OFT"
    supported_types = (nn.Linear, nn.Embedding, nn.Conv2d)
    create_layer = OFTLayer
    config_to_peft = staticmethod(_to_peft)
    config_from_peft = staticmethod(_from_peft)


register(OFTMethod())
