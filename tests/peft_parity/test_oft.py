"""OFT against PEFT 0.21: adapters move both ways through the PEFT format with equal outputs."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from peft import OFTConfig as PeftOFTConfig
from peft import PeftModel, get_peft_model

import lightning_adapters as la
from tests.helpers import SmallCNN, randomize_adapter, tiny_bert, tiny_llama, token_batch

MODELS = {"llama": tiny_llama, "bert": tiny_bert}

# (model, PEFT OFTConfig kwargs): block size / r, exact and Neumann, block_share, coft, embedding.
CASES = {
    "llama-block8-neumann": ("llama", dict(oft_block_size=8, target_modules=["q_proj", "v_proj"])),
    "llama-r4": ("llama", dict(r=4, oft_block_size=0, target_modules=["q_proj", "v_proj", "down_proj"])),
    "llama-exact": (
        "llama",
        dict(oft_block_size=8, use_cayley_neumann=False, target_modules=["q_proj", "k_proj", "o_proj"]),
    ),
    "llama-neumann3": (
        "llama",
        dict(oft_block_size=8, num_cayley_neumann_terms=3, target_modules=["q_proj", "up_proj"]),
    ),
    "llama-share-coft": (
        "llama",
        dict(oft_block_size=8, block_share=True, coft=True, eps=0.05, target_modules=["q_proj", "v_proj"]),
    ),
    "llama-coft-exact": (
        "llama",
        dict(oft_block_size=16, coft=True, eps=0.3, use_cayley_neumann=False, target_modules=["gate_proj"]),
    ),
    "llama-embed": ("llama", dict(oft_block_size=16, target_modules=["embed_tokens", "v_proj"])),
    "bert-block16-exact": (
        "bert",
        dict(oft_block_size=16, use_cayley_neumann=False, target_modules=["query", "value", "dense"]),
    ),
    "bert-r8-share": (
        "bert",
        dict(r=8, oft_block_size=0, block_share=True, target_modules=["key", "intermediate.dense"]),
    ),
}


def _randomize_peft(model, seed=0, std=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * std)


def _out(model, x):
    # The last hidden state: Bert's classification logits are too small to tell adapters apart.
    return model(x, output_hidden_states=True).hidden_states[-1]


def _ours_config(kw):
    fields = ("r", "oft_block_size", "use_cayley_neumann", "num_cayley_neumann_terms", "block_share", "coft", "eps")
    return la.OFTConfig(target_modules=kw["target_modules"], **{k: kw[k] for k in fields if k in kw})


@pytest.mark.parametrize("case", list(CASES))
def test_peft_to_ours(case, tmp_path):
    model_name, kw = CASES[case]
    torch.manual_seed(0)
    base = MODELS[model_name]()
    x = token_batch(128)
    peft_model = get_peft_model(copy.deepcopy(base), PeftOFTConfig(**kw)).eval()
    _randomize_peft(peft_model)
    expected = _out(peft_model, x)
    peft_model.save_pretrained(tmp_path)
    ours = la.load_peft(copy.deepcopy(base), tmp_path).eval()
    got = _out(ours, x)
    assert torch.allclose(got, expected, atol=2e-5), (got - expected).abs().max()
    assert not torch.allclose(_out(base, x), expected, atol=1e-3)


@pytest.mark.parametrize("case", list(CASES))
def test_ours_to_peft(case, tmp_path):
    model_name, kw = CASES[case]
    torch.manual_seed(0)
    base = MODELS[model_name]()
    x = token_batch(128)
    ours = la.inject(copy.deepcopy(base), _ours_config(kw))
    randomize_adapter(ours, seed=1)
    expected = _out(ours, x)
    la.save_peft(ours, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "OFT" and saved["oft_block_size"] == kw["oft_block_size"]
    assert "auto_adjust" not in saved
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    got = _out(peft_model, x)
    assert torch.allclose(got, expected, atol=2e-5), (got - expected).abs().max()


def test_auto_adjusted_block_sizes_load_with_peft_shapes(tmp_path):
    """PEFT silently turns block size 100 into 64 on 64 features and 128 on 128; load_peft reproduces both."""
    torch.manual_seed(0)
    base = tiny_llama()
    x = token_batch(128)
    kw = dict(oft_block_size=100, target_modules=["q_proj", "down_proj"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(copy.deepcopy(base), PeftOFTConfig(**kw)).eval()
    _randomize_peft(peft_model)
    expected = _out(peft_model, x)
    peft_model.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="oft_block_size=100"):
        ours = la.load_peft(copy.deepcopy(base), tmp_path).eval()
    blocks = {
        n.rsplit(".", 1)[-1]: m.adapter.default.block_size for n, m in ours.named_modules() if hasattr(m, "adapter")
    }
    assert blocks == {"q_proj": 64, "down_proj": 128}
    assert torch.allclose(_out(ours, x), expected, atol=2e-5)
    with pytest.raises(
        la.AdapterConfigError, match=r"valid oft_block_size values for this layer: \[2, 4, 8, 16, 32, 64\]"
    ):
        la.inject(copy.deepcopy(base), la.OFTConfig(**kw))


def test_saved_keys_and_shapes_match_peft(tmp_path):
    torch.manual_seed(0)
    base = tiny_llama()
    kw = dict(oft_block_size=8, block_share=False, target_modules=["q_proj", "v_proj", "embed_tokens"])
    get_peft_model(copy.deepcopy(base), PeftOFTConfig(**kw)).save_pretrained(tmp_path / "peft")
    la.save_peft(la.inject(copy.deepcopy(base), _ours_config(kw)), tmp_path / "ours")
    from safetensors.torch import load_file

    theirs = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    mine = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    adapter_only = {k: tuple(v.shape) for k, v in theirs.items() if ".base_layer." not in k}
    assert adapter_only == {k: tuple(v.shape) for k, v in mine.items()}
    assert any(k.endswith("embed_tokens.oft_embedding_R.weight") for k in mine)


def test_gradients_match_peft(tmp_path):
    torch.manual_seed(0)
    base = tiny_llama()
    x = token_batch(128)
    kw = dict(oft_block_size=8, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"])
    peft_model = get_peft_model(copy.deepcopy(base), PeftOFTConfig(**kw))
    _randomize_peft(peft_model)
    peft_model.save_pretrained(tmp_path)
    ours = la.load_peft(copy.deepcopy(base), tmp_path)
    peft_model.train()
    ours.train()
    peft_model(x, labels=x).loss.backward()
    ours(x, labels=x).loss.backward()
    theirs = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    for name, g in ((n, p.grad) for n, p in ours.named_parameters() if p.requires_grad):
        module = name.rpartition(".adapter.default.")[0]
        key = "oft_embedding_R" if module.endswith("embed_tokens") else "oft_R"
        ref = theirs[f"base_model.model.{module}.{key}.default.weight"]
        assert (g - ref).norm() / ref.norm() < 1e-4, name


def test_conv_merged_matches_peft_merge(tmp_path):
    """PEFT's unmerged Conv2d k>1 forward is not its own merge; our forward equals PEFT's merged weights."""
    torch.manual_seed(0)
    base = SmallCNN().eval()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    peft_model = get_peft_model(copy.deepcopy(base), PeftOFTConfig(oft_block_size=9, target_modules=["conv1", "conv2"]))
    _randomize_peft(peft_model)
    peft_model.save_pretrained(tmp_path)
    merged = peft_model.merge_and_unload().eval()
    ours = la.load_peft(copy.deepcopy(base), tmp_path).eval()
    assert torch.allclose(ours(x), merged(x), atol=2e-5)
    assert not torch.allclose(base(x), merged(x), atol=1e-3)
    plain = la.eject(ours, merge=True)
    for k, v in merged.state_dict().items():
        assert torch.allclose(plain.state_dict()[k], v, atol=1e-6), k
