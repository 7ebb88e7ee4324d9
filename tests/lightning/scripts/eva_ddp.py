"""Two-process CPU DDP fit with an EVA LoRA: each rank writes its model state at fit start to ``<out>.rank<k>``.

``eva_config`` and ``eva_data`` are shared with ``tests/lightning/test_eva_fit.py``, which computes the expected
single-process init.
"""

from __future__ import annotations

import argparse

import torch
from lightning.pytorch import Callback
from torch.utils.data import DataLoader, TensorDataset

import lightning_adapters as la
from tests.lightning.models import WIDTH, BoringMLP, leave_process_group, trainer


def eva_config(batches: int = 4) -> la.LoRAConfig:
    return la.LoRAConfig(
        r=4,
        alpha=8.0,
        target_modules=["encoder.0", "encoder.2", "encoder.4"],
        init_weights="eva",
        eva_tau=0.9,
        init_batches=batches,
    )


def eva_data(n: int = 64, batch_size: int = 8, seed: int = 0) -> DataLoader:
    """Inputs along 12 directions with standard deviations from 316 down to 1: the first layer's inputs have a steep
    spectrum, the tanh-saturated later ones flatter spectra, so EVA moves ranks between the layers."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(WIDTH, 12, generator=g))[0].t()  # (12, WIDTH)
    x = (torch.randn(n, 12, generator=g) * torch.logspace(2.5, 0.0, 12)) @ basis
    x = x + 0.01 * torch.randn(n, WIDTH, generator=g)
    return DataLoader(TensorDataset(x, torch.randint(0, 4, (n,), generator=g)), batch_size=batch_size, shuffle=False)


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
    cfg = eva_config(args.batches)
    t = trainer(
        strategy="ddp", devices=2, max_steps=1, callbacks=[la.AdapterCallback(cfg, verbose=False), Save(args.out)]
    )
    t.fit(BoringMLP(), eva_data())


if __name__ == "__main__":
    main()
    leave_process_group()
