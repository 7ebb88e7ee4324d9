"""The contract every registered method keeps, on every layer kind it supports.

Rows come from ``tests/contract/cases/<method>.py`` (one file per method, each a ``CASES`` list); a method
registered without a case file fails ``test_every_method_has_cases``.
"""

from __future__ import annotations

import copy
import importlib
import pkgutil

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import lightning_adapters as la
from lightning_adapters.registry import LayerMethod
from tests import contract
from tests.helpers import LAYERS, ContractCase, Wrap, randomize_adapter


def _load_cases() -> dict[str, list[ContractCase]]:
    pkg = importlib.import_module(f"{contract.__name__}.cases")
    out = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        out[info.name] = importlib.import_module(f"{pkg.__name__}.{info.name}").CASES
    return out


CASES_BY_METHOD = _load_cases()
ALL_CASES = [c for cases in CASES_BY_METHOD.values() for c in cases]
PARAMS = [pytest.param(c, id=c.id) for c in ALL_CASES]


def _build(case: ContractCase, seed: int = 0):
    torch.manual_seed(seed)
    kind = LAYERS[case.layer]
    model = Wrap(kind.make()).eval()
    return model, kind.make_input()


def test_every_method_has_cases() -> None:
    layer_methods = [m for m in la.available_methods() if isinstance(la.get_method(m), LayerMethod)]
    assert sorted(set(layer_methods) - set(CASES_BY_METHOD)) == []


@pytest.mark.parametrize("case", PARAMS)
def test_identity_keys_and_trainability(case: ContractCase) -> None:
    model, x = _build(case)
    base_sd = {k: v.clone() for k, v in model.state_dict().items()}
    base_out = model(x)
    la.inject(model, case.make_config(["layer"]))
    sd = model.state_dict()
    for k, v in base_sd.items():
        assert torch.equal(sd[k], v), k
    adapter_keys = set(la.adapter_state_dict(model))
    assert adapter_keys and all(k.startswith("layer.adapter.default.") for k in adapter_keys)
    assert set(sd) - set(base_sd) == adapter_keys
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and trainable <= adapter_keys
    if case.identity_at_init:
        assert torch.equal(model(x), base_out)


@pytest.mark.parametrize("case", PARAMS)
def test_merge_unmerge_eject(case: ContractCase) -> None:
    model, x = _build(case)
    base_sd = {k: v.clone() for k, v in model.state_dict().items()}
    la.inject(model, case.make_config(["layer"]))
    randomize_adapter(model)
    out = model(x)
    assert not torch.allclose(out, Wrap.forward(model, x).detach() * 0)
    with la.disabled(model):
        assert torch.allclose(model(x), _plain(base_sd, case)(x), atol=1e-6)
    if not case.mergeable:
        with pytest.raises(la.NotMergeableError):
            la.merge(model)
        return
    la.merge(model)
    assert torch.allclose(model(x), out, atol=case.atol_merge), (model(x) - out).abs().max()
    with la.disabled(model):
        assert torch.allclose(model(x), _plain(base_sd, case)(x), atol=1e-5)
    la.unmerge(model)
    for k, v in base_sd.items():
        assert torch.allclose(model.state_dict()[k], v, atol=1e-6), k
    assert torch.allclose(model(x), out, atol=1e-5)
    la.eject(model)
    sd = model.state_dict()
    assert set(sd) == set(base_sd)
    for k, v in base_sd.items():
        assert torch.allclose(sd[k], v, atol=1e-6)
    assert type(model.layer) is type(LAYERS[case.layer].make())


@pytest.mark.parametrize("case", PARAMS)
def test_eject_without_merge_is_exact_and_eject_merge_keeps_output(case: ContractCase) -> None:
    model, x = _build(case)
    base_sd = {k: v.clone() for k, v in model.state_dict().items()}
    base_rg = {n: p.requires_grad for n, p in model.named_parameters()}
    la.inject(model, case.make_config(["layer"]))
    randomize_adapter(model)
    out = model(x)
    twin = copy.deepcopy(model)
    la.eject(model)
    assert {k: v for k, v in model.state_dict().items()}.keys() == base_sd.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in base_sd.items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == base_rg
    if case.mergeable:
        plain = la.eject(twin, merge=True)
        assert set(plain.state_dict()) == set(base_sd)
        assert torch.allclose(plain(x), out, atol=case.atol_merge)


@pytest.mark.parametrize("case", PARAMS)
def test_state_round_trip(case: ContractCase) -> None:
    model, x = _build(case)
    la.inject(model, case.make_config(["layer"]))
    randomize_adapter(model, seed=1)
    out = model(x)
    sd = {k: v.clone() for k, v in la.adapter_state_dict(model).items()}
    fresh, _ = _build(case)
    la.inject(fresh, case.make_config(["layer"]))
    la.load_adapter_state_dict(fresh, sd)
    assert torch.equal(fresh(x), out)


@pytest.mark.parametrize("case", PARAMS)
def test_gradients_reach_only_adapters(case: ContractCase) -> None:
    model, x = _build(case)
    la.inject(model, case.make_config(["layer"]))
    randomize_adapter(model, seed=2)
    model.train()
    y = model(x)
    y.float().pow(2).mean().backward()
    adapter = set(la.adapter_state_dict(model))
    for n, p in model.named_parameters():
        if n in adapter:
            assert p.grad is not None and torch.isfinite(p.grad).all(), n
        else:
            assert p.grad is None, n


COMPILE_CASES = [pytest.param(c, id=c.id) for c in ALL_CASES if "nocompile" not in c.tags]


@pytest.mark.slow
@pytest.mark.parametrize("case", COMPILE_CASES[:: max(1, len(COMPILE_CASES) // 40)] if COMPILE_CASES else [])
def test_compile_equals_eager(case: ContractCase) -> None:
    model, x = _build(case)
    la.inject(model, case.make_config(["layer"]))
    randomize_adapter(model, seed=3)
    eager = model(x)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    assert torch.allclose(compiled(x), eager, atol=1e-5)


def _plain(base_sd, case: ContractCase):
    model = Wrap(LAYERS[case.layer].make()).eval()
    model.load_state_dict(base_sd)
    return model


class _AtenOps(TorchDispatchMode):
    """Records the name of every ATen operator that runs inside the ``with`` block."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - dispatch protocol
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("case", [p for p in PARAMS if p.values[0].mergeable])
def test_merged_forward_runs_exactly_the_base_operators(case: ContractCase) -> None:
    """After ``merge`` the adapted model costs what the base costs: the same ATen calls, nothing more."""
    model, x = _build(case)
    base_sd = {k: v.clone() for k, v in model.state_dict().items()}
    la.inject(model, case.make_config(["layer"]))
    randomize_adapter(model)
    la.merge(model)
    with torch.no_grad(), _AtenOps() as merged:
        model(x)
    plain_model = _plain(base_sd, case)
    with torch.no_grad(), _AtenOps() as plain:
        plain_model(x)
    assert merged.ops == plain.ops
    la.unmerge(model)
    with torch.no_grad(), _AtenOps() as unmerged:
        model(x)
    assert unmerged.ops != plain.ops  # the recorder sees the adapter's work when it runs
