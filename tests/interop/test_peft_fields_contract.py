"""The PEFT config checks on plain dicts (no model is built): the field table's refusals and the JSON kinds
``check_peft_config_types`` names, each refusal naming the field, the value and what is expected. Found by mutation
testing (docs/MUTATION.md, the full interop sweep).
"""

from __future__ import annotations

import pytest

from lightning_adapters.errors import AdapterConfigError
from lightning_adapters.interop.peft import check_peft_config_types
from lightning_adapters.interop.peft_fields import IGNORED, PEFT_FIELDS, REFUSED, SUPPORTED, check_peft_fields, markdown
from lightning_adapters.registry import get_method_by_peft_type

PATH = "dir/adapter_config.json"


def _types(config: dict) -> None:
    check_peft_config_types(PATH, {"peft_type": "LORA", **config}, get_method_by_peft_type("LORA"))


def test_the_table_holds_each_kind_with_its_reason():
    lora = PEFT_FIELDS["LORA"]
    assert lora["peft_type"].status == SUPPORTED and lora["peft_type"].why == "selects the method"
    assert lora["init_lora_weights"].refused_values == ("mica",)
    assert lora["task_type"].status == IGNORED and "model wrapper" in lora["task_type"].why
    assert lora["use_qalora"].status == REFUSED and lora["use_qalora"].default is False
    assert lora["use_qalora"].why.startswith("QA-LoRA")
    text = markdown()
    assert "| `peft_type` | supported | selects the method |" in text
    assert f"| `task_type` | ignored | {lora['task_type'].why} |" in text


def test_a_refused_field_at_its_default_or_empty_loads():
    check_peft_fields(PATH, {"peft_type": "LORA", "use_qalora": False, "layer_replication": [], "megatron_config": {}})


def test_a_refused_field_set_is_refused_naming_it_the_file_and_the_default():
    with pytest.raises(AdapterConfigError, match=r"^dir/adapter_config.json: .*use_qalora=True .*\(QA-LoRA.*False"):
        check_peft_fields(PATH, {"peft_type": "LORA", "use_qalora": True})


def test_a_refused_value_of_a_supported_field_is_refused():
    with pytest.raises(AdapterConfigError, match=r"init_lora_weights='MiCA'"):
        check_peft_fields(PATH, {"peft_type": "LORA", "init_lora_weights": "MiCA"})


def test_an_unknown_null_field_does_not_stop_the_check_of_the_next_ones():
    with pytest.raises(AdapterConfigError, match=r"use_qalora=True"):
        check_peft_fields(PATH, {"peft_type": "LORA", "zz_new_option": None, "use_qalora": True})


def test_a_boolean_field_takes_no_string_unless_it_names_an_initialisation():
    _types({"init_lora_weights": "pissa"})
    with pytest.raises(AdapterConfigError, match=r"'use_rslora' must be a boolean, got a string \('yes'\)"):
        _types({"use_rslora": "yes"})


def test_a_missing_field_does_not_stop_the_check_of_the_next_ones():
    with pytest.raises(AdapterConfigError, match=r"'use_rslora' must be a boolean"):
        _types({"use_rslora": 1})  # no "r": that field is skipped, not the rest


def test_object_fields_take_null_and_refuse_other_kinds():
    _types({"rank_pattern": None, "alpha_pattern": None})
    with pytest.raises(AdapterConfigError, match=r"'rank_pattern' must be an object \(or null\), got an integer \(5\)"):
        _types({"rank_pattern": 5})


def test_targeting_fields_are_each_checked():
    with pytest.raises(AdapterConfigError, match=r"'exclude_modules' must be a list of module names or a regex"):
        _types({"exclude_modules": 5})
    with pytest.raises(AdapterConfigError, match=r"'exclude_modules' must be a list"):
        _types({"target_modules": None, "exclude_modules": 5})
    with pytest.raises(AdapterConfigError, match=r"'modules_to_save' must be a list of module names, got"):
        _types({"target_modules": None, "exclude_modules": None, "modules_to_save": "head"})


def test_pattern_values_are_numbers():
    _types({"alpha_pattern": {"q_proj": 2, "v_proj": 0.5}, "rank_pattern": {"q_proj": 2}})
    with pytest.raises(AdapterConfigError, match=r"\"alpha_pattern\['q_proj'\]\" must be one of numbers, got a string"):
        _types({"alpha_pattern": {"q_proj": "2"}})
    with pytest.raises(AdapterConfigError, match=r"must be one of integers, got a number \(2.5\)"):
        _types({"rank_pattern": {"q_proj": 2.5}})
