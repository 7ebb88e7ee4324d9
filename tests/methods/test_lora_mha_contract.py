"""``methods/lora_mha.py`` pinned against closed-form maths: LoRA on ``nn.MultiheadAttention``.

The adapted module must compute exactly as a plain ``nn.MultiheadAttention`` holding ``W_in + s·B·A`` and
``W_out + 2s·B_o·A_o`` (PEFT 0.21.2's doubled output projection), while the factors get the gradients of
``s·B·A`` and ``s·B_o·A_o``: ``∂A = s·Bᵀ·G``, ``∂B = s·G·Aᵀ`` for ``G`` the gradient of the weight. Every
expectation is written here: the reference module, the init draws replayed from the seed, merge/unmerge in the
base dtype, the PEFT keys, and the refusals with the exact values at their limits.
"""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import lightning_adapters as la
from lightning_adapters.methods._common import RANK_LIMIT_FACTOR
from lightning_adapters.methods.lora import lora_scale
from lightning_adapters.methods.lora_mha import LoRAMultiheadAttentionLayer

E = 4  # embed_dim; 2 heads


class Net(nn.Module):
    def __init__(self, dtype: torch.dtype = torch.float64, **kw) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.attn = nn.MultiheadAttention(E, 2, batch_first=True, dtype=dtype, **kw)
        with torch.no_grad():
            self.attn.in_proj_bias.normal_()
            self.attn.out_proj.bias.normal_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x, need_weights=False)[0]


def _x(dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(2, 3, E, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)


def _inject(dtype=torch.float64, seed=None, **kw):
    model = Net(dtype)
    if seed is not None:
        torch.manual_seed(seed)
    kw = {"r": 2, "alpha": 3.0, **kw}
    return la.inject(model, la.LoRAConfig(target_modules=["attn"], **kw))


def _randomize(layer: LoRAMultiheadAttentionLayer, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (layer.lora_A, layer.lora_B, layer.out_lora_A, layer.out_lora_B):
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))


def _factors(layer):
    return [p.detach().clone() for p in (layer.lora_A, layer.lora_B, layer.out_lora_A, layer.out_lora_B)]


# --- forward and gradients ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("rslora", "scale"), [(False, 1.5), (True, 3.0 / math.sqrt(2))])
def test_forward_and_gradients_equal_a_plain_mha_with_the_closed_form_weights(rslora, scale):
    base = Net()
    model = _inject(use_rslora=rslora)
    layer = model.attn.adapter.default
    assert layer.scale == scale and (layer.r, layer.alpha) == (2, 3.0)
    assert (layer.kind, layer.name, layer.use_dora, layer.merged) == ("mha", "attn", False, False)
    _randomize(layer)
    A, B, Ao, Bo = _factors(layer)
    w_in, w_out = model.attn.in_proj_weight, model.attn.out_proj.weight
    # the reference: a plain MHA holding the adapted weights as leaves
    ref = copy.deepcopy(base.attn)
    with torch.no_grad():
        ref.in_proj_weight.copy_(base.attn.in_proj_weight + scale * B @ A)
        ref.out_proj.weight.copy_(base.attn.out_proj.weight + 2 * scale * Bo @ Ao)
    x, xr = _x().requires_grad_(), _x().requires_grad_()
    g = torch.randn(2, 3, E, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    y = model(x)
    yr = ref(xr, xr, xr, need_weights=False)[0]
    torch.testing.assert_close(y, yr, rtol=1e-12, atol=1e-12)
    (y * g).sum().backward()
    (yr * g).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-12, atol=1e-12)
    G_in, G_out = ref.in_proj_weight.grad, ref.out_proj.weight.grad
    for p, want in [
        (layer.lora_A, scale * B.t() @ G_in),
        (layer.lora_B, scale * G_in @ A.t()),
        (layer.out_lora_A, scale * Bo.t() @ G_out),  # the gradient of s·B_o·A_o, not of 2s·B_o·A_o
        (layer.out_lora_B, scale * G_out @ Ao.t()),
    ]:
        torch.testing.assert_close(p.grad, want, rtol=1e-10, atol=1e-12)
    # the base parameters are back in place, frozen, unchanged and without gradient
    assert model.attn._parameters["in_proj_weight"] is w_in and model.attn.out_proj._parameters["weight"] is w_out
    assert isinstance(w_in, nn.Parameter) and isinstance(w_out, nn.Parameter)
    assert w_in.grad is None and w_out.grad is None
    assert torch.equal(w_in, base.attn.in_proj_weight) and torch.equal(w_out, base.attn.out_proj.weight)
    assert layer.base_weights(model.attn) == {"in_proj_weight": w_in, "out_proj.weight": w_out}
    assert layer.extra_repr() == f"mha in_proj + out_proj, r=2, scale={scale:g}, merged=False"


def test_rank_and_alpha_patterns_apply_by_module_name():
    model = _inject(rank_pattern={"attn": 3}, alpha_pattern={"attn": 6.0})
    layer = model.attn.adapter.default
    assert (layer.r, layer.alpha, layer.scale) == (3, 6.0, 2.0)
    shapes = [tuple(p.shape) for p in (layer.lora_A, layer.lora_B, layer.out_lora_A, layer.out_lora_B)]
    assert shapes == [(3, E), (3 * E, 3), (3, E), (E, 3)]


def test_forward_restores_both_weights_when_the_module_raises():
    model = _inject()
    w_in, w_out = model.attn.in_proj_weight, model.attn.out_proj.weight
    with pytest.raises((RuntimeError, AssertionError)):
        model(torch.randn(2, 3, E + 1, dtype=torch.float64))
    assert model.attn._parameters["in_proj_weight"] is w_in and model.attn.out_proj._parameters["weight"] is w_out


def test_half_base_adds_the_deltas_in_the_base_dtype():
    model = _inject(dtype=torch.bfloat16)
    layer = model.attn.adapter.default
    assert {p.dtype for p in (layer.lora_A, layer.lora_B, layer.out_lora_A, layer.out_lora_B)} == {torch.float32}
    _randomize(layer)
    A, B, Ao, Bo = _factors(layer)
    ref = copy.deepcopy(Net(torch.bfloat16).attn)
    with torch.no_grad():
        d_out = (1.5 * Bo @ Ao).to(torch.bfloat16)
        ref.in_proj_weight.copy_(ref.in_proj_weight + (1.5 * B @ A).to(torch.bfloat16))
        ref.out_proj.weight.copy_(ref.out_proj.weight + d_out + d_out)
        x = _x(torch.bfloat16)
        assert torch.equal(model(x), ref(x, x, x, need_weights=False)[0])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_factors_take_the_working_dtype_and_device(dtype):
    layer = _inject(dtype=dtype).attn.adapter.default
    assert {p.dtype for p in layer.parameters()} == {dtype}
    with torch.device("meta"):
        mha = nn.MultiheadAttention(E, 2, dtype=torch.float64)
    layer = LoRAMultiheadAttentionLayer(mha, la.LoRAConfig(r=2), "m", lora_scale)
    params = (layer.lora_A, layer.lora_B, layer.out_lora_A, layer.out_lora_B)
    assert [(p.device.type, p.dtype) for p in params] == [("meta", torch.float64)] * 4


# --- init ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [True, False, "gaussian", "eva"])
def test_init_draws_replayed_from_the_seed(mode):
    model = _inject(seed=7, r=3, init_weights=mode)
    layer = model.attn.adapter.default
    torch.manual_seed(7)
    want = []
    for shape_a, shape_b in (((3, E), (3 * E, 3)), ((3, E), (E, 3))):
        a, b = torch.empty(shape_a, dtype=torch.float64), torch.zeros(shape_b, dtype=torch.float64)
        if mode == "gaussian":
            nn.init.normal_(a, std=1.0 / 3)
        else:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        if mode is False:
            nn.init.kaiming_uniform_(b, a=math.sqrt(5))
        want += [a, b]
    for got, w in zip(_factors(layer), want):
        assert torch.equal(got, w)
    if mode is not False:  # B = 0: the adapted module starts as the base
        assert torch.equal(model(_x()), Net()(_x()))


# --- refusals --------------------------------------------------------------------------------------------------------


def test_rank_limit_is_sixteen_times_the_packed_projection():
    limit = RANK_LIMIT_FACTOR * 3 * E
    layer = LoRAMultiheadAttentionLayer(Net().attn, la.LoRAConfig(r=limit), "attn", lora_scale)
    assert layer.lora_B.shape == (3 * E, limit)
    with pytest.raises(
        la.AdapterConfigError, match=rf"^lora: r={limit + 1} on 'attn' is far above the layer's dimensions \(4, 12\)"
    ):
        LoRAMultiheadAttentionLayer(Net().attn, la.LoRAConfig(r=limit + 1), "attn", lora_scale)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"use_dora": True}, r"use_dora=True on the nn.MultiheadAttention 'm'"),
        ({"lora_bias": True}, r"lora_bias=True on the nn.MultiheadAttention 'm'"),
        ({"init_weights": "pissa"}, r"init_weights='pissa' is not available on the nn.MultiheadAttention 'm'"),
        ({"init_weights": "olora"}, r"init_weights='olora' is not available"),
        ({"init_weights": "orthogonal"}, r"init_weights='orthogonal' is not available"),
        ({"init_weights": "pissa_niter_2"}, r"init_weights='pissa_niter_2' is not available"),
    ],
)
def test_options_mha_cannot_take_are_refused(kw, message):
    with pytest.raises(la.AdapterConfigError, match=message):
        LoRAMultiheadAttentionLayer(Net().attn, la.LoRAConfig(r=2, **kw), "m", lora_scale)


def test_separate_kdim_vdim_is_refused():
    mha = nn.MultiheadAttention(E, 2, kdim=3, vdim=5)
    with pytest.raises(la.AdapterConfigError, match=r"'m' has kdim/vdim different from embed_dim"):
        LoRAMultiheadAttentionLayer(mha, la.LoRAConfig(r=2), "m", lora_scale)


def test_a_config_without_a_lora_bias_field_is_accepted():
    cfg = la.LoRAConfig(r=2, alpha=4.0)
    duck = SimpleNamespace(**{k: getattr(cfg, k) for k in ("use_dora", "init_weights", "use_rslora")})
    duck.rank_for, duck.alpha_for = cfg.rank_for, cfg.alpha_for
    layer = LoRAMultiheadAttentionLayer(Net().attn, duck, "attn", lora_scale)
    assert (layer.r, layer.scale) == (2, 2.0)


# --- merge, unmerge, state -------------------------------------------------------------------------------------------


def test_merge_adds_s_and_2s_and_unmerge_removes_them():
    model = _inject()
    layer = model.attn.adapter.default
    _randomize(layer)
    A, B, Ao, Bo = _factors(layer)
    w_in, w_out = model.attn.in_proj_weight, model.attn.out_proj.weight
    b_in, b_out = w_in.detach().clone(), w_out.detach().clone()
    layer.merge(model.attn)
    assert layer.merged is True
    assert model.attn.in_proj_weight is w_in and model.attn.out_proj.weight is w_out
    torch.testing.assert_close(w_in.detach(), b_in + 1.5 * B @ A, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(w_out.detach(), b_out + 3.0 * Bo @ Ao, rtol=1e-12, atol=1e-12)
    layer.unmerge(model.attn)
    assert layer.merged is False
    torch.testing.assert_close(w_in.detach(), b_in, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(w_out.detach(), b_out, rtol=1e-12, atol=1e-12)


def test_half_base_merges_in_float32_and_rounds_once():
    model = _inject(dtype=torch.bfloat16)
    layer = model.attn.adapter.default
    _randomize(layer)
    A, B, Ao, Bo = (t.float() for t in _factors(layer))
    w_in, w_out = model.attn.in_proj_weight, model.attn.out_proj.weight
    b_in, b_out = w_in.detach().clone(), w_out.detach().clone()
    d_in, d_out = (B @ A) * 1.5, (Bo @ Ao) * 1.5
    layer.merge(model.attn)
    assert w_in.dtype == w_out.dtype == torch.bfloat16
    assert torch.equal(w_in.detach(), (b_in.float() + d_in).to(torch.bfloat16))
    assert torch.equal(w_out.detach(), (b_out.float() + 2 * d_out).to(torch.bfloat16))
    m_in, m_out = w_in.detach().clone(), w_out.detach().clone()
    layer.unmerge(model.attn)
    assert torch.equal(w_in.detach(), (m_in.float() - d_in).to(torch.bfloat16))
    assert torch.equal(w_out.detach(), (m_out.float() - 2 * d_out).to(torch.bfloat16))


def test_a_float64_adapter_on_a_float32_base_merges_in_float32():
    # each ΔW is rounded to the base's compute dtype first, then added there (the output one twice)
    model = _inject(dtype=torch.float32)
    layer = model.attn.adapter.default.double()
    _randomize(layer)
    A, B, Ao, Bo = _factors(layer)
    w_in, w_out = model.attn.in_proj_weight, model.attn.out_proj.weight
    b_in, b_out = w_in.detach().clone(), w_out.detach().clone()
    d_in, d_out = ((B @ A) * 1.5).float(), ((Bo @ Ao) * 1.5).float()
    layer.merge(model.attn)
    assert w_in.dtype == w_out.dtype == torch.float32
    assert torch.equal(w_in.detach(), b_in + d_in)
    assert torch.equal(w_out.detach(), b_out + 2 * d_out)
    m_in, m_out = w_in.detach().clone(), w_out.detach().clone()
    layer.unmerge(model.attn)
    assert torch.equal(w_in.detach(), m_in - d_in)
    assert torch.equal(w_out.detach(), m_out - 2 * d_out)


@pytest.mark.parametrize(("factor", "what"), [("lora_B", "in_proj_weight"), ("out_lora_B", "out_proj.weight")])
def test_safe_merge_checks_both_weights_before_writing_either(factor, what):
    model = _inject()
    layer = model.attn.adapter.default
    _randomize(layer)
    with torch.no_grad():
        getattr(layer, factor)[0, 0] = float("inf")
    b_in, b_out = model.attn.in_proj_weight.detach().clone(), model.attn.out_proj.weight.detach().clone()
    with pytest.raises(la.MergeError, match=rf"^merged {what} has {E} non-finite"):
        layer.merge(model.attn, safe=True)
    assert layer.merged is False
    assert torch.equal(model.attn.in_proj_weight, b_in) and torch.equal(model.attn.out_proj.weight, b_out)
    layer.merge(model.attn)  # unsafe: written, inf included
    weights = {"in_proj_weight": model.attn.in_proj_weight, "out_proj.weight": model.attn.out_proj.weight}
    assert layer.merged is True and int(torch.isinf(weights[what]).sum()) == E


@pytest.mark.parametrize(
    ("factor", "what", "value"), [("", "in_proj_weight", 7e4 / 1.5), ("out_", "out_proj.weight", 7e4 / 3)]
)
def test_safe_merge_checks_the_float16_values_not_the_float32_sums(factor, what, value):
    model = _inject(dtype=torch.float16)
    layer = model.attn.adapter.default
    with torch.no_grad():  # ΔW[0, 0] = 7e4: finite in float32, inf in float16
        getattr(layer, f"{factor}lora_A")[0, 0] = value
        getattr(layer, f"{factor}lora_B")[0, 0] = 1.0
    b_in, b_out = model.attn.in_proj_weight.detach().clone(), model.attn.out_proj.weight.detach().clone()
    with pytest.raises(la.MergeError, match=rf"^merged {what} has 1 non-finite values \(NaN or Inf\) in float16"):
        layer.merge(model.attn, safe=True)
    assert torch.equal(model.attn.in_proj_weight, b_in) and torch.equal(model.attn.out_proj.weight, b_out)


def test_peft_keys_and_load_back():
    model = _inject()
    layer = model.attn.adapter.default
    _randomize(layer)
    state = layer.peft_state()
    want = {
        "lora_A.weight": layer.lora_A,
        "lora_B.weight": layer.lora_B,
        "base_layer.out_proj.lora_A.weight": layer.out_lora_A,
        "base_layer.out_proj.lora_B.weight": layer.out_lora_B,
    }
    assert list(state) == list(want)
    for k, p in want.items():
        assert not state[k].requires_grad and state[k].data_ptr() == p.data_ptr(), k
    saved = {k: v.clone() for k, v in state.items()}
    other = _inject().attn.adapter.default
    before = {k: v.clone() for k, v in other.peft_state().items()}
    partial = {"base_layer.out_proj.lora_A.weight": saved["base_layer.out_proj.lora_A.weight"].float()}
    other.load_peft_state(partial)
    for k in want:
        expect = saved[k].float().double() if k in partial else before[k]
        assert other.peft_state()[k].dtype == torch.float64 and torch.equal(other.peft_state()[k], expect), k
    other.load_peft_state(saved)
    assert all(torch.equal(other.peft_state()[k], saved[k]) for k in saved)
    with pytest.raises(KeyError):
        other.load_peft_state({"out_proj.lora_A.weight": saved["lora_A.weight"]})
