"""``methods.llama_adapter`` pinned function by function: the RoPE and prompt-attention maths against loops
written here, the holder's hooks (outputs and gradients of one attention against the paper's formula, for
Llama/Mistral/Qwen2 with GQA and biases and for GPT-2), every refusal with its message, and the ``PromptAdapter``
bookkeeping (state keys, PEFT fields, dtype policy, summary rows, eject down to the last hook flag)."""

from __future__ import annotations

import math
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

import lightning_adapters as la
from lightning_adapters.core.layer import AdapterSet
from lightning_adapters.errors import AdapterConfigError, TargetError, UnsupportedLayerError
from lightning_adapters.methods import llama_adapter as lam
from tests.helpers import tiny_gpt2, tiny_llama

# --- pure functions -----------------------------------------------------------------------------------------


def test_rotate_half_and_apply_rope_elementwise():
    x = torch.arange(12.0).reshape(2, 6)
    assert torch.equal(lam.rotate_half(x), torch.tensor([[-3.0, -4, -5, 0, 1, 2], [-9.0, -10, -11, 6, 7, 8]]))
    g = torch.Generator().manual_seed(0)
    b, t, nh, d = 2, 3, 2, 4
    q = torch.randn(b, t, nh, d, generator=g, dtype=torch.float64)
    cos = torch.randn(b, t, d, generator=g, dtype=torch.float64)
    sin = torch.randn(b, t, d, generator=g, dtype=torch.float64)
    out = lam.apply_rope(q, cos, sin)
    assert out.shape == (b, t, nh, d)
    half = d // 2
    for i in range(b):
        for j in range(t):
            for h in range(nh):
                for e in range(d):
                    partner = -q[i, j, h, e + half] if e < half else q[i, j, h, e - half]
                    want = q[i, j, h, e] * cos[i, j, e] + partner * sin[i, j, e]
                    assert math.isclose(out[i, j, h, e].item(), want.item(), rel_tol=1e-12, abs_tol=1e-12)


def _loop_prompt_attention(q, k_p, v_p, softmax_dtype):
    b, t, nh, d = q.shape
    nkv = k_p.shape[0]
    out = torch.zeros(b, t, nh * d, dtype=q.dtype)
    for i in range(b):
        for j in range(t):
            for h in range(nh):
                kv = h // (nh // nkv)
                scores = k_p[kv] @ q[i, j, h]  # (L,)
                probs = torch.softmax(scores.to(softmax_dtype), dim=0).to(v_p.dtype)
                out[i, j, h * d : (h + 1) * d] = probs @ v_p[kv]
    return out


def test_prompt_attention_groups_heads_and_softmaxes_in_fp32():
    g = torch.Generator().manual_seed(1)
    b, t, nh, nkv, L, d = 2, 3, 6, 2, 4, 5
    q = torch.randn(b, t, nh, d, generator=g, dtype=torch.float64) * 3
    k_p = torch.randn(nkv, L, d, generator=g, dtype=torch.float64)
    v_p = torch.randn(nkv, L, d, generator=g, dtype=torch.float64)
    out = lam.prompt_attention(q, k_p, v_p)
    assert out.shape == (b, t, nh * d) and out.dtype == torch.float64
    expected = _loop_prompt_attention(q, k_p, v_p, torch.float32)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)
    # the fp32 softmax is visible against an fp64 one
    assert (out - _loop_prompt_attention(q, k_p, v_p, torch.float64)).abs().max() > 1e-10
    # one kv head shared by all query heads; as many kv heads as query heads
    for n_kv in (1, nh):
        kp, vp = k_p[:1].repeat(n_kv, 1, 1), v_p[:1].repeat(n_kv, 1, 1) + torch.arange(n_kv)[:, None, None]
        torch.testing.assert_close(
            lam.prompt_attention(q, kp, vp), _loop_prompt_attention(q, kp, vp, torch.float32), atol=1e-12, rtol=0
        )


# --- config, PEFT fields ---------------------------------------------------------------------------------------


def test_config_fields_and_refusals():
    cfg = lam.LlamaAdapterConfig(adapter_len=4, adapter_layers=2, target_modules="attn")
    assert cfg.target_modules == ["attn"] and cfg.adapter_len == 4 and cfg.adapter_layers == 2
    assert lam.LlamaAdapterConfig().adapter_len == 10 and lam.LlamaAdapterConfig().adapter_layers == 1
    assert lam.LlamaAdapterConfig(target_modules=["self_attn"]).target_modules == ["self_attn"]
    assert lam.LlamaAdapterConfig().target_modules is None
    for field in ("adapter_len", "adapter_layers"):
        for bad in (0, -1, 1.5, None, True):
            with pytest.raises(AdapterConfigError) as err:
                lam.LlamaAdapterConfig(**{field: bad})
            assert str(err.value) == f"llama_adapter: {field} must be an integer > 0, got {bad!r}"
    for tm in (["a", "b"], [r".*attn"], ["1attn"], ["self-attn"]):
        with pytest.raises(AdapterConfigError) as err:
            lam.LlamaAdapterConfig(target_modules=tm)
        assert str(err.value) == (
            "llama_adapter: target_modules must be the attribute name of the attention modules, e.g. 'self_attn' "
            f"(or None for the architecture's default), got {tm!r}"
        )
    with pytest.raises(AdapterConfigError) as err:
        lam.LlamaAdapterConfig(exclude_modules=["x"])
    assert str(err.value).startswith("llama_adapter: exclude_modules=['x'] is not supported; the adapted layers")
    with pytest.raises(AdapterConfigError) as err:
        lam.LlamaAdapterConfig(modules_to_save=["lm_head"])
    assert str(err.value).startswith("llama_adapter: modules_to_save=['lm_head'] is not supported (PEFT's adap")
    with pytest.raises(AdapterConfigError) as err:
        lam.LlamaAdapterConfig(layers_to_transform=[0])
    assert str(err.value).startswith("llama_adapter: layers_to_transform=[0] is not supported; the adapted layers")
    lam.LlamaAdapterConfig(modules_to_save=[])  # empty is fine


def test_peft_config_conversion():
    cfg = lam.LlamaAdapterConfig(adapter_len=7, adapter_layers=3)
    assert lam._to_peft(cfg) == {"peft_type": "ADAPTION_PROMPT", "adapter_len": 7, "adapter_layers": 3}
    back = lam._from_peft({"adapter_len": 5, "adapter_layers": 2, "target_modules": "attn", "peft_type": "x"})
    assert (back.adapter_len, back.adapter_layers, back.target_modules) == (5, 2, ["attn"])
    assert lam._from_peft({"adapter_len": 5, "adapter_layers": 2}).target_modules is None
    method = la.get_method("llama_adapter")
    assert method.name == "llama_adapter" and method.peft_type == "ADAPTION_PROMPT"
    assert method.config_cls is lam.LlamaAdapterConfig
    assert method.config_to_peft(cfg) == lam._to_peft(cfg)
    assert lam.SUPPORTED == {
        "llama": ("rope", "self_attn"),
        "mistral": ("rope", "self_attn"),
        "qwen2": ("rope", "self_attn"),
        "gpt2": ("gpt2", "attn"),
    }


# --- the holder on its own ---------------------------------------------------------------------------------------


def test_holder_init_repr_and_idle_hooks():
    torch.manual_seed(4)
    expected_prompt = torch.randn(1, 3, 8)
    torch.manual_seed(4)
    h = lam.AdaptionPrompt("rope", 3, 8, 4, 2, 2, device="cpu")
    assert torch.equal(h.adaption_prompt.detach(), expected_prompt)
    assert torch.equal(h.adaption_gate.detach(), torch.zeros(1))
    assert (h.flavour, h.n_heads, h.n_kv, h.head_dim, h.enabled, h.active) == ("rope", 4, 2, 2, True, True)
    assert h._prompt_kv is None and h._rope is None and h._query is None
    assert h.extra_repr() == "rope, adapter_len=3, heads=4/2 kv, head_dim=2"
    assert dict(h.named_parameters()).keys() == {"adaption_prompt", "adaption_gate"}
    # Before any attention call the query/output hooks do nothing.
    x = torch.ones(1, 2, 8)
    h.after_query(None, (x,), x)
    assert h._query is None
    assert h.before_output(None, (x,)) is None
    assert h.after_attention(None, (x,), (x, None)) is None
    # An output projection reached without a query projection is refused.
    h._prompt_kv = (torch.zeros(2, 3, 2), torch.zeros(2, 3, 2))
    with pytest.raises(UnsupportedLayerError) as err:
        h.before_output(None, (x,))
    assert str(err.value) == (
        "llama_adapter: the attention produced its output without projecting queries first; its forward is not "
        "one of the transformers ['gpt2', 'llama', 'mistral', 'qwen2'] attentions this method supports"
    )


def test_holder_hooks_pass_extra_arguments_through():
    h = lam.AdaptionPrompt("gpt2", 2, 8, 2, 2, 4, device="cpu")
    x = torch.randn(1, 3, 8)
    extra = object()
    h._prompt_kv = (torch.zeros(2, 2, 4), torch.ones(2, 2, 4))  # uniform attention to values of 1
    h.after_query(None, (x,), torch.arange(24.0).reshape(1, 1, 24).expand(1, 3, 24))
    assert torch.equal(h._query, torch.arange(8.0).reshape(1, 1, 8).expand(1, 3, 8))  # first third of c_attn
    out = h.after_attention(None, (x,), (x, extra, 5))
    assert len(out) == 3 and out[1] is extra and out[2] == 5
    assert torch.equal(out[0], x + 1)
    assert h._prompt_kv is None and h._query is None and h._rope is None  # cleared by the term
    r = lam.AdaptionPrompt("rope", 2, 8, 2, 2, 4, device="cpu")
    r._prompt_kv = (torch.zeros(2, 2, 4), torch.full((2, 2, 4), 2.0))
    q = torch.randn(1, 3, 8)
    r.after_query(None, (x,), q)
    assert r._query is q
    new = r.before_output(None, (x, extra))
    assert len(new) == 2 and new[1] is extra and torch.equal(new[0], x + 2)


# --- one attention against the formula --------------------------------------------------------------------------


def tiny_mistral() -> nn.Module:
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=64,
        head_dim=16,
    )
    return MistralForCausalLM(cfg).eval()


def tiny_qwen2() -> nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        vocab_size=64,
        max_position_embeddings=64,
    )
    return Qwen2ForCausalLM(cfg).eval()


ROPE_MODELS = {
    "llama_bias": lambda: tiny_llama(attention_bias=True, num_hidden_layers=3),
    "mistral_wide_heads": tiny_mistral,
    "qwen2_one_kv": tiny_qwen2,
}


def _randomize(holder: lam.AdaptionPrompt, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        holder.adaption_prompt.copy_(torch.randn(holder.adaption_prompt.shape, generator=g))
        holder.adaption_gate.fill_(0.7)


def _rope_reference(attn, holder, x, cos, sin, base_out):
    """base + o_proj.weight · g · softmax(RoPE(q) K_pᵀ/√d) V_p, K_p/V_p with the projections' biases."""
    d = attn.head_dim
    b, t, _ = x.shape
    nh = attn.q_proj.out_features // d
    nkv = attn.k_proj.out_features // d
    prompt, gate = holder.adaption_prompt[0], holder.adaption_gate
    q = F.linear(x, attn.q_proj.weight, attn.q_proj.bias).view(b, t, nh, d)
    rot = torch.cat((-q[..., d // 2 :], q[..., : d // 2]), -1)
    q = q * cos[:, :, None] + rot * sin[:, :, None]
    k = F.linear(prompt, attn.k_proj.weight, attn.k_proj.bias).view(-1, nkv, d)  # (L, n_kv, d)
    v = F.linear(prompt, attn.v_proj.weight, attn.v_proj.bias).view(-1, nkv, d)
    heads = []
    for h in range(nh):
        kv = h // (nh // nkv)
        probs = torch.softmax(q[:, :, h] @ k[:, kv].t() / math.sqrt(d), dim=-1)  # (b, T, L)
        heads.append(gate * probs @ v[:, kv])  # (b, T, d)
    return base_out + torch.cat(heads, -1) @ attn.o_proj.weight.t()


@pytest.mark.parametrize("kind", sorted(ROPE_MODELS))
def test_rope_attention_output_and_gradients_match_the_formula(kind):
    torch.manual_seed(0)
    model = la.inject(ROPE_MODELS[kind](), la.LlamaAdapterConfig(adapter_len=3, adapter_layers=2))
    layers = model.model.layers
    adapted = [i for i, layer in enumerate(layers) if hasattr(layer.self_attn, "adapter")]
    assert adapted == [len(layers) - 2, len(layers) - 1]  # the top adapter_layers
    attn = layers[-1].self_attn
    holder = attn.adapter.default
    _randomize(holder, 1)
    with torch.no_grad():  # transformers initialises biases to 0: give them values, so each one counts
        for proj in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj):
            if proj.bias is not None:
                proj.bias.normal_(generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(2)
    b, t, hidden = 2, 5, attn.q_proj.in_features
    x = torch.randn(b, t, hidden, generator=g)
    cos, sin = model.model.rotary_emb(x, torch.arange(t)[None].expand(b, t))
    with la.disabled(model):
        base_out = attn(x, (cos, sin), None)[0].detach()
    for call in ("positional", "keyword"):
        out = (
            attn(x, (cos, sin), None)[0]
            if call == "positional"
            else attn(x, position_embeddings=(cos, sin), attention_mask=None)[0]
        )
        ref = _rope_reference(attn, holder, x, cos, sin, base_out)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        assert (out - base_out).abs().max() > 1e-3
        w = torch.randn(out.shape, generator=g)
        got = torch.autograd.grad((out * w).sum(), [holder.adaption_prompt, holder.adaption_gate])
        want = torch.autograd.grad((ref * w).sum(), [holder.adaption_prompt, holder.adaption_gate])
        for a, e in zip(got, want):
            torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-4)
            assert a.abs().max() > 0
        assert holder._prompt_kv is None and holder._query is None and holder._rope is None
    # Inactive or disabled: exactly the base, and nothing kept.
    holder.active = False
    assert torch.equal(attn(x, (cos, sin), None)[0], base_out)
    assert holder._prompt_kv is None
    holder.active, holder.enabled = True, False
    assert torch.equal(attn(x, (cos, sin), None)[0], base_out)
    holder.enabled = True
    with pytest.raises(UnsupportedLayerError) as err:
        attn(x, attention_mask=None)
    assert str(err.value) == (
        f"llama_adapter: {type(attn).__name__} was called without position_embeddings=(cos, sin), which this "
        "method reads the rotary embeddings from; use a transformers version whose decoder layers pass them to "
        "the attention"
    )


def test_zero_gate_gives_the_base_and_only_the_gate_learns_first():
    torch.manual_seed(0)
    base = tiny_llama()
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    ref = base(ids).logits
    model = la.inject(base, la.LlamaAdapterConfig(adapter_len=2, adapter_layers=2))
    out = model(ids).logits
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    out.pow(2).mean().backward()
    for layer in model.model.layers:
        h = layer.self_attn.adapter.default
        assert torch.equal(h.adaption_prompt.grad, torch.zeros_like(h.adaption_prompt))
        assert h.adaption_gate.grad.abs().item() > 0


def test_gpt2_attention_output_and_gradients_match_the_formula():
    torch.manual_seed(0)
    model = la.inject(tiny_gpt2(n_layer=3), la.LlamaAdapterConfig(adapter_len=4, adapter_layers=1))
    assert [hasattr(blk.attn, "adapter") for blk in model.transformer.h] == [False, False, True]
    attn = model.transformer.h[2].attn
    holder = attn.adapter.default
    assert holder.extra_repr() == "gpt2, adapter_len=4, heads=4/4 kv, head_dim=16"
    _randomize(holder, 3)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 5, 64, generator=g)
    with la.disabled(model):
        base_out = attn(x)[0].detach()
    out, *rest = attn(x)
    E, d = 64, 16
    q = attn.c_attn(x)[..., :E].view(2, 5, 4, d)
    kv = holder.adaption_prompt[0] @ attn.c_attn.weight + attn.c_attn.bias  # Conv1D: x W + b
    k, v = kv[:, E : 2 * E].view(-1, 4, d), kv[:, 2 * E :].view(-1, 4, d)
    heads = [
        holder.adaption_gate * torch.softmax(q[:, :, h] @ k[:, h].t() / math.sqrt(d), -1) @ v[:, h] for h in range(4)
    ]
    ref = base_out + torch.cat(heads, -1)  # added after c_proj, where PEFT adds it
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert (out - base_out).abs().max() > 1e-3
    w = torch.randn(out.shape, generator=g)
    got = torch.autograd.grad((out * w).sum(), [holder.adaption_prompt, holder.adaption_gate])
    want = torch.autograd.grad((ref * w).sum(), [holder.adaption_prompt, holder.adaption_gate])
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("skip", [[], ["v_proj"], ["k_proj"]], ids=["both", "k_only", "v_only"])
def test_quantized_projections_project_the_prompt_with_their_own_kernel(skip):
    """Either projection quantized sends the prompt through the modules' own forward."""
    torch.manual_seed(0)
    model = la.quantize(tiny_llama(), "nf4", skip=["lm_head", *skip])
    la.inject(model, la.LlamaAdapterConfig(adapter_len=3, adapter_layers=1))
    attn = model.model.layers[1].self_attn
    holder = attn.adapter.default
    _randomize(holder, 5)
    k, v = holder._prompt_keys_values(attn)
    p = holder.adaption_prompt[0]
    d = attn.head_dim
    want_k = attn.k_proj(p).view(3, 2, d).transpose(0, 1) / math.sqrt(d)
    want_v = 0.7 * attn.v_proj(p).view(3, 2, d).transpose(0, 1)
    assert k.dtype == torch.float32 and v.dtype == torch.float32
    torch.testing.assert_close(k, want_k)
    torch.testing.assert_close(v, want_v)
    assert not torch.allclose(want_k * math.sqrt(d) * 0.7, want_v, atol=1e-3)  # k and v are not swapped


def test_term_and_output_hook_follow_the_query_and_output_dtypes():
    """The prompt attention runs in the query's dtype; the GPT-2 term is added in the attention output's dtype."""
    g = torch.Generator().manual_seed(0)
    h = lam.AdaptionPrompt("rope", 2, 8, 2, 2, 4, device="cpu")
    q = torch.randn(1, 3, 8, generator=g).to(torch.bfloat16)
    k, v = torch.randn(2, 2, 4, generator=g), torch.randn(2, 2, 4, generator=g)
    h._prompt_kv, h._query = (k, v), q
    term = h._term()
    assert term.dtype == torch.bfloat16
    want = lam.prompt_attention(q.view(1, 3, 2, 4), k.to(torch.bfloat16), v.to(torch.bfloat16))
    assert torch.equal(term, want)
    gh = lam.AdaptionPrompt("gpt2", 2, 8, 2, 2, 4, device="cpu")
    gh._prompt_kv, gh._query = (k, v), q.float()
    out = torch.zeros(1, 3, 8, dtype=torch.bfloat16)
    new, extra = gh.after_attention(None, (out,), (out, None))
    assert new.dtype == torch.bfloat16 and extra is None


def test_output_projection_hook_adds_in_the_heads_dtype():
    g = torch.Generator().manual_seed(1)
    h = lam.AdaptionPrompt("rope", 2, 8, 2, 2, 4, device="cpu")
    h._prompt_kv = (torch.randn(2, 2, 4, generator=g), torch.randn(2, 2, 4, generator=g))
    h._query = torch.randn(1, 3, 8, generator=g)  # fp32 queries
    heads = torch.zeros(1, 3, 8, dtype=torch.bfloat16)
    (new,) = h.before_output(None, (heads,))
    assert new.dtype == torch.bfloat16


def test_model_type_is_the_first_string_found():
    root = nn.Module()
    root.config = types.SimpleNamespace(model_type=None)  # not a string: keep looking
    root.inner = nn.Module()
    root.inner.config = types.SimpleNamespace(model_type="mistral")
    root.inner.deeper = nn.Module()
    root.inner.deeper.config = types.SimpleNamespace(model_type="gpt2")
    assert lam._model_type(root) == "mistral"
    assert lam._model_type(nn.Sequential(nn.Linear(1, 1))) is None
    assert lam._model_type(tiny_gpt2()) == "gpt2"


def test_holder_parameters_go_to_the_given_device():
    with torch.device("meta"):  # a default-device context does not move the holder off the base's device
        h = lam.AdaptionPrompt("rope", 2, 8, 2, 2, 4, device="cpu")
    assert h.adaption_prompt.device.type == "cpu" and h.adaption_gate.device.type == "cpu"
    m = lam.AdaptionPrompt("rope", 2, 8, 2, 2, 4, device="meta")
    assert m.adaption_prompt.device.type == "meta" and m.adaption_gate.device.type == "meta"


def test_prompt_keys_values_dtypes_on_a_half_base():
    torch.manual_seed(0)
    model = la.inject(tiny_llama().to(torch.bfloat16), la.LlamaAdapterConfig(adapter_len=3, adapter_layers=1))
    attn = model.model.layers[1].self_attn
    holder = attn.adapter.default
    assert holder.adaption_prompt.dtype == torch.float32
    _randomize(holder, 6)
    k, v = holder._prompt_keys_values(attn)
    assert k.dtype == torch.bfloat16 and v.dtype == torch.bfloat16 and k.shape == (2, 3, 16)
    p = holder.adaption_prompt[0].to(torch.bfloat16)
    torch.testing.assert_close(
        k, (F.linear(p, attn.k_proj.weight).view(3, 2, 16).transpose(0, 1) / 4.0), atol=0, rtol=0
    )
    gpt = la.inject(tiny_gpt2().half(), la.LlamaAdapterConfig(adapter_len=2, adapter_layers=2))
    gh = gpt.transformer.h[0].attn.adapter.default
    assert gh.adaption_prompt.dtype == torch.float32 and gh.adaption_gate.dtype == torch.float32
    k, v = gh._prompt_keys_values(gpt.transformer.h[0].attn)
    assert k.dtype == torch.float16 and v.dtype == torch.float16 and k.shape == (4, 2, 16)


# --- injection refusals --------------------------------------------------------------------------------------


class _Attn(nn.Module):
    def __init__(self, hidden=12, q=16, k=8, v=8, o=16, head_dim=4, bias=False) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.q_proj = nn.Linear(hidden, q, bias=bias)
        self.k_proj = nn.Linear(hidden, k, bias=bias)
        self.v_proj = nn.Linear(hidden, v, bias=bias)
        self.o_proj = nn.Linear(o, hidden, bias=bias)


def _bad(name: str, attn: nn.Module, why: str) -> str:
    return (
        f"llama_adapter: cannot adapt {name!r} ({type(attn).__name__}): {why}; supported attentions are the "
        "transformers ['gpt2', 'llama', 'mistral', 'qwen2'] ones"
    )


def test_shape_of_rope_attentions():
    assert lam._shape_of("a", _Attn(), "rope") == (12, 4, 2, 4)
    assert lam._shape_of("a", _Attn(q=6, k=6, v=6, o=6, head_dim=1), "rope") == (12, 6, 6, 1)
    cases = [
        (dict(head_dim=0), "it has no integer head_dim attribute"),
        (dict(head_dim=-4), "it has no integer head_dim attribute"),
        (dict(head_dim=4.0), "it has no integer head_dim attribute"),
        (dict(q=18), "q/k/v widths 18/8/8 do not fit head_dim 4"),
        (dict(k=6, v=6), "q/k/v widths 16/6/6 do not fit head_dim 4"),
        (dict(v=4), "q/k/v widths 16/8/4 do not fit head_dim 4"),
        (dict(k=12, v=12), "4 query heads, 3 key/value heads and o_proj input 16 do not fit"),
        (dict(o=12), "4 query heads, 2 key/value heads and o_proj input 12 do not fit"),
    ]
    for kw, why in cases:
        attn = _Attn(**kw)
        with pytest.raises(UnsupportedLayerError) as err:
            lam._shape_of("m.attn", attn, "rope")
        assert str(err.value) == _bad("m.attn", attn, why)
    attn = _Attn()
    del attn.head_dim
    with pytest.raises(UnsupportedLayerError, match="it has no integer head_dim attribute"):
        lam._shape_of("x", attn, "rope")
    attn = _Attn()
    attn.k_proj = nn.Linear(10, 8)  # keys read another width than the queries
    with pytest.raises(UnsupportedLayerError) as err:
        lam._shape_of("x", attn, "rope")
    assert str(err.value) == _bad("x", attn, "4 query heads, 2 key/value heads and o_proj input 16 do not fit")
    for missing in ("q_proj", "k_proj", "v_proj", "o_proj"):
        attn = _Attn()
        setattr(attn, missing, nn.Identity())
        with pytest.raises(UnsupportedLayerError) as err:
            lam._shape_of("x", attn, "rope")
        assert str(err.value) == _bad("x", attn, f"it has no nn.Linear [{missing!r}]")
    attn = _Attn()
    del attn.q_proj, attn.o_proj
    with pytest.raises(UnsupportedLayerError, match=r"it has no nn.Linear \['q_proj', 'o_proj'\]"):
        lam._shape_of("x", attn, "rope")
    for p in ("q_proj", "v_proj"):
        attn = _Attn()
        getattr(attn, p).weight = nn.Parameter(
            torch.zeros(getattr(attn, p).weight.shape, dtype=torch.int8), requires_grad=False
        )
        with pytest.raises(UnsupportedLayerError) as err:
            lam._shape_of("x", attn, "rope")
        assert str(err.value) == _bad(
            "x", attn, "its weights are not floating point (quantized layers are not supported)"
        )


class _GAttn(nn.Module):
    def __init__(self, hidden=8, out=24, head_dim=2, cross=None) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.c_attn = Conv1D(out, hidden)
        if cross is not None:
            self.is_cross_attention = cross


def test_shape_of_gpt2_attentions():
    assert lam._shape_of("g", _GAttn(), "gpt2") == (8, 4, 4, 2)
    assert lam._shape_of("g", _GAttn(cross=False), "gpt2") == (8, 4, 4, 2)
    cases = [
        (_GAttn(cross=True), "it is not a GPT-2 self-attention with a Conv1D c_attn"),
        (_GAttn(out=16), "c_attn maps 8 -> 16, expected 8 -> 24"),
        (_GAttn(head_dim=3), "c_attn maps 8 -> 24, expected 8 -> 24"),
    ]
    linear = _GAttn()
    linear.c_attn = nn.Linear(8, 24)
    cases.append((linear, "it is not a GPT-2 self-attention with a Conv1D c_attn"))
    missing = _GAttn()
    del missing.c_attn
    cases.append((missing, "it is not a GPT-2 self-attention with a Conv1D c_attn"))
    ints = _GAttn()
    ints.c_attn.weight = nn.Parameter(torch.zeros(8, 24, dtype=torch.int8), requires_grad=False)
    cases.append((ints, "its weights are not floating point (quantized layers are not supported)"))
    for attn, why in cases:
        with pytest.raises(UnsupportedLayerError) as err:
            lam._shape_of("h.0.attn", attn, "gpt2")
        assert str(err.value) == _bad("h.0.attn", attn, why)


class _Fake(nn.Module):
    """A 'llama' of ``_Attn`` layers (the injection only reads the config's model_type and the attention)."""

    def __init__(self, n=3, model_type="llama") -> None:
        super().__init__()
        self.config = types.SimpleNamespace(model_type=model_type)
        self.layers = nn.ModuleList(nn.Module() for _ in range(n))
        for layer in self.layers:
            layer.self_attn = _Attn()


def _hook_counts(model):
    return {
        n: (len(m._forward_pre_hooks), len(m._forward_hooks), len(m._forward_pre_hooks_with_kwargs))
        for n, m in model.named_modules()
    }


def test_inject_refusals_change_nothing():
    with pytest.raises(UnsupportedLayerError) as err:
        lam._inject(nn.Linear(2, 2), lam.LlamaAdapterConfig(), "a")
    assert str(err.value) == (
        "llama_adapter: model type None is not supported; supported model types: ['gpt2', 'llama', 'mistral', 'qwen2']"
    )
    with pytest.raises(UnsupportedLayerError, match=r"model type 'bert' is not supported"):
        lam._inject(_Fake(model_type="bert"), lam.LlamaAdapterConfig(), "a")
    model = _Fake()
    before = (_hook_counts(model), list(model.state_dict()))
    with pytest.raises(TargetError) as err:
        lam._inject(model, lam.LlamaAdapterConfig(target_modules="attention"), "a")
    assert str(err.value) == "llama_adapter: no module is named 'attention' in this llama model; use 'self_attn'"
    with pytest.raises(TargetError, match="no module is named 'attn' in this llama model"):
        lam._inject(model, lam.LlamaAdapterConfig(target_modules="attn"), "a")  # not a suffix at a dot
    with pytest.raises(AdapterConfigError) as err:
        lam._inject(model, lam.LlamaAdapterConfig(adapter_layers=4), "a")
    assert str(err.value) == (
        "llama_adapter: adapter_layers=4 but the model has only 3 attention modules named 'self_attn'; use "
        "adapter_layers <= 3"
    )
    with pytest.raises(AdapterConfigError) as err:
        lam._inject(model, lam.LlamaAdapterConfig(adapter_len=16 * 12 + 1, adapter_layers=2), "a")
    assert str(err.value) == (
        "llama_adapter: adapter_len=193 on 'layers.1.self_attn' is far above the layer's dimensions (12,) (at most "
        "192 is accepted, nothing was allocated); the prompt's keys and values span at most hidden=12 dimensions, "
        "so use adapter_len <= 12"
    )
    model.layers[2].self_attn.adapter = 3  # a plain attribute called "adapter"
    model.layers[1].self_attn.adapter = nn.Linear(1, 1)
    with pytest.raises(AdapterConfigError) as err:
        lam._inject(model, lam.LlamaAdapterConfig(adapter_layers=3), "a")
    assert str(err.value) == (
        "llama_adapter: ['layers.1.self_attn', 'layers.2.self_attn'] already have an attribute 'adapter'; eject "
        "it first"
    )
    del model.layers[2].self_attn.adapter, model.layers[1].self_attn.adapter
    bad = _Fake()
    bad.layers[0].self_attn.q_proj = nn.Linear(12, 15)
    with pytest.raises(UnsupportedLayerError, match="'layers.0.self_attn'"):
        lam._inject(bad, lam.LlamaAdapterConfig(adapter_layers=3), "a")
    lam._inject(bad, lam.LlamaAdapterConfig(adapter_layers=2), "a")  # the bad layer is not among the top two
    assert (_hook_counts(model), list(model.state_dict())) == before


def test_inject_builds_holders_hooks_and_the_adapter_record():
    model = _Fake()
    model.layers[2].self_attn.train()
    model.layers[1].self_attn.eval()
    adapter = lam._inject(model, lam.LlamaAdapterConfig(adapter_len=16 * 12, adapter_layers=2), "a")
    assert isinstance(adapter, lam.PromptAdapter)
    assert adapter.targets == ["layers.1.self_attn", "layers.2.self_attn"]
    assert adapter.holders == ["layers.1.self_attn.adapter.a", "layers.2.self_attn.adapter.a"]
    assert adapter.attr == "self_attn"
    for i, training in ((1, False), (2, True)):
        attn = model.layers[i].self_attn
        assert isinstance(attn._modules["adapter"], AdapterSet)
        holder = attn.adapter.a
        assert holder.training is training and holder.adaption_prompt.shape == (1, 192, 12)
        assert (holder.n_heads, holder.n_kv, holder.head_dim, holder.flavour) == (4, 2, 4, "rope")
        ((pre_id, pre_fn),) = attn._forward_pre_hooks.items()
        assert pre_fn == holder.before_attention and attn._forward_pre_hooks_with_kwargs == {pre_id: True}
        assert list(attn.q_proj._forward_hooks.values()) == [holder.after_query]
        assert list(attn.o_proj._forward_pre_hooks.values()) == [holder.before_output]
        assert not attn._forward_hooks and not attn.k_proj._forward_hooks
    assert not hasattr(model.layers[0].self_attn, "adapter")
    assert adapter.summary_rows(model) == [
        ("layers.1.self_attn.adapter.a", "_Attn", "AdaptionPrompt", 192 * 12 + 1),
        ("layers.2.self_attn.adapter.a", "_Attn", "AdaptionPrompt", 192 * 12 + 1),
    ]
    # An explicit attribute name equal to the default; a root attention module counts too.
    other = lam._inject(_Fake(n=1), lam.LlamaAdapterConfig(target_modules="self_attn"), "b")
    assert other.targets == ["layers.0.self_attn"]


def test_peft_state_round_trip_and_fields():
    torch.manual_seed(0)
    model = tiny_llama()
    adapter = lam._inject(model, lam.LlamaAdapterConfig(adapter_len=2, adapter_layers=2), "x")
    state = adapter.peft_state(model)
    names = [f"model.layers.{i}.self_attn" for i in (0, 1)]
    assert list(state) == [f"{n}.{s}" for n in names for s in ("adaption_prompt", "adaption_gate")]
    for n in names:
        holder = model.get_submodule(n).adapter.x
        assert torch.equal(state[f"{n}.adaption_prompt"], holder.adaption_prompt.detach())
        assert torch.equal(state[f"{n}.adaption_gate"], holder.adaption_gate.detach())
        assert not state[f"{n}.adaption_prompt"].requires_grad
    new = {k: torch.randn(v.shape, dtype=torch.float64) for k, v in state.items()}
    adapter.load_peft_state(model, new)
    for n in names:
        holder = model.get_submodule(n).adapter.x
        assert holder.adaption_prompt.dtype == torch.float32 and holder.adaption_gate.dtype == torch.float32
        assert torch.equal(holder.adaption_prompt.detach(), new[f"{n}.adaption_prompt"].float())
        assert torch.equal(holder.adaption_gate.detach(), new[f"{n}.adaption_gate"].float())
    fields = {"adapter_len": 2, "exclude_modules": None, "modules_to_save": None, "target_modules": None, "r": 1}
    assert adapter.peft_config(fields) == {"adapter_len": 2, "target_modules": "self_attn", "r": 1}
    assert lam.METHOD == "llama_adapter" and lam.HOLDER_ATTR == "adapter"


def test_apply_dtype_follows_the_query_projection():
    for make, path in ((tiny_llama, "model.layers.1.self_attn"), (tiny_gpt2, "transformer.h.1.attn")):
        model = make().to(torch.float16)
        adapter = lam._inject(model, lam.LlamaAdapterConfig(adapter_len=2), "a")
        holder = model.get_submodule(path).adapter.a
        assert holder.adaption_prompt.dtype == torch.float32 and holder.adaption_gate.dtype == torch.float32
        holder.to(torch.float16)
        adapter.apply_dtype(model, lam.LlamaAdapterConfig(adapter_len=2))
        assert holder.adaption_prompt.dtype == torch.float32 and holder.adaption_gate.dtype == torch.float32
        adapter.apply_dtype(model, lam.LlamaAdapterConfig(adapter_len=2, adapter_dtype="bfloat16"))
        assert holder.adaption_prompt.dtype == torch.bfloat16 and holder.adaption_gate.dtype == torch.bfloat16


def _flags(m: nn.Module) -> tuple[dict, dict, dict]:
    return (
        dict(m._forward_pre_hooks_with_kwargs),
        dict(m._forward_hooks_with_kwargs),
        dict(m._forward_hooks_always_called),
    )


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_eject_removes_exactly_its_own_hooks_and_holders(make):
    torch.manual_seed(0)
    model = make()
    ids = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(0))
    ref = model(ids).logits
    user_calls = []
    attns = [m for n, m in model.named_modules() if n.endswith(("self_attn", ".attn"))]
    for attn in attns:  # the user's own hooks must survive
        attn.register_forward_pre_hook(lambda m, a, kw: user_calls.append(1), with_kwargs=True)
        attn.register_forward_hook(lambda m, a, o: None, always_call=True)
    before = _hook_counts(model)
    flags_before = [
        (
            dict(m._forward_pre_hooks_with_kwargs),
            dict(m._forward_hooks_with_kwargs),
            dict(m._forward_hooks_always_called),
        )
        for m in model.modules()
    ]
    a = lam._inject(model, lam.LlamaAdapterConfig(adapter_len=2, adapter_layers=2), "a")
    b = lam._inject(model, lam.LlamaAdapterConfig(adapter_len=3, adapter_layers=1), "b")
    for holder in [model.get_submodule(h) for h in a.holders + b.holders]:
        _randomize(holder, 0)
    assert not torch.allclose(model(ids).logits, ref, atol=1e-4)
    a.eject(model)
    top = model.get_submodule(b.targets[0])
    assert list(top.adapter._modules) == ["b"]
    assert not hasattr(model.get_submodule(a.targets[0]), "adapter")
    b_only = model(ids).logits
    assert not torch.allclose(b_only, ref, atol=1e-4)
    b.eject(model)
    assert _hook_counts(model) == before
    assert [
        (
            dict(m._forward_pre_hooks_with_kwargs),
            dict(m._forward_hooks_with_kwargs),
            dict(m._forward_hooks_always_called),
        )
        for m in model.modules()
    ] == flags_before
    assert not any(hasattr(attn, "adapter") for attn in attns)
    user_calls.clear()
    torch.testing.assert_close(model(ids).logits, ref, atol=0, rtol=0)
    assert len(user_calls) == len(attns)


def test_whole_model_round_trip_through_the_library():
    torch.manual_seed(0)
    base = tiny_llama()
    ids = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(3))
    model = la.inject(base, la.LlamaAdapterConfig(adapter_len=2, adapter_layers=2))
    for layer in model.model.layers:
        _randomize(layer.self_attn.adapter.default, 9)
    out = model(ids).logits
    sd = la.adapter_state_dict(model)
    assert sorted(sd) == [
        f"model.layers.{i}.self_attn.adapter.default.{s}" for i in (0, 1) for s in ("adaption_gate", "adaption_prompt")
    ]
    torch.manual_seed(1)
    twin = la.inject(tiny_llama_like(base), la.LlamaAdapterConfig(adapter_len=2, adapter_layers=2))
    la.load_adapter_state_dict(twin, sd)
    torch.testing.assert_close(twin(ids).logits, out, atol=0, rtol=0)


def tiny_llama_like(model: nn.Module) -> nn.Module:
    fresh = tiny_llama()
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if ".adapter." not in k})
    return fresh


def test_before_attention_reads_position_embeddings_from_either_argument():
    """``position_embeddings`` as the second positional argument (and nothing after it) or as a keyword, the
    keyword first; missing or None is refused; an idle holder keeps nothing; GPT-2 reads no rotary embedding."""
    attn = _Attn()
    h = lam.AdaptionPrompt("rope", 2, 12, 4, 2, 4, device="cpu")
    x = torch.zeros(1, 3, 12)
    cos, sin, other = torch.ones(1, 3, 4), torch.zeros(1, 3, 4), (torch.full((1, 3, 4), 2.0),) * 2
    for args, kwargs in (((x, (cos, sin)), {}), ((x,), {"position_embeddings": (cos, sin)})):
        h.before_attention(attn, args, kwargs)
        assert h._rope[0] is cos and h._rope[1] is sin and h._query is None
        k, v = h._prompt_kv
        assert k.shape == (2, 2, 4) and v.shape == (2, 2, 4)
    h.before_attention(attn, (x, other, None), {"position_embeddings": (cos, sin)})
    assert h._rope[0] is cos and h._rope[1] is sin
    for args, kwargs in (((x,), {}), ((x, None), {}), ((x,), {"position_embeddings": None})):
        with pytest.raises(UnsupportedLayerError, match=r"^llama_adapter: _Attn was called without position_emb"):
            h.before_attention(attn, args, kwargs)
    h.before_attention(attn, (x, (cos, sin)), {})
    h._query = torch.zeros(1)
    h.enabled = False
    h.before_attention(attn, (x, (cos, sin)), {})
    assert h._prompt_kv is None and h._rope is None and h._query is None
    g = lam.AdaptionPrompt("gpt2", 2, 8, 4, 4, 2, device="cpu")
    g.before_attention(_GAttn(), (torch.zeros(1, 3, 8), (cos, sin)), {})
    assert g._rope is None and g._prompt_kv[0].shape == (4, 2, 2)


def test_config_accepts_any_python_attribute_name():
    for name in ("Attention", "SelfAttn", "_attn", "a1", "A"):
        assert lam.LlamaAdapterConfig(target_modules=name).target_modules == [name]


def test_inject_puts_the_holders_on_the_query_projection_device():
    model = _Fake()
    with torch.device("meta"):  # a default-device context does not move the prompts off the base's device
        adapter = lam._inject(model, lam.LlamaAdapterConfig(adapter_len=2, adapter_layers=2), "a")
    for h in adapter.holders:
        assert {p.device.type for p in model.get_submodule(h).parameters()} == {"cpu"}
