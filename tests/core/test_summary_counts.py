"""``summary``'s counts, and adapter state keyed without the adapter's name."""

from __future__ import annotations

import torch

import lightning_adapters as la
from tests.helpers import Wrap


def test_summary_counts_trainable_parameters_and_their_share():
    # Linear(6, 5): 30 + 5 frozen; LoRA r = 2: A (2, 6) + B (5, 2) = 22 trainable; 22 / 57 = 38.5965 %.
    model = la.inject(Wrap(torch.nn.Linear(6, 5)), la.LoRAConfig(r=2, target_modules=["layer"]))
    assert "trainable params: 22 of 57 (38.5965%)" in la.summary(model)


def test_a_whole_model_adapter_state_is_name_free_and_moves_between_names():
    """Llama-Adapter keeps its prompts on the attention modules (``<attn>.adapter.<name>``); its state under one
    name has the same name-free keys as under another, and loads into the other exactly."""
    from tests.helpers import tiny_llama

    torch.manual_seed(0)
    source = la.inject(tiny_llama(), la.LlamaAdapterConfig(adapter_len=2, adapter_layers=2), name="b")
    with torch.no_grad():
        for p in la.adapter_state_dict(source).values():
            p.add_(torch.randn(p.shape))
    target = la.inject(tiny_llama(), la.LlamaAdapterConfig(adapter_len=2, adapter_layers=2), name="c")
    state = la.adapter_state_dict(source, "b")
    assert state.keys() == la.adapter_state_dict(target, "c").keys()
    assert len(state) == 4 and not any(".b." in k or k.endswith(".b") for k in state)
    la.load_adapter_state_dict(target, state, name="c")
    assert all(torch.equal(v, state[k]) for k, v in la.adapter_state_dict(target, "c").items())


def test_summary_lists_a_model_level_adapter_s_holders_with_their_sub_module_prefix():
    """Llama-Adapter's rows are its prompt holders (one per adapted attention), named from the root the summary was
    asked of (``llm.`` first)."""
    from tests.helpers import tiny_llama

    outer = torch.nn.ModuleDict({"llm": tiny_llama()})
    la.inject(outer["llm"], la.LlamaAdapterConfig(adapter_len=2, adapter_layers=1))
    holders = [n for n, m in outer.named_modules() if type(m).__name__ == "AdaptionPrompt"]
    assert len(holders) == 1
    assert holders[0].startswith("llm.model.layers.")
    n = sum(p.numel() for p in outer.get_submodule(holders[0]).parameters())
    rows = [line.split() for line in la.summary(outer).splitlines()]
    assert [holders[0], "LlamaAttention", "AdaptionPrompt", str(n)] in rows, la.summary(outer)
