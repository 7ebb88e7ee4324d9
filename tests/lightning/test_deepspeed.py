"""Adapters under DeepSpeed ZeRO-2 and ZeRO-3, with and without CPU offload, on two CPU processes (gloo, DeepSpeed's
CPU accelerator).

``tests/lightning/scripts/deepspeed_cpu.py`` trains with Lightning's ``DeepSpeedStrategy`` minus its CUDA-only
checks. Checked: the checkpoint directory holds no frozen tensor and the adapter whole (under ZeRO-3 gathered
from the partitions, which the engine's own module file keeps empty), resuming from it is exact,
``restore_from_checkpoint`` reads the directory, and the PEFT export holds the trained adapter.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lightning_adapters as la
from lightning_adapters.eval import load_adapter
from tests.lightning.models import BoringMLP

pytest.importorskip("deepspeed", reason="DeepSpeed is the optional 'deepspeed' extra")

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "lightning" / "scripts" / "deepspeed_cpu.py"


@pytest.mark.slow
@pytest.mark.xdist_group("procs")
@pytest.mark.parametrize(("stage", "offload"), [(2, False), (2, True), (3, False), (3, True)])
def test_deepspeed_zero_adapter_only_checkpoint_exact_resume_restore_and_peft_export(
    stage: int, offload: bool, tmp_path: Path
) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT), DS_BUILD_OPS="0")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--stage", str(stage), "--out", str(tmp_path)] + ["--offload"] * offload,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = torch.load(tmp_path / "result.pt", weights_only=False)
    assert result["world_size"] == 2
    cpu = "cpu" if offload else None
    assert result["offload"] == {"offload_optimizer": cpu, "offload_param": cpu if stage == 3 else None}
    straight, resumed = result["straight"], result["resumed"]
    assert set(straight) == {f"encoder.{i}.adapter.default.lora_{m}" for i in (0, 2, 4) for m in "AB"} | {
        "head.weight",
        "head.bias",
    }
    assert straight["encoder.0.adapter.default.lora_A"].shape == (4, 256)
    # Resuming from the first epoch's checkpoint directory ends exactly where the uninterrupted run ends.
    for k, v in straight.items():
        torch.testing.assert_close(resumed[k], v, rtol=0, atol=0, msg=k)

    ckpt = tmp_path / "straight" / "checkpoints" / "epoch=1-step=4.ckpt"
    assert ckpt.is_dir()
    for states in ckpt.glob("checkpoint/*model_states.pt"):
        saved = torch.load(states, map_location="cpu", weights_only=False)
        # The engine's module entries: the trainable tensors only (under ZeRO-3 as empty partitions).
        assert set(saved["module"]) == set(straight), states.name
        assert {tuple(v.shape) == (0,) for v in saved["module"].values()} == {stage == 3}
    # Nothing of the frozen base (0.8 MB of fp32 weights) is written: the adapter, its Adam moments, metadata.
    size = sum(f.stat().st_size for f in ckpt.rglob("*.pt"))
    assert size < 300_000, size

    restored = la.adapter_state_dict(la.restore_from_checkpoint(BoringMLP(), ckpt))
    from_eval_app = la.adapter_state_dict(load_adapter(BoringMLP(), ckpt, module=None))  # the eval app's route
    exported = la.adapter_state_dict(la.load_peft(BoringMLP(), tmp_path / "straight" / "peft"))
    for k, v in straight.items():
        torch.testing.assert_close(restored[k], v, rtol=0, atol=0, msg=k)
        torch.testing.assert_close(exported[k], v, rtol=0, atol=0, msg=k)
        torch.testing.assert_close(from_eval_app[k], v, rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_presets_build_lightnings_strategy(stage: int, tmp_path: Path) -> None:
    from hydra.utils import instantiate
    from lightning.pytorch.strategies import DeepSpeedStrategy

    from tests.app.conftest import compose_app

    cfg = compose_app([f"strategy=deepspeed_zero{stage}"], tmp_path)
    strategy = instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, DeepSpeedStrategy) and strategy.config["zero_optimization"]["stage"] == stage
    assert cfg.trainer.accelerator == "gpu"


def test_adalora_under_deepspeed_is_refused_before_anything_changes() -> None:
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DeepSpeedStrategy

    from lightning_adapters.errors import AdapterConfigError
    from lightning_adapters.lightning.strategies import prepare_strategy

    model = BoringMLP()
    la.inject(model, la.AdaLoRAConfig(target_modules=["encoder.0"], total_step=4))
    strategy = DeepSpeedStrategy(stage=2)
    with pytest.raises(AdapterConfigError, match="AdaLoRA under DeepSpeedStrategy is not supported.*ddp or fsdp2"):
        prepare_strategy(SimpleNamespace(strategy=strategy), model, model)
    assert strategy.exclude_frozen_parameters is False


def test_adalora_under_deepspeed_is_refused_when_it_is_not_the_first_adapter() -> None:
    """Every named adapter is checked: an AdaLoRA added after a LoRA (the one a callback may train) is refused too."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DeepSpeedStrategy

    from lightning_adapters.errors import AdapterConfigError
    from lightning_adapters.lightning.strategies import prepare_strategy

    model = BoringMLP()
    la.inject(model, la.LoRAConfig(target_modules=["encoder.0"], r=2), name="first")
    la.inject(model, la.AdaLoRAConfig(target_modules=["encoder.2"], total_step=4), name="second")
    strategy = DeepSpeedStrategy(stage=2)
    with pytest.raises(AdapterConfigError, match="AdaLoRA under DeepSpeedStrategy is not supported.*'second'"):
        prepare_strategy(SimpleNamespace(strategy=strategy), model, model)
    assert strategy.exclude_frozen_parameters is False
    # A model of LoRA adapters only is prepared.
    lora_only = BoringMLP()
    la.inject(lora_only, la.LoRAConfig(target_modules=["encoder.0"], r=2), name="first")
    la.inject(lora_only, la.LoRAConfig(target_modules=["encoder.2"], r=2), name="second")
    other = DeepSpeedStrategy(stage=2)
    prepare_strategy(SimpleNamespace(strategy=other), lora_only, lora_only)
    assert other.exclude_frozen_parameters is True
