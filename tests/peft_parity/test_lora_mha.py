"""LoRA on ``nn.MultiheadAttention`` against PEFT 0.21's ``lora.MultiheadAttention``.

Targeting the MHA module adapts ``in_proj_weight`` and ``out_proj.weight`` together; files move both ways with
equal outputs and gradients, merge equals the unmerged output, and ``out_proj`` alone stays refused (MHA never
calls it), as do the other methods on it.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn

import lightning_adapters as la
from tests.helpers import randomize_adapter


class AttnNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(x, x, x, need_weights=False)[0])


def _base() -> nn.Module:
    torch.manual_seed(0)
    return AttnNet().eval()


def _x() -> torch.Tensor:
    return torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)


def _run(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    x = _x()
    y = model(x)
    y.pow(2).sum().backward()
    grads = {}
    for n, p in model.named_parameters():
        if p.grad is not None:
            k = n.replace("base_model.model.", "").replace(".default", "").replace("base_layer.", "")
            k = k.replace("adapter.out_lora_", "out_proj.lora_").replace("adapter.lora_", "lora_")
            grads[k.removesuffix(".weight")] = p.grad
    return y.detach(), x.grad, grads


def test_mha_peft_to_ours_to_peft_with_gradients_and_merge(tmp_path):
    base = _base()
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["attn"]))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    theirs.save_pretrained(tmp_path / "peft")
    ours = la.load_peft(copy.deepcopy(base), tmp_path / "peft")
    y_p, gx_p, g_p = _run(theirs)
    y_o, gx_o, g_o = _run(ours)
    assert not torch.allclose(y_p, base(_x()), atol=1e-3)
    torch.testing.assert_close(y_o, y_p, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx_o, gx_p, atol=1e-5, rtol=1e-5)
    assert g_o.keys() == g_p.keys() and len(g_o) == 4
    for k in g_o:
        torch.testing.assert_close(g_o[k], g_p[k], atol=1e-5, rtol=1e-5)
    # Saved back bit for bit in PEFT's keys; PEFT reloads it with equal outputs.
    la.save_peft(ours, tmp_path / "ours")
    a, b = (
        load_file(tmp_path / "peft/adapter_model.safetensors"),
        load_file(tmp_path / "ours/adapter_model.safetensors"),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    again = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    torch.testing.assert_close(again(_x()).detach(), y_p, atol=1e-5, rtol=1e-5)
    # Merge: ours and PEFT's agree with the unmerged output; unmerge gives the base back.
    w_in = ours.attn.in_proj_weight.detach().clone()
    la.merge(ours)
    torch.testing.assert_close(ours(_x()).detach(), y_p, atol=1e-5, rtol=1e-5)
    la.unmerge(ours)
    torch.testing.assert_close(ours.attn.in_proj_weight, w_in, atol=1e-6, rtol=0)
    torch.testing.assert_close(copy.deepcopy(theirs).merge_and_unload()(_x()), y_p, atol=1e-5, rtol=1e-5)
    plain = la.eject(copy.deepcopy(ours), merge=True)
    assert type(plain.attn) is nn.MultiheadAttention
    torch.testing.assert_close(plain(_x()), y_p, atol=1e-5, rtol=1e-5)


def test_mha_trained_here_loads_in_peft_and_eval_no_grad_uses_the_adapter(tmp_path):
    base = _base()
    ours = la.inject(copy.deepcopy(base), la.LoRAConfig(r=2, alpha=4, target_modules=["attn"]))
    assert ours.attn.in_proj_weight.requires_grad is False
    randomize_adapter(ours, seed=3)
    la.save_peft(ours, tmp_path)
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    with torch.no_grad():  # MHA's inference fast path reads the (adapted) weights too
        torch.testing.assert_close(ours(_x()), theirs(_x()), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(ours(_x()), base(_x()), atol=1e-3)
    assert ours.attn.in_proj_weight.grad is None
    _, _, grads = _run(ours)  # the four factors get gradients, nothing of the frozen base does
    assert set(grads) == {"attn.lora_A", "attn.lora_B", "attn.out_proj.lora_A", "attn.out_proj.lora_B"}


def test_mha_safe_merge_refusal_restores_both_weights_exactly():
    model = la.inject(_base(), la.LoRAConfig(r=2, target_modules=["attn"]))
    with torch.no_grad():
        model.attn.adapter.default.out_lora_B.fill_(float("inf"))
    w_in, w_out = model.attn.in_proj_weight.clone(), model.attn.out_proj.weight.clone()
    with pytest.raises(la.MergeError, match=r"merge of 'attn' refused: merged out_proj.weight has"):
        la.merge(model, safe=True)
    assert torch.equal(model.attn.in_proj_weight, w_in) and torch.equal(model.attn.out_proj.weight, w_out)


def test_out_proj_alone_and_other_methods_stay_refused():
    with pytest.raises(la.UnsupportedLayerError, match=r"target the nn.MultiheadAttention 'attn' itself"):
        la.inject(_base(), la.LoRAConfig(target_modules=["attn.out_proj"]))
    with pytest.raises(la.UnsupportedLayerError, match=r"loha: cannot adapt \{'attn': 'MultiheadAttention'\}"):
        la.inject(_base(), la.LoHaConfig(target_modules=["attn"]))
    with pytest.raises(la.AdapterConfigError, match=r"use_dora=True on the nn.MultiheadAttention 'attn'"):
        la.inject(_base(), la.LoRAConfig(target_modules=["attn"], use_dora=True))


def test_mha_inside_an_encoder_layer_is_refused_while_the_fast_path_is_on():
    model = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True).eval()
    with pytest.raises(la.UnsupportedLayerError, match=r"'self_attn' belongs to nn.TransformerEncoderLayer"):
        la.inject(model, la.LoRAConfig(r=2, target_modules=["self_attn"]))
    assert type(model.self_attn) is nn.MultiheadAttention
