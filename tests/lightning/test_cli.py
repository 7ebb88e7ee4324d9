"""LightningCLI runs the example in experiments/lightning_cli/ from its YAML files, with no parser set-up.

``lora.yaml`` gives the adapter config by ``class_path``, ``loha.yaml`` by the ``{method: ..., ...}`` shorthand;
both must inject into ``self.backbone``, train it, keep the head beside it, and write adapter-only checkpoints.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, seed_everything

import lightning_adapters as la
from experiments.lightning_cli.train import WordValence, main

pytestmark = pytest.mark.slow

EXAMPLE = Path(__file__).resolve().parents[2] / "experiments" / "lightning_cli"
SHORT = ["--model.tiny=true", "--trainer.max_steps=3", "--trainer.limit_val_batches=1", "--data.batch_size=16"]


class CaptureAtStart(Callback):
    """Keeps the adapter and head tensors as they are when training starts."""

    start: dict[str, torch.Tensor] = {}

    def on_train_start(self, trainer, pl_module) -> None:
        CaptureAtStart.start = {
            k: v.detach().clone()
            for k, v in pl_module.state_dict().items()
            if ".adapter.default." in k or k.startswith("head.")
        }


@pytest.mark.parametrize(
    ("yaml", "method", "config_cls"), [("lora", "lora", "LoRAConfig"), ("loha", "loha", "LoHaConfig")]
)
def test_fit_through_lightning_cli_from_yaml(yaml, method, config_cls, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the YAML files write under logs/lightning_cli/
    monkeypatch.setattr("sys.argv", ["train.py"])
    cli = main(
        ["fit", "--config", str(EXAMPLE / "config.yaml"), "--config", str(EXAMPLE / f"{yaml}.yaml"), *SHORT]
        + ["--trainer.callbacks+=tests.lightning.test_cli.CaptureAtStart"]
    )
    model = cli.model
    config = la.config_of(model.backbone)
    assert type(config).__name__ == config_cls and config.r == 8 and config.target_modules == ["query", "value"]
    assert cli.trainer.global_step == 3

    adapter = {f"backbone.{k}": v for k, v in la.adapter_state_dict(model.backbone).items()}
    assert len(adapter) > 0 and all(
        not p.requires_grad for n, p in model.backbone.named_parameters() if ".adapter.default." not in n
    )
    start = CaptureAtStart.start
    assert set(start) == set(adapter) | {"head.weight", "head.bias"}
    changed = [k for k, v in start.items() if not torch.equal(v, model.state_dict()[k])]
    assert "head.weight" in changed and any(".adapter.default." in k for k in changed)  # both trained

    ckpt = torch.load(tmp_path / "logs" / "lightning_cli" / yaml / "checkpoints" / "last.ckpt", weights_only=True)
    assert set(ckpt["state_dict"]) == set(adapter) | {"head.weight", "head.bias"}  # no tensor of the frozen base
    assert ckpt["lightning_adapters"]["method"] == method and ckpt["lightning_adapters"]["module"] == "backbone"

    seed_everything(42)  # the base the CLI built (seed_everything: 42 in config.yaml)
    restored = la.restore_from_checkpoint(
        WordValence(tiny=True), tmp_path / "logs/lightning_cli" / yaml / "checkpoints/last.ckpt"
    )
    ids = torch.randint(1, 257, (4, 8))
    mask = torch.ones_like(ids)
    model.eval()
    restored.eval()
    with torch.no_grad():
        torch.testing.assert_close(restored(ids, mask), model(ids, mask), atol=0, rtol=0)
    assert (tmp_path / "logs" / "lightning_cli" / yaml / "peft" / "adapter_config.json").is_file()


def test_a_bad_adapter_value_in_the_yaml_raises_the_library_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["train.py"])
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "trainer:\n  callbacks:\n    - class_path: lightning_adapters.AdapterCallback\n"
        "      init_args:\n        config: {method: lora, r: 0}\n        module: backbone\n"
    )
    with pytest.raises(la.AdapterConfigError, match=r"^lora: r must be an integer > 0, got 0$") as info:
        main(["fit", "--config", str(EXAMPLE / "config.yaml"), "--config", str(bad), *SHORT])
    assert info.value.__cause__ is None and info.value.__context__ is None  # one error, not a chain of wrappers
