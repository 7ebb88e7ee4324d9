"""LoRA on a scaled word embedding (transformers' ``BartScaledWordEmbedding``: forward = lookup · embed_scale).

PEFT scales the LoRA term by the same ``embed_scale``; so must we, or the unmerged output disagrees with the
merged one (the base forward scales W + ΔW) and with PEFT's files. Truths: PEFT's outputs and gradients on the
same weights, files both ways, and merged == unmerged.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lightning_adapters as la

peft = pytest.importorskip("peft")
modeling_bart = pytest.importorskip("transformers.models.bart.modeling_bart")


class Tiny(nn.Module):
    def __init__(self, scale: float | torch.Tensor) -> None:
        super().__init__()
        self.emb = modeling_bart.BartScaledWordEmbedding(40, 12, padding_idx=1, embed_scale=1.0)
        self.emb.embed_scale = scale
        self.head = nn.Linear(12, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(ids))


def _pair(scale):
    torch.manual_seed(0)
    ours = Tiny(scale)
    theirs = Tiny(scale)
    theirs.load_state_dict(ours.state_dict())
    la.inject(ours, la.LoRAConfig(r=4, alpha=8, target_modules=["emb"], init_weights=False))
    theirs = peft.get_peft_model(theirs, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["emb"]))
    with torch.no_grad():
        layer = theirs.base_model.model.emb
        layer.lora_embedding_A["default"].copy_(ours.emb.adapter.default.lora_A)
        layer.lora_embedding_B["default"].copy_(ours.emb.adapter.default.lora_B)
    return ours, theirs


@pytest.mark.parametrize("scale", [3.5, torch.tensor(0.25)], ids=["float", "tensor"])
def test_lora_on_a_scaled_embedding_equals_peft(scale, tmp_path):
    ours, theirs = _pair(scale)
    ids = torch.tensor([[2, 5, 1, 39], [7, 7, 0, 3]])
    y, want = ours(ids), theirs(ids)
    torch.testing.assert_close(y, want, rtol=1e-6, atol=1e-6)
    with la.disabled(ours):
        assert not torch.allclose(ours(ids), y)  # the adapter acts, so the scale is tested
    y.square().sum().backward()
    want.square().sum().backward()
    layer = theirs.base_model.model.emb
    torch.testing.assert_close(ours.emb.adapter.default.lora_A.grad, layer.lora_embedding_A["default"].grad)
    torch.testing.assert_close(ours.emb.adapter.default.lora_B.grad, layer.lora_embedding_B["default"].grad)
    # Files both ways.
    la.save_peft(ours, tmp_path / "ours")
    torch.manual_seed(0)
    back = peft.PeftModel.from_pretrained(Tiny(scale), tmp_path / "ours")  # the same base weights as ``ours``
    torch.testing.assert_close(back(ids), y.detach(), rtol=1e-6, atol=1e-6)
    theirs.save_pretrained(tmp_path / "theirs")
    torch.manual_seed(0)
    plain = Tiny(scale)
    la.load_peft(plain, tmp_path / "theirs")
    torch.testing.assert_close(plain(ids), want.detach(), rtol=1e-6, atol=1e-6)
    # Merged (the base forward scales W + ΔW) equals unmerged.
    with torch.no_grad():
        before = ours(ids)
        la.merge(ours)
        torch.testing.assert_close(ours(ids), before, rtol=1e-5, atol=1e-6)


def test_dora_and_other_methods_on_a_scaled_embedding_are_refused():
    model = Tiny(2.0)
    with pytest.raises(la.AdapterConfigError, match="use_dora=True on the scaled embedding 'emb'"):
        la.inject(model, la.LoRAConfig(r=2, target_modules=["emb"], use_dora=True))
    with pytest.raises(la.UnsupportedLayerError, match="with its own forward"):
        la.inject(model, la.OFTConfig(r=2, oft_block_size=0, target_modules=["emb"]))
    assert not any("adapter" in n for n, _ in model.named_modules())
