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

from lightning_adapters.errors import AdapterConfigError
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


# Every field the reader maps, at a value other than PEFT's default (a reader that drops a field or reads the wrong
# key falls back to the default, which the test above cannot tell from the right value).
NON_DEFAULT = {
    "LORA": (
        peft.LoraConfig,
        {
            "target_modules": ["q_proj"],
            "r": 3,
            "lora_alpha": 5,
            "lora_dropout": 0.125,
            "use_rslora": True,
            "use_dora": True,
            "init_lora_weights": "gaussian",
            "rank_pattern": {"q_proj": 2},
            "alpha_pattern": {"q_proj": 7},
            "layers_to_transform": [1, 2],
            "layers_pattern": "layers",
            "bias": "lora_only",
        },
    ),
    "LORA-loftq": (
        peft.LoraConfig,
        {
            "target_modules": ["q_proj"],
            "init_lora_weights": "loftq",
            "loftq_config": {"loftq_bits": 8, "loftq_iter": 3},
        },
    ),
    "LORA-bias-tokens-parameters": (
        peft.LoraConfig,
        {
            "target_modules": ["q_proj"],
            "lora_bias": True,
            "trainable_token_indices": [1, 3],
            "target_parameters": ["mlp.w"],
        },
    ),
    "ADALORA": (
        peft.AdaLoraConfig,
        {
            "target_modules": ["q_proj"],
            "init_r": 6,
            "target_r": 3,
            "tinit": 2,
            "tfinal": 3,
            "deltaT": 2,
            "beta1": 0.7,
            "beta2": 0.6,
            "orth_reg_weight": 0.25,
            "total_step": 20,
            "lora_alpha": 5,
            "lora_dropout": 0.125,
            "bias": "all",
            "layers_to_transform": [0, 2],
            "layers_pattern": "h",
        },
    ),
    "ADALORA-bias-only": (peft.AdaLoraConfig, {"target_modules": ["q_proj"], "total_step": 20, "bias": "lora_only"}),
    "LOHA": (
        peft.LoHaConfig,
        {
            "target_modules": ["q_proj"],
            "r": 3,
            "alpha": 5,
            "rank_dropout": 0.125,
            "module_dropout": 0.25,
            "use_effective_conv2d": True,
            "init_weights": False,
            "rank_pattern": {"q_proj": 2},
            "alpha_pattern": {"q_proj": 7},
            "layers_to_transform": [0, 2],
            "layers_pattern": "h",
        },
    ),
    "LOKR": (
        peft.LoKrConfig,
        {
            "target_modules": ["q_proj"],
            "r": 3,
            "alpha": 5,
            "rank_dropout": 0.125,
            "module_dropout": 0.25,
            "use_effective_conv2d": True,
            "decompose_both": True,
            "decompose_factor": 4,
            "rank_dropout_scale": True,
            "init_weights": False,
            "rank_pattern": {"q_proj": 2},
            "alpha_pattern": {"q_proj": 7},
            "layers_to_transform": [0, 2],
            "layers_pattern": "h",
        },
    ),
    "OFT": (
        peft.OFTConfig,
        {
            "target_modules": ["q_proj"],
            "r": 0,
            "oft_block_size": 4,
            "use_cayley_neumann": False,
            "num_cayley_neumann_terms": 3,
            "block_share": True,
            "coft": True,
            "eps": 1e-3,
            "module_dropout": 0.25,
            "init_weights": False,
            "bias": "oft_only",
            "layers_to_transform": [0, 2],
            "layers_pattern": "h",
        },
    ),
    "OFT-r": (
        peft.OFTConfig,
        {"target_modules": ["q_proj"], "r": 4, "oft_block_size": 0, "use_cayley_neumann": False},
    ),
    "BOFT": (
        peft.BOFTConfig,
        {
            "target_modules": ["q_proj"],
            "boft_block_size": 0,
            "boft_block_num": 4,
            "boft_n_butterfly_factor": 2,
            "boft_dropout": 0.125,
            "init_weights": False,
            "bias": "boft_only",
            "layers_to_transform": [0, 2],
            "layers_pattern": "h",
        },
    ),
}


TARGETING = ("target_modules", "exclude_modules", "modules_to_save")


@pytest.mark.parametrize("case", sorted(NON_DEFAULT))
def test_non_default_values_are_read_and_written_back(case):
    """PEFT's file -> our config -> PEFT's fields: every non-default value comes back as PEFT wrote it."""
    cls, kwargs = NON_DEFAULT[case]
    kwargs = {**kwargs, "exclude_modules": ["k_proj"], "modules_to_save": ["head"]}
    full = _json(cls(**kwargs).to_dict())
    spec = get_method_by_peft_type(full["peft_type"])
    config = spec.config_from_peft(full)
    back = _json(spec.config_to_peft(config))
    for key in kwargs:
        if key in TARGETING:
            # Written by save_peft from the injection record, not by config_to_peft: read back on the config.
            assert getattr(config, key) == full[key], key
            continue
        assert back[key] == full[key], key


@pytest.mark.parametrize("tinit, tfinal, total", [(5, 5, 10), (5, 6, 10), (4, 5, 10)])
def test_adalora_schedule_peft_refuses_loads_without_a_schedule(tinit, tfinal, total):
    """PEFT refuses ``tinit + tfinal >= total_step`` (no budgeting phase); such a file still loads for inference,
    with no schedule; a schedule PEFT accepts is kept. The boundary ``tinit + tfinal == total_step`` is refused."""
    try:
        peft.AdaLoraConfig(target_modules=["q_proj"], tinit=tinit, tfinal=tfinal, total_step=total)
        peft_accepts = True
    except ValueError:
        peft_accepts = False
    d = {"peft_type": "ADALORA", "target_modules": ["q_proj"], "tinit": tinit, "tfinal": tfinal, "total_step": total}
    config = get_method_by_peft_type("ADALORA").config_from_peft(d)
    assert (tinit, tfinal) == (config.tinit, config.tfinal)
    assert config.total_step == (total if peft_accepts else None)
    assert peft_accepts == (tinit + tfinal < total)


@pytest.mark.parametrize("peft_type, method", [("LORA", "lora"), ("ADALORA", "adalora")])
def test_a_field_this_library_does_not_know_is_refused_naming_the_method(peft_type, method):
    """A field a newer PEFT writes (unknown here, not off) is refused rather than ignored, and the refusal starts
    with the method that read it, as every config refusal does."""
    cls, required = CASES[peft_type]
    d = {**_json(cls(**required).to_dict()), "a_field_from_the_future": 2}
    with pytest.raises(AdapterConfigError, match=rf"^{method}: PEFT {peft_type} option a_field_from_the_future=2 "):
        get_method_by_peft_type(peft_type).config_from_peft(d)


@pytest.mark.parametrize("given", [{"loftq_bits": 8}, {"loftq_iter": 3}], ids=["bits", "iter"])
def test_a_partial_loftq_config_takes_pefts_defaults_for_the_rest(given):
    """A ``loftq_config`` written with one of its two keys (hand-written files do): the other is PEFT's
    ``LoftQConfig`` default, as PEFT reads it."""
    pefts = peft.LoftQConfig(**given)
    d = {"peft_type": "LORA", "target_modules": ["q_proj"], "init_lora_weights": "loftq", "loftq_config": given}
    config = get_method_by_peft_type("LORA").config_from_peft(d)
    assert (config.loftq_bits, config.loftq_iter) == (pefts.loftq_bits, pefts.loftq_iter)


def test_adalora_rank_pattern_keys_of_peft_read_as_module_names():
    """PEFT writes AdaLoRA's pruned ranks as ``{"<module>.lora_E": flags}`` (older files add ``.<adapter>``); the
    config holds them by module name, the flags unchanged. A key of another form is refused, naming it."""
    flags = [True, False, True, True]
    d = {
        "peft_type": "ADALORA",
        "target_modules": ["q_proj"],
        "init_r": 4,
        "total_step": 10,
        "rank_pattern": {"model.layers.0.q_proj.lora_E": flags, "model.layers.1.q_proj.lora_E.default": flags[::-1]},
    }
    config = get_method_by_peft_type("ADALORA").config_from_peft(d)
    assert config.rank_pattern == {"model.layers.0.q_proj": flags, "model.layers.1.q_proj": flags[::-1]}
    d["rank_pattern"] = {"model.layers.0.q_proj.lora_A": flags}
    with pytest.raises(AdapterConfigError, match=r"rank_pattern key 'model.layers.0.q_proj.lora_A'"):
        get_method_by_peft_type("ADALORA").config_from_peft(d)
