"""``methods/lora_params.py`` pinned against closed-form maths: LoRA on bare ``nn.Parameter``s (``target_parameters``).

For a parameter ``W (E, d1, d2)`` with rank ``r`` and scale ``s``: ``A (r·E, d2)``, ``B (d1, r·E)`` and
``ΔW[e] = s · B[:, e::E] @ A[e·r:(e+1)·r]``; with ``is_transposed`` ``A (r·E, d1)``, ``B (d2, r·E)`` and the block
transposed; a 2-D parameter is a plain ``s · B @ A``. The module under test returns its parameters (times a scalar
input), so the adapted forward shows ``W + ΔW`` directly. Every expectation is written here from those formulas:
shapes, values and gradients, the init draws replayed from the seed, merge/unmerge, the nested PEFT keys, and the
selection and refusal rules of ``param_layers`` / ``check_target_parameters``.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import lightning_adapters as la
from lightning_adapters.methods.lora import lora_scale
from lightning_adapters.methods.lora_params import LoRAParamLayer, check_target_parameters, param_layers


class Block(nn.Module):
    """A 3-D ``w`` (E=3, 5, 4), a 2-D ``p`` (6, 4) and a 3-D ``v`` (2, 4, 7); the forward returns them scaled."""

    def __init__(self, transposed: bool = False, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        if transposed:
            self.is_transposed = True
        g = torch.Generator().manual_seed(0)
        self.w = nn.Parameter(torch.randn(3, 5, 4, generator=g, dtype=torch.float64).to(dtype))
        self.p = nn.Parameter(torch.randn(6, 4, generator=g, dtype=torch.float64).to(dtype))
        self.v = nn.Parameter(torch.randn(2, 4, 7, generator=g, dtype=torch.float64).to(dtype))

    def forward(self, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.w * t, self.p * t, self.v * t


class Net(nn.Module):
    def __init__(self, **kw) -> None:
        super().__init__()
        self.block = Block(**kw)
        self.lin = nn.Linear(4, 4)

    def forward(self, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.block(t)


def _delta(A: torch.Tensor, B: torch.Tensor, shape: tuple[int, ...], r: int, s: float, transposed: bool):
    """ΔW from the module docstring's formula, block by block."""
    if len(shape) == 2:
        return s * (B @ A)
    E = shape[0]
    blocks = [B[:, e::E] @ A[e * r : (e + 1) * r] for e in range(E)]
    return s * torch.stack([b.t() if transposed else b for b in blocks])


def _inject(names=("w", "p", "v"), transposed=False, dtype=torch.float64, seed=None, **kw):
    kw = {"r": 2, "alpha": 6.0, "target_modules": ["lin"], **kw}
    model = Net(transposed=transposed, dtype=dtype)
    if seed is not None:
        torch.manual_seed(seed)
    return la.inject(model, la.LoRAConfig(target_parameters=[f"block.{n}" for n in names], **kw))


def _randomize(layer: LoRAParamLayer, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in [*layer.lora_A.values(), *layer.lora_B.values()]:
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))


# --- shapes, ΔW and gradients ---------------------------------------------------------------------------------


@pytest.mark.parametrize("transposed", [False, True])
def test_factor_shapes_delta_and_gradients_match_the_closed_form(transposed):
    # rank and alpha per parameter through rank_pattern / alpha_pattern, keyed by "<module>.<parameter>"
    model = _inject(
        transposed=transposed, rank_pattern={"block.w": 3, "v": 1}, alpha_pattern={"block.p": 5.0}, use_rslora=True
    )
    layer = model.block.adapter.default
    assert layer.names == ["w", "p", "v"] and layer.kind == "parameter"
    ranks = {"w": 3, "p": 2, "v": 1}
    alphas = {"w": 6.0, "p": 5.0, "v": 6.0}
    assert layer.scales == {n: alphas[n] / math.sqrt(ranks[n]) for n in ranks}
    shapes = {"w": (3, 5, 4), "p": (6, 4), "v": (2, 4, 7)}
    if transposed:  # the 2-D parameter ignores is_transposed
        want = {"w": ((9, 5), (4, 9)), "p": ((2, 4), (6, 2)), "v": ((2, 4), (7, 2))}
    else:
        want = {"w": ((9, 4), (5, 9)), "p": ((2, 4), (6, 2)), "v": ((2, 7), (4, 2))}
    for n, (a_shape, b_shape) in want.items():
        assert tuple(layer.lora_A[n].shape) == a_shape and tuple(layer.lora_B[n].shape) == b_shape, n
        assert layer.lora_A[n].dtype == layer.lora_B[n].dtype == torch.float64
    _randomize(layer)
    base = {n: getattr(model.block, n).detach().clone() for n in shapes}
    t = torch.tensor(1.0, dtype=torch.float64)
    outs = dict(zip(shapes, model(t)))
    # the same maths on independent leaves gives the values and the gradients
    leaves = {
        n: (layer.lora_A[n].detach().clone().requires_grad_(), layer.lora_B[n].detach().clone().requires_grad_())
        for n in shapes
    }
    g = torch.Generator().manual_seed(7)
    loss, ref_loss = 0.0, 0.0
    for n, shape in shapes.items():
        d = _delta(*leaves[n], shape, ranks[n], layer.scales[n], transposed and len(shape) == 3)
        assert d.shape == shape
        torch.testing.assert_close(outs[n], base[n] + d, rtol=1e-12, atol=1e-12)
        assert not torch.allclose(d, torch.zeros_like(d))
        weight = torch.randn(shape, generator=g, dtype=torch.float64)
        loss = loss + (outs[n] * weight).sum()
        ref_loss = ref_loss + (d * weight).sum()
    loss.backward()
    ref_loss.backward()
    for n in shapes:
        torch.testing.assert_close(layer.lora_A[n].grad, leaves[n][0].grad, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(layer.lora_B[n].grad, leaves[n][1].grad, rtol=1e-12, atol=1e-12)
        assert getattr(model.block, n).grad is None and not getattr(model.block, n).requires_grad
        # the base parameter objects are back in place after the call, unchanged
        assert model.block._parameters[n] is getattr(model.block, n)
        assert isinstance(model.block._parameters[n], nn.Parameter)
        assert torch.equal(getattr(model.block, n), base[n])


def test_plain_scale_and_two_d_parameter_on_a_transposed_module():
    model = _inject(names=("p",), transposed=True, r=4, alpha=2.0)
    layer = model.block.adapter.default
    assert layer.scales == {"p": 0.5}
    assert tuple(layer.lora_A["p"].shape) == (4, 4) and tuple(layer.lora_B["p"].shape) == (6, 4)
    _randomize(layer)
    A, B = layer.lora_A["p"].detach(), layer.lora_B["p"].detach()
    _, p, _ = model(torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(p, model.block.p + 0.5 * B @ A, rtol=1e-12, atol=1e-12)


def test_forward_restores_the_parameters_when_the_module_raises():
    model = _inject()
    layer = model.block.adapter.default
    _randomize(layer)
    before = dict(model.block._parameters)
    with pytest.raises(RuntimeError):
        model(torch.ones(9, dtype=torch.float64))  # (3, 5, 4) * (9,) does not broadcast
    assert all(model.block._parameters[n] is before[n] for n in before)


def test_half_base_adds_the_delta_in_the_base_dtype():
    model = _inject(names=("w",), dtype=torch.bfloat16)
    layer = model.block.adapter.default
    assert layer.lora_A["w"].dtype == layer.lora_B["w"].dtype == torch.float32
    _randomize(layer)
    w = model.block.w.detach().clone()
    out, _, _ = model(torch.tensor(1.0, dtype=torch.bfloat16))
    d = _delta(layer.lora_A["w"].detach(), layer.lora_B["w"].detach(), (3, 5, 4), 2, 3.0, False)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, w + d.to(torch.bfloat16))


def test_meta_base_builds_meta_factors():
    with torch.device("meta"):
        block = Block()
    cfg = la.LoRAConfig(r=2, target_parameters=["block.w"])
    layer = LoRAParamLayer(block, ["w", "p"], cfg, "block", lora_scale)
    for d in (layer.lora_A, layer.lora_B):
        assert {n: t.device.type for n, t in d.items()} == {"w": "meta", "p": "meta"}


# --- init -------------------------------------------------------------------------------------------------------


def _replay(layer: LoRAParamLayer, seed: int, mode) -> dict[str, torch.Tensor]:
    """The draws of each parameter's factors in order, replayed from the seed."""
    torch.manual_seed(seed)
    want = {}
    for n in layer.names:
        A = torch.empty(layer.lora_A[n].shape, dtype=torch.float64)
        B = torch.zeros(layer.lora_B[n].shape, dtype=torch.float64)
        if mode == "gaussian":
            nn.init.normal_(A, std=1.0 / {"w": 3, "p": 2, "v": 2}[n])
        else:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        if mode is False:
            nn.init.kaiming_uniform_(B, a=math.sqrt(5))
        want[n] = (A, B)
    return want


@pytest.mark.parametrize("mode", [True, False, "gaussian"])
def test_init_draws_in_parameter_order(mode):
    model = _inject(init_weights=mode, rank_pattern={"w": 3}, target_modules=[], seed=11)
    layer = model.block.adapter.default
    want = _replay(layer, 11, mode)
    for n, (A, B) in want.items():
        assert torch.equal(layer.lora_A[n].detach(), A), n
        assert torch.equal(layer.lora_B[n].detach(), B), n
        assert bool(B.abs().sum() > 0) is (mode is False)
    if mode is not False:  # B = 0: the adapted module starts as the base
        outs = model(torch.tensor(1.0, dtype=torch.float64))
        assert all(torch.equal(o, getattr(model.block, n)) for o, n in zip(outs, "wpv"))


@pytest.mark.parametrize(
    ("field", "value"), [("dropout", 0.1), ("use_dora", True), ("lora_bias", True), ("init_weights", "pissa")]
)
def test_options_that_do_not_apply_are_refused(field, value):
    with pytest.raises(la.AdapterConfigError, match=rf"lora: {field}={value!r} does not work with target_parameters"):
        _inject(**{field: value})


def test_parameters_of_other_ranks_are_refused_and_the_defaults_pass():
    class Odd(nn.Module):
        def __init__(self, dims):
            super().__init__()
            self.x = nn.Parameter(torch.zeros(*dims))

    cfg = la.LoRAConfig(r=1)
    for dims in [(4,), (2, 2, 2, 2)]:
        with pytest.raises(la.AdapterConfigError, match=rf"selects 'm.x', a {len(dims)}-D parameter"):
            LoRAParamLayer(Odd(dims), ["x"], cfg, "m", lora_scale)
    layer = LoRAParamLayer(Odd((3, 2)), ["x"], cfg, "m", lora_scale)
    assert layer.names == ["x"] and layer.merged is False


def test_a_config_without_a_lora_bias_field_is_accepted():
    cfg = la.LoRAConfig(r=2, alpha=4.0)
    duck = SimpleNamespace(**{k: getattr(cfg, k) for k in ("dropout", "use_dora", "init_weights", "use_rslora")})
    duck.rank_for, duck.alpha_for = cfg.rank_for, cfg.alpha_for
    layer = LoRAParamLayer(Block(), ["w"], duck, "block", lora_scale)
    assert layer.scales == {"w": 2.0} and tuple(layer.lora_A["w"].shape) == (6, 4)


# --- merge, unmerge, state -------------------------------------------------------------------------------------


@pytest.mark.parametrize("transposed", [False, True])
def test_merge_and_unmerge_add_and_remove_exactly_the_closed_form(transposed):
    model = _inject(transposed=transposed)
    layer = model.block.adapter.default
    _randomize(layer)
    shapes = {"w": (3, 5, 4), "p": (6, 4), "v": (2, 4, 7)}
    base = {n: getattr(model.block, n).detach().clone() for n in shapes}
    deltas = {
        n: _delta(layer.lora_A[n].detach(), layer.lora_B[n].detach(), s, 2, 3.0, transposed and len(s) == 3)
        for n, s in shapes.items()
    }
    params = {n: getattr(model.block, n) for n in shapes}
    layer.merge(model.block)
    assert layer.merged is True
    for n in shapes:
        assert getattr(model.block, n) is params[n]  # written in place
        torch.testing.assert_close(params[n].detach(), base[n] + deltas[n], rtol=1e-12, atol=1e-12)
    layer.unmerge(model.block)
    assert layer.merged is False
    for n in shapes:
        torch.testing.assert_close(params[n].detach(), base[n], rtol=1e-12, atol=1e-12)
    assert layer.base_weights(model.block) == params
    assert layer.extra_repr() == "parameters=['w', 'p', 'v'], merged=False"


def test_half_base_merges_in_float32_and_rounds_once():
    model = _inject(dtype=torch.bfloat16)
    layer = model.block.adapter.default
    _randomize(layer)
    shapes = {"w": (3, 5, 4), "p": (6, 4), "v": (2, 4, 7)}
    base = {n: getattr(model.block, n).detach().clone() for n in shapes}
    d = {n: _delta(layer.lora_A[n].detach(), layer.lora_B[n].detach(), s, 2, 3.0, False) for n, s in shapes.items()}
    layer.merge(model.block)
    for n in shapes:
        assert getattr(model.block, n).dtype == torch.bfloat16
        assert torch.equal(getattr(model.block, n).detach(), (base[n].float() + d[n]).to(torch.bfloat16)), n
    merged = {n: getattr(model.block, n).detach().clone() for n in shapes}
    layer.unmerge(model.block)
    for n in shapes:
        assert torch.equal(getattr(model.block, n).detach(), (merged[n].float() - d[n]).to(torch.bfloat16)), n


def test_a_float64_adapter_on_a_float32_base_merges_in_float32():
    # ΔW is rounded to the base's compute dtype first, then added there: one rounding of each
    model = _inject(dtype=torch.float32)
    layer = model.block.adapter.default.double()
    _randomize(layer)
    shapes = {"w": (3, 5, 4), "p": (6, 4), "v": (2, 4, 7)}
    base = {n: getattr(model.block, n).detach().clone() for n in shapes}
    d = {
        n: _delta(layer.lora_A[n].detach(), layer.lora_B[n].detach(), s, 2, 3.0, False).float()
        for n, s in shapes.items()
    }
    layer.merge(model.block)
    for n in shapes:
        assert getattr(model.block, n).dtype == torch.float32
        assert torch.equal(getattr(model.block, n).detach(), base[n] + d[n]), n
    merged = {n: getattr(model.block, n).detach().clone() for n in shapes}
    layer.unmerge(model.block)
    for n in shapes:
        assert torch.equal(getattr(model.block, n).detach(), merged[n] - d[n]), n


def test_safe_merge_checks_every_parameter_before_writing_any():
    model = _inject()
    layer = model.block.adapter.default
    _randomize(layer)
    with torch.no_grad():
        layer.lora_B["v"][0, 0] = float("inf")  # only the last parameter's ΔW is bad
    before = {n: getattr(model.block, n).detach().clone() for n in "wpv"}
    with pytest.raises(la.MergeError, match=r"merged v has"):
        layer.merge(model.block, safe=True)
    assert layer.merged is False
    assert all(torch.equal(getattr(model.block, n), before[n]) for n in "wpv")
    layer.merge(model.block)  # unsafe: written, inf included
    assert layer.merged is True and torch.isinf(model.block.v).any()


def test_safe_merge_checks_the_float16_values_not_the_float32_sums():
    model = _inject(dtype=torch.float16)
    layer = model.block.adapter.default
    with torch.no_grad():
        layer.lora_A["p"][0, 0] = 7e4 / 3.0  # ΔW[0, 0] = 7e4: finite in float32, inf in float16
        layer.lora_B["p"][0, 0] = 1.0
    before = {n: getattr(model.block, n).detach().clone() for n in "wpv"}
    with pytest.raises(la.MergeError, match=r"^merged p has 1 non-finite values \(NaN or Inf\) in float16"):
        layer.merge(model.block, safe=True)
    assert all(torch.equal(getattr(model.block, n), before[n]) for n in "wpv")


def test_peft_keys_nest_in_parameter_order_and_load_back():
    model = _inject()
    layer = model.block.adapter.default
    _randomize(layer)
    state = layer.peft_state()
    want = {
        "base_layer.base_layer.lora_A.weight": layer.lora_A["w"],
        "base_layer.base_layer.lora_B.weight": layer.lora_B["w"],
        "base_layer.lora_A.weight": layer.lora_A["p"],
        "base_layer.lora_B.weight": layer.lora_B["p"],
        "lora_A.weight": layer.lora_A["v"],
        "lora_B.weight": layer.lora_B["v"],
    }
    assert list(state) == list(want)
    for k, p in want.items():
        assert not state[k].requires_grad and state[k].data_ptr() == p.data_ptr(), k
    saved = {k: v.clone() for k, v in state.items()}
    other = _inject()
    olayer = other.block.adapter.default
    # a partial state loads what it holds and leaves the rest; float32 values land in the float64 factors
    partial = {k: saved[k].float() for k in ("base_layer.lora_B.weight", "lora_A.weight")}
    untouched = {k: v.detach().clone() for k, v in olayer.peft_state().items()}
    olayer.load_peft_state(partial)
    now = olayer.peft_state()
    for k in want:
        expect = saved[k].float().double() if k in partial else untouched[k]
        assert now[k].dtype == torch.float64 and torch.equal(now[k], expect), k
    olayer.load_peft_state(saved)
    assert all(torch.equal(olayer.peft_state()[k], saved[k]) for k in saved)


# --- selection and validation ------------------------------------------------------------------------------------


def _cfg(*targets: str) -> la.LoRAConfig:
    """Set after construction: the config itself wants "<module>.<parameter>" entries."""
    c = la.LoRAConfig(r=1)
    c.target_parameters = list(targets) or None
    return c


def test_param_layers_selects_by_exact_name_or_dotted_suffix():
    class Inner(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(2, 3, 4))
            self.bw = nn.Parameter(torch.randn(3, 4))
            self.u = nn.Parameter(torch.randn(5, 4))

    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = Inner()
            self.b = nn.ModuleDict({"a": Inner()})
            self.lin = nn.Linear(2, 2)

    model = Outer()
    layers = param_layers(model, _cfg("a.w", "b.a.u", "bw"), ["lin"], lora_scale)
    # "a.w" matches a.w and b.a.w (suffix after a dot); "bw" matches every bw but not "w"; order = parameter order
    assert {k: v.names for k, v in layers.items()} == {"a": ["w", "bw"], "b.a": ["w", "bw", "u"]}
    assert all(type(v) is LoRAParamLayer for v in layers.values())
    assert param_layers(model, _cfg(), ["lin"], lora_scale) == {}
    assert {k: v.names for k, v in param_layers(model, _cfg("w"), [], lora_scale).items()} == {"a": ["w"], "b.a": ["w"]}
    with pytest.raises(la.TargetError, match=r"target_parameters \['x.w', 'a.u.w'\] match no parameter"):
        param_layers(model, _cfg("x.w", "a.w", "a.u.w"), [], lora_scale)
    with pytest.raises(la.TargetError, match=r"target_parameters \['a.bw2'\] match no parameter"):
        param_layers(model, _cfg("a.w", "a.bw2"), [], lora_scale)
    with pytest.raises(la.TargetError, match=r"selects \['w'\] of 'a', which is also in target_modules"):
        param_layers(model, _cfg("a.w"), ["lin", "a"], lora_scale)
    assert set(param_layers(model, _cfg("b.a.w"), ["a"], lora_scale)) == {"b.a"}


def test_a_top_level_parameter_is_refused():
    model = Block()
    with pytest.raises(la.TargetError, match=r"selects \['w'\] of 'the top-level module', which cannot carry"):
        param_layers(model, _cfg("w"), [], lora_scale)


@pytest.mark.parametrize("value", [None, ["a.b"], ("a.b", "x.y.z")])
def test_check_target_parameters_accepts(value):
    assert check_target_parameters(value) is None


@pytest.mark.parametrize("value", ["a.b", [], (), ["a.b", "ab"], [".ab"], ["a.b", 3], {"a.b"}, 5])
def test_check_target_parameters_refuses(value):
    with pytest.raises(la.AdapterConfigError, match=r"must be a non-empty list of '<module>.<parameter>' names"):
        check_target_parameters(value)


def test_forward_passes_keyword_arguments_to_the_module():
    model = _inject()
    _randomize(next(iter(model.block.adapter.values())))
    t = torch.tensor(2.0, dtype=torch.float64)
    by_name, by_position = model.block(t=t), model.block(t)
    assert all(torch.equal(a, b) for a, b in zip(by_name, by_position, strict=True))
