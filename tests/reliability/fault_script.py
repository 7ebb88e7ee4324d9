"""Training runs for the fault tests, each meant to run in a fresh process (see ``test_faults.py``).

``--mode train`` fits a tiny Llama with ``AdapterCallback(LoRAConfig)`` and a ``ModelCheckpoint`` every few
steps; ``--kill-at-step N`` SIGKILLs the process halfway through writing the checkpoint of step ``N`` (a crash
mid-write), ``--resume`` continues from a checkpoint. ``--mode ddp-fail`` trains on two CPU processes (DDP,
gloo) and raises in rank 1's ``training_step``. Lightning's launcher re-runs this file for every rank.

    python tests/reliability/fault_script.py --mode train --ckpt-dir D --kill-at-step 12 --out O
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402

import lightning_adapters as la  # noqa: E402
from tests.lightning.models import TinyLlamaLM, trainer  # noqa: E402

CONFIG = la.LoRAConfig(r=4, alpha=8.0, target_modules=["q_proj", "v_proj", "down_proj"])
SAMPLES, SEQ, BATCH = 32, 8, 4  # 8 optimizer steps per epoch
CKPT_EVERY = 3
RANK1_FAILURE = "rank 1 fails on purpose at batch"


class ResumableBatches:
    """Batches of a fixed token set in a per-epoch permutation that depends only on (seed, epoch).

    It implements ``state_dict``/``load_state_dict``, so Lightning stores how far into the epoch a checkpoint
    was taken and the resumed run continues with the very next batch. (A plain ``DataLoader`` is not resumable:
    Lightning restarts it from its first batch when resuming mid-epoch, and the resumed run would train on
    other batches than the uninterrupted one.) Lightning reads the state at ``on_train_batch_end``, where it
    counts exactly the batches trained on: a sized loader is not prefetched.
    """

    def __init__(self, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.tokens = torch.randint(0, 128, (SAMPLES, SEQ), generator=g)
        self.seed = seed
        self.epoch = -1
        self.consumed = 0
        self._next_epoch = 0
        self._skip = 0

    def __len__(self) -> int:
        return SAMPLES // BATCH

    def __iter__(self) -> Iterator[tuple[torch.Tensor]]:
        self.epoch, self._next_epoch = self._next_epoch, self._next_epoch + 1
        start, self._skip = self._skip, 0
        order = torch.randperm(SAMPLES, generator=torch.Generator().manual_seed(self.seed * 1000 + self.epoch))
        for i in range(start, len(self)):
            self.consumed = i + 1
            yield (self.tokens[order[i * BATCH : (i + 1) * BATCH]],)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["consumed"] >= len(self):  # saved at the last batch of an epoch: resume with the next epoch
            self._next_epoch, self._skip = state["epoch"] + 1, 0
        else:
            self._next_epoch, self._skip = state["epoch"], state["consumed"]


class KillDuringCheckpointWrite(L.Callback):
    """From step ``step`` on, the next checkpoint file write stops halfway and the process gets SIGKILL.

    Lightning writes checkpoints through fsspec's local file object; the trap writes half of the bytes,
    flushes them to disk and kills the process, as a power cut or the OOM killer would mid-write. This
    callback runs before ``ModelCheckpoint`` (Lightning moves checkpoint callbacks last), so the trap is set
    when that step's checkpoint is written.
    """

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step != self.step:
            return
        from fsspec.implementations.local import LocalFileOpener

        def write_half_then_die(opener: LocalFileOpener, data: bytes) -> int:
            opener.f.write(data[: len(data) // 2])
            opener.f.flush()
            os.fsync(opener.f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
            return 0  # never reached

        LocalFileOpener.write = write_half_then_die


def fit_single(
    ckpt_dir: str | Path, epochs: int, kill_at_step: int | None = None, resume: str | None = None
) -> tuple[L.Trainer, TinyLlamaLM]:
    """One single-process fit (the uninterrupted reference, the killed run or the resumed run)."""
    model = TinyLlamaLM(lr=0.01)
    model.configure_optimizers = lambda: torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.01)
    callbacks: list[L.Callback] = [la.AdapterCallback(CONFIG, module="model", verbose=False)]
    if kill_at_step is not None:
        callbacks.append(KillDuringCheckpointWrite(kill_at_step))
    callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=CKPT_EVERY, save_last=True))
    t = trainer(max_epochs=epochs, callbacks=callbacks)
    t.fit(model, train_dataloaders=ResumableBatches(), ckpt_path=resume)
    return t, model


def report(t: L.Trainer, model: TinyLlamaLM) -> dict[str, Any]:
    """What the tests compare: the adapter, the loop's step count and AdamW's per-tensor step counts."""
    steps = [int(s["step"]) for s in t.optimizers[0].state_dict()["state"].values() if "step" in s]
    adapter = {k: v.detach().clone() for k, v in la.adapter_state_dict(model).items()}
    return {"adapter": adapter, "global_step": t.global_step, "optimizer_steps": steps}


class FailingOnRank1(TinyLlamaLM):
    """Rank 1 raises in ``training_step`` at batch ``fail_at``; rank 0 goes on into DDP's gradient all-reduce."""

    fail_at = 2

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.trainer.global_rank == 1 and batch_idx == self.fail_at:
            raise RuntimeError(f"{RANK1_FAILURE} {batch_idx} at t={time.time():.3f}")
        return super().training_step(batch, batch_idx)


def fit_ddp_failing(ckpt_dir: str) -> None:
    """Two CPU ranks (DDP, gloo) with ``AdapterCallback``; rank 1 raises at its third batch."""
    from lightning.pytorch.strategies import DDPStrategy

    model = FailingOnRank1()
    t = trainer(
        max_epochs=1,
        devices=2,
        strategy=DDPStrategy(process_group_backend="gloo"),
        callbacks=[la.AdapterCallback(CONFIG, module="model", verbose=False), ModelCheckpoint(dirpath=ckpt_dir)],
    )
    t.fit(model, train_dataloaders=ResumableBatches())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=["train", "ddp-fail"], required=True)
    p.add_argument("--ckpt-dir", required=True)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--kill-at-step", type=int, default=None)
    p.add_argument("--resume", default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(1)  # every run reduces in the same order, so equal inputs give equal bits
    if args.mode == "ddp-fail":
        fit_ddp_failing(args.ckpt_dir)
        return
    t, model = fit_single(args.ckpt_dir, args.epochs, args.kill_at_step, args.resume)
    if args.out:
        torch.save(report(t, model), args.out)


if __name__ == "__main__":
    main()
