"""Bad-input rows of issue 18 (PEFT options): refused PEFT fields and variants named on load, unknown future
fields, pickled weights that are not a state dict, bad ``bias`` / ``lora_bias`` / layer-selection values.

``rows(Row)`` builds them with ``test_bad_inputs.Row`` (passed in, so this module never imports the test module).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

import lightning_adapters as la
from tests.helpers import tiny_llama


def _cfg(name: str, **kw: Any):
    return lambda m, p: getattr(la, name)(**kw)


def _peft_file(edit: dict[str, Any] | None = None, weights: Any = None):
    """Save a good LoRA adapter of a tiny Llama to ``tmp``, edit its config (and replace its weights), load it."""

    def action(m: nn.Module, tmp: Path) -> Any:
        src = la.inject(tiny_llama(), la.LoRAConfig(r=2, target_modules=["q_proj"]))
        la.save_peft(src, tmp / "src")
        path = tmp / "src" / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **(edit or {})}))
        if weights is not None:
            (tmp / "src" / "adapter_model.safetensors").unlink()
            weights(tmp / "src" / "adapter_model.bin")
        return la.load_peft(m, tmp / "src")

    return action


def rows(Row: type) -> list:  # noqa: N803 - the Row class of test_bad_inputs
    """The rows, as ``Row`` instances."""
    return [
        Row(
            "peft-lora-variant-kasa",
            tiny_llama,
            _peft_file({"kasa_config": {"beta": 0.1}}),
            la.AdapterConfigError,
            r"option kasa_config=\{'beta': 0.1\} is not supported .*KaSA",
        ),
        Row(
            "peft-lora-target-parameters",
            tiny_llama,
            _peft_file({"target_parameters": ["experts.gate_up_proj"]}),
            la.TargetError,
            r"target_parameters \['experts.gate_up_proj'\] match no parameter of the model",
        ),
        Row(
            "peft-lora-init-mica",
            tiny_llama,
            _peft_file({"init_lora_weights": "mica"}),
            la.AdapterConfigError,
            r"init_lora_weights='mica'.*MiCA trains lora_A only",
        ),
        Row(
            "peft-unknown-future-field",
            tiny_llama,
            _peft_file({"use_new_thing": True}),
            la.AdapterConfigError,
            r"option use_new_thing=True is not known to lightning_adapters",
        ),
        Row(
            "peft-bin-not-a-state-dict",
            tiny_llama,
            _peft_file(weights=lambda p: torch.save([torch.zeros(1)], p)),
            la.AdapterStateError,
            r"adapter_model\.bin holds a list, not a state dict of tensors",
        ),
        Row(
            "peft-bin-not-a-pickle",
            tiny_llama,
            _peft_file(weights=lambda p: p.write_bytes(b"garbage")),
            la.AdapterStateError,
            r"adapter_model\.bin is not a readable PyTorch state dict",
        ),
        Row("lora-bias-bad", None, _cfg("LoRAConfig", bias="some"), la.AdapterConfigError, r"bias must be one of"),
        Row(
            "oft-bias-other-method",
            None,
            _cfg("OFTConfig", bias="lora_only"),
            la.AdapterConfigError,
            r"bias must be one of \['none', 'all', 'oft_only'\], got 'lora_only'",
        ),
        Row(
            "lora-bias-with-dora",
            None,
            _cfg("LoRAConfig", lora_bias=True, use_dora=True),
            la.AdapterConfigError,
            r"lora_bias=True does not work with use_dora=True",
        ),
        Row(
            "layers-to-transform-with-regex",
            None,
            _cfg("LoRAConfig", target_modules=".*q_proj", layers_to_transform=[0]),
            la.AdapterConfigError,
            r"layers_to_transform=\[0\] needs target_modules as a list",
        ),
        Row(
            "layers-pattern-alone",
            None,
            _cfg("LoRAConfig", target_modules=["q_proj"], layers_pattern="layers"),
            la.AdapterConfigError,
            r"layers_pattern='layers' is only used with layers_to_transform",
        ),
    ]
