"""Run tracking for the training app: parameter counts, step time, peak memory, adapter-only W&B artifacts.

``RunStats`` measures what a sweep compares (trainable parameters, step time, peak memory, the best value of
the monitored metric) and logs it to every logger. ``AdapterArtifact`` uploads the adapter-only checkpoints and
the PEFT export to W&B once fit ends, after checking that no checkpoint holds a base-model tensor: the frozen
backbone never leaves the machine.
"""

from __future__ import annotations

import math
import resource
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lightning_adapters.core.inject import find_records
from lightning_adapters.core.state import adapter_state_dict
from lightning_adapters.errors import AdapterStateError
from lightning_adapters.lightning.checkpoint import load_checkpoint_file


def count_parameters(module: torch.nn.Module) -> dict[str, float]:
    """``{"params/total", "params/trainable", "params/trainable_pct"}`` of ``module`` (shared tensors once)."""
    seen: dict[int, torch.nn.Parameter] = {id(p): p for p in module.parameters()}
    total = sum(p.numel() for p in seen.values())
    trainable = sum(p.numel() for p in seen.values() if p.requires_grad)
    return {
        "params/total": float(total),
        "params/trainable": float(trainable),
        "params/trainable_pct": 100.0 * trainable / max(1, total),
    }


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """Peak memory so far: CUDA bytes allocated on ``device``, else this process's peak resident set (MiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu_peak_rss"


class RunStats(Callback):
    """Logs parameter counts at fit start, the mean training step time and the peak memory.

    Step time is measured from ``on_train_batch_start`` to ``on_train_batch_end`` (forward, backward and
    optimizer step); the mean leaves out the first ``warmup_steps`` batches, which pay one-off costs, when the run
    had more. The best value of ``monitor`` is kept
    across validations, so it is known even when no checkpoint is written.

    Args:
        monitor: Metric to track, e.g. ``"val/pearson"``.
        mode: ``"max"`` or ``"min"``.
        warmup_steps: Leading training batches left out of the step-time mean.
    """

    def __init__(self, monitor: str | None = None, mode: str = "max", warmup_steps: int = 3) -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"RunStats mode must be 'max' or 'min', got {mode!r}")
        self.monitor = monitor
        self.mode = mode
        self.warmup_steps = warmup_steps
        self.params: dict[str, float] = {}
        self.step_times: list[float] = []
        self.best: float | None = None
        self.last_metrics: dict[str, float] = {}
        self.peak_mb = 0.0
        self.memory_kind = ""
        self._t0 = 0.0

    def summary(self) -> dict[str, Any]:
        """Everything measured so far, as plain numbers."""
        # Leave the warm-up batches out of the mean when the run had more than those.
        times = self.step_times[self.warmup_steps :] or self.step_times
        mean_step = sum(times) / len(times) if times else float("nan")
        return {
            **self.params,
            "perf/step_time_ms": 1000.0 * mean_step,
            "perf/peak_mem_mb": self.peak_mb,
            "perf/memory_kind": self.memory_kind,
            "best_metric": self.best,
            "monitor": self.monitor,
            "last_metrics": dict(self.last_metrics),
        }

    def _sync(self, device: torch.device) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.params = count_parameters(pl_module)
        for logger in trainer.loggers:
            logger.log_metrics(self.params, step=trainer.global_step)
        rank_zero_info(
            f"trainable params: {int(self.params['params/trainable']):,} of {int(self.params['params/total']):,} "
            f"({self.params['params/trainable_pct']:.3f}%)"
        )

    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int):
        self._sync(pl_module.device)
        self._t0 = time.perf_counter()

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._sync(pl_module.device)
        dt = time.perf_counter() - self._t0
        self.step_times.append(dt)
        pl_module.log("perf/step_time_ms", 1000.0 * dt, on_step=True, on_epoch=False)

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.last_metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        value = self.last_metrics.get(self.monitor) if self.monitor else None
        if value is not None and math.isfinite(value):
            better = self.best is None or (value > self.best if self.mode == "max" else value < self.best)
            self.best = value if better else self.best

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.peak_mb, self.memory_kind = peak_memory_mb(pl_module.device)
        pl_module.log("perf/peak_mem_mb", self.peak_mb, on_epoch=True, rank_zero_only=True)

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.peak_mb, self.memory_kind = peak_memory_mb(pl_module.device)
        final = {k: v for k, v in self.summary().items() if isinstance(v, float) and math.isfinite(v)}
        if self.best is not None:
            final["best_metric"] = self.best
        for logger in trainer.loggers:
            logger.log_metrics(final, step=trainer.global_step)
            if isinstance(logger, WandbLogger):
                logger.experiment.summary.update(final)


class QuietWandbLogger(WandbLogger):
    """Lightning's ``WandbLogger``, minus the ``anonymous=None`` it always passes to ``wandb.init``.

    W&B 0.19+ warns on every run that the ``anonymous`` setting has no effect as soon as the key is present,
    even as ``None``; this logger leaves the key out unless ``anonymous=True`` was asked for. Everything else is
    the parent's.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self._wandb_init.get("anonymous") is None:
            del self._wandb_init["anonymous"]


def check_adapter_only(path: str | Path, pl_module: torch.nn.Module) -> int:
    """Raise unless the checkpoint at ``path`` holds adapter (and ``modules_to_save``) tensors only.

    Returns:
        Bytes of tensor data in the checkpoint's ``state_dict``.

    Raises:
        AdapterStateError: A key of the checkpoint is not adapter state of ``pl_module`` (a base tensor).
    """
    ckpt = load_checkpoint_file(path)
    keys = set(ckpt.get("state_dict", {}))
    allowed = set(adapter_state_dict(pl_module))
    extra = sorted(keys - allowed)
    if extra:
        raise AdapterStateError(
            f"checkpoint {str(path)!r} holds {len(extra)} non-adapter tensors (e.g. {extra[:3]}); refusing to "
            "upload the frozen base. Add AdapterCallback to the trainer so checkpoints are adapter-only"
        )
    return sum(t.numel() * t.element_size() for t in ckpt["state_dict"].values())


class AdapterArtifact(Callback):
    """At fit end, log the best and last adapter-only checkpoints and the PEFT export as one W&B artifact.

    The artifact (type ``model``, aliases ``best`` and ``latest``) holds ``best.ckpt``, ``last.ckpt`` (when it is
    a different file) and the PEFT directory under ``peft/``. Every checkpoint is verified to be adapter-only
    first. Without a ``WandbLogger``, or on a model without adapters (the frozen baseline), nothing is logged.

    Args:
        peft_dir: Directory of the PEFT export to include, if it exists at fit end.
        name: Artifact name; ``None`` uses ``adapter-<run id>``.
    """

    def __init__(self, peft_dir: str | None = None, name: str | None = None) -> None:
        self.peft_dir = peft_dir
        self.name = name
        self.logged_files: dict[str, int] = {}

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        wandb_loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if not wandb_loggers:
            return
        if not find_records(pl_module):
            rank_zero_info("AdapterArtifact: the model has no adapter; no artifact logged")
            return
        files: dict[str, str] = {}
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint):
                if cb.best_model_path:
                    files.setdefault("best.ckpt", cb.best_model_path)
                if cb.last_model_path and cb.last_model_path != files.get("best.ckpt"):
                    files.setdefault("last.ckpt", cb.last_model_path)
        files = {k: v for k, v in files.items() if Path(v).is_file()}
        sizes = {k: check_adapter_only(v, pl_module) for k, v in files.items()}
        import wandb

        for logger in wandb_loggers:
            run = logger.experiment
            art = wandb.Artifact(
                self.name or f"adapter-{run.id}",
                type="model",
                metadata={"tensor_bytes": sizes, "adapter_only": True},
            )
            for name, path in files.items():
                art.add_file(path, name=name)
            if self.peft_dir and Path(self.peft_dir).is_dir():
                art.add_dir(self.peft_dir, name="peft")
            run.log_artifact(art, aliases=["best", "latest"])
        self.logged_files = {k: Path(v).stat().st_size for k, v in files.items()}
