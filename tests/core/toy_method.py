"""A complete toy method in one file, as a new method is written: output scaling of a Linear layer.

Maths: ``y = (1 + g) ⊙ (W x + b)`` with a learned ``g (out,)``, zero at init (so the model starts as the base).
Merging scales the rows of ``W`` and ``b`` by ``1 + g``; unmerging divides them back.

The tests never import this file from ``tests/``: they copy it into a temporary folder (a plugin package, or a
folder added to ``lightning_adapters.methods``) with a registry of their own, so the library's registry never holds
it. It uses only public pieces of the engine: ``AdapterConfig``, ``AdapterLayer``, ``LayerMethod``, ``register``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_adapters.config import AdapterConfig, check_positive_float
from lightning_adapters.core.layer import AdapterLayer
from lightning_adapters.errors import MergeError
from lightning_adapters.registry import LayerMethod, register

NAME = "toy_scale"


@dataclass
class ToyScaleConfig(AdapterConfig):
    """Toy output scaling.

    Attributes:
        lr_scale: A positive number kept in the PEFT-style config (shows a method field's round trip).
    """

    lr_scale: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_float(self.lr_scale, "lr_scale", NAME)


class ToyScaleLayer(AdapterLayer):
    """``(1 + g) ⊙ base(x)`` on one Linear."""

    def __init__(self, base: nn.Linear, config: ToyScaleConfig, module_name: str) -> None:
        super().__init__()
        self.g = nn.Parameter(torch.zeros(base.out_features, device=base.weight.device))  # (out,)

    def adapted_forward(self, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return base._la_base_forward(x) * (1 + self.g).to(x.dtype)  # (..., out) * (out,)

    def base_weights(self, base: nn.Module) -> dict[str, torch.Tensor]:
        return {"weight": base.weight, **({"bias": base.bias} if base.bias is not None else {})}

    def merge(self, base: nn.Module, *, safe: bool = False) -> None:
        scale = (1 + self.g.detach()).to(base.weight.dtype)  # (out,)
        if safe and not bool(torch.isfinite(base.weight * scale[:, None]).all()):
            raise MergeError("the scaled weight is not finite")
        with torch.no_grad():
            for t in self.base_weights(base).values():
                t.mul_(scale.view(-1, *[1] * (t.dim() - 1)))  # row i times 1 + g_i
        self.merged = True

    def unmerge(self, base: nn.Module) -> None:
        scale = (1 + self.g.detach()).to(base.weight.dtype)
        with torch.no_grad():
            for t in self.base_weights(base).values():
                t.div_(scale.view(-1, *[1] * (t.dim() - 1)))
        self.merged = False


class ToyScaleMethod(LayerMethod):
    """The toy method in the registry."""

    name = NAME
    config_cls = ToyScaleConfig
    peft_type = "TOY_SCALE"
    supported_types = (nn.Linear,)
    create_layer = ToyScaleLayer

    def config_to_peft(self, config: ToyScaleConfig) -> dict[str, Any]:
        return {"peft_type": self.peft_type, "lr_scale": config.lr_scale}

    def config_from_peft(self, fields: dict[str, Any]) -> ToyScaleConfig:
        return ToyScaleConfig(target_modules=fields.get("target_modules"), lr_scale=fields.get("lr_scale", 1.0))


register(ToyScaleMethod())
