"""The app starts from a loaded adapter (``adapter.init_from=<run>/peft``) and trains a second named one on it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lightning_adapters.train import train
from tests.app.conftest import compose_app, tiny

FAST_DEV = [*tiny(), "trainer.fast_dev_run=true"]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("first")
    train(compose_app(FAST_DEV, out))
    return out


def peft_tensors(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "peft" / "adapter_model.safetensors"))


def test_a_run_continues_from_a_loaded_adapter(first_run: Path, tmp_path: Path) -> None:
    """With a zero learning rate the export is the loaded adapter, head included, bit for bit."""
    overrides = [*FAST_DEV, f"adapter.init_from={first_run / 'peft'}", "model.optimizer.lr=0.0", "method.r=4"]
    summary = train(compose_app(overrides, tmp_path))
    assert summary["rank"] == 8  # the loaded adapter's config, not method.r=4
    want, got = peft_tensors(first_run), peft_tensors(tmp_path)
    assert set(got) == set(want) and any("head" in k for k in want)
    for k, v in want.items():
        assert torch.equal(got[k], v), k


def test_a_second_named_adapter_trains_on_the_loaded_one(first_run: Path, tmp_path: Path) -> None:
    overrides = [*tiny(), "adapter.name=b", f"adapter.init_from={{a:{first_run / 'peft'}}}", "method=loha"]
    summary = train(compose_app(overrides, tmp_path))
    assert summary["method"] == "loha"
    # The export and the checkpoint hold a (as loaded, with the head it was trained with) and b (PEFT's layout:
    # adapters not named "default" in sub-folders named after them).
    exported = json.loads((tmp_path / "peft" / "b" / "adapter_config.json").read_text())
    assert exported["peft_type"] == "LOHA" and not exported["modules_to_save"]
    assert json.loads((tmp_path / "peft" / "a" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    (path,) = sorted(tmp_path.rglob("*.ckpt"))[-1:]
    ckpt = torch.load(path, weights_only=True)
    meta = ckpt["lightning_adapters"]
    assert list(meta["adapters"]) == ["a", "b"] and meta["trainable"] == ["b"] and meta["active"] == ["a", "b"]
    loaded = peft_tensors(first_run)
    state = ckpt["state_dict"]
    a_keys = [k for k in state if ".adapter.a." in k]
    # Our "<module>.adapter.a.lora_A" is PEFT's "base_model.model.<module>.lora_A.weight".
    assert a_keys and all(
        torch.equal(state[k], loaded["base_model.model." + k.replace(".adapter.a.", ".") + ".weight"]) for k in a_keys
    )
