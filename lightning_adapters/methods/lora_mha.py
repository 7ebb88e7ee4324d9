"""LoRA on ``nn.MultiheadAttention``: the packed input projection and the output projection, as PEFT adapts it.

``nn.MultiheadAttention`` never calls its projections: it hands ``in_proj_weight`` (3E, E) and
``out_proj.weight`` (E, E) to ``F.multi_head_attention_forward``. So the layer adapts both weights::

    W_in' = W_in + s · B A,        A (r, E), B (3E, r)
    W_out' = W_out + 2s · B_o A_o, A_o (r, E), B_o (E, r)   (gradients as for s · B_o A_o)

and runs the module's own forward with ``W_in'``, ``W_out'`` put in place of the two parameters for that call
(differentiable in the four factors; the base parameters are never written). ``ΔW`` merges exactly.

The factor 2 on the output projection is PEFT 0.21.2's arithmetic, kept so its files load with equal outputs:
its MHA layer adds ``out_proj``'s ΔW to the weight and then lets the wrapped ``out_proj`` merge its own ΔW as
well (in place, outside autograd), in the forward and in ``merge`` alike. So a PEFT-trained MHA adapter computes
with ``2s`` while its factors get the gradient of ``s``; the forward here is ``W_out + D + D.detach()`` for
``D = s·B_o·A_o``, equal in value and gradient. As in PEFT
the adapter acts through the weights, so ``dropout`` does not apply; DoRA and the non-standard inits are refused,
and query/key/value must share the embedding size (``_qkv_same_embed_dim``, PEFT's condition too).

PEFT's file keys: ``<mha>.lora_A.weight``, ``<mha>.lora_B.weight``, ``<mha>.base_layer.out_proj.lora_A.weight``,
``<mha>.base_layer.out_proj.lora_B.weight``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lightning_adapters.core.dtypes import working_dtype
from lightning_adapters.core.layer import AdapterLayer
from lightning_adapters.errors import AdapterConfigError
from lightning_adapters.methods._common import (
    check_finite,
    check_rank,
    compute_dtype,
    draw_,
    kaiming_uniform_,
)

_KEYS = {
    "lora_A.weight": "lora_A",
    "lora_B.weight": "lora_B",
    "base_layer.out_proj.lora_A.weight": "out_lora_A",
    "base_layer.out_proj.lora_B.weight": "out_lora_B",
}


class LoRAMultiheadAttentionLayer(AdapterLayer):
    """LoRA factors for ``in_proj_weight`` (``lora_A``, ``lora_B``) and ``out_proj.weight`` (``out_lora_*``)."""

    not_additive_reason = "it folds ΔW into the weights nn.MultiheadAttention reads in its own forward"
    routable = False
    not_routable_reason = "its query, key, value and masks put the batch first or second (batch_first)"

    def __init__(self, base: nn.MultiheadAttention, config: Any, name: str, scale_fn: Any) -> None:
        super().__init__()
        if not base._qkv_same_embed_dim:
            raise AdapterConfigError(
                f"lora: the nn.MultiheadAttention {name!r} has kdim/vdim different from embed_dim (separate q/k/v "
                "projection weights); LoRA adapts the packed in_proj_weight only (as PEFT), so leave it out "
                f"(exclude_modules=[{name!r}])"
            )
        if config.use_dora:
            raise AdapterConfigError(
                f"lora: use_dora=True on the nn.MultiheadAttention {name!r} is not supported (PEFT refuses it too); "
                f"use use_dora=False or exclude_modules=[{name!r}]"
            )
        if getattr(config, "lora_bias", False):
            raise AdapterConfigError(
                f"lora: lora_bias=True on the nn.MultiheadAttention {name!r} is not supported (its projections are "
                f"merged into the weights for every call); use lora_bias=False or exclude_modules=[{name!r}]"
            )
        if config.init_weights not in (True, False, "gaussian", "eva"):
            raise AdapterConfigError(
                f"lora: init_weights={config.init_weights!r} is not available on the nn.MultiheadAttention {name!r}; "
                "use True, False or 'gaussian' there (exclude_modules for the others)"
            )
        e = base.embed_dim
        r = config.rank_for(name)
        check_rank(r, (e, 3 * e), name, "lora")
        alpha = config.alpha_for(name)
        self.kind = "mha"
        self.name = name
        self.r, self.alpha = r, alpha
        self.scale = scale_fn(alpha, r, config.use_rslora)
        self.use_dora = False
        w = base.in_proj_weight
        dt = working_dtype(w.dtype)
        self.lora_A = nn.Parameter(torch.empty(r, e, device=w.device, dtype=dt))
        self.lora_B = nn.Parameter(torch.empty(3 * e, r, device=w.device, dtype=dt))
        self.out_lora_A = nn.Parameter(torch.empty(r, e, device=w.device, dtype=dt))
        self.out_lora_B = nn.Parameter(torch.empty(e, r, device=w.device, dtype=dt))
        mode = True if config.init_weights == "eva" else config.init_weights  # EVA leaves MHA at the default (PEFT)
        with torch.no_grad():
            for a, b in ((self.lora_A, self.lora_B), (self.out_lora_A, self.out_lora_B)):
                if mode == "gaussian":
                    draw_(a, nn.init.normal_, std=1.0 / r)
                else:
                    kaiming_uniform_(a)
                if mode is False:
                    kaiming_uniform_(b)
                else:
                    nn.init.zeros_(b)

    def _deltas(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``s·B·A`` (3E, E) and ``s·B_o·A_o`` (E, E); the output projection takes the second one twice."""
        return (self.lora_B @ self.lora_A) * self.scale, (self.out_lora_B @ self.out_lora_A) * self.scale

    def adapted_forward(self, base: nn.Module, *args: Any, **kwargs: Any) -> Any:
        d_in, d_out = self._deltas()
        w_in, w_out = base.in_proj_weight, base.out_proj.weight
        params, out_params = base._parameters, base.out_proj._parameters
        # The module reads both weights by attribute; for this call they are the adapted (non-leaf) tensors.
        params["in_proj_weight"] = w_in + d_in.to(w_in.dtype)
        d_out = d_out.to(w_out.dtype)
        out_params["weight"] = w_out + d_out + d_out.detach()  # PEFT's 2·D in value, D in gradient
        try:
            return base._la_base_forward(*args, **kwargs)
        finally:
            params["in_proj_weight"], out_params["weight"] = w_in, w_out

    def base_weights(self, base: nn.Module) -> dict[str, torch.Tensor]:
        return {"in_proj_weight": base.in_proj_weight, "out_proj.weight": base.out_proj.weight}

    def merge(self, base: nn.Module, *, safe: bool = False) -> None:
        w_in, w_out = base.in_proj_weight, base.out_proj.weight
        with torch.no_grad():
            d_in, d_out = self._deltas()
            new_in = (w_in.to(compute_dtype(w_in)) + d_in.to(compute_dtype(w_in))).to(w_in.dtype)
            new_out = (w_out.to(compute_dtype(w_out)) + 2 * d_out.to(compute_dtype(w_out))).to(w_out.dtype)
            if safe:  # both checked before either is written
                check_finite(new_in, "merged in_proj_weight")
                check_finite(new_out, "merged out_proj.weight")
            w_in.copy_(new_in)
            w_out.copy_(new_out)
        self.merged = True

    def unmerge(self, base: nn.Module) -> None:
        w_in, w_out = base.in_proj_weight, base.out_proj.weight
        with torch.no_grad():
            d_in, d_out = self._deltas()
            w_in.copy_((w_in.to(compute_dtype(w_in)) - d_in.to(compute_dtype(w_in))).to(w_in.dtype))
            w_out.copy_((w_out.to(compute_dtype(w_out)) - 2 * d_out.to(compute_dtype(w_out))).to(w_out.dtype))
        self.merged = False

    def peft_state(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, v).detach() for k, v in _KEYS.items()}

    def load_peft_state(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for k, v in state.items():
                p = getattr(self, _KEYS[k])
                p.copy_(v.to(dtype=p.dtype, device=p.device))

    def extra_repr(self) -> str:
        return f"mha in_proj + out_proj, r={self.r}, scale={self.scale:g}, merged={self.merged}"
