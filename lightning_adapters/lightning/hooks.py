"""The protocol through which a method takes part in the Lightning training loop.

Most methods need nothing from the loop. AdaLoRA needs to see gradients after every optimizer step, to
reallocate ranks at epoch ends or every ``deltaT`` steps, to add a regulariser to the loss and to keep its
state in checkpoints. A method provides such behaviour by registering a ``MethodTrainingHooks`` subclass as
``MethodSpec.training_hooks``; ``AdapterCallback`` and ``AdapterMixin`` create one instance per fit and call
it. Every method here has a default that does nothing.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class MethodTrainingHooks:
    """Per-fit companion of an injected adapter, driven by the Lightning integration.

    Args:
        model: The injected module (the one ``inject`` was called on).
        config: Its adapter config.
    """

    def __init__(self, model: nn.Module, config: Any) -> None:
        self.model = model
        self.config = config

    def setup(self, trainer: Any, pl_module: Any) -> None:
        """Called once the trainer is configured (``estimated_stepping_batches`` is available), before training."""

    def loss_term(self) -> torch.Tensor | None:
        """A term the integration adds to the training loss of every batch (``None``: nothing to add)."""
        return None

    def on_optimizer_step_end(self, trainer: Any, pl_module: Any, optimizer_step: int) -> None:
        """After ``optimizer.step()`` and before gradients are zeroed; ``optimizer_step`` counts from 0."""

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        """At the end of every training epoch."""

    def state_dict(self) -> dict[str, Any]:
        """State to keep in the Lightning checkpoint so a resumed run continues exactly."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of ``state_dict``."""
