"""Train a test module with AdapterCallback in a fresh process (single, DDP or FSDP2 on CPU) and report.

Used by the kill-and-resume and multi-process tests: Lightning's DDP/ModelParallel launchers re-run this file
for every rank. Writes ``--out`` (rank 0): the final adapter (full tensors), the global step, the optimizer
step counts and, for every checkpoint file written, its state-dict keys and shapes.

    python tests/lightning/scripts/run_training.py --strategy ddp --model llama --epochs 1 --ckpt-dir D --out O
"""

from __future__ import annotations

import argparse
import sys
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy  # noqa: E402
from torch.utils.data import DataLoader, DistributedSampler  # noqa: E402

import lightning_adapters as la  # noqa: E402
from tests.lightning.models import (  # noqa: E402
    BoringMLP,
    TinyLlamaLM,
    leave_process_group,
    mlp_data,
    token_data,
    trainer,
)

# A rank that dies before the rendezvous would leave the other waiting for Lightning's default 30 minutes; these
# runs take seconds, so a lost peer fails the run in three minutes (the tests retry a failed rendezvous once).
RENDEZVOUS_TIMEOUT = timedelta(seconds=180)


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().cpu().clone()


class Unshuffled(L.LightningDataModule):
    """Rank r takes samples r, r + world, ...: every global batch is the single-process batch of the same step.

    (Lightning's automatic DistributedSampler shuffles training data.)
    """

    def __init__(self, loader: DataLoader, world: int) -> None:
        super().__init__()
        self.loader, self.world = loader, world

    def train_dataloader(self) -> DataLoader:
        if self.world == 1:
            return self.loader
        sampler = DistributedSampler(
            self.loader.dataset, num_replicas=self.world, rank=self.trainer.global_rank, shuffle=False
        )
        return DataLoader(self.loader.dataset, batch_size=self.loader.batch_size, sampler=sampler)


class QuantizedLlamaLM(TinyLlamaLM):
    """TinyLlamaLM (hidden 128) on a quantized base of both kinds FSDP2 meets: bitsandbytes NF4 attention
    projections (kept whole on every rank) and torchao NF4 MLP weights (sharded through torchao's extension)."""

    def __init__(self) -> None:
        super().__init__(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=4)

    def _build(self) -> torch.nn.Module:
        model = la.quantize(super()._build(), "nf4", skip=["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "lm_head"])
        return la.quantize(model, "torchao_nf4")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--strategy", choices=["single", "ddp", "fsdp2"], default="single")
    p.add_argument("--model", choices=["mlp", "llama"], default="mlp")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--ckpt-dir", required=True)
    p.add_argument("--resume", default=None)
    p.add_argument("--resume-epochs", type=int, default=0, help="then, in the same processes, resume to this epoch")
    p.add_argument("--out", required=True)
    p.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd")
    p.add_argument("--unused", action="store_true", help="target a module that never reaches the loss")
    p.add_argument("--world", type=int, default=2, help="processes for ddp / fsdp2")
    p.add_argument(
        "--quantized", action="store_true", help="llama: attention on bitsandbytes NF4, MLP on torchao NF4 (QLoRA)"
    )
    args = p.parse_args()

    world = 1 if args.strategy == "single" else args.world
    batch = args.global_batch // world
    if args.model == "mlp":
        fresh, data = (lambda: BoringMLP(optimizer=args.optimizer, lr=0.05)), mlp_data(batch_size=batch)
        config = la.LoRAConfig(r=4, alpha=8.0, target_modules=["encoder.0", "encoder.2", "encoder.4"])
        module = None
    elif args.quantized:
        fresh, data = QuantizedLlamaLM, token_data(batch_size=batch)
        config = la.LoRAConfig(r=2, alpha=4.0, target_modules=["q_proj", "v_proj", "down_proj"])
        module = "model"
    else:
        fresh, data = TinyLlamaLM, token_data(batch_size=batch)
        targets = ["q_proj", "v_proj", "lm_head"] if args.unused else ["q_proj", "v_proj", "down_proj"]
        config = la.LoRAConfig(r=2, alpha=4.0, target_modules=targets)
        module = "model"
    model = fresh()
    if args.unused:
        model.training_step = lambda batch, batch_idx: model.model.model(input_ids=batch[0]).last_hidden_state.mean()

    def fit(model: L.LightningModule, epochs: int, ckpt_dir: str, resume: str | None) -> L.Trainer:
        strategy = {
            "single": "auto",
            "ddp": DDPStrategy(process_group_backend="gloo", timeout=RENDEZVOUS_TIMEOUT),
            "fsdp2": ModelParallelStrategy(
                data_parallel_size=world,
                tensor_parallel_size=1,
                process_group_backend="gloo",
                timeout=RENDEZVOUS_TIMEOUT,
            ),
        }[args.strategy]
        ckpt = ModelCheckpoint(dirpath=ckpt_dir, save_last=True, every_n_train_steps=2, save_top_k=-1)
        t = trainer(
            max_epochs=epochs,
            use_distributed_sampler=False,
            devices=world,
            strategy=strategy,
            callbacks=[la.AdapterCallback(config, module=module, verbose=False), ckpt],
        )
        t.fit(model, datamodule=Unshuffled(data, world), ckpt_path=resume)
        return t

    t = fit(model, args.epochs, args.ckpt_dir, args.resume)
    files = {}
    if t.is_global_zero:
        for f in sorted(Path(args.ckpt_dir).glob("*.ckpt")):
            sd = torch.load(f, weights_only=True)["state_dict"]
            files[f.name] = {k: list(v.shape) for k, v in sd.items()}
    first_step = t.global_step
    if args.resume_epochs:
        model = fresh()
        t = fit(model, args.resume_epochs, args.ckpt_dir + "_resumed", str(Path(args.ckpt_dir) / "last.ckpt"))

    adapter = {k: full(v) for k, v in la.adapter_state_dict(model).items()}
    if t.is_global_zero:
        steps = [int(s["step"]) for s in t.optimizers[0].state_dict()["state"].values() if "step" in s]
        out = {"adapter": adapter, "global_step": t.global_step, "first_step": first_step, "files": files}
        torch.save({**out, "steps": steps}, args.out)


if __name__ == "__main__":
    main()
    leave_process_group()
