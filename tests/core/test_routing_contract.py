"""The contract of ``core/routing.py``: each row of a routed batch gets what it gets alone with its adapter active.

Most tests route a single adapted Linear directly (its set's ``routing``, as ``per_sample`` sets it) with the
``Delta`` layers of ``test_layer_contract``: row ``i`` routed to ``n`` must be ``W x_i + b + s_n D_n x_i`` (``s_n``
the layer's strength), a row named ``"__base__"`` or after an adapter the module does not hold ``W x_i + b``. Both
ways the engine combines rows are checked: the base once plus one term per group (additive layers) and one forward
per group (``dense_term`` layers, or layers that are not additive).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightning_adapters as la
from lightning_adapters.core.layer import AdapterLayer, adapter_set, attach
from lightning_adapters.core.routing import BASE, _routing_of
from lightning_adapters.errors import AdapterConfigError, AdapterStateError
from tests.core.test_layer_contract import Delta, Wrapper, assert_same_grads, linear, with_layers


@contextlib.contextmanager
def routed(module: nn.Module, names: list[str]):
    """Route ``module``'s rows by ``names`` (what ``per_sample`` does to every adapted module of a model)."""
    adapter_set(module).routing = _routing_of(names)
    try:
        yield module
    finally:
        adapter_set(module).routing = None


def row_truth(base: nn.Linear, layers: dict[str, AdapterLayer], names: list[str], x: torch.Tensor) -> torch.Tensor:
    """Row by row: ``W x_i + b + s D x_i`` with the row's layer, ``W x_i + b`` without one."""
    rows = []
    for name, row in zip(names, x):
        w = base.weight
        if name in layers and layers[name].enabled:
            w = w + layers[name].strength * layers[name].d.to(w.dtype)
        rows.append(row @ w.T + base.bias)
    return torch.stack(rows)


def x_rows(n: int) -> torch.Tensor:
    return torch.randn(n, 5, generator=torch.Generator().manual_seed(11)).requires_grad_()


# Names of rows: base rows first, in the middle and last; an adapter the module does not hold ("c"); repeats.
ROWS = {
    "base-first": [BASE, "a", "b", "a", BASE],
    "mixed": ["b", "a", BASE, "a", "c", "b"],
    "one-adapter": ["a", "a", "a"],
}


@pytest.mark.parametrize("dense", [False, True], ids=["base-plus-terms", "one-forward-per-group"])
@pytest.mark.parametrize("strength_a", [1.0, 2.0, -0.5])
@pytest.mark.parametrize("rows", sorted(ROWS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32-layers", "fp64-layers"])
def test_routed_rows_match_the_closed_form_of_their_own_adapter(dense, strength_a, rows, dtype) -> None:
    """Outputs (in the base's dtype, whatever the layers' dtype) and gradients of the input, ``W`` and each ``D``."""
    names = ROWS[rows]
    base = linear()
    layers = with_layers(base, ["a", "b"], dtype)
    layers["a"].strength = strength_a
    for layer in layers.values():
        layer.dense_term = dense
    adapter_set(base).active = ("a",)  # what is active outside the routing plays no part inside it
    x = x_rows(len(names))
    with routed(base, names):
        got = base(x)
    want = row_truth(base, layers, names, x)
    assert got.dtype == torch.float32 and got.shape == (len(names), 3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert_same_grads(got, want, [x, base.weight, layers["a"].d, layers["b"].d])


def test_routed_rows_of_a_layer_that_is_not_additive_run_its_own_forward_per_group() -> None:
    base = linear()
    layers = with_layers(base, ["a", "b"])
    layers["b"].additive = False
    names = [BASE, "b", "a", "b"]
    x = x_rows(4)
    with routed(base, names):
        got = base(x)
    torch.testing.assert_close(got, row_truth(base, layers, names, x), rtol=1e-5, atol=1e-6)
    assert layers["a"].runs == layers["b"].runs == {"adapted": 1, "delta": 0}


def test_a_disabled_layer_gives_its_rows_the_base_output() -> None:
    base = linear()
    layers = with_layers(base, ["a", "b"])
    layers["b"].enabled = False
    names = ["b", "a", "b"]
    x = x_rows(3)
    with routed(base, names):
        got = base(x)
    torch.testing.assert_close(got, row_truth(base, layers, names, x), rtol=1e-5, atol=1e-6)
    with routed(base, ["b", "b", BASE]):
        torch.testing.assert_close(base(x), F.linear(x, base.weight, base.bias))


@pytest.mark.parametrize("dense", [False, True], ids=["base-plus-terms", "one-forward-per-group"])
def test_a_wrapped_layer_gets_its_rows_through_the_wrapper(dense: bool) -> None:
    base = linear()
    layers = with_layers(base, ["a", "b"])
    for layer in layers.values():
        layer.dense_term = dense
    wrapper = Wrapper(layers["a"])
    adapter_set(base)["a"] = wrapper
    names = ["a", BASE, "b", "a"]
    x = x_rows(4)
    with routed(base, names):
        got = base(x)
    want = row_truth(base, layers, names, x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert_same_grads(got, want, [x, layers["a"].d, layers["b"].d])
    assert wrapper.calls == (1 if dense else 0)


class Skipping(Delta):
    """``Delta`` whose term is ``None`` (zero, as ``delta_output`` may say: LoHa/LoKr when module dropout skips)."""

    def delta_output(self, base: nn.Module, x: torch.Tensor) -> None:
        self.runs["delta"] += 1


@pytest.mark.parametrize("dense", [False, True], ids=["base-plus-terms", "one-forward-per-group"])
def test_a_scaled_layer_whose_term_is_none_gives_its_rows_the_base_output(dense: bool) -> None:
    base = linear()
    layers = with_layers(base, ["a"])
    layers["b"] = Skipping(base, 2)
    attach(base, layers["b"], "b")
    for layer in layers.values():
        layer.dense_term = dense
    layers["b"].strength = 0.5
    names = ["b", "a", BASE, "b"]
    x = x_rows(4)
    with routed(base, names):
        got = base(x)
    want = row_truth(base, layers, ["c", "a", BASE, "c"], x)  # b's rows: the base output
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert layers["b"].runs["delta"] == 1


def test_loha_skipped_by_module_dropout_at_half_strength_routes_its_rows_to_the_base() -> None:
    """LoHa (one forward per group) in training with ``module_dropout`` close to 1: its term is skipped, so its rows
    are the base's, at any strength."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4))
    la.inject(model, la.LoHaConfig(r=2, target_modules=["0"], module_dropout=0.999), name="a")
    with torch.no_grad():
        for t in la.adapter_state_dict(model, name="a").values():
            t.normal_()
    la.set_scale(model, "a", 0.5)
    model.train()
    x = torch.randn(3, 4)
    with la.per_sample(model, ["a", BASE, "a"]):
        got = model(x)
    torch.testing.assert_close(got, F.linear(x, model[0].weight, model[0].bias))


# ----- inputs: what is split by row and what is handed on whole ---------------------------------------------


class Gated(nn.Linear):
    """``(W x + b) · gain_i / temperature``: ``gain`` one number per row (shape ``(batch,)``), ``temperature`` a
    0-dim tensor shared by every row."""

    def forward(self, x: torch.Tensor, gain: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * gain[:, None] / temperature


class GatedDelta(Delta):
    """``Delta`` for ``Gated``: its term is gated like the base output."""

    def adapted_forward(self, base, x, gain, temperature):
        self.runs["adapted"] += 1
        return F.linear(x, base.weight + self.d, base.bias) * gain[:, None] / temperature

    def delta_output(self, base, x, gain, temperature):
        self.runs["delta"] += 1
        return F.linear(x, self.d) * gain[:, None] / temperature


@pytest.mark.parametrize("dense", [False, True], ids=["base-plus-terms", "one-forward-per-group"])
@pytest.mark.parametrize("by_keyword", [False, True], ids=["positional", "keyword"])
def test_per_row_arguments_are_split_and_shared_ones_handed_on_whole(dense: bool, by_keyword: bool) -> None:
    torch.manual_seed(0)
    base = Gated(5, 3)
    layers = {}
    for seed, name in enumerate(["a", "b"], start=1):
        layers[name] = GatedDelta(base, seed)
        layers[name].dense_term = dense
        layers[name].strength = 2.0 if name == "a" else 1.0
        attach(base, layers[name], name)
    names = ["a", "a", BASE, "b", "b", "a"]
    x = x_rows(6)
    gain = torch.linspace(0.5, 2.0, 6)
    temperature = torch.tensor(1.5)
    with routed(base, names):
        got = base(x, gain=gain, temperature=temperature) if by_keyword else base(x, gain, temperature)
    want = row_truth(base, layers, names, x) * gain[:, None] / temperature
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert_same_grads(got, want, [x, layers["a"].d, layers["b"].d])


def test_a_one_dimensional_input_of_one_id_per_row_is_routed() -> None:
    """Token ids of shape ``(batch,)`` (one decoding step) into an Embedding with LoRA: each row as if alone."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4))
    for name in ("a", "b"):
        la.inject(model, la.LoRAConfig(r=2, target_modules=["0"]), name=name)
        with torch.no_grad():
            for t in la.adapter_state_dict(model, name=name).values():
                t.normal_()
    ids = torch.tensor([3, 7, 3, 1])
    names = ["a", "b", BASE, "a"]
    want = []
    for i, name in zip(ids, names):
        if name == BASE:
            with la.disabled(model):
                want.append(model(i[None]))
        else:
            la.set_active(model, name)
            want.append(model(i[None]))
    with la.per_sample(model, names):
        got = model(ids)
    assert got.shape == (4, 4)
    torch.testing.assert_close(got, torch.cat(want), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "x, shown",
    [(torch.tensor(1.0), r"shape \(\)"), (torch.zeros(2, 5), r"shape \(2, 5\)"), ([[0.0] * 5] * 3, "shape list")],
    ids=["scalar", "other-batch", "not-a-tensor"],
)
def test_an_input_without_the_routed_rows_is_refused_naming_its_shape(x, shown: str) -> None:
    base = linear()
    with_layers(base, ["a"])
    with routed(base, ["a", BASE, "a"]), pytest.raises(AdapterStateError, match=rf"{shown}.* not the 3 rows routed"):
        base(x)


@pytest.mark.parametrize("dense", [False, True], ids=["base-plus-terms", "one-forward-per-group"])
def test_routed_rows_on_another_device_than_the_indices_use_indices_on_that_device(dense: bool) -> None:
    """The routing's indices are made on the CPU; an input elsewhere (here the meta device, as a GPU would be) gets
    them on its own device, in both ways of combining rows."""
    base = linear().to("meta")
    layers = with_layers(base, ["a", "b"])
    for layer in layers.values():
        layer.to("meta")
        layer.dense_term = dense
    with routed(base, ["a", BASE, "b", "a"]):
        out = base(torch.empty(4, 5, device="meta"))
    assert out.shape == (4, 3) and out.device.type == "meta"


def test_a_call_without_any_input_is_refused_naming_what_it_got() -> None:
    base = linear()
    with_layers(base, ["a"])
    with routed(base, ["a", BASE]), pytest.raises(AdapterStateError, match="shape NoneType.* not the 2 rows routed"):
        base()


# ----- Routing -------------------------------------------------------------------------------------------------


def test_routing_groups_rows_by_name_and_its_inverse_puts_them_back() -> None:
    routing = _routing_of(["b", "a", BASE, "a", "b"])
    assert routing.batch == 5
    assert [(n, idx.tolist()) for n, idx in routing.groups] == [("b", [0, 4]), ("a", [1, 3]), (BASE, [2])]
    assert all(idx.dtype == torch.long for _, idx in routing.groups) and routing.inverse.dtype == torch.long
    order = torch.cat([idx for _, idx in routing.groups])
    assert torch.equal(order[routing.inverse], torch.arange(5))


def test_routing_moves_its_indices_to_a_device_once() -> None:
    routing = _routing_of(["a", BASE, "a"])
    meta = torch.device("meta")
    groups, inverse = routing.on(meta)
    assert all(idx.device == meta for _, idx in groups) and inverse.device == meta
    assert [n for n, _ in groups] == ["a", BASE]
    assert routing.on(meta) is routing.on(meta)
    cpu_groups, _ = routing.on(torch.device("cpu"))
    assert torch.equal(cpu_groups[0][1], torch.tensor([0, 2]))


# ----- per_sample's checks ---------------------------------------------------------------------------------------


class AttentionNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(8, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        return self.attn(h, h, h)[0]


def test_only_the_routed_adapters_must_be_able_to_split_rows() -> None:
    """LoRA on ``nn.MultiheadAttention`` cannot split rows: routing only the other adapter works (and equals it
    active alone); naming it refuses, with the reason and the fix."""
    model = AttentionNet()
    la.inject(model, la.LoRAConfig(r=2, target_modules=["fc"]), name="a")
    la.inject(model, la.LoRAConfig(r=2, target_modules=["attn"]), name="b")
    with torch.no_grad():
        for t in la.adapter_state_dict(model, name="a").values():
            t.normal_()
    x = torch.randn(2, 3, 8)
    la.set_active(model, "a")
    with torch.no_grad():
        want = model(x)
        with la.per_sample(model, ["a", "a"]):
            torch.testing.assert_close(model(x), want)
    with pytest.raises(AdapterConfigError, match=r"adapter 'b' cannot route rows on 'attn'.*batch_first.*route only"):
        with la.per_sample(model, ["b", "a"]):
            pass


@pytest.mark.parametrize("names", [{"a"}, (n for n in ["a", "a"]), "a"], ids=["set", "generator", "string"])
def test_names_that_are_not_a_list_of_strings_are_refused(names) -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    la.inject(model, la.LoRAConfig(r=2, target_modules=["0"]), name="a")
    with pytest.raises(la.AdapterTypeError, match=r"names must be a list with one adapter name .* per row"):
        with la.per_sample(model, names):
            pass
