"""Bad-input rows of issue 16 (several named adapters): unknown, repeated and unusable names, stacking a method
that cannot stack, deleting the active adapter, scaling what cannot be scaled, and calls a merged model refuses.

``rows(Row, snapshot_into)`` builds them with ``test_bad_inputs.Row`` and its snapshot function (passed in, so this
module never imports the test module). Every row injects first and calls ``snapshot_into(model)`` right before the
refused call: the model with its adapters is what must stay unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning_adapters as la
from tests.helpers import tiny_bert, tiny_gpt2, tiny_llama


def _lora(**kw: Any) -> la.LoRAConfig:
    return la.LoRAConfig(r=2, target_modules=["q_proj"], **kw)


def _two(snapshot_into: Callable, call: Callable, second: Callable[[], Any] | None = None, prepare=None) -> Callable:
    """Inject ``default`` (LoRA) and ``b`` (``second()``, LoRA by default), run ``prepare``, snapshot, ``call``."""

    def action(m, tmp):
        la.inject(m, _lora())
        la.inject(m, second() if second is not None else _lora(), name="b")
        if prepare is not None:
            prepare(m)
        snapshot_into(m)
        return call(m)

    return action


def _then(snapshot_into: Callable, first: Any, call: Callable) -> Callable:
    """Inject ``first`` (as ``default``), snapshot, ``call``."""

    def action(m, tmp):
        la.inject(m, first)
        snapshot_into(m)
        return call(m)

    return action


def _merged(m) -> None:
    la.merge(m)


def rows(Row: type, snapshot_into: Callable) -> list:  # noqa: N803 - the Row class of test_bad_inputs
    """The rows, as ``Row`` instances."""
    s = snapshot_into
    oft = lambda: la.OFTConfig(r=4, oft_block_size=0, target_modules=["q_proj"])  # noqa: E731 - a config factory
    return [
        Row(
            "multi-inject-taken-name",
            tiny_llama,
            _two(s, lambda m: la.inject(m, la.LoRAConfig(r=4, target_modules=["q_proj"]), name="b")),
            la.AdapterConfigError,
            r"already has an adapter named 'b' \(lora\) with a different config; pick another name",
        ),
        Row(
            "multi-inject-bad-name",
            tiny_llama,
            _two(s, lambda m: la.inject(m, _lora(), name="task.b")),
            la.AdapterConfigError,
            r"adapter name 'task.b' is not usable; use a string of letters, digits, '_' and '-'",
        ),
        Row(
            "multi-inject-reserved-name",
            tiny_llama,
            _two(s, lambda m: la.inject(m, _lora(), name="__base__")),
            la.AdapterConfigError,
            r"adapter name '__base__' is reserved",
        ),
        Row(
            "multi-inject-while-merged",
            tiny_llama,
            _two(s, lambda m: la.inject(m, _lora(), name="c"), prepare=_merged),
            la.AdapterConfigError,
            r"adapter 'default' is merged into the base weights.*call lightning_adapters.unmerge\(model\) first",
        ),
        Row(
            "multi-inject-shared-modules-to-save",
            lambda: tiny_llama(),
            _two(
                s,
                lambda m: la.inject(m, la.LoRAConfig(r=2, target_modules=["v_proj"], modules_to_save=["lm_head"]), "c"),
                second=lambda: la.LoRAConfig(r=2, target_modules=["k_proj"], modules_to_save=["lm_head"]),
            ),
            la.AdapterConfigError,
            r"modules_to_save \['lm_head'\] are already saved by adapter 'b'",
        ),
        Row(
            "multi-inject-residual-init-on-shared-module",
            tiny_llama,
            _two(s, lambda m: la.inject(m, la.LoRAConfig(r=2, target_modules=["q_proj"], init_weights="pissa"), "c")),
            la.AdapterConfigError,
            r"already holds adapter 'default', and adapter 'c' uses an init that rewrites the base weight",
        ),
        Row(
            "multi-inject-shared-bias",
            tiny_gpt2,
            _then(
                s,
                la.LoRAConfig(r=2, target_modules=["c_attn"], bias="lora_only"),
                lambda m: la.inject(m, la.LoRAConfig(r=2, target_modules=["c_fc", "c_attn"], bias="lora_only"), "c"),
            ),
            la.AdapterConfigError,
            r"inject 'c': bias='lora_only' would train \['transformer.h.0.attn.c_attn.bias', "
            r"'transformer.h.1.attn.c_attn.bias'\] in place, which adapter 'default' already trains "
            r"\(bias='lora_only'\).*use bias='none' in one of them",
        ),
        Row(
            "multi-inject-bias-over-modules-to-save",
            tiny_bert,
            _then(
                s,
                la.LoRAConfig(r=2, target_modules=["query"], modules_to_save=["classifier"]),
                lambda m: la.inject(m, la.LoRAConfig(r=2, target_modules=["value"], bias="all"), "c"),
            ),
            la.AdapterConfigError,
            r"inject 'c': bias='all' would train \['classifier.bias'\] in place, which adapter 'default' already "
            r"trains \(modules_to_save\).*or leave 'classifier' out of modules_to_save",
        ),
        Row(
            "multi-set-active-unknown",
            tiny_llama,
            _two(s, lambda m: la.set_active(m, ["default", "c"])),
            la.AdapterConfigError,
            r"set_active: unknown adapter name 'c'; the model has \['default', 'b'\]",
        ),
        Row(
            "multi-set-active-repeated",
            tiny_llama,
            _two(s, lambda m: la.set_active(m, ["b", "b"])),
            la.AdapterConfigError,
            r"set_active: adapter 'b' is named twice",
        ),
        Row(
            "multi-set-active-none",
            tiny_llama,
            _two(s, lambda m: la.set_active(m, [])),
            la.AdapterConfigError,
            r"set_active: got no adapter name; pass one or more of \['default', 'b'\]",
        ),
        Row(
            "multi-set-active-not-a-name",
            tiny_llama,
            _two(s, lambda m: la.set_active(m, 1)),
            la.AdapterTypeError,
            r"set_active: adapter names must be a string or a list of strings, got 1",
        ),
        Row(
            "multi-stack-rotation",
            tiny_llama,
            _two(s, lambda m: la.set_active(m, ["default", "b"]), second=oft),
            la.AdapterConfigError,
            r"would act together on 'model.layers.0.self_attn.q_proj', but 'b' \(OFTLayer\) cannot stack: it rotates",
        ),
        Row(
            "multi-set-active-merged",
            tiny_llama,
            _two(s, lambda m: la.set_active(m, "b"), prepare=_merged),
            la.AdapterStateError,
            r"set_active: adapters \['default'\] are merged into the base weights.*unmerge\(model\) first",
        ),
        Row(
            "multi-delete-active",
            tiny_llama,
            _two(s, lambda m: la.delete(m, "default")),
            la.AdapterConfigError,
            r"delete: adapter 'default' is active; call lightning_adapters.set_active\(model, 'b'\) first",
        ),
        Row(
            "multi-delete-unknown",
            tiny_llama,
            _two(s, lambda m: la.delete(m, "c")),
            la.AdapterConfigError,
            r"delete: unknown adapter name 'c'",
        ),
        Row(
            "multi-set-trainable-unknown",
            tiny_llama,
            _two(s, lambda m: la.set_trainable(m, "c")),
            la.AdapterConfigError,
            r"set_trainable: unknown adapter name 'c'",
        ),
        Row(
            "multi-set-scale-rotation",
            tiny_llama,
            _two(s, lambda m: la.set_scale(m, "b", 0.5), second=oft),
            la.AdapterConfigError,
            r"set_scale: adapter 'b' cannot be scaled on 'model.layers.0.self_attn.q_proj' \(OFTLayer\)",
        ),
        Row(
            "multi-set-scale-not-finite",
            tiny_llama,
            _two(s, lambda m: la.set_scale(m, "b", float("nan"))),
            la.AdapterConfigError,
            r"set_scale: scale must be finite, got nan",
        ),
        Row(
            "multi-merge-scaled",
            tiny_llama,
            _two(s, lambda m: la.merge(m), prepare=lambda m: la.set_scale(m, "default", 0.5)),
            la.MergeError,
            r"scaled by set_scale to 0.5; .*set_scale\(model, name, 1.0\) first",
        ),
        Row(
            "multi-merge-unknown",
            tiny_llama,
            _two(s, lambda m: la.merge(m, names=["c"])),
            la.AdapterConfigError,
            r"merge: unknown adapter name 'c'",
        ),
        Row(
            "multi-merge-two-rotations",
            tiny_llama,
            _two(s, lambda m: la.merge(m, names=["default", "b"]), second=oft),
            la.AdapterConfigError,
            r"merge: adapters \['default', 'b'\] would act together.*'b' \(OFTLayer\) cannot stack",
        ),
        Row(
            "multi-state-unknown-name",
            tiny_llama,
            _two(s, lambda m: la.adapter_state_dict(m, name="c")),
            la.AdapterConfigError,
            r"adapter_state_dict: unknown adapter name 'c'",
        ),
        Row(
            "multi-load-into-other-targets",
            tiny_llama,
            _two(
                s,
                lambda m: la.load_adapter_state_dict(m, la.adapter_state_dict(m, name="default"), name="b"),
                second=lambda: la.LoRAConfig(r=2, target_modules=["v_proj"]),
            ),
            la.AdapterStateError,
            r"missing keys \['model.layers.0.self_attn.v_proj.adapter.lora_A'.*unexpected keys "
            r"\['model.layers.0.self_attn.q_proj.adapter.lora_A'",
        ),
        Row(
            "multi-load-unnamed-state-into-several",
            tiny_llama,
            _two(s, lambda m: la.load_adapter_state_dict(m, la.adapter_state_dict(m, name="b"))),
            la.AdapterStateError,
            r"holds several adapters \['default', 'b'\]: a state of one adapter .* loads with "
            r"load_adapter_state_dict\(model, sd, name=...\)",
        ),
    ]
