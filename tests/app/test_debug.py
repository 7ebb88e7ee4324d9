"""The ``debug=`` presets: fast_dev_run, overfitting a few batches, the profiler."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_adapters.train import build, train
from tests.app.conftest import compose_app

TINY = ["model=tiny_bert", "data.batch_size=16", "callbacks.progress_bar.refresh_rate=0"]


@pytest.mark.parametrize("preset", ["fast_dev_run", "overfit", "profiler"])
def test_debug_presets_share_the_debug_defaults(preset: str, tmp_path: Path) -> None:
    cfg = compose_app([f"debug={preset}"], tmp_path)
    assert cfg.task_name == "debug" and not cfg.logger
    assert cfg.trainer.accelerator == "cpu" and cfg.trainer.devices == 1 and cfg.trainer.detect_anomaly is True
    assert cfg.trainer.fast_dev_run is (preset == "fast_dev_run")


def _loss_on_first_batches(job, batches: int) -> float:
    """Mean training loss of the module in eval mode (no dropout) on the first ``batches`` unshuffled batches."""
    dm = job.datamodule
    dm.setup("fit")
    loader = torch.utils.data.DataLoader(dm.splits["train"], batch_size=dm.batch_size, shuffle=False)
    job.task.eval()
    losses = []
    with torch.no_grad():
        for i, (ids, mask, y) in enumerate(loader):
            if i == batches:
                break
            losses.append(float(torch.nn.functional.mse_loss(job.task(ids, mask), y)))
    job.task.train()
    return sum(losses) / len(losses)


@pytest.mark.slow
def test_debug_overfit_drives_the_loss_on_its_batches_down(tmp_path: Path) -> None:
    assert compose_app(["debug=overfit"], tmp_path).trainer.overfit_batches == 3
    # One batch of the tiny random Bert (every linear adapted) for the preset's 20 epochs, to keep the test short.
    overrides = [*TINY, "debug=overfit", "target=all_linear", "model.optimizer.lr=0.02", "trainer.overfit_batches=1"]
    job = build(compose_app(overrides, tmp_path))
    assert job.trainer.checkpoint_callback is None
    job.trainer.fit(job.task, datamodule=job.datamodule)
    trained = _loss_on_first_batches(job, 1)
    # The same module, a fresh job: its loss on that batch before any step.
    initial = _loss_on_first_batches(build(compose_app(overrides, tmp_path / "fresh")), 1)
    assert trained < 0.4 * initial, (initial, trained)


def test_debug_profiler_writes_the_profile(tmp_path: Path) -> None:
    overrides = [*TINY, "debug=profiler", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1"]
    summary = train(compose_app([*overrides, "trainer.limit_test_batches=1"], tmp_path))
    assert summary["status"] == "ok"
    profile = (tmp_path / "fit-profile.txt").read_text()
    assert "run_training_batch" in profile and "Total" in profile
