"""LoRA on ``nn.Conv3d`` against PEFT 0.21 (its ``lora.Conv3d``): both directions, gradients, merge, DoRA.

A 3-D conv with a 3×3×3 kernel, stride and padding, and a 1×1×1 one; DoRA's magnitude is (1, out, 1, 1, 1) on
both sides. (PEFT's own merge of a 1×1×1 Conv3d crashes in 0.21.2; ours merges it.)
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

import lightning_adapters as la
from tests.helpers import randomize_adapter


class Net3d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(3, 8, 3, stride=(1, 2, 1), padding=1)
        self.pw = nn.Conv3d(8, 6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw(torch.relu(self.conv(x)))


def _base() -> nn.Module:
    torch.manual_seed(0)
    return Net3d().eval()


def _x() -> torch.Tensor:
    return torch.randn(2, 3, 4, 6, 5, generator=torch.Generator().manual_seed(1), requires_grad=True)


def _run(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    x = _x()
    y = model(x)
    y.pow(2).sum().backward()
    return y.detach(), x.grad


def _lora_grads(model: nn.Module, peft: bool) -> dict[str, torch.Tensor]:
    out = {}
    for n, p in model.named_parameters():
        if p.grad is None or not p.requires_grad:
            continue
        key = n.replace("base_model.model.", "").replace(".default", "").replace(".weight", "")
        key = key.replace("adapter.", "").replace("lora_magnitude_vector", "magnitude")
        out[key] = p.grad
    return out


@pytest.mark.parametrize("dora", [False, True], ids=["plain", "dora"])
def test_conv3d_both_directions_with_gradients_and_merge(tmp_path, dora):
    base = _base()
    theirs = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["conv", "pw"], use_dora=dora)
    )
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    theirs.eval().save_pretrained(tmp_path / "peft")
    ours = la.load_peft(copy.deepcopy(base), tmp_path / "peft").eval()
    assert ours.conv.adapter.default.lora_A.shape == (4, 3, 3, 3, 3) and ours.pw.adapter.default.lora_B.shape == (
        6,
        4,
        1,
        1,
        1,
    )
    y_peft, gx_peft = _run(theirs)
    y_ours, gx_ours = _run(ours)
    assert not torch.allclose(y_peft, base(_x()), atol=1e-3)  # the adapter matters
    torch.testing.assert_close(y_ours, y_peft, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx_ours, gx_peft, atol=1e-5, rtol=1e-5)
    mine, peft_g = _lora_grads(ours, False), _lora_grads(theirs, True)
    assert mine.keys() == peft_g.keys() and len(mine) == (6 if dora else 4)
    for k in mine:
        torch.testing.assert_close(mine[k], peft_g[k].reshape(mine[k].shape), atol=1e-5, rtol=1e-5)
    # Merge (ours and PEFT's) equals the unmerged output.
    merged = la.eject(copy.deepcopy(ours), merge=True)
    torch.testing.assert_close(merged(_x()), y_peft, atol=1e-5, rtol=1e-5)
    # PEFT merges the 3×3×3 layer; its merge of a 1×1×1 Conv3d crashes (its 1×1 test reads two kernel dims only).
    peft_merged = copy.deepcopy(theirs)
    peft_merged.base_model.model.conv.merge()
    torch.testing.assert_close(peft_merged(_x()), y_peft, atol=1e-5, rtol=1e-5)
    # Ours -> PEFT: a fresh adapter trained here loads in PEFT with equal outputs.
    fresh = la.inject(copy.deepcopy(base), la.LoRAConfig(r=4, alpha=8, target_modules=["conv", "pw"], use_dora=dora))
    randomize_adapter(fresh, seed=3)
    la.save_peft(fresh, tmp_path / "ours")
    back = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    torch.testing.assert_close(back(_x()), fresh.eval()(_x()), atol=1e-5, rtol=1e-5)
