"""LightningModules for the integration tests, written without any knowledge of lightning_adapters.

``BoringMLP`` has a base large enough (about 0.8 MB) that a leaked base tensor shows in checkpoint sizes.
``TinyLlamaLM`` wraps ``tests.helpers.tiny_llama`` as ``self.model`` (optionally built in ``configure_model``).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tests.helpers import tiny_llama

WIDTH = 256


class BoringMLP(L.LightningModule):
    """Three 256-wide linears and a small head; AdamW over ``self.parameters()`` (frozen ones included)."""

    def __init__(self, lr: float = 0.02, optimizer: str = "adamw", seed: int = 0) -> None:
        super().__init__()
        self.lr, self.optimizer_name = lr, optimizer
        torch.manual_seed(seed)
        self.encoder = nn.Sequential(
            nn.Linear(WIDTH, WIDTH), nn.Tanh(), nn.Linear(WIDTH, WIDTH), nn.Tanh(), nn.Linear(WIDTH, WIDTH)
        )
        self.head = nn.Linear(WIDTH, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def mlp_data(n: int = 64, batch_size: int = 8, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    ds = TensorDataset(torch.randn(n, WIDTH, generator=g), torch.randint(0, 4, (n,), generator=g))
    return DataLoader(ds, batch_size=batch_size, shuffle=False)


class TinyLlamaLM(L.LightningModule):
    """Causal LM loss on a tiny Llama; with ``build_in_configure_model`` the model only exists after it."""

    def __init__(self, lr: float = 0.05, build_in_configure_model: bool = False, seed: int = 0, **overrides: Any):
        super().__init__()
        self.lr, self.seed, self.overrides = lr, seed, overrides
        self.model = None if build_in_configure_model else self._build()

    def _build(self) -> nn.Module:
        torch.manual_seed(self.seed)
        return tiny_llama(**self.overrides)

    def configure_model(self) -> None:
        if self.model is None:
            self.model = self._build()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (ids,) = batch
        return self.model(input_ids=ids, labels=ids).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=self.lr, momentum=0.9)


def token_data(n: int = 16, seq: int = 8, batch_size: int = 4, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(torch.randint(0, 128, (n, seq), generator=g)), batch_size=batch_size)


def trainer(**kwargs: Any) -> L.Trainer:
    """A quiet CPU trainer."""
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        max_epochs=1,
    )
    defaults.update(kwargs)
    if any(isinstance(cb, ModelCheckpoint) for cb in defaults.get("callbacks", [])):
        defaults["enable_checkpointing"] = True
    return L.Trainer(**defaults)


def leave_process_group() -> None:
    """End a multi-process test script: leave the process group before the interpreter exits.

    Torn down at interpreter exit instead, gloo's threads can abort a process whose run succeeded ("terminate called
    without an active exception", seen once in CI under FSDP2).
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def two_fc_backbone() -> nn.Module:
    """A bare module with two same-named linears, ``enc.fc`` and ``dec.fc`` (4 -> 4, seed 0)."""
    torch.manual_seed(0)
    b = nn.Module()
    b.enc, b.dec = nn.Module(), nn.Module()
    b.enc.fc, b.dec.fc = nn.Linear(4, 4), nn.Linear(4, 4)
    return b


def tiny_mlp(seed: int = 0) -> nn.Sequential:
    """Linear(6, 8), ReLU, Linear(8, 4), seeded: the small model the direct runtime and checkpoint tests adapt."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))


def mlp_lora(**kwargs: Any) -> Any:
    """LoRA r=2 with random-free init (``init_weights=False``) on both layers of ``tiny_mlp`` unless told."""
    import lightning_adapters as la

    kwargs.setdefault("target_modules", ["0", "2"])
    return la.LoRAConfig(r=2, init_weights=False, **kwargs)
