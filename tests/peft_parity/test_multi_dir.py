"""PEFT directories holding several adapters (``default`` at the root, every other adapter in a sub-folder named
after it), both ways: written by PEFT and loaded here, written here and loaded by PEFT, each adapter with equal
outputs; LoRA + LoRA and mixed methods."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import lightning_adapters as la
from tests.helpers import tiny_llama, token_batch

peft = pytest.importorskip("peft")


def _randomize(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if any(k in n for k in ("lora_", "hada_", "lokr_", ".adapter.")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        out = model(token_batch())
    return out.logits if hasattr(out, "logits") else out[0]


def _ours(model: nn.Module, name: str) -> torch.Tensor:
    la.set_active(model, name)
    return _logits(model)


def _theirs(pm: nn.Module, name: str) -> torch.Tensor:
    pm.set_adapter(name)
    return _logits(pm)


def test_peft_lora_pair_loads_here_with_each_adapters_outputs(tmp_path) -> None:
    base = tiny_llama(num_hidden_layers=1)
    pm = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    pm.add_adapter("other", peft.LoraConfig(r=2, lora_alpha=4, target_modules=["k_proj", "o_proj"], use_rslora=True))
    _randomize(pm, 0)
    pm.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_config.json").is_file() and (tmp_path / "other" / "adapter_config.json").is_file()
    model = la.load_peft(copy.deepcopy(base), tmp_path)
    la.load_peft(model, tmp_path, name="other")
    assert la.adapter_names(model) == ["default", "other"] and la.active(model) == ["default"]
    for name in ("default", "other", "default"):
        torch.testing.assert_close(_ours(model, name), _theirs(pm, name), atol=1e-5, rtol=1e-5)


def test_peft_pair_on_different_embedding_layers_loads_here(tmp_path) -> None:
    # PEFT writes the full base matrix of every embedding layer an adapter of the model wraps into *each* adapter's
    # file (save_embedding_layers): default's file also holds lm_head.base_layer.weight, which only b wraps.
    base = tiny_llama(num_hidden_layers=1)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["embed_tokens", "q_proj"]))
    pm.add_adapter("b", peft.LoraConfig(r=3, lora_alpha=5, target_modules=["lm_head", "v_proj"]))
    _randomize(pm, 6)
    pm.eval()
    pm.save_pretrained(tmp_path)
    model = copy.deepcopy(base)
    la.load_peft(model, tmp_path / "b", name="b")
    la.load_peft(model, tmp_path)
    assert la.active(model) == ["b"]
    # The other adapter's base matrix is not written into the base: it loads exactly as into a fresh model.
    assert torch.equal(model.lm_head.weight, base.lm_head.weight)
    for name in ("default", "b"):
        torch.testing.assert_close(_ours(model, name), _theirs(pm, name), atol=1e-5, rtol=1e-5)
    rows = ["b", "__base__", "default"]
    x = token_batch(shape=(3, 9))
    with torch.no_grad():
        theirs = pm(input_ids=x, adapter_names=rows).logits
        with la.per_sample(model, rows):
            torch.testing.assert_close(model(x).logits, theirs, atol=1e-5, rtol=1e-5)
    # A base matrix that does not fit the model's layer is still refused.
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "adapter_model.safetensors")
    tensors["base_model.model.lm_head.base_layer.weight"] = tensors["base_model.model.lm_head.base_layer.weight"][:5]
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(
        la.AdapterStateError, match=r"mis-shaped lm_head\.base_layer\.weight: file \(5, 64\), model \(128, 64\)"
    ):
        la.load_peft(copy.deepcopy(base), tmp_path)


def test_peft_dirs_of_two_methods_load_here_with_each_adapters_outputs(tmp_path) -> None:
    base = tiny_llama(num_hidden_layers=1)
    lora = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    loha = peft.get_peft_model(
        copy.deepcopy(base), peft.LoHaConfig(r=4, alpha=8, target_modules=["q_proj"]), adapter_name="hada"
    )
    _randomize(lora, 1)
    _randomize(loha, 2)
    lora.save_pretrained(tmp_path)
    loha.save_pretrained(tmp_path)  # a non-default adapter: PEFT writes it to tmp_path/hada
    model = la.load_peft(copy.deepcopy(base), tmp_path)
    la.load_peft(model, tmp_path, name="hada")
    torch.testing.assert_close(_ours(model, "hada"), _theirs(loha, "hada"), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_ours(model, "default"), _theirs(lora, "default"), atol=1e-5, rtol=1e-5)


def test_our_lora_pair_loads_in_peft_with_each_adapters_outputs(tmp_path) -> None:
    base = tiny_llama(num_hidden_layers=1)
    model = copy.deepcopy(base)
    la.inject(model, la.LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    la.inject(model, la.LoRAConfig(r=2, alpha=4, target_modules=["k_proj", "down_proj"]), name="second")
    _randomize(model, 3)
    la.save_peft(model, tmp_path)
    assert json.loads((tmp_path / "second" / "adapter_config.json").read_text())["r"] == 2
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    pm.load_adapter(str(tmp_path / "second"), adapter_name="second")
    for name in ("second", "default"):
        torch.testing.assert_close(_theirs(pm, name), _ours(model, name), atol=1e-5, rtol=1e-5)


def test_our_mixed_methods_load_in_peft_mixed_model(tmp_path) -> None:
    base = tiny_llama(num_hidden_layers=1)
    model = copy.deepcopy(base)
    la.inject(model, la.LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]))
    la.inject(model, la.LoKrConfig(r=4, alpha=8, target_modules=["q_proj", "o_proj"]), name="kron")
    _randomize(model, 4)
    la.save_peft(model, tmp_path)
    pm = peft.PeftMixedModel.from_pretrained(copy.deepcopy(base), tmp_path)
    pm.load_adapter(str(tmp_path / "kron"), adapter_name="kron")
    for name in ("kron", "default"):
        torch.testing.assert_close(_theirs(pm, name), _ours(model, name), atol=1e-5, rtol=1e-5)


def test_names_selects_what_is_written_and_a_lone_named_adapter_goes_to_its_folder(tmp_path) -> None:
    model = tiny_llama(num_hidden_layers=1)
    la.inject(model, la.LoRAConfig(r=2, target_modules=["q_proj"]))
    la.inject(model, la.LoHaConfig(r=2, target_modules=["v_proj"]), name="b")
    la.inject(model, la.LoRAConfig(r=2, target_modules=["k_proj"]), name="c")
    _randomize(model, 5)
    la.save_peft(model, tmp_path / "some", names=["c"])
    assert sorted(p.name for p in (tmp_path / "some").iterdir()) == ["c"]
    la.save_peft(model, tmp_path / "all")
    listed = sorted(p.name for p in (tmp_path / "all").iterdir())
    assert listed == ["adapter_config.json", "adapter_model.safetensors", "b", "c"]
    # Loading back from the full directory, in another order, under the same names.
    again = tiny_llama(num_hidden_layers=1)
    again.load_state_dict(model.state_dict(), strict=False)
    for name in ("c", "default", "b"):
        la.load_peft(again, tmp_path / "all", name=name)
    for name in ("b", "c", "default"):
        torch.testing.assert_close(_ours(again, name), _ours(model, name))


def test_two_adalora_adapters_each_write_their_own_rank_pattern(tmp_path) -> None:
    # Each adapter's adapter_config.json holds its own pruned ranks, not another AdaLoRA adapter's of the model.
    base = tiny_llama(num_hidden_layers=1)
    model = copy.deepcopy(base)
    cfg = dict(init_r=4, target_r=2, total_step=10, target_modules=["q_proj", "v_proj"], init_weights=False)
    la.inject(model, la.AdaLoRAConfig(**cfg))
    la.inject(model, la.AdaLoRAConfig(**cfg), name="second")
    attn = model.model.layers[0].self_attn
    attn.q_proj.adapter.default.apply_mask(torch.tensor([True, False, True, False]))
    attn.v_proj.adapter.second.apply_mask(torch.tensor([False, False, True, True]))
    la.save_peft(model, tmp_path)
    first = json.loads((tmp_path / "adapter_config.json").read_text())["rank_pattern"]
    second = json.loads((tmp_path / "second" / "adapter_config.json").read_text())["rank_pattern"]
    q, v = "model.layers.0.self_attn.q_proj.lora_E", "model.layers.0.self_attn.v_proj.lora_E"
    assert first == {q: [True, False, True, False], v: [True] * 4}
    assert second == {q: [True] * 4, v: [False, False, True, True]}
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    pm.load_adapter(str(tmp_path / "second"), adapter_name="second")
    for name in ("second", "default"):
        torch.testing.assert_close(_theirs(pm, name), _ours(model, name), atol=1e-5, rtol=1e-5)
