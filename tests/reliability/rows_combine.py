"""Bad-input rows of issue 16's combinations: ``combine`` (weights, names, forms, sources it cannot read),
``to_lora`` (ranks, sources without a weight-space ΔW) and PEFT directories holding several adapters.

``rows(Row, snapshot_into)`` builds them with ``test_bad_inputs.Row`` and its snapshot function (passed in, so this
module never imports the test module). Every row injects first and calls ``snapshot_into(model)`` right before the
refused call: the model with its adapters is what must stay unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning_adapters as la
from tests.helpers import tiny_llama


def _lora(**kw: Any) -> la.LoRAConfig:
    return la.LoRAConfig(**{"r": 2, "target_modules": ["q_proj"], **kw})


def _two(snapshot_into: Callable, call: Callable, second: Callable[[], Any] | None = None) -> Callable:
    """Inject ``default`` (LoRA) and ``b`` (``second()``, LoRA by default), snapshot, ``call``."""

    def action(m, tmp):
        la.inject(m, _lora())
        la.inject(m, second() if second is not None else _lora(), name="b")
        snapshot_into(m)
        return call(m)

    return action


def _saved_b_only(snapshot_into: Callable) -> Callable:
    """A directory holding adapter ``b`` only (in its sub-folder), loaded without a name into a plain model."""

    def action(m, tmp):
        other = tiny_llama()
        la.inject(other, _lora())
        la.inject(other, _lora(), name="b")
        la.save_peft(other, tmp, names=["b"])
        snapshot_into(m)
        return la.load_peft(m, tmp)

    return action


def rows(Row: type, snapshot_into: Callable) -> list:  # noqa: N803 - the Row class of test_bad_inputs
    """The rows, as ``Row`` instances."""
    s = snapshot_into
    both = {"default": 0.5, "b": 0.5}
    return [
        Row(
            "combine-unknown-how",
            tiny_llama,
            _two(s, lambda m: la.combine(m, both, name="ab", how="average")),
            la.AdapterConfigError,
            r"combine: how='average' is not a combination; use one of \['linear', 'cat', 'svd'",
        ),
        Row(
            "combine-unknown-adapter",
            tiny_llama,
            _two(s, lambda m: la.combine(m, {"default": 1.0, "c": 1.0}, name="ab", how="cat")),
            la.AdapterConfigError,
            r"combine: unknown adapter name 'c'; the model has \['default', 'b'\]",
        ),
        Row(
            "combine-weights-not-a-mapping",
            tiny_llama,
            _two(s, lambda m: la.combine(m, ["default", "b"], name="ab", how="cat")),
            la.AdapterTypeError,
            r"combine: weights must be a non-empty mapping \{adapter name: weight\}",
        ),
        Row(
            "combine-non-finite-weight",
            tiny_llama,
            _two(s, lambda m: la.combine(m, {"default": float("nan"), "b": 1.0}, name="ab", how="cat")),
            la.AdapterConfigError,
            r"combine: the weight of adapter 'default' must be a finite number, got nan",
        ),
        Row(
            "combine-taken-name",
            tiny_llama,
            _two(s, lambda m: la.combine(m, both, name="b", how="cat")),
            la.AdapterConfigError,
            r"combine: the model already has an adapter named 'b'; pick a new name",
        ),
        Row(
            "combine-linear-other-ranks",
            tiny_llama,
            _two(s, lambda m: la.combine(m, both, name="ab", how="linear"), second=lambda: _lora(r=4)),
            la.AdapterConfigError,
            r"how='linear' adds the factors themselves, so every adapter needs the same rank; got "
            r"\{'default': 2, 'b': 4\}. Use how='cat' or how='svd'",
        ),
        Row(
            "combine-ties-without-density",
            tiny_llama,
            _two(s, lambda m: la.combine(m, both, name="ab", how="ties")),
            la.AdapterConfigError,
            r"how='ties' prunes entries and needs density, the fraction kept, in \[0, 1\]",
        ),
        Row(
            "combine-non-lora-source",
            tiny_llama,
            _two(
                s,
                lambda m: la.combine(m, both, name="ab", how="svd"),
                second=lambda: la.LoHaConfig(r=2, target_modules=["q_proj"]),
            ),
            la.AdapterConfigError,
            r"adapter 'b' is a loha adapter; only LoRA adapters combine.*lightning_adapters.to_lora\(model, 'b'",
        ),
        Row(
            "combine-dora-source",
            tiny_llama,
            _two(s, lambda m: la.combine(m, both, name="ab", how="cat"), second=lambda: _lora(use_dora=True)),
            la.AdapterConfigError,
            r"adapter 'b' has use_dora=True, whose extra state has no weighted combination",
        ),
        Row(
            "to-lora-bad-rank",
            tiny_llama,
            _two(s, lambda m: la.to_lora(m, "b", r=0)),
            la.AdapterConfigError,
            r"to_lora: r must be a rank >= 1 or an energy fraction in \(0, 1\], got 0",
        ),
        Row(
            "to-lora-energy-above-one",
            tiny_llama,
            _two(s, lambda m: la.to_lora(m, "b", r=1.5)),
            la.AdapterConfigError,
            r"a float r is the fraction of ‖ΔW‖² to keep and must be in \(0, 1\], got 1.5",
        ),
        Row(
            "to-lora-rotation-source",
            tiny_llama,
            _two(
                s,
                lambda m: la.to_lora(m, "b", r=2),
                second=lambda: la.OFTConfig(r=0, oft_block_size=4, target_modules=["q_proj"]),
            ),
            la.AdapterConfigError,
            r"to_lora: adapter 'b' cannot become a LoRA on 'model.layers.0.self_attn.q_proj': OFTLayer has no "
            r"additive weight-space ΔW",
        ),
        Row(
            "to-lora-whole-model-source",
            tiny_llama,
            _two(
                s,
                lambda m: la.to_lora(m, "b", r=2),
                second=lambda: la.LlamaAdapterConfig(adapter_len=2, adapter_layers=1),
            ),
            la.AdapterConfigError,
            r"to_lora: adapter 'b' \(llama_adapter\) adapts the model as a whole and has no per-layer ΔW",
        ),
        Row(
            "save-peft-unknown-name",
            tiny_llama,
            _two(s, lambda m: la.save_peft(m, "unused", names=["default", "c"])),
            la.AdapterConfigError,
            r"save_peft: unknown adapter name 'c'; the model has \['default', 'b'\]",
        ),
        Row(
            "load-peft-taken-name",
            tiny_llama,
            _two(s, lambda m: la.load_peft(m, "unused", name="b")),
            la.AdapterConfigError,
            r"load_peft: the model already has an adapter named 'b'; load this one under another name",
        ),
        Row(
            "load-peft-only-sub-folders",
            tiny_llama,
            _saved_b_only(s),
            la.AdapterStateError,
            r"adapter_config.json does not exist.*it holds the adapters \['b'\] in sub-folders: load one with "
            r"load_peft\(model, directory, name=...\)",
        ),
    ]
