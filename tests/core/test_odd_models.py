"""Odd models: tied weights, a module under two names, parents that read a child's weight without calling it,
and convolutions with every padding mode. Whenever ``inject`` accepts a model, merged == unmerged."""

from __future__ import annotations

import copy
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightning_adapters as la
from tests.helpers import CONV_PADDING_LAYERS, LAYERS, Wrap, randomize_adapter, tiny_gpt2, tiny_llama

# One config per per-layer method that adapts a Linear of width 64 (tiny Llama's hidden size).
LINEAR_CONFIGS = {
    "lora": lambda t: la.LoRAConfig(r=4, target_modules=t),
    "dora": lambda t: la.LoRAConfig(r=4, use_dora=True, target_modules=t),
    "loha": lambda t: la.LoHaConfig(r=2, target_modules=t),
    "lokr": lambda t: la.LoKrConfig(r=2, target_modules=t),
    "oft": lambda t: la.OFTConfig(oft_block_size=8, target_modules=t),
    "boft": lambda t: la.BOFTConfig(boft_block_size=8, target_modules=t),
    "adalora": lambda t: la.AdaLoRAConfig(init_r=4, target_r=2, total_step=10, target_modules=t),
}


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    now = model.state_dict()
    assert set(now) == set(before)
    assert all(torch.equal(now[k], v) for k, v in before.items())


@pytest.mark.parametrize("method", sorted(LINEAR_CONFIGS))
def test_tied_lm_head_is_refused_and_the_suggested_untie_works(method: str) -> None:
    torch.manual_seed(0)
    model = tiny_llama(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    x = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    before = _state(model)
    with pytest.raises(la.TargetError, match=r"'lm_head.weight' shares its memory with 'model.embed_tokens.weight'"):
        la.inject(model, LINEAR_CONFIGS[method](["lm_head"]))
    _assert_unchanged(model, before)
    # The fix the message gives: untie, then the merged model computes what the adapter path does.
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    model.config.tie_word_embeddings = False
    la.inject(model, LINEAR_CONFIGS[method](["lm_head"]))
    randomize_adapter(model, std=0.2)
    out = model(x).logits
    la.merge(model)
    assert torch.allclose(model(x).logits, out, atol=1e-4)


@pytest.mark.parametrize(
    "targets", [["embed_tokens"], ["lm_head", "embed_tokens"], ["lm_head", "q_proj"]], ids=["embed", "both", "mixed"]
)
def test_tied_weights_refused_whichever_side_is_targeted(targets: list[str]) -> None:
    model = tiny_llama(tie_word_embeddings=True)
    before = _state(model)
    with pytest.raises(la.TargetError, match=r"shares its memory with .*tie_word_embeddings=False"):
        la.inject(model, la.LoRAConfig(r=2, target_modules=targets))
    _assert_unchanged(model, before)


def test_gpt2_tied_wte_refused_but_untied_model_allowed() -> None:
    model = tiny_gpt2()
    with pytest.raises(la.TargetError, match=r"'transformer.wte.weight' shares its memory with 'lm_head.weight'"):
        la.inject(model, la.LoRAConfig(r=2, target_modules=["wte"]))
    untied = tiny_gpt2(tie_word_embeddings=False)
    la.inject(untied, la.LoRAConfig(r=2, target_modules=["wte", "lm_head"]))
    randomize_adapter(untied, std=0.2)
    x = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    out = untied(x).logits
    la.merge(untied)
    assert torch.allclose(untied(x).logits, out, atol=1e-4)


def test_shared_bias_is_not_a_tie() -> None:
    """Merging writes only ``weight``; a bias shared with another module stays consistent."""
    model = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6))
    model[1].bias = model[0].bias
    la.inject(model, la.LoRAConfig(r=2, target_modules=["0"]))
    randomize_adapter(model, std=0.3)
    x = torch.randn(3, 6)
    out = model(x)
    la.merge(model)
    assert torch.allclose(model(x), out, atol=1e-5)


def test_disjoint_views_of_one_storage_are_not_tied() -> None:
    """Two weights cut from one buffer without overlap (packed parameters) are independent."""
    flat = torch.randn(2 * 36)
    model = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6))
    model[0].weight = nn.Parameter(flat[:36].view(6, 6))
    model[1].weight = nn.Parameter(flat[36:].view(6, 6))
    la.inject(model, la.LoRAConfig(r=2, target_modules=["0"]))
    randomize_adapter(model, std=0.3)
    x = torch.randn(3, 6)
    out = model(x)
    la.merge(model)
    assert torch.allclose(model(x), out, atol=1e-5)


@pytest.mark.parametrize("method", sorted(LINEAR_CONFIGS))
def test_module_registered_twice_adapts_once_and_merges_consistently(method: str) -> None:
    torch.manual_seed(0)
    block = nn.Linear(64, 64)
    model = nn.Sequential(block, nn.Tanh(), block, nn.Linear(64, 8))
    la.inject(model, LINEAR_CONFIGS[method](["0", "2"]))
    assert [n for n, _ in model.named_modules() if n.endswith("adapter")] == ["0.adapter"]
    randomize_adapter(model, std=0.2)
    x = torch.randn(3, 64)
    out = model(x)
    # The adapter acts at both places: the output equals a model with two copies of the adapted block.
    twin = copy.deepcopy(model)
    twin[2] = copy.deepcopy(twin[0])
    assert torch.allclose(twin(x), out, atol=1e-6)
    out.pow(2).sum().backward()
    grads = [p.grad for p in model[0].adapter.default.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    la.merge(model)
    assert torch.allclose(model(x), out, atol=1e-4)


def test_module_registered_twice_refused_when_one_name_is_not_selected() -> None:
    block = nn.Linear(6, 6)
    model = nn.Sequential(block, block)
    before = _state(model)
    with pytest.raises(la.TargetError, match=r"module '0' is also registered as '1'"):
        la.inject(model, la.LoRAConfig(r=2, target_modules=r"0"))
    with pytest.raises(la.TargetError, match=r"module '1' is also registered as '0'"):
        la.inject(model, la.LoRAConfig(r=2, target_modules=["0", "1"], modules_to_save=["0"]))
    _assert_unchanged(model, before)
    assert type(model[0]) is nn.Linear


class _Doubled(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


def _computed(how: str) -> nn.Module:
    layer = nn.Linear(64, 64)
    if how == "parametrization":
        return torch.nn.utils.parametrizations.weight_norm(layer)
    if how == "spectral_norm":
        return torch.nn.utils.spectral_norm(layer)
    return torch.nn.utils.parametrizations.orthogonal(layer)


@pytest.mark.parametrize("method", sorted(LINEAR_CONFIGS))
def test_subclass_with_its_own_forward_refused_for_every_method(method: str) -> None:
    """Without the check the adapted layer computed nn.Linear's product: not even identity at init."""
    model = nn.Sequential(_Doubled(64, 64), nn.Linear(64, 2))
    before = _state(model)
    with pytest.raises(la.UnsupportedLayerError, match=r"'0' is a _Doubled, a subclass of Linear with its own forward"):
        la.inject(model, LINEAR_CONFIGS[method](["0", "1"]))
    _assert_unchanged(model, before)
    assert type(model[0]) is _Doubled and type(model[1]) is nn.Linear


@pytest.mark.parametrize("how", ["parametrization", "spectral_norm", "orthogonal"])
@pytest.mark.parametrize("method", sorted(LINEAR_CONFIGS))
def test_computed_weight_refused_for_every_method(method: str, how: str) -> None:
    """A merge into a computed weight was lost (parametrization) or overwritten by the next forward (hooks)."""
    model = nn.Sequential(OrderedDict(net=_computed(how), out=nn.Linear(64, 2))).eval()
    before = _state(model)
    with pytest.raises(la.UnsupportedLayerError, match=r"the weight of 'net' is computed"):
        la.inject(model, LINEAR_CONFIGS[method](["net"]))
    _assert_unchanged(model, before)


EMBEDDING_CONFIGS = {
    "lora": lambda: la.LoRAConfig(r=2, target_modules=["layer"]),
    "dora": lambda: la.LoRAConfig(r=2, use_dora=True, target_modules=["layer"]),
    "oft": lambda: la.OFTConfig(oft_block_size=4, target_modules=["layer"]),
}


@pytest.mark.parametrize("method", sorted(EMBEDDING_CONFIGS))
def test_embedding_max_norm_refused(method: str) -> None:
    """max_norm renormalised the merged rows, not the unmerged ones: merged ≠ unmerged by ~2-6 before the check."""
    model = Wrap(nn.Embedding(20, 8, max_norm=1.0))
    before = _state(model)
    with pytest.raises(la.UnsupportedLayerError, match=r"'layer' is an nn.Embedding with max_norm=1.0.*= None"):
        la.inject(model, EMBEDDING_CONFIGS[method]())
    _assert_unchanged(model, before)


@pytest.mark.parametrize("method", sorted(EMBEDDING_CONFIGS))
def test_sparse_embedding_trains_like_a_dense_one(method: str) -> None:
    """``sparse=True`` only concerns the frozen base: adapter gradients equal those on a dense twin."""
    x = torch.randint(0, 20, (3, 5), generator=torch.Generator().manual_seed(0))
    grads = []
    for sparse in (False, True):
        torch.manual_seed(0)
        model = Wrap(nn.Embedding(20, 8, padding_idx=0, sparse=sparse))
        la.inject(model, EMBEDDING_CONFIGS[method]())
        randomize_adapter(model, std=0.3)
        model(x).pow(2).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for n, g in grads[0].items():
        assert not grads[1][n].is_sparse and torch.allclose(grads[1][n], g, atol=1e-6), n


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(64, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x)[0]


@pytest.mark.parametrize("method", sorted(LINEAR_CONFIGS))
def test_mha_out_proj_refused_for_every_method(method: str) -> None:
    model = _Attention()
    before = _state(model)
    with pytest.raises(la.UnsupportedLayerError, match=r"'attn.out_proj' is the out_proj of nn.MultiheadAttention"):
        la.inject(model, LINEAR_CONFIGS[method](["out_proj"]))
    _assert_unchanged(model, before)
    assert type(model.attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear


def test_encoder_layer_linears_refused_while_the_fast_path_is_on_and_exact_when_off() -> None:
    torch.manual_seed(0)
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), 2).eval()
    x = torch.randn(2, 5, 8)
    before = _state(model)
    with pytest.raises(la.UnsupportedLayerError, match=r"'layers.0.linear1' belongs to nn.TransformerEncoderLayer"):
        la.inject(model, la.LoRAConfig(r=2, target_modules=["linear1", "linear2"]))
    _assert_unchanged(model, before)
    was = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        la.inject(model, la.LoRAConfig(r=2, target_modules=["linear1", "linear2"]))
        randomize_adapter(model, std=0.5)
        with torch.no_grad():
            out = model(x)
            la.merge(model)
            assert torch.allclose(model(x), out, atol=1e-5)
    finally:
        torch.backends.mha.set_fastpath_enabled(was)


# --- convolutions with every padding mode --------------------------------------------------------------------

CONV_CONFIGS = {
    "lora": lambda: la.LoRAConfig(r=4, target_modules=["layer"]),
    "dora": lambda: la.LoRAConfig(r=4, use_dora=True, target_modules=["layer"]),
    "loha": lambda: la.LoHaConfig(r=2, target_modules=["layer"]),
    "loha_cp": lambda: la.LoHaConfig(r=2, use_effective_conv2d=True, target_modules=["layer"]),
    "lokr": lambda: la.LoKrConfig(r=2, target_modules=["layer"]),
    "oft": lambda: la.OFTConfig(oft_block_size=4, target_modules=["layer"]),
    "boft": lambda: la.BOFTConfig(boft_block_size=4, target_modules=["layer"]),
    "adalora": lambda: la.AdaLoRAConfig(init_r=4, target_r=2, total_step=10, target_modules=["layer"]),
}


def reference_conv(conv: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``conv`` with ``weight``, written out: explicit padding of the input, then an unpadded convolution."""
    nd = weight.dim() - 2
    k = [(weight.shape[2 + i] - 1) * conv.dilation[i] for i in range(nd)]  # receptive extent - 1 per dim
    if conv.padding == "same":
        pads = [(e // 2, e - e // 2) for e in k]
    elif conv.padding == "valid":
        pads = [(0, 0)] * nd
    else:
        pads = [(p, p) for p in conv.padding]
    flat = [v for lo_hi in reversed(pads) for v in lo_hi]  # F.pad wants the last dim first
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    xp = F.pad(x, flat, mode=mode)
    fn = F.conv1d if nd == 1 else F.conv2d
    return fn(xp, weight, conv.bias, conv.stride, 0, conv.dilation, conv.groups)


@pytest.mark.parametrize("layer", CONV_PADDING_LAYERS)
@pytest.mark.parametrize("method", sorted(CONV_CONFIGS))
def test_conv_attributes_unmerged_equals_merged_equals_formula(method: str, layer: str) -> None:
    torch.manual_seed(0)
    kind = LAYERS[layer]
    model = Wrap(kind.make()).eval()
    x = kind.make_input().requires_grad_(True)
    try:
        la.inject(model, CONV_CONFIGS[method]())
    except (la.UnsupportedLayerError, la.AdapterConfigError) as err:
        # Refused (Conv1d for OFT/BOFT/AdaLoRA, groups for AdaLoRA, block sizes): the model is untouched.
        assert str(err) and type(model.layer) in (nn.Conv1d, nn.Conv2d)
        return
    randomize_adapter(model, std=0.2)
    out = model(x)
    (gx,) = torch.autograd.grad(out.pow(2).sum(), x)
    la.merge(model)
    weight = model.layer.weight.detach()
    merged = model(x)
    expected = reference_conv(model.layer, x, weight)
    assert torch.allclose(out, expected, atol=1e-5), (out - expected).abs().max()
    assert torch.allclose(merged, expected, atol=1e-5)
    (gx_ref,) = torch.autograd.grad(expected.pow(2).sum(), x)
    assert torch.allclose(gx, gx_ref, atol=1e-4)


def test_a_layer_with_any_parametrized_tensor_is_refused():
    """A parametrization on the bias (the weight still a plain Parameter) also makes the layer a parametrized class
    whose tensors are computed: refused as a computed weight is."""

    class Positive(nn.Module):
        def forward(self, b: torch.Tensor) -> torch.Tensor:
            return b.abs()

    layer = nn.Linear(8, 8)
    torch.nn.utils.parametrize.register_parametrization(layer, "bias", Positive())
    assert isinstance(layer._parameters.get("weight"), nn.Parameter)
    model = nn.Sequential(OrderedDict(net=layer, out=nn.Linear(8, 2)))
    with pytest.raises(la.UnsupportedLayerError, match=r"'net' is computed"):
        la.inject(model, la.LoRAConfig(r=2, target_modules=["net"]))


def test_bias_all_trains_a_bias_the_model_holds_itself():
    """``bias="all"`` trains every parameter called ``bias``, the one a model registers on itself (named plain
    ``bias``, with no module path) included, as PEFT's ``bias="all"`` does."""

    class Shifted(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(4, 4)
            self.bias = nn.Parameter(torch.zeros(4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.layer(x) + self.bias

    model = Shifted()
    la.inject(model, la.LoRAConfig(r=2, target_modules=["layer"], bias="all"))
    assert model.bias.requires_grad and model.layer.bias.requires_grad and not model.layer.weight.requires_grad


def test_one_element_views_of_a_target_s_weight_are_a_tie() -> None:
    """A weight of a single element is memory like any other: a second module whose weight is a view of the
    target's one element (not the same Parameter) shares it, and is refused."""
    model = nn.Sequential(nn.Linear(1, 1), nn.Linear(1, 1))
    model[1].weight = nn.Parameter(model[0].weight.data.view(1, 1))
    with pytest.raises(la.TargetError, match=r"'0.weight' shares its memory with '1.weight'"):
        la.inject(model, la.LoRAConfig(r=1, target_modules=["0"]))
