"""Llama-Adapter against PEFT 0.21's adaption prompt: zero-init, the PEFT format both ways, and generation."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from peft import AdaptionPromptConfig, PeftModel, get_peft_model

import lightning_adapters as la
from tests.helpers import randomize_adapter, tiny_gpt2, tiny_llama, token_batch


def tiny_mistral() -> torch.nn.Module:
    """Mistral, hidden 64, 2 layers, 4 heads, 1 KV head."""
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        vocab_size=128,
        max_position_embeddings=128,
    )
    return MistralForCausalLM(cfg).eval()


MODELS = {"llama": tiny_llama, "mistral": tiny_mistral, "gpt2": tiny_gpt2}


def _base(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return MODELS[kind]()


def _peft_adapter(base: torch.nn.Module, layers: int = 2) -> PeftModel:
    """PEFT's adaption prompt with random prompts (its init) and random non-zero gates."""
    model = get_peft_model(copy.deepcopy(base), AdaptionPromptConfig(adapter_len=4, adapter_layers=layers))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("adaption_gate"):
                p.copy_(torch.randn(p.shape, generator=g))
    return model


def test_identity_at_init_and_only_gates_get_gradient_at_step_0():
    base = _base("llama")
    x = token_batch(128)
    ref = base(x).logits
    model = la.inject(copy.deepcopy(base), la.LlamaAdapterConfig(adapter_len=4, adapter_layers=2))
    out = model(x, labels=x)
    assert torch.equal(out.logits, ref)
    out.loss.backward()
    state = {n: p for n, p in model.named_parameters() if p.requires_grad}
    prompts = [p for n, p in state.items() if n.endswith("adaption_prompt")]
    gates = [p for n, p in state.items() if n.endswith("adaption_gate")]
    assert len(prompts) == len(gates) == 2 and len(state) == 4
    assert all(p.grad is not None and torch.count_nonzero(p.grad) == 0 for p in prompts)
    assert all(p.grad.abs().item() > 0 for p in gates)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_peft_adapter_loads_with_equal_logits(kind, tmp_path):
    base = _base(kind)
    x = token_batch(128)
    peft_model = _peft_adapter(base)
    expected = peft_model(x).logits
    assert (expected - base(x).logits).abs().max() > 1e-2  # the adapter changes the output
    peft_model.save_pretrained(tmp_path)
    ours = la.load_peft(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(ours(x).logits, expected, atol=2e-5, rtol=0)
    # Base parameter names are untouched; PEFT moves them under ``.model.``.
    assert set(base.state_dict()) <= set(ours.state_dict())


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_our_adapter_loads_in_peft_with_equal_logits(kind, tmp_path):
    base = _base(kind)
    x = token_batch(128)
    ours = la.inject(copy.deepcopy(base), la.LlamaAdapterConfig(adapter_len=3, adapter_layers=1))
    randomize_adapter(ours, std=0.5)
    expected = ours(x).logits
    la.save_peft(ours, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "ADAPTION_PROMPT"
    assert saved["target_modules"] == ("attn" if kind == "gpt2" else "self_attn")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # PEFT warns about config fields it does not know
        peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(peft_model(x).logits, expected, atol=2e-5, rtol=0)
    assert (expected - base(x).logits).abs().max() > 1e-2


def test_greedy_generation_with_kv_cache_matches_peft(tmp_path):
    base = _base("llama")
    peft_model = _peft_adapter(base)
    peft_model.save_pretrained(tmp_path)
    ours = la.load_peft(copy.deepcopy(base), tmp_path)
    prompt = token_batch(128, shape=(2, 5), seed=3)
    kw = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, use_cache=True, pad_token_id=0)
    with torch.no_grad():
        expected = peft_model.generate(input_ids=prompt, **kw)
        got = ours.generate(prompt, **kw)
        plain = base.generate(prompt, **kw)
    assert got.shape == (2, 17)
    assert torch.equal(got, expected)
    assert not torch.equal(got, plain)
