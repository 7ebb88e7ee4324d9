"""Property-based tests: any config × any layer shape either raises the library's clear error or works.

"Works" means: identity at init (default init), merged output equals the adapter path, unmerge restores the
weights, and one training step keeps everything finite. A torch shape error or a NaN from inside the library
is a failure. Each method contributes a strategy of config kwargs in ``METHOD_STRATEGIES``.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import lightning_adapters as la
from tests.helpers import Wrap

SMALL = st.integers(min_value=1, max_value=19)
PRIMEISH = st.sampled_from([1, 2, 3, 4, 5, 6, 7, 8, 11, 12, 13, 16, 17, 24, 31, 32])


@st.composite
def layers(draw):
    """A base layer with odd, prime or round sizes, and a matching input."""
    kind = draw(st.sampled_from(["linear", "conv1d_t", "embedding", "conv1d", "conv2d"]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    if kind == "linear":
        i, o = draw(PRIMEISH), draw(PRIMEISH)
        return kind, nn.Linear(i, o, bias=draw(st.booleans())), torch.randn(2, 3, i, generator=g)
    if kind == "conv1d_t":
        from transformers.pytorch_utils import Conv1D

        i, o = draw(PRIMEISH), draw(PRIMEISH)
        layer = Conv1D(o, i)
        nn.init.normal_(layer.weight, std=0.2)
        return kind, layer, torch.randn(2, 3, i, generator=g)
    if kind == "embedding":
        v, d = draw(st.integers(2, 40)), draw(PRIMEISH)
        return kind, nn.Embedding(v, d), torch.randint(0, v, (2, 5), generator=g)
    groups = draw(st.sampled_from([1, 1, 1, 2, 3]))
    i = groups * draw(st.integers(1, 6))
    o = groups * draw(st.integers(1, 6))
    k = draw(st.sampled_from([1, 2, 3]))
    stride = draw(st.sampled_from([1, 2]))
    dilation = draw(st.sampled_from([1, 1, 2]))
    padding = draw(st.sampled_from([0, 1, 2]))
    size = 9
    if kind == "conv1d":
        layer = nn.Conv1d(i, o, k, stride=stride, padding=padding, dilation=dilation, groups=groups)
        return kind, layer, torch.randn(2, i, size, generator=g)
    layer = nn.Conv2d(i, o, k, stride=stride, padding=padding, dilation=dilation, groups=groups)
    return kind, layer, torch.randn(2, i, size, size, generator=g)


def _lora_kwargs():
    return st.fixed_dictionaries(
        {
            "r": st.integers(-1, 9),
            "alpha": st.sampled_from([0.5, 1, 8, 16, 0, -1]),
            "dropout": st.sampled_from([0.0, 0.1, 0.5]),
            "use_rslora": st.booleans(),
            "use_dora": st.booleans(),
            "init_weights": st.sampled_from([True, "gaussian"]),
        }
    )


def _loha_kwargs():
    return st.fixed_dictionaries(
        {
            "r": st.integers(-1, 9),
            "alpha": st.sampled_from([1, 8, 0]),
            "rank_dropout": st.sampled_from([0.0, 0.2]),
            "module_dropout": st.sampled_from([0.0, 0.3]),
            "use_effective_conv2d": st.booleans(),
        }
    )


def _lokr_kwargs():
    return st.fixed_dictionaries(
        {
            "r": st.integers(-1, 9),
            "alpha": st.sampled_from([1, 8, -2]),
            "rank_dropout": st.sampled_from([0.0, 0.2]),
            "module_dropout": st.sampled_from([0.0, 0.3]),
            "use_effective_conv2d": st.booleans(),
            "decompose_both": st.booleans(),
            "decompose_factor": st.sampled_from([-1, 0, 1, 2, 3, 4, 8]),
            "rank_dropout_scale": st.booleans(),
            "init_weights": st.sampled_from([True, "lycoris"]),
        }
    )


def _oft_kwargs():
    return st.fixed_dictionaries(
        {
            "r": st.sampled_from([0, 0, 1, 2, 3, 4, -1]),
            "oft_block_size": st.sampled_from([0, 1, 2, 3, 4, 8, 16, 32]),
            "use_cayley_neumann": st.booleans(),
            "num_cayley_neumann_terms": st.integers(1, 6),
            "block_share": st.booleans(),
            "coft": st.booleans(),
            "module_dropout": st.sampled_from([0.0, 0.3]),
        }
    )


def _boft_kwargs():
    return st.fixed_dictionaries(
        {
            "boft_block_size": st.sampled_from([0, 1, 2, 3, 4, 8]),
            "boft_block_num": st.sampled_from([0, 0, 1, 2, 4, 8]),
            "boft_n_butterfly_factor": st.integers(0, 3),
            "boft_dropout": st.sampled_from([0.0, 0.2]),
        }
    )


def _adalora_kwargs():
    return st.fixed_dictionaries(
        {
            "init_r": st.integers(0, 12),
            "target_r": st.integers(0, 12),
            "total_step": st.sampled_from([None, 10, 50]),
            "tinit": st.integers(0, 4),
            "tfinal": st.integers(0, 4),
            "deltaT": st.integers(0, 3),
            "alpha": st.sampled_from([1, 8, 0]),
            "dropout": st.sampled_from([0.0, 0.1]),
            "beta1": st.sampled_from([0.85, 0.0, 1.0]),
        }
    )


METHOD_STRATEGIES = {
    "lora": ("LoRAConfig", _lora_kwargs),
    "loha": ("LoHaConfig", _loha_kwargs),
    "lokr": ("LoKrConfig", _lokr_kwargs),
    "oft": ("OFTConfig", _oft_kwargs),
    "boft": ("BOFTConfig", _boft_kwargs),
    "adalora": ("AdaLoRAConfig", _adalora_kwargs),
}


def _check_case(method: str, kwargs: dict, layer_case) -> None:
    kind, layer, x = layer_case
    cls = getattr(la, METHOD_STRATEGIES[method][0])
    try:
        cfg = cls(target_modules=["layer"], **kwargs)
    except la.AdapterError as err:
        assert str(err)
        return
    model = Wrap(layer).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    base_out = model(x)
    try:
        la.inject(model, cfg)
    except la.AdapterError as err:
        assert str(err)
        assert set(model.state_dict()) == set(before)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
        return
    out = model(x)
    assert torch.allclose(out, base_out, atol=1e-6), "not identity at init"
    with torch.no_grad():
        for t in la.adapter_state_dict(model).values():
            if t.is_floating_point():
                t.add_(torch.randn_like(t) * 0.05)
    out = model(x)
    assert torch.isfinite(out).all()
    adapter_layer = model.layer.adapter
    if adapter_layer.mergeable:
        la.merge(model)
        merged = model(x)
        tol = 1e-4 * max(1.0, out.abs().max().item())
        assert torch.allclose(merged, out, atol=tol), (merged - out).abs().max()
        la.unmerge(model)
        for k, v in before.items():
            assert torch.allclose(model.state_dict()[k], v, atol=1e-5), k
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss = model(x).float().pow(2).mean()
    # module_dropout may skip the whole adapter for this forward, leaving nothing to differentiate.
    if loss.requires_grad:
        loss.backward()
    opt.step()
    assert torch.isfinite(model(x)).all()
    assert all(torch.isfinite(t).all() for t in la.adapter_state_dict(model).values())


@pytest.mark.parametrize("method", sorted(METHOD_STRATEGIES))
def test_config_space_times_layer_shapes(method):
    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(kwargs=METHOD_STRATEGIES[method][1](), layer_case=layers())
    def run(kwargs, layer_case):
        _check_case(method, kwargs, layer_case)

    run()


@functools.cache
def _decoder(family: str, heads: int, kv: int, head_dim: int, hidden: int, layers: int) -> nn.Module:
    """Built once per shape (transformers model construction dominates the cost); tests use deep copies."""
    import transformers

    torch.manual_seed(0)
    if family == "gpt2":
        cfg = transformers.GPT2Config(n_embd=8 * heads, n_layer=layers, n_head=heads, vocab_size=50, n_positions=32)
        return transformers.GPT2LMHeadModel(cfg).eval()
    names = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}[family]
    cfg = getattr(transformers, f"{names}Config")(
        hidden_size=hidden,
        intermediate_size=16,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=head_dim,
        vocab_size=50,
        max_position_embeddings=32,
    )
    return getattr(transformers, f"{names}ForCausalLM")(cfg).eval()


@st.composite
def decoder_cases(draw):
    """A tiny decoder of a supported family with GQA / wide heads, and a Llama-Adapter config (maybe invalid)."""
    family = draw(st.sampled_from(["llama", "mistral", "qwen2", "gpt2"]))
    heads = draw(st.sampled_from([1, 2, 4]))
    kv = draw(st.sampled_from([h for h in (1, 2, 4) if heads % h == 0]))
    shape = (
        family,
        heads,
        kv,
        draw(st.sampled_from([4, 8, 6])),
        draw(st.sampled_from([8, 16, 12])),
        draw(st.integers(1, 3)),
    )
    kwargs = {"adapter_len": draw(st.integers(-1, 6)), "adapter_layers": draw(st.integers(-1, 4))}
    return shape, kwargs


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(case=decoder_cases())
def test_llama_adapter_config_space(case):
    shape, kwargs = case
    model = copy.deepcopy(_decoder(*shape))
    x = torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(0))
    try:
        cfg = la.LlamaAdapterConfig(**kwargs)
    except la.AdapterError as err:
        assert str(err)
        return
    before = {k: v.clone() for k, v in model.state_dict().items()}
    base = model(x).logits
    try:
        la.inject(model, cfg)
    except la.AdapterError as err:
        assert str(err)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
        assert set(model.state_dict()) == set(before)
        return
    assert torch.equal(model(x).logits, base)
    with torch.no_grad():
        for t in la.adapter_state_dict(model).values():
            t.add_(torch.randn_like(t) * 0.1)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(x, labels=x).loss.backward()
    opt.step()
    assert torch.isfinite(model(x).logits).all()
    la.eject(model)
    assert set(model.state_dict()) == set(before)
