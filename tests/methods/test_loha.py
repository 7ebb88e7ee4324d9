"""LoHa maths: the Hadamard ΔW, its rank-r² form, the CP form, shapes, init and the per-layer forward choice."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightning_adapters as la
from lightning_adapters.kernels.hadamard import khatri_rao_factors
from lightning_adapters.methods.loha import LoHaConfig, LoHaLayer, hadamard_delta, scale_rows
from tests.helpers import Wrap, randomize_adapter


def _factors(out_f=7, n=5, r=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64) for s in [(out_f, r), (r, n), (out_f, r), (r, n)]]


@pytest.mark.parametrize("row_scale", [0.7, "tensor"])
def test_rank_r2_factors_give_the_hadamard_delta(row_scale):
    w1a, w1b, w2a, w2b = _factors()
    scale = torch.linspace(0.0, 2.0, 7, dtype=torch.float64) if row_scale == "tensor" else row_scale
    a, b = khatri_rao_factors(scale_rows(w1a, scale, out_axis=0), w1b, w2a, w2b)
    assert a.shape == (7, 9) and b.shape == (9, 5)
    expected = (w1a @ w1b) * (w2a @ w2b) * (scale.unsqueeze(1) if row_scale == "tensor" else scale)
    assert torch.allclose(a @ b, expected, atol=1e-12)
    assert torch.allclose(hadamard_delta(w1a, w1b, w2a, w2b, scale), expected, atol=1e-12)


def _layer(base, **kw):
    torch.manual_seed(0)
    model = la.inject(Wrap(base), LoHaConfig(target_modules=["layer"], **kw))
    randomize_adapter(model, std=0.3)
    return model, model.layer.adapter.default


def test_shapes_follow_peft_layouts():
    _, lin = _layer(nn.Linear(24, 20), r=3)
    assert {n: tuple(p.shape) for n, p in lin.named_parameters()} == {
        "hada_w1_a": (20, 3),
        "hada_w1_b": (3, 24),
        "hada_w2_a": (20, 3),
        "hada_w2_b": (3, 24),
    }
    _, conv = _layer(nn.Conv2d(8, 16, 3, groups=2), r=3)
    assert tuple(conv.hada_w1_b.shape) == (3, 4 * 9)
    _, cp = _layer(nn.Conv2d(8, 16, 3), r=3, use_effective_conv2d=True)
    assert {n: tuple(p.shape) for n, p in cp.named_parameters()} == {
        "hada_w1_a": (3, 16),
        "hada_w1_b": (3, 8),
        "hada_w2_a": (3, 16),
        "hada_w2_b": (3, 8),
        "hada_t1": (3, 3, 3, 3),
        "hada_t2": (3, 3, 3, 3),
    }
    _, cp1 = _layer(nn.Conv1d(8, 12, 5), r=2, use_effective_conv2d=True)
    assert tuple(cp1.hada_t1.shape) == (2, 2, 5, 1)
    _, pointwise = _layer(nn.Conv2d(8, 16, 1), r=2, use_effective_conv2d=True)
    assert not pointwise.use_cp and tuple(pointwise.hada_w1_a.shape) == (16, 2)


@pytest.mark.parametrize("conv", [nn.Conv2d(6, 10, 3, padding=1), nn.Conv1d(6, 10, 3, padding=1)])
def test_cp_form_equals_fedpara_proposition_3(conv):
    """W_k[p, q, ...] = Σ_ij t_k[i, j, ...] wb_k[j, q] wa_k[i, p]; ΔW = s · W_1 ⊙ W_2 in the kernel's shape."""
    model, layer = _layer(conv, r=2, alpha=5, use_effective_conv2d=True)
    t1, t2 = layer.hada_t1.detach(), layer.hada_t2.detach()
    w1 = torch.einsum("ijkl,jq,ip->pqkl", t1, layer.hada_w1_b.detach(), layer.hada_w1_a.detach())
    w2 = torch.einsum("ijkl,jq,ip->pqkl", t2, layer.hada_w2_b.detach(), layer.hada_w2_a.detach())
    expected = (w1 * w2 * 2.5).reshape(conv.weight.shape)
    assert torch.allclose(layer.delta_weight(), expected, atol=1e-6)
    x = torch.randn(2, 6, *([7] * (conv.weight.dim() - 2)))
    op = F.conv2d if conv.weight.dim() == 4 else F.conv1d
    assert torch.allclose(model(x), op(x, conv.weight + expected, conv.bias, padding=1), atol=1e-5)


def test_merge_adds_the_textbook_delta():
    base = nn.Linear(24, 20)
    w0 = base.weight.detach().clone()
    model, layer = _layer(base, r=3, alpha=7)
    expected = (layer.hada_w1_a @ layer.hada_w1_b) * (layer.hada_w2_a @ layer.hada_w2_b) * (7 / 3)
    la.merge(model)
    assert torch.allclose(base.weight - w0, expected.detach(), atol=1e-6)


def test_default_init_is_identity_and_only_w2_b_learns_first():
    model = la.inject(Wrap(nn.Linear(24, 20)), LoHaConfig(r=3, target_modules=["layer"]))
    layer = model.layer.adapter.default
    assert torch.count_nonzero(layer.hada_w2_b) == 0
    assert all(torch.count_nonzero(getattr(layer, n)) > 0 for n in ("hada_w1_a", "hada_w1_b", "hada_w2_a"))
    model(torch.randn(4, 24)).pow(2).sum().backward()
    assert torch.count_nonzero(layer.hada_w2_b.grad) > 0
    assert all(torch.count_nonzero(getattr(layer, n).grad) == 0 for n in ("hada_w1_a", "hada_w1_b", "hada_w2_a"))
    random = la.inject(Wrap(nn.Linear(24, 20)), LoHaConfig(r=3, target_modules=["layer"], init_weights=False))
    assert torch.count_nonzero(random.layer.adapter.default.delta_weight()) > 0


@pytest.mark.parametrize("grad", [True, False])
def test_rank_r2_and_folded_forms_agree(monkeypatch, grad):
    torch.manual_seed(0)
    model, layer = _layer(nn.Linear(24, 20), r=2)
    x = torch.randn(3, 5, 24, generator=torch.Generator().manual_seed(1), requires_grad=grad)
    outs = []
    for choice in (True, False):
        monkeypatch.setattr(LoHaLayer, "_rank_r2_is_cheaper", lambda self, *a, c=choice: c)
        with torch.set_grad_enabled(grad):
            y = model(x)
            grads = torch.autograd.grad(y.pow(2).sum(), [x, *layer.parameters()]) if grad else []
        outs.append((y.detach(), grads))
    assert torch.allclose(outs[0][0], outs[1][0], atol=1e-5)
    for a, b in zip(outs[0][1], outs[1][1]):
        assert (a - b).norm() <= 1e-5 * b.norm()


def test_forward_choice_by_shape():
    """Wide layers with small r take the rank-r² form in training; square ones and large batches fold."""
    x = torch.zeros(2048, 384)
    wide = LoHaLayer(nn.Linear(384, 1536), LoHaConfig(r=8), "w")
    square = LoHaLayer(nn.Linear(384, 384), LoHaConfig(r=8), "s")
    assert wide._rank_r2_is_cheaper(x, needs_grad=True)
    assert not square._rank_r2_is_cheaper(x, needs_grad=True)
    assert not wide._rank_r2_is_cheaper(x, needs_grad=False)
    assert wide._rank_r2_is_cheaper(x[:4], needs_grad=False)
