"""Bad-input rows of per-sample routing (``la.per_sample``): names that are not one adapter per row, adapters that
cannot route, merged adapters and a batch whose size is not the number of names.

``rows(Row, snapshot_into)`` builds them with ``test_bad_inputs.Row`` and its snapshot function (passed in, so this
module never imports the test module). Every row injects first and calls ``snapshot_into(model)`` right before the
refused call: the model with its adapters (and no routing left set) is what must stay unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

import lightning_adapters as la
from tests.helpers import tiny_llama


def _routed(snapshot_into: Callable, names: Any, second: Callable[[], Any] | None = None, prepare=None, rows=2):
    def action(m, tmp):
        la.inject(m, la.LoRAConfig(r=2, target_modules=["q_proj"]), name="a")
        la.inject(m, second() if second is not None else la.LoRAConfig(r=2, target_modules=["q_proj"]), name="b")
        if prepare is not None:
            prepare(m)
        snapshot_into(m)
        with la.per_sample(m, names):
            m(torch.zeros(rows, 4, dtype=torch.long))

    return action


def rows(Row: type, snapshot_into: Callable) -> list:  # noqa: N803 - the Row class of test_bad_inputs
    """The rows, as ``Row`` instances."""
    s = snapshot_into
    return [
        Row(
            "per-sample-unknown-name",
            tiny_llama,
            _routed(s, ["a", "c"]),
            la.AdapterConfigError,
            r"per_sample: unknown adapter name 'c'; use one of \['a', 'b'\], or '__base__' for the base model",
        ),
        Row(
            "per-sample-one-string",
            tiny_llama,
            _routed(s, "a"),
            la.AdapterTypeError,
            r"per_sample: names must be a list with one adapter name \(or '__base__'\) per row of the batch, got 'a'",
        ),
        Row(
            "per-sample-empty",
            tiny_llama,
            _routed(s, []),
            la.AdapterConfigError,
            r"per_sample: got an empty list of names; give one name per row",
        ),
        Row(
            "per-sample-batch-size",
            tiny_llama,
            _routed(s, ["a", "b", "a"]),
            la.AdapterStateError,
            r"AdaptedLinear got an input of shape \(2, 4, 64\), whose first dimension is not the 3 rows routed; give "
            r"one name per row",
        ),
        Row(
            "per-sample-merged",
            tiny_llama,
            _routed(s, ["a", "b"], prepare=lambda m: la.merge(m)),
            la.AdapterStateError,
            r"per_sample: adapter 'a' is merged into '.*q_proj', where it acts on every row; call "
            r"lightning_adapters.unmerge\(model\) first",
        ),
        Row(
            "per-sample-whole-model-adapter",
            tiny_llama,
            _routed(s, ["a", "b"], second=lambda: la.LlamaAdapterConfig(adapter_len=2, adapter_layers=1)),
            la.AdapterConfigError,
            r"per_sample: adapter 'b' \(llama_adapter\) adapts the whole model, not single layers, so its rows cannot "
            r"be routed",
        ),
    ]
