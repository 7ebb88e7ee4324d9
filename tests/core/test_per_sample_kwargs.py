"""``per_sample`` hands a module's keyword arguments to the adapters, routed by row like positional ones; so does
every other branch of the adapted forward (stacked, scaled, disabled adapters).

The built-in layers take their input positionally; a method's ``adapted_forward`` may take ``*args, **kwargs``
(the ``AdapterLayer`` signature), so the engine must pass a keyword input on. The toy method of
``tests/core/toy_method.py`` (``(1 + g) ⊙ base(x)``), given such a forward, on a Linear called as
``layer(input=x)``. Truth: each row alone with its adapter active.
"""

from __future__ import annotations

import importlib
import shutil
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import lightning_adapters as la
from lightning_adapters import registry

TOY = Path(__file__).with_name("toy_method.py")


@pytest.fixture
def toy_method(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """The toy module imported from a temporary copy into a copy of the registry, both dropped after the test.

    Importing ``tests/core/toy_method.py`` itself (at collection) would register ``toy_scale`` for the whole
    session and break the discovery tests of ``test_new_method.py``, which expect to register it themselves."""
    registry.available_methods()
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    shutil.copy(TOY, tmp_path / "toy_scale_kwargs.py")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield importlib.import_module("toy_scale_kwargs")
    sys.modules.pop("toy_scale_kwargs", None)


class KeywordCall(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(8, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(input=x)


def _adapted_forward(self, base: nn.Module, *args, **kwargs) -> torch.Tensor:
    return base._la_base_forward(*args, **kwargs) * (1 + self.g)


def test_per_sample_routes_rows_given_by_keyword(monkeypatch, toy_method):
    monkeypatch.setattr(toy_method.ToyScaleLayer, "adapted_forward", _adapted_forward)
    torch.manual_seed(0)
    model = KeywordCall()
    for name in ("a", "b"):
        la.inject(model, toy_method.ToyScaleConfig(target_modules=["layer"]), name=name)
    with torch.no_grad():
        model.layer.adapter["a"].g.normal_()
        model.layer.adapter["b"].g.normal_()
    x = torch.randn(3, 8)
    names = ["a", "b", "a"]
    want = []
    for row, name in zip(x, names):
        la.set_active(model, name)
        want.append(model(row[None]))
    with la.per_sample(model, names):
        got = model(x)
    assert torch.allclose(got, torch.cat(want), atol=1e-6)


def _delta_output(self, base: nn.Module, *args, **kwargs) -> torch.Tensor:
    return base._la_base_forward(*args, **kwargs) * self.g


def _two_adapters(monkeypatch, toy_method, **layer_attrs) -> KeywordCall:
    """``KeywordCall`` with toy adapters ``a`` and ``b`` (random ``g``) on its layer, the toy layer class patched with
    ``layer_attrs`` (``adapted_forward``, ``delta_output``, ``additive``, ``dense_term``)."""
    for attr, value in layer_attrs.items():
        monkeypatch.setattr(toy_method.ToyScaleLayer, attr, value)
    torch.manual_seed(0)
    model = KeywordCall()
    for name in ("a", "b"):
        la.inject(model, toy_method.ToyScaleConfig(target_modules=["layer"]), name=name)
        with torch.no_grad():
            model.layer.adapter[name].g.normal_()
    return model


# (additive, dense_term, names of the rows, set_scale of "a"): each reaches another branch of the routed forward
# (core/routing.py) with the input given by keyword: the base alone, base + Σ terms, one forward per group of rows
# (base rows included), and a scaled group there.
ROUTES = {
    "base-only": (True, False, ["__base__", "__base__", "__base__"], 1.0),
    "additive-terms": (True, False, ["a", "b", "__base__", "a"], 0.5),
    "per-group": (False, False, ["a", "b", "__base__", "a"], 1.0),
    "per-group-scaled": (True, True, ["a", "b", "__base__", "a"], 0.5),
}


@pytest.mark.parametrize("route", sorted(ROUTES))
def test_every_routed_branch_passes_a_keyword_input_on(monkeypatch, toy_method, route):
    """Truth: the toy's closed form per row, ``(1 + s·g_name) ⊙ (W x + b)`` (``g = 0`` for ``"__base__"``), with
    ``s`` the ``set_scale`` of the row's adapter; gradients of x and of each ``g`` against autograd of that form."""
    additive, dense, names, scale = ROUTES[route]
    model = _two_adapters(
        monkeypatch,
        toy_method,
        adapted_forward=_adapted_forward,
        delta_output=_delta_output,
        additive=additive,
        dense_term=dense,
    )
    la.set_trainable(model, ["a", "b"])
    if scale != 1.0:
        la.set_scale(model, "a", scale)
    x = torch.randn(len(names), 8, requires_grad=True)
    w, b = model.layer.weight, model.layer.bias
    g = {"a": model.layer.adapter["a"].g, "b": model.layer.adapter["b"].g}
    s = {"a": scale, "b": 1.0}
    factor = torch.stack([1 + s[n] * g[n] if n in g else torch.ones(6) for n in names])
    want = (x @ w.T + b) * factor
    with la.per_sample(model, names):
        got = model(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    up = torch.randn_like(want)
    params = [x, g["a"], g["b"]]
    got_grads = torch.autograd.grad((got * up).sum(), params, allow_unused=True)
    want_grads = torch.autograd.grad((want * up).sum(), params, allow_unused=True)
    for got_g, want_g in zip(got_grads, want_grads):
        if want_g is None:
            assert got_g is None or not got_g.any()
        else:
            torch.testing.assert_close(got_g, want_g, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("active, scale", [(["a", "b"], 1.0), (["a"], 0.5), (["a", "b"], 0.5)])
def test_stacked_and_scaled_adapters_pass_a_keyword_input_on(monkeypatch, toy_method, active, scale):
    """Outside ``per_sample``: base + Σ s_i · term_i (core/layer.py) with the input given by keyword; truth the
    closed form ``(1 + Σ s_i g_i) ⊙ (W x + b)``."""
    model = _two_adapters(
        monkeypatch, toy_method, adapted_forward=_adapted_forward, delta_output=_delta_output, additive=True
    )
    la.set_active(model, active)
    la.set_scale(model, "a", scale)
    x = torch.randn(3, 8)
    g = {n: model.layer.adapter[n].g for n in ("a", "b")}
    s = {"a": scale, "b": 1.0}
    want = (x @ model.layer.weight.T + model.layer.bias) * (1 + sum(s[n] * g[n] for n in active))
    torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("active", [["a"], ["a", "b"]], ids=["one", "two"])
def test_disabled_adapters_pass_a_keyword_input_to_the_base(monkeypatch, toy_method, active):
    """Inside ``disabled`` the adapted module is its base, ``W x + b``, however many adapters are active."""
    model = _two_adapters(monkeypatch, toy_method, additive=True, delta_output=_delta_output)
    la.set_active(model, active)
    x = torch.randn(3, 8)
    with la.disabled(model):
        torch.testing.assert_close(model(x), x @ model.layer.weight.T + model.layer.bias)


class Wrapped(nn.Module):
    """What FSDP1 makes of an adapter layer: a wrapper holding it as ``_fsdp_wrapped_module``, called in its place
    (the real wrapper gathers the layer's parameters on call)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self._fsdp_wrapped_module = layer
        self.calls = 0

    def forward(self, base: nn.Module, *args, **kwargs) -> torch.Tensor:
        self.calls += 1
        return self._fsdp_wrapped_module(base, *args, **kwargs)

    def __getattr__(self, name: str):
        # FSDP1's wrapper reads what it does not hold (``merged``, ``enabled``, ...) from the wrapped module.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._fsdp_wrapped_module, name)


def test_adapter_layers_gives_the_layer_inside_a_wrapper(monkeypatch, toy_method):
    from lightning_adapters.core.inject import adapter_layers

    model = _two_adapters(monkeypatch, toy_method, adapted_forward=_adapted_forward, delta_output=_delta_output)
    inner = model.layer.adapter["a"]
    model.layer.adapter["a"] = Wrapped(inner)
    layers = {adapter: layer for _, adapter, _, layer in adapter_layers(model)}
    assert layers["a"] is inner and layers["b"] is model.layer.adapter["b"]


@pytest.mark.parametrize("additive", [True, False], ids=["additive", "per-group"])
def test_routed_rows_reach_a_wrapped_layer_with_a_keyword_input(monkeypatch, toy_method, additive):
    """A wrapped layer is read through the wrapper (its flags, its term) and, where it runs its own forward, called
    through it. Truth: the closed form per row, as above."""
    model = _two_adapters(
        monkeypatch, toy_method, adapted_forward=_adapted_forward, delta_output=_delta_output, additive=additive
    )
    g = {n: model.layer.adapter[n].g for n in ("a", "b")}
    wrapper = Wrapped(model.layer.adapter["a"])
    model.layer.adapter["a"] = wrapper
    names = ["a", "b", "__base__", "a"]
    x = torch.randn(len(names), 8)
    factor = torch.stack([1 + g[n] if n in g else torch.ones(6) for n in names])
    with la.per_sample(model, names):
        got = model(x)
    torch.testing.assert_close(got, (x @ model.layer.weight.T + model.layer.bias) * factor, rtol=1e-5, atol=1e-6)
    assert wrapper.calls == (0 if additive else 1)  # the additive branch asks the layer for its term only
    # Outside per_sample, the one active adapter runs through its wrapper too.
    la.set_active(model, "a")
    torch.testing.assert_close(model(x), (x @ model.layer.weight.T + model.layer.bias) * (1 + g["a"]))
    assert wrapper.calls == (1 if additive else 2)
