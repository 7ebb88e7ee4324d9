"""The contract of ``core/layer.py`` on its own: ``adapted_class``, ``attach``/``detach`` and the adapted forward.

The layers here are written for the test: ``Delta`` adds ``D x`` to a Linear, so a module with the named layers
``i`` active at strengths ``s_i`` computes ``W x + b + Σ s_i D_i x``; that closed form (and autograd of it) is the
truth for outputs and gradients. The classes handed to ``adapted_class`` are made inside each test, so the class
cache has never seen them and the test runs the class creation itself.
"""

from __future__ import annotations

import itertools
import pickle
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_adapters.core import layer as layer_module
from lightning_adapters.core.layer import AdapterLayer, AdapterSet, adapted_class, adapter_set, attach, detach
from lightning_adapters.errors import NotMergeableError

_FRESH = itertools.count()


class Delta(AdapterLayer):
    """``W x + b + D x`` on a Linear: additive, mergeable (``W += D``), with a count of which path ran.

    ``D`` may be kept in another dtype than the base (an fp64 adapter on an fp32 base): its term then comes back
    in ``D``'s dtype, and the engine must cast it to the output's.
    """

    additive = True

    def __init__(self, base: nn.Linear, seed: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.d = nn.Parameter((torch.randn(base.out_features, base.in_features, generator=g) * 0.5).to(dtype))
        self.runs = {"adapted": 0, "delta": 0}

    def adapted_forward(self, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
        self.runs["adapted"] += 1
        return F.linear(x, base.weight + self.d.to(x.dtype), base.bias)  # the folded path: (W + D) x + b

    def delta_output(self, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
        self.runs["delta"] += 1
        return F.linear(x.to(self.d.dtype), self.d)  # (..., in) @ (in, out): the term, in D's dtype

    def merge(self, base: nn.Module, *, safe: bool = False) -> None:
        with torch.no_grad():
            base.weight.add_(self.d.to(base.weight.dtype))
        self.merged = True

    def unmerge(self, base: nn.Module) -> None:
        with torch.no_grad():
            base.weight.sub_(self.d.to(base.weight.dtype))
        self.merged = False


class Wrapper(nn.Module):
    """A stand-in for FSDP1's wrapper: holds the layer as ``_fsdp_wrapped_module``, is called in its place, and reads
    what it does not hold itself (``merged``, ``strength``, methods) from the layer, as FSDP1's ``__getattr__`` does."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self._fsdp_wrapped_module = layer
        self.calls = 0

    def forward(self, base: nn.Module, *args, **kwargs) -> torch.Tensor:
        self.calls += 1
        return self._fsdp_wrapped_module(base, *args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["_fsdp_wrapped_module"], name)


def linear(seed: int = 0, cls: type = nn.Linear) -> nn.Linear:
    torch.manual_seed(seed)
    return cls(5, 3)


def with_layers(base: nn.Linear, names: list[str], dtype: torch.dtype = torch.float32) -> dict[str, Delta]:
    """Attach one ``Delta`` per name (seeds 1, 2, ...) and return them by name; none is active yet."""
    layers = {}
    for seed, name in enumerate(names, start=1):
        layers[name] = Delta(base, seed, dtype)
        attach(base, layers[name], name)
    return layers


def closed_form(base: nn.Linear, layers: dict[str, Delta], strengths: dict[str, float], x: torch.Tensor):
    """``W x + b + Σ s_i D_i x`` over the named layers (independent of the engine)."""
    w = base.weight + sum(s * layers[n].d.to(base.weight.dtype) for n, s in strengths.items())
    return x @ w.T + base.bias


def x_batch(rows: int = 4) -> torch.Tensor:
    return torch.randn(rows, 5, generator=torch.Generator().manual_seed(7))


def assert_same_grads(got: torch.Tensor, want: torch.Tensor, params: list[torch.Tensor]) -> None:
    up = torch.linspace(-1, 1, got.numel()).reshape(got.shape)
    got_g = torch.autograd.grad((got * up).sum(), params, allow_unused=True)
    want_g = torch.autograd.grad((want * up).sum(), params, allow_unused=True)
    for g, w in zip(got_g, want_g):
        if w is None:
            assert g is None or not g.any()
        else:
            torch.testing.assert_close(g, w.to(g.dtype), rtol=1e-5, atol=1e-6)


# ----- adapted_class -----------------------------------------------------------------------------------------


def fresh_linear(name: str, monkeypatch: pytest.MonkeyPatch) -> type:
    """A new subclass of ``nn.Linear`` called ``name``, findable as an attribute of this module (so it pickles)."""
    cls = type(name, (nn.Linear,), {"__module__": __name__, "__qualname__": name})
    monkeypatch.setattr(sys.modules[__name__], name, cls, raising=False)
    return cls


def test_adapted_class_is_a_published_subclass_made_once_per_base_and_kind(monkeypatch) -> None:
    name = f"Probe{next(_FRESH)}Linear"
    base_cls = fresh_linear(name, monkeypatch)
    plain = adapted_class(base_cls)
    quantized = adapted_class(base_cls, quantized=True)
    assert issubclass(plain, base_cls) and issubclass(quantized, base_cls) and plain is not quantized
    assert (plain.__name__, quantized.__name__) == (f"Adapted{name}", f"AdaptedQuantized{name}")
    for cls in (plain, quantized):
        # Published in the library's module under its own name, so ``pickle`` finds it again.
        assert cls.__qualname__ == cls.__name__ and cls.__module__ == "lightning_adapters.core.layer"
        assert getattr(layer_module, cls.__name__) is cls
    assert adapted_class(base_cls) is plain and adapted_class(base_cls, quantized=True) is quantized


def test_two_bases_of_one_name_get_two_published_classes() -> None:
    first = type("TwinLinear", (nn.Linear,), {})
    second = type("TwinLinear", (nn.Linear,), {})
    a, b = adapted_class(first), adapted_class(second)
    assert a is not b and a.__name__ != b.__name__
    assert a.__name__.rstrip("_") == b.__name__.rstrip("_") == "AdaptedTwinLinear"
    assert getattr(layer_module, a.__name__) is a and getattr(layer_module, b.__name__) is b


def test_a_model_adapted_with_a_new_class_pickles(monkeypatch) -> None:
    name = f"Pickled{next(_FRESH)}Linear"
    base = linear(cls=fresh_linear(name, monkeypatch))
    with_layers(base, ["default"])
    adapter_set(base).active = ("default",)
    copy = pickle.loads(pickle.dumps(base))
    assert type(copy) is type(base) and type(copy).__name__ == f"Adapted{name}"
    x = x_batch()
    torch.testing.assert_close(copy(x), base(x), rtol=0, atol=0)


def test_an_adapted_instance_of_a_new_class_runs_its_layer_and_stays_its_class(monkeypatch) -> None:
    """Attach on a class never adapted before: the instance keeps its class (``isinstance``) and keys, carries the
    set, and its forward is the base's plus the layer's term."""
    base_cls = fresh_linear(f"Fresh{next(_FRESH)}Linear", monkeypatch)
    base = linear(cls=base_cls)
    assert layer_module.is_adapted(base) is False
    stand_ins = []
    monkeypatch.setattr(layer_module, "run_on_stand_in", lambda *args, **kwargs: stand_ins.append(args))
    layers = with_layers(base, ["a", "b"])
    assert isinstance(base, base_cls) and type(base) is not base_cls
    assert layer_module.is_adapted(base) and not layer_module.attach_blocked(base)
    assert sorted(base.state_dict()) == ["adapter.a.d", "adapter.b.d", "bias", "weight"]
    x = x_batch()
    torch.testing.assert_close(base(x), closed_form(base, layers, {}, x))
    adapter_set(base).active = ("a", "b")
    torch.testing.assert_close(base(x), closed_form(base, layers, {"a": 1.0, "b": 1.0}, x))
    assert stand_ins == []  # a float base needs no dequantized stand-in
    detach(base, "a")
    detach(base, "b")
    assert type(base) is base_cls and "adapter" not in base._modules
    assert layer_module.is_adapted(base) is False


# ----- attach / detach and the active names ------------------------------------------------------------------


def test_an_attached_layer_does_not_act_until_its_name_is_active() -> None:
    base = linear()
    layers = with_layers(base, ["default"])
    assert isinstance(base, nn.Linear) and adapter_set(base).active == ()
    assert isinstance(AdapterSet().active, tuple) and AdapterSet().active == ()
    x = x_batch().requires_grad_()
    torch.testing.assert_close(base(x), F.linear(x, base.weight, base.bias))
    assert layers["default"].runs == {"adapted": 0, "delta": 0}
    adapter_set(base).active = ("default",)
    out = base(x)
    torch.testing.assert_close(out, closed_form(base, layers, {"default": 1.0}, x))
    assert_same_grads(out, closed_form(base, layers, {"default": 1.0}, x), [x, layers["default"].d, base.weight])


def test_detach_takes_the_name_out_of_the_active_ones_and_the_last_restores_the_class() -> None:
    base = linear()
    layers = with_layers(base, ["a", "b"])
    adapter_set(base).active = ("a", "b")
    x = x_batch()
    assert detach(base, "a") is layers["a"]
    assert adapter_set(base).active == ("b",)
    torch.testing.assert_close(base(x), closed_form(base, layers, {"b": 1.0}, x))
    assert detach(base) is layers["b"]  # the only one left
    assert type(base) is nn.Linear and "adapter" not in base._modules
    torch.testing.assert_close(base(x), F.linear(x, base.weight, base.bias))


# ----- the adapted forward -------------------------------------------------------------------------------------


@pytest.mark.parametrize("other", ["disabled", "merged"])
def test_one_acting_layer_among_several_active_runs_its_own_forward(other: str) -> None:
    """Two names active, the other one disabled or merged: the acting layer runs its own ``adapted_forward`` (the
    method's fast path), not base + term; the output is the closed form with the merged one folded in."""
    base = linear()
    layers = with_layers(base, ["a", "b"])
    adapter_set(base).active = ("a", "b")
    x = x_batch()
    if other == "disabled":
        layers["b"].enabled = False
        want = closed_form(base, layers, {"a": 1.0}, x)
    else:
        want = closed_form(base, layers, {"a": 1.0, "b": 1.0}, x)
        layers["b"].merge(base)
    got = base(x)
    assert layers["a"].runs == {"adapted": 1, "delta": 0} and layers["b"].runs == {"adapted": 0, "delta": 0}
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "strengths",
    [{"a": 2.0}, {"a": -0.5}, {"a": 2.0, "b": 1.0}, {"a": 1.0, "b": 2.0}, {"a": 0.5, "b": -3.0}],
    ids=["one-doubled", "one-negative", "doubled-beside-one", "one-beside-doubled", "two-scaled"],
)
def test_scaled_and_stacked_layers_add_each_term_times_its_strength(strengths: dict[str, float]) -> None:
    """Output and gradients (input, each D, W) equal ``W x + b + Σ s_i D_i x``; a term in another dtype (fp64
    adapters on an fp32 base) is added in the output's dtype."""
    for dtype in (torch.float32, torch.float64):
        base = linear()
        layers = with_layers(base, list(strengths), dtype)
        for name, s in strengths.items():
            layers[name].strength = s
        adapter_set(base).active = tuple(strengths)
        x = x_batch().requires_grad_()
        got = base(x)
        want = closed_form(base, layers, strengths, x)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert_same_grads(got, want, [x, base.weight, *(layers[n].d for n in strengths)])


def test_a_merged_layer_beside_an_unmerged_scaled_one_gives_the_same_output() -> None:
    base = linear()
    layers = with_layers(base, ["a", "b"])
    layers["a"].strength = 2.0
    adapter_set(base).active = ("a", "b")
    x = x_batch()
    want = closed_form(base, layers, {"a": 2.0, "b": 1.0}, x)
    torch.testing.assert_close(base(x), want, rtol=1e-5, atol=1e-6)
    layers["b"].merge(base)
    torch.testing.assert_close(base(x), want, rtol=1e-5, atol=1e-6)
    layers["b"].unmerge(base)
    torch.testing.assert_close(base(x), want, rtol=1e-5, atol=1e-6)


def test_a_wrapped_layer_is_called_through_its_wrapper_with_a_positional_input() -> None:
    """The single-layer path calls the wrapper (FSDP1 gathers the parameters there) with the module's own
    arguments; the stacked path reads the term from the layer inside."""
    base = linear()
    layers = with_layers(base, ["a", "b"])
    wrapper = Wrapper(layers["a"])
    adapter_set(base)["a"] = wrapper
    adapter_set(base).active = ("a",)
    x = x_batch().requires_grad_()
    got = base(x)
    assert wrapper.calls == 1 and layers["a"].runs["adapted"] == 1
    torch.testing.assert_close(got, closed_form(base, layers, {"a": 1.0}, x))
    assert_same_grads(got, closed_form(base, layers, {"a": 1.0}, x), [x, layers["a"].d])
    adapter_set(base).active = ("a", "b")
    torch.testing.assert_close(base(x), closed_form(base, layers, {"a": 1.0, "b": 1.0}, x))
    assert wrapper.calls == 1 and layers["a"].runs["delta"] == 1


# ----- AdapterLayer ---------------------------------------------------------------------------------------------


class Nested(Delta):
    """``Delta`` with buffers of its own and in a child module, one of them an integer count."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__(base, 1)
        self.register_buffer("top", torch.ones(3))
        self.register_buffer("count", torch.arange(3))
        self.inner = nn.Module()
        self.inner.register_buffer("mask", torch.ones(2))
        self.inner.p = nn.Parameter(torch.zeros(2))


def test_apply_dtype_casts_every_floating_tensor_where_it_lives() -> None:
    layer = Nested(linear())
    layer.apply_dtype(torch.float64)
    assert layer.d.dtype == layer.inner.p.dtype == torch.float64
    assert layer.top.dtype == layer.inner.mask.dtype == torch.float64 and layer.count.dtype == torch.long
    # Still buffers of the module that held them (saved, moved with .to()), nothing new on the layer.
    assert dict(layer.named_buffers()).keys() == {"top", "count", "inner.mask"}
    assert "inner.mask" not in vars(layer) and "mask" not in layer._buffers
    assert sorted(layer.state_dict()) == ["count", "d", "inner.mask", "inner.p", "top"]


def test_a_new_layer_shows_it_is_not_merged_and_the_base_class_cannot_merge() -> None:
    layer = Delta(linear(), 1)
    assert layer.extra_repr() == "merged=False" and layer.enabled and layer.strength == 1.0
    layer.merge(linear())
    assert layer.extra_repr() == "merged=True"
    plain = AdapterLayer()
    for safe in (False, True):
        with pytest.raises(NotMergeableError, match="AdapterLayer cannot be merged"):
            plain.merge(linear(), safe=safe)


class KeywordDelta(Delta):
    """``Delta`` that also takes the input by keyword (``linear(input=x)``)."""

    def adapted_forward(self, base: nn.Module, *args, **kwargs) -> torch.Tensor:
        return super().adapted_forward(base, *args, *kwargs.values())


def test_a_quantized_base_of_a_new_class_runs_its_layer_on_the_dequantized_stand_in(monkeypatch) -> None:
    """A torchao int8 weight: ``attach`` picks the quantized adapted class, whose forward hands the layer the
    dequantized stand-in (``run_on_stand_in``); the output is ``W̃ x + b + D x`` with ``W̃`` the dequantized weight."""
    pytest.importorskip("torchao")
    import lightning_adapters as la

    name = f"Int8{next(_FRESH)}Linear"
    model = nn.Sequential(linear())
    la.quantize(model, "torchao_int8", skip=[])
    base = model[0]
    base.__class__ = fresh_linear(name, monkeypatch)  # a class adapted_class has not seen, same quantized weight
    calls = []
    real = layer_module.run_on_stand_in

    def recorded(module, fn, *args, **kwargs):
        calls.append(module)
        return real(module, fn, *args, **kwargs)

    monkeypatch.setattr(layer_module, "run_on_stand_in", recorded)
    layer = KeywordDelta(base, 1)
    attach(base, layer)
    assert type(base).__name__ == f"AdaptedQuantized{name}"
    adapter_set(base).active = ("default",)
    x = x_batch()
    w = base.weight.dequantize() + layer.d
    for got in (base(x), base(input=x)):
        torch.testing.assert_close(got, x @ w.T + base.bias, rtol=1e-4, atol=1e-4)
    assert calls == [base, base] and layer.runs["adapted"] == 2
