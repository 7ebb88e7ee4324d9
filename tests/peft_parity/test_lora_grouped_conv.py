"""Grouped-conv LoRA in PEFT's file layout.

PEFT 0.21 builds ``lora_A`` of a grouped conv as an ungrouped conv (in -> r) and ``lora_B`` with the base's
groups; ours keeps ``lora_A`` grouped by default (so ΔW has the base kernel's shape and merges). ``save_peft``
writes the exact block-diagonal equivalent, which PEFT loads with equal outputs and gradients; ``load_peft`` reads
such a file back exactly. A PEFT file whose ``A`` has weights across groups loads into PEFT's own layout
(``grouped_conv_layout="peft"``, also available for training), which equals PEFT's forward and gradients, saves
back in PEFT's layout and, as in PEFT, refuses to merge. DoRA on a grouped conv, which PEFT computes differently,
is refused on save.
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
        mine = ours.get_submodule(name).adapter.default.lora_B.grad
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


def _peft_trained(base: nn.Module) -> nn.Module:
    """PEFT's own grouped-conv LoRA (dense A across groups), with a non-zero B so the adapter matters."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=12, lora_alpha=8, target_modules=["conv", "conv1"]))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return theirs.eval()


def _grads(model: nn.Module, names: tuple[str, ...], peft: bool) -> dict[str, torch.Tensor]:
    """Gradients of lora_A/lora_B of each named module (after a backward), in PEFT's layout on both sides."""
    out = {}
    for name in names:
        if peft:
            layer = model.base_model.model.get_submodule(name)
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            out[f"{name}.A"], out[f"{name}.B"] = a.grad, b.grad
        else:
            layer = model.get_submodule(name).adapter.default
            out[f"{name}.A"], out[f"{name}.B"] = layer.lora_A.grad, layer.lora_B.grad
    return out


def test_peft_grouped_conv_file_with_cross_group_A_loads_in_peft_layout(tmp_path):
    base = _base()
    theirs = _peft_trained(base)
    theirs.save_pretrained(tmp_path / "peft")
    ours = la.load_peft(copy.deepcopy(base), tmp_path / "peft").eval()
    assert la.config_of(ours).grouped_conv_layout == "peft"
    assert ours.conv.adapter.default.lora_A.shape == (12, 8, 3, 3)  # ungrouped, as PEFT's
    y_ours, gx_ours = _input_grad(ours)
    y_peft, gx_peft = _input_grad(theirs)
    assert not torch.allclose(y_peft, base(_x()), atol=1e-3)  # the adapter matters
    torch.testing.assert_close(y_ours, y_peft, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx_ours, gx_peft, atol=1e-5, rtol=1e-5)
    mine, peft_g = _grads(ours, ("conv", "conv1"), False), _grads(theirs, ("conv", "conv1"), True)
    for k in peft_g:
        torch.testing.assert_close(mine[k], peft_g[k], atol=1e-5, rtol=1e-5)
    # Saved back in PEFT's layout, bit for bit, and PEFT loads it with the same outputs.
    la.save_peft(ours, tmp_path / "ours")
    want, got = (
        load_file(tmp_path / "peft" / "adapter_model.safetensors"),
        load_file(tmp_path / "ours" / "adapter_model.safetensors"),
    )
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    torch.testing.assert_close(again(_x()).detach(), y_peft, atol=1e-5, rtol=1e-5)


def test_peft_layout_trained_here_loads_in_peft_with_equal_outputs_and_gradients(tmp_path):
    base = _base()
    cfg = la.LoRAConfig(r=12, alpha=8, target_modules=["conv", "conv1"], grouped_conv_layout="peft")
    ours = la.inject(copy.deepcopy(base), cfg)
    randomize_adapter(ours, seed=2)
    assert ours.conv1.adapter.default.lora_A.shape == (12, 12, 3)
    la.save_peft(ours, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True).eval()
    y_ours, gx_ours = _input_grad(ours.eval())
    y_peft, gx_peft = _input_grad(theirs)
    torch.testing.assert_close(y_peft, y_ours, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx_peft, gx_ours, atol=1e-5, rtol=1e-5)
    mine, peft_g = _grads(ours, ("conv", "conv1"), False), _grads(theirs, ("conv", "conv1"), True)
    for k in peft_g:
        torch.testing.assert_close(peft_g[k], mine[k], atol=1e-5, rtol=1e-5)
    # Cross-group weights are really used: zeroing them changes the output.
    with torch.no_grad():
        a = ours.conv.adapter.default.lora_A
        a.copy_(grouped_to_dense_A(a[:, :2].clone(), 4))
    assert not torch.allclose(ours(_x()), y_ours, atol=1e-4)


@pytest.mark.parametrize("how", ["merge", "eject", "export_merged"])
def test_peft_layout_refuses_to_merge_before_changing_anything(tmp_path, how):
    base = _base()
    ours = la.inject(
        copy.deepcopy(base), la.LoRAConfig(r=12, target_modules=["conv1", "conv"], grouped_conv_layout="peft")
    )
    randomize_adapter(ours, seed=4)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    y = ours(_x()).detach()
    calls = {
        "merge": lambda: la.merge(ours),
        "eject": lambda: la.eject(ours, merge=True),
        "export_merged": lambda: la.export_merged(ours, tmp_path / "out"),
    }
    with pytest.raises(la.NotMergeableError, match=r"on 'conv' is not mergeable: .*grouped_conv_layout='peft'"):
        calls[how]()
    after = ours.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert ours.conv.adapter.default.merged is False and ours.conv1.adapter.default.merged is False
    torch.testing.assert_close(ours(_x()), y, atol=0, rtol=0)
    assert not (tmp_path / "out").exists()
    la.eject(ours)  # without merge it is fine: the exact base comes back
    assert all(torch.equal(ours.state_dict()[k], v) for k, v in base.state_dict().items())


def test_grouped_conv_layout_is_validated_and_refuses_dora():
    with pytest.raises(la.AdapterConfigError, match=r"grouped_conv_layout='dense' is not one of"):
        la.LoRAConfig(grouped_conv_layout="dense")
    model = _base()
    with pytest.raises(la.AdapterConfigError, match=r"use_dora=True with grouped_conv_layout='peft' on the grouped"):
        la.inject(model, la.LoRAConfig(r=12, target_modules=["conv"], use_dora=True, grouped_conv_layout="peft"))
    assert not any(n.endswith("adapter") for n, _ in model.named_modules())


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
