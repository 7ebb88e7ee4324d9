"""What LoHa and LoKr share: bad-input errors, dropout semantics, Conv1D, half-precision bases, trainable bases."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightning_adapters as la
from lightning_adapters.methods.loha import LoHaConfig, LoHaLayer
from lightning_adapters.methods.lokr import LoKrConfig, LoKrLayer
from tests.helpers import LAYERS, Wrap, randomize_adapter, tiny_gpt2, tiny_llama, token_batch

CONFIGS = {"loha": LoHaConfig, "lokr": LoKrConfig}
LAYER_CLS = {"loha": LoHaLayer, "lokr": LoKrLayer}
# The switch between a layer's two Linear forms (rank-r² / Kronecker path vs folding into the weight).
PATH_SWITCH = {"loha": "_rank_r2_is_cheaper", "lokr": "_kron_is_cheaper"}


def _adapted(method: str, layer: str = "linear", seed: int = 0, **kw):
    torch.manual_seed(seed)
    model = Wrap(LAYERS[layer].make()).eval()
    la.inject(model, CONFIGS[method](target_modules=["layer"], **{"r": 2, "alpha": 3, **kw}))
    randomize_adapter(model, std=0.3, seed=seed)
    return model, LAYERS[layer].make_input()


@pytest.mark.parametrize("method", list(CONFIGS))
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("r", 0),
        ("r", -2),
        ("r", 2.5),
        ("alpha", 0),
        ("alpha", -1.0),
        ("alpha", float("nan")),
        ("rank_dropout", 1.0),
        ("rank_dropout", -0.1),
        ("module_dropout", 1.5),
        ("use_effective_conv2d", "yes"),
        ("init_weights", "gaussian"),
        ("rank_pattern", {"q_proj": 0}),
        ("alpha_pattern", {"q_proj": -2.0}),
    ],
)
def test_bad_values_raise_naming_the_field(method, field, value):
    with pytest.raises(la.AdapterConfigError) as err:
        CONFIGS[method](target_modules=["layer"], **{field: value})
    assert method in str(err.value) and field in str(err.value)


@pytest.mark.parametrize("method", list(CONFIGS))
@pytest.mark.parametrize("layer", [nn.Embedding(10, 4), nn.Conv3d(2, 4, 3)])
def test_unsupported_layer_raises_and_changes_nothing(method, layer):
    model = Wrap(layer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(la.UnsupportedLayerError, match=type(layer).__name__):
        la.inject(model, CONFIGS[method](target_modules=["layer"]))
    assert type(model.layer) is type(layer)
    assert {k: v for k, v in model.state_dict().items()}.keys() == before.keys()
    assert all(p.requires_grad for p in model.parameters())


def _delta_out(model, x):
    with la.disabled(model):
        base = model(x)
    return model(x) - base


@pytest.mark.parametrize(
    ("method", "kw", "rescaled"),
    [
        ("loha", {}, True),
        ("lokr", {}, False),
        ("lokr", {"rank_dropout_scale": True}, True),
    ],
)
@pytest.mark.parametrize("path", [True, False])
def test_rank_dropout_drops_output_rows(monkeypatch, method, kw, rescaled, path):
    """Training output = eval output with row o of ΔW times keep_o (/ mean(keep) when rescaled), keep ~ rand > p."""
    monkeypatch.setattr(LAYER_CLS[method], PATH_SWITCH[method], lambda self, *a: path)
    model, x = _adapted(method, rank_dropout=0.5, **kw)
    with torch.no_grad():
        eval_delta = _delta_out(model, x)
        model.train()
        torch.manual_seed(3)
        torch.rand(1)  # PEFT's module-dropout draw comes first, also at module_dropout=0
        keep = (torch.rand(20) > 0.5).float()
        mult = keep / keep.mean() if rescaled else keep
        torch.manual_seed(3)
        train_delta = _delta_out(model, x)
    assert 0 < keep.sum() < 20
    assert torch.allclose(train_delta, eval_delta * mult, atol=1e-5)


@pytest.mark.parametrize("method", list(CONFIGS))
def test_module_dropout_skips_the_adapter_on_a_uniform_draw(method):
    model, x = _adapted(method, module_dropout=0.5)
    with torch.no_grad(), la.disabled(model):
        base = model(x)
    with torch.no_grad():
        adapted = model(x)
        model.train()
        skipped = []
        for seed in range(8):
            torch.manual_seed(seed)
            skip = bool(torch.rand(1) <= 0.5)
            torch.manual_seed(seed)
            y = model(x)
            assert torch.equal(y, base) if skip else torch.allclose(y, adapted, atol=1e-6)
            skipped.append(skip)
        model.eval()
        assert torch.allclose(model(x), adapted)
    assert any(skipped) and not all(skipped)


@pytest.mark.parametrize("method", list(CONFIGS))
@pytest.mark.parametrize("path", [True, False])
def test_conv1d_t_equals_the_linear_with_the_same_factors(monkeypatch, method, path):
    """Conv1D (weight (in, out)) adapted = nn.Linear (weight (out, in)) adapted with the same factors."""
    monkeypatch.setattr(LAYER_CLS[method], PATH_SWITCH[method], lambda self, *a: path)
    conv_model, x = _adapted(method, "conv1d_t", r=1)
    conv = conv_model.layer
    lin = nn.Linear(24, 36)
    with torch.no_grad():
        lin.weight.copy_(conv.weight.t())
        lin.bias.copy_(conv.bias)
    lin_model = la.inject(Wrap(lin), CONFIGS[method](target_modules=["layer"], r=1, alpha=3))
    la.load_adapter_state_dict(lin_model, la.adapter_state_dict(conv_model))
    x = x.requires_grad_()
    y_conv, y_lin = conv_model(x), lin_model(x)
    assert torch.allclose(y_conv, y_lin, atol=1e-5)
    g = torch.randn_like(y_conv)
    gx_conv, *g_conv = torch.autograd.grad(y_conv, [x, *conv_model.layer.adapter.default.parameters()], g)
    gx_lin, *g_lin = torch.autograd.grad(y_lin, [x, *lin_model.layer.adapter.default.parameters()], g)
    assert torch.allclose(gx_conv, gx_lin, atol=1e-5)
    for a, b in zip(g_conv, g_lin):
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("method", list(CONFIGS))
def test_gpt2_c_attn_saves_linear_layout_and_round_trips(method, tmp_path):
    from safetensors.torch import load_file

    torch.manual_seed(0)
    base = tiny_gpt2()
    x = token_batch(128)
    model = la.inject(copy.deepcopy(base), CONFIGS[method](r=2, alpha=4, target_modules=["c_attn", "c_proj"]))
    randomize_adapter(model, std=0.3)
    expected = model(x).logits
    la.save_peft(model, tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    lin = la.inject(
        nn.Sequential(nn.Linear(64, 192)), CONFIGS[method](r=2, alpha=4, target_modules=["0"])
    )  # c_attn as a Linear: in 64, out 192
    lin_shapes = {k.rpartition(".")[2]: tuple(v.shape) for k, v in la.adapter_state_dict(lin).items()}
    c_attn = {k.rpartition(".")[2]: tuple(v.shape) for k, v in tensors.items() if ".0.attn.c_attn." in k}
    assert c_attn == lin_shapes
    again = la.load_peft(copy.deepcopy(base), tmp_path)
    assert torch.allclose(again(x).logits, expected, atol=1e-5)


@pytest.mark.parametrize("method", list(CONFIGS))
@pytest.mark.parametrize("layer", ["linear", "conv1d_t", "conv2d"])
@pytest.mark.parametrize("path", [True, False])
def test_trainable_base_gets_the_autograd_gradient(monkeypatch, method, layer, path):
    """With the base weight unfrozen, W, b and x gradients equal those of op(x, W + ΔW) + b under autograd."""
    monkeypatch.setattr(LAYER_CLS[method], PATH_SWITCH[method], lambda self, *a: path)
    model, x = _adapted(method, layer)
    mod = model.layer
    mod.weight.requires_grad_(True)
    mod.bias.requires_grad_(True)
    x = x.requires_grad_()
    params = [x, mod.weight, mod.bias, *mod.adapter.default.parameters()]
    y = model(x)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, params, g)
    dw = mod.adapter.default.delta_weight()
    if layer == "conv2d":
        ref = F.conv2d(x, mod.weight + dw, mod.bias, padding=1)
    elif layer == "conv1d_t":
        ref = x @ (mod.weight + dw) + mod.bias
    else:
        ref = F.linear(x, mod.weight + dw, mod.bias)
    assert torch.allclose(y, ref, atol=1e-5)
    expected = torch.autograd.grad(ref, params, g)
    for a, b in zip(got, expected):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", list(CONFIGS))
@pytest.mark.parametrize("layer", ["linear", "conv1d_t", "conv2d"])
def test_bf16_base_keeps_fp32_adapters(method, layer):
    model, x = _adapted(method, layer)
    ref = model(x)
    model.to(torch.bfloat16)
    la.apply_dtype_policy(model)
    assert all(p.dtype == torch.float32 for p in model.layer.adapter.default.parameters())
    y = model(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    assert torch.allclose(y.float(), ref, atol=0.05, rtol=0.05)
    y.float().pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.layer.adapter.default.parameters())


@pytest.mark.parametrize("method", list(CONFIGS))
def test_peft_layer_selection_options_are_read(method):
    spec = la.get_method(method)
    d = {"peft_type": spec.peft_type, "r": 2, "layers_to_transform": [0], "layers_pattern": "layers"}
    cfg = spec.config_from_peft({**d, "target_modules": ["q_proj"]})
    assert (cfg.layers_to_transform, cfg.layers_pattern) == ([0], "layers")
    assert spec.config_to_peft(cfg)["layers_to_transform"] == [0]


@pytest.mark.parametrize(
    ("method", "kw", "count"),
    [
        ("loha", dict(r=4, alpha=8), 3584),
        ("lokr", dict(r=4, alpha=8), 448),
        ("lokr", dict(r=2, alpha=8, decompose_both=True), 240),
        ("lokr", dict(r=4, alpha=8, init_weights="lycoris"), 448),
    ],
)
def test_trainable_counts_on_tiny_llama_match_peft(method, kw, count):
    """METHODS.md §0's table (PEFT 0.21, tiny Llama, q_proj and v_proj targeted)."""
    model = la.inject(tiny_llama(), CONFIGS[method](target_modules=["q_proj", "v_proj"], **kw))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == count
