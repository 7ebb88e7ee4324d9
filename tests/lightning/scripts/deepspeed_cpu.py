"""Adapters under Lightning's DeepSpeedStrategy (ZeRO 2 or 3), two CPU processes over gloo, for the DeepSpeed test.

Lightning's ``DeepSpeedStrategy`` refuses any accelerator but CUDA; DeepSpeed itself runs on the CPU (its CPU
accelerator, gloo). ``CPUDeepSpeedStrategy`` lifts Lightning's three CUDA-only checks and nothing else, so the
integration's DeepSpeed code (optimizer check, adapter-only checkpoints gathered from ZeRO partitions, resume,
PEFT export) runs here exactly as on GPUs.

Writes ``<out>/result.pt`` (rank 0): the adapter after 2 epochs (4 steps) without interruption and the adapter of
a second fit resumed from the first epoch's checkpoint directory to the same end.

    python tests/lightning/scripts/deepspeed_cpu.py --stage 3 --out OUT
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.fabric.utilities.seed import reset_seed  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy  # noqa: E402
from torch.utils.data import DataLoader, DistributedSampler  # noqa: E402

import lightning_adapters as la  # noqa: E402
from tests.lightning.models import BoringMLP, leave_process_group, mlp_data  # noqa: E402

CONFIG = la.LoRAConfig(r=4, alpha=8.0, target_modules=["encoder.0", "encoder.2", "encoder.4"], modules_to_save=["head"])


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """``DeepSpeedStrategy`` on the CPU: Lightning's CUDA-only checks lifted, nothing else changed."""

    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)  # skips "only supported on CUDA GPUs"

    def setup_distributed(self) -> None:
        reset_seed()  # as DeepSpeedStrategy, minus its check of CUDA device indices
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    @property
    def root_device(self) -> torch.device:
        return torch.device("cpu", self.local_rank)  # DeepSpeed's engine wants a device index


class InOrder(L.LightningDataModule):
    def train_dataloader(self) -> DataLoader:
        data = mlp_data(n=16, batch_size=4)  # 2 steps of 2 x 4 samples per epoch
        sampler = DistributedSampler(data.dataset, num_replicas=2, rank=self.trainer.global_rank, shuffle=False)
        return DataLoader(data.dataset, batch_size=4, sampler=sampler)


def fit(
    stage: int, directory: Path, epochs: int, resume: str | None = None, offload: bool = False
) -> tuple[L.Trainer, BoringMLP]:
    model = BoringMLP(lr=0.02)
    strategy = CPUDeepSpeedStrategy(
        stage=stage, offload_optimizer=offload, offload_parameters=offload and stage == 3, process_group_backend="gloo"
    )
    # Offloaded, ZeRO steps the model's own torch optimizer on the CPU copies (DeepSpeed's CPU Adam kernel would
    # have to be compiled first).
    strategy.config["zero_force_ds_cpu_optimizer"] = False
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_epochs=epochs,
        use_distributed_sampler=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=directory,
        callbacks=[
            la.AdapterCallback(CONFIG, verbose=False, export_peft_dir=directory / "peft"),
            ModelCheckpoint(dirpath=directory / "checkpoints", every_n_epochs=1, save_top_k=-1),
        ],
    )
    trainer.fit(model, datamodule=InOrder(), ckpt_path=resume)
    return trainer, model


def adapter(trainer: L.Trainer, model: BoringMLP) -> dict[str, torch.Tensor]:
    """The whole adapter on every rank (ZeRO-3 partitions gathered)."""
    from lightning_adapters.lightning.strategies import gathered

    with gathered(trainer.strategy, (p for p in model.parameters() if p.requires_grad)):
        return {k: v.detach().cpu().clone() for k, v in la.adapter_state_dict(model).items()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--stage", type=int, choices=[2, 3], required=True)
    p.add_argument("--offload", action="store_true", help="offload the optimizer (and ZeRO-3 parameters) to the CPU")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    out = Path(args.out)
    trainer, model = fit(args.stage, out / "straight", epochs=2, offload=args.offload)
    straight = adapter(trainer, model)
    first = out / "straight" / "checkpoints" / "epoch=0-step=2.ckpt"
    trainer, model = fit(args.stage, out / "resumed", epochs=2, resume=str(first), offload=args.offload)
    resumed = adapter(trainer, model)
    if trainer.is_global_zero:
        zero = trainer.strategy.config["zero_optimization"]
        offloaded = {k: zero.get(k, {}).get("device") for k in ("offload_optimizer", "offload_param")}
        result = {"straight": straight, "resumed": resumed, "world_size": trainer.world_size, "offload": offloaded}
        torch.save(result, out / "result.pt")


if __name__ == "__main__":
    main()
    leave_process_group()
