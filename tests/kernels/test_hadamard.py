"""``kernels.hadamard`` against plain autograd of ``y = x Wᵀ + b + x ((w1a w1b) ⊙ (w2a w2b))ᵀ``.

``rank_r2_linear`` adds the Khatri-Rao product ``A (B x)`` in place when base and adapter share a dtype, and out of
place (in the adapter dtype, cast back) otherwise; ``rank_r2_pays`` decides against folding ``W + ΔW``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_adapters.kernels import hadamard
from tests.kernels.helpers import assert_kernel_matches, leaf


def _factors(out_f: int, n: int, r: int, grads: str) -> list[torch.Tensor]:
    shapes = [(out_f, r), (r, n), (out_f, r), (r, n)]
    return [
        leaf(*s, seed=10 + i, grad=grads != "none" and not (grads == "w2b-frozen" and i == 3))
        for i, s in enumerate(shapes)
    ]


def _base(grad: bool, dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(0)
    base = nn.Linear(9, 7).to(dtype).requires_grad_(grad)
    base._la_base_forward = base.forward
    return base


@pytest.mark.parametrize("grads", ["all", "x-and-factors", "w2b-frozen", "none"])
def test_rank_r2_linear_equals_the_hadamard_formula(grads: str) -> None:
    base = _base(grads == "all")
    x = leaf(2, 5, 9, seed=1, grad=grads in ("all", "x-and-factors"))
    w1a, w1b, w2a, w2b = _factors(7, 9, 3, grads)

    def kernel() -> torch.Tensor:
        a, b = hadamard.khatri_rao_factors(w1a, w1b, w2a, w2b)
        assert a.shape == (7, 9) and b.shape == (9, 9)
        return hadamard.rank_r2_linear(base, x, a, b)

    assert_kernel_matches(
        kernel,
        lambda: base(x) + x @ ((w1a @ w1b) * (w2a @ w2b)).T,
        [x, base.weight, base.bias, w1a, w1b, w2a, w2b],
    )


def test_rank_r2_linear_in_another_adapter_dtype() -> None:
    base = _base(False, torch.float32)
    x = leaf(6, 9, seed=1).float().detach().requires_grad_()
    w1a, w1b, w2a, w2b = _factors(7, 9, 2, "all")
    a, b = hadamard.khatri_rao_factors(w1a, w1b, w2a, w2b)
    out = hadamard.rank_r2_linear(base, x, a, b)
    assert out.dtype == torch.float32
    assert_kernel_matches(
        lambda: out,
        lambda: base(x) + (x.double() @ ((w1a @ w1b) * (w2a @ w2b)).T).float(),
        [x, w1a, w1b, w2a, w2b],
        rtol=1e-6,
        atol=1e-6,
    )


def test_rank_r2_pays_on_both_sides_of_its_thresholds() -> None:
    """Grad: ``3r²(in + out) < in·out``; no grad: ``tokens·r²·(in + out) < (2r + 8)·in·out``."""
    assert not hadamard.rank_r2_pays(2, 24, 23, 1, True)  # 12·47 = 564 >= 552
    assert hadamard.rank_r2_pays(2, 25, 24, 1, True)  # 12·49 = 588 < 600
    # r = 2, 20 x 20: tokens·4·40 < 12·400 = 4800 -> up to 29 tokens
    assert hadamard.rank_r2_pays(2, 20, 20, 29, False)
    assert not hadamard.rank_r2_pays(2, 20, 20, 30, False)
