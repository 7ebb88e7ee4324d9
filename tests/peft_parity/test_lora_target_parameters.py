"""LoRA on ``nn.Parameter``s (``target_parameters``) against PEFT 0.21's ``ParamWrapper``.

A tiny random Qwen3-MoE (transformers v5 keeps its experts as 3-D ``gate_up_proj`` (E, 2I, H) and ``down_proj``
(E, H, I) parameters, which ``"all-linear"`` cannot reach), and a small module with a transposed 3-D parameter
(``is_transposed``) and a 2-D one: files move both ways with equal outputs and gradients, and merge equals the
unmerged output.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn

import lightning_adapters as la
from lightning_adapters.interop.peft import peft_tensors
from tests.helpers import randomize_adapter


def _moe() -> nn.Module:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_experts=4,
        num_experts_per_tok=2,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=64,
    )
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "experts" in n:
                p.normal_(std=0.2)  # transformers leaves them uninitialised on this path
    return model


class Stacked(nn.Module):
    """``y = x @ W[i]`` for a 3-D ``W`` (E, in, out) stored transposed, then a 2-D ``proj`` parameter."""

    is_transposed = True

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 8, 6) * 0.3)
        self.proj = nn.Parameter(torch.randn(5, 6) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.einsum("bi,eio->beo", x, self.w).sum(1)  # (B, out)
        return h @ self.proj.t()


class StackedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.block = Stacked()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


CASES = {
    "qwen3-moe": (
        _moe,
        dict(target_modules=["q_proj"], target_parameters=["experts.gate_up_proj", "experts.down_proj"]),
        lambda: {"input_ids": torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))},
    ),
    "transposed-and-2d": (
        StackedNet,
        dict(target_modules=[], target_parameters=["block.w", "block.proj"]),
        lambda: {"x": torch.randn(4, 8, generator=torch.Generator().manual_seed(1))},
    ),
    # target_modules left at None on a model without default targets: PEFT adapts only the parameters and writes
    # target_modules null (was refused here: "no default for model type None").
    "parameters-only-none": (
        StackedNet,
        dict(target_parameters=["block.w", "block.proj"]),
        lambda: {"x": torch.randn(4, 8, generator=torch.Generator().manual_seed(1))},
    ),
}


def _out(model: nn.Module, batch: dict) -> torch.Tensor:
    y = model(**batch)
    return y.logits if hasattr(y, "logits") else y


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for n, p in model.named_parameters():
        if p.grad is not None:
            out[n] = p.grad
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_moe_experts_both_ways(tmp_path, case):
    make, kw, batch = CASES[case]
    base = make()
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, lora_alpha=4, **kw))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    theirs.save_pretrained(tmp_path / "peft")
    ours = la.load_peft(copy.deepcopy(base), tmp_path / "peft")
    y_p = _out(theirs, batch())
    y_o = _out(ours, batch())
    assert not torch.allclose(y_p, _out(base, batch()), atol=1e-4)
    torch.testing.assert_close(y_o, y_p, atol=1e-5, rtol=1e-5)
    y_p.pow(2).mean().backward()
    y_o.pow(2).mean().backward()
    gp, go = _grads(theirs), _grads(ours)
    assert len(gp) == len(go) > 0
    # Same factors on both sides: compare each factor's gradient under its PEFT key.
    st = peft_tensors(ours)
    peft_params = dict(theirs.named_parameters())
    ours_grad_by_key = {}
    for name, layer_mod in ours.named_modules():
        adapter = getattr(getattr(layer_mod, "adapter", None), "default", None)
        if adapter is None or not hasattr(adapter, "peft_state"):
            continue
        for suffix, t in adapter.peft_state().items():
            for p in adapter.parameters():
                if p.data_ptr() == t.data_ptr():
                    ours_grad_by_key[f"base_model.model.{name}.{suffix}"] = p.grad
    assert set(ours_grad_by_key) == set(st)
    for key, grad in ours_grad_by_key.items():
        pk = key.replace(".weight", ".default.weight")
        torch.testing.assert_close(grad, peft_params[pk].grad, atol=1e-5, rtol=1e-5)
    # Saved back bit for bit; PEFT reloads it with equal outputs.
    la.save_peft(ours, tmp_path / "ours")
    a, b = (
        load_file(tmp_path / "peft/adapter_model.safetensors"),
        load_file(tmp_path / "ours/adapter_model.safetensors"),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    again = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    torch.testing.assert_close(_out(again, batch()), y_p.detach(), atol=1e-5, rtol=1e-5)
    # Merge equals the unmerged output (ours and PEFT's); unmerge restores the parameters.
    before = {n: p.detach().clone() for n, p in ours.named_parameters() if "adapter" not in n}
    la.merge(ours)
    torch.testing.assert_close(_out(ours, batch()), y_p.detach(), atol=1e-5, rtol=1e-5)
    la.unmerge(ours)
    for n, p in ours.named_parameters():
        if n in before:
            torch.testing.assert_close(p, before[n], atol=1e-6, rtol=0)
    merged = copy.deepcopy(theirs).merge_and_unload()
    torch.testing.assert_close(_out(merged, batch()), y_p.detach(), atol=1e-5, rtol=1e-5)


def test_target_parameters_trained_here_loads_in_peft(tmp_path):
    base = _moe()
    cfg = la.LoRAConfig(r=2, alpha=4, target_modules=["q_proj"], target_parameters=["experts.gate_up_proj"])
    ours = la.inject(copy.deepcopy(base), cfg)
    assert not ours.model.layers[0].mlp.experts.gate_up_proj.requires_grad
    randomize_adapter(ours, seed=4)
    la.save_peft(ours, tmp_path)
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_target_parameters_without_target_modules_adapts_only_the_parameters(tmp_path):
    base = StackedNet()
    ours = la.inject(copy.deepcopy(base), la.LoRAConfig(r=2, target_parameters=["block.proj"]))
    assert sorted(n for n, p in ours.named_parameters() if p.requires_grad) == [
        "block.adapter.default.lora_A.proj",
        "block.adapter.default.lora_B.proj",
    ]
    randomize_adapter(ours, seed=3)
    la.save_peft(ours, tmp_path)
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(ours(x), base(x), atol=1e-4)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(la.TargetError, match="target_modules is None and there is no default"):
        la.inject(copy.deepcopy(base), la.LoRAConfig(r=2))


def test_bad_target_parameters_are_refused():
    with pytest.raises(la.AdapterConfigError, match=r"target_parameters='experts' must be a non-empty list"):
        la.LoRAConfig(target_parameters="experts")
    model = _moe()
    with pytest.raises(la.TargetError, match=r"target_parameters \['experts.nope'\] match no parameter"):
        la.inject(model, la.LoRAConfig(target_modules=["q_proj"], target_parameters=["experts.nope"]))
    with pytest.raises(la.AdapterConfigError, match=r"dropout=0.1 does not work with target_parameters"):
        la.inject(model, la.LoRAConfig(target_modules=["q_proj"], dropout=0.1, target_parameters=["experts.down_proj"]))
    assert not any(n.endswith("adapter") for n, _ in model.named_modules())
