"""Adversarial re-run of issue 15: cases the first pass did not cover, checked against round trips."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import lightning_adapters as la
from tests.helpers import randomize_adapter, tiny_llama, token_batch


def _llama():
    torch.manual_seed(0)
    return tiny_llama()


def test_config_edited_after_inject_does_not_change_the_saved_adapter(tmp_path: Path) -> None:
    """inject keeps its own copy of the config: the file describes the adapters built, and loads back equal."""
    model = _llama()
    cfg = la.LoRAConfig(r=2, alpha=4, target_modules=["q_proj"])
    la.inject(model, cfg)
    randomize_adapter(model)
    cfg.r, cfg.alpha, cfg.target_modules = 8, 64, ["v_proj"]
    la.save_peft(model, tmp_path / "a")
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert (saved["r"], saved["lora_alpha"], saved["target_modules"]) == (2, 4, ["q_proj"])
    assert la.config_of(model).r == 2
    other = la.load_peft(_llama(), tmp_path / "a")
    x = token_batch()
    with torch.no_grad():
        assert torch.equal(model(x).logits, other(x).logits)


def test_load_peft_check_finite_false_loads_the_file_as_is(tmp_path: Path) -> None:
    """The refusal of non-finite PEFT values has an opt-out that loads them exactly."""
    la.save_peft(la.inject(tiny_llama(), la.LoRAConfig(r=2, target_modules=["q_proj"])), tmp_path / "a")
    path = tmp_path / "a" / "adapter_model.safetensors"
    tensors = load_file(path)
    key = sorted(tensors)[0]
    tensors[key][0, 0] = float("inf")
    save_file(tensors, path)
    model = la.load_peft(tiny_llama(), tmp_path / "a", check_finite=False)
    a = model.model.layers[0].self_attn.q_proj.adapter.default.lora_A
    assert torch.equal(a, tensors[key])
