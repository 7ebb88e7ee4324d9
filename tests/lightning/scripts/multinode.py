"""One "node" of a multi-node DDP (AdaLoRA) or FSDP2 (LoRA) run on CPU, or the single-process reference, for the
multi-node test.

Each node is started as its own process with ``NODE_RANK``, ``MASTER_ADDR``, ``MASTER_PORT`` and ``WORLD_SIZE``
set, as a cluster's launcher would, with ``Trainer(num_nodes=2, devices=1)``; Lightning connects them over gloo.
Every node has its own checkpoint and export directories (node-local disks), so files written by a rank other
than global rank 0 would show. Rank r reads samples r, r + world, ... in order, so every global batch of 8 is the
single-process batch of the same step. Writes ``--out``: the final adapter, AdaLoRA's kept ranks and the files
this node's directories hold.

    NODE_RANK=1 MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 WORLD_SIZE=2 \
        python tests/lightning/scripts/multinode.py --nodes 2 --dir D1 --out O1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy  # noqa: E402
from torch.utils.data import DataLoader, DistributedSampler  # noqa: E402

import lightning_adapters as la  # noqa: E402
from lightning_adapters.methods.adalora import rank_pattern  # noqa: E402
from tests.lightning.models import BoringMLP, leave_process_group, mlp_data  # noqa: E402

GLOBAL_BATCH = 8
CONFIGS = {}
CONFIGS["adalora"] = la.AdaLoRAConfig(
    init_r=6,
    target_r=2,
    tinit=2,
    tfinal=2,
    total_step=8,
    target_modules=["encoder.0", "encoder.2", "encoder.4"],
    modules_to_save=["head"],
)
CONFIGS["lora"] = la.LoRAConfig(r=4, target_modules=["encoder.0", "encoder.2", "encoder.4"], modules_to_save=["head"])


class InOrder(L.LightningDataModule):
    """Global rank r of a world of w takes samples r, r + w, ... (no shuffling)."""

    def __init__(self, world: int) -> None:
        super().__init__()
        self.world = world

    def train_dataloader(self) -> DataLoader:
        data = mlp_data(n=64, batch_size=GLOBAL_BATCH // self.world)
        if self.world == 1:
            return data
        sampler = DistributedSampler(
            data.dataset, num_replicas=self.world, rank=self.trainer.global_rank, shuffle=False
        )
        return DataLoader(data.dataset, batch_size=data.batch_size, sampler=sampler)


def _full(t: torch.Tensor) -> torch.Tensor:
    """A plain copy of the whole tensor (FSDP2 holds DTensor shards)."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().cpu().clone()


def _strategy(name: str, nodes: int) -> Any:
    if nodes == 1:
        return "auto"
    if name == "fsdp2":
        return ModelParallelStrategy(data_parallel_size=nodes, tensor_parallel_size=1, process_group_backend="gloo")
    return DDPStrategy(process_group_backend="gloo")


def run(nodes: int, directory: Path, strategy: str = "ddp", method: str = "adalora") -> dict:
    """Train for one epoch (8 optimizer steps) on ``nodes`` nodes of one process; return what the test compares."""
    model = BoringMLP(lr=0.02)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        num_nodes=nodes,
        strategy=_strategy(strategy, nodes),
        max_epochs=1,
        use_distributed_sampler=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=directory,
        callbacks=[
            la.AdapterCallback(CONFIGS[method], verbose=False, export_peft_dir=directory / "peft"),
            ModelCheckpoint(dirpath=directory / "checkpoints", every_n_train_steps=4, save_top_k=-1, save_last=True),
        ],
    )
    trainer.fit(model, datamodule=InOrder(nodes))
    return {
        "global_rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "adapter": {k: _full(v) for k, v in la.adapter_state_dict(model).items()},
        "rank_pattern": rank_pattern(model) if method == "adalora" else None,
        "files": sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file()),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--strategy", choices=["ddp", "fsdp2"], default="ddp")
    p.add_argument("--method", choices=sorted(CONFIGS), default="adalora")
    p.add_argument("--dir", required=True, help="this node's own directory for checkpoints and the PEFT export")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    torch.save(run(args.nodes, Path(args.dir), args.strategy, args.method), args.out)
    leave_process_group()


if __name__ == "__main__":
    main()
