"""The contract of several named adapters on one model, for every method (one row per method variant).

Truths: a model that holds only one adapter with the same tensors (each adapter alone), the sum of the adapters'
own terms (stacking, for additive methods) and the gradients of a loss linear in the output, which stacking must
leave unchanged for each adapter.
"""

from __future__ import annotations

import copy

import pytest
import torch

import lightning_adapters as la
from lightning_adapters.core.inject import adapted_modules
from tests.contract.test_contract import ALL_CASES, _build
from tests.helpers import ContractCase


def _one_per_variant() -> list[ContractCase]:
    seen, out = set(), []
    for case in ALL_CASES:
        variant = case.id.rsplit("-", 1)[0]
        if variant not in seen:
            seen.add(variant)
            out.append(case)
    return out


CASES = _one_per_variant()
PARAMS = [pytest.param(c, id=c.id) for c in CASES]


def _randomize(model: torch.nn.Module, name: str, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in la.adapter_state_dict(model, name=name).values():
            if t.is_floating_point():
                t.add_(torch.randn(t.shape, generator=g).to(t.dtype) * 0.1)


def _two(case: ContractCase) -> tuple[torch.nn.Module, torch.Tensor]:
    model, x = _build(case)
    la.inject(model, case.make_config(["layer"]), name="a")
    la.inject(model, case.make_config(["layer"]), name="b")
    _randomize(model, "a", 1)
    _randomize(model, "b", 2)
    return model, x


def _single(case: ContractCase, model: torch.nn.Module, name: str) -> torch.nn.Module:
    """A fresh model holding only adapter ``name`` of ``model``, with the same tensors."""
    single, _ = _build(case)
    la.inject(single, case.make_config(["layer"]), name=name)
    la.load_adapter_state_dict(single, la.adapter_state_dict(model, name=name))
    return single


def _grads(model: torch.nn.Module, x: torch.Tensor, name: str | None = None) -> tuple[torch.Tensor, dict]:
    """Output and gradients of the linear loss ``Σ y·g`` (``name``: keyed name-free, only that adapter's)."""
    model.zero_grad(set_to_none=True)
    y = model(x)
    g = torch.linspace(-1, 1, y.numel()).reshape(y.shape).to(y.dtype)
    (y * g).sum().backward()
    named = dict(model.named_parameters())
    keys = la.adapter_state_dict(model, name=name) if name else la.adapter_state_dict(model)
    state = la.core.state.name_free_keys(model, name) if name else {}
    own = {v: k for k, v in state.items()}
    return y.detach(), {k: named[own.get(k, k)].grad for k in keys if own.get(k, k) in named}


@pytest.mark.parametrize("case", PARAMS)
def test_each_adapter_alone_equals_a_single_adapter_model(case: ContractCase) -> None:
    model, x = _two(case)
    assert la.adapter_names(model) == ["a", "b"] and la.active(model) == ["a"]
    for name in ("a", "b", "a"):
        la.set_active(model, name)
        la.set_trainable(model, name)
        single = _single(case, model, name)
        out, grads = _grads(model, x, name)
        want, want_grads = _grads(single, x, name)
        assert torch.equal(out, want)
        assert grads.keys() == want_grads.keys() and grads
        for k, g in grads.items():
            assert g is not None and torch.allclose(g, want_grads[k], atol=1e-6), k
        other = "b" if name == "a" else "a"
        frozen = la.core.state.name_free_keys(model, other)
        assert all(model.get_parameter(k).grad is None for k in frozen if k in dict(model.named_parameters()))


@pytest.mark.parametrize("case", PARAMS)
def test_delete_restores_the_single_adapter_model(case: ContractCase) -> None:
    model, x = _two(case)
    single = _single(case, model, "a")
    la.delete(model, "b")
    assert la.adapter_names(model) == ["a"]
    assert model.state_dict().keys() == single.state_dict().keys()
    assert all(torch.equal(v, single.state_dict()[k]) for k, v in model.state_dict().items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == {
        n: p.requires_grad for n, p in single.named_parameters()
    }
    assert torch.equal(model(x), single(x))
    assert [type(m) for m in model.modules()] == [type(m) for m in single.modules()]


@pytest.mark.parametrize("case", PARAMS)
def test_stacked_adapters_add_their_terms_or_are_refused(case: ContractCase) -> None:
    model, x = _two(case)
    with la.disabled(model):
        base = model(x).detach()
    outs, grads = {}, {}
    for name in ("a", "b"):
        la.set_active(model, name)
        la.set_trainable(model, name)
        outs[name], grads[name] = _grads(model, x, name)
    additive = all(layer.additive for _, _, layer in adapted_modules(model))
    if not additive:
        with pytest.raises(la.AdapterConfigError, match="cannot stack"):
            la.set_active(model, ["a", "b"])
        assert la.active(model) == ["b"]  # refused before any change
        return
    la.set_active(model, ["a", "b"])
    la.set_trainable(model, ["a", "b"])
    stacked, _ = _grads(model, x)
    assert torch.allclose(stacked, base + (outs["a"] - base) + (outs["b"] - base), atol=1e-5)
    for name in ("a", "b"):  # the loss is linear in the output: each adapter's gradient is its own
        _, mine = _grads(model, x, name)
        for k, g in mine.items():
            assert torch.allclose(g, grads[name][k], atol=1e-5), (name, k)
    if case.mergeable:
        before = {k: v.clone() for k, v in model.state_dict().items() if "adapter" not in k}
        la.merge(model, names=["a", "b"])
        assert torch.allclose(model(x), stacked, atol=2 * case.atol_merge)
        la.unmerge(model)
        for k, v in before.items():
            assert torch.allclose(model.state_dict()[k], v, atol=2 * case.atol_merge), k
        assert torch.allclose(model(x), stacked, atol=1e-5)


@pytest.mark.parametrize("case", [p for p in PARAMS if p.values[0].mergeable])
def test_merge_of_one_named_adapter_and_back(case: ContractCase) -> None:
    model, x = _two(case)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    la.set_active(model, "b")
    out_b = model(x)
    la.merge(model, names="b")
    assert torch.allclose(model(x), out_b, atol=case.atol_merge)
    with pytest.raises(la.AdapterStateError, match="unmerge"):
        la.set_active(model, "a")
    la.unmerge(model)
    for k, v in model.state_dict().items():
        assert torch.allclose(v, before[k], atol=case.atol_merge), k
    la.set_active(model, "a")
    assert torch.allclose(model(x), _single(case, model, "a")(x), atol=case.atol_merge)  # W back up to rounding


@pytest.mark.parametrize("case", PARAMS[:: max(1, len(PARAMS) // 6)])
def test_named_state_round_trips_and_loads_into_another_name(case: ContractCase) -> None:
    model, x = _two(case)
    full = {k: v.clone() for k, v in la.adapter_state_dict(model).items()}
    assert all(".adapter.a." in k or ".adapter.b." in k for k in full)
    twin, _ = _build(case)
    la.inject(twin, case.make_config(["layer"]), name="a")
    la.inject(twin, case.make_config(["layer"]), name="b")
    la.load_adapter_state_dict(twin, full)
    for name in ("a", "b"):
        la.set_active(model, name)
        la.set_active(twin, name)
        assert torch.equal(twin(x), model(x))
    # a's tensors into b: b then computes what a computes.
    la.load_adapter_state_dict(twin, la.adapter_state_dict(model, name="a"), name="b")
    la.set_active(model, "a")
    la.set_active(twin, "b")
    assert torch.equal(twin(x), model(x))
    copy.deepcopy(twin)  # a model with several adapters deep-copies
