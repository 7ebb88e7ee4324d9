"""``layers_to_transform`` / ``layers_pattern`` select the same modules as PEFT's own filter.

The model mimics a transformers layout (``model.layers.<i>``, 11 layers so that ``layers.1`` is a prefix of
``layers.10``, and a second list ``model.blocks.<i>``); ``target_modules=["proj"]`` must not reach ``out_proj``.
The truth is PEFT: the modules its ``get_peft_model`` gives a ``lora_A`` for the same config. The index given as
an int and as a list, with no pattern (the index after the second name segment), a pattern as a string and as a
list, each asserted as the exact set of adapted modules.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from torch import nn

import lightning_adapters as la
from lightning_adapters.core.inject import adapted_modules


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.out_proj = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(self.proj(x))


class Inner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Block() for _ in range(11))
        self.blocks = nn.ModuleList(Block() for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in [*self.layers, *self.blocks]:
            x = block(x)
        return x


class Outer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.model = Inner()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


CASES = [
    (1, None),
    ([1, 10], None),
    ([1], "layers"),
    ([0, 2], ["blocks"]),
    ([2, 10], ["layers", "blocks"]),
]


@pytest.mark.parametrize("layers_to_transform, layers_pattern", CASES, ids=lambda v: repr(v))
def test_layer_selection_equals_pefts(layers_to_transform, layers_pattern):
    torch.manual_seed(0)
    base = Outer()
    theirs = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoraConfig(
            r=2, target_modules=["proj"], layers_to_transform=layers_to_transform, layers_pattern=layers_pattern
        ),
    )
    prefix = "base_model.model."
    want = {n[len(prefix) :] for n, m in theirs.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    ours = la.inject(
        copy.deepcopy(base),
        la.LoRAConfig(
            r=2, target_modules=["proj"], layers_to_transform=layers_to_transform, layers_pattern=layers_pattern
        ),
    )
    got = {name for name, _, _ in adapted_modules(ours)}
    assert want and got == want
