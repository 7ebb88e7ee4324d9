"""LoRA on bare ``nn.Parameter``s (``target_parameters``): e.g. the fused 3-D expert weights of MoE models.

transformers v5 stores the experts of a mixture-of-experts block as 3-D parameters (``gate_up_proj`` (E, 2I, H),
``down_proj`` (E, H, I)) read by the block's own forward, with no ``nn.Linear`` to adapt. The layer, attached to
the module owning the parameters, adds a low-rank update per expert and runs the module's forward with
``W + ΔW`` in place of each adapted parameter for that call (differentiable in the factors; ``W`` itself is never
written). ``ΔW`` merges exactly.

Factor layouts are PEFT 0.21's (``ParamWrapper``), so its files load unchanged. For a parameter ``W`` (E, d1, d2)
(not marked ``is_transposed``) with rank ``r``: ``A`` (r·E, d2) and ``B`` (d1, r·E), and for expert ``e``::

    ΔW[e] = s · B[:, e::E] @ A[e·r:(e+1)·r]          (d1, d2): A's rows are blocked by expert, B's columns interleaved

With ``is_transposed`` the roles swap: ``A`` (r·E, d1), ``B`` (d2, r·E), ``ΔW[e] = s · (B[:, e::E] A_e)ᵀ``. A 2-D
parameter (d1, d2) is an ordinary LoRA: ``A`` (r, d2), ``B`` (d1, r). Several parameters of one module nest in PEFT
(one wrapper per parameter, in the module's parameter order, the first innermost), which gives the file keys:
the last parameter's factors are ``<module>.lora_A.weight``, the one before ``<module>.base_layer.lora_A.weight``...

As in PEFT: no dropout, no DoRA, and only the standard inits (``True``, ``False``, ``"gaussian"``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lightning_adapters.core.dtypes import working_dtype
from lightning_adapters.core.layer import AdapterLayer
from lightning_adapters.errors import AdapterConfigError, TargetError
from lightning_adapters.methods._common import check_finite, compute_dtype, draw_, kaiming_uniform_


def check_target_parameters(value: Any) -> None:
    """``target_parameters``: None or a non-empty list of ``"<module suffix>.<parameter name>"`` strings."""
    if value is None:
        return
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not value:
        ok = False
    else:
        ok = all(isinstance(v, str) and "." in v and not v.startswith(".") for v in value)
    if not ok:
        raise AdapterConfigError(
            f"lora: target_parameters={value!r} must be a non-empty list of '<module>.<parameter>' names, e.g. "
            "['experts.gate_up_proj', 'experts.down_proj']"
        )


class _Factors:
    """Shapes and ΔW of one adapted parameter (see the module docstring)."""

    def __init__(self, shape: tuple[int, ...], transposed: bool, r: int) -> None:
        if len(shape) not in (2, 3):
            raise ValueError(len(shape))
        self.experts = shape[0] if len(shape) == 3 else 1
        self.ndim = len(shape)
        self.transposed = transposed and len(shape) == 3
        if len(shape) == 2:
            in_f, out_f = shape[1], shape[0]
        elif self.transposed:
            in_f, out_f = shape[1], shape[2]
        else:
            in_f, out_f = shape[2], shape[1]
        self.a_shape, self.b_shape = (r * self.experts, in_f), (out_f, r * self.experts)

    def delta(self, A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
        if self.ndim == 2:
            return (B @ A) * scale
        e = self.experts
        a = A.reshape(e, -1, A.shape[-1])  # (E, r, in)
        b = B.reshape(B.shape[0], -1, e).permute(2, 0, 1)  # (E, out, r)
        d = torch.bmm(b, a) * scale  # (E, out, in)
        return d.transpose(1, 2) if self.transposed else d


class LoRAParamLayer(AdapterLayer):
    """LoRA factors for some ``nn.Parameter``s of one module (``lora_A[name]``, ``lora_B[name]``)."""

    not_additive_reason = "it folds ΔW into parameters the module reads in its own forward"
    routable = False
    not_routable_reason = "the module reads the adapted parameters whole, with no batch dimension to split"

    def __init__(self, module: nn.Module, names: list[str], config: Any, module_name: str, scale_fn: Any) -> None:
        super().__init__()
        for field, value, ok in (
            ("dropout", config.dropout, 0.0),
            ("use_dora", config.use_dora, False),
            ("lora_bias", getattr(config, "lora_bias", False), False),
        ):
            if value != ok:
                raise AdapterConfigError(
                    f"lora: {field}={value!r} does not work with target_parameters ({module_name!r}), as in PEFT; "
                    f"use {field}={ok!r}"
                )
        if config.init_weights not in (True, False, "gaussian"):
            raise AdapterConfigError(
                f"lora: init_weights={config.init_weights!r} does not work with target_parameters ({module_name!r}); "
                "use True, False or 'gaussian'"
            )
        self.kind = "parameter"
        self.names = list(names)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.scales: dict[str, float] = {}
        self._factors: dict[str, _Factors] = {}
        transposed = bool(getattr(module, "is_transposed", False))
        for n in self.names:
            w = module._parameters[n]
            full = f"{module_name}.{n}"
            if w.dim() not in (2, 3):
                raise AdapterConfigError(
                    f"lora: target_parameters selects {full!r}, a {w.dim()}-D parameter; only 2-D and 3-D (stacked "
                    "experts) parameters can take LoRA"
                )
            r = config.rank_for(full)
            alpha = config.alpha_for(full)
            self.scales[n] = scale_fn(alpha, r, config.use_rslora)
            f = _Factors(tuple(w.shape), transposed, r)
            self._factors[n] = f
            dt = working_dtype(w.dtype)
            A = torch.empty(f.a_shape, device=w.device, dtype=dt)
            B = torch.empty(f.b_shape, device=w.device, dtype=dt)
            with torch.no_grad():
                if config.init_weights == "gaussian":
                    draw_(A, nn.init.normal_, std=1.0 / r)
                else:
                    kaiming_uniform_(A)
                if config.init_weights is False:
                    kaiming_uniform_(B)
                else:
                    nn.init.zeros_(B)
            self.lora_A[n], self.lora_B[n] = nn.Parameter(A), nn.Parameter(B)

    def _delta(self, n: str) -> torch.Tensor:
        return self._factors[n].delta(self.lora_A[n], self.lora_B[n], self.scales[n])

    def adapted_forward(self, base: nn.Module, *args: Any, **kwargs: Any) -> Any:
        params = base._parameters
        originals = {n: params[n] for n in self.names}
        try:
            for n, w in originals.items():
                params[n] = w + self._delta(n).to(w.dtype)  # read by attribute in the module's forward
            return base._la_base_forward(*args, **kwargs)
        finally:
            params.update(originals)

    def base_weights(self, base: nn.Module) -> dict[str, torch.Tensor]:
        return {n: base._parameters[n] for n in self.names}

    def merge(self, base: nn.Module, *, safe: bool = False) -> None:
        with torch.no_grad():
            new = {}
            for n, w in self.base_weights(base).items():
                cd = compute_dtype(w)
                new[n] = (w.to(cd) + self._delta(n).to(cd)).to(w.dtype)
                if safe:  # every parameter checked before any is written
                    check_finite(new[n], f"merged {n}")
            for n, w in self.base_weights(base).items():
                w.copy_(new[n])
        self.merged = True

    def unmerge(self, base: nn.Module) -> None:
        with torch.no_grad():
            for n, w in self.base_weights(base).items():
                cd = compute_dtype(w)
                w.copy_((w.to(cd) - self._delta(n).to(cd)).to(w.dtype))
        self.merged = False

    def _prefix(self, n: str) -> str:
        return "base_layer." * (len(self.names) - 1 - self.names.index(n))

    def peft_state(self) -> dict[str, torch.Tensor]:
        out = {}
        for n in self.names:
            out[f"{self._prefix(n)}lora_A.weight"] = self.lora_A[n].detach()
            out[f"{self._prefix(n)}lora_B.weight"] = self.lora_B[n].detach()
        return out

    def load_peft_state(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for n in self.names:
                for key, p in (("lora_A.weight", self.lora_A[n]), ("lora_B.weight", self.lora_B[n])):
                    v = state.get(self._prefix(n) + key)
                    if v is not None:
                        p.copy_(v.to(dtype=p.dtype, device=p.device))

    def extra_repr(self) -> str:
        return f"parameters={self.names}, merged={self.merged}"


def param_layers(model: nn.Module, config: Any, targets: list[str], scale_fn: Any) -> dict[str, LoRAParamLayer]:
    """The ``LoRAParamLayer`` of every module owning a parameter ``config.target_parameters`` selects.

    A parameter ``<module>.<name>`` is selected by an entry equal to it or ending it after a dot (PEFT's rule).

    Raises:
        TargetError: An entry selects nothing, or selects a parameter of a module that is also a LoRA target.
    """
    wanted = config.target_parameters
    if not wanted:
        return {}
    chosen: dict[str, list[str]] = {}
    used: set[str] = set()
    for module_name, module in model.named_modules():
        for pname, _ in module.named_parameters(recurse=False):
            key = f"{module_name}.{pname}" if module_name else pname
            hits = [t for t in wanted if key == t or key.endswith("." + t)]
            if hits:
                used.update(hits)
                chosen.setdefault(module_name, []).append(pname)
    missing = [t for t in wanted if t not in used]
    if missing:
        raise TargetError(
            f"lora: target_parameters {missing} match no parameter of the model; give '<module>.<parameter>' "
            "names such as 'experts.gate_up_proj' (see model.named_parameters())"
        )
    layers = {}
    for module_name, names in chosen.items():
        if not module_name or module_name in targets:
            raise TargetError(
                f"lora: target_parameters selects {names} of {module_name or 'the top-level module'!r}, which "
                + ("is also in target_modules; choose one" if module_name else "cannot carry an adapter")
            )
        layers[module_name] = LoRAParamLayer(model.get_submodule(module_name), names, config, module_name, scale_fn)
    return layers
