"""Two-process CPU DDP fit with a CorDA LoRA: each rank writes its model state at fit start to ``<out>.rank<k>``."""

from __future__ import annotations

import argparse

import torch
from lightning.pytorch import Callback

import lightning_adapters as la
from tests.lightning.models import BoringMLP, leave_process_group, mlp_data, trainer


class Save(Callback):
    def __init__(self, out: str) -> None:
        self.out = out

    def on_fit_start(self, trainer, pl_module):
        state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        torch.save(state, f"{self.out}.rank{trainer.global_rank}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--batches", type=int, default=4)
    args = parser.parse_args()
    cfg = la.LoRAConfig(
        r=4,
        alpha=8.0,
        target_modules=["encoder.0", "encoder.2", "encoder.4"],
        init_weights="corda",
        init_batches=args.batches,
    )
    t = trainer(
        strategy="ddp", devices=2, max_steps=1, callbacks=[la.AdapterCallback(cfg, verbose=False), Save(args.out)]
    )
    t.fit(BoringMLP(), mlp_data())


if __name__ == "__main__":
    main()
    leave_process_group()
