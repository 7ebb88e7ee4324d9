"""The DeepSpeed presets of the training app on CUDA (Lightning's DeepSpeedStrategy runs on CUDA only).

Skipped without CUDA or DeepSpeed; run on a GPU machine with ``pytest tests/gpu``. The same integration runs on
two CPU processes in ``tests/lightning/test_deepspeed.py``, through the strategy with its CUDA checks lifted.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import lightning_adapters as la
from tests.app.conftest import run_app

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("preset", ["deepspeed_zero2", "deepspeed_zero3"])
def test_app_trains_under_deepspeed_and_its_checkpoint_directory_restores(preset: str, tmp_path: Path) -> None:
    pytest.importorskip("deepspeed")
    args = ["model=tiny_bert", "logger=none", f"strategy={preset}", "trainer.devices=1", "trainer.max_epochs=1"]
    args += ["trainer.limit_train_batches=4", "trainer.limit_val_batches=2", "trainer.limit_test_batches=2"]
    proc = run_app([*args, "callbacks.progress_bar.refresh_rate=0", f"hydra.run.dir={tmp_path}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["test_metrics"]
    best = Path(summary["outputs"]["checkpoint"])
    assert best.is_dir()  # DeepSpeed's checkpoint directory
    from lightning_adapters.app import load_task

    restored = la.adapter_state_dict(la.restore_from_checkpoint(load_task(tmp_path), best))
    exported = la.adapter_state_dict(la.load_peft(load_task(tmp_path), tmp_path / "peft"))
    assert restored.keys() == exported.keys() and all(v.numel() > 0 for v in restored.values())
