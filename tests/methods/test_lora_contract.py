"""LoRA's layer and config pinned function by function against independent truths: closed-form maths written here,
PEFT 0.21's own layers and configs, and round trips. Each block was reached by surviving mutants of
``lightning_adapters/methods/lora.py`` (docs/MUTATION.md): the scaled-embedding factor, the embedding lookup's
gradient options, PEFT's ungrouped ``lora_A`` with a non-zero padding mode, the init draws, EVA's fallback init,
``set_rank``'s device, the PEFT state of ``lora_bias`` and of a two-group conv, the config translations and the
refusals' wording.
"""

from __future__ import annotations

import copy
import math
import types

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers.models.bart.modeling_bart import BartScaledWordEmbedding

import lightning_adapters as la
from lightning_adapters.methods import lora as lora_method
from lightning_adapters.methods.lora import embed_scale, grouped_to_dense_A
from tests.helpers import Wrap

# ------------------------------------------------------------------------------------------------------------
# Embeddings: embed_scale, the scaled term, the lookup's padding_idx and scale_grad_by_freq


@pytest.mark.parametrize(
    "value, want",
    [
        ("absent", None),
        (True, None),  # a bool is not a scale
        ("2.0", None),
        (None, None),
        (3, 3),
        (2.5, 2.5),
        (torch.tensor(1.5), torch.tensor(1.5)),
        (torch.tensor([1.5]), torch.tensor([1.5])),  # one element
        (torch.tensor([1.5, 2.0]), None),  # not one number
    ],
)
def test_embed_scale_is_the_one_number_the_embedding_multiplies_by(value, want):
    base = nn.Embedding(4, 3)
    if value != "absent":
        base.embed_scale = value
    got = embed_scale(base)
    if want is None:
        assert got is None
    elif isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor) and torch.equal(got, want)
    else:
        assert got == want and type(got) is type(want)


@pytest.mark.parametrize("scale", [2.5, torch.tensor(2.5)])
def test_scaled_embedding_lora_term_is_scaled_like_the_lookup(scale):
    """transformers' ``*ScaledWordEmbedding`` returns ``E[x]·c``; LoRA on it is ``c·(E[x] + s·Aᵀ[x]·Bᵀ)`` (so that
    merging ``E + ΔW`` agrees). By hand with c = 2.5, s = alpha / r = 5 / 2; gradients of A and B by hand too."""
    torch.manual_seed(0)
    emb = BartScaledWordEmbedding(7, 4, padding_idx=1, embed_scale=2.5)
    emb.embed_scale = scale
    model = Wrap(emb)
    la.inject(model, la.LoRAConfig(r=2, alpha=5.0, target_modules=["layer"]))
    layer = model.layer.adapter["default"]
    a = torch.randn(2, 7)
    b = torch.randn(4, 2)
    with torch.no_grad():
        layer.lora_A.copy_(a)
        layer.lora_B.copy_(b)
    x = torch.tensor([[0, 3, 3], [6, 2, 1]])
    y = model(x)
    rows = a.t()[x]  # (2, 3, r)
    want = 2.5 * (emb.weight.detach()[x] + 2.5 * rows @ b.t())
    assert torch.allclose(y, want, atol=1e-5)
    g = torch.randn(y.shape)
    ga, gb = torch.autograd.grad((y * g).sum(), [layer.lora_A, layer.lora_B])
    # d/dB: Σ 2.5·2.5·g ⊗ rows; d/dAᵀ[v]: Σ_{x=v} 2.5·2.5·g·B, except the padding row 1 (no gradient).
    assert torch.allclose(gb, 6.25 * torch.einsum("nto,ntr->or", g, rows), atol=1e-4)
    want_at = torch.zeros(7, 2)
    want_at.index_add_(0, x.reshape(-1), 6.25 * g.reshape(-1, 4) @ b)
    want_at[1] = 0
    assert torch.allclose(ga, want_at.t(), atol=1e-4)
    # Merging bakes the same value into the base.
    la.merge(model)
    assert torch.allclose(model(x), want, atol=1e-5)


def test_dora_on_a_scaled_embedding_is_refused_naming_it():
    model = Wrap(BartScaledWordEmbedding(7, 4, padding_idx=0, embed_scale=2.0))
    with pytest.raises(la.AdapterConfigError, match=r"use_dora=True on the scaled embedding 'layer' "):
        la.inject(model, la.LoRAConfig(r=2, use_dora=True, target_modules=["layer"]))


def test_embedding_lookup_keeps_padding_idx_and_scale_grad_by_freq_as_peft():
    """The LoRA lookup in ``Aᵀ`` uses the base's ``padding_idx`` and ``scale_grad_by_freq`` (PEFT's ``_embed``):
    outputs and the gradients of both factors equal PEFT 0.21's, and by hand a token seen k times in the batch gives
    its ``Aᵀ`` row 1/k of the summed gradient."""
    torch.manual_seed(0)
    base = Wrap(nn.Embedding(9, 5, padding_idx=2, scale_grad_by_freq=True))
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=3, lora_alpha=6, target_modules=["layer"]))
    model = la.inject(copy.deepcopy(base), la.LoRAConfig(r=3, alpha=6, target_modules=["layer"]))
    layer = model.layer.adapter["default"]
    a, b = torch.randn(3, 9), torch.randn(5, 3)
    with torch.no_grad():
        layer.lora_A.copy_(a)
        layer.lora_B.copy_(b)
        peft_model.base_model.model.layer.lora_embedding_A["default"].copy_(a)
        peft_model.base_model.model.layer.lora_embedding_B["default"].copy_(b)
    x = torch.tensor([[4, 4, 4, 2], [0, 2, 8, 4]])  # 4 four times, 2 (padding) twice
    g = torch.randn(2, 4, 5)
    y = model(x)
    ga, gb = torch.autograd.grad((y * g).sum(), [layer.lora_A, layer.lora_B])
    pl = peft_model.base_model.model.layer
    yp = peft_model(x)
    gpa, gpb = torch.autograd.grad((yp * g).sum(), [pl.lora_embedding_A["default"], pl.lora_embedding_B["default"]])
    assert torch.allclose(y, yp, atol=1e-5)
    assert torch.allclose(ga, gpa, atol=1e-5) and torch.allclose(gb, gpb, atol=1e-5)
    # By hand: s = 2; row 4 gets the mean over its four positions, row 2 (padding) nothing.
    per_pos = 2.0 * g @ b  # (2, 4, r)
    assert torch.allclose(ga[:, 4], (per_pos[0, 0] + per_pos[0, 1] + per_pos[0, 2] + per_pos[1, 3]) / 4, atol=1e-5)
    assert torch.allclose(ga[:, 8], per_pos[1, 2], atol=1e-5)
    assert not ga[:, 2].any()


# ------------------------------------------------------------------------------------------------------------
# PEFT's grouped-conv layout: the ungrouped lora_A conv with the base's padding mode, stride and dilation


@pytest.mark.parametrize(
    "padding_mode, stride, dilation",
    [("reflect", 1, 1), ("circular", 2, 1), ("replicate", 1, 2), ("zeros", 2, 2)],
)
def test_peft_layout_lora_a_convolves_with_the_base_padding_mode(padding_mode, stride, dilation):
    """``grouped_conv_layout="peft"``: ``y = conv(x; W) + s·conv_g(conv(pad(x); A_dense); B)`` where ``pad`` is the
    base's padding in its own mode (and stride, dilation) and ``A`` reads every input channel. By hand, outputs and
    the gradients of x, A and B; and with a block-diagonal A it is the mergeable layout's merged conv."""
    torch.manual_seed(0)
    base = nn.Conv2d(4, 6, 3, padding=2, stride=stride, dilation=dilation, groups=2, padding_mode=padding_mode)
    model = Wrap(copy.deepcopy(base))
    la.inject(model, la.LoRAConfig(r=4, alpha=6.0, grouped_conv_layout="peft", target_modules=["layer"]))
    layer = model.layer.adapter["default"]
    a, b = torch.randn(4, 4, 3, 3), torch.randn(6, 2, 1, 1)
    with torch.no_grad():
        layer.lora_A.copy_(a)
        layer.lora_B.copy_(b)
    x = torch.randn(2, 4, 7, 7, requires_grad=True)
    y = model(x)

    def reference(x, a, b):
        conv = dict(stride=stride, dilation=dilation)
        if padding_mode == "zeros":
            xp, pad = x, 2
        else:
            xp, pad = F.pad(x, (2, 2, 2, 2), mode=padding_mode), 0
        w_out = F.conv2d(xp, base.weight, base.bias, padding=pad, groups=2, **conv)
        h = F.conv2d(xp, a, padding=pad, **conv)  # (N, r, H', W'): every input channel
        return w_out + 1.5 * F.conv2d(h, b, groups=2)

    xr = x.detach().clone().requires_grad_(True)
    ar, br = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    want = reference(xr, ar, br)
    assert torch.allclose(y, want, atol=1e-5)
    g = torch.randn(y.shape)
    got = torch.autograd.grad((y * g).sum(), [x, layer.lora_A, layer.lora_B])
    truth = torch.autograd.grad((want * g).sum(), [xr, ar, br])
    for u, v in zip(got, truth):
        assert torch.allclose(u, v, atol=1e-4)
    # A block-diagonal A computes what the grouped (mergeable) A does: compare with the merged base conv.
    grouped = torch.randn(4, 2, 3, 3)
    with torch.no_grad():
        layer.lora_A.copy_(grouped_to_dense_A(grouped, 2))
    merged = copy.deepcopy(base)
    with torch.no_grad():
        merged.weight.add_(lora_method.conv_delta_weight(grouped, b, 2, 1.5))
    assert torch.allclose(model(x), merged(x), atol=1e-5)


def test_grouped_conv_of_two_groups_saves_peft_s_dense_lora_a():
    """A mergeable conv LoRA with groups = 2 is saved as PEFT's ungrouped ``lora_A`` (r, in, k, k), zero across the
    groups, and PEFT 0.21's layer loaded with that state gives the same output."""
    torch.manual_seed(0)
    base = Wrap(nn.Conv2d(4, 6, 3, padding=1, groups=2))
    model = la.inject(copy.deepcopy(base), la.LoRAConfig(r=4, alpha=8, target_modules=["layer"]))
    layer = model.layer.adapter["default"]
    with torch.no_grad():
        layer.lora_A.copy_(torch.randn(4, 2, 3, 3))
        layer.lora_B.copy_(torch.randn(6, 2, 1, 1))
    state = layer.peft_state()
    assert set(state) == {"lora_A.weight", "lora_B.weight"}
    assert state["lora_A.weight"].shape == (4, 4, 3, 3)
    assert torch.equal(state["lora_A.weight"][:2, :2], layer.lora_A.detach()[:2])
    assert torch.equal(state["lora_A.weight"][2:, 2:], layer.lora_A.detach()[2:])
    assert not state["lora_A.weight"][:2, 2:].any() and not state["lora_A.weight"][2:, :2].any()
    with pytest.warns(UserWarning, match="groups"):
        peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["layer"]))
    pl = peft_model.base_model.model.layer
    with torch.no_grad():
        pl.lora_A["default"].weight.copy_(state["lora_A.weight"])
        pl.lora_B["default"].weight.copy_(state["lora_B.weight"])
    x = torch.randn(2, 4, 5, 5)
    assert torch.allclose(model(x), peft_model(x), atol=1e-5)


# ------------------------------------------------------------------------------------------------------------
# Init draws


def test_init_draws_as_peft():
    """PEFT 0.21's draws: ``True`` A kaiming-uniform(a=√5) (bound 1/√in) and B = 0; ``"gaussian"`` A ~ N(0, 1/r) and
    B = 0; ``False`` both kaiming-uniform; Embedding: A = 0 and B ~ N(0, 1), or A ~ N(0, 1) too with ``False``."""
    torch.manual_seed(0)
    n_in, r = 1024, 4
    bound = 1 / math.sqrt(n_in)

    def factors(init, layer=None):
        model = la.inject(
            Wrap(layer or nn.Linear(n_in, 64)), la.LoRAConfig(r=r, init_weights=init, target_modules=["layer"])
        )
        a = model.layer.adapter["default"]
        return a.lora_A.detach(), a.lora_B.detach()

    a, b = factors(True)
    assert a.abs().max() <= bound and a.abs().max() > 0.99 * bound and not b.any()
    assert abs(a.std().item() - bound / math.sqrt(3)) < 0.05 * bound
    a, b = factors("gaussian")
    assert abs(a.std().item() - 1 / r) < 0.02 and abs(a.mean().item()) < 0.01 and not b.any()
    a, b = factors(False)
    assert a.abs().max() <= bound and a.abs().max() > 0.99 * bound
    assert b.abs().max() <= 1 / math.sqrt(r) and b.abs().max() > 0.9 / math.sqrt(r)
    a, b = factors(True, nn.Embedding(n_in, 64))
    assert not a.any() and abs(b.std().item() - 1) < 0.1
    a, b = factors(False, nn.Embedding(n_in, 64))
    assert abs(a.std().item() - 1) < 0.05 and abs(b.std().item() - 1) < 0.1


@pytest.mark.parametrize("layer", ["linear", "conv"])
def test_lora_bias_init_false_is_the_default_bias_draw_of_lora_b(layer):
    """``lora_bias`` with ``init_weights=False``: ``b_B`` ~ U(-1/√fan_in, 1/√fan_in) with lora_B's fan-in (r, or
    r/g for a grouped conv's 1×1 B), nn.Linear's own bias init as PEFT's ``lora_B`` Linear has; with True it is 0."""
    torch.manual_seed(0)
    base = nn.Linear(8, 2048) if layer == "linear" else nn.Conv2d(4, 2048, 3, groups=2)
    fan_in = 4 if layer == "linear" else 2
    for init in (False, True):
        model = la.inject(
            Wrap(copy.deepcopy(base)), la.LoRAConfig(r=4, lora_bias=True, init_weights=init, target_modules=["layer"])
        )
        bias = model.layer.adapter["default"].lora_B_bias.detach()
        assert bias.shape == (2048,)
        if init:
            assert not bias.any()
        else:
            bound = 1 / math.sqrt(fan_in)
            assert bias.min() >= -bound and bias.max() <= bound
            assert bias.min() < -0.95 * bound and bias.max() > 0.95 * bound
            assert abs(bias.mean().item()) < 0.05


def test_eva_gives_layers_it_cannot_read_the_default_init():
    """EVA reads Linear/Conv1D inputs only; an Embedding or a conv under ``init_weights="eva"`` gets the default
    init (as PEFT), so it is the base at init and needs no data: Embedding A = 0, B ~ N(0, 1); conv B = 0."""
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(64, 32)
            self.conv = nn.Conv2d(16, 32, 3)

    model = la.inject(Net(), la.LoRAConfig(r=4, init_weights="eva", target_modules=["emb", "conv"]))
    emb, conv = model.emb.adapter["default"], model.conv.adapter["default"]
    assert not emb.needs_data and not conv.needs_data
    assert not emb.lora_A.any() and abs(emb.lora_B.std().item() - 1) < 0.3
    assert not conv.lora_B.any() and conv.lora_A.abs().max() <= 1 / math.sqrt(16 * 9)
    x = torch.randint(0, 64, (2, 5))
    assert torch.equal(model.emb(x), F.embedding(x, model.emb.weight))


# ------------------------------------------------------------------------------------------------------------
# set_rank


@pytest.mark.parametrize("use_rslora", [False, True])
def test_set_rank_builds_zero_factors_where_the_old_ones_live(use_rslora):
    """EVA's redistribution gives a layer new zero factors of rank r on the old factors' device and dtype (a meta
    model stays on meta) and the scale alpha / r (√r with rsLoRA)."""
    model = la.inject(Wrap(nn.Linear(8, 6)), la.LoRAConfig(r=2, use_rslora=use_rslora, target_modules=["layer"]))
    model.to(device="meta", dtype=torch.float64)
    layer = model.layer.adapter["default"]
    layer.set_rank(3, 5)
    for p, shape in ((layer.lora_A, (3, 8)), (layer.lora_B, (6, 3))):
        assert p.device.type == "meta" and p.dtype == torch.float64 and p.shape == shape
    assert layer.r == 3 and layer.alpha == 5.0
    assert layer.scale == (5 / math.sqrt(3) if use_rslora else 5 / 3)


# ------------------------------------------------------------------------------------------------------------
# lora_bias: PEFT state, merge refusal


def test_lora_bias_peft_state_keys_and_peft_output():
    torch.manual_seed(0)
    base = Wrap(nn.Linear(6, 5))
    model = la.inject(
        copy.deepcopy(base), la.LoRAConfig(r=2, alpha=3, lora_bias=True, init_weights=False, target_modules=["layer"])
    )
    state = model.layer.adapter["default"].peft_state()
    assert set(state) == {"lora_A.weight", "lora_B.weight", "lora_B.bias"}
    peft_model = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=2, lora_alpha=3, lora_bias=True, target_modules=["layer"])
    )
    pl = peft_model.base_model.model.layer
    with torch.no_grad():
        pl.lora_A["default"].weight.copy_(state["lora_A.weight"])
        pl.lora_B["default"].weight.copy_(state["lora_B.weight"])
        pl.lora_B["default"].bias.copy_(state["lora_B.bias"])
    x = torch.randn(3, 6)
    assert torch.allclose(model(x), peft_model(x), atol=1e-6)


def test_lora_bias_on_a_base_without_bias_refuses_to_merge_saying_why():
    model = la.inject(Wrap(nn.Linear(6, 5, bias=False)), la.LoRAConfig(r=2, lora_bias=True, target_modules=["layer"]))
    reason = (
        "it has no bias, so its lora_bias=True adapter cannot merge (the merge adds s·b_B to the base bias); train "
        "it with lora_bias=False to merge"
    )
    assert model.layer.adapter["default"].not_mergeable_reason == reason
    with pytest.raises(la.NotMergeableError) as err:
        la.merge(model)
    assert reason in str(err.value)


# ------------------------------------------------------------------------------------------------------------
# Refusals: LoftQ on a quantized weight, a pending data-driven init


def test_loftq_refuses_a_weight_that_carries_a_quant_state():
    """A floating weight carrying bitsandbytes' ``quant_state`` is already quantised: LoftQ needs the original."""
    model = Wrap(nn.Linear(8, 6))
    model.layer.weight.quant_state = types.SimpleNamespace()
    with pytest.raises(la.AdapterConfigError, match=r"needs the full-precision weight of 'layer', which is quantised"):
        la.inject(model, la.LoRAConfig(r=2, init_weights="loftq", target_modules=["layer"]))


_PENDING = (
    "lora: 'layer' was injected with init_weights={init!r} and has not been initialised from data: call "
    "lightning_adapters.initialize_from_data(model, batches) before running, merging or converting it (a Lightning "
    "fit does it from its first init_batches train batches). "
)
_ELSEWHERE = {
    "eva": "To use a trained EVA adapter elsewhere, save it with save_peft and load it with load_peft (the file holds "
    "EVA's ranks in rank_pattern)",
    "corda": "To use a trained CorDA adapter elsewhere, run it on the training's first batches before loading the "
    "adapter state, or save it with save_peft(..., convert_to_lora=True) and load that onto the plain base",
}


@pytest.mark.parametrize("init", ["eva", "corda"])
def test_pending_data_init_refuses_to_run_naming_the_way_out(init):
    model = la.inject(Wrap(nn.Linear(8, 6)), la.LoRAConfig(r=2, init_weights=init, target_modules=["layer"]))
    with pytest.raises(la.AdapterStateError) as err:
        model(torch.randn(2, 8))
    assert str(err.value) == _PENDING.format(init=init) + _ELSEWHERE[init]


# ------------------------------------------------------------------------------------------------------------
# Config: __post_init__ corners, PEFT translation both ways


def test_target_parameters_alone_go_with_layers_to_transform():
    """``target_modules=[]`` with ``target_parameters`` is valid (as in PEFT), also with a layer selection, which
    only refuses a regex ``target_modules``."""
    cfg = la.LoRAConfig(
        target_modules=[], target_parameters=("experts.gate_up_proj",), layers_to_transform=[0], layers_pattern="h"
    )
    assert cfg.target_modules == [] and cfg.target_parameters == ["experts.gate_up_proj"]
    assert cfg.layers_to_transform == [0]
    with pytest.raises(la.AdapterConfigError, match="needs target_modules as a list"):
        la.LoRAConfig(target_modules="q_proj", layers_to_transform=[0])


@pytest.mark.parametrize("bad", [[-1], [3, 3], {"embed": []}])
def test_trainable_token_indices_refusal_names_lora(bad):
    with pytest.raises(la.AdapterConfigError) as err:
        la.LoRAConfig(trainable_token_indices=bad)
    assert str(err.value).startswith(f"lora: trainable_token_indices={bad!r} must be a non-empty list")


def _to_peft(cfg):
    return la.get_method("lora").config_to_peft(cfg)


def _from_peft(d):
    return la.get_method("lora").config_from_peft(d)


def test_to_peft_writes_each_init_s_own_sub_config_only():
    base_keys = {
        "peft_type", "r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora", "init_lora_weights",
        "rank_pattern", "alpha_pattern", "layers_to_transform", "layers_pattern", "bias", "fan_in_fan_out",
        "lora_bias", "trainable_token_indices", "target_parameters",
    }  # fmt: skip
    assert set(_to_peft(la.LoRAConfig())) == base_keys
    eva = la.LoRAConfig(
        init_weights="eva", eva_rho=1.5, eva_tau=0.9, eva_use_label_mask=False, eva_label_mask_value=-1,
        eva_whiten=True, eva_adjust_scaling_factors=False,
    )  # fmt: skip
    d = _to_peft(eva)
    assert set(d) == base_keys | {"eva_config"}
    assert d["eva_config"] == {
        "rho": 1.5, "tau": 0.9, "use_label_mask": False, "label_mask_value": -1, "whiten": True,
        "adjust_scaling_factors": False,
    }  # fmt: skip
    # PEFT reads it as its own EvaConfig.
    fields = {k: v for k, v in d.items() if k != "peft_type"}
    peft_cfg = LoraConfig(target_modules=["q"], **fields)
    assert peft_cfg.eva_config.rho == 1.5 and peft_cfg.eva_config.whiten is True
    d = _to_peft(la.LoRAConfig(init_weights="corda", corda_method="kpm"))
    assert set(d) == base_keys | {"corda_config"} and d["corda_config"] == {"corda_method": "kpm"}
    d = _to_peft(la.LoRAConfig(init_weights="loftq", loftq_bits=8, loftq_iter=3))
    assert set(d) == base_keys | {"loftq_config"} and d["loftq_config"] == {"loftq_bits": 8, "loftq_iter": 3}


def test_from_peft_reads_a_file_without_init_lora_weights_as_the_default():
    """A PEFT config without ``init_lora_weights`` (PEFT's default is True), and LoftQ's sub-config when present."""
    d = LoraConfig(r=4, lora_alpha=16, target_modules=["q"]).to_dict()
    del d["init_lora_weights"]
    cfg = _from_peft(d)
    assert cfg.init_weights is True and cfg.r == 4 and cfg.alpha == 16
    assert (cfg.loftq_bits, cfg.loftq_iter) == (4, 1)
    d = LoraConfig(r=4, target_modules=["q"], init_lora_weights="loftq", loftq_config={"loftq_bits": 8}).to_dict()
    d["loftq_config"]["loftq_iter"] = 2
    cfg = _from_peft(d)
    assert cfg.init_weights == "loftq" and (cfg.loftq_bits, cfg.loftq_iter) == (8, 2)


# ------------------------------------------------------------------------------------------------------------
# DoRA: output dtype on a half base, the eval path on a quantized base


def _dora_reference(base: nn.Module, a, b, m, scale, x):
    """``m / ||W + s·B·A||_row ⊙ (W + s·B·A) ⋆ x + bias`` in float64 from the base's own values."""
    w = base.weight.detach().double()
    a, b, m = a.detach().double(), b.detach().double(), m.detach().double().reshape(-1)
    if isinstance(base, nn.Conv2d):
        dw = lora_method.conv_delta_weight(a, b, base.groups, scale)
        merged = w + dw
        f = m / merged.flatten(1).norm(dim=1)
        y = F.conv2d(x.double(), merged * f.reshape(-1, 1, 1, 1), None, base.stride, base.padding, 1, base.groups)
        return y + base.bias.detach().double().reshape(1, -1, 1, 1)
    merged = w + scale * b @ a
    f = m / merged.norm(dim=1)
    return x.double() @ (merged * f[:, None]).t() + base.bias.detach().double()


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_dora_on_a_bf16_base_answers_in_bf16_with_the_closed_form_values(kind, dropout):
    """A bf16 base keeps fp32 adapters; DoRA's output is cast back to the base dtype in every branch (train with and
    without dropout, eval), and in eval mode it is the closed form ``m/||W+ΔW|| ⊙ (W+ΔW) x + b`` (bf16 rounding)."""
    torch.manual_seed(0)
    base = nn.Linear(16, 12) if kind == "linear" else nn.Conv2d(4, 6, 3, padding=1, groups=2)
    model = Wrap(base.to(torch.bfloat16))
    la.inject(model, la.LoRAConfig(r=4, alpha=6, dropout=dropout, use_dora=True, target_modules=["layer"]))
    layer = model.layer.adapter["default"]
    with torch.no_grad():
        layer.lora_A.normal_(0, 0.3)
        layer.lora_B.normal_(0, 0.3)
        layer.magnitude.mul_(1 + 0.3 * torch.randn(layer.magnitude.shape))
    assert layer.lora_A.dtype == torch.float32
    x = torch.randn(3, 16) if kind == "linear" else torch.randn(2, 4, 5, 5)
    x = x.bfloat16()
    model.train()
    assert model(x).dtype == torch.bfloat16
    model.eval()
    y = model(x)
    assert y.dtype == torch.bfloat16
    want = _dora_reference(model.layer, layer.lora_A, layer.lora_B, layer.magnitude, 1.5, x)
    err = (y.double() - want).abs().max().item()
    assert err <= 2e-2 * want.abs().max().item(), err


def nf4_dora_model() -> tuple[nn.Module, nn.Module]:
    """A seeded DoRA adapter (B and the magnitude moved off their init) on an NF4 ``Linear(128, 128)``: the model
    and its layer."""
    pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    model = la.quantize(Wrap(nn.Linear(128, 128)), "nf4", skip=[])
    la.inject(model, la.LoRAConfig(r=4, alpha=8, use_dora=True, target_modules=["layer"]))
    layer = model.layer.adapter["default"]
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.1)
        layer.magnitude.mul_(1 + 0.3 * torch.randn(128))
    return model, layer


def test_quantized_dora_in_eval_takes_the_layer_s_kernel_for_an_input_without_gradient():
    """On an NF4 base in eval mode an input that needs no gradient runs the quantized layer's own kernel for the
    base term even under autograd (the adapter's parameters still get gradients): the output is the one computed
    under ``no_grad``, exactly."""
    model, layer = nf4_dora_model()
    model.eval()
    x = torch.randn(3, 128)
    with torch.no_grad():
        want = model(x)
    y = model(x)
    assert y.requires_grad and torch.equal(y.detach(), want)
    (ga,) = torch.autograd.grad(y.sum(), [layer.magnitude])
    assert ga.abs().sum() > 0


# ------------------------------------------------------------------------------------------------------------
# LoRAConfig.__post_init__: every check names its field, and the normalisations


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"bias": "some"}, "lora: bias must be one of ['none', 'all', 'lora_only'], got 'some'"),
        ({"lora_bias": 1}, "lora: lora_bias must be one of [False, True], got 1"),
        ({"dropout": 1.0}, "lora: dropout must be in [0, 1), got 1.0"),
        ({"init_batches": 0}, "lora: init_batches must be an integer > 0, got 0"),
        ({"loftq_bits": 3}, "lora: loftq_bits must be one of [4, 8], got 3"),
        ({"loftq_iter": 0}, "lora: loftq_iter must be an integer > 0, got 0"),
        ({"corda_method": "pca"}, "lora: corda_method must be one of ['ipm', 'kpm'], got 'pca'"),
        ({"init_weights": "xavier"}, "lora: init_weights must be True, False, one of"),
        ({"grouped_conv_layout": "dense"}, "lora: grouped_conv_layout='dense' is not one of ('mergeable', 'peft')"),
        ({"target_parameters": ["gate_up_proj"]}, "lora: target_parameters=['gate_up_proj'] must be"),
        ({"eva_rho": 0.5}, "lora: eva_rho must be a finite number >= 1"),
        ({"lora_bias": True, "use_dora": True}, "lora: lora_bias=True does not work with use_dora=True"),
        ({"lora_bias": True, "init_weights": "gaussian"}, "lora: lora_bias=True needs init_weights True or False"),
        ({"init_weights": "orthogonal", "r": 3}, "lora: init_weights='orthogonal' needs even ranks (A and B"),
    ],
)
def test_config_refusals_name_the_field_and_value(kwargs, message):
    with pytest.raises(la.AdapterConfigError) as err:
        la.LoRAConfig(**kwargs)
    assert str(err.value).startswith(message)


def test_orthogonal_init_lists_every_odd_rank():
    with pytest.raises(la.AdapterConfigError) as err:
        la.LoRAConfig(init_weights="orthogonal", r=3, rank_pattern={"q": 4, "k": 5, "v": 1})
    assert "got {'r': 3, \"rank_pattern['k']\": 5, \"rank_pattern['v']\": 1}; use an even r" in str(err.value)
    with pytest.raises(la.AdapterConfigError) as err:
        la.LoRAConfig(init_weights="orthogonal", r=4, rank_pattern={"q": 4, "k": 5})
    assert "got {\"rank_pattern['k']\": 5}; use an even r" in str(err.value)
    assert la.LoRAConfig(init_weights="orthogonal", r=4, rank_pattern={"q": 2}).rank_pattern == {"q": 2}
    assert la.LoRAConfig(r=3, rank_pattern={"q": 5}).r == 3  # odd ranks are fine for the other inits


def test_config_accepts_and_normalises():
    for init in (True, False):
        assert la.LoRAConfig(lora_bias=True, init_weights=init).lora_bias is True
    assert la.LoRAConfig(dropout=0.0).dropout == 0.0 and la.LoRAConfig(dropout=0.999).dropout == 0.999
    assert la.LoRAConfig(loftq_bits=8, loftq_iter=5).loftq_iter == 5
    cfg = la.LoRAConfig(trainable_token_indices=(5, 3), target_parameters=("a.b",))
    assert cfg.trainable_token_indices == [5, 3] and cfg.target_parameters == ["a.b"]
    cfg = la.LoRAConfig(trainable_token_indices={"embed": (2, 7)})
    assert cfg.trainable_token_indices == {"embed": [2, 7]}
    cfg = la.LoRAConfig(target_modules=(), target_parameters=["experts.down_proj"])
    assert cfg.target_modules == []
    with pytest.raises(la.AdapterConfigError, match="target_modules must be a non-empty list"):
        la.LoRAConfig(target_modules=[])  # empty target_modules needs target_parameters
    assert la.LoRAConfig(target_modules=["q"], target_parameters=["e.w"]).target_modules == ["q"]


def test_from_peft_reads_every_field_of_peft_s_config():
    d = LoraConfig(
        r=6, lora_alpha=12, lora_dropout=0.1, use_rslora=True, rank_pattern={"q": 2}, alpha_pattern={"q": 3},
        trainable_token_indices=[5], bias="lora_only", lora_bias=True, layers_to_transform=[1],
        layers_pattern="layers", target_modules=["q", "v"], exclude_modules=["x"], modules_to_save=["head"],
        init_lora_weights=False,
    ).to_dict()  # fmt: skip
    cfg = _from_peft(d)
    assert (cfg.r, cfg.alpha, cfg.dropout, cfg.use_rslora, cfg.use_dora) == (6, 12, 0.1, True, False)
    assert cfg.init_weights is False and cfg.rank_pattern == {"q": 2} and cfg.alpha_pattern == {"q": 3}
    assert cfg.trainable_token_indices == [5] and cfg.bias == "lora_only" and cfg.lora_bias is True
    assert cfg.layers_to_transform == [1] and cfg.layers_pattern == "layers"
    assert sorted(cfg.target_modules) == ["q", "v"] and cfg.exclude_modules == ["x"]
    assert cfg.modules_to_save == ["head"] and cfg.target_parameters is None
    d = LoraConfig(target_modules=["q"], use_dora=True, bias="all", target_parameters=["e.w"]).to_dict()
    d.update(lora_dropout=None, rank_pattern=None, alpha_pattern=None)
    cfg = _from_peft(d)
    assert cfg.use_dora is True and cfg.bias == "all" and cfg.dropout == 0.0
    assert cfg.rank_pattern == {} and cfg.alpha_pattern == {} and cfg.target_parameters == ["e.w"]
    cfg = _from_peft({"peft_type": "LORA", "target_modules": ["q"]})  # PEFT's defaults for what is absent
    assert (cfg.r, cfg.alpha, cfg.dropout, cfg.use_rslora, cfg.use_dora, cfg.bias) == (8, 8, 0.0, False, False, "none")
    assert cfg.lora_bias is False and cfg.init_weights is True and cfg.trainable_token_indices is None


def test_to_peft_writes_every_field_as_peft_names_it():
    cfg = la.LoRAConfig(
        r=6, alpha=12, dropout=0.1, use_rslora=True, use_dora=True, init_weights="gaussian", rank_pattern={"q": 2},
        alpha_pattern={"q": 3}, layers_to_transform=[1], layers_pattern="layers", target_modules=["q"],
        bias="all", trainable_token_indices=[4], target_parameters=["e.w"],
    )  # fmt: skip
    d = _to_peft(cfg)
    assert d == {
        "peft_type": "LORA", "r": 6, "lora_alpha": 12, "lora_dropout": 0.1, "use_rslora": True, "use_dora": True,
        "init_lora_weights": "gaussian", "rank_pattern": {"q": 2}, "alpha_pattern": {"q": 3},
        "layers_to_transform": [1], "layers_pattern": "layers", "bias": "all", "fan_in_fan_out": False,
        "lora_bias": False, "trainable_token_indices": [4], "target_parameters": ["e.w"],
    }  # fmt: skip
    assert d["rank_pattern"] is not cfg.rank_pattern  # a copy: editing the dict leaves the config
    back = _from_peft({**d, "target_modules": ["q"]})
    for f in ("r", "alpha", "dropout", "use_rslora", "use_dora", "init_weights", "rank_pattern", "alpha_pattern"):
        assert getattr(back, f) == getattr(cfg, f), f


# ------------------------------------------------------------------------------------------------------------
# Adapter dtypes of a float64 base, the conv term's sum, peft_state's views, the merged flag, a fresh DoRA layer


@pytest.mark.parametrize("direct", [True, False])
def test_float64_base_factors_and_lora_bias_are_float64_draws(direct):
    """A float64 Linear keeps float64 adapters from construction on (built straight or injected), each drawn in
    float64 from the seed: ``init_weights=False`` A and B kaiming-uniform(a=√5), ``b_B`` ~ U(±1/√r)."""
    f64 = torch.float64
    base = nn.Linear(6, 5, dtype=f64)
    cfg = la.LoRAConfig(r=4, lora_bias=True, init_weights=False, target_modules=["layer"])
    torch.manual_seed(3)
    if direct:
        layer = lora_method.LoRALayer(base, cfg, "layer")
    else:
        layer = la.inject(Wrap(base), cfg).layer.adapter["default"]
    torch.manual_seed(3)
    a, b = torch.empty(4, 6, dtype=f64), torch.empty(5, 4, dtype=f64)
    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    nn.init.kaiming_uniform_(b, a=math.sqrt(5))
    bias = torch.empty(5, dtype=f64).uniform_(-0.5, 0.5)
    for got, want in ((layer.lora_A, a), (layer.lora_B, b), (layer.lora_B_bias, bias)):
        assert got.dtype == f64 and torch.equal(got.detach(), want)


@pytest.mark.parametrize("init", [True, False, "gaussian"])
@pytest.mark.parametrize("kind", ["linear", "conv", "embedding"])
def test_float64_bases_draw_every_init_in_float64(kind, init):
    """Each default init on a float64 Linear, grouped Conv2d(4, 6, 3, groups=2) or Embedding(7, 5), r=2, replayed
    from the seed in float64: Linear/conv ``True`` A kaiming-uniform(a=√5) with A's fan-in, B = 0; ``"gaussian"``
    A ~ N(0, 1/r), B = 0; ``False`` both kaiming-uniform. Embedding: A = 0 (``False``: A ~ N(0, 1)), B ~ N(0, 1)."""
    f64 = torch.float64
    base = {"linear": nn.Linear(6, 5), "conv": nn.Conv2d(4, 6, 3, groups=2), "embedding": nn.Embedding(7, 5)}[kind]
    base = base.to(f64)
    torch.manual_seed(11)
    layer = la.inject(Wrap(base), la.LoRAConfig(r=2, init_weights=init, target_modules=["layer"])).layer.adapter[
        "default"
    ]
    shapes = {"linear": ((2, 6), (5, 2)), "conv": ((2, 2, 3, 3), (6, 1, 1, 1)), "embedding": ((2, 7), (5, 2))}
    a, b = (torch.zeros(s, dtype=f64) for s in shapes[kind])
    torch.manual_seed(11)
    if kind == "embedding":
        if init is False:
            nn.init.normal_(a)
        nn.init.normal_(b)
    else:
        if init == "gaussian":
            nn.init.normal_(a, std=0.5)
        else:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        if init is False:
            nn.init.kaiming_uniform_(b, a=math.sqrt(5))
    assert layer.lora_A.dtype == layer.lora_B.dtype == f64
    assert torch.equal(layer.lora_A.detach(), a) and torch.equal(layer.lora_B.detach(), b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_conv_adds_its_term_in_place_into_the_base_output_rounding_once(dtype):
    """Conv2d(4, 6, 3, padding=1), r=2, alpha=3, random factors: ``y = conv(x, W, b) + s·B⋆(A⋆x)``, the term added
    in place into the base output (``y`` is that tensor, written once: version 1). A half base (fp32 adapters): the
    sum is taken in fp32 and rounded once to the half dtype, as PEFT's ``result + ...`` then ``.to(dtype)`` (rounding
    the term first differed from PEFT by up to 2 ulps). Gradients of A, B and x as the formula's."""
    torch.manual_seed(0)
    model = la.inject(
        Wrap(nn.Conv2d(4, 6, 3, padding=1).to(dtype)),
        la.LoRAConfig(r=2, alpha=3, init_weights=False, target_modules=["layer"]),
    )
    layer, conv = model.layer.adapter["default"], model.layer
    adt = layer.lora_A.dtype
    assert adt == (torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype)
    x = (torch.randn(2, 4, 6, 6) * 3).to(dtype).requires_grad_()
    y = model(x)
    a, b = layer.lora_A.detach().requires_grad_(), layer.lora_B.detach().requires_grad_()
    w, bias = conv.weight.detach(), conv.bias.detach()
    base_out = F.conv2d(x, w, bias, 1, 1)
    term = F.conv2d(F.conv2d(x.to(adt), a, None, 1, 1), b) * 1.5
    want = (base_out + term).to(dtype)
    assert y.dtype == dtype and torch.equal(y, want)
    assert y._version == 1
    g = torch.randn(y.shape).to(dtype)
    got = torch.autograd.grad((y * g).sum(), [layer.lora_A, layer.lora_B, x])
    ref = torch.autograd.grad((want * g).sum(), [a, b, x])
    for u, v in zip(got, ref):
        assert u.dtype == v.dtype and torch.equal(u, v)


@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d", "embedding", "grouped", "grouped_peft", "lora_bias"])
def test_peft_state_is_detached_views_of_the_parameters_but_a_grouped_a(kind):
    """``peft_state`` copies nothing: every tensor is the detached parameter itself (same storage), except a grouped
    conv's ``lora_A`` in the mergeable layout, written as PEFT's dense block-diagonal tensor (a new one); in PEFT's
    layout that ``lora_A`` is already dense and is the parameter. B, ``b_B`` and the magnitude stay views."""
    bases = {
        "linear": nn.Linear(6, 4),
        "conv1d": nn.Conv1d(4, 6, 3),
        "conv2d": nn.Conv2d(4, 6, 3),
        "embedding": nn.Embedding(10, 4),
        "grouped": nn.Conv2d(4, 6, 3, groups=2),
        "grouped_peft": nn.Conv2d(4, 6, 3, groups=2),
        "lora_bias": nn.Linear(6, 4),
    }
    dora = kind not in ("grouped", "grouped_peft", "lora_bias")
    layout = "peft" if kind == "grouped_peft" else "mergeable"
    cfg = la.LoRAConfig(
        r=2, use_dora=dora, lora_bias=kind == "lora_bias", grouped_conv_layout=layout, target_modules=["layer"]
    )
    layer = la.inject(Wrap(bases[kind]), cfg).layer.adapter["default"]
    state = layer.peft_state()
    a_key, b_key = ("lora_A.weight", "lora_B.weight")
    if kind == "embedding":
        a_key, b_key = "lora_embedding_A", "lora_embedding_B"
    want = {a_key: layer.lora_A, b_key: layer.lora_B}
    if dora:
        want["lora_magnitude_vector"] = layer.magnitude
    if kind == "lora_bias":
        want["lora_B.bias"] = layer.lora_B_bias
    assert set(state) == set(want)
    for k, p in want.items():
        t = state[k]
        assert not t.requires_grad and t.dtype == p.dtype
        if kind == "grouped" and k == a_key:
            assert t.shape == (2, 4, 3, 3) and t.data_ptr() != p.data_ptr()
            assert torch.equal(t, grouped_to_dense_A(p.detach(), 2))
        else:
            assert t.shape == p.shape and t.data_ptr() == p.data_ptr() and torch.equal(t, p)


@pytest.mark.parametrize("dora", [False, True])
def test_merge_then_unmerge_sets_merged_true_then_false_as_the_repr_shows(dora):
    """``merged`` is the bool ``False`` before a merge and after an unmerge, ``True`` in between; ``repr`` says so."""
    torch.manual_seed(0)
    model = la.inject(Wrap(nn.Linear(4, 3)), la.LoRAConfig(r=2, use_dora=dora, target_modules=["layer"]))
    layer = model.layer.adapter["default"]
    assert layer.merged is False and repr(layer).endswith("merged=False)")
    layer.merge(model.layer)
    assert layer.merged is True and repr(layer).endswith("merged=True)")
    layer.unmerge(model.layer)
    assert layer.merged is False and repr(layer).endswith("merged=False)")
    layer.merge(model.layer)
    assert layer.merged is True


def test_a_dora_layer_straight_from_its_constructor_runs_in_eval_mode():
    """A DoRA ``LoRALayer`` holds no cached norm when built: flagged eval straight away (``training = False``, no
    ``train()`` call), its first forward is the closed form ``m/||W+ΔW|| ⊙ (W+ΔW) x + b`` and caches the norm."""
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    layer = lora_method.LoRALayer(base, la.LoRAConfig(r=2, alpha=3, use_dora=True, init_weights=False), "layer")
    with torch.no_grad():
        layer.magnitude.mul_(1 + 0.3 * torch.randn(layer.magnitude.shape))
    layer.training = False
    x = torch.randn(3, 6)
    y = layer.adapted_forward(base, x)
    want = _dora_reference(base, layer.lora_A, layer.lora_B, layer.magnitude, 1.5, x)
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)
    assert layer._norm_cache is not None
    assert torch.equal(layer.adapted_forward(base, x), y)
