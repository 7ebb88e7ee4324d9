"""Grouped-conv LoRA in PEFT's file layout.

PEFT 0.21 builds ``lora_A`` of a grouped conv as an ungrouped conv (in -> r) and ``lora_B`` with the base's
groups; ours keeps ``lora_A`` grouped (so ΔW has the base kernel's shape and merges). ``save_peft`` writes the
exact block-diagonal equivalent, which PEFT loads with equal outputs and gradients; ``load_peft`` reads such a
file back exactly, and refuses (naming the module) an ``A`` with weights across groups, which a grouped ΔW cannot
hold. DoRA on a grouped conv, which PEFT computes differently, is refused on save.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

import lightning_adapters as la
from lightning_adapters.methods.lora import dense_to_grouped_A, grouped_to_dense_A
from tests.helpers import randomize_adapter

pytestmark = pytest.mark.filterwarnings("ignore:LoRA adapter added to ConvNd layer with groups")


class GroupedNet(nn.Module):
    """A grouped Conv2d (groups 4, k 3) and a grouped Conv1d (groups 3), both with bias."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 12, 3, padding=1, groups=4)
        self.conv1 = nn.Conv1d(12, 6, 3, padding=1, groups=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)  # (N, 12, H, W)
        return self.conv1(h.flatten(2))  # (N, 6, H·W)


def _base() -> nn.Module:
    torch.manual_seed(0)
    return GroupedNet().eval()


def _x() -> torch.Tensor:
    return torch.randn(2, 8, 5, 5, generator=torch.Generator().manual_seed(0), requires_grad=True)


def _ours(base: nn.Module, seed: int = 1) -> nn.Module:
    model = la.inject(copy.deepcopy(base), la.LoRAConfig(r=12, alpha=8, target_modules=["conv", "conv1"]))
    randomize_adapter(model, seed=seed)
    return model


def _input_grad(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    x = _x()
    y = model(x)
    y.pow(2).sum().backward()
    return y.detach(), x.grad


def test_dense_layout_round_trip_is_exact():
    a = torch.randn(12, 2, 3, 3)  # r 12, in/g 2 for groups 4
    dense = grouped_to_dense_A(a, 4)
    assert dense.shape == (12, 8, 3, 3)
    # Row block j (3 rows) reads input block j (2 channels) only.
    outside = dense.clone()
    for j in range(4):
        assert torch.equal(dense[3 * j : 3 * j + 3, 2 * j : 2 * j + 2], a[3 * j : 3 * j + 3])
        outside[3 * j : 3 * j + 3, 2 * j : 2 * j + 2] = 0
    assert not outside.any()
    assert torch.equal(dense_to_grouped_A(dense, 4), a)
    dense[0, 7, 0, 0] = 1e-30  # one weight across groups
    assert dense_to_grouped_A(dense, 4) is None


def test_ours_to_peft_grouped_conv_outputs_and_gradients(tmp_path):
    base = _base()
    ours = _ours(base)
    la.save_peft(ours, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True).eval()
    y_ours, gx_ours = _input_grad(ours)
    y_peft, gx_peft = _input_grad(theirs)
    torch.testing.assert_close(y_peft, y_ours, atol=1e-5, rtol=0)
    torch.testing.assert_close(gx_peft, gx_ours, atol=1e-5, rtol=0)
    assert not torch.allclose(y_ours, base(_x()), atol=1e-3)  # the adapter matters
    # lora_B has the same layout on both sides, so its gradients compare directly.
    for name in ("conv", "conv1"):
        mine = ours.get_submodule(name).adapter.lora_B.grad
        peft_b = theirs.base_model.model.get_submodule(name).lora_B["default"].weight.grad
        torch.testing.assert_close(peft_b, mine, atol=1e-5, rtol=0)


def test_peft_resave_of_our_file_loads_back_exactly(tmp_path):
    base = _base()
    ours = _ours(base)
    la.save_peft(ours, tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "peft")
    back = la.load_peft(copy.deepcopy(base), tmp_path / "peft")
    want, got = la.adapter_state_dict(ours), la.adapter_state_dict(back)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_peft_grouped_conv_file_with_block_diagonal_A_loads_with_equal_outputs(tmp_path):
    base = _base()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=12, lora_alpha=8, target_modules=["conv", "conv1"]))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, groups in (("conv", 4), ("conv1", 3)):
            layer = theirs.base_model.model.get_submodule(name)
            a = layer.lora_A["default"].weight
            grouped = torch.randn(a.shape[0], a.shape[1] // groups, *a.shape[2:], generator=g)
            a.copy_(grouped_to_dense_A(grouped, groups))
            layer.lora_B["default"].weight.normal_(std=0.1, generator=g)
    theirs.eval().save_pretrained(tmp_path)
    ours = la.load_peft(copy.deepcopy(base), tmp_path).eval()
    y_ours, gx_ours = _input_grad(ours)
    y_peft, gx_peft = _input_grad(theirs)
    torch.testing.assert_close(y_ours, y_peft, atol=1e-5, rtol=0)
    torch.testing.assert_close(gx_ours, gx_peft, atol=1e-5, rtol=0)
    merged = la.eject(copy.deepcopy(ours), merge=True)  # PEFT cannot merge this layer; the converted one can
    torch.testing.assert_close(merged(_x()), y_peft, atol=1e-5, rtol=0)


def test_peft_grouped_conv_file_with_cross_group_A_is_refused(tmp_path):
    base = _base()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=12, lora_alpha=8, target_modules=["conv"]))
    theirs.save_pretrained(tmp_path)  # PEFT's own init: a dense A
    model = copy.deepcopy(base)
    with pytest.raises(la.AdapterStateError, match=r"module 'conv': lora_A.weight mixes input channels across"):
        la.load_peft(model, tmp_path)
    assert not any(n.endswith("adapter") for n, _ in model.named_modules())  # nothing left injected


def test_file_written_for_grouped_conv_has_peft_shapes(tmp_path):
    la.save_peft(_ours(_base()), tmp_path)
    shapes = {k: tuple(v.shape) for k, v in load_file(tmp_path / "adapter_model.safetensors").items()}
    assert shapes == {
        "base_model.model.conv.lora_A.weight": (12, 8, 3, 3),  # ungrouped, as PEFT builds it
        "base_model.model.conv.lora_B.weight": (12, 3, 1, 1),
        "base_model.model.conv1.lora_A.weight": (12, 12, 3),
        "base_model.model.conv1.lora_B.weight": (6, 4, 1),
    }
    # Our pre-fix layout (grouped A) is refused as a shape mismatch, as PEFT refuses it.
    t = load_file(tmp_path / "adapter_model.safetensors")
    t["base_model.model.conv.lora_A.weight"] = torch.zeros(12, 2, 3, 3)
    save_file(t, tmp_path / "adapter_model.safetensors")
    with pytest.raises(la.AdapterStateError, match=r"mis-shaped .*conv.lora_A.weight: file \(12, 2, 3, 3\)"):
        la.load_peft(_base(), tmp_path)


def test_dora_on_grouped_conv_is_refused_on_save(tmp_path):
    model = la.inject(_base(), la.LoRAConfig(r=12, target_modules=["conv"], use_dora=True))
    with pytest.raises(la.AdapterConfigError, match=r"cannot save 'conv' in PEFT's format: DoRA on a conv with"):
        la.save_peft(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
