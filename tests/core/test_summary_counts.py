"""``summary``'s last lines: trainable and total parameters and their share, counted by hand on one Linear."""

from __future__ import annotations

import torch

import lightning_adapters as la
from tests.helpers import Wrap


def test_summary_counts_trainable_parameters_and_their_share():
    # Linear(6, 5): 30 + 5 frozen; LoRA r = 2: A (2, 6) + B (5, 2) = 22 trainable; 22 / 57 = 38.5965 %.
    model = la.inject(Wrap(torch.nn.Linear(6, 5)), la.LoRAConfig(r=2, target_modules=["layer"]))
    assert "trainable params: 22 of 57 (38.5965%)" in la.summary(model)
