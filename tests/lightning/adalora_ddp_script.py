"""Two-process CPU DDP run of AdaLoRA in epoch mode; each rank writes its final masks to ``<out>/rank<r>.json``.

Run as ``python -m tests.lightning.adalora_ddp_script OUT_DIR`` (Lightning re-launches the same command for
rank 1). Before every epoch-end reallocation rank 1 scrambles its own importance estimates, so the ranks only
agree if the allocator takes its scores from rank 0.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import torch

import lightning_adapters as la
from lightning_adapters.lightning.runtime import get_runtime
from lightning_adapters.methods.adalora import rank_pattern
from tests.lightning.test_adalora_lightning import LlamaLM, cfg, data


class ScrambleRank1(L.Callback):
    """Runs before AdapterCallback's epoch end: multiplies rank 1's smoothed sensitivities by noise."""

    def __init__(self) -> None:
        self.perturbed = False

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.global_rank != 1:
            return
        g = torch.Generator().manual_seed(trainer.current_epoch)
        for per_layer in get_runtime(pl_module).schedule.allocator.ema.values():
            for t in per_layer.values():
                t.mul_(torch.rand(t.shape, generator=g))
        self.perturbed = True


def main(out: Path) -> None:
    module = LlamaLM()
    scramble = ScrambleRank1()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[scramble, la.AdapterCallback(cfg(schedule="epoch", tinit=0, tfinal=1), module="model")],
    )
    trainer.fit(module, data())
    schedule = get_runtime(module).schedule
    result = {"pattern": rank_pattern(module.model), "history": schedule.history, "perturbed": scramble.perturbed}
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
