"""LoHa and LoKr held to the same contract where the two differ only by the method.

Each test runs once per method; the method's own closed forms and model builder come from its contract file.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

import lightning_adapters as la
from lightning_adapters.methods.loha import LoHaConfig, LoHaLayer
from lightning_adapters.methods.lokr import LoKrConfig, LoKrLayer
from tests.helpers import Wrap
from tests.methods import test_loha_contract as loha_tests
from tests.methods import test_lokr_contract as lokr_tests


class Method(NamedTuple):
    """What a shared test needs to know about one method."""

    name: str
    peft_type: str
    config: type
    layer: type
    fast_path: str  # the layer's "is the factored path cheaper" choice, patched to force a path
    r: int  # a small rank the method's tests use
    rank_dropout_kw: dict  # the rank dropout settings its no-mask test uses in eval
    model: Callable
    expected_delta: Callable
    randomize: Callable


METHODS = [
    pytest.param(
        Method(
            "loha",
            "LOHA",
            LoHaConfig,
            LoHaLayer,
            "_rank_r2_is_cheaper",
            2,
            dict(rank_dropout=0.5),
            loha_tests._model,
            loha_tests._expected_delta,
            loha_tests._randomize,
        ),
        id="loha",
    ),
    pytest.param(
        Method(
            "lokr",
            "LOKR",
            LoKrConfig,
            LoKrLayer,
            "_kron_is_cheaper",
            1,
            dict(rank_dropout=0.5, rank_dropout_scale=True),
            lokr_tests._model,
            lokr_tests._expected_delta,
            lokr_tests._randomize,
        ),
        id="lokr",
    ),
]


@pytest.mark.parametrize("m", METHODS)
def test_far_too_large_rank_names_the_layer_and_method(m):
    with pytest.raises(la.AdapterConfigError) as err:
        m.layer(nn.Linear(4, 4), m.config(r=65), "blk.q")
    assert str(err.value).startswith(f"{m.name}: r=65 on 'blk.q'")
    m.layer(nn.Linear(4, 4), m.config(r=64), "blk.q")  # 16 × 4 is still accepted


@pytest.mark.parametrize("m", METHODS)
@pytest.mark.parametrize(
    ("make", "dims"),
    [
        (lambda: nn.Linear(8, 2), (8, 2)),
        (lambda: nn.Conv2d(4, 2, 3, groups=2), (18, 2)),
        (lambda: Conv1D(2, 8), (8, 2)),
    ],
)
def test_rank_limit_is_sixteen_times_the_largest_weight_dimension(m, make, dims):
    limit = 16 * max(dims)
    m.layer(make(), m.config(r=limit), "a.b")
    with pytest.raises(la.AdapterConfigError) as err:
        m.layer(make(), m.config(r=limit + 1), "a.b")
    assert str(err.value) == (
        f"{m.name}: r={limit + 1} on 'a.b' is far above the layer's dimensions {dims} (at most {limit} is "
        f"accepted, nothing was allocated); more than {min(dims)} ranks add no expressiveness, so use "
        f"r <= {min(dims)}"
    )


@pytest.mark.parametrize("m", METHODS)
def test_base_config_checks_run_under_the_method_name(m):
    for kw, msg in [
        (dict(r=0), f"{m.name}: r must be an integer > 0, got 0"),
        (dict(alpha=0), f"{m.name}: alpha must be a finite number > 0, got 0"),
        (dict(rank_pattern={"q": 0}), f"{m.name}: rank_pattern['q'] must be an integer > 0, got 0"),
    ]:
        with pytest.raises(la.AdapterConfigError) as err:
            m.config(**kw)
        assert str(err.value) == msg


@pytest.mark.parametrize("m", METHODS)
def test_registry_entry(m):
    spec = la.get_method(m.name)
    assert (spec.name, spec.peft_type, spec.config_cls, spec.create_layer) == (m.name, m.peft_type, m.config, m.layer)
    assert set(spec.supported_types) >= {nn.Linear, nn.Conv1d, nn.Conv2d, Conv1D}
    assert spec.config_to_peft(m.config(r=2))["peft_type"] == m.peft_type


@pytest.mark.parametrize("m", METHODS)
@pytest.mark.parametrize("path", [True, False])
def test_quantized_base_without_grad_uses_its_own_kernel_exactly(monkeypatch, m, path):
    """int8's own kernel differs from F.linear with the dequantized weight in the last bits: equality pins it."""
    pytest.importorskip("bitsandbytes")
    monkeypatch.setattr(m.layer, m.fast_path, lambda self, *a: path)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(64, 64)

        def forward(self, x):
            return self.layer(x)

    torch.manual_seed(0)
    model = la.quantize(Net(), "int8", skip=[])
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base_out = model(x)
        la.inject(model, m.config(r=4, alpha=8, target_modules=["layer"]))
        assert torch.equal(model(x), base_out)  # zero ΔW: exactly the quantized kernel's output
        layer = m.randomize(model.layer.adapter.default, std=0.05)
        assert torch.allclose(model(x), base_out + F.linear(x, layer.delta_weight()), atol=1e-5)
    # Grad mode on, x needing no gradient: still the quantized kernel plus ΔW x, differentiable in the factors.
    y = model(x)
    assert torch.allclose(y, base_out + F.linear(x, layer.delta_weight()), atol=1e-5)
    y.sum().backward()
    assert all(p.grad is not None for p in layer.parameters())
    xg = x.clone().requires_grad_()
    yg = model(xg)
    assert torch.allclose(yg, base_out + F.linear(x, layer.delta_weight()), atol=1e-3)
    yg.sum().backward()
    assert xg.grad is not None and xg.grad.shape == x.shape


@pytest.mark.parametrize("m", METHODS)
@pytest.mark.parametrize("path", [True, False])
def test_meta_device_training_with_rank_dropout_keeps_the_mask_on_the_factors_device(monkeypatch, m, path):
    """A mask drawn on the CPU must be moved to meta factors before it meets them.

    Autocast has no meta backend, so only its query is stubbed ("off" for meta).
    """
    real = torch.is_autocast_enabled
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda *a: False if a and a[0] == "meta" else real(*a))
    monkeypatch.setattr(m.layer, m.fast_path, lambda self, *a: path)
    model = la.inject(
        Wrap(nn.Linear(24, 20, device="meta")), m.config(r=m.r, rank_dropout=0.5, target_modules=["layer"])
    )
    layer = model.layer.adapter.default
    model.train()
    x = torch.empty(3, 24, device="meta")
    term = layer.delta_output(model.layer, x)
    assert term.device.type == "meta" and term.shape == (3, 20)
    xg = torch.empty(3, 24, device="meta", requires_grad=True)
    y = model(xg)
    assert y.device.type == "meta" and y.shape == (3, 20)
    y.sum().backward()
    assert xg.grad.device.type == "meta"


@pytest.mark.parametrize("m", METHODS)
@pytest.mark.parametrize("path", [True, False])
def test_no_mask_drawn_without_rank_dropout_or_outside_training(monkeypatch, m, path):
    """In eval a forward draws nothing from the default generator; in training without rank dropout it draws only
    PEFT's module-dropout number (one ``torch.rand(1)`` per call, also at module_dropout=0, as PEFT's layers do)."""
    monkeypatch.setattr(m.layer, m.fast_path, lambda self, *a: path)
    for kw, train in [(dict(rank_dropout=0.0), True), (m.rank_dropout_kw, False)]:
        base = nn.Linear(24, 20)
        model, layer = m.model(base, r=m.r, alpha=3, **kw)
        model.train(train)
        x = torch.randn(3, 24)
        state = torch.get_rng_state()
        if train:
            torch.rand(1), torch.rand(1)
        expected_state = torch.get_rng_state()
        torch.set_rng_state(state)
        y = model(x)
        term = layer.delta_output(base, x)
        assert torch.equal(torch.get_rng_state(), expected_state)
        dw = m.expected_delta(layer, base)
        assert torch.allclose(y, F.linear(x, base.weight + dw, base.bias), atol=1e-5)
        assert torch.allclose(term, F.linear(x, dw), atol=1e-5)
