"""Contract of ``lightning_adapters.methods.lora_data`` (CorDA and the data-init driver) function by function,
against closed forms computed here in float64: CorDA's rank-one terms ``s·b_i·a_iᵀ = u_i·s_i·v'_iᵀ`` of
``W C̃ = U S Vᵀ``, ``V' = C̃⁻¹ V``, the covariance ``Σ (X/|max X|)ᵀ (X/|max X|) / calls``, and a fake two-rank
``torch.distributed``.
"""

from __future__ import annotations

import signal
from collections import OrderedDict
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import lightning_adapters as la
from lightning_adapters.errors import AdapterConfigError, AdapterStateError
from lightning_adapters.methods import lora_data


@pytest.fixture(autouse=True)
def cpu_limit():
    """A test that loops (CorDA's damping doubles forever on a NaN covariance) fails after 30 s of CPU time."""

    def stop(signum, frame):
        raise TimeoutError("over 30 s of CPU time")

    previous = signal.signal(signal.SIGVTALRM, stop)
    signal.setitimer(signal.ITIMER_VIRTUAL, 30.0)
    yield
    signal.setitimer(signal.ITIMER_VIRTUAL, 0.0)
    signal.signal(signal.SIGVTALRM, previous)


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-4) -> None:
    assert a.shape == b.shape, (a.shape, b.shape)
    scale = b.abs().max().clamp_min(1e-12)
    err = ((a.double() - b.double()).abs().max() / scale).item()
    assert err <= rtol, err


# ------------------------------------------------------------------------------------------------------------
# corda_factors


def _spd(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3 * n, n, generator=g, dtype=torch.float64)
    return x.t() @ x / (3 * n)


def _weight(out: int, n: int, seed: int) -> torch.Tensor:
    return torch.randn(out, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _terms(w: torch.Tensor, c: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float64 ``(U, S, V')`` of ``W C̃`` with ``C̃ = C + damp·mean(diag C)·I``, ``V' = C̃⁻¹ V``."""
    fixed = c + torch.eye(c.shape[0], dtype=torch.float64) * torch.diag(c).mean() * damp
    inv = torch.linalg.inv(fixed)
    u, s, vh = torch.linalg.svd(w @ fixed, full_matrices=False)
    return u, s, (vh @ inv).t()


def _check_factors(A, B, w, c, r, scale, damp, keep) -> None:
    """Each rank-one term, ``BᵀB = diag(S/s)`` (the root split evenly) and the shapes."""
    u, s, v = _terms(w, c, damp)
    idx = list(range(s.shape[0]))[keep]
    assert A.shape == (r, w.shape[1]) and B.shape == (w.shape[0], r)
    assert A.dtype == B.dtype == torch.float32 and A.is_contiguous() and B.is_contiguous()
    for j, i in enumerate(idx):
        _close(scale * torch.outer(B[:, j], A[j]), s[i] * torch.outer(u[:, i], v[:, i]))
    _close(B.t().double() @ B.double(), torch.diag(s[idx] / scale))


@pytest.mark.parametrize("method", ["ipm", "kpm"])
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_corda_factors_are_the_kept_triplets(method, scale):
    w, c = _weight(6, 8, 0), _spd(8, 1)
    A, B = lora_data.corda_factors(w.float(), c.float(), 3, scale, method)
    keep = slice(None, 3) if method == "ipm" else slice(-3, None)
    _check_factors(A, B, w, c, 3, scale, 0.01, keep)


def test_corda_factors_default_to_ipm_and_full_rank_rebuilds_w():
    w, c = _weight(5, 5, 2), _spd(5, 3)
    A, B = lora_data.corda_factors(w.float(), c.float(), 2, 2.0)
    _check_factors(A, B, w, c, 2, 2.0, 0.01, slice(None, 2))
    A, B = lora_data.corda_factors(w, c, 5, 2.0, "kpm")  # float64 in: float32 out; all 5 kept: s·B·A = W
    assert A.dtype == torch.float32
    _close(2.0 * B.double() @ A.double(), w)


def test_corda_factors_double_the_damping_until_the_inverse_holds():
    """``C`` with an eigenvalue of ``-0.01·mean(diag C)``: ``C + 0.01·mean·I`` is (nearly) singular, so the
    damping doubles to 0.02 and the factors are those of ``C + 0.02·mean·I``."""
    q = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64))[0]
    eig = torch.tensor([3.0, 2.0, 1.0, 0.0], dtype=torch.float64)
    eig[3] = -0.01 * eig[:3].sum() / 4.01  # mean(diag) = trace / 4 = (6 + e) / 4 and e = -0.01 · that
    c = q @ torch.diag(eig) @ q.t()
    w = _weight(3, 4, 6)
    A, B = lora_data.corda_factors(w.float(), c.float(), 2, 1.0)
    _check_factors(A, B, w, c, 2, 1.0, 0.02, slice(None, 2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_corda_factors_on_cuda():
    """Every intermediate (identity, damping) on the covariance's device: the CUDA result is the CPU one."""
    w, c = _weight(6, 8, 0), _spd(8, 1)
    A, B = lora_data.corda_factors(w.float().cuda(), c.float().cuda(), 3, 1.0)
    assert A.is_cuda and B.is_cuda
    _check_factors(A.cpu(), B.cpu(), w, c, 3, 1.0, 0.01, slice(None, 3))


# ------------------------------------------------------------------------------------------------------------
# Small helpers


def test_default_forward_by_batch_kind():
    seen = []

    class Echo(nn.Module):
        def forward(self, x=None, **kw):
            seen.append((x, kw))
            return "out"

    m, t = Echo(), torch.ones(2)
    assert lora_data.default_forward(m, {"x": t, "y": 3}) == "out" and seen[-1] == (t, {"y": 3})
    assert lora_data.default_forward(m, (t, "target")) == "out" and seen[-1] == (t, {})
    assert lora_data.default_forward(m, [t, "target"]) == "out" and seen[-1] == (t, {})
    assert lora_data.default_forward(m, t) == "out" and seen[-1] == (t, {})


class Tagged(dict):
    pass


def test_to_device_moves_tensors_and_keeps_container_types():
    meta = torch.device("meta")
    t = torch.ones(2)
    assert lora_data._to_device(t, meta).device == meta
    batch = Tagged(a=t, b=[t, (t, "s")], c=OrderedDict(d=t), e=5)
    out = lora_data._to_device(batch, meta)
    assert type(out) is Tagged and list(out) == ["a", "b", "c", "e"]
    assert out["a"].device == meta and type(out["b"]) is list and out["b"][0].device == meta
    assert type(out["b"][1]) is tuple and out["b"][1][0].device == meta and out["b"][1][1] == "s"
    assert type(out["c"]) is OrderedDict and out["c"]["d"].device == meta
    assert out["e"] == 5 and t.device.type == "cpu"
    assert lora_data._to_device("text", meta) == "text"


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.lin, self.c1, self.plain = nn.Embedding(10, 6), nn.Linear(6, 6), Conv1D(4, 6), nn.Linear(4, 4)

    def forward(self, ids):
        return self.plain(self.c1(self.lin(self.emb(ids))))


def test_data_init_groups_by_adapter_linear_and_conv1d_only():
    model = la.inject(Mixed(), la.LoRAConfig(r=2, target_modules=["emb", "lin", "c1"], init_weights="corda"))
    la.inject(model, la.LoRAConfig(r=2, target_modules=["plain"], init_weights="eva"), name="e")
    la.inject(model, la.LoRAConfig(r=2, target_modules=["plain"]), name="plainlora")
    groups = lora_data.data_init_groups(model)
    assert list(groups) == ["default", "e"]
    assert list(groups["default"]) == ["lin", "c1"] and list(groups["e"]) == ["plain"]
    for name, (base, layer) in groups["default"].items():
        assert base is model.get_submodule(name) and layer is base.adapter.default
    assert groups["e"]["plain"][1] is model.plain.adapter.e
    assert lora_data._mode(groups["default"]) == "corda" and lora_data._mode(groups["e"]) == "eva"
    assert lora_data._config_of(model, "e").init_weights == "eva"
    assert lora_data._config_of(model, "default").init_weights == "corda"
    with pytest.raises(AdapterConfigError, match="adapter 'nope' belongs to no injection"):
        lora_data._config_of(model, "nope")
    assert lora_data.data_init_groups(la.inject(Mixed(), la.LoRAConfig(r=2, target_modules=["lin"]))) == {}
    other = la.inject(Mixed(), la.LoRAConfig(r=2, target_modules=["lin"], init_weights="corda"))
    la.inject(other, la.LoHaConfig(r=2, target_modules=["plain"]), name="h")  # a layer with no init_mode at all
    assert {a: list(g) for a, g in lora_data.data_init_groups(other).items()} == {"default": ["lin"]}


# ------------------------------------------------------------------------------------------------------------
# Covariances, reduction and the CorDA init


class Twice(nn.Module):
    """``a`` runs twice per forward (two calls, two scalings), ``b`` once on 3-d inputs."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.b(self.a(torch.tanh(self.a(x))))


def _cov(xs: list[torch.Tensor]) -> torch.Tensor:
    total = 0
    for x in xs:
        x = x.reshape(-1, x.shape[-1]).double()
        x = x / x.max().abs()
        total = total + x.t() @ x
    return total


def _inputs(model, batches):
    """Every call's input of ``a`` and ``b`` on the base model."""
    seen = {"a": [], "b": []}
    hooks = [getattr(model, n).register_forward_hook(lambda m, a, o, n=n: seen[n].append(a[0])) for n in seen]
    with torch.no_grad(), la.disabled(model):
        for b in batches:
            model(b)
    for h in hooks:
        h.remove()
    return seen


def _batches():
    g = torch.Generator().manual_seed(4)
    return [-torch.rand(2, 5, 4, generator=g) - 0.5, torch.randn(3, 4, 4, generator=g)]  # the first all negative


def test_covariances_sum_scaled_gram_matrices_per_call():
    model = la.inject(Twice(), la.LoRAConfig(r=2, target_modules=["a", "b"], init_weights="corda"))
    batches = _batches()
    seen = _inputs(model, batches)
    with la.disabled(model):
        stats = lora_data._covariances(
            model, lora_data.data_init_groups(model)["default"], batches, lora_data.default_forward, torch.device("cpu")
        )
    assert list(stats) == ["a", "b"] and stats["a"][1] == 4 and stats["b"][1] == 2
    _close(stats["a"][0], _cov(seen["a"]), 1e-6)
    _close(stats["b"][0], _cov(seen["b"]), 1e-6)
    assert stats["a"][0].dtype == torch.float32 and stats["a"][0].shape == (4, 4)
    assert not model.a._forward_hooks and not model.b._forward_hooks


def test_covariances_start_on_the_weight_s_device_and_move_batches():
    """A meta-device model: the batches go to the given device and each layer's ``(in, in)`` sum starts at zero on
    its weight's device, also for a layer no call reaches (its count stays 0)."""
    model = la.inject(Twice().to("meta"), la.LoRAConfig(r=2, target_modules=["a", "b"], init_weights="corda"))
    seen = []
    batches = [torch.ones(2, 4), {"x": torch.ones(1)}]
    layers = lora_data.data_init_groups(model)["default"]
    stats = lora_data._covariances(model, layers, batches, lambda m, b: seen.append(b), torch.device("meta"))
    assert seen[0].device.type == "meta" and seen[1]["x"].device.type == "meta"
    for name in ("a", "b"):
        total, count = stats[name]
        assert total.shape == (4, 4) and total.device.type == "meta" and count == 0
    stats = lora_data._covariances(
        Twice(), {"b": (nn.Linear(4, 3), SimpleNamespace(in_features=4))}, [], None, torch.device("cpu")
    )
    assert torch.equal(stats["b"][0], torch.zeros(4, 4)) and stats["b"][1] == 0


def test_covariances_refuse_non_finite_inputs_and_remove_hooks():
    model = la.inject(Twice(), la.LoRAConfig(r=2, target_modules=["b"], init_weights="corda"))
    bad = torch.full((2, 4), float("nan"))
    with pytest.raises(AdapterStateError, match="the inputs of 'b' are not finite"):
        la.initialize_from_data(model, [bad])
    assert not model.b._forward_hooks


@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_initialize_from_data_corda_equals_the_closed_form(method):
    """``A, B`` are the config's method's triplets of ``W`` and ``C = Σ / calls``; the base becomes ``W − s·B·A``
    (the model is the base at init)."""
    base = Twice()
    w = {n: getattr(base, n).weight.detach().double().clone() for n in ("a", "b")}
    cfg = la.LoRAConfig(r=2, alpha=3, target_modules=["a", "b"], init_weights="corda", corda_method=method)
    model = la.inject(Twice(), cfg)
    batches = _batches()
    seen = _inputs(model, batches)
    assert la.initialize_from_data(model, batches) is model
    for name, calls in (("a", 4), ("b", 2)):
        layer = getattr(model, name).adapter.default
        keep = slice(None, 2) if method == "ipm" else slice(-2, None)
        _check_factors(layer.lora_A, layer.lora_B, w[name], _cov(seen[name]) / calls, 2, 1.5, 0.01, keep)
        residual = getattr(model, name).weight.double()
        _close(residual + 1.5 * layer.lora_B.double() @ layer.lora_A.double(), w[name], 1e-5)
        assert layer.needs_data is False and layer.residual_applied is True
    x = torch.randn(3, 4)
    with torch.no_grad():
        _close(model(x), base(x), 1e-5)


def test_initialize_from_data_again_starts_from_the_original_weight():
    """A second call on a CorDA layer whose inputs it does not change itself (``b`` alone) gives the same init and
    residual: ``W`` is rebuilt as ``W_res + s·B0·A0`` first."""
    model = la.inject(Twice(), la.LoRAConfig(r=2, alpha=3, target_modules=["b"], init_weights="corda"))
    batches = _batches()
    la.initialize_from_data(model, batches)
    layer = model.b.adapter.default
    first = (model.b.weight.detach().clone(), layer.lora_A.detach().clone(), layer.lora_B.detach().clone())
    la.initialize_from_data(model, batches)
    _close(model.b.weight, first[0], 1e-5)
    _close(layer.lora_A, first[1], 1e-5)
    _close(layer.lora_B, first[2], 1e-5)


def test_apply_corda_refuses_a_layer_that_never_ran():
    model = la.inject(Twice(), la.LoRAConfig(r=2, target_modules=["a", "b"], init_weights="corda", corda_method="kpm"))
    with pytest.raises(AdapterStateError, match="'b' never ran on the batches given"):
        la.initialize_from_data(model, _batches(), forward_fn=lambda m, b: m.a(b))
    assert model.b.adapter.default.needs_data


def test_original_weight_adds_back_the_applied_residual():
    model = la.inject(Twice(), la.LoRAConfig(r=2, alpha=4, target_modules=["a"], init_weights="corda"))
    base, layer = model.a, model.a.adapter.default
    w = base.weight.detach().clone()
    assert torch.equal(lora_data._original_weight(base, layer), w)
    la.initialize_from_data(model, _batches())
    assert not torch.equal(base.weight, w)
    _close(lora_data._original_weight(base, layer), w, 1e-6)
    assert lora_data._original_weight(base, layer).dtype == torch.float32


def test_reduce_sums_every_rank_in_sorted_order(monkeypatch):
    """Two ranks holding the same statistics: totals and counts double; names reduced in sorted order."""
    import torch.distributed as dist

    order = []

    def all_reduce(t):
        order.append(t.numel())
        t.mul_(2)

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    stats = {"z": [torch.ones(2, 2), 3], "b": [torch.arange(9.0).view(3, 3), 1]}
    lora_data._reduce(stats, False)
    assert order == [] and stats["z"][1] == 3
    lora_data._reduce(stats, True)
    assert order == [10, 5]  # "b" (9 + 1) before "z" (4 + 1)
    assert torch.equal(stats["b"][0], 2 * torch.arange(9.0).view(3, 3)) and stats["b"][1] == 2
    assert torch.equal(stats["z"][0], 2 * torch.ones(2, 2)) and stats["z"][1] == 6
    assert type(stats["z"][1]) is int


def test_initialize_from_data_all_reduce_equals_doubled_batches(monkeypatch):
    """``all_reduce=True`` with a second rank holding the same statistics is CorDA on the batches twice."""
    import torch.distributed as dist

    monkeypatch.setattr(dist, "all_reduce", lambda t: t.mul_(2))
    cfg = la.LoRAConfig(r=2, target_modules=["a", "b"], init_weights="corda")
    batches = _batches()
    reduced = la.initialize_from_data(la.inject(Twice(), cfg), batches, all_reduce=True)
    twice = la.initialize_from_data(la.inject(Twice(), cfg), batches + batches, all_reduce=False)
    for name in ("a", "b"):
        _close(getattr(reduced, name).adapter.default.lora_A, getattr(twice, name).adapter.default.lora_A, 1e-5)
        _close(getattr(reduced, name).weight, getattr(twice, name).weight, 1e-5)


def test_initialize_from_data_refusals():
    with pytest.raises(AdapterConfigError, match="no LoRA layer with a data-driven init"):
        la.initialize_from_data(la.inject(Twice(), la.LoRAConfig(r=2, target_modules=["a"])), _batches())


def test_a_second_corda_init_reads_the_inputs_of_the_original_model():
    """``a`` feeds ``b`` (and itself): a re-run gives the first run's factors, and the same as a fresh injection,
    since the statistics are collected through ``W``, not through the ``W_res`` the first run left."""
    batches = [torch.randn(5, 4, generator=torch.Generator().manual_seed(k)) for k in range(3)]
    cfg = la.LoRAConfig(r=2, target_modules=["a", "b"], init_weights="corda")

    def factors(model):
        return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}

    once = la.inject(Twice(), cfg)
    la.initialize_from_data(once, batches)
    first, bases = factors(once), {n: p.detach().clone() for n, p in once.named_parameters() if "lora_" not in n}
    la.initialize_from_data(once, batches)
    for name, value in factors(once).items():
        torch.testing.assert_close(value, first[name], rtol=1e-4, atol=1e-5, msg=name)
    for name, value in once.named_parameters():
        if "lora_" not in name:
            torch.testing.assert_close(value, bases[name], rtol=1e-5, atol=1e-6, msg=name)
    fresh = la.inject(Twice(), cfg)
    la.initialize_from_data(fresh, batches)
    for name, value in factors(fresh).items():
        torch.testing.assert_close(value, first[name], rtol=0, atol=0, msg=name)
