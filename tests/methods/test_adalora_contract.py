"""AdaLoRA pinned function by function: config checks with their exact messages, the pure maths against closed
forms written here, the layer's init, forward, gradients, merge and PEFT slicing against the SVD-form formula in
float64, and the allocator and run schedule against EMAs and budgets recomputed step by step in the test."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightning_adapters as la
from lightning_adapters.errors import AdapterConfigError
from lightning_adapters.methods import adalora as ada
from lightning_adapters.methods.adalora import (
    AdaLoRAConfig,
    adalora_layers,
    budget_schedule,
    check_schedule,
    masks_for_budget,
    module_name_from_peft_key,
    orthogonal_regularizer,
    triplet_scores,
    update_importance,
)
from tests.helpers import LAYERS, Wrap

EPS = 1e-5


def _msg(err: pytest.ExceptionInfo) -> str:
    return str(err.value)


# --- config -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(bias="some"), "adalora: bias must be one of ['none', 'all', 'lora_only'], got 'some'"),
        (dict(init_r=0), "adalora: init_r must be an integer > 0, got 0"),
        (dict(init_r=2.0), "adalora: init_r must be an integer > 0, got 2.0"),
        (dict(target_r=0), "adalora: target_r must be an integer > 0, got 0"),
        (
            dict(init_r=4, target_r=5),
            "adalora: target_r=5 is larger than init_r=4; ranks are only ever pruned, so set target_r <= init_r "
            "(or raise init_r)",
        ),
        (dict(tinit=-1), "adalora: tinit must be an integer >= 0, got -1"),
        (dict(tfinal=-1), "adalora: tfinal must be an integer >= 0, got -1"),
        (dict(deltaT=0), "adalora: deltaT must be an integer > 0, got 0"),
        (dict(beta1=0.0), "adalora: beta1 must be strictly between 0 and 1 (e.g. 0.85), got 0.0"),
        (dict(beta1=1), "adalora: beta1 must be strictly between 0 and 1 (e.g. 0.85), got 1"),
        (dict(beta1="0.5"), "adalora: beta1 must be strictly between 0 and 1 (e.g. 0.85), got '0.5'"),
        (dict(beta2=1.0), "adalora: beta2 must be strictly between 0 and 1 (e.g. 0.85), got 1.0"),
        (dict(beta2=True), "adalora: beta2 must be strictly between 0 and 1 (e.g. 0.85), got True"),
        (dict(orth_reg_weight=-0.1), "adalora: orth_reg_weight must be a finite number >= 0, got -0.1"),
        (dict(total_step=0), "adalora: total_step must be an integer > 0, got 0"),
        (
            dict(tinit=3, tfinal=2, total_step=5),
            "adalora: impossible schedule tinit=3 + tfinal=2 >= total_step=5 (optimizer steps); the rank budget "
            "needs tinit + tfinal < total_step: lower tinit/tfinal or train longer",
        ),
        (
            dict(tinit=3, tfinal=2, total_step=4, schedule="epoch"),
            "adalora: impossible schedule tinit=3 + tfinal=2 >= total_step=4 (epochs); the rank budget "
            "needs tinit + tfinal < total_step: lower tinit/tfinal or train longer",
        ),
        (dict(alpha=0.0), "adalora: alpha must be a finite number > 0, got 0.0"),
        (dict(dropout=1.0), "adalora: dropout must be in [0, 1), got 1.0"),
        (dict(init_weights=1), "adalora: init_weights must be one of [True, False], got 1"),
        (dict(schedule="batch"), "adalora: schedule must be one of ['step', 'epoch'], got 'batch'"),
        (dict(rank_pattern=[1]), "adalora: rank_pattern must be a dict of {module regex: value}, got [1]"),
        (
            dict(rank_pattern={"": [True] * 4}),
            "adalora: rank_pattern keys must be non-empty module name patterns (strings), got ''",
        ),
        (
            dict(init_r=2, target_r=1, rank_pattern={"a": [True, False, True]}),
            "adalora: rank_pattern['a'] must be a list of init_r=2 booleans, got [True, False, True]",
        ),
        (
            dict(init_r=2, target_r=1, rank_pattern={"a": [1, 0]}),
            "adalora: rank_pattern['a'] must be a list of init_r=2 booleans, got [1, 0]",
        ),
    ],
)
def test_config_rejects_each_bad_value_with_its_exact_message(kw, message) -> None:
    base = dict(init_r=4, target_r=2, target_modules=["layer"])
    with pytest.raises(AdapterConfigError) as err:
        AdaLoRAConfig(**{**base, **kw})
    assert _msg(err) == message


def test_config_accepts_the_boundaries_and_normalises_the_pattern() -> None:
    c = AdaLoRAConfig(
        init_r=3,
        target_r=3,
        tinit=0,
        tfinal=0,
        deltaT=1,
        beta1=0.01,
        beta2=0.99,
        orth_reg_weight=0.0,
        total_step=1,
        alpha=1e-3,
        dropout=0.0,
        init_weights=False,
        schedule="epoch",
        rank_pattern={"m.x": (True, False, True)},
        bias="lora_only",
        target_modules=["x"],
    )
    assert c.rank_pattern == {"m.x": [True, False, True]} and type(c.rank_pattern["m.x"]) is list
    assert AdaLoRAConfig(tinit=2, tfinal=2, total_step=5).total_step == 5
    assert AdaLoRAConfig(rank_pattern=None).rank_pattern == {}
    d = AdaLoRAConfig()
    assert (d.init_r, d.target_r, d.tinit, d.tfinal, d.deltaT) == (12, 8, 0, 0, 1)
    assert (d.beta1, d.beta2, d.orth_reg_weight, d.total_step, d.alpha) == (0.85, 0.85, 0.5, None, 8.0)
    assert (d.dropout, d.init_weights, d.schedule, d.rank_pattern, d.bias) == (0.0, True, "step", {}, "none")


def test_check_schedule_passes_one_below_the_total() -> None:
    check_schedule(3, 2, 6, "step")
    check_schedule(0, 0, 1, "epoch")
    with pytest.raises(AdapterConfigError, match=r"tinit=0 \+ tfinal=0 >= total_step=0 \(epochs\)"):
        check_schedule(0, 0, 0, "epoch")


# --- pure maths -------------------------------------------------------------------------------------------------


def _budget_reference(t, init_b, target_b, tinit, tfinal, total, delta_t):
    if t <= tinit:
        return init_b, False
    if t > total - tfinal:
        return target_b, True
    frac = 1 - (t - tinit) / (total - tfinal - tinit)
    return math.floor((init_b - target_b) * frac**3 + target_b), t % delta_t == 0


@pytest.mark.parametrize(
    "init_b, target_b, tinit, tfinal, total, delta_t",
    [(24, 8, 2, 4, 14, 2), (36, 6, 0, 0, 10, 3), (10, 3, 1, 2, 7, 1), (100, 20, 3, 1, 20, 4)],
)
def test_budget_schedule_is_the_cubic_decay_with_its_edges(init_b, target_b, tinit, tfinal, total, delta_t) -> None:
    for t in range(total + 3):
        want = _budget_reference(t, init_b, target_b, tinit, tfinal, total, delta_t)
        got = budget_schedule(t, init_b, target_b, tinit, tfinal, total, delta_t)
        assert got == want and type(got[0]) is int and type(got[1]) is bool, (t, got, want)
    # The edges: t = tinit keeps the initial budget, t = T - tfinal is the curve's end, later steps are final.
    assert budget_schedule(2, 24, 8, 2, 4, 14, 2) == (24, False)
    assert budget_schedule(3, 24, 8, 2, 4, 14, 2) == (18, False)
    assert budget_schedule(10, 24, 8, 2, 4, 14, 2) == (8, True)
    assert budget_schedule(10, 24, 8, 2, 4, 14, 3) == (8, False)
    assert budget_schedule(11, 24, 8, 2, 4, 14, 3) == (8, True)


def test_update_importance_is_both_emas_with_the_new_mean() -> None:
    sens = torch.tensor([[1.0, 4.0], [0.0, 2.0]], dtype=torch.float64)
    ema = torch.tensor([[2.0, 0.0], [1.0, 2.0]], dtype=torch.float64)
    unc = torch.tensor([[0.5, 1.0], [0.0, 3.0]], dtype=torch.float64)
    new_ema, new_unc = update_importance(sens, ema, unc, 0.75, 0.5)
    want_ema = 0.75 * ema + 0.25 * sens
    want_unc = 0.5 * unc + 0.5 * (sens - want_ema).abs()
    assert torch.equal(new_ema, want_ema) and torch.equal(new_unc, want_unc)
    assert new_ema.tolist() == [[1.75, 1.0], [0.75, 2.0]]
    assert new_unc.tolist() == [[0.625, 2.0], [0.375, 1.5]]


def test_triplet_scores_sum_e_and_the_row_and_column_means() -> None:
    g = torch.Generator().manual_seed(3)
    sa, se, sb = torch.rand(3, 5, generator=g), torch.rand(3, 1, generator=g), torch.rand(7, 3, generator=g)
    got = triplet_scores(sa, se, sb)
    want = torch.tensor([se[i, 0] + sa[i].sum() / 5 + sb[:, i].sum() / 7 for i in range(3)])
    assert got.shape == (3,) and torch.allclose(got, want, atol=1e-6)


def test_masks_for_budget_are_bool_and_prune_exactly_the_lowest() -> None:
    scores = {"a": torch.tensor([0.3, 0.1, 0.9]), "b": torch.tensor([0.2, 0.5])}
    for n in (0, -2):
        keep = masks_for_budget(scores, n)
        assert set(keep) == {"a", "b"} and all(v.dtype == torch.bool for v in keep.values())
        assert keep["a"].tolist() == [True] * 3 and keep["b"].tolist() == [True] * 2
    keep = masks_for_budget(scores, 2)
    assert all(v.dtype == torch.bool for v in keep.values())
    assert keep["a"].tolist() == [True, False, True] and keep["b"].tolist() == [False, True]
    keep = masks_for_budget(scores, 1)
    assert keep["a"].tolist() == [True, False, True] and keep["b"].tolist() == [True, True]
    keep = masks_for_budget(scores, 5)
    assert keep["a"].tolist() == [False] * 3 and keep["b"].tolist() == [False] * 2


def test_module_name_from_peft_key() -> None:
    assert module_name_from_peft_key("model.x.q_proj.lora_E") == "model.x.q_proj"
    assert module_name_from_peft_key("model.x.q_proj.lora_E.default") == "model.x.q_proj"
    for bad in ("lora_E", "model.q_proj", "m.lora_E.a.b", "m.lora_Ex"):
        with pytest.raises(AdapterConfigError) as err:
            module_name_from_peft_key(bad)
        assert _msg(err) == f"adalora: rank_pattern key {bad!r} is not PEFT's '<module>.lora_E' form"


# --- models -----------------------------------------------------------------------------------------------------


class Two(nn.Module):
    """Two linear layers of different shapes (so per-matrix sizes and orders matter)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 5)
        self.b = nn.Linear(4, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x)[..., :4])


def _two(seed: int = 0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    model = Two().double()
    base = dict(init_r=3, target_r=1, alpha=6.0, target_modules=["a", "b"])
    return la.inject(model, AdaLoRAConfig(**{**base, **kw}))


def _randomize(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adalora_layers(model).values():
            for p in (layer.lora_A, layer.lora_B, layer.lora_E):
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))


def test_orthogonal_regularizer_is_the_mean_frobenius_distance_with_its_gradient() -> None:
    model = _two()
    _randomize(model)
    layers = list(adalora_layers(model).values())
    got = orthogonal_regularizer(layers)
    got.backward()
    ref = [(ly.lora_A.detach().clone().requires_grad_(), ly.lora_B.detach().clone().requires_grad_()) for ly in layers]
    terms = []
    for a, b in ref:
        terms.append(((a @ a.T - torch.eye(3, dtype=a.dtype)) ** 2).sum().sqrt())
        terms.append(((b.T @ b - torch.eye(3, dtype=b.dtype)) ** 2).sum().sqrt())
    want = sum(terms) / 4
    want.backward()
    assert torch.allclose(got, want, rtol=1e-12)
    for ly, (a, b) in zip(layers, ref):
        assert torch.allclose(ly.lora_A.grad, a.grad, rtol=1e-10)
        assert torch.allclose(ly.lora_B.grad, b.grad, rtol=1e-10)


# --- layer: init ------------------------------------------------------------------------------------------------


def _one(base: nn.Module, seed: int = 0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    cfg = dict(init_r=3, target_r=1, alpha=6.0, target_modules=["layer"])
    return la.inject(Wrap(base), AdaLoRAConfig(**{**cfg, **kw}))


def test_init_draws_a_and_b_small_e_zero_in_order_and_sets_the_buffers() -> None:
    torch.manual_seed(7)
    base = nn.Linear(6, 5).double()
    model = _one(base, seed=11)
    layer = model.layer.adapter.default
    torch.manual_seed(11)
    a = torch.empty(3, 6, dtype=torch.float64).normal_(0.0, 0.02)
    b = torch.empty(5, 3, dtype=torch.float64).normal_(0.0, 0.02)
    assert torch.equal(layer.lora_A, a) and torch.equal(layer.lora_B, b)
    assert torch.equal(layer.lora_E, torch.zeros(3, 1, dtype=torch.float64))
    assert all(p.dtype == torch.float64 for p in (layer.lora_A, layer.lora_B, layer.lora_E))
    assert layer.rank_mask.dtype == torch.bool and layer.rank_mask.tolist() == [True, True, True]
    assert layer.ranknum.dtype == torch.float64 and layer.ranknum.tolist() == [3.0]
    assert (layer.r, layer.alpha, layer.dropout_p, layer.kind, layer.merged) == (3, 6.0, 0.0, "linear", False)
    assert type(layer.alpha) is float and type(layer.dropout_p) is float
    keys = set(model.state_dict())
    assert {k for k in keys if ".adapter." in k} == {
        f"layer.adapter.default.{n}" for n in ("lora_A", "lora_B", "lora_E", "rank_mask")
    }


def test_init_weights_false_draws_all_three_standard_normal_and_the_pattern_empties_e() -> None:
    pattern = {"layer": [True, False, True]}
    model = _one(nn.Linear(6, 5).double(), seed=4, init_weights=False, rank_pattern=pattern)
    layer = model.layer.adapter.default
    torch.manual_seed(4)
    a = torch.empty(3, 6, dtype=torch.float64).normal_()
    b = torch.empty(5, 3, dtype=torch.float64).normal_()
    e = torch.empty(3, 1, dtype=torch.float64).normal_()
    e[1] = 0.0
    assert torch.equal(layer.lora_A, a) and torch.equal(layer.lora_B, b) and torch.equal(layer.lora_E, e)
    assert layer.lora_E[0, 0] != 0 and layer.lora_E[2, 0] != 0
    assert layer.rank_mask.tolist() == [True, False, True] and layer.kept_rank == 2
    # With the default init the pruned E starts at 0 as well.
    model = _one(nn.Linear(6, 5).double(), rank_pattern={"layer": [False, True, False]})
    layer = model.layer.adapter.default
    assert layer.lora_E.tolist() == [[0.0], [0.0], [0.0]] and layer.rank_mask.tolist() == [False, True, False]
    # Another module's pattern does not apply.
    model = _one(nn.Linear(6, 5).double(), rank_pattern={"other": [False, True, False]})
    assert model.layer.adapter.default.rank_mask.tolist() == [True, True, True]


def test_conv_layouts_of_the_factors() -> None:
    c1 = _one(LAYERS["conv1d_t"].make()).layer.adapter.default  # Conv1D(36 out, 24 in)
    assert (c1.kind, tuple(c1.lora_A.shape), tuple(c1.lora_B.shape)) == ("conv1d_t", (3, 24), (36, 3))
    c2 = _one(nn.Conv2d(4, 6, (3, 2))).layer.adapter.default
    assert (c2.kind, tuple(c2.lora_A.shape), tuple(c2.lora_B.shape)) == ("conv2d", (3, 24), (6, 3))
    assert tuple(c2.lora_E.shape) == (3, 1) and c2.lora_E.dtype == torch.float32


# --- layer: forward, gradients, merge ---------------------------------------------------------------------------


CASES = {
    "linear": (lambda: nn.Linear(6, 5), lambda g: torch.randn(2, 4, 6, generator=g, dtype=torch.float64)),
    "conv1d_t": (LAYERS["conv1d_t"].make, lambda g: torch.randn(2, 3, 24, generator=g, dtype=torch.float64)),
    "conv2d": (
        lambda: nn.Conv2d(3, 4, (3, 2), padding=(1, 0), stride=(1, 2)),
        lambda g: torch.randn(2, 3, 5, 6, generator=g, dtype=torch.float64),
    ),
}


def _base_and_delta(kind, w, bias, a, e, b, x, alpha, r, conv=None):
    """The base output and the SVD-form term ``x (A ⊙ E)ᵀ Bᵀ · α / (r + ε)``, written here from the paper."""
    if kind == "conv2d":
        dw = (b @ (a * e)).reshape(w.shape) * alpha / (r + EPS)
        return F.conv2d(x, w, bias, conv.stride, conv.padding), F.conv2d(x, dw, None, conv.stride, conv.padding)
    w_oi = w.t() if kind == "conv1d_t" else w
    return x @ w_oi.T + bias, (x @ (a * e).T) @ b.T * alpha / (r + EPS)


@pytest.mark.parametrize("plain", [False, True], ids=["fused", "plain"])
@pytest.mark.parametrize("kind", list(CASES))
def test_forward_and_gradients_are_the_svd_form_update(kind, plain, monkeypatch) -> None:
    if plain:
        monkeypatch.setattr(ada, "fused_linear_applies", lambda *a: False)
    make, make_x = CASES[kind]
    model = _one(make().double(), alpha=5.0)
    _randomize_one(model)
    layer = model.layer.adapter.default
    w, bias = model.layer.weight.detach().clone(), model.layer.bias.detach().clone()
    leaves = [p.detach().clone().requires_grad_() for p in (layer.lora_A, layer.lora_E, layer.lora_B)]
    x = make_x(torch.Generator().manual_seed(2)).requires_grad_()
    xr = x.detach().clone().requires_grad_()
    y = model(x)
    base_out, delta = _base_and_delta(kind, w, bias, *leaves, xr, 5.0, 3, conv=model.layer)
    want = base_out + delta
    assert y.dtype == torch.float64 and torch.allclose(y, want, rtol=1e-12, atol=1e-12)
    assert torch.allclose(layer.delta_output(model.layer, x), delta, rtol=1e-12, atol=1e-12)
    g = torch.randn(want.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    (y * g).sum().backward()
    (want * g).sum().backward()
    for p, ref in zip((layer.lora_A, layer.lora_E, layer.lora_B), leaves):
        assert torch.allclose(p.grad, ref.grad, rtol=1e-10, atol=1e-12)
    assert torch.allclose(x.grad, xr.grad, rtol=1e-10, atol=1e-12)
    assert model.layer.weight.grad is None


def _randomize_one(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    layer = model.layer.adapter.default
    with torch.no_grad():
        for p in (layer.lora_A, layer.lora_B, layer.lora_E):
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))


@pytest.mark.parametrize("plain", [False, True], ids=["fused", "plain"])
@pytest.mark.parametrize("kind", list(CASES))
def test_dropout_applies_to_the_adapter_input_only_and_only_in_training(kind, plain, monkeypatch) -> None:
    if plain:
        monkeypatch.setattr(ada, "fused_linear_applies", lambda *a: False)
    make, make_x = CASES[kind]
    model = _one(make().double(), dropout=0.5)
    _randomize_one(model)
    layer = model.layer.adapter.default
    assert layer.dropout_p == 0.5
    w, bias = model.layer.weight.detach(), model.layer.bias.detach()
    a, e, b = layer.lora_A.detach(), layer.lora_E.detach(), layer.lora_B.detach()
    x = make_x(torch.Generator().manual_seed(2))
    model.train()
    torch.manual_seed(5)
    y = model(x)
    torch.manual_seed(5)
    xd = F.dropout(x, 0.5, True)
    assert not torch.equal(xd, x)
    base_out, delta = _base_and_delta(kind, w, bias, a, e, b, xd, 6.0, 3, conv=model.layer)
    base_full, _ = _base_and_delta(kind, w, bias, a, e, b, x, 6.0, 3, conv=model.layer)
    assert torch.allclose(y, base_full + delta, rtol=1e-12, atol=1e-12)
    torch.manual_seed(5)
    assert torch.allclose(layer.delta_output(model.layer, x), delta, rtol=1e-12, atol=1e-12)
    model.eval()
    _, delta_eval = _base_and_delta(kind, w, bias, a, e, b, x, 6.0, 3, conv=model.layer)
    assert torch.allclose(model(x), base_full + delta_eval, rtol=1e-12, atol=1e-12)
    assert torch.allclose(layer.delta_output(model.layer, x), delta_eval, rtol=1e-12, atol=1e-12)


def test_plain_path_casts_the_input_to_the_adapter_dtype(monkeypatch) -> None:
    # A float32 adapter on a float64 base: the term is computed in float32 and added in float64.
    monkeypatch.setattr(ada, "fused_linear_applies", lambda *a: False)
    model = _one(nn.Linear(6, 5).double())
    layer = model.layer.adapter.default
    with torch.no_grad():
        for n in ("lora_A", "lora_B", "lora_E"):
            setattr(layer, n, nn.Parameter(getattr(layer, n).float()))
    _randomize_one(model)
    x = torch.randn(3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = model(x)
    a, e, b = layer.lora_A.detach(), layer.lora_E.detach(), layer.lora_B.detach()
    base_out = x @ model.layer.weight.detach().T + model.layer.bias.detach()
    delta = ((x.float() @ (a * e).T) @ b.T) * 6.0 / (layer.ranknum.double() + EPS)
    assert y.dtype == torch.float64 and torch.allclose(y, base_out + delta.double(), rtol=1e-6, atol=1e-6)
    d = layer.delta_output(model.layer, x)
    assert torch.allclose(d, delta, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", list(CASES))
def test_delta_weight_merge_and_unmerge(kind) -> None:
    make, make_x = CASES[kind]
    model = _one(make().double(), alpha=4.0)
    _randomize_one(model)
    layer, base = model.layer.adapter.default, model.layer
    a, e, b = layer.lora_A.detach(), layer.lora_E.detach(), layer.lora_B.detach()
    dw = b @ (a * e) * 4.0 / (3 + EPS)  # (out, in[·kh·kw])
    want = dw.t() if kind == "conv1d_t" else dw.reshape(base.weight.shape)
    assert torch.allclose(layer.delta_weight(base), want, rtol=1e-12, atol=0)
    assert torch.allclose(layer.additive_delta(base), want, rtol=1e-12, atol=0)
    assert layer.delta_weight(base).shape == base.weight.shape
    w0 = base.weight.detach().clone()
    x = make_x(torch.Generator().manual_seed(2))
    y = model(x)
    layer.merge(base)
    assert layer.merged is True and torch.allclose(base.weight, w0 + want, rtol=1e-12, atol=1e-14)
    layer.unmerge(base)
    assert layer.merged is False and torch.allclose(base.weight, w0, rtol=0, atol=1e-14)
    assert torch.allclose(model(x), y, rtol=1e-12, atol=1e-12)


def test_merge_is_unchecked_unless_safe() -> None:
    model = _one(nn.Linear(6, 5).double())
    layer, base = model.layer.adapter.default, model.layer
    with torch.no_grad():
        layer.lora_E.fill_(float("inf"))
        layer.lora_A.fill_(1.0)
        layer.lora_B.fill_(1.0)
    w0 = base.weight.detach().clone()
    with pytest.raises(Exception, match="merged weight"):
        layer.merge(base, safe=True)
    assert torch.equal(base.weight, w0) and layer.merged is False
    layer.merge(base)
    assert not torch.isfinite(base.weight).any() and layer.merged is True


def test_quantized_training_path_is_the_dequantized_product_with_dropout_and_bias() -> None:
    pytest.importorskip("bitsandbytes")
    from lightning_adapters.core.quant import dequantized_weight

    torch.manual_seed(0)
    lin = nn.Linear(32, 16)
    with torch.no_grad():
        lin.bias.normal_()
    model = la.quantize(Wrap(lin).train(), "int8", skip=[])
    la.inject(model, AdaLoRAConfig(init_r=2, target_r=1, alpha=3.0, dropout=0.25, target_modules=["layer"]))
    layer = model.layer.adapter.default
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in (layer.lora_A, layer.lora_B, layer.lora_E):
            p.copy_(torch.randn(p.shape, generator=g))
    x = torch.randn(3, 32, generator=g).requires_grad_()
    torch.manual_seed(5)
    y = model(x)
    torch.manual_seed(5)
    xd = F.dropout(x.detach(), 0.25, True)
    w, bias = dequantized_weight(model.layer).float(), model.layer.bias.detach().float()
    a, e, b = layer.lora_A.detach(), layer.lora_E.detach(), layer.lora_B.detach()
    want = x.detach() @ w.T + bias + (xd @ (a * e).T) @ b.T * 3.0 / (2 + EPS)
    assert torch.allclose(y, want, rtol=1e-4, atol=1e-4)
    y.sum().backward()
    assert layer.lora_E.grad is not None and x.grad is not None


# --- layer: masks and the PEFT layout ---------------------------------------------------------------------------


def test_apply_mask_export_mask_and_peft_slicing() -> None:
    model = _one(nn.Linear(6, 5).double())
    _randomize_one(model)
    layer = model.layer.adapter.default
    a0, b0, e0 = (p.detach().clone() for p in (layer.lora_A, layer.lora_B, layer.lora_E))
    layer.apply_mask(torch.tensor([True, False, False]))
    assert layer.rank_mask.tolist() == [True, False, False] and layer.kept_rank == 1 and type(layer.kept_rank) is int
    assert layer.lora_E[:, 0].tolist() == [e0[0, 0].item(), 0.0, 0.0]
    assert torch.equal(layer.lora_A, a0) and torch.equal(layer.lora_B, b0)
    assert layer.export_mask().tolist() == [True, False, False]
    with torch.no_grad():
        layer.lora_E[2, 0] = 0.5  # a pruned E that regrew: exported with the kept one
    assert layer.export_mask().tolist() == [True, False, True]
    st = layer.peft_state()
    assert set(st) == {"lora_A", "lora_B", "lora_E"}
    assert torch.equal(st["lora_A"], a0[[0, 2]]) and torch.equal(st["lora_B"], b0[:, [0, 2]])
    assert st["lora_E"].tolist() == [[e0[0, 0].item()], [0.5]]
    assert layer.peft_shapes() == {"lora_A": (2, 6), "lora_B": (5, 2), "lora_E": (2, 1)}
    assert layer.extra_repr() == "linear, init_r=3, kept=1, alpha=6, merged=False"
    # Loading a PEFT state fills the kept ranks and zeroes the rest.
    layer.apply_mask(torch.tensor([False, True, True]))
    new = {
        "lora_A": torch.full((2, 6), 2.0),
        "lora_B": torch.full((5, 2), 3.0),
        "lora_E": torch.tensor([[4.0], [5.0]]),
    }
    layer.load_peft_state(new)
    assert layer.lora_A.dtype == torch.float64
    assert layer.lora_A[0].abs().sum() == 0 and (layer.lora_A[1:] == 2.0).all()
    assert layer.lora_B[:, 0].abs().sum() == 0 and (layer.lora_B[:, 1:] == 3.0).all()
    assert layer.lora_E[:, 0].tolist() == [0.0, 4.0, 5.0]
    layer.alpha = 2.5
    assert layer.extra_repr() == "linear, init_r=3, kept=2, alpha=2.5, merged=False"


def test_adalora_layers_and_rank_pattern_pick_one_adapter() -> None:
    model = _two()
    la.inject(model, AdaLoRAConfig(init_r=2, target_r=1, target_modules=["b"]), name="other")
    default = adalora_layers(model, "default")
    assert list(default) == ["a", "b"] and default["b"] is model.b.adapter.default
    other = adalora_layers(model, "other")
    assert list(other) == ["b"] and other["b"] is model.b.adapter.other
    model.b.adapter.other.apply_mask(torch.tensor([False, True]))
    assert ada.rank_pattern(model, "other") == {"b": [False, True]}
    assert ada.rank_pattern(model, "default") == {"a": [True] * 3, "b": [True] * 3}
    assert list(adalora_layers(_two())) == ["a", "b"]
