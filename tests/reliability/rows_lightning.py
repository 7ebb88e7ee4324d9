"""Bad-input rows of named adapters under Lightning: ``AdapterCallback``'s ``name``/``init_from``/``active``
options, and loading an adapter checkpoint under a name (``init_from``).

``rows(Row, snapshot_into)`` builds them with ``test_bad_inputs.Row`` and its snapshot function; rows that change the
model first call ``snapshot_into(model)`` right before the refused call.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

import lightning_adapters as la
from tests.helpers import tiny_llama

CFG = dict(r=2, target_modules=["q_proj"])


def _init_from_checkpoint_missing_tensors(snapshot_into: Callable) -> Callable:
    """A checkpoint whose adapter lacks tensors for this model: ``b`` is injected, then removed again."""

    def action(m, tmp):
        from lightning_adapters.lightning.checkpoint import build_metadata
        from lightning_adapters.lightning.sources import load_adapter

        config = la.LoRAConfig(**CFG)
        meta = build_metadata(
            adapters={"b": ("lora", config)},
            name="b",
            active=["b"],
            trainable=["b"],
            module="",
            fingerprint=None,
            shapes={},
        )
        torch.save({"state_dict": {}, "lightning_adapters": meta}, tmp / "b.ckpt")
        la.inject(m, la.LoRAConfig(r=4, target_modules=["v_proj"]), name="a")
        snapshot_into(m)
        return load_adapter(m, "b", str(tmp / "b.ckpt"))

    return action


def rows(Row: type, snapshot_into: Callable) -> list:
    """The rows of this module."""
    return [
        Row(
            "callback-init-from-missing",
            None,
            lambda m, tmp: la.AdapterCallback(la.LoRAConfig(**CFG), init_from={"a": tmp / "nothing"}),
            la.AdapterConfigError,
            r"init_from\['a'\] = '.*nothing' is neither a PEFT directory .* nor an adapter checkpoint",
        ),
        Row(
            "callback-init-from-not-a-path",
            None,
            lambda m, tmp: la.AdapterCallback(la.LoRAConfig(**CFG), init_from=3),
            la.AdapterConfigError,
            r"init_from must be a path or a mapping .* got 3",
        ),
        Row(
            "callback-active-not-names",
            None,
            lambda m, tmp: la.AdapterCallback(la.LoRAConfig(**CFG), active=[1]),
            la.AdapterConfigError,
            r"active must be an adapter name or a list of them .* got \[1\]",
        ),
        Row(
            "callback-name-unusable",
            None,
            lambda m, tmp: la.AdapterCallback(la.LoRAConfig(**CFG), name="a.b"),
            la.AdapterConfigError,
            r"adapter name 'a\.b' is not usable",
        ),
        Row(
            "init-from-checkpoint-lacks-tensors",
            tiny_llama,
            _init_from_checkpoint_missing_tensors(snapshot_into),
            la.AdapterStateError,
            r"init_from\['b'\] = .* lacks .*q_proj\.adapter\.b\.lora_A",
        ),
    ]
