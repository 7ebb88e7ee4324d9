"""LoKr and the shared LyCORIS helpers, pinned function by function against closed forms written here.

ΔW = (alpha / r) · w1 ⊗ w2 (``torch.kron`` as the oracle), PEFT's ``factorization`` for the splits, PEFT's
dropout draws (``torch.rand`` on the default CPU generator), the exact config translation both ways.
"""

from __future__ import annotations

import math
import signal

import pytest
import torch
import torch.nn.functional as F
from peft.tuners.lokr.layer import factorization as peft_factorization
from torch import nn
from transformers.pytorch_utils import Conv1D

import lightning_adapters as la
import lightning_adapters.methods.lokr as lokr_mod
from lightning_adapters.methods._lycoris import cp_factor, module_dropped, rank_dropout_multipliers
from lightning_adapters.methods.lokr import LoKrConfig, LoKrLayer, _from_peft, _to_peft, factorization, kron_weight
from tests.helpers import Wrap, layer_op

# ------------------------------------------------------------------------------------------------------------
# _lycoris


def test_cp_factor_is_the_tucker_sum():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64)
    wa = torch.randn(2, 6, generator=g, dtype=torch.float64)
    wb = torch.randn(3, 7, generator=g, dtype=torch.float64)
    expected = torch.zeros(6, 7, 4, 5, dtype=torch.float64)
    for i in range(2):
        for j in range(3):
            expected += t[i, j][None, None] * (wa[i][:, None] * wb[j][None, :])[:, :, None, None]
    got = cp_factor(t, wa, wb)
    assert got.shape == (6, 7, 4, 5)
    assert torch.allclose(got, expected, atol=1e-12)


def test_rank_dropout_multipliers_exact_draws():
    torch.manual_seed(5)
    keep = (torch.rand(10) > 0.3).to(torch.float64)
    torch.manual_seed(5)
    plain = rank_dropout_multipliers(10, 0.3, False, torch.float64, torch.device("cpu"))
    assert plain.dtype == torch.float64 and plain.shape == (10,)
    assert torch.equal(plain, keep)
    assert 0 < keep.sum() < 10
    torch.manual_seed(5)
    scaled = rank_dropout_multipliers(10, 0.3, True, torch.float64, torch.device("cpu"))
    assert torch.allclose(scaled, keep / keep.mean(), atol=0, rtol=1e-15)
    assert torch.allclose(scaled.mean(), torch.tensor(1.0, dtype=torch.float64))
    # One draw of 10 values from the default generator: the next draw is what follows it.
    torch.manual_seed(5)
    torch.rand(10)
    after = torch.rand(1)
    torch.manual_seed(5)
    rank_dropout_multipliers(10, 0.3, True, torch.float32, torch.device("cpu"))
    assert torch.equal(torch.rand(1), after)


def test_rank_dropout_multipliers_all_dropped_is_zero_not_nan():
    for dtype in (torch.float32, torch.float64, torch.float16):
        m = rank_dropout_multipliers(6, 1.0, True, dtype, torch.device("cpu"))
        assert m.dtype == dtype and torch.equal(m, torch.zeros(6, dtype=dtype))
    none = rank_dropout_multipliers(6, 0.0, True, torch.float32, torch.device("cpu"))
    assert torch.equal(none, torch.ones(6))
    meta = rank_dropout_multipliers(4, 0.5, False, torch.float32, torch.device("meta"))
    assert meta.device.type == "meta" and meta.shape == (4,)


def test_module_dropped_draw_semantics(monkeypatch):
    state = torch.get_rng_state()
    assert module_dropped(False, 0.9) is False
    assert torch.equal(torch.get_rng_state(), state)  # no draw when not training
    torch.rand(1)
    after = torch.get_rng_state()
    torch.set_rng_state(state)
    assert module_dropped(True, 0.0) is False
    assert torch.equal(torch.get_rng_state(), after)  # one draw in training even at p == 0, as PEFT's layers do
    for value, p, expected in [(0.5, 0.5, True), (0.49, 0.5, True), (0.51, 0.5, False), (0.0, 0.1, True)]:
        monkeypatch.setattr(torch, "rand", lambda *a, v=value, **k: torch.tensor([v]))
        assert module_dropped(True, p) is expected
        assert module_dropped(False, p) is False
    monkeypatch.undo()
    torch.manual_seed(2)
    u = float(torch.rand(1))
    torch.manual_seed(2)
    assert module_dropped(True, 0.5) is (u <= 0.5)


# ------------------------------------------------------------------------------------------------------------
# pure functions


def _raise_timeout(signum, frame):
    raise TimeoutError("factorization did not return")


def test_factorization_equals_peft_everywhere():
    old = signal.signal(signal.SIGALRM, _raise_timeout)
    signal.setitimer(signal.ITIMER_REAL, 20.0)  # a divisor walk that never ends fails here instead of hanging
    try:
        for dim in range(1, 260):
            for f in (-2, -1, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 16, 100):  # 0 and -2: no split, as PEFT
                assert factorization(dim, f) == tuple(peft_factorization(dim, f)), (dim, f)
        assert factorization(36) == (6, 6)
        assert factorization(12, 5) == (3, 4)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_kron_weight_layouts_equal_torch_kron():
    g = torch.Generator().manual_seed(1)
    w1 = torch.randn(2, 3, generator=g, dtype=torch.float64)
    w2 = torch.randn(4, 5, generator=g, dtype=torch.float64)
    got = kron_weight(w1, w2)
    assert got.shape == (8, 15) and torch.allclose(got, torch.kron(w1, w2), atol=1e-14)
    # A strided (transposed) input gives the same values.
    assert torch.allclose(kron_weight(w1, w2.t().contiguous().t()), torch.kron(w1, w2), atol=1e-14)
    w4 = torch.randn(4, 5, 3, 2, generator=g, dtype=torch.float64)
    got4 = kron_weight(w1, w4)
    assert got4.shape == (8, 15, 3, 2)
    assert torch.allclose(got4, torch.kron(w1[:, :, None, None], w4), atol=1e-14)
    w3 = torch.randn(4, 5, 3, generator=g, dtype=torch.float64)
    got3 = kron_weight(w1, w3)
    assert got3.shape == (4, 10, 9)
    assert torch.allclose(got3, torch.kron(w1[None], w3), atol=1e-14)


# ------------------------------------------------------------------------------------------------------------
# layer construction


def _randomize(layer, seed=0, std=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * std)
    return layer


def _w1(layer):
    return layer.lokr_w1 if layer.full_w1 else layer.lokr_w1_a @ layer.lokr_w1_b


def _w2(layer):
    if layer.full_w2:
        return layer.lokr_w2
    if layer.use_cp:
        return torch.einsum("ij...,jq,ip->pq...", layer.lokr_t2, layer.lokr_w2_b, layer.lokr_w2_a)
    return layer.lokr_w2_a @ layer.lokr_w2_b


def _expected_delta(layer, base):
    """PEFT's make_kron: torch.kron (w1 unsqueezed to w2's rank) times alpha / r, reshaped to the weight."""
    w1, w2 = _w1(layer), _w2(layer)
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    elif w2.dim() == 3:
        w1 = w1[None]
    dw = torch.kron(w1.contiguous(), w2.contiguous()) * (layer.alpha / layer.r)
    if isinstance(base, Conv1D):
        return dw.reshape(base.weight.shape[1], base.weight.shape[0]).t()
    if layer.use_cp and isinstance(base, nn.Conv1d):
        return dw.reshape(base.weight.shape[0], base.weight.shape[1], base.weight.shape[2])
    return dw.reshape(base.weight.shape)


LAYOUTS = {
    # name: (base factory, config kwargs, (a, b, c, d), full_w1, full_w2, use_cp, parameter shapes)
    "linear-full": (lambda: nn.Linear(64, 64), dict(r=4), (8, 8, 8, 8), True, True, False,
                    {"lokr_w1": (8, 8), "lokr_w2": (8, 8)}),
    "linear-lowrank": (lambda: nn.Linear(24, 20), dict(r=1, alpha=3), (4, 5, 4, 6), True, False, False,
                       {"lokr_w1": (4, 4), "lokr_w2_a": (5, 1), "lokr_w2_b": (1, 6)}),
    "linear-both-r3": (lambda: nn.Linear(64, 64), dict(r=3, alpha=2, decompose_both=True), (8, 8, 8, 8), False,
                       False, False,
                       {"lokr_w1_a": (8, 3), "lokr_w1_b": (3, 8), "lokr_w2_a": (8, 3), "lokr_w2_b": (3, 8)}),
    "linear-both-r4": (lambda: nn.Linear(64, 64), dict(r=4, decompose_both=True), (8, 8, 8, 8), True, True, False,
                       {"lokr_w1": (8, 8), "lokr_w2": (8, 8)}),
    "linear-low-w1-full-w2": (lambda: nn.Linear(64, 64), dict(r=2, decompose_both=True, decompose_factor=16),
                              (16, 4, 16, 4), False, True, False,
                              {"lokr_w1_a": (16, 2), "lokr_w1_b": (2, 16), "lokr_w2": (4, 4)}),
    "linear-factor": (lambda: nn.Linear(24, 20), dict(r=2, alpha=5, decompose_factor=2), (2, 10, 2, 12), True,
                      False, False, {"lokr_w1": (2, 2), "lokr_w2_a": (10, 2), "lokr_w2_b": (2, 12)}),
    "conv1d_t": (lambda: Conv1D(20, 24), dict(r=1, alpha=3), (4, 5, 4, 6), True, False, False,
                 {"lokr_w1": (4, 4), "lokr_w2_a": (5, 1), "lokr_w2_b": (1, 6)}),
    "conv2d-lowrank": (lambda: nn.Conv2d(8, 12, 3, padding=1), dict(r=1, alpha=2), (3, 4, 2, 4), True, False,
                       False, {"lokr_w1": (3, 2), "lokr_w2_a": (4, 1), "lokr_w2_b": (1, 36)}),
    "conv2d-groups": (lambda: nn.Conv2d(8, 12, 3, groups=2, padding=1), dict(r=1), (3, 4, 2, 2), True, False,
                      False, {"lokr_w1": (3, 2), "lokr_w2_a": (4, 1), "lokr_w2_b": (1, 18)}),
    "conv2d-full": (lambda: nn.Conv2d(8, 12, 3, padding=1), dict(r=2, alpha=3), (3, 4, 2, 4), True, True, False,
                    {"lokr_w1": (3, 2), "lokr_w2": (4, 4, 3, 3)}),
    "conv2d-cp": (lambda: nn.Conv2d(8, 12, 3, padding=1), dict(r=1, alpha=2, use_effective_conv2d=True),
                  (3, 4, 2, 4), True, False, True,
                  {"lokr_w1": (3, 2), "lokr_t2": (1, 1, 3, 3), "lokr_w2_a": (1, 4), "lokr_w2_b": (1, 4)}),
    "conv2d-pointwise": (lambda: nn.Conv2d(8, 12, 1), dict(r=1, use_effective_conv2d=True), (3, 4, 2, 4), True,
                         False, False, {"lokr_w1": (3, 2), "lokr_w2_a": (4, 1), "lokr_w2_b": (1, 4)}),
    "conv1d-full": (lambda: nn.Conv1d(8, 12, 3, padding=1), dict(r=4, alpha=3), (3, 4, 2, 4), True, True, False,
                    {"lokr_w1": (3, 2), "lokr_w2": (4, 4, 3)}),
    "conv1d-cp": (lambda: nn.Conv1d(8, 12, 3, padding=1), dict(r=1, alpha=3, use_effective_conv2d=True),
                  (3, 4, 2, 4), True, False, True,
                  {"lokr_w1": (3, 2), "lokr_t2": (1, 1, 3, 1), "lokr_w2_a": (1, 4), "lokr_w2_b": (1, 4)}),
}  # fmt: skip


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layer_layout_attributes_and_delta(name):
    make, kw, abcd, full_w1, full_w2, use_cp, shapes = LAYOUTS[name]
    base = make()
    layer = LoKrLayer(base, LoKrConfig(**kw), "blk.m")
    r, alpha = kw["r"], kw.get("alpha", 8)
    assert (layer.r, layer.alpha, layer.scale) == (r, alpha, alpha / r)
    assert layer.abcd == abcd
    assert (layer.full_w1, layer.full_w2, layer.use_cp) == (full_w1, full_w2, use_cp)
    assert {n: tuple(p.shape) for n, p in layer.named_parameters()} == shapes
    assert list(layer.peft_state()) == list(shapes)
    assert layer._names() == list(shapes)
    assert layer.delta_shape == (tuple(base.weight.shape) if not isinstance(base, Conv1D) else (20, 24))
    assert (layer.rank_dropout, layer.rank_dropout_scale, layer.module_dropout) == (0.0, False, 0.0)
    _randomize(layer)
    dw = layer.delta_weight()
    assert dw.shape == base.weight.shape
    assert torch.allclose(dw, _expected_delta(layer, base), atol=1e-6)
    assert torch.equal(layer.additive_delta(base), dw)


def test_dropout_fields_and_features_are_kept():
    layer = LoKrLayer(
        nn.Linear(24, 20),
        LoKrConfig(r=1, rank_dropout=0.25, module_dropout=0.125, rank_dropout_scale=True),
        "m",
    )
    assert (layer.rank_dropout, layer.rank_dropout_scale, layer.module_dropout) == (0.25, True, 0.125)
    assert (layer.in_features, layer.out_features) == (24, 20)
    conv = LoKrLayer(nn.Conv2d(8, 12, 3, groups=2), LoKrConfig(r=1), "m")
    assert (conv.in_features, conv.out_features) == (8, 12)
    c1d = LoKrLayer(Conv1D(20, 24), LoKrConfig(r=1), "m")
    assert (c1d.in_features, c1d.out_features, c1d.kind) == (24, 20, "conv1d_t")


def test_rank_pattern_and_alpha_pattern_are_read_by_name():
    cfg = LoKrConfig(r=4, alpha=8, rank_pattern={"v": 1}, alpha_pattern={"v": 3})
    v = LoKrLayer(nn.Linear(24, 20), cfg, "v")
    q = LoKrLayer(nn.Linear(24, 20), cfg, "q")
    assert (v.r, v.alpha, v.scale) == (1, 3, 3.0)
    assert (q.r, q.alpha, q.scale) == (4, 8, 2.0)


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [(torch.float64, torch.float64), (torch.bfloat16, torch.float32), (torch.float32, torch.float32)],
)
def test_parameters_in_working_dtype_and_device(dtype, expected):
    cases = [
        (nn.Linear(24, 20), {}),
        (nn.Linear(64, 64), dict(decompose_both=True)),
        (nn.Conv2d(8, 12, 3), dict(use_effective_conv2d=True)),
        (nn.Conv2d(8, 12, 3), dict(r=4)),
    ]
    for base, kw in cases:
        layer = LoKrLayer(base.to(dtype), LoKrConfig(**{"r": 1, **kw}), "m")
        assert {p.dtype for p in layer.parameters()} == {expected}
        assert {p.device.type for p in layer.parameters()} == {"cpu"}
    meta = LoKrLayer(nn.Linear(24, 20, device="meta"), LoKrConfig(r=1), "m")
    assert {p.device.type for p in meta.parameters()} == {"meta"}


# ------------------------------------------------------------------------------------------------------------
# init


def _kaiming_draws(shapes, seed):
    torch.manual_seed(seed)
    out = {}
    for n, s in shapes.items():
        t = torch.empty(s)
        nn.init.kaiming_uniform_(t, a=math.sqrt(5))
        out[n] = t
    return out


@pytest.mark.parametrize(
    ("base", "kw", "init", "zero"),
    [
        (nn.Linear(24, 20), dict(r=1), True, "lokr_w1"),
        (nn.Linear(24, 20), dict(r=1), "lycoris", "lokr_w2_b"),
        (nn.Linear(24, 20), dict(r=1), False, None),
        (nn.Linear(64, 64), dict(r=2, decompose_both=True), True, "lokr_w1_a"),
        (nn.Linear(64, 64), dict(r=2, decompose_both=True), "lycoris", "lokr_w2_b"),
        (nn.Linear(64, 64), dict(r=4), True, "lokr_w1"),
        (nn.Linear(64, 64), dict(r=4), "lycoris", "lokr_w2"),
        (nn.Conv2d(8, 12, 3), dict(r=1, use_effective_conv2d=True), "lycoris", "lokr_w2_b"),
        (nn.Conv2d(8, 12, 3), dict(r=1, use_effective_conv2d=True), False, None),
    ],
)
def test_init_draws_kaiming_in_parameter_order_then_zeroes_one(base, kw, init, zero):
    torch.manual_seed(11)
    layer = LoKrLayer(base, LoKrConfig(init_weights=init, **kw), "m")
    shapes = {n: tuple(p.shape) for n, p in layer.named_parameters()}
    draws = _kaiming_draws(shapes, 11)
    for n, p in layer.named_parameters():
        if n == zero:
            assert torch.count_nonzero(p) == 0, n
        else:
            assert torch.equal(p.detach(), draws[n]), n
    if zero is not None:
        assert torch.count_nonzero(layer.delta_weight()) == 0
    else:
        assert torch.count_nonzero(layer.delta_weight()) > 0


# ------------------------------------------------------------------------------------------------------------
# merge / unmerge


def test_merge_adds_delta_unmerge_removes_it_and_safe_refuses_non_finite():
    base = nn.Linear(24, 20)
    w0 = base.weight.detach().clone()
    layer = _randomize(LoKrLayer(base, LoKrConfig(r=1, alpha=3), "m"))
    dw = _expected_delta(layer, base).detach()
    layer.merge(base)
    assert layer.merged is True
    assert torch.allclose(base.weight, w0 + dw, atol=1e-6)
    layer.unmerge(base)
    assert layer.merged is False
    assert torch.allclose(base.weight, w0, atol=1e-6)
    with torch.no_grad():
        layer.lokr_w1[0, 0] = float("inf")
    with pytest.raises(la.MergeError):
        layer.merge(base, safe=True)
    assert torch.allclose(base.weight, w0, atol=1e-6) and layer.merged is False
    layer.merge(base)  # unsafe: written as is
    assert not torch.isfinite(base.weight).all() and layer.merged is True


def test_merge_conv1d_t_writes_the_transposed_delta():
    base = Conv1D(20, 24)
    w0 = base.weight.detach().clone()
    layer = _randomize(LoKrLayer(base, LoKrConfig(r=1, alpha=3), "m"))
    dw = layer.delta_weight()
    assert dw.shape == (24, 20)
    assert torch.allclose(dw, _expected_delta(layer, base), atol=1e-6)
    layer.merge(base)
    assert torch.allclose(base.weight, w0 + dw.detach(), atol=1e-6)


# ------------------------------------------------------------------------------------------------------------
# forward and delta_output


def _model(base, seed=0, **kw):
    model = la.inject(Wrap(base), LoKrConfig(target_modules=["layer"], **kw))
    _randomize(model.layer.adapter.default, seed)
    return model, model.layer.adapter.default


INPUTS = {
    "linear": (lambda: nn.Linear(24, 20), (3, 5, 24)),
    "conv1d_t": (lambda: Conv1D(20, 24), (3, 5, 24)),
    "conv2d": (lambda: nn.Conv2d(8, 12, 3, padding=1), (2, 8, 5, 5)),
    "conv1d": (lambda: nn.Conv1d(8, 12, 3, padding=1), (2, 8, 7)),
}


def _row_mask(shape_len, keep):
    return keep.view(-1, *([1] * (shape_len - 1)))


@pytest.mark.parametrize("kind", list(INPUTS))
@pytest.mark.parametrize("scale_flag", [False, True])
def test_training_rank_dropout_forward_delta_output_and_gradients(kind, scale_flag):
    make, shape = INPUTS[kind]
    base = make()
    model, layer = _model(base, r=1, alpha=3, rank_dropout=0.5, rank_dropout_scale=scale_flag)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1), requires_grad=True)
    model.train()
    torch.manual_seed(7)
    torch.rand(1)  # PEFT's module-dropout draw comes first, also at module_dropout=0
    keep = (torch.rand(20 if kind in ("linear", "conv1d_t") else 12) > 0.5).float()
    assert 0 < keep.sum() < keep.numel()
    mult = keep / keep.mean() if scale_flag else keep
    dw = _expected_delta(layer, base)
    if kind == "conv1d_t":
        masked = dw * mult[None, :]
    else:
        masked = dw * _row_mask(dw.dim(), mult)
    ref = layer_op(base, x, base.weight + masked, base.bias)
    torch.manual_seed(7)
    y = model(x)
    assert torch.allclose(y, ref, atol=1e-5)
    params = [x, *layer.parameters()]
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
    got = torch.autograd.grad(y, params, g)
    want = torch.autograd.grad(ref, params, g)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
    # delta_output: the term alone, same draw.
    torch.manual_seed(7)
    term = layer.delta_output(base, x)
    ref_term = layer_op(base, x, masked, torch.zeros(20) if kind == "conv1d_t" else None)
    assert torch.allclose(term, ref_term, atol=1e-5)
    # In eval no mask is drawn.
    model.eval()
    state = torch.get_rng_state()
    assert torch.allclose(
        layer.delta_output(base, x), layer_op(base, x, dw, torch.zeros(20) if kind == "conv1d_t" else None), atol=1e-5
    )
    assert torch.equal(torch.get_rng_state(), state)


def test_module_dropout_delta_output_is_none_on_a_low_draw():
    base = nn.Linear(24, 20)
    model, layer = _model(base, r=1, alpha=3, module_dropout=0.5)
    x = torch.randn(3, 24)
    model.train()
    seen = set()
    for seed in range(8):
        torch.manual_seed(seed)
        skip = float(torch.rand(1)) <= 0.5
        torch.manual_seed(seed)
        term = layer.delta_output(base, x)
        if skip:
            assert term is None
        else:
            assert torch.allclose(term, F.linear(x, layer.delta_weight()), atol=1e-6)
        seen.add(skip)
    assert seen == {True, False}
    model.eval()
    assert layer.delta_output(base, x) is not None


def test_forward_path_choice_gets_token_count_and_grad_flag(monkeypatch):
    calls = []
    orig = LoKrLayer._kron_is_cheaper

    def spy(self, n_tokens, needs_grad):
        calls.append((n_tokens, needs_grad))
        return orig(self, n_tokens, needs_grad)

    monkeypatch.setattr(LoKrLayer, "_kron_is_cheaper", spy)
    base = nn.Linear(24, 20)
    model, layer = _model(base, r=1)
    x = torch.randn(3, 5, 24)
    with torch.no_grad():
        model(x)
    model(x)
    base.weight.requires_grad_(False)
    for p in layer.parameters():
        p.requires_grad_(False)
    model(x)
    model(x.requires_grad_())
    assert calls == [(15, False), (15, True), (15, False), (15, True)]
    assert all(type(n) is int for n, _ in calls)  # a whole token count
    c1d, _ = _model(Conv1D(20, 24), r=1)
    with torch.no_grad():
        c1d(torch.randn(2, 7, 24))
    assert calls[4:] == [(14, False)]  # transformers Conv1D chooses like a Linear
    conv, _ = _model(nn.Conv2d(8, 12, 3), r=1)
    conv(torch.randn(1, 8, 4, 4))
    assert len(calls) == 5  # convolutions always fold


def test_kron_is_cheaper_passes_the_split_and_rank():
    full = LoKrLayer(nn.Linear(384, 1536), LoKrConfig(r=32), "m")
    low = LoKrLayer(nn.Linear(384, 1536), LoKrConfig(r=2), "m")
    assert full.full_w2 and not low.full_w2
    a, b, c, d = full.abcd
    for n in (1, 8, 64, 512, 4096):
        for g in (True, False):
            assert full._kron_is_cheaper(n, g) == lokr_mod.kron_pays(a, b, c, d, None, n, g)
            assert low._kron_is_cheaper(n, g) == lokr_mod.kron_pays(a, b, c, d, 2, n, g)
    assert any(
        lokr_mod.kron_pays(a, b, c, d, None, n, g) != lokr_mod.kron_pays(a, b, c, d, 2, n, g)
        for n in (1, 8, 64, 512, 4096)
        for g in (True, False)
    )


@pytest.mark.parametrize("full", [True, False, "both", "low-w1-full-w2"])
def test_kron_path_arguments(monkeypatch, full):
    seen = []
    orig = lokr_mod.kron_linear

    def spy(base, kind, x, w1, a2, b2, mask, *, fused, needs_grad):
        seen.append((kind, tuple(w1.shape), tuple(a2.shape), None if b2 is None else tuple(b2.shape), mask, fused,
                     needs_grad))  # fmt: skip
        return orig(base, kind, x, w1, a2, b2, mask, fused=fused, needs_grad=needs_grad)

    monkeypatch.setattr(lokr_mod, "kron_linear", spy)
    monkeypatch.setattr(LoKrLayer, "_kron_is_cheaper", lambda self, *a: True)
    base = nn.Linear(24, 20) if full is False else nn.Linear(64, 64)
    kw = {
        True: dict(r=4),
        False: dict(r=1),
        "both": dict(r=2, decompose_both=True),
        # decompose_factor 16 splits 64 as (16, 4), unordered: w1 (16, 16) low-rank, w2 (4, 4) full.
        "low-w1-full-w2": dict(r=2, decompose_both=True, decompose_factor=16),
    }[full]
    model, layer = _model(base, alpha=3, **kw)
    x = torch.randn(2, base.in_features)
    y = model(x)
    assert torch.allclose(y, F.linear(x, base.weight + _expected_delta(layer, base), base.bias), atol=1e-5)
    with torch.no_grad():
        model(x)
    shapes = {
        True: ((8, 8), (8, 8), None),
        False: ((4, 4), (5, 1), (1, 6)),
        "both": ((8, 8), (8, 2), (2, 8)),
        "low-w1-full-w2": ((16, 16), (4, 4), None),
    }[full]
    assert seen == [("linear", *shapes, None, True, True), ("linear", *shapes, None, True, False)]


def _spy_kron_fused(monkeypatch) -> list[bool]:
    """Record the ``fused`` choice of every ``kron_linear`` call, with folding ΔW never cheaper."""
    seen: list[bool] = []
    orig = lokr_mod.kron_linear

    def spy(*a, fused, needs_grad):
        seen.append(fused)
        return orig(*a, fused=fused, needs_grad=needs_grad)

    monkeypatch.setattr(lokr_mod, "kron_linear", spy)
    monkeypatch.setattr(LoKrLayer, "_kron_is_cheaper", lambda self, *a: False)
    return seen


def test_mixed_dtype_input_runs_the_unfused_kron_path(monkeypatch):
    seen = _spy_kron_fused(monkeypatch)
    base = nn.Linear(24, 20).to(torch.float64)
    model, layer = _model(base, r=1, alpha=3)
    assert layer.lokr_w1.dtype == torch.float64
    with torch.no_grad():
        layer.float()
        x = torch.randn(3, 24, dtype=torch.float64)
        y = model(x)
    assert seen == [False]
    ref = F.linear(x, base.weight) + base.bias + F.linear(x.float(), _expected_delta(layer, base)).double()
    assert y.dtype == torch.float64 and torch.allclose(y, ref, atol=1e-5)


def test_module_dropout_skips_forward_exactly():
    base = nn.Linear(24, 20)
    model, layer = _model(base, r=1, alpha=3, module_dropout=0.5)
    x = torch.randn(3, 24)
    model.train()
    for seed in range(6):
        torch.manual_seed(seed)
        skip = float(torch.rand(1)) <= 0.5
        torch.manual_seed(seed)
        y = model(x)
        if skip:
            assert torch.equal(y, F.linear(x, base.weight, base.bias))
        else:
            assert torch.allclose(y, F.linear(x, base.weight + layer.delta_weight(), base.bias), atol=1e-5)


# ------------------------------------------------------------------------------------------------------------
# PEFT state and config translation


def test_peft_state_round_trip_casts_to_the_parameter_dtype():
    src = _randomize(LoKrLayer(nn.Linear(64, 64), LoKrConfig(r=2, decompose_both=True), "m"))
    state = {k: v.to(torch.float64) for k, v in src.peft_state().items()}
    assert set(state) == {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"}
    assert all(not v.requires_grad for v in src.peft_state().values())
    dst = LoKrLayer(nn.Linear(64, 64), LoKrConfig(r=2, decompose_both=True), "m")
    dst.load_peft_state(state)
    for n, p in dst.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p, getattr(src, n)), n
    assert torch.equal(dst.delta_weight(), src.delta_weight())


def test_extra_repr_strings():
    cases = [
        (nn.Linear(24, 20), dict(r=1, alpha=3), "linear, (4x4) ⊗ (5x6), w1, w2_a·w2_b, r=1, scale=3, merged=False"),
        (nn.Linear(64, 64), dict(r=3, alpha=2, decompose_both=True),
         "linear, (8x8) ⊗ (8x8), w1_a·w1_b, w2_a·w2_b, r=3, scale=0.666667, merged=False"),
        (nn.Linear(64, 64), dict(r=4), "linear, (8x8) ⊗ (8x8), w1, w2, r=4, scale=2, merged=False"),
        (nn.Conv2d(8, 12, 3), dict(r=1, alpha=2, use_effective_conv2d=True),
         "conv2d, (3x2) ⊗ (4x4), w1, tucker w2, r=1, scale=2, merged=False"),
    ]  # fmt: skip
    for base, kw, text in cases:
        assert LoKrLayer(base, LoKrConfig(**kw), "m").extra_repr() == text


def test_to_peft_exact_dict_and_round_trip():
    cfg = LoKrConfig(
        r=3,
        alpha=5,
        rank_dropout=0.25,
        module_dropout=0.5,
        use_effective_conv2d=True,
        decompose_both=True,
        decompose_factor=4,
        rank_dropout_scale=True,
        init_weights="lycoris",
        rank_pattern={"v": 2},
        alpha_pattern={"q": 7},
        layers_to_transform=[0, 1],
        layers_pattern="layers",
        target_modules=["q", "v"],
    )
    d = _to_peft(cfg)
    assert d == {
        "peft_type": "LOKR",
        "r": 3,
        "alpha": 5,
        "rank_dropout": 0.25,
        "module_dropout": 0.5,
        "use_effective_conv2d": True,
        "decompose_both": True,
        "decompose_factor": 4,
        "rank_dropout_scale": True,
        "init_weights": "lycoris",
        "rank_pattern": {"v": 2},
        "alpha_pattern": {"q": 7},
        "layers_to_transform": [0, 1],
        "layers_pattern": "layers",
    }
    back = _from_peft({**d, "target_modules": ["q", "v"], "exclude_modules": ["k"], "modules_to_save": ["head"]})
    assert back == LoKrConfig(**{**cfg.__dict__, "exclude_modules": ["k"], "modules_to_save": ["head"]})
    assert back.init_weights == "lycoris"


def test_from_peft_defaults_and_none_values():
    assert _from_peft({"peft_type": "LOKR"}) == LoKrConfig(r=8, alpha=8)
    cfg = _from_peft(
        {
            "rank_dropout": None,
            "module_dropout": None,
            "rank_pattern": None,
            "alpha_pattern": None,
            "init_weights": 0,
            "use_effective_conv2d": 1,
            "decompose_both": 1,
            "rank_dropout_scale": 1,
            "decompose_factor": 2.0,
        }
    )
    assert (cfg.rank_dropout, cfg.module_dropout, cfg.rank_pattern, cfg.alpha_pattern) == (0.0, 0.0, {}, {})
    assert cfg.init_weights is False
    assert cfg.use_effective_conv2d is True and cfg.decompose_both is True and cfg.rank_dropout_scale is True
    assert cfg.decompose_factor == 2 and type(cfg.decompose_factor) is int
    assert _from_peft({"init_weights": True}).init_weights is True
    assert _from_peft({"init_weights": "lycoris"}).init_weights == "lycoris"
    d = _from_peft({})
    assert (d.r, d.alpha, d.rank_dropout, d.module_dropout, d.decompose_factor) == (8, 8, 0.0, 0.0, -1)
    assert (d.use_effective_conv2d, d.decompose_both, d.rank_dropout_scale, d.init_weights) == (
        False,
        False,
        False,
        True,
    )
    assert (d.target_modules, d.exclude_modules, d.modules_to_save) == (None, None, None)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("rank_dropout", 1.0),
        ("module_dropout", -0.5),
        ("use_effective_conv2d", 2),
        ("decompose_both", None),
        ("rank_dropout_scale", "no"),
        ("init_weights", "gaussian"),
        ("decompose_factor", 0),
        ("decompose_factor", -3),
        ("decompose_factor", 2.0),
        ("decompose_factor", False),
    ],
)
def test_config_refusals_name_method_and_field(field, value):
    with pytest.raises(la.AdapterConfigError) as err:
        LoKrConfig(**{field: value})
    msg = str(err.value)
    if field == "decompose_factor":
        expected = f"lokr: decompose_factor must be -1 (split near the square root) or an integer >= 1, got {value!r}"
    elif field in ("rank_dropout", "module_dropout"):
        expected = f"lokr: {field} must be in [0, 1), got {value!r}"
    elif field == "init_weights":
        expected = f"lokr: init_weights must be one of [True, False, 'lycoris'], got {value!r}"
    else:
        expected = f"lokr: {field} must be one of [True, False], got {value!r}"
    assert msg == expected


def test_config_accepts_edges():
    for kw in (
        dict(decompose_factor=1),
        dict(decompose_factor=-1),
        dict(rank_dropout=0.0, module_dropout=0.0),
        dict(init_weights=False),
        dict(init_weights="lycoris"),
    ):
        LoKrConfig(**kw)


def test_rank_dropout_keeps_a_row_only_strictly_above_p(monkeypatch):
    """PEFT's mask is ``rand > p``: a draw equal to p drops its row."""
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.tensor([0.5, 0.25, 0.75, 0.5]))
    m = rank_dropout_multipliers(4, 0.5, False, torch.float32, torch.device("cpu"))
    assert torch.equal(m, torch.tensor([0.0, 0.0, 1.0, 0.0]))
    m = rank_dropout_multipliers(4, 0.5, True, torch.float32, torch.device("cpu"))
    assert torch.equal(m, torch.tensor([0.0, 0.0, 4.0, 0.0]))


@pytest.mark.parametrize("case", ["fp32_input_on_bf16_base", "bf16_input_and_factors_on_fp32_base"])
def test_input_of_the_factor_dtype_on_a_base_of_another_dtype_runs_the_unfused_kron_path(monkeypatch, case):
    """Under CPU bf16 autocast (the only way such a forward runs) an input in the factors' dtype on a base of
    another dtype is mixed too: the Kronecker path, unfused, even where folding ΔW would be cheaper."""
    seen = _spy_kron_fused(monkeypatch)
    torch.manual_seed(0)
    bf16_base = case == "fp32_input_on_bf16_base"
    base = nn.Linear(24, 20).to(torch.bfloat16 if bf16_base else torch.float32)
    model, layer = _model(base, r=1, alpha=3)
    if not bf16_base:
        layer.to(torch.bfloat16)
    dt = layer.lokr_w1.dtype
    assert dt == (torch.float32 if bf16_base else torch.bfloat16) and dt != base.weight.dtype
    x = torch.randn(3, 24).to(dt)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    assert seen == [False]
    ref = F.linear(x.double(), base.weight.double() + _expected_delta(layer, base).double(), base.bias.double())
    assert y.dtype == torch.bfloat16 and torch.allclose(y.double(), ref, atol=0.1, rtol=0.02)
