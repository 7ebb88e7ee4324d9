"""Reading a PEFT ``adapter_config.json`` that omits fields (older PEFT versions and hand-written files do): every
missing field takes PEFT's own default, for every method. The independent truth is PEFT's config class: the full
dict it writes for the same required arguments must give the same config as the minimal one. A default changed in
one method's ``config_from_peft`` (found by mutation testing, docs/MUTATION.md: ``use_dora`` read as ``True`` when
absent) fails here.
"""

from __future__ import annotations

import json

import peft
import pytest

from lightning_adapters.registry import get_method_by_peft_type

CASES = {
    "LORA": (peft.LoraConfig, {"target_modules": ["q_proj"]}),
    "ADALORA": (peft.AdaLoraConfig, {"target_modules": ["q_proj"], "total_step": 10}),
    "LOHA": (peft.LoHaConfig, {"target_modules": ["q_proj"]}),
    "LOKR": (peft.LoKrConfig, {"target_modules": ["q_proj"]}),
    "OFT": (peft.OFTConfig, {"target_modules": ["q_proj"], "r": 0, "oft_block_size": 4}),
    "BOFT": (peft.BOFTConfig, {"target_modules": ["q_proj"], "boft_block_size": 4}),
    "ADAPTION_PROMPT": (peft.AdaptionPromptConfig, {"adapter_len": 4, "adapter_layers": 1}),
}


def _json(value):
    """What PEFT's ``to_dict`` holds, as its JSON file holds it (enums by value, sets as lists)."""
    return json.loads(json.dumps(value, default=lambda o: o.value if hasattr(o, "value") else sorted(o)))


@pytest.mark.parametrize("peft_type", sorted(CASES))
def test_missing_fields_take_pefts_defaults(peft_type):
    cls, required = CASES[peft_type]
    full = _json(cls(**required).to_dict())
    spec = get_method_by_peft_type(full["peft_type"])
    from_full = spec.config_from_peft(full)
    from_minimal = spec.config_from_peft({"peft_type": full["peft_type"], **required})
    assert from_minimal == from_full
