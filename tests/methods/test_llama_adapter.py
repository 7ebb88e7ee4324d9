"""Llama-Adapter beyond PEFT: Qwen2, head_dim·heads ≠ hidden, the formula recomputed by hand, training, merge,
eject, bad input and the dtype policy."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightning_adapters as la
from tests.helpers import randomize_adapter, tiny_bert, tiny_gpt2, tiny_llama, token_batch


def tiny_qwen2() -> nn.Module:
    """Qwen2, hidden 64, 2 layers, 4 heads, 2 KV heads (q/k/v carry biases)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=128,
    )
    return Qwen2ForCausalLM(cfg).eval()


def wide_head_llama() -> nn.Module:
    """Llama whose 4 heads of 32 give q_proj 64 -> 128 (head_dim·heads ≠ hidden), with biases on every
    projection, so o_proj's bias must be added once."""
    return tiny_llama(head_dim=32, attention_bias=True)


MODELS = {"qwen2": tiny_qwen2, "llama_wide_heads": wide_head_llama}


def _base(make) -> nn.Module:
    torch.manual_seed(0)
    return make()


def _snapshot(model: nn.Module):
    hooks = {n: (len(m._forward_pre_hooks), len(m._forward_hooks)) for n, m in model.named_modules()}
    return {k: v.clone() for k, v in model.state_dict().items()}, hooks, {n: type(m) for n, m in model.named_modules()}


def _assert_same(model: nn.Module, snap) -> None:
    sd, hooks, types = snap
    now = model.state_dict()
    assert list(now) == list(sd)
    assert all(torch.equal(now[k], v) for k, v in sd.items())
    assert {n: (len(m._forward_pre_hooks), len(m._forward_hooks)) for n, m in model.named_modules()} == hooks
    assert {n: type(m) for n, m in model.named_modules()} == types


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _expected_attention(attn: nn.Module, kwargs: dict, base_out: torch.Tensor) -> torch.Tensor:
    """The paper's zero-init attention written out: base + o_proj weight (no bias) · g · softmax(Q K_pᵀ/√d) V_p."""
    x = kwargs["hidden_states"]
    cos, sin = kwargs["position_embeddings"]
    holder = attn.adapter.default
    prompt, gate = holder.adaption_prompt[0], holder.adaption_gate
    d = attn.head_dim
    b, t, _ = x.shape
    n_heads = attn.q_proj.out_features // d
    n_kv = attn.k_proj.out_features // d
    q = attn.q_proj(x).view(b, t, n_heads, d).transpose(1, 2)  # (b, h, T, d)
    q = q * cos[:, None] + _rotate_half(q) * sin[:, None]
    k = attn.k_proj(prompt).view(-1, n_kv, d).transpose(0, 1).repeat_interleave(n_heads // n_kv, dim=0)  # (h, L, d)
    v = attn.v_proj(prompt).view(-1, n_kv, d).transpose(0, 1).repeat_interleave(n_heads // n_kv, dim=0)
    scores = torch.einsum("bhtd,hld->bhtl", q, k) / math.sqrt(d)
    heads = gate * torch.einsum("bhtl,hld->bhtd", scores.softmax(-1), v)  # (b, h, T, d)
    return base_out + F.linear(heads.transpose(1, 2).reshape(b, t, -1), attn.o_proj.weight)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_trains_and_matches_the_formula(kind):
    model = la.inject(_base(MODELS[kind]), la.LlamaAdapterConfig(adapter_len=5, adapter_layers=2))
    x = token_batch(128, shape=(2, 12))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    losses = []
    model.train()
    for _ in range(6):
        opt.zero_grad()
        loss = model(x, labels=x).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] - 1e-3
    model.eval()

    attn = model.model.layers[1].self_attn
    assert attn.adapter.default.adaption_gate.abs().item() > 0  # trained away from the zero init
    seen = {}
    h1 = attn.register_forward_pre_hook(lambda m, a, kw: seen.update(kwargs=dict(kw)), with_kwargs=True)
    h2 = attn.register_forward_hook(lambda m, a, out: seen.update(out=out[0]))
    with torch.no_grad():
        model(x)
        h1.remove()
        h2.remove()
        with la.disabled(model):
            base_out = attn(**seen["kwargs"])[0]
        expected = _expected_attention(attn, seen["kwargs"], base_out)
    torch.testing.assert_close(seen["out"], expected, atol=1e-5, rtol=1e-5)
    assert (seen["out"] - base_out).abs().max() > 1e-3


def test_disabled_gives_the_base_and_deepcopy_is_independent():
    base = _base(tiny_qwen2)
    x = token_batch(128)
    ref = base(x).logits
    model = la.inject(copy.deepcopy(base), la.LlamaAdapterConfig(adapter_len=3, adapter_layers=2))
    randomize_adapter(model, std=0.5)
    adapted = model(x).logits
    assert (adapted - ref).abs().max() > 1e-3
    with la.disabled(model):
        assert torch.equal(model(x).logits, ref)
    assert torch.equal(model(x).logits, adapted)
    twin = copy.deepcopy(model)
    assert torch.equal(twin(x).logits, adapted)
    with torch.no_grad():
        twin.model.layers[1].self_attn.adapter.default.adaption_gate.zero_()
    assert torch.equal(model(x).logits, adapted)
    assert not torch.equal(twin(x).logits, adapted)


def test_state_keys_merge_and_eject():
    base = _base(tiny_llama)
    x = token_batch(128)
    ref = base(x).logits
    snap = _snapshot(base)
    model = la.inject(base, la.LlamaAdapterConfig(adapter_len=3, adapter_layers=1))
    randomize_adapter(model, std=0.5)
    assert sorted(la.adapter_state_dict(model)) == [
        "model.layers.1.self_attn.adapter.default.adaption_gate",
        "model.layers.1.self_attn.adapter.default.adaption_prompt",
    ]
    assert "model.layers.1.self_attn.adapter" in la.summary(model)
    adapted = model(x).logits
    with pytest.raises(la.NotMergeableError, match="not mergeable"):
        la.merge(model)
    with pytest.raises(la.NotMergeableError):
        la.eject(model, merge=True)
    assert torch.equal(model(x).logits, adapted)
    la.eject(model)
    _assert_same(model, snap)
    assert torch.equal(model(x).logits, ref)
    # Injecting again after eject works from a clean model.
    la.inject(model, la.LlamaAdapterConfig(adapter_len=3, adapter_layers=1))
    assert torch.equal(model(x).logits, ref)


def test_bad_input_raises_before_changing_anything():
    bert = tiny_bert()
    snap = _snapshot(bert)
    with pytest.raises(la.UnsupportedLayerError, match=r"'bert'.*\['gpt2', 'llama', 'mistral', 'qwen2'\]"):
        la.inject(bert, la.LlamaAdapterConfig())
    _assert_same(bert, snap)
    for make in (tiny_llama, tiny_gpt2):
        model = make()
        snap = _snapshot(model)
        with pytest.raises(la.AdapterConfigError, match="adapter_layers=3 but the model has only 2"):
            la.inject(model, la.LlamaAdapterConfig(adapter_layers=3))
        _assert_same(model, snap)
    with pytest.raises(la.TargetError, match="'self_attn'"):
        la.inject(tiny_llama(), la.LlamaAdapterConfig(target_modules="attention"))
    for bad in (dict(adapter_len=0), dict(adapter_layers=None), dict(target_modules=[r".*attn"])):
        with pytest.raises(la.AdapterConfigError):
            la.LlamaAdapterConfig(**bad)
    with pytest.raises(la.AdapterConfigError, match="exclude_modules"):
        la.LlamaAdapterConfig(exclude_modules=["layers.0.self_attn"])


def test_dtype_policy():
    x = token_batch(128)
    model = la.inject(tiny_llama().to(torch.bfloat16), la.LlamaAdapterConfig(adapter_len=3, adapter_layers=2))
    params = dict(la.adapter_state_dict(model))
    assert params and all(v.dtype == torch.float32 for v in params.values())
    randomize_adapter(model, std=0.5)
    out = model(x).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    # A whole-model cast (Lightning's bf16-true) is undone by re-applying the policy.
    model.to(torch.bfloat16)
    assert all(v.dtype == torch.bfloat16 for v in la.adapter_state_dict(model).values())
    la.apply_dtype_policy(model)
    assert all(v.dtype == torch.float32 for v in la.adapter_state_dict(model).values())
    explicit = la.inject(
        tiny_llama().to(torch.bfloat16),
        la.LlamaAdapterConfig(adapter_len=3, adapter_layers=1, adapter_dtype="bfloat16"),
    )
    assert all(v.dtype == torch.bfloat16 for v in la.adapter_state_dict(explicit).values())


def test_several_named_instances_switch_stack_and_delete() -> None:
    """Two Llama-Adapters and a LoRA: each alone equals a model holding only it, active prompts add their terms to
    the heads before ``o_proj``, and deleting the others leaves exactly the single-adapter model."""
    base = tiny_llama()
    x = token_batch(128)
    cfgs = {"a": la.LlamaAdapterConfig(adapter_len=3, adapter_layers=1), "b": la.LlamaAdapterConfig(adapter_len=2)}
    model = la.inject(copy.deepcopy(base), cfgs["a"], name="a")
    la.inject(model, cfgs["b"], name="b")
    la.inject(model, la.LoRAConfig(r=2, target_modules=["q_proj"]), name="c")
    randomize_adapter(model, std=0.5)
    assert la.adapter_names(model) == ["a", "b", "c"]
    heads = []
    hook = model.model.layers[1].self_attn.o_proj.register_forward_pre_hook(lambda m, args: heads.append(args[0]))
    alone = {}
    for name in ("a", "b"):
        single = la.inject(copy.deepcopy(base), cfgs[name], name=name)
        la.load_adapter_state_dict(single, la.adapter_state_dict(model, name=name))
        la.set_active(model, name)
        alone[name] = model(x).logits
        assert torch.equal(alone[name], single(x).logits)
    with la.disabled(model):
        model(x)
    la.set_active(model, ["a", "b"])
    model(x)
    hook.remove()
    h_a, h_b, plain, h_ab = heads
    assert torch.allclose(h_ab, plain + (h_a - plain) + (h_b - plain), atol=1e-5)
    la.set_active(model, "a")
    la.delete(model, "b")
    la.delete(model, "c")
    single = la.inject(copy.deepcopy(base), cfgs["a"], name="a")
    la.load_adapter_state_dict(single, la.adapter_state_dict(model, name="a"))
    assert model.state_dict().keys() == single.state_dict().keys()
    assert torch.equal(model(x).logits, alone["a"])
    hooks = [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.modules()]
    assert hooks == [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in single.modules()]


def _holders(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if type(m).__name__ == "AdaptionPrompt"]


def _uncached_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    for h in _holders(model):
        h._kv_cache = None
    return model(x).logits


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_eval_prompt_keys_values_are_cached_until_a_source_tensor_changes(make):
    """Eval under no_grad: the second forward reuses each layer's prompt ``K_p``, ``g·V_p`` (the same tensors) and
    gives the uncached logits bit for bit; an in-place write to the prompt, the gate or ``k_proj``/``c_attn``'s
    weight (version counters), or a dtype cast, recomputes them; ``train()`` drops them."""
    x = token_batch(128)
    model = la.inject(_base(make), la.LlamaAdapterConfig(adapter_len=3, adapter_layers=2))
    randomize_adapter(model, std=0.5)
    model.eval()
    holder = _holders(model)[0]
    with torch.no_grad():
        first = model(x).logits
        kv = holder._kv_cache[1]
        assert torch.equal(model(x).logits, first) and holder._kv_cache[1] is kv
        assert torch.equal(_uncached_logits(model, x), first)
        attn = next(m for m in model.modules() if holder in m.modules() and m is not holder and hasattr(m, "adapter"))
        proj = attn.c_attn if make is tiny_gpt2 else attn.k_proj
        for write in (holder.adaption_prompt.mul_, holder.adaption_gate.mul_, proj.weight.mul_):
            model(x)
            write(1.25)
            y = model(x).logits
            assert holder._kv_cache[1] is not kv and not torch.equal(y, first)
            assert torch.equal(_uncached_logits(model, x), y)
            kv, first = holder._kv_cache[1], y
        la.apply_dtype_policy(model)  # no change: the same tensors, the same cache
        assert holder._kv_cache[1] is kv
        model.to(torch.float64)
        y = model(x).logits
        assert holder._kv_cache[1][0].dtype == torch.float64 and torch.equal(_uncached_logits(model, x), y)
    model.train()
    assert all(h._kv_cache is None for h in _holders(model))


def test_prompt_keys_values_are_not_cached_in_training_or_while_the_prompt_gets_a_gradient():
    """The other side of the cache's condition: in training mode, and in eval when autograd records the prompt and
    gate, the keys and values are rebuilt in the graph (the gate and prompt get their gradient every time, equal
    across two calls); a cache filled under ``inference_mode`` is not reused by such a forward."""
    x = token_batch(128)
    model = la.inject(_base(tiny_llama), la.LlamaAdapterConfig(adapter_len=3, adapter_layers=2))
    randomize_adapter(model, std=0.5)
    holder = _holders(model)[0]
    params = [holder.adaption_prompt, holder.adaption_gate]
    for mode in ("train", "eval"):
        model.train(mode == "train")
        if mode == "eval":
            with torch.inference_mode():
                inferred = model(x).logits
        grads = []
        for _ in range(2):
            logits = model(x).logits
            grads.append(torch.autograd.grad(logits.sum(), params))
            # Training keeps none; eval keeps the inference-mode entry, neither used nor replaced here.
            assert holder._kv_cache is None if mode == "train" else holder._kv_cache[1][0].is_inference()
            assert all(g.abs().sum() > 0 for g in grads[-1])
        assert all(torch.equal(a, b) for a, b in zip(*grads))
        if mode == "eval":
            assert torch.equal(logits, inferred)
