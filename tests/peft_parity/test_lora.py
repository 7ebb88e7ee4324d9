"""LoRA against PEFT 0.21: adapters move both ways through the PEFT format with equal outputs."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import lightning_adapters as la
from tests.helpers import SmallCNN, randomize_adapter, tiny_bert, tiny_gpt2, tiny_llama, token_batch


def _randomize_peft(model, seed=0, std=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * std)


def _images():
    return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


MODELS = {
    "llama": (tiny_llama, lambda: token_batch(128)),
    "bert": (tiny_bert, lambda: token_batch(128)),
    "gpt2": (tiny_gpt2, lambda: token_batch(128)),
    "cnn": (SmallCNN, _images),
}

# (model, PEFT LoraConfig kwargs) — every variant the issue names.
CASES = {
    "llama-qv": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
    "llama-all-linear": ("llama", dict(r=4, lora_alpha=16, target_modules="all-linear")),
    "llama-rslora": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=True)),
    "llama-dora": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True)),
    "llama-embed": ("llama", dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])),
    "llama-embed-dora": ("llama", dict(r=4, lora_alpha=8, target_modules=["embed_tokens"], use_dora=True)),
    "llama-regex": ("llama", dict(r=2, lora_alpha=4, target_modules=r".*\.layers\.1\.mlp\.(up|down)_proj")),
    "llama-patterns": (
        "llama",
        dict(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj"],
            rank_pattern={"v_proj": 2},
            alpha_pattern={"q_proj": 3},
        ),
    ),
    "bert-save": ("bert", dict(r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"])),
    "bert-dora-all": (
        "bert",
        dict(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True, exclude_modules=["classifier"]),
    ),
    "gpt2-conv1d": ("gpt2", dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)),
    "gpt2-dora": ("gpt2", dict(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, use_dora=True)),
    "cnn": ("cnn", dict(r=4, lora_alpha=8, target_modules=["conv1", "conv2", "fc"])),
    "cnn-dora": ("cnn", dict(r=4, lora_alpha=8, target_modules=["conv1", "conv2"], use_dora=True)),
}


def _out(model, x):
    y = model(x)
    return y if isinstance(y, torch.Tensor) else y.logits


@pytest.mark.parametrize("case", list(CASES))
def test_peft_to_ours(case, tmp_path):
    model_name, kw = CASES[case]
    make, make_x = MODELS[model_name]
    torch.manual_seed(0)
    base = make().eval()
    x = make_x()
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(**kw)).eval()
    _randomize_peft(peft_model)
    expected = _out(peft_model, x)
    peft_model.save_pretrained(tmp_path)
    ours = la.load_peft(copy.deepcopy(base), tmp_path).eval()
    assert torch.allclose(_out(ours, x), expected, atol=2e-5), (_out(ours, x) - expected).abs().max()
    assert not torch.allclose(_out(base, x), expected, atol=1e-3)


@pytest.mark.parametrize("case", list(CASES))
def test_ours_to_peft(case, tmp_path):
    model_name, kw = CASES[case]
    make, make_x = MODELS[model_name]
    torch.manual_seed(0)
    base = make().eval()
    x = make_x()
    cfg = la.LoRAConfig(
        r=kw["r"],
        alpha=kw["lora_alpha"],
        target_modules=kw["target_modules"],
        use_rslora=kw.get("use_rslora", False),
        use_dora=kw.get("use_dora", False),
        modules_to_save=kw.get("modules_to_save"),
        exclude_modules=kw.get("exclude_modules"),
        rank_pattern=kw.get("rank_pattern", {}),
        alpha_pattern=kw.get("alpha_pattern", {}),
    )
    ours = la.inject(copy.deepcopy(base), cfg)
    randomize_adapter(ours, seed=1)
    if cfg.modules_to_save:
        with torch.no_grad():
            for n, p in ours.named_parameters():
                if n.startswith("classifier."):
                    p.add_(1.0)
    expected = _out(ours, x)
    la.save_peft(ours, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["lora_alpha"] == kw["lora_alpha"]
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    got = _out(peft_model, x)
    assert torch.allclose(got, expected, atol=2e-5), (got - expected).abs().max()


def test_saved_keys_match_peft(tmp_path):
    torch.manual_seed(0)
    base = tiny_llama()
    kw = dict(r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens"], use_dora=True)
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(**kw))
    peft_model.save_pretrained(tmp_path / "peft")
    ours = la.inject(
        copy.deepcopy(base), la.LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "embed_tokens"], use_dora=True)
    )
    la.save_peft(ours, tmp_path / "ours")
    from safetensors.torch import load_file

    theirs = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    mine = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    # PEFT also writes the full base embedding when an embedding is targeted; adapter files here never hold
    # base weights (the base is the same model on both sides).
    adapter_only = {k: tuple(v.shape) for k, v in theirs.items() if ".base_layer." not in k}
    assert len(adapter_only) < len(theirs)
    assert adapter_only == {k: tuple(v.shape) for k, v in mine.items()}


def test_merge_matches_peft_merge_and_unload(tmp_path):
    torch.manual_seed(0)
    base = tiny_llama()
    x = token_batch(128)
    peft_model = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True)
    )
    _randomize_peft(peft_model)
    peft_model.save_pretrained(tmp_path)
    merged_peft = peft_model.merge_and_unload()
    ours = la.eject(la.load_peft(copy.deepcopy(base), tmp_path), merge=True)
    sd_p, sd_o = merged_peft.state_dict(), ours.state_dict()
    assert set(sd_p) == set(sd_o)
    for k in sd_p:
        assert torch.allclose(sd_p[k], sd_o[k], atol=1e-6), k
    assert torch.allclose(_out(ours, x), _out(merged_peft, x), atol=2e-5)


def test_gradients_match_peft(tmp_path):
    torch.manual_seed(0)
    base = tiny_llama()
    x = token_batch(128)
    peft_model = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True, lora_dropout=0.0)
    )
    _randomize_peft(peft_model)
    peft_model.save_pretrained(tmp_path)
    ours = la.load_peft(copy.deepcopy(base), tmp_path)
    peft_model.train()
    ours.train()
    peft_model(x, labels=x).loss.backward()
    ours(x, labels=x).loss.backward()
    theirs = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    mine = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert len(theirs) == len(mine)
    for name, g in mine.items():
        module, _, param = name.rpartition(".adapter.default.")
        pname = {
            "lora_A": "lora_A.default.weight",
            "lora_B": "lora_B.default.weight",
            "magnitude": "lora_magnitude_vector.default.weight",
        }[param]
        ref = theirs[f"base_model.model.{module}.{pname}"]
        rel = (g - ref).norm() / ref.norm().clamp_min(1e-12)
        assert rel < 1e-4, (name, rel)
