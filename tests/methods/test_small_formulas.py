"""Small pieces of the methods checked against hand-computed values, where the parity suites reach them only through
many training steps or not at all (each was a surviving mutant, docs/MUTATION.md).
"""

from __future__ import annotations

import pytest
import torch

import lightning_adapters as la
from lightning_adapters.methods.adalora import budget_schedule, update_importance
from tests.helpers import Wrap


def test_adalora_importance_step_is_the_two_ema_updates():
    """``Ī' = β1·Ī + (1-β1)·I`` and ``Ū' = β2·Ū + (1-β2)·|I - Ī'|`` (AdaLoRA, eq. 3-4; PEFT's ``update_ipt``), with
    β1 ≠ β2 and non-zero history so that no coefficient can be swapped or dropped unnoticed. By hand: I = 2, Ī = 1,
    Ū = 0.5, β1 = 0.8, β2 = 0.6 -> Ī' = 0.8 + 0.4 = 1.2, Ū' = 0.3 + 0.4·0.8 = 0.62."""
    sens = torch.tensor([2.0, -1.0])
    ema, unc = update_importance(sens, torch.tensor([1.0, 0.0]), torch.tensor([0.5, 1.0]), 0.8, 0.6)
    # Second element: Ī' = 0.2·(-1) = -0.2, Ū' = 0.6 + 0.4·|-1 + 0.2| = 0.92.
    assert torch.allclose(ema, torch.tensor([1.2, -0.2]), atol=1e-6)
    assert torch.allclose(unc, torch.tensor([0.62, 0.92]), atol=1e-6)


@pytest.mark.parametrize(
    "t, want",
    [
        (1, (12, False)),  # warm-up: t <= tinit
        (2, (12, False)),
        (3, (8, False)),  # cubic: frac = 1 - 1/5 = 0.8 -> int(8·0.512 + 4) = 8; 3 % deltaT != 0
        (4, (5, True)),  # frac = 0.6 -> int(8·0.216 + 4) = 5; masks every deltaT = 2 steps
        (7, (4, False)),  # frac = 0 -> the target
        (8, (4, True)),  # final phase: t > total - tfinal, masks every step
    ],
)
def test_adalora_budget_schedule_by_hand(t, want):
    """init budget 12, target 4, tinit 2, tfinal 3, total 10, deltaT 2 (PEFT's ``budget_schedule``)."""
    assert budget_schedule(t, 12, 4, 2, 3, 10, 2) == want


def test_residual_init_set_again_starts_from_the_original_weight():
    """A residual init (PiSSA) leaves ``W − s·B0·A0`` in the base; setting new factors (a data-driven re-init) first
    gives ``s·B0·A0`` back, so the base is ``W − s·B1·A1``, and ejecting without merging restores ``W``. ``s`` is
    alpha / r = 1.5, so a dropped or doubled scale shows."""
    torch.manual_seed(0)
    model = Wrap(torch.nn.Linear(6, 5))
    w0 = model.layer.weight.detach().clone().double()
    la.inject(model, la.LoRAConfig(r=2, alpha=3.0, init_weights="pissa", target_modules=["layer"]))
    layer = model.layer.adapter["default"]
    s = 1.5
    a0, b0 = layer.init_A.double(), layer.init_B.double()
    assert torch.allclose(model.layer.weight.double(), w0 - s * b0 @ a0, atol=1e-5)
    a1, b1 = torch.randn(2, 6), torch.randn(5, 2)
    layer.set_residual(model.layer, a1, b1)
    assert torch.allclose(model.layer.weight.double(), w0 - s * b1.double() @ a1.double(), atol=1e-5)
    la.eject(model)
    assert torch.allclose(model.layer.weight.double(), w0, atol=1e-5)


@pytest.mark.parametrize("layout", ["mergeable", "peft"])
def test_scaled_grouped_conv_lora_is_the_base_plus_the_scaled_term(layout):
    """``set_scale(s)`` runs LoRA as ``base(x) + s·term(x)`` (its ``delta_output``), on a grouped conv in both
    layouts (PEFT's reads every input channel in ``A``). Truth: the unscaled adapted forward, linear in the term:
    ``y_s = base + s·(y_1 − base)``, and the adapter gradients of ``Σ y_s·g`` are ``s`` times those at 1."""
    torch.manual_seed(0)
    model = Wrap(torch.nn.Conv2d(8, 12, 3, padding=1, groups=4))
    la.inject(model, la.LoRAConfig(r=4, alpha=6.0, grouped_conv_layout=layout, target_modules=["layer"]))
    layer = model.layer.adapter["default"]
    with torch.no_grad():
        layer.lora_B.normal_()
    x, g = torch.randn(2, 8, 5, 5), torch.randn(2, 12, 5, 5)
    with la.disabled(model):
        base = model(x).detach()

    def run():
        model.zero_grad()
        y = model(x)
        (y * g).sum().backward()
        return y.detach(), layer.lora_A.grad.clone(), layer.lora_B.grad.clone()

    y1, ga1, gb1 = run()
    assert not torch.allclose(y1, base)
    la.set_scale(model, "default", 0.25)
    ys, gas, gbs = run()
    assert torch.allclose(ys, base + 0.25 * (y1 - base), atol=1e-5)
    assert torch.allclose(gas, 0.25 * ga1, atol=1e-5) and torch.allclose(gbs, 0.25 * gb1, atol=1e-5)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_set_rank_gives_fresh_factors_of_the_new_rank_and_its_scale(use_rslora):
    """EVA's redistribution: ``set_rank(r, alpha)`` makes ``lora_A (r, in)`` and ``lora_B = 0 (out, r)`` in the old
    factors' dtype, and the scale ``alpha / r`` (rsLoRA: ``alpha / √r``); r = 3 and alpha = 5 so that neither
    ``√r`` nor ``alpha / r`` is a whole number, and the output is the base's (B = 0)."""
    torch.manual_seed(0)
    model = Wrap(torch.nn.Linear(6, 5))
    la.inject(model, la.LoRAConfig(r=2, alpha=4.0, use_rslora=use_rslora, target_modules=["layer"]))
    layer = model.layer.adapter["default"]
    layer.set_rank(3, 5.0)
    assert layer.r == 3 and layer.alpha == 5.0
    assert layer.lora_A.shape == (3, 6) and layer.lora_B.shape == (5, 3)
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32
    assert isinstance(layer.lora_A, torch.nn.Parameter) and isinstance(layer.lora_B, torch.nn.Parameter)
    assert torch.count_nonzero(layer.lora_B) == 0
    assert layer.scale == pytest.approx(5.0 / (3**0.5 if use_rslora else 3))
    with torch.no_grad():
        layer.lora_A.normal_()
        layer.lora_B.normal_()
    x = torch.randn(4, 6)
    want = model.layer.weight @ x.T
    want = want.T + model.layer.bias + layer.scale * x @ layer.lora_A.T @ layer.lora_B.T
    assert torch.allclose(model(x), want, atol=1e-5)
