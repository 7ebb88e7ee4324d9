"""Bad-input rows of the scale-out work: DeepSpeed checkpoint directories and AdaLoRA under DeepSpeed.

``rows(Row)`` builds them with ``test_bad_inputs.Row`` (passed in, so this module never imports the test module).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

import lightning_adapters as la
from tests.lightning.models import BoringMLP


def _foreign_deepspeed_dir(model: nn.Module, tmp: Path) -> Any:
    """A DeepSpeed checkpoint directory written without the integration (no adapter state in its client state)."""
    states = tmp / "ds.ckpt" / "checkpoint" / "mp_rank_00_model_states.pt"
    states.parent.mkdir(parents=True)
    torch.save({"module": {}, "global_steps": 4}, states)
    return la.restore_from_checkpoint(model, tmp / "ds.ckpt")


def _adalora_mlp() -> nn.Module:
    return la.inject(BoringMLP(), la.AdaLoRAConfig(target_modules=["encoder.0"], total_step=4))


def _adalora_under_deepspeed(model: nn.Module, tmp: Path) -> Any:
    from lightning.pytorch.strategies import DeepSpeedStrategy

    from lightning_adapters.lightning.strategies import prepare_strategy

    return prepare_strategy(SimpleNamespace(strategy=DeepSpeedStrategy(stage=2)), model, model)


def rows(Row: type) -> list:  # noqa: N803 - the Row class of test_bad_inputs
    """The rows, as ``Row`` instances."""
    return [
        Row(
            "restore-deepspeed-dir-without-adapter",
            BoringMLP,
            _foreign_deepspeed_dir,
            la.AdapterStateError,
            r"ds.ckpt is a DeepSpeed checkpoint written without lightning_adapters.*AdapterCallback",
        ),
        Row(
            "lightning-adalora-under-deepspeed",
            _adalora_mlp,
            _adalora_under_deepspeed,
            la.AdapterConfigError,
            r"AdaLoRA under DeepSpeedStrategy is not supported.*strategy ddp or fsdp2",
        ),
    ]
