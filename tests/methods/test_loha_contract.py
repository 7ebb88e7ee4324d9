"""LoHa pinned function by function against closed forms written here.

ΔW = (alpha / r) · (w1_a·w1_b) ⊙ (w2_a·w2_b), FedPara's CP form ``W_k = Σ_ij t_k[i, j] · wb_k[j] ⊗ wa_k[i]``,
PEFT's rank dropout (Bernoulli rows from the default CPU generator, always divided by their mean) and module
dropout, the exact config translation both ways.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

import lightning_adapters as la
import lightning_adapters.methods.loha as loha_mod
from lightning_adapters.methods.loha import (
    LoHaConfig,
    LoHaLayer,
    _from_peft,
    _to_peft,
    hadamard_delta,
    hadamard_delta_cp,
    scale_rows,
)
from tests.helpers import Wrap, layer_op

# ------------------------------------------------------------------------------------------------------------
# pure functions


def test_scale_rows_number_and_per_output_tensor():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 3, generator=g, dtype=torch.float64)
    s = torch.tensor([1.0, 2.0, 0.0, -3.0], dtype=torch.float64)
    assert torch.equal(scale_rows(w, 2.5, out_axis=0), w * 2.5)
    assert torch.equal(scale_rows(w, s, out_axis=0), w * s[:, None])
    wt = w.t().contiguous()  # (r, out): output p is column p
    assert torch.equal(scale_rows(wt, s, out_axis=1), wt * s[None, :])
    assert torch.equal(scale_rows(wt, 0.5, out_axis=1), wt * 0.5)


def test_hadamard_delta_closed_form():
    g = torch.Generator().manual_seed(1)
    w1a, w2a = (torch.randn(5, 2, generator=g, dtype=torch.float64) for _ in range(2))
    w1b, w2b = (torch.randn(2, 7, generator=g, dtype=torch.float64) for _ in range(2))
    full = (w1a @ w1b) * (w2a @ w2b)
    assert torch.allclose(hadamard_delta(w1a, w1b, w2a, w2b, 1.5), 1.5 * full, atol=1e-12)
    s = torch.arange(5, dtype=torch.float64) - 1.0
    assert torch.allclose(hadamard_delta(w1a, w1b, w2a, w2b, s), s[:, None] * full, atol=1e-12)


def _tucker(t, wa, wb):
    out = torch.zeros(wa.shape[1], wb.shape[1], *t.shape[2:], dtype=t.dtype)
    for i in range(t.shape[0]):
        for j in range(t.shape[1]):
            outer = wa[i][:, None] * wb[j][None, :]
            out += outer.reshape(*outer.shape, *([1] * (t.dim() - 2))) * t[i, j]
    return out


def test_hadamard_delta_cp_closed_form():
    g = torch.Generator().manual_seed(2)
    r, out_f, in_f = 2, 5, 3
    t1, t2 = (torch.randn(r, r, 3, 2, generator=g, dtype=torch.float64) for _ in range(2))
    w1a, w2a = (torch.randn(r, out_f, generator=g, dtype=torch.float64) for _ in range(2))
    w1b, w2b = (torch.randn(r, in_f, generator=g, dtype=torch.float64) for _ in range(2))
    full = _tucker(t1, w1a, w1b) * _tucker(t2, w2a, w2b)
    got = hadamard_delta_cp(t1, w1a, w1b, t2, w2a, w2b, 0.75)
    assert got.shape == (5, 3, 3, 2) and torch.allclose(got, 0.75 * full, atol=1e-12)
    s = torch.tensor([0.0, 1.0, 2.0, 3.0, -1.0], dtype=torch.float64)
    got = hadamard_delta_cp(t1, w1a, w1b, t2, w2a, w2b, s)
    assert torch.allclose(got, s.view(-1, 1, 1, 1) * full, atol=1e-12)


# ------------------------------------------------------------------------------------------------------------
# layer construction


def _randomize(layer, seed=0, std=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * std)
    return layer


def _expected_delta(layer, base):
    """s · W_1 ⊙ W_2 in the base weight's layout."""
    s = layer.alpha / layer.r
    if layer.use_cp:
        w1 = _tucker(layer.hada_t1, layer.hada_w1_a, layer.hada_w1_b)
        w2 = _tucker(layer.hada_t2, layer.hada_w2_a, layer.hada_w2_b)
    else:
        w1 = layer.hada_w1_a @ layer.hada_w1_b
        w2 = layer.hada_w2_a @ layer.hada_w2_b
    dw = s * w1 * w2
    if isinstance(base, Conv1D):
        return dw.t()
    return dw.reshape(base.weight.shape)


LAYOUTS = {
    # name: (base, kwargs, use_cp, shapes)
    "linear": (lambda: nn.Linear(24, 20), dict(r=3, alpha=7), False,
               {"hada_w1_a": (20, 3), "hada_w1_b": (3, 24), "hada_w2_a": (20, 3), "hada_w2_b": (3, 24)}),
    "conv1d_t": (lambda: Conv1D(20, 24), dict(r=2), False,
                 {"hada_w1_a": (20, 2), "hada_w1_b": (2, 24), "hada_w2_a": (20, 2), "hada_w2_b": (2, 24)}),
    "conv2d": (lambda: nn.Conv2d(8, 12, 3, padding=1), dict(r=2, alpha=3), False,
               {"hada_w1_a": (12, 2), "hada_w1_b": (2, 72), "hada_w2_a": (12, 2), "hada_w2_b": (2, 72)}),
    "conv2d-groups": (lambda: nn.Conv2d(8, 12, (3, 2), groups=2), dict(r=2), False,
                      {"hada_w1_a": (12, 2), "hada_w1_b": (2, 24), "hada_w2_a": (12, 2), "hada_w2_b": (2, 24)}),
    "conv1d": (lambda: nn.Conv1d(8, 12, 3), dict(r=2), False,
               {"hada_w1_a": (12, 2), "hada_w1_b": (2, 24), "hada_w2_a": (12, 2), "hada_w2_b": (2, 24)}),
    "conv2d-cp": (lambda: nn.Conv2d(8, 12, (3, 2), groups=2), dict(r=2, alpha=5, use_effective_conv2d=True), True,
                  {"hada_w1_a": (2, 12), "hada_w1_b": (2, 4), "hada_w2_a": (2, 12), "hada_w2_b": (2, 4),
                   "hada_t1": (2, 2, 3, 2), "hada_t2": (2, 2, 3, 2)}),
    "conv1d-cp": (lambda: nn.Conv1d(8, 12, 3), dict(r=2, alpha=5, use_effective_conv2d=True), True,
                  {"hada_w1_a": (2, 12), "hada_w1_b": (2, 8), "hada_w2_a": (2, 12), "hada_w2_b": (2, 8),
                   "hada_t1": (2, 2, 3, 1), "hada_t2": (2, 2, 3, 1)}),
    "pointwise-cp-flag": (lambda: nn.Conv2d(8, 12, 1), dict(r=2, use_effective_conv2d=True), False,
                          {"hada_w1_a": (12, 2), "hada_w1_b": (2, 8), "hada_w2_a": (12, 2), "hada_w2_b": (2, 8)}),
}  # fmt: skip


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layer_layout_attributes_and_delta(name):
    make, kw, use_cp, shapes = LAYOUTS[name]
    base = make()
    layer = LoHaLayer(base, LoHaConfig(**kw), "blk.m")
    r, alpha = kw["r"], kw.get("alpha", 8)
    assert (layer.r, layer.alpha, layer.scale) == (r, alpha, alpha / r)
    assert layer.use_cp is use_cp
    assert {n: tuple(p.shape) for n, p in layer.named_parameters()} == shapes
    state = layer.peft_state()
    assert list(state) == ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"] + (
        ["hada_t1", "hada_t2"] if use_cp else []
    )
    assert all(not v.requires_grad for v in state.values())
    if isinstance(base, Conv1D):
        assert layer.delta_shape == (20, 24)
    elif use_cp and isinstance(base, nn.Conv1d):
        assert layer.delta_shape == (12, 8, 3)
    else:
        assert layer.delta_shape == tuple(base.weight.shape)
    assert (layer.rank_dropout, layer.module_dropout) == (0.0, 0.0)
    _randomize(layer)
    dw = layer.delta_weight()
    assert dw.shape == base.weight.shape
    assert torch.allclose(dw, _expected_delta(layer, base), atol=1e-6)
    assert torch.equal(layer.additive_delta(base), dw)


def test_fields_features_and_patterns():
    cfg = LoHaConfig(
        r=4, alpha=8, rank_dropout=0.25, module_dropout=0.125, rank_pattern={"v": 1}, alpha_pattern={"v": 3}
    )
    v = LoHaLayer(nn.Linear(24, 20), cfg, "v")
    q = LoHaLayer(nn.Linear(24, 20), cfg, "q")
    assert (v.r, v.alpha, v.scale, q.r, q.alpha, q.scale) == (1, 3, 3.0, 4, 8, 2.0)
    assert (v.rank_dropout, v.module_dropout, v.in_features, v.out_features) == (0.25, 0.125, 24, 20)
    conv = LoHaLayer(nn.Conv2d(8, 12, 3, groups=2), LoHaConfig(r=1), "m")
    assert (conv.in_features, conv.out_features, conv.kind) == (8, 12, "conv2d")
    c1d = LoHaLayer(Conv1D(20, 24), LoHaConfig(r=1), "m")
    assert (c1d.in_features, c1d.out_features, c1d.kind) == (24, 20, "conv1d_t")


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [(torch.float64, torch.float64), (torch.bfloat16, torch.float32), (torch.float32, torch.float32)],
)
def test_parameters_in_working_dtype_and_device(dtype, expected):
    for base, kw in [(nn.Linear(24, 20), {}), (nn.Conv2d(8, 12, 3), dict(use_effective_conv2d=True))]:
        layer = LoHaLayer(base.to(dtype), LoHaConfig(r=2, **kw), "m")
        assert {p.dtype for p in layer.parameters()} == {expected}
    meta = LoHaLayer(nn.Linear(24, 20, device="meta"), LoHaConfig(r=1), "m")
    assert {p.device.type for p in meta.parameters()} == {"meta"}


@pytest.mark.parametrize(
    ("base", "kw"),
    [
        (nn.Linear(24, 20), dict(r=2)),
        (nn.Conv2d(8, 12, 3), dict(r=2, use_effective_conv2d=True)),
    ],
)
@pytest.mark.parametrize("init", [True, False])
def test_init_draws_kaiming_in_factor_order_then_zeroes_w2_b(base, kw, init):
    torch.manual_seed(11)
    layer = LoHaLayer(base, LoHaConfig(init_weights=init, **kw), "m")
    order = (
        ["hada_t1", "hada_w1_a", "hada_w1_b", "hada_t2", "hada_w2_a", "hada_w2_b"]
        if layer.use_cp
        else ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"]
    )
    torch.manual_seed(11)
    for n in order:
        t = torch.empty(getattr(layer, n).shape)
        nn.init.kaiming_uniform_(t, a=math.sqrt(5))
        if init and n == "hada_w2_b":
            assert torch.count_nonzero(getattr(layer, n)) == 0
        else:
            assert torch.equal(getattr(layer, n).detach(), t), n
    assert bool(torch.count_nonzero(layer.delta_weight()) == 0) is init


# ------------------------------------------------------------------------------------------------------------
# merge / unmerge


@pytest.mark.parametrize("kind", ["linear", "conv1d_t"])
def test_merge_unmerge_and_safe_refusal(kind):
    base = nn.Linear(24, 20) if kind == "linear" else Conv1D(20, 24)
    w0 = base.weight.detach().clone()
    layer = _randomize(LoHaLayer(base, LoHaConfig(r=2, alpha=3), "m"))
    dw = _expected_delta(layer, base).detach()
    layer.merge(base)
    assert layer.merged is True and torch.allclose(base.weight, w0 + dw, atol=1e-6)
    layer.unmerge(base)
    assert layer.merged is False and torch.allclose(base.weight, w0, atol=1e-6)
    with torch.no_grad():
        layer.hada_w1_a[0, 0] = float("nan")
    with pytest.raises(la.MergeError):
        layer.merge(base, safe=True)
    assert torch.allclose(base.weight, w0, atol=1e-6) and layer.merged is False
    layer.merge(base)
    assert not torch.isfinite(base.weight).all() and layer.merged is True


# ------------------------------------------------------------------------------------------------------------
# forward and delta_output


def _model(base, seed=0, **kw):
    model = la.inject(Wrap(base), LoHaConfig(target_modules=["layer"], **kw))
    _randomize(model.layer.adapter.default, seed)
    return model, model.layer.adapter.default


INPUTS = {
    "linear": (lambda: nn.Linear(24, 20), (3, 5, 24), {}),
    "conv1d_t": (lambda: Conv1D(20, 24), (3, 5, 24), {}),
    "conv2d": (lambda: nn.Conv2d(8, 12, 3, padding=1), (2, 8, 5, 5), {}),
    "conv2d-cp": (lambda: nn.Conv2d(8, 12, 3, padding=1), (2, 8, 5, 5), dict(use_effective_conv2d=True)),
    "conv1d": (lambda: nn.Conv1d(8, 12, 3, padding=1), (2, 8, 7), {}),
}


@pytest.mark.parametrize("kind", list(INPUTS))
@pytest.mark.parametrize("path", [True, False])
def test_training_rank_dropout_forward_delta_output_and_gradients(monkeypatch, kind, path):
    monkeypatch.setattr(LoHaLayer, "_rank_r2_is_cheaper", lambda self, *a: path)
    make, shape, kw = INPUTS[kind]
    base = make()
    model, layer = _model(base, r=2, alpha=3, rank_dropout=0.5, **kw)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1), requires_grad=True)
    model.train()
    n_out = 20 if kind in ("linear", "conv1d_t") else 12
    torch.manual_seed(7)
    torch.rand(1)  # PEFT's module-dropout draw comes first, also at module_dropout=0
    keep = (torch.rand(n_out) > 0.5).float()
    assert 0 < keep.sum() < n_out
    mult = keep / keep.mean()  # LoHa always rescales
    dw = _expected_delta(layer, base)
    masked = dw * mult[None, :] if kind == "conv1d_t" else dw * mult.view(-1, *([1] * (dw.dim() - 1)))
    ref = layer_op(base, x, base.weight + masked, base.bias)
    torch.manual_seed(7)
    y = model(x)
    assert torch.allclose(y, ref, atol=1e-5)
    params = [x, *layer.parameters()]
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
    got = torch.autograd.grad(y, params, g)
    want = torch.autograd.grad(ref, params, g, retain_graph=True)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
    torch.manual_seed(7)
    term = layer.delta_output(base, x)
    assert torch.allclose(term, layer_op(base, x, masked, None), atol=1e-5)
    tg = torch.autograd.grad(term, params, g)
    tw = torch.autograd.grad(layer_op(base, x, masked, None), params, g, retain_graph=True)
    for a, b in zip(tg, tw):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
    model.eval()
    state = torch.get_rng_state()
    assert torch.allclose(y := model(x), layer_op(base, x, base.weight + dw, base.bias), atol=1e-5)
    assert torch.allclose(layer.delta_output(base, x), layer_op(base, x, dw, None), atol=1e-5)
    assert torch.equal(torch.get_rng_state(), state)
    del y


def test_module_dropout_forward_and_delta_output():
    base = nn.Linear(24, 20)
    model, layer = _model(base, r=2, alpha=3, module_dropout=0.5)
    x = torch.randn(3, 24)
    model.train()
    seen = set()
    for seed in range(8):
        torch.manual_seed(seed)
        skip = float(torch.rand(1)) <= 0.5
        torch.manual_seed(seed)
        term = layer.delta_output(base, x)
        torch.manual_seed(seed)
        y = model(x)
        if skip:
            assert term is None
            assert torch.equal(y, F.linear(x, base.weight, base.bias))
        else:
            assert torch.allclose(term, F.linear(x, layer.delta_weight()), atol=1e-6)
            assert torch.allclose(y, F.linear(x, base.weight + layer.delta_weight(), base.bias), atol=1e-5)
        seen.add(skip)
    assert seen == {True, False}


def test_forward_path_choice_arguments(monkeypatch):
    calls, pays = [], []
    orig = LoHaLayer._rank_r2_is_cheaper
    orig_pays = loha_mod.rank_r2_pays

    def spy(self, x, needs_grad):
        calls.append((tuple(x.shape), needs_grad))
        return orig(self, x, needs_grad)

    def spy_pays(*a):
        pays.append(a)
        return orig_pays(*a)

    monkeypatch.setattr(LoHaLayer, "_rank_r2_is_cheaper", spy)
    monkeypatch.setattr(loha_mod, "rank_r2_pays", spy_pays)
    base = nn.Linear(24, 20)
    model, layer = _model(base, r=3)
    x = torch.randn(3, 5, 24)
    with torch.no_grad():
        model(x)
    model(x)
    base.weight.requires_grad_(False)
    for p in layer.parameters():
        p.requires_grad_(False)
    model(x)
    model(x.requires_grad_())
    assert calls == [((3, 5, 24), False), ((3, 5, 24), True), ((3, 5, 24), False), ((3, 5, 24), True)]
    assert pays == [(3, 24, 20, 15, False), (3, 24, 20, 15, True), (3, 24, 20, 15, False), (3, 24, 20, 15, True)]
    assert all(type(a[3]) is int for a in pays)  # a whole token count
    c1d, _ = _model(Conv1D(20, 24), r=2)
    with torch.no_grad():
        c1d(torch.randn(2, 7, 24))
    assert calls[4:] == [((2, 7, 24), False)] and pays[4:] == [(2, 24, 20, 14, False)]  # Conv1D: like a Linear
    conv, _ = _model(nn.Conv2d(8, 12, 3), r=2)
    conv(torch.randn(1, 8, 4, 4))
    assert len(calls) == 5  # convolutions always fold


def test_rank_r2_path_with_mixed_dtypes_and_no_grad(monkeypatch):
    monkeypatch.setattr(LoHaLayer, "_rank_r2_is_cheaper", lambda self, *a: True)
    base = nn.Linear(24, 20)
    model, layer = _model(base, r=2, alpha=5)
    x = torch.randn(4, 24)
    with torch.no_grad():
        y = model(x)
    assert torch.allclose(y, F.linear(x, base.weight + _expected_delta(layer, base), base.bias), atol=1e-5)


# ------------------------------------------------------------------------------------------------------------
# PEFT state and config translation


def test_peft_state_round_trip_casts_to_the_parameter_dtype():
    src = _randomize(LoHaLayer(nn.Conv2d(8, 12, 3), LoHaConfig(r=2, use_effective_conv2d=True), "m"))
    state = {k: v.to(torch.float64) for k, v in src.peft_state().items()}
    dst = LoHaLayer(nn.Conv2d(8, 12, 3), LoHaConfig(r=2, use_effective_conv2d=True), "m")
    dst.load_peft_state(state)
    for n, p in dst.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p, getattr(src, n)), n
    assert torch.equal(dst.delta_weight(), src.delta_weight())


def test_extra_repr_strings():
    assert LoHaLayer(nn.Linear(24, 20), LoHaConfig(r=3, alpha=7), "m").extra_repr() == (
        "linear, r=3, scale=2.33333, merged=False"
    )
    assert LoHaLayer(nn.Conv2d(8, 12, 3), LoHaConfig(r=2, use_effective_conv2d=True), "m").extra_repr() == (
        "conv2d, r=2, scale=4, cp, merged=False"
    )


def test_to_peft_exact_dict_and_round_trip():
    cfg = LoHaConfig(
        r=3,
        alpha=5,
        rank_dropout=0.25,
        module_dropout=0.5,
        use_effective_conv2d=True,
        init_weights=False,
        rank_pattern={"v": 2},
        alpha_pattern={"q": 7},
        layers_to_transform=[0, 1],
        layers_pattern="layers",
        target_modules=["q", "v"],
    )
    d = _to_peft(cfg)
    assert d == {
        "peft_type": "LOHA",
        "r": 3,
        "alpha": 5,
        "rank_dropout": 0.25,
        "module_dropout": 0.5,
        "use_effective_conv2d": True,
        "init_weights": False,
        "rank_pattern": {"v": 2},
        "alpha_pattern": {"q": 7},
        "layers_to_transform": [0, 1],
        "layers_pattern": "layers",
    }
    back = _from_peft({**d, "target_modules": ["q", "v"], "exclude_modules": ["k"], "modules_to_save": ["head"]})
    assert back == LoHaConfig(**{**cfg.__dict__, "exclude_modules": ["k"], "modules_to_save": ["head"]})


def test_from_peft_defaults_and_none_values():
    assert _from_peft({"peft_type": "LOHA"}) == LoHaConfig(r=8, alpha=8)
    d = _from_peft({})
    assert (d.r, d.alpha, d.rank_dropout, d.module_dropout, d.use_effective_conv2d, d.init_weights) == (
        8,
        8,
        0.0,
        0.0,
        False,
        True,
    )
    assert (d.target_modules, d.exclude_modules, d.modules_to_save) == (None, None, None)
    cfg = _from_peft(
        {
            "rank_dropout": None,
            "module_dropout": None,
            "rank_pattern": None,
            "alpha_pattern": None,
            "init_weights": 0,
            "use_effective_conv2d": 1,
        }
    )
    assert (cfg.rank_dropout, cfg.module_dropout, cfg.rank_pattern, cfg.alpha_pattern) == (0.0, 0.0, {}, {})
    assert cfg.init_weights is False and cfg.use_effective_conv2d is True


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("rank_dropout", 1.0),
        ("module_dropout", -0.5),
        ("use_effective_conv2d", 2),
        ("init_weights", "lycoris"),
        ("init_weights", None),
    ],
)
def test_config_refusals_name_method_and_field(field, value):
    with pytest.raises(la.AdapterConfigError) as err:
        LoHaConfig(**{field: value})
    if field in ("rank_dropout", "module_dropout"):
        expected = f"loha: {field} must be in [0, 1), got {value!r}"
    else:
        expected = f"loha: {field} must be one of [True, False], got {value!r}"
    assert str(err.value) == expected


def test_config_accepts_edges():
    for kw in (dict(rank_dropout=0.0, module_dropout=0.0), dict(rank_dropout=0.99), dict(init_weights=False)):
        LoHaConfig(**kw)
