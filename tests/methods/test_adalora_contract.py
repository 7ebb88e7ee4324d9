"""AdaLoRA pinned function by function: config checks with their exact messages, the pure maths against closed
forms written here, the layer's init, forward, gradients, merge and PEFT slicing against the SVD-form formula in
float64, and the allocator and run schedule against EMAs and budgets recomputed step by step in the test."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from peft import AdaLoraConfig as PeftAdaLoraConfig
from peft import get_peft_model
from torch import nn

import lightning_adapters as la
from lightning_adapters.core.quant import dequantized_weight
from lightning_adapters.errors import AdapterConfigError, AdapterStateError
from lightning_adapters.interop.peft import peft_config_dict
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
from lightning_adapters.schedules import Heatmap, ScheduleReport
from tests.helpers import LAYERS, Wrap

try:  # imported here, once, rather than inside the quantized tests (a checker forks after collection)
    import bitsandbytes  # noqa: F401
except ImportError:  # pragma: no cover
    bitsandbytes = None

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


def test_rank_pattern_keys_are_exact_module_names_not_regexes() -> None:
    # nn.ModuleDict accepts keys such as "x[0" or "(b": PEFT's rank_pattern names them as they are.
    pattern = {"m.x[0": [True, False], "m.(b": [False, True]}
    c = AdaLoRAConfig(init_r=2, target_r=1, rank_pattern=pattern)
    assert c.rank_pattern == pattern


def test_config_runs_the_shared_checks_first() -> None:
    with pytest.raises(AdapterConfigError):
        AdaLoRAConfig(target_modules=5)
    with pytest.raises(AdapterConfigError):
        AdaLoRAConfig(exclude_modules=7)


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


def test_a_layer_built_directly_holds_every_tensor_in_the_base_s_dtype() -> None:
    # Without inject (which moves the adapter as a whole): the constructor itself gives float64 factors and buffers.
    layer = ada.AdaLoRALayer(nn.Linear(6, 5).double(), AdaLoRAConfig(init_r=3, target_r=1), "layer")
    tensors = dict(layer.named_parameters()) | dict(layer.named_buffers())
    assert {n: t.dtype for n, t in tensors.items()} == {
        "lora_A": torch.float64,
        "lora_B": torch.float64,
        "lora_E": torch.float64,
        "rank_mask": torch.bool,
        "ranknum": torch.float64,
    }
    assert layer.ranknum.tolist() == [3.0] and layer.rank_mask.tolist() == [True] * 3


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


def _train_and_eval_runs(model: nn.Module, x: torch.Tensor) -> list[list[torch.Tensor]]:
    layer = model.layer.adapter.default
    runs = []
    for training in (True, False):
        model.train(training)
        xi = x.clone().requires_grad_()
        y = model(xi)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        runs.append([y.detach(), xi.grad, *(p.grad for p in (layer.lora_A, layer.lora_E, layer.lora_B))])
        layer.zero_grad(set_to_none=True)
    return runs


@pytest.mark.parametrize("quantized", [False, True], ids=["fused", "quantized"])
def test_without_dropout_training_runs_the_eval_computation_bit_for_bit(quantized) -> None:
    # Many rows against few input features: the kernels fold B·A into the weight, in training as in eval, since
    # without dropout the adapter's input is the layer's input (no second input to carry).
    if quantized:
        pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    base = Wrap(nn.Linear(6, 5))
    # NF4: bitsandbytes' int8 inference product also quantizes the input, so its eval mode differs from training.
    model = la.quantize(base, "nf4", skip=[]) if quantized else base
    la.inject(model, AdaLoRAConfig(init_r=3, target_r=1, alpha=5.0, target_modules=["layer"]))
    _randomize_one(model)
    x = torch.randn(4, 8, 6, generator=torch.Generator().manual_seed(2))
    train, evaluation = _train_and_eval_runs(model, x)
    for got, want in zip(train, evaluation):
        assert torch.equal(got, want)


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

    torch.manual_seed(0)
    lin = nn.Linear(32, 16)
    with torch.no_grad():
        lin.bias.normal_()
    # NF4: in eval mode an int8 base runs its own inference product (the input quantized too), not this path.
    model = la.quantize(Wrap(lin).train(), "nf4", skip=[])
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
    # In eval mode the same path (x needs its gradient) drops nothing.
    model.eval()
    y = model(x)
    want = x.detach() @ w.T + bias + (x.detach() @ (a * e).T) @ b.T * 3.0 / (2 + EPS)
    assert torch.allclose(y, want, rtol=1e-4, atol=1e-4)


def _near(got: torch.Tensor, want: torch.Tensor, tol: float) -> bool:
    """``‖got − want‖ ≤ tol·‖want‖``: a relative error over the whole tensor (float32 sums cancel elementwise)."""
    return bool((got - want).norm() <= tol * want.norm())


def test_quantized_training_path_scales_by_alpha_over_init_r_plus_eps_forward_and_backward() -> None:
    # With r = 1 the scale α/(r + ε) differs from α/(r − ε) by 2e-5 relative; a large E makes the adapter term
    # dominate, so float32 (about 1e-7 here) resolves it in the output and in every gradient.
    pytest.importorskip("bitsandbytes")

    torch.manual_seed(0)
    model = la.quantize(Wrap(nn.Linear(32, 16)).train(), "int8", skip=[])
    la.inject(model, AdaLoRAConfig(init_r=1, target_r=1, alpha=3.0, target_modules=["layer"]))
    layer = model.layer.adapter.default
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in (layer.lora_A, layer.lora_B):
            p.copy_(torch.randn(p.shape, generator=g))
        layer.lora_E.fill_(1000.0)
    x = torch.randn(3, 32, generator=g).requires_grad_()
    y = model(x)
    w, bias = dequantized_weight(model.layer).float(), model.layer.bias.detach().float()
    leaves = [p.detach().clone().requires_grad_() for p in (layer.lora_A, layer.lora_E, layer.lora_B)]
    a, e, b = leaves
    xr = x.detach().clone().requires_grad_()
    want = xr @ w.T + bias + (xr @ (a * e).T) @ b.T * 3.0 / (1 + EPS)
    assert _near(y, want, 2e-6)
    gy = torch.randn(want.shape, generator=torch.Generator().manual_seed(9))
    (y * gy).sum().backward()
    (want * gy).sum().backward()
    for p, ref in zip((layer.lora_A, layer.lora_E, layer.lora_B, x), (*leaves, xr)):
        assert _near(p.grad, ref.grad, 2e-6)


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


# --- rank allocator ---------------------------------------------------------------------------------------------

SCHED = dict(tinit=1, tfinal=2, deltaT=2, beta1=0.7, beta2=0.6)


def _grads(model: nn.Module, g: torch.Generator, skip: tuple[str, ...] = ()) -> None:
    for name, layer in adalora_layers(model).items():
        for pname in ("lora_A", "lora_B", "lora_E"):
            p = getattr(layer, pname)
            p.grad = None if f"{name}.{pname}" in skip else torch.randn(p.shape, generator=g, dtype=p.dtype)


def test_allocator_refuses_models_without_layers_or_length_and_sizes_its_budgets() -> None:
    c = AdaLoRAConfig(init_r=3, target_r=1, target_modules=["a"])
    with pytest.raises(AdapterConfigError) as err:
        ada.RankAllocator(Two(), c, 10)
    assert _msg(err) == "adalora: the model has no AdaLoRA layers; inject an AdaLoRAConfig first"
    model = _two(**SCHED)
    with pytest.raises(AdapterConfigError) as err:
        ada.RankAllocator(model, AdaLoRAConfig(init_r=3, target_r=1))
    assert _msg(err) == "adalora: total_step is unknown; pass total= or set AdaLoRAConfig.total_step"
    with pytest.raises(AdapterConfigError, match=r"tinit=1 \+ tfinal=2 >= total_step=3 \(optimizer steps\)"):
        ada.RankAllocator(model, AdaLoRAConfig(init_r=3, target_r=1, **SCHED), 3)
    alloc = ada.RankAllocator(model, AdaLoRAConfig(init_r=3, target_r=1, total_step=20, **SCHED), 9)
    assert (alloc.total, alloc.init_budget, alloc.target_budget, alloc.updates) == (9, 6, 2, 0)
    assert alloc.final_pattern is None and alloc.last_pattern is None and alloc.ema == {} and alloc.unc == {}
    assert list(alloc.layers) == ["a", "b"] and alloc.model is model
    assert ada.RankAllocator(model, AdaLoRAConfig(init_r=3, target_r=2, total_step=20, **SCHED)).total == 20
    assert alloc.budget(4) == budget_schedule(4, 6, 2, 1, 2, 9, 2)
    # One adapter of several: only its layers, its own sizes.
    la.inject(model, AdaLoRAConfig(init_r=2, target_r=1, target_modules=["b"]), name="other")
    other = ada.RankAllocator(model, AdaLoRAConfig(init_r=2, target_r=1, **SCHED), 9, adapter="other")
    assert list(other.layers) == ["b"] and other.layers["b"] is model.b.adapter.other
    assert (other.init_budget, other.target_budget) == (2, 1)


def test_importance_is_the_ema_of_weight_times_gradient_and_scores_its_triplets() -> None:
    model = _two(**SCHED)
    _randomize(model)
    alloc = ada.RankAllocator(model, model_cfg := AdaLoRAConfig(init_r=3, target_r=1, **SCHED), 9)
    assert model_cfg.beta1 == 0.7
    zeros = alloc.scores()
    assert set(zeros) == {"a", "b"} and all(
        v.dtype == torch.float64 and v.tolist() == [0.0] * 3 for v in zeros.values()
    )
    g = torch.Generator().manual_seed(4)
    ema = {n: {k: 0.0 for k in ("lora_A", "lora_B", "lora_E")} for n in ("a", "b")}
    unc = {n: {k: 0.0 for k in ("lora_A", "lora_B", "lora_E")} for n in ("a", "b")}
    for step in range(3):
        _grads(model, g, skip=("a.lora_E",) if step == 1 else ())
        for n, layer in adalora_layers(model).items():
            for k in ("lora_A", "lora_B", "lora_E"):
                p = getattr(layer, k)
                grad = torch.zeros_like(p) if p.grad is None else p.grad
                sens = (p.detach() * grad).abs()
                ema[n][k] = 0.7 * ema[n][k] + 0.3 * sens
                unc[n][k] = 0.6 * unc[n][k] + 0.4 * (sens - ema[n][k]).abs()
        alloc.update_importance()
        assert alloc.updates == step + 1
    for n in ("a", "b"):
        assert set(alloc.ema[n]) == set(alloc.unc[n]) == {"lora_A", "lora_B", "lora_E"}
        for k in ("lora_A", "lora_B", "lora_E"):
            assert torch.allclose(alloc.ema[n][k], ema[n][k], rtol=1e-13, atol=0)
            assert torch.allclose(alloc.unc[n][k], unc[n][k], rtol=1e-13, atol=0)
    scores = alloc.scores()
    for n in ("a", "b"):
        s = {k: ema[n][k] * unc[n][k] for k in ema[n]}
        want = s["lora_E"][:, 0] + s["lora_A"].mean(dim=1) + s["lora_B"].mean(dim=0)
        assert torch.allclose(scores[n], want, rtol=1e-12, atol=0)
    # allocate keeps the budget's best triplets, records them and zeroes the others' E.
    e_before = {n: ly.lora_E.detach().clone() for n, ly in adalora_layers(model).items()}
    masks = alloc.allocate(4)
    want_masks = masks_for_budget(scores, 2)
    assert set(masks) == {"a", "b"} and alloc.last_pattern is masks and alloc.final_pattern is None
    for n, ly in adalora_layers(model).items():
        assert masks[n].tolist() == want_masks[n].tolist() and ly.rank_mask.tolist() == masks[n].tolist()
        assert torch.equal(ly.lora_E[:, 0], torch.where(masks[n], e_before[n][:, 0], 0.0))
    assert sum(int(m.sum()) for m in masks.values()) == 4
    final = alloc.finalize()
    assert alloc.final_pattern is final and alloc.last_pattern is final
    assert sum(int(m.sum()) for m in final.values()) == 2
    assert alloc.ema == {} and alloc.unc == {}


def test_allocator_steps_match_peft_update_and_allocate() -> None:
    import copy

    torch.manual_seed(0)
    base = Two().double()
    ours = la.inject(copy.deepcopy(base), AdaLoRAConfig(init_r=3, target_r=1, alpha=6.0, target_modules=["a", "b"]))
    cfg = AdaLoRAConfig(init_r=3, target_r=1, alpha=6.0, total_step=9, target_modules=["a", "b"], **SCHED)
    peft_cfg = PeftAdaLoraConfig(init_r=3, target_r=1, lora_alpha=6, total_step=9, target_modules=["a", "b"], **SCHED)
    theirs = get_peft_model(copy.deepcopy(base), peft_cfg).double()
    _randomize(ours)
    layers = adalora_layers(ours)
    with torch.no_grad():
        for n, ly in layers.items():
            mod = getattr(theirs.base_model.model, n)
            for k in ("lora_A", "lora_B", "lora_E"):
                getattr(mod, k)["default"].copy_(getattr(ly, k))
    alloc = ada.RankAllocator(ours, cfg)
    g = torch.Generator().manual_seed(6)
    seen = []
    for t in range(12):
        with torch.no_grad():
            for n, ly in layers.items():
                mod = getattr(theirs.base_model.model, n)
                bump = 0.1 * torch.randn(3, 1, generator=g, dtype=torch.float64)  # the optimizer regrows E
                ly.lora_E.add_(bump)
                mod.lora_E["default"].add_(bump)
                for k in ("lora_A", "lora_B", "lora_E"):
                    grad = torch.randn(getattr(ly, k).shape, generator=g, dtype=torch.float64)
                    getattr(ly, k).grad = grad
                    getattr(mod, k)["default"].grad = grad.clone()
        updates = alloc.updates
        budget, masks = alloc.step(t)
        theirs.base_model.update_and_allocate(t)
        want_budget = theirs.base_model.rankallocator.budget_schedule(t)[0] if t <= 7 else 2
        assert budget == want_budget, t
        assert alloc.updates == updates + (1 if t < 7 else 0)
        for n, ly in layers.items():
            assert torch.equal(ly.lora_E, getattr(theirs.base_model.model, n).lora_E["default"]), (t, n)
        if masks is not None:
            seen.append(t)
            pattern = theirs.peft_config["default"].rank_pattern
            assert {n: m.tolist() for n, m in masks.items()} == {n: pattern[f"{n}.lora_E.default"] for n in layers}
    assert seen == [2, 4, 6, 7]
    assert alloc.final_pattern is not None and alloc.ema == {}
    assert sum(ly.kept_rank for ly in layers.values()) == 2


def test_a_step_past_the_cut_without_a_final_mask_takes_it() -> None:
    model = _two(**SCHED)
    _randomize(model)
    alloc = ada.RankAllocator(model, AdaLoRAConfig(init_r=3, target_r=1, **SCHED), 9)
    _grads(model, torch.Generator().manual_seed(1))
    alloc.update_importance()
    budget, masks = alloc.step(8)
    assert budget == 2 and masks is alloc.final_pattern and sum(int(m.sum()) for m in masks.values()) == 2
    assert alloc.updates == 1
    with torch.no_grad():
        for ly in adalora_layers(model).values():
            ly.lora_E.fill_(1.0)
    assert alloc.step(9) == (2, None)
    for n, ly in adalora_layers(model).items():
        assert ly.lora_E[:, 0].tolist() == [1.0 if k else 0.0 for k in masks[n].tolist()]


def _stepped(steps: int, seed: int = 0) -> tuple[nn.Module, ada.RankAllocator]:
    model = _two(seed, **SCHED)
    _randomize(model)
    alloc = ada.RankAllocator(model, AdaLoRAConfig(init_r=3, target_r=1, **SCHED), 9)
    g = torch.Generator().manual_seed(3)
    for t in range(steps):
        _grads(model, g)
        alloc.step(t)
    return model, alloc


def test_allocator_state_round_trip_continues_exactly() -> None:
    model, alloc = _stepped(3)
    state = alloc.state_dict()
    assert set(state) == {"ema", "unc", "final_pattern", "last_pattern", "rank_mask", "updates", "total"}
    assert state["final_pattern"] is None and state["updates"] == 3 and state["total"] == 9
    assert state["last_pattern"] == {n: m.tolist() for n, m in alloc.last_pattern.items()}
    assert state["rank_mask"] == {n: ly.rank_mask.tolist() for n, ly in alloc.layers.items()}
    assert set(state["ema"]) == {"a", "b"} and set(state["ema"]["a"]) == {"lora_A", "lora_B", "lora_E"}
    for n in ("a", "b"):
        for k in ("lora_A", "lora_B", "lora_E"):
            assert torch.equal(state["ema"][n][k], alloc.ema[n][k]) and state["ema"][n][k] is not alloc.ema[n][k]
            assert torch.equal(state["unc"][n][k], alloc.unc[n][k]) and state["unc"][n][k] is not alloc.unc[n][k]
    # A fresh model and allocator with the same weights, loaded, continue exactly as the original.
    other_model, other = _stepped(0)
    with torch.no_grad():
        for n, ly in adalora_layers(other_model).items():
            for k in ("lora_A", "lora_B", "lora_E"):
                getattr(ly, k).copy_(getattr(alloc.layers[n], k))
            ly.rank_mask.fill_(True)
    other.load_state_dict(state)
    assert other.updates == 3 and other.total == 9 and other.final_pattern is None
    assert {n: m.tolist() for n, m in other.last_pattern.items()} == state["last_pattern"]
    assert all(m.dtype == torch.bool for m in other.last_pattern.values())
    assert {n: ly.rank_mask.tolist() for n, ly in other.layers.items()} == state["rank_mask"]
    for n in ("a", "b"):
        for k in ("lora_A", "lora_B", "lora_E"):
            assert torch.equal(other.ema[n][k], alloc.ema[n][k]) and torch.equal(other.unc[n][k], alloc.unc[n][k])
    g1, g2 = torch.Generator().manual_seed(8), torch.Generator().manual_seed(8)
    for t in range(3, 11):
        _grads(model, g1)
        _grads(other_model, g2)
        assert alloc.step(t)[0] == other.step(t)[0]
        for n in ("a", "b"):
            assert torch.equal(alloc.layers[n].lora_E, other.layers[n].lora_E), t
            assert torch.equal(alloc.layers[n].rank_mask, other.layers[n].rank_mask), t
    state = other.state_dict()
    assert state["final_pattern"] == {n: m.tolist() for n, m in other.final_pattern.items()}
    assert state["ema"] == {} and state["unc"] == {}
    fresh_model, fresh = _stepped(0)
    fresh.load_state_dict(state)
    assert {n: m.tolist() for n, m in fresh.final_pattern.items()} == state["final_pattern"]
    assert all(m.dtype == torch.bool for m in fresh.final_pattern.values())


def _bad(state: dict, **changes) -> dict:
    return {**state, **changes}


def test_allocator_state_that_does_not_fit_is_refused_by_name_and_changes_nothing() -> None:
    _, alloc = _stepped(3)
    good = alloc.state_dict()
    _, target = _stepped(1, seed=5)
    before = target.state_dict()
    fields = "['ema', 'unc', 'final_pattern', 'last_pattern', 'rank_mask', 'updates', 'total']"
    cases = [
        (None, f"adalora: allocator state lacks {fields}; resume from a checkpoint the AdaLoRA hooks wrote"),
        ([1], f"adalora: allocator state lacks {fields}; resume from a checkpoint the AdaLoRA hooks wrote"),
        (
            {k: v for k, v in good.items() if k not in ("updates", "ema")},
            "adalora: allocator state lacks ['ema', 'updates']; resume from a checkpoint the AdaLoRA hooks wrote",
        ),
        (
            _bad(good, rank_mask={"a": [True] * 3}),
            "adalora: allocator state is for modules ['a'], the model has ['a', 'b']; resume with the same model "
            "and target_modules",
        ),
    ]
    fit = (
        "adalora: allocator state does not fit the model: {}; resume from a checkpoint written for this model "
        "and config"
    )
    cases += [
        (_bad(good, rank_mask={"a": [True], "b": [1, 0, 1]}), fit.format("rank_mask['a']=[True] (want 3 0/1 flags)")),
        (_bad(good, rank_mask={"a": "abc", "b": (1, 0, 1)}), fit.format("rank_mask['a']='abc' (want 3 0/1 flags)")),
        (_bad(good, final_pattern={"a": [1, 0, 2]}), fit.format("final_pattern['a']=[1, 0, 2] (want 3 0/1 flags)")),
        (_bad(good, last_pattern={"zz": [1, 1, 1]}), fit.format("last_pattern['zz']=[1, 1, 1] (want ? 0/1 flags)")),
        (
            _bad(good, last_pattern={"b": [True] * 30}),
            fit.format(f"last_pattern['b']={repr([True] * 30)[:60]} (want 3 0/1 flags)"),
        ),
        (
            _bad(good, ema={"a": {"lora_A": torch.zeros(2, 6)}}),
            fit.format("ema['a']['lora_A'] does not fit the layer's lora_A"),
        ),
        (
            _bad(good, unc={"zz": {"lora_E": torch.zeros(3, 1)}}),
            fit.format("unc['zz']['lora_E'] does not fit the layer's lora_E"),
        ),
        (
            _bad(good, ema={"b": {"lora_X": torch.zeros(3, 1)}}),
            fit.format("ema['b']['lora_X'] does not fit the layer's lora_X"),
        ),
        (
            _bad(good, unc={"b": {"lora_E": [[0.0]] * 3}}),
            fit.format("unc['b']['lora_E'] does not fit the layer's lora_E"),
        ),
        (
            _bad(
                good,
                rank_mask={"a": [2] * 3, "b": [2] * 3},
                final_pattern={"a": [2] * 3, "b": [2] * 3},
                last_pattern={"a": [2] * 3, "b": [2] * 3},
                ema={"a": {"lora_A": 0}},
            ),
            fit.format(
                "; ".join(
                    f"{w}[{n!r}]=[2, 2, 2] (want 3 0/1 flags)"
                    for w in ("rank_mask", "final_pattern", "last_pattern")
                    for n in ("a", "b")
                )
            ),
        ),
    ]
    for state, message in cases:
        with pytest.raises(AdapterStateError) as err:
            target.load_state_dict(state)
        assert _msg(err) == message
        after = target.state_dict()
        assert after["updates"] == before["updates"] and after["last_pattern"] == before["last_pattern"]
        assert after["rank_mask"] == before["rank_mask"] and after["final_pattern"] is None
        for n in ("a", "b"):
            assert all(torch.equal(after["ema"][n][k], before["ema"][n][k]) for k in before["ema"][n])


# --- the run schedule -------------------------------------------------------------------------------------------


def test_resolve_total_and_its_messages() -> None:
    assert ada.resolve_total(AdaLoRAConfig(total_step=7), 99) == 7
    assert ada.resolve_total(AdaLoRAConfig(total_step=7), None) == 7
    assert ada.resolve_total(AdaLoRAConfig(), 12.0) == 12 and type(ada.resolve_total(AdaLoRAConfig(), 12.0)) is int
    assert ada.resolve_total(AdaLoRAConfig(schedule="epoch"), 3.0) == 3
    assert ada.resolve_total(AdaLoRAConfig(schedule="epoch"), 0) == 0
    step_msg = (
        "adalora: total_step=None but the trainer's number of optimizer steps is unbounded; "
        "set Trainer(max_epochs=...) or max_steps, or AdaLoRAConfig.total_step"
    )
    epoch_msg = (
        "adalora: schedule='epoch' with total_step=None needs Trainer(max_epochs=N); "
        "or set AdaLoRAConfig.total_step to the number of epochs"
    )
    for cfg, length, message in [
        (AdaLoRAConfig(), None, step_msg),
        (AdaLoRAConfig(), float("inf"), step_msg),
        (AdaLoRAConfig(), float("nan"), step_msg),
        (AdaLoRAConfig(schedule="epoch"), None, epoch_msg),
        (AdaLoRAConfig(schedule="epoch"), -1, epoch_msg),
    ]:
        with pytest.raises(AdapterConfigError) as err:
            ada.resolve_total(cfg, length)
        assert _msg(err) == message


def test_rank_history_table_columns_and_rows() -> None:
    history = [
        {"t": 2, "global_step": 5, "budget": 6, "ranks": [3, 2]},
        {"t": 4, "global_step": 9, "budget": 3, "ranks": [1, 2]},
    ]
    assert ada.rank_history_table(["a", "b"], history) == (
        ["t", "global_step", "budget", "kept", "a", "b"],
        [[2, 5, 6, 5, 3, 2], [4, 9, 3, 3, 1, 2]],
    )


def _sched(schedule: str = "step", **kw) -> tuple[nn.Module, ada.AdaLoRASchedule]:
    sched_kw = {**SCHED, "schedule": schedule, **kw}
    model = _two(**sched_kw)
    _randomize(model)
    cfg = AdaLoRAConfig(init_r=3, target_r=1, alpha=6.0, target_modules=["a", "b"], **sched_kw)
    return model, ada.AdaLoRASchedule(model, cfg)


@pytest.mark.parametrize(
    "schedule, tinit, tfinal, length, words",
    [
        ("step", 1, 0, 1, "this run has 1 optimizer step, too few for tinit=1 + tfinal=0"),
        ("step", 1, 2, 3, "this run has 3 optimizer steps, too few for tinit=1 + tfinal=2"),
        ("epoch", 0, 1, 1, "this run has 1 epoch, too few for tinit=0 + tfinal=1"),
        ("epoch", 1, 1, 2, "this run has 2 epochs, too few for tinit=1 + tfinal=1"),
    ],
)
def test_start_turns_reallocation_off_for_too_short_runs(schedule, tinit, tfinal, length, words) -> None:
    model, sched = _sched(schedule, tinit=tinit, tfinal=tfinal)
    notice = sched.start(length)
    assert notice == (f"adalora: {words}; training without rank reallocation (every layer keeps init_r=3)")
    assert sched.reallocate is False and sched.allocator is None
    assert sched.after_optimizer_step(0) is None and sched.after_epoch(1) is None and sched.history == []
    assert sched.start(length + 1) is None
    assert sched.reallocate is True and sched.allocator.total == length + 1


def test_start_sizes_the_allocator_once_and_writes_the_resolved_total() -> None:
    model, sched = _sched()
    assert sched.names == ["a", "b"] and sched.allocator is None and sched.reallocate is True
    assert sched.history == [] and sched.last_epoch == 0 and sched.length_unit == "optimizer_steps"
    with pytest.raises(AdapterStateError) as err:
        sched.after_optimizer_step(0)
    assert _msg(err) == "adalora: the schedule was used before start(length) was called"
    assert peft_config_dict(model)["total_step"] == 4
    assert sched.start(9) is None
    alloc = sched.allocator
    assert alloc.total == 9 and list(alloc.layers) == ["a", "b"] and peft_config_dict(model)["total_step"] == 9
    assert sched.start(12.0) is None and sched.allocator is alloc and alloc.total == 12
    assert peft_config_dict(model)["total_step"] == 12
    # Epoch mode leaves the file's total_step alone; an explicit total_step ignores the length.
    model, sched = _sched("epoch")
    assert sched.length_unit == "epochs"
    sched.start(9)
    assert sched.allocator.total == 9 and peft_config_dict(model)["total_step"] == 4
    model = _two(**SCHED)
    cfg = AdaLoRAConfig(init_r=3, target_r=1, total_step=7, target_modules=["a", "b"], **SCHED)
    sched = ada.AdaLoRASchedule(model, cfg)
    assert sched.length_unit is None and sched.start(None) is None and sched.allocator.total == 7
    with pytest.raises(AdapterConfigError) as err:
        ada.AdaLoRASchedule(Two(), cfg)
    assert _msg(err) == "adalora: the model has no AdaLoRA layers; inject an AdaLoRAConfig first"


def test_start_writes_the_total_of_its_own_adapter_only() -> None:
    model = _two(**SCHED)
    other_cfg = AdaLoRAConfig(init_r=2, target_r=1, target_modules=["b"], **SCHED)
    la.inject(model, other_cfg, name="other")
    sched = ada.AdaLoRASchedule(model, other_cfg, adapter="other")
    assert sched.names == ["b"]
    sched.start(20)
    assert list(sched.allocator.layers) == ["b"] and sched.allocator.layers["b"] is model.b.adapter.other
    assert (
        peft_config_dict(model, "other")["total_step"] == 20 and peft_config_dict(model, "default")["total_step"] == 4
    )
    model.b.adapter.other.apply_mask(torch.tensor([True, False]))
    assert sched.rank_pattern == {"b": [True, False]}


def test_the_history_records_the_kept_ranks_of_its_own_adapter() -> None:
    # "other" (init_r 2, on b) is injected last; the schedule of "default" must still read default's ranks.
    model = _two(**SCHED)
    la.inject(model, AdaLoRAConfig(init_r=2, target_r=1, target_modules=["b"], **SCHED), name="other")
    cfg = AdaLoRAConfig(init_r=3, target_r=1, target_modules=["a", "b"], **SCHED)
    sched = ada.AdaLoRASchedule(model, cfg, adapter="default")
    model.b.adapter.default.apply_mask(torch.tensor([True, False, False]))
    metrics = sched._record(3, 7, 4)
    assert metrics == {"adalora/budget": 4.0, "adalora/kept": 4.0, "adalora/rank/a": 3.0, "adalora/rank/b": 1.0}
    assert sched.history == [{"t": 3, "global_step": 7, "budget": 4, "ranks": [3, 1]}]


def test_broadcast_scores_are_cut_back_in_order_for_three_or_more_matrices(monkeypatch) -> None:
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "broadcast", lambda flat, src: flat.copy_(torch.arange(6.0)))
    scores = {"a": torch.zeros(3), "b": torch.zeros(2), "c": torch.zeros(1)}
    out = ada._broadcast_from_rank0(scores)
    assert {k: v.tolist() for k, v in out.items()} == {"a": [0.0, 1.0, 2.0], "b": [3.0, 4.0], "c": [5.0]}


def test_loss_term_is_the_weighted_regulariser_of_its_adapter() -> None:
    model, sched = _sched(orth_reg_weight=0.25)
    want = 0.25 * orthogonal_regularizer(list(adalora_layers(model).values()))
    assert torch.equal(sched.loss_term(), want)
    _, sched = _sched(orth_reg_weight=0.0)
    assert sched.loss_term() is None
    la.inject(model, AdaLoRAConfig(init_r=2, target_r=1, target_modules=["b"]), name="other")
    other = ada.AdaLoRASchedule(model, AdaLoRAConfig(init_r=2, target_r=1, orth_reg_weight=2.0), adapter="other")
    assert torch.equal(other.loss_term(), 2.0 * orthogonal_regularizer([model.b.adapter.other]))


def _metrics(budget: int, ranks: list[int]) -> dict[str, float]:
    return {
        "adalora/budget": float(budget),
        "adalora/kept": float(sum(ranks)),
        "adalora/rank/a": float(ranks[0]),
        "adalora/rank/b": float(ranks[1]),
    }


def test_step_schedule_records_each_allocation_with_its_metrics() -> None:
    model, sched = _sched()
    sched.start(9)
    g = torch.Generator().manual_seed(2)
    got = {}
    for t in range(11):
        _grads(model, g)
        out = sched.after_optimizer_step(t, None if t % 2 else float(t + 100))
        if out is not None:
            got[t] = out
        assert sched.after_epoch(t + 1) is None
    assert list(got) == [2, 4, 6, 7]
    assert all(type(h[k]) is int for h in sched.history for k in ("t", "global_step", "budget"))
    ranks = [h["ranks"] for h in sched.history]
    budgets = [budget_schedule(t, 6, 2, 1, 2, 9, 2)[0] for t in (2, 4, 6)] + [2]
    assert sched.history == [
        {"t": t, "global_step": t + 100 if t % 2 == 0 else t, "budget": b, "ranks": r}
        for t, b, r in zip((2, 4, 6, 7), budgets, ranks)
    ]
    for out, b, r in zip(got.values(), budgets, ranks):
        assert out == _metrics(b, r) and all(type(v) is float for v in out.values())
    assert ranks[-1] == [ly.kept_rank for ly in adalora_layers(model).values()] and sum(ranks[-1]) == 2
    assert sched.last_epoch == 0


def test_epoch_schedule_allocates_once_per_new_epoch_end() -> None:
    model, sched = _sched("epoch", tinit=1, tfinal=1, deltaT=1)
    sched.start(5)
    alloc = sched.allocator
    g = torch.Generator().manual_seed(2)
    outs = {}
    for epoch in range(1, 7):
        for step in range(2):
            _grads(model, g)
            assert sched.after_optimizer_step(step) is None
        out = sched.after_epoch(epoch, None if epoch % 2 else 10.0 * epoch)
        assert sched.last_epoch == epoch
        if out is not None:
            outs[epoch] = out
        assert sched.after_epoch(epoch) is None and sched.after_epoch(epoch - 1) is None  # seen already
        if epoch < 4:
            assert alloc.updates == 2 * epoch and alloc.final_pattern is None
    assert list(outs) == [2, 3, 4]
    assert all(type(h[k]) is int for h in sched.history for k in ("t", "global_step", "budget"))
    budgets = [3, 2, 2]  # floor(4·(2/3)³ + 2), floor(4·(1/3)³ + 2), the target at T − tfinal = 4
    ranks = [h["ranks"] for h in sched.history]
    assert sched.history == [
        {"t": e, "global_step": 10 * e if e % 2 == 0 else e, "budget": b, "ranks": r}
        for e, b, r in zip((2, 3, 4), budgets, ranks)
    ]
    assert [outs[e] for e in (2, 3, 4)] == [_metrics(b, r) for b, r in zip(budgets, ranks)]
    assert sum(ranks[0]) >= 3 and sum(ranks[2]) == 2 and alloc.final_pattern is not None
    # After the final mask the steps only re-apply it.
    with torch.no_grad():
        for ly in adalora_layers(model).values():
            ly.lora_E.fill_(1.0)
    updates = alloc.updates
    assert sched.after_optimizer_step(0) is None and alloc.updates == updates
    for n, ly in adalora_layers(model).items():
        assert ly.lora_E[:, 0].tolist() == [1.0 if k else 0.0 for k in alloc.final_pattern[n].tolist()]


def test_epoch_schedule_takes_the_final_mask_late_if_the_cut_epoch_was_missed() -> None:
    model, sched = _sched("epoch", tinit=0, tfinal=1, deltaT=3)
    sched.start(4)
    _grads(model, torch.Generator().manual_seed(2))
    sched.after_optimizer_step(0)
    assert sched.after_epoch(1) is None  # 1 % 3 != 0: no mask in the cubic phase
    out = sched.after_epoch(5)
    assert out is not None and sched.history[-1]["t"] == 5 and sched.history[-1]["budget"] == 2
    assert sum(sched.history[-1]["ranks"]) == 2 and sched.allocator.final_pattern is not None


def test_report_is_the_history_table_and_heatmap() -> None:
    model, sched = _sched()
    assert sched.report() is None
    sched.history = [
        {"t": 2, "global_step": 5, "budget": 6, "ranks": [3, 2]},
        {"t": 4, "global_step": 9, "budget": 3, "ranks": [1, 2]},
    ]
    assert sched.report() == ScheduleReport(
        "adalora/ranks",
        ["t", "global_step", "budget", "kept", "a", "b"],
        [[2, 5, 6, 5, 3, 2], [4, 9, 3, 3, 1, 2]],
        "adalora/rank_heatmap",
        Heatmap(
            values=[[3.0, 1.0], [2.0, 2.0]],
            row_labels=["a", "b"],
            column_labels=["2", "4"],
            vmax=3.0,
            title="AdaLoRA kept rank per matrix",
            xlabel="reallocation (t)",
            colorbar="kept rank",
        ),
    )


def test_schedule_state_round_trip_before_and_after_start() -> None:
    model, sched = _sched()
    assert sched.state_dict() == {"allocator": None, "history": [], "last_epoch": 0, "names": ["a", "b"]}
    sched.start(9)
    g = torch.Generator().manual_seed(2)
    for t in range(5):
        _grads(model, g)
        sched.after_optimizer_step(t)
    sched.last_epoch = 3
    state = sched.state_dict()
    assert set(state) == {"allocator", "history", "last_epoch", "names"}
    assert state["allocator"]["updates"] == 5 and state["last_epoch"] == 3 and state["names"] == ["a", "b"]
    assert state["history"] == sched.history and state["history"][0]["ranks"] is not sched.history[0]["ranks"]
    # Loaded before start: kept pending, applied by start (which keeps its own total).
    _, fresh = _sched()
    fresh.load_state_dict(state)
    assert fresh.allocator is None and fresh.state_dict() is state
    fresh.start(11)
    assert fresh.allocator.total == 11 and fresh.allocator.updates == 5 and fresh.last_epoch == 3
    assert fresh.history == sched.history and fresh.history[0]["ranks"] is not state["history"][0]["ranks"]
    assert fresh.state_dict()["allocator"]["total"] == 11
    # Loaded after start, with no allocator state: the allocator keeps its own.
    _, late = _sched()
    late.start(9)
    late.load_state_dict({**state, "allocator": None, "last_epoch": 2.0})
    assert late.allocator.updates == 0 and late.history == sched.history
    assert late.last_epoch == 2 and type(late.last_epoch) is int
    # Loaded into a run too short to reallocate: the state is kept as it was.
    _, short = _sched()
    short.load_state_dict(state)
    assert short.start(2) is not None and short.state_dict() is state
    for bad, shown in [({**state, "names": ["x"]}, "['x']"), ({k: v for k, v in state.items() if k != "names"}, "[]")]:
        with pytest.raises(AdapterStateError) as err:
            sched.load_state_dict(bad)
        assert _msg(err) == (
            f"adalora: the checkpoint's AdaLoRA state is for modules {shown}, this model has ['a', 'b']; resume "
            "with the same model and target_modules"
        )


def test_a_pending_state_is_applied_by_the_first_start_only() -> None:
    model, sched = _sched()
    sched.start(9)
    g = torch.Generator().manual_seed(2)
    for t in range(3):
        _grads(model, g)
        sched.after_optimizer_step(t)
    state = sched.state_dict()
    fresh_model, fresh = _sched()
    fresh.load_state_dict(state)
    fresh.start(9)
    assert fresh.allocator.updates == 3
    _grads(fresh_model, g)
    fresh.after_optimizer_step(3)
    # A second start (another fit of the same schedule) resizes; it does not bring the loaded state back.
    assert fresh.start(10) is None
    assert fresh.allocator.updates == 4 and fresh.allocator.total == 10
    assert fresh.state_dict()["allocator"]["updates"] == 4


# --- PEFT config translation and registration -------------------------------------------------------------------


def test_to_peft_writes_every_field() -> None:
    cfg = AdaLoRAConfig(
        init_r=6,
        target_r=3,
        tinit=2,
        tfinal=3,
        deltaT=4,
        beta1=0.5,
        beta2=0.25,
        orth_reg_weight=0.125,
        alpha=12.0,
        dropout=0.1,
        init_weights=False,
        bias="all",
        layers_to_transform=[1],
        layers_pattern="layers",
        target_modules=["q_proj"],
    )
    assert ada._to_peft(cfg) == {
        "peft_type": "ADALORA",
        "init_r": 6,
        "target_r": 3,
        "tinit": 2,
        "tfinal": 3,
        "deltaT": 4,
        "beta1": 0.5,
        "beta2": 0.25,
        "orth_reg_weight": 0.125,
        "total_step": 6,
        "r": 8,
        "lora_alpha": 12.0,
        "lora_dropout": 0.1,
        "init_lora_weights": False,
        "rank_pattern": None,
        "layers_to_transform": [1],
        "layers_pattern": "layers",
        "bias": "all",
        "fan_in_fan_out": False,
        "use_dora": False,
    }
    assert ada._to_peft(AdaLoRAConfig(tinit=2, tfinal=3, total_step=40))["total_step"] == 40


def test_peft_config_extra_writes_the_export_masks_once_anything_is_pruned() -> None:
    model = _two()
    la.inject(model, AdaLoRAConfig(init_r=2, target_r=1, target_modules=["b"]), name="other")
    assert ada._peft_config_extra(model, "default") == {}
    model.b.adapter.other.apply_mask(torch.tensor([True, False]))
    assert ada._peft_config_extra(model, "default") == {}
    assert ada._peft_config_extra(model, "other") == {"rank_pattern": {"b.lora_E": [True, False]}}
    model.a.adapter.default.apply_mask(torch.tensor([False, True, False]))
    with torch.no_grad():
        model.a.adapter.default.lora_E[2, 0] = 1.0  # regrown: exported
    assert ada._peft_config_extra(model, "default") == {
        "rank_pattern": {"a.lora_E": [False, True, True], "b.lora_E": [True, True, True]}
    }


def test_from_peft_defaults() -> None:
    cfg = ada._from_peft({})
    assert (cfg.init_r, cfg.target_r, cfg.tinit, cfg.tfinal, cfg.deltaT) == (12, 8, 0, 0, 1)
    assert (cfg.beta1, cfg.beta2, cfg.orth_reg_weight, cfg.total_step, cfg.alpha) == (0.85, 0.85, 0.5, None, 8)
    assert (cfg.dropout, cfg.init_weights, cfg.rank_pattern, cfg.bias) == (0.0, True, {}, "none")
    assert (cfg.layers_to_transform, cfg.layers_pattern) == (None, None)
    assert (cfg.target_modules, cfg.exclude_modules, cfg.modules_to_save) == (None, None, None)


def test_from_peft_reads_every_field() -> None:
    d = {
        "peft_type": "ADALORA",
        "init_r": 3,
        "target_r": 2,
        "tinit": 1,
        "tfinal": 2,
        "deltaT": 5,
        "beta1": 0.5,
        "beta2": 0.25,
        "orth_reg_weight": 0.125,
        "total_step": 10,
        "lora_alpha": 0.5,
        "lora_dropout": 0.2,
        "init_lora_weights": False,
        "rank_pattern": {"m.a.lora_E.default": [True, False, True], "m.b.lora_E": [False, False, True]},
        "bias": "lora_only",
        "layers_to_transform": [0],
        "layers_pattern": "layers",
        "target_modules": ["a", "b"],
        "exclude_modules": ["c"],
        "modules_to_save": ["head"],
    }
    cfg = ada._from_peft(d)
    assert (cfg.init_r, cfg.target_r, cfg.tinit, cfg.tfinal, cfg.deltaT) == (3, 2, 1, 2, 5)
    assert (cfg.beta1, cfg.beta2, cfg.orth_reg_weight, cfg.total_step, cfg.alpha) == (0.5, 0.25, 0.125, 10, 0.5)
    assert (cfg.dropout, cfg.init_weights, cfg.bias) == (0.2, False, "lora_only")
    assert cfg.rank_pattern == {"m.a": [True, False, True], "m.b": [False, False, True]}
    assert (cfg.layers_to_transform, cfg.layers_pattern) == ([0], "layers")
    assert (cfg.target_modules, cfg.exclude_modules, cfg.modules_to_save) == (["a", "b"], ["c"], ["head"])
    # PEFT's odd values: a zero alpha means init_r, a null dropout 0, target_r above init_r clipped, an
    # impossible schedule dropped (the tensors still load), a falsy init flag False.
    cfg = ada._from_peft({**d, "lora_alpha": 0, "lora_dropout": None, "target_r": 9, "total_step": 3})
    assert (cfg.alpha, cfg.dropout, cfg.target_r, cfg.total_step) == (3.0, 0.0, 3, None)
    assert type(cfg.alpha) is float
    assert ada._from_peft({**d, "lora_alpha": 1, "init_lora_weights": 0}).alpha == 1
    assert ada._from_peft({**d, "init_lora_weights": 0}).init_weights is False
    assert ada._from_peft({**d, "total_step": 4}).total_step == 4
    assert ada._from_peft({**d, "bias": "all"}).bias == "all"
    assert ada._from_peft({**d, "rank_pattern": None}).rank_pattern == {}
    assert ada._from_peft({**d, "rank_pattern": {"m.a.lora_E": (True, True, False)}}).rank_pattern == {
        "m.a": [True, True, False]
    }
    with pytest.raises(AdapterConfigError) as err:
        ada._from_peft({**d, "brand_new_option": 5})
    assert _msg(err).startswith("adalora: PEFT ADALORA option brand_new_option=5 is not known to lightning_adapters")
    with pytest.raises(AdapterConfigError) as err:
        ada._from_peft({**d, "rank_pattern": {"m.a": [True] * 3}})
    assert _msg(err) == "adalora: rank_pattern key 'm.a' is not PEFT's '<module>.lora_E' form"


def test_the_method_is_registered_with_peft_s_defaults() -> None:
    from lightning_adapters.core.targeting import LINEAR_TYPES
    from lightning_adapters.registry import get_method, get_method_by_peft_type

    spec = get_method("adalora")
    assert spec is get_method_by_peft_type("ADALORA") and isinstance(spec, ada.AdaLoRAMethod)
    assert (spec.name, spec.peft_type, spec.config_cls) == ("adalora", "ADALORA", AdaLoRAConfig)
    assert spec.supported_types == LINEAR_TYPES + (nn.Conv2d,)
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING as PEFT_ADALORA

    assert spec.default_targets == PEFT_ADALORA  # e.g. roberta: query, key, value, dense (not LoRA's query, value)
    assert spec.create_layer is ada.AdaLoRALayer and spec.training_hooks is ada.AdaLoRASchedule
    assert spec.config_to_peft is ada._to_peft and spec.config_from_peft is ada._from_peft
    assert spec.peft_config_extra is ada._peft_config_extra
    assert ada.SCHEDULES == ("step", "epoch") and ada.RANKNUM_EPS == 1e-5


# --- sharded (FSDP2) glue, driven with stand-ins for DTensors and the process group ------------------------------


class _FakeDTensor:
    """What ``_full``/``_like`` read of a DTensor: ``full_tensor()``, ``device_mesh`` and ``placements``."""

    def __init__(self, full: torch.Tensor) -> None:
        self.full = full
        self.device_mesh = "mesh"
        self.placements = ("shard-0",)

    def full_tensor(self) -> torch.Tensor:
        return self.full


def test_full_and_like_gather_and_scatter_only_sharded_tensors(monkeypatch) -> None:
    import torch.distributed.tensor as dtensor

    t = torch.arange(3.0)
    assert ada._full(t) is t
    fake = _FakeDTensor(torch.ones(2))
    assert ada._full(fake) is fake.full
    mask = torch.tensor([[True], [False]])
    assert ada._like(t, mask) is mask
    calls = []
    monkeypatch.setattr(dtensor, "distribute_tensor", lambda *a: calls.append(a) or "distributed")
    assert ada._like(fake, mask) == "distributed"
    assert len(calls) == 1 and calls[0][0] is mask and calls[0][1:] == ("mesh", ("shard-0",))


def test_scores_are_broadcast_from_rank_0_under_a_process_group(monkeypatch) -> None:
    import torch.distributed as dist

    scores = {"a": torch.tensor([1.0, 2.0, 3.0]), "b": torch.tensor([4.0, 5.0])}
    assert ada._broadcast_from_rank0(scores) is scores  # no process group
    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 1)
    assert ada._broadcast_from_rank0(scores) is scores  # a group of one
    rank0 = torch.tensor([10.0, 20.0, 30.0, 40.0, 50.0])
    seen = []

    def broadcast(flat: torch.Tensor, src: int) -> None:
        seen.append((flat.clone(), src, flat.is_contiguous()))
        flat.copy_(rank0)

    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "broadcast", broadcast)
    out = ada._broadcast_from_rank0(scores)
    assert len(seen) == 1 and seen[0][0].tolist() == [1.0, 2.0, 3.0, 4.0, 5.0] and seen[0][1:] == (0, True)
    assert list(out) == ["a", "b"] and out["a"].tolist() == [10.0, 20.0, 30.0] and out["b"].tolist() == [40.0, 50.0]
    two_d = {"a": torch.tensor([[1.0, 2.0]]), "b": torch.tensor([3.0])}
    rank0 = torch.tensor([7.0, 8.0, 9.0])
    out = ada._broadcast_from_rank0(two_d)
    assert out["a"].shape == (1, 2) and out["a"].tolist() == [[7.0, 8.0]] and out["b"].tolist() == [9.0]
    # The allocator's scores go through it: every rank masks with rank 0's scores.
    model = _two(**SCHED)
    alloc = ada.RankAllocator(model, AdaLoRAConfig(init_r=3, target_r=1, **SCHED), 9)
    rank0 = torch.tensor([5.0, 1.0, 4.0, 2.0, 6.0, 3.0], dtype=torch.float64)
    masks = alloc.allocate(3)
    assert masks["a"].tolist() == [True, False, True] and masks["b"].tolist() == [False, True, False]


def test_a_default_device_context_does_not_move_the_adapter() -> None:
    torch.manual_seed(3)
    base = nn.Linear(6, 5).double()
    want = _one(nn.Linear(6, 5).double(), seed=2, rank_pattern={"layer": [True, False, True]}).layer.adapter.default
    with torch.device("meta"):
        model = _one(base, seed=2, rank_pattern={"layer": [True, False, True]})
    layer = model.layer.adapter.default
    tensors = dict(layer.named_parameters()) | dict(layer.named_buffers())
    assert set(tensors) == {"lora_A", "lora_B", "lora_E", "rank_mask", "ranknum"}
    assert all(t.device.type == "cpu" for t in tensors.values())
    for name in ("lora_A", "lora_B", "lora_E", "rank_mask", "ranknum"):
        assert torch.equal(getattr(layer, name), getattr(want, name)), name


def test_scores_before_any_update_are_zeros_on_the_layers_device_under_a_default_device_context() -> None:
    model = _two(**SCHED)
    alloc = ada.RankAllocator(model, AdaLoRAConfig(init_r=3, target_r=1, **SCHED), 9)
    with torch.device("meta"):
        zeros = alloc.scores()
        masks = alloc.allocate(4)  # ties everywhere: every zero score is at most the threshold
    assert set(zeros) == {"a", "b"}
    for v in zeros.values():
        assert v.device.type == "cpu" and v.dtype == torch.float64 and v.tolist() == [0.0] * 3
    assert {n: m.tolist() for n, m in masks.items()} == {"a": [False] * 3, "b": [False] * 3}


def test_allocator_state_with_0_1_flags_loads_as_bool_masks() -> None:
    _, alloc = _stepped(3)
    state = alloc.state_dict()
    ints = {n: [int(f) for f in flags] for n, flags in state["last_pattern"].items()}
    _, fresh = _stepped(0)
    fresh.load_state_dict(
        {**state, "last_pattern": ints, "final_pattern": ints, "rank_mask": ints, "updates": 3.0, "total": 9.0}
    )
    assert fresh.updates == 3 and type(fresh.updates) is int and fresh.total == 9 and type(fresh.total) is int
    for p in (fresh.last_pattern, fresh.final_pattern):
        assert all(m.dtype == torch.bool for m in p.values())
        assert {n: m.tolist() for n, m in p.items()} == state["last_pattern"]
    assert fresh.state_dict()["final_pattern"] == state["last_pattern"]
    assert {n: ly.rank_mask.tolist() for n, ly in fresh.layers.items()} == state["last_pattern"]


def test_quantized_inference_keeps_the_base_s_own_kernel_and_adds_the_term() -> None:
    pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    model = la.quantize(Wrap(nn.Linear(32, 16)).eval(), "int8", skip=[])
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base_out = model(x)  # bitsandbytes' int8 inference kernel (activations quantized too)
    la.inject(model, AdaLoRAConfig(init_r=2, target_r=1, alpha=3.0, dropout=0.25, target_modules=["layer"]))
    model.eval()
    layer = model.layer.adapter.default
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in (layer.lora_A, layer.lora_B, layer.lora_E):
            p.copy_(torch.randn(p.shape, generator=g))
        y = model(x)
    a, e, b = layer.lora_A.detach(), layer.lora_E.detach(), layer.lora_B.detach()
    delta = (x @ (a * e).T) @ b.T * 3.0 / (2 + EPS)
    assert torch.allclose(y, base_out + delta, rtol=1e-5, atol=1e-5)


def test_layer_refuses_grouped_convs_and_absurd_ranks_by_name() -> None:
    model = nn.Module()
    model.blk = nn.ModuleDict({"conv": nn.Conv2d(4, 4, 3, groups=2)})
    with pytest.raises(AdapterConfigError) as err:
        la.inject(model, AdaLoRAConfig(init_r=2, target_r=1, target_modules=["conv"]))
    assert _msg(err) == (
        "adalora: Conv2d 'blk.conv' has groups=2; AdaLoRA's A (r, in·kh·kw) needs groups=1, so exclude this "
        "module (exclude_modules=['conv'])"
    )
    with pytest.raises(AdapterConfigError) as err:
        _one(nn.Linear(6, 5), init_r=97)
    assert _msg(err) == (
        "adalora: init_r=97 on 'layer' is far above the layer's dimensions (6, 5) (at most 96 is accepted, nothing "
        "was allocated); more than 5 ranks add no expressiveness, so use init_r <= 5"
    )
    assert _one(nn.Linear(6, 5), init_r=96).layer.adapter.default.r == 96
    with pytest.raises(AdapterConfigError, match=r"dimensions \(8, 3\) \(at most 128"):
        _one(nn.Conv2d(2, 3, 2), init_r=129)
    assert _one(nn.Conv2d(2, 3, 2), init_r=128).layer.adapter.default.lora_A.shape == (128, 8)


def test_orthogonal_regularizer_stays_in_the_factors_dtype() -> None:
    model = _two()
    _randomize(model)
    layers = list(adalora_layers(model).values())
    for layer in layers:
        layer.to(torch.bfloat16)
    got = orthogonal_regularizer(layers)
    eye = torch.eye(3, dtype=torch.bfloat16)
    terms = []
    for ly in layers:
        a, b = ly.lora_A.detach(), ly.lora_B.detach()
        terms += [torch.norm(a @ a.T - eye, p="fro"), torch.norm(b.T @ b - eye, p="fro")]
    assert got.dtype == torch.bfloat16
    assert torch.allclose(got.float(), (sum(terms) / 4).float(), rtol=2e-2)


def test_orthogonal_regularizer_ignores_a_default_device_context() -> None:
    model = _two()
    _randomize(model)
    layers = list(adalora_layers(model).values())
    want = orthogonal_regularizer(layers)
    with torch.device("meta"):
        got = orthogonal_regularizer(layers)
    assert got.device.type == "cpu" and torch.equal(got, want)


def test_allocator_state_loads_onto_the_device_of_the_layers() -> None:
    """A state written on the CPU, loaded by an allocator whose layers live elsewhere (here the meta device), puts
    every importance EMA on its layer's device, with its shape kept."""
    _, alloc = _stepped(3)
    state = alloc.state_dict()
    other_model, other = _stepped(0)
    other_model.to("meta")
    other.load_state_dict(state)
    for where in (other.ema, other.unc):
        assert set(where) == {"a", "b"}
        for n, sub in where.items():
            assert set(sub) == {"lora_A", "lora_B", "lora_E"}
            for k, v in sub.items():
                assert v.is_meta and v.shape == state["ema"][n][k].shape, (n, k)


@pytest.mark.parametrize("key", ["lora_A", "lora_B", "lora_E"])
def test_load_peft_state_refuses_a_factor_without_data(key) -> None:
    """Every factor is copied onto the layer's device: one left on the meta device (no values) raises torch's
    own error instead of leaving that factor at zero."""
    model = _one(nn.Linear(6, 5))
    layer = model.layer.adapter.default
    g = torch.Generator().manual_seed(0)
    state = {"lora_A": torch.randn(3, 6, generator=g), "lora_B": torch.randn(5, 3, generator=g)}
    state["lora_E"] = torch.randn(3, 1, generator=g)
    layer.load_peft_state(state)
    assert all(torch.equal(getattr(layer, k).detach(), v) for k, v in state.items())
    with pytest.raises(NotImplementedError, match="Cannot copy out of meta tensor"):
        layer.load_peft_state({**state, key: state[key].to("meta")})


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_a_half_base_gives_peft_s_outputs_and_gradients_bit_for_bit(kind, dtype) -> None:
    """Float32 factors on a half base: the term is added to the half output in float32 and rounded once, as PEFT's
    ``result += ...`` does (rounding the term to the half dtype first was off by up to 2 ulps)."""
    torch.manual_seed(0)
    base = nn.Linear(16, 12) if kind == "linear" else nn.Conv2d(4, 6, 3)
    model = Wrap(base).to(dtype)
    peft_model = get_peft_model(
        copy.deepcopy(model),
        PeftAdaLoraConfig(init_r=4, target_r=2, lora_alpha=8, total_step=100, target_modules=["layer"]),
    )
    ours = la.inject(model, AdaLoRAConfig(init_r=4, target_r=2, alpha=8.0, total_step=100, target_modules=["layer"]))
    theirs, layer = peft_model.base_model.model.layer, ours.layer.adapter.default
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n in ("lora_A", "lora_B", "lora_E"):
            v = torch.randn(getattr(layer, n).shape, generator=g)
            getattr(theirs, n)["default"].copy_(v)
            getattr(layer, n).copy_(v)
    assert layer.lora_A.dtype == torch.float32
    x = torch.randn((3, 16) if kind == "linear" else (2, 4, 5, 5), generator=g).to(dtype)
    y_theirs, y_ours = peft_model(x), ours(x)
    assert y_ours.dtype == dtype and torch.equal(y_ours, y_theirs)
    grad = torch.randn(y_ours.shape, generator=g).to(dtype)
    y_theirs.backward(grad)
    y_ours.backward(grad)
    for n in ("lora_A", "lora_B", "lora_E"):
        assert torch.equal(getattr(layer, n).grad, getattr(theirs, n)["default"].grad), n
