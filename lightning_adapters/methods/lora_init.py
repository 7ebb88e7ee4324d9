"""LoRA initialisations beyond the default: PEFT's ``init_lora_weights`` values, as pure functions.

Every init below yields factors ``A (r, in)`` and ``B (out, r)`` for a weight ``W (out, in)`` and a scale
``s`` (``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA). The *residual* inits also replace the base weight by
``W_res = W − s·B·A``, so the adapted layer ``W_res + s·B·A`` starts as exactly the base (to float rounding)
while the adapter holds the weight's principal part:

- ``"pissa"`` (Meng et al. 2024, PiSSA): ``W = U S Vᵀ``; ``A = sqrt(S_r/s)·V_rᵀ``, ``B = U_r·sqrt(S_r/s)``
  (top ``r`` singular triplets). ``"pissa_niter_K"``: the same from ``torch.svd_lowrank`` with ``K`` subspace
  iterations; its random draw is seeded (``PISSA_NITER_SEED``, the global RNG untouched) so the residual is
  the same on every run and rank, and can be rebuilt from the base on load and resume.
- ``"olora"`` (Büyükakyüz 2024, OLoRA): ``W = Q R``; ``B = Q[:, :r]``, ``A = R[:r]``.
- ``"corda"`` (Yang et al. 2024, CorDA): the SVD of ``W C`` (``C`` the covariance of the layer's inputs over
  some batches); ``W C = U S Vᵀ``, ``A = sqrt(S_r/s)·(C⁻¹ V)_rᵀ``, ``B = U_r·sqrt(S_r/s)`` (see ``lora_data``;
  until it runs the layer has the default init and the base is untouched).

Non-residual inits keep ``W`` and start from ``B·A = 0``:

- ``"eva"`` (Paischer et al. 2024, EVA): ``A`` the top principal components of the layer's inputs over some
  batches, ``B = 0``, with the rank budget redistributed between layers by explained variance (see
  ``lora_eva``; until it runs the layer refuses to run).
- ``"orthogonal"``: a random orthogonal ``Q (r, r)``; ``A`` from its odd rows, ``B`` from its even rows, so
  ``B·A = 0`` by orthogonality while neither factor is zero.

``"loftq"`` (Li et al. 2023, LoftQ) replaces the base weight by a quantised one and lets the adapter hold the
quantisation error, alternating ``loftq_iter`` times between bitsandbytes' quantisation (NF4 with blocks of 64, or
int8 per row) and a truncated SVD, as PEFT's ``loftq_init``::

    R = W;  repeat: Q = deq(quant(R)),  W − Q = U S Vᵀ,  B = U_r·sqrt(S_r),  A = sqrt(S_r)·V_rᵀ,  R = W − B·A
    base = Q (the last one),  lora_A = A,  lora_B = B      (not divided by the scale s, as PEFT)

so the base holds values bitsandbytes represents exactly (quantising it again changes nothing) and
``Q + B·A ≈ W``. ``eject`` gives ``W`` back (the layer keeps a copy of it); ``merge`` folds ``s·B·A`` into ``Q``.

Refused by name: ``"lora_ga"`` and ``"mica"`` (not implemented). PEFT files written with ``"eva"`` or
``"lora_ga"`` still load: their saved tensors (and ``rank_pattern``) are a plain LoRA.
As in PEFT, the weight-based inits apply to Linear and transformers ``Conv1D`` layers; an Embedding falls back to
the default init and a convolution is refused.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from lightning_adapters.errors import AdapterConfigError

#: Inits that replace the base weight by ``W − s·B·A``.
RESIDUAL_INITS = ("pissa", "olora", "corda")
#: Inits computed from the layer inputs of a few batches (``lightning_adapters.initialize_from_data``).
DATA_INITS = ("corda", "eva")
_NAMED = ("gaussian", "pissa", "olora", "orthogonal", "corda", "eva", "loftq")
#: ``loftq_bits`` values: bitsandbytes NF4 and int8, the two PEFT's ``loftq_init`` quantises with.
LOFTQ_BITS = (4, 8)
#: Elements per absmax scale of LoftQ's NF4 (bitsandbytes' ``Params4bit`` default, which PEFT uses).
LOFTQ_NF4_BLOCKSIZE = 64
#: Seed of the random test matrix of ``"pissa_niter_K"`` (PEFT's result after ``torch.manual_seed(0)``).
PISSA_NITER_SEED = 0
_PISSA_NITER = re.compile(r"pissa_niter_(\d+)")
#: PEFT 0.21.2 ``init_lora_weights`` values whose only effect is the saved tensors (they load as the default init).
_TENSOR_ONLY_INITS = ("eva", "orthogonal", "lora_ga")
#: Every string PEFT 0.21.2's LoRA layers accept as ``init_lora_weights`` ("gaussian" and "olora" in any case).
_PEFT_INIT_NAMES = (
    "gaussian",
    "pissa",
    "pissa_niter_<K>",
    "olora",
    "loftq",
    "eva",
    "orthogonal",
    "corda",
    "lora_ga",
    "mica",
)
_REFUSED = {
    "lora_ga": "LoRA-GA (gradient-based init) is not implemented; use 'pissa' or 'eva'",
    "mica": "MiCA (trains lora_A only, from the smallest singular vectors) is not implemented",
}


def check_init_weights(value: Any) -> None:
    """Raise ``AdapterConfigError`` unless ``value`` is an ``init_weights`` this library implements."""
    if value is True or value is False:
        return
    if isinstance(value, str):
        if value in _NAMED or _PISSA_NITER.fullmatch(value):
            return
        if value in _REFUSED:
            raise AdapterConfigError(
                f"lora: init_weights={value!r} (PEFT's init_lora_weights) is refused: {_REFUSED[value]}"
            )
    raise AdapterConfigError(
        f"lora: init_weights must be True, False, one of {list(_NAMED)} or 'pissa_niter_<K>', got {value!r}"
    )


def base_mode(value: Any) -> str:
    """The family of an ``init_weights`` value: ``"pissa"`` for ``"pissa_niter_K"``, else the value as a string."""
    return "pissa" if isinstance(value, str) and value.startswith("pissa") else str(value)


def is_residual(value: Any) -> bool:
    """Whether ``value`` replaces the base weight by ``W − s·B·A``."""
    return base_mode(value) in RESIDUAL_INITS


# ------------------------------------------------------------------------------------------------------------
# Factors (all in float32; W is (out, in))


def pissa_factors(weight: torch.Tensor, r: int, scale: float, niter: int | None = None) -> tuple[torch.Tensor, ...]:
    """PiSSA: ``(A, B)`` from the top ``r`` singular triplets of ``W``, each side carrying ``sqrt(S/s)``.

    Args:
        weight: ``W (out, in)``, float32.
        r: Rank.
        scale: The adapter's scale ``s``; ``s·B·A`` is the rank-``r`` truncation of ``W``.
        niter: ``None`` for the exact SVD, else ``torch.svd_lowrank`` with this many subspace iterations.

    Returns:
        ``A (r, in)`` and ``B (out, r)``.
    """
    if niter is None:
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)  # (out, k), (k,), (k, in)
        u, s, vh = u[:, :r], s[:r], vh[:r]
    else:
        with torch.random.fork_rng(devices=[weight.device] if weight.device.type == "cuda" else []):
            torch.manual_seed(PISSA_NITER_SEED)
            u, s, v = torch.svd_lowrank(weight, r, niter=niter)  # (out, r), (r,), (in, r)
        vh = v.t()
    root = (s / scale).sqrt()  # (r,)
    return root[:, None] * vh, u * root[None, :]  # (r, in), (out, r)


def olora_factors(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """OLoRA: ``A = R[:r] (r, in)``, ``B = Q[:, :r] (out, r)`` from ``W = Q R``."""
    q, rr = torch.linalg.qr(weight)  # (out, k), (k, in)
    return rr[:r].contiguous(), q[:, :r].contiguous()


def orthogonal_factors(r: int, in_features: int, out_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthogonal init: ``A (r, in)``, ``B (out, r)`` with ``B·A = 0`` and both non-zero.

    Draws from the global CPU generator in PEFT's order: ``Q`` from an ``(r, r)`` Gaussian, then the ``(in, r/2)``
    and ``(r/2, out)`` Gaussians the odd and even rows of ``Q`` are mixed with.
    """
    q, _ = torch.linalg.qr(torch.randn(r, r))  # orthonormal rows
    q_odd, q_even = q[0::2], q[1::2]  # (r/2, r) each; q_even @ q_odd.T = 0
    a = (torch.randn(in_features, r // 2) @ q_odd).t() / 10.0  # (in, r/2) @ (r/2, r) -> (r, in)
    b = torch.randn(r // 2, out_features).t() @ q_even / 10.0  # (out, r/2) @ (r/2, r) -> (out, r)
    return a.contiguous(), b.contiguous()


def weight_factors(mode: Any, weight: torch.Tensor, r: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` of a weight-based init (``"pissa"``, ``"pissa_niter_K"``, ``"olora"``) for ``W (out, in)``."""
    w = weight.detach().float()
    if mode == "olora":
        return olora_factors(w, r)
    niter = _PISSA_NITER.fullmatch(mode)
    return pissa_factors(w, r, scale, int(niter.group(1)) if niter else None)


def quantize_roundtrip(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """``deq(quant(W))`` in float32 with bitsandbytes: NF4 in blocks of 64 (no double quantisation), or int8 with one
    absmax scale per row of the float16-rounded weight; the two quantisers of PEFT's ``loftq_init``."""
    try:
        import bitsandbytes.functional as bnbf
    except ImportError as err:
        raise AdapterConfigError(
            "lora: init_weights='loftq' quantises with bitsandbytes, which is not installed; pip install bitsandbytes "
            "(CPU or CUDA)"
        ) from err
    w = weight.detach().contiguous()
    if bits == 4:
        packed, state = bnbf.quantize_4bit(
            w.float(), blocksize=LOFTQ_NF4_BLOCKSIZE, compress_statistics=False, quant_type="nf4"
        )
        return bnbf.dequantize_4bit(packed, state).float()
    codes, scales, _ = bnbf.int8_vectorwise_quant(w.to(torch.float16))
    return bnbf.int8_vectorwise_dequant(codes, scales).float()


def loftq_factors(weight: torch.Tensor, r: int, bits: int, iters: int) -> tuple[torch.Tensor, ...]:
    """LoftQ: the quantised base ``Q (out, in)`` and ``A (r, in)``, ``B (out, r)`` with ``Q + B·A ≈ W``, float32.

    Args:
        weight: ``W (out, in)``.
        r: Rank.
        bits: 4 (NF4) or 8 (int8).
        iters: Alternations of quantisation and SVD (``loftq_iter`` >= 1).
    """
    w = weight.detach().float()
    target = w
    for step in range(iters):
        q = quantize_roundtrip(target, bits)  # (out, in)
        u, s, vh = torch.linalg.svd(w - q, full_matrices=False)  # (out, k), (k,), (k, in)
        root = s[:r].sqrt()  # (r,)
        B, A = u[:, :r] * root, root[:, None] * vh[:r]  # (out, r), (r, in)
        if step + 1 < iters:
            target = w - B @ A  # the next quantisation sees W without what the adapter already holds
    return q, A.contiguous(), B.contiguous()


def lora_delta(A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """``s·B·A``: (out, r) @ (r, in) -> (out, in), float32 (scaled on the B side, as PEFT rounds it)."""
    return (scale * B.float()) @ A.float()


def as_plain_lora(
    A: torch.Tensor, B: torch.Tensor, A0: torch.Tensor, B0: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """A residual-init adapter as a plain LoRA of twice the rank on the *unmodified* base.

    ``W_res + s·B·A = W + s·(B·A − B0·A0) = W + s·[B | −B0]·[A ; A0]``, so with ``2r`` and the same scale
    (``alpha`` doubled) the update is exact. Returns ``A' (2r, in)`` and ``B' (out, 2r)``.
    """
    return torch.cat([A, A0.to(A.dtype)], dim=0), torch.cat([B, -B0.to(B.dtype)], dim=1)


def init_from_peft(value: Any) -> Any:
    """``init_weights`` for an adapter read from PEFT's ``init_lora_weights``.

    Inits that change the base (``"pissa"``, ``"pissa_niter_K"``, ``"olora"``, ``"loftq"``) are recomputed on
    load, as PEFT does, so the saved factors land on the same residual / quantised weight (for ``"pissa_niter_K"``
    only up to the randomised SVD's error when the file comes from PEFT, whose draw cannot be repeated). Inits
    whose effect is only the saved tensors (``"eva"``, ``"orthogonal"``, ``"lora_ga"``) load as the default.
    ``"corda"`` needs its calibration data to rebuild the residual: refused, naming the fix. Any other string
    (``"PiSSA"``, ``"pissa_niter_x"``, a typo) is refused naming it, as PEFT refuses to build such a layer: loading
    it as the default init would put factors trained on a residual base onto the unmodified one.
    """
    if isinstance(value, str) and value.lower() in ("olora", "gaussian"):
        value = value.lower()  # PEFT compares these two case-insensitively ("OLoRA")
    if value in (True, False, "gaussian", "pissa", "olora", "loftq") or (
        isinstance(value, str) and _PISSA_NITER.fullmatch(value)
    ):
        return value
    if value == "corda":
        raise AdapterConfigError(
            "lora: this PEFT adapter has init_lora_weights='corda': it was trained on a residual base weight that "
            "only CorDA's calibration data can rebuild. Save it as a plain LoRA instead (PEFT: save_pretrained(..., "
            "path_initial_model_for_weight_conversion=...); here: save_peft(..., convert_to_lora=True)), or inject "
            "LoRAConfig(init_weights='corda') and run initialize_from_data on the same batches before loading "
            "the tensors with load_adapter_state_dict"
        )
    if isinstance(value, str) and value and value not in _TENSOR_ONLY_INITS:  # "" is false to PEFT: no init
        names = ", ".join(repr(v) for v in _PEFT_INIT_NAMES)
        raise AdapterConfigError(
            f"lora: PEFT option init_lora_weights={value!r} is not an initialisation PEFT 0.21.2 knows (PEFT refuses "
            f"to load it too); its values are true, false, {names}: fix init_lora_weights in the adapter_config.json"
        )
    return True


def convert_to_plain_lora(
    layers: dict[str, Any], tensors: dict[str, torch.Tensor], config: dict[str, Any], prefix: str
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Rewrite a LoRA adapter's PEFT tensors and config as a plain LoRA for the *unmodified* base.

    PEFT's ``save_pretrained(path_initial_model_for_weight_conversion=...)``: every factor pair becomes
    ``[A ; A0]``, ``[B | −B0]`` (``as_plain_lora``; ``A0 = B0 = 0`` where the init left the base alone), the rank
    doubles and ``alpha`` follows so the scale is unchanged (×2, or ×√2 with rsLoRA); ``init_lora_weights``
    becomes ``True``; ``rank_pattern`` and ``alpha_pattern`` follow the same rule.

    Args:
        layers: ``{module name: LoRALayer}``.
        tensors: ``peft_tensors`` output (keys ``<prefix><module>.<suffix>``).
        config: ``peft_config_dict`` output.
        prefix: PEFT's key prefix (``base_model.model.``).
    """
    loftq = [name for name, layer in layers.items() if getattr(layer, "init_mode", None) == "loftq"]
    if loftq:
        raise AdapterConfigError(
            f"save_peft(convert_to_lora=True): {loftq[:3]} hold LoftQ adapters, trained on the quantised base Q, not "
            "a low-rank residual of W, so no plain LoRA of the original base equals them (PEFT cannot convert them "
            "either); save without convert_to_lora (the file recomputes Q from the original base on load)"
        )
    # LoRA on nn.MultiheadAttention and on target_parameters takes no residual init (PiSSA, OLoRA, CorDA are refused
    # there), so an adapter holding such layers has nothing to convert; their tensors are not in this layout either.
    # Those layer classes lack the residual-init bookkeeping (``check_initialized``, ``init_A``) that LoRALayer has;
    # asking for it instead of importing LoRALayer keeps this module out of an import cycle with methods/lora.py.
    other = [name for name, layer in layers.items() if not callable(getattr(layer, "check_initialized", None))]
    if other:
        raise AdapterConfigError(
            f"save_peft(convert_to_lora=True): {other[:3]} hold LoRA on nn.MultiheadAttention or on "
            "target_parameters, which never has a residual init to convert; save without convert_to_lora"
        )
    out = dict(tensors)
    for name, layer in layers.items():
        layer.check_initialized()
        a_key = next(k for k in (f"{prefix}{name}.lora_A.weight", f"{prefix}{name}.lora_embedding_A") if k in out)
        b_key = a_key.replace("lora_A.weight", "lora_B.weight").replace("lora_embedding_A", "lora_embedding_B")
        A, B = out[a_key], out[b_key]
        if layer.init_A is not None:
            A0, B0 = layer.init_A.detach().to("cpu", A.dtype), layer.init_B.detach().to("cpu", B.dtype)
        else:
            A0, B0 = torch.zeros_like(A), torch.zeros_like(B)
        out[a_key], out[b_key] = as_plain_lora(A, B, A0, B0)
    grow = 2**0.5 if config.get("use_rslora") else 2.0
    config = dict(config)
    config.pop("corda_config", None)
    config.update(
        init_lora_weights=True,
        r=2 * config["r"],
        lora_alpha=config["lora_alpha"] * grow,
        rank_pattern={k: 2 * v for k, v in (config.get("rank_pattern") or {}).items()},
        alpha_pattern={k: v * grow for k, v in (config.get("alpha_pattern") or {}).items()},
    )
    return out, config
