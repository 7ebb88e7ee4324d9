"""Shared checks of the LoHa and LoKr parity tests: PEFT -> ours, ours -> PEFT and gradients, on tiny models."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from torch import nn

import lightning_adapters as la
from tests.helpers import SmallCNN, randomize_adapter, tiny_bert, tiny_llama, token_batch


class Conv1dNet(nn.Module):
    """Two Conv1d layers (one dilated) and a linear head on 4-channel sequences of length 12."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(4, 8, 3, padding=1)
        self.conv2 = nn.Conv1d(8, 12, 3, padding=2, dilation=2)
        self.fc = nn.Linear(12, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.fc(x.mean(-1))


def _images() -> torch.Tensor:
    return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def _sequences() -> torch.Tensor:
    return torch.randn(3, 4, 12, generator=torch.Generator().manual_seed(0))


MODELS = {
    "llama": (tiny_llama, lambda: token_batch(128)),
    "bert": (tiny_bert, lambda: token_batch(128)),
    "cnn": (SmallCNN, _images),
    "conv1d": (Conv1dNet, _sequences),
}


def out_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The last hidden state of a transformers model (its logits barely move), else the output."""
    if x.dtype == torch.long:
        return model(x, output_hidden_states=True).hidden_states[-1]
    return model(x)


def randomize_peft(model: nn.Module, seed: int = 0, std: float = 0.3) -> None:
    """Add noise to every trainable tensor of a PEFT model, so its adapter is far from the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * std)


def build(model_name: str) -> tuple[nn.Module, torch.Tensor]:
    make, make_x = MODELS[model_name]
    torch.manual_seed(0)
    return make().eval(), make_x()


def check_peft_to_ours(model_name: str, peft_config, tmp_path: Path) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """PEFT adapter (random weights) -> ``save_pretrained`` -> our ``load_peft``: equal outputs.

    Returns the PEFT model, ours and the input, for further checks on the same weights.
    """
    base, x = build(model_name)
    peft_model = get_peft_model(copy.deepcopy(base), peft_config).eval()
    randomize_peft(peft_model)
    expected = out_of(peft_model, x)
    peft_model.save_pretrained(tmp_path)
    ours = la.load_peft(copy.deepcopy(base), tmp_path).eval()
    got = out_of(ours, x)
    assert torch.allclose(got, expected, atol=2e-5), (got - expected).abs().max()
    assert not torch.allclose(out_of(base, x), expected, atol=1e-3)
    return peft_model, ours, x


def check_ours_to_peft(model_name: str, our_config, peft_type: str, tmp_path: Path) -> dict:
    """Our adapter (random weights) -> ``save_peft`` -> ``PeftModel.from_pretrained``: equal outputs.

    Returns the saved ``adapter_config.json``.
    """
    base, x = build(model_name)
    ours = la.inject(copy.deepcopy(base), our_config)
    randomize_adapter(ours, std=0.3, seed=1)
    expected = out_of(ours, x)
    la.save_peft(ours, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == peft_type
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    got = out_of(peft_model, x)
    assert torch.allclose(got, expected, atol=2e-5), (got - expected).abs().max()
    assert not torch.allclose(out_of(base, x), expected, atol=1e-3)
    return saved


def gradients(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gradients of every trainable tensor for a fixed scalar loss of the output, computed in float64.

    The outputs pass through normalisation layers, whose gradients cancel to a large degree: in float32 two
    correct implementations differ by ~1e-4 relative there, so the maths is compared in float64.
    """
    model = copy.deepcopy(model).double()
    x = x.double() if x.is_floating_point() else x
    out_of(model, x).pow(2).mean().backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def peft_name(our_name: str) -> str:
    """``<module>.adapter.default.<tensor>`` -> ``base_model.model.<module>.<tensor>.default``, PEFT's name."""
    module, _, tensor = our_name.rpartition(".adapter.default.")
    if not tensor:
        return f"base_model.model.{module}"
    return f"base_model.model.{module}.{tensor}.default"


def assert_gradients_match(peft_grads: dict, our_grads: dict, skip: tuple[str, ...] = ()) -> None:
    """Every adapter gradient equals PEFT's within a relative error of 1e-4 (names in ``skip`` excepted)."""
    adapter = {n: g for n, g in our_grads.items() if ".adapter.default." in n}
    assert adapter and len(adapter) == len([n for n in peft_grads if ".default" in n and "modules_to_save" not in n])
    for name, g in adapter.items():
        if name.rpartition(".")[2] in skip:
            continue
        ref = peft_grads[peft_name(name)]
        rel = ((g - ref).norm() / ref.norm().clamp_min(1e-12)).item()
        assert rel < 1e-4, (name, rel)
