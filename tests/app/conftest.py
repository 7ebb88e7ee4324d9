"""Helpers for the training-app tests: compose ``configs/train.yaml`` in-process or run the app as a command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from lightning_adapters.app.store import register_configs
from lightning_adapters.train import CONFIG_DIR

ROOT = Path(__file__).resolve().parents[2]


def tiny(
    model: str | None = "tiny_bert",
    logger: str | None = "none",
    progress_bar: bool = True,
    accelerator: str | None = "cpu",
) -> list[str]:
    """Overrides for a short run: enough to build and step every piece (``None`` leaves a setting alone)."""
    out = [f"model={model}"] if model else []
    out += [f"logger={logger}"] if logger else []
    out += ["callbacks.progress_bar.refresh_rate=0"] if progress_bar else []
    out += [f"trainer.accelerator={accelerator}"] if accelerator else []
    return out + [
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1",
        "trainer.log_every_n_steps=1",
        "trainer.enable_model_summary=false",
        "data.batch_size=16",
    ]


def compose_app(overrides: list[str], output_dir: Path, config_name: str = "train") -> DictConfig:
    """Compose the app's config (``train``, or ``eval``) with ``overrides`` and make ``${hydra:...}`` resolvable, as
    ``@hydra.main`` does."""
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.root_dir = str(ROOT)
    return cfg


def run_app(args: list[str], cwd: Path, timeout: float = 240, app: str = "train") -> subprocess.CompletedProcess:
    """Run ``python -m lightning_adapters.<app> <args>`` in a fresh process (offline, W&B off unless asked)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, PYTHONPATH=path, HF_HUB_OFFLINE="1", WANDB_MODE="offline", WANDB_SILENT="true")
    return subprocess.run(
        [sys.executable, "-m", f"lightning_adapters.{app}", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb_data"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
