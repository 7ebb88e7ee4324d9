"""LoKr maths: factorization, factor shapes, the Kronecker ΔW and its identity, conv layouts, init, scaling."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightning_adapters as la
from lightning_adapters.kernels.kronecker import kron_apply
from lightning_adapters.methods.lokr import LoKrConfig, LoKrLayer, factorization
from tests.helpers import Wrap, randomize_adapter


@pytest.mark.parametrize(
    ("dim", "factor", "expected"),
    [
        (32, -1, (4, 8)),
        (48, -1, (6, 8)),
        (64, -1, (8, 8)),
        (768, -1, (24, 32)),
        (3072, -1, (48, 64)),
        (4096, -1, (64, 64)),
        (11008, -1, (86, 128)),
        (14336, -1, (112, 128)),
        (127, -1, (1, 127)),
        (128, 4, (4, 32)),
        (64, 16, (16, 4)),
        (24, 5, (4, 6)),
        (1, -1, (1, 1)),
    ],
)
def test_factorization_table(dim, factor, expected):
    assert factorization(dim, factor) == expected


def _shapes(base, **kw):
    layer = LoKrLayer(base, LoKrConfig(**kw), "m")
    return {n: tuple(p.shape) for n, p in layer.named_parameters()}


def test_factor_shapes_follow_peft_rules():
    assert _shapes(nn.Linear(64, 64), r=4) == {"lokr_w1": (8, 8), "lokr_w2": (8, 8)}
    assert _shapes(nn.Linear(64, 32), r=2) == {"lokr_w1": (4, 8), "lokr_w2_a": (8, 2), "lokr_w2_b": (2, 8)}
    assert _shapes(nn.Linear(64, 64), r=2, decompose_both=True) == {
        "lokr_w1_a": (8, 2),
        "lokr_w1_b": (2, 8),
        "lokr_w2_a": (8, 2),
        "lokr_w2_b": (2, 8),
    }
    assert _shapes(nn.Linear(24, 20), r=2, decompose_factor=2) == {
        "lokr_w1": (2, 2),
        "lokr_w2_a": (10, 2),
        "lokr_w2_b": (2, 12),
    }
    big = _shapes(nn.Linear(4096, 4096, device="meta"), r=8)
    assert big == {"lokr_w1": (64, 64), "lokr_w2_a": (64, 8), "lokr_w2_b": (8, 64)}
    assert sum(torch.Size(s).numel() for s in big.values()) == 5120
    assert _shapes(nn.Conv2d(8, 16, 3), r=1) == {"lokr_w1": (4, 2), "lokr_w2_a": (4, 1), "lokr_w2_b": (1, 36)}
    assert _shapes(nn.Conv2d(8, 16, 3), r=2) == {"lokr_w1": (4, 2), "lokr_w2": (4, 4, 3, 3)}
    assert _shapes(nn.Conv2d(8, 16, 3), r=1, use_effective_conv2d=True) == {
        "lokr_w1": (4, 2),
        "lokr_t2": (1, 1, 3, 3),
        "lokr_w2_a": (1, 4),
        "lokr_w2_b": (1, 4),
    }
    assert _shapes(nn.Conv2d(8, 16, 3, groups=2), r=1)["lokr_w2_b"] == (1, 18)
    assert _shapes(nn.Conv1d(8, 12, 3), r=1, use_effective_conv2d=True)["lokr_t2"] == (1, 1, 3, 1)
    assert _shapes(nn.Conv1d(8, 12, 3), r=4) == {"lokr_w1": (3, 2), "lokr_w2": (4, 4, 3)}


@pytest.mark.parametrize("low_rank", [True, False])
def test_kronecker_identity(low_rank):
    """kron_apply(x, w1, a2, b2) = x · (w1 ⊗ a2·b2)ᵀ, with torch.kron as the oracle."""
    g = torch.Generator().manual_seed(0)
    a, b, c, d, r, n = 3, 5, 4, 6, 2, 7
    x = torch.randn(n, c * d, generator=g, dtype=torch.float64)
    w1 = torch.randn(a, c, generator=g, dtype=torch.float64)
    if low_rank:
        a2, b2 = (
            torch.randn(b, r, generator=g, dtype=torch.float64),
            torch.randn(r, d, generator=g, dtype=torch.float64),
        )
        w2 = a2 @ b2
    else:
        a2, b2 = torch.randn(b, d, generator=g, dtype=torch.float64), None
        w2 = a2
    y = kron_apply(x, w1, a2, b2).reshape(n, a * b)
    assert torch.allclose(y, x @ torch.kron(w1, w2).t(), atol=1e-12)


def _adapted(base, **kw):
    torch.manual_seed(0)
    model = la.inject(Wrap(base), LoKrConfig(target_modules=["layer"], **kw))
    randomize_adapter(model, std=0.3)
    return model, model.layer.adapter.default


def test_scale_is_alpha_over_r_even_with_full_factors():
    """PEFT keeps alpha / r when w1 and w2 are both full (LyCORIS would use 1)."""
    _, layer = _adapted(nn.Linear(64, 64), r=4, alpha=10)
    assert layer.full_w1 and layer.full_w2
    expected = 2.5 * torch.kron(layer.lokr_w1, layer.lokr_w2)
    assert torch.allclose(layer.delta_weight(), expected.detach(), atol=1e-6)


def test_conv1d_effective_form_works_and_is_channel_aligned():
    """Conv1d + use_effective_conv2d (PEFT crashes): ΔW[p·b+q, i·d+j, t] = s · w1[p, i] · W2[q, j, t]."""
    conv = nn.Conv1d(8, 12, 3, padding=1)
    model, layer = _adapted(conv, r=1, alpha=3, use_effective_conv2d=True)
    assert layer.use_cp
    w2 = torch.einsum("ilt,lj,iq->qjt", layer.lokr_t2[..., 0], layer.lokr_w2_b, layer.lokr_w2_a)  # (b, d, k)
    expected = (3.0 * torch.einsum("pi,qjt->pqijt", layer.lokr_w1, w2)).reshape(12, 8, 3).detach()
    assert torch.allclose(layer.delta_weight(), expected, atol=1e-6)
    x = torch.randn(2, 8, 10)
    assert torch.allclose(model(x), F.conv1d(x, conv.weight + expected, conv.bias, padding=1), atol=1e-5)


def test_conv1d_full_w2_uses_peft_kron_layout():
    """On Conv1d with a full w2 PEFT reshapes torch.kron(w1 (a, c), w2 (b, d, k)); kept for file compatibility."""
    _, layer = _adapted(nn.Conv1d(8, 12, 3), r=4, alpha=4)
    assert tuple(layer.lokr_w2.shape) == (4, 4, 3)
    expected = torch.kron(layer.lokr_w1, layer.lokr_w2).reshape(12, 8, 3)
    assert torch.allclose(layer.delta_weight(), expected.detach(), atol=1e-6)


@pytest.mark.parametrize(
    ("init", "zero", "nonzero"),
    [(True, "lokr_w1", "lokr_w2_b"), ("lycoris", "lokr_w2_b", "lokr_w1"), (False, None, "lokr_w1")],
)
def test_inits(init, zero, nonzero):
    layer = LoKrLayer(nn.Linear(64, 32), LoKrConfig(r=2, init_weights=init), "m")
    if zero:
        assert torch.count_nonzero(getattr(layer, zero)) == 0
        assert torch.count_nonzero(layer.delta_weight()) == 0
    else:
        assert torch.count_nonzero(layer.delta_weight()) > 0
    assert torch.count_nonzero(getattr(layer, nonzero)) > 0


@pytest.mark.parametrize("kw", [dict(r=4), dict(r=1), dict(r=1, decompose_both=True)])
@pytest.mark.parametrize("grad", [True, False])
def test_kronecker_path_and_fold_agree(monkeypatch, kw, grad):
    torch.manual_seed(0)
    model, layer = _adapted(nn.Linear(64, 32), **kw)
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(1), requires_grad=grad)
    outs = []
    for choice in (True, False):
        monkeypatch.setattr(LoKrLayer, "_kron_is_cheaper", lambda self, *a, c=choice: c)
        with torch.set_grad_enabled(grad):
            y = model(x)
            grads = torch.autograd.grad(y.pow(2).sum(), [x, *layer.parameters()]) if grad else []
        outs.append((y.detach(), grads))
    assert torch.allclose(outs[0][0], outs[1][0], atol=1e-5)
    for a, b in zip(outs[0][1], outs[1][1]):
        assert (a - b).norm() <= 1e-5 * b.norm()


def test_forward_choice_by_shape():
    """BERT-sized layers at r=8 take the Kronecker path in training; large no-grad batches fold."""
    layer = LoKrLayer(nn.Linear(384, 1536), LoKrConfig(r=8), "m")
    assert layer._kron_is_cheaper(2048, needs_grad=True)
    assert not layer._kron_is_cheaper(2048, needs_grad=False)
    assert layer._kron_is_cheaper(8, needs_grad=False)


@pytest.mark.parametrize("value", [0, -2, 1.5, True])
def test_bad_decompose_factor(value):
    with pytest.raises(la.AdapterConfigError, match="decompose_factor"):
        LoKrConfig(decompose_factor=value)


@pytest.mark.parametrize(("field", "value"), [("decompose_both", 1), ("rank_dropout_scale", "yes")])
def test_bad_flags(field, value):
    with pytest.raises(la.AdapterConfigError, match=field):
        LoKrConfig(**{field: value})
