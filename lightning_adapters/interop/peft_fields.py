"""Every field of PEFT 0.21.2's config classes for the methods this library implements, and what ``load_peft`` does
with it: supported (translated to our config), ignored on purpose (with the reason) or refused by name.

``check_peft_fields`` applies the table to an ``adapter_config.json`` before anything is built, so an adapter
using a PEFT option or variant this library does not implement fails at once, naming the field and its value,
instead of later as "unexpected keys". ``tests/peft_parity/test_options.py`` walks ``dataclasses.fields`` of
PEFT's config classes against this table (a field PEFT adds is a test failure until it is classified here) and
``docs/PEFT_OPTIONS.md`` is generated from it (``python -m lightning_adapters.interop.peft_fields``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from lightning_adapters.errors import AdapterConfigError

SUPPORTED = "supported"
IGNORED = "ignored"
REFUSED = "refused"


@dataclass(frozen=True)
class PeftField:
    """How one PEFT config field is treated.

    Attributes:
        status: ``"supported"``, ``"ignored"`` or ``"refused"``.
        why: Supported: what it becomes here. Ignored / refused: the reason.
        default: PEFT's default; for a refused field this (and ``None``/empty) is the only value that loads.
        refused_values: Values of a supported field that are refused by name (e.g. an unimplemented variant
            selected through ``init_lora_weights``).
    """

    status: str
    why: str
    default: Any = None
    refused_values: tuple = ()


def _s(why: str, *, refused_values: tuple = ()) -> PeftField:
    return PeftField(SUPPORTED, why, refused_values=refused_values)


def _i(why: str) -> PeftField:
    return PeftField(IGNORED, why)


def _r(why: str, default: Any = None) -> PeftField:
    return PeftField(REFUSED, why, default)


# Fields of PEFT's ``PeftConfig`` base, in every file.
_BASE = {
    "peft_type": _s("selects the method"),
    "task_type": _i(
        "selects PEFT's model wrapper class (PeftModelForCausalLM, ...); the adapter's targets, tensors and "
        "modules_to_save are all in the file already"
    ),
    "inference_mode": _i(
        "PEFT freezes the adapter when it loads one with inference_mode=true; load_peft always returns it "
        "trainable (freeze it with requires_grad_(False) or use it under torch.no_grad)"
    ),
    "revision": _i("the Hub revision of the base model; we never download"),
    "base_model_name_or_path": _i("informational; save_peft writes the model's own config._name_or_path"),
    "peft_version": _i("informational; save_peft writes 0.21.2"),
    "auto_mapping": _i("the class names PEFT's AutoPeftModel uses to rebuild a custom model; not needed to load"),
}

_TARGETING = {
    "target_modules": _s("target_modules (list of name suffixes, full-match regex or 'all-linear')"),
    "exclude_modules": _s("exclude_modules"),
    "modules_to_save": _s("modules_to_save (trained in full, saved in the file)"),
    "layers_to_transform": _s("layers_to_transform (PEFT's layer-index filter on suffix-matched modules)"),
    "layers_pattern": _s("layers_pattern (the layer list's name; PEFT's default index rule without it)"),
}

_FAN_IN_FAN_OUT = _i(
    "PEFT derives it from the layer type (true for transformers Conv1D, false for nn.Linear, overriding the file "
    "with a warning); lightning_adapters reads each layer's layout from its type the same way"
)
_BIAS = _s("bias ('none', 'all' or '<method>_only'): the base biases trained and saved with the adapter")

_MICA = "mica"
_LORA_VARIANTS = {
    "megatron_config": _r("Megatron-LM tensor-parallel LoRA layers"),
    "megatron_core": _i("the Python module PEFT imports when megatron_config is set (refused on its own)"),
    "trainable_token_indices": _r("trainable embedding rows (PEFT's TrainableTokens)"),
    "loftq_config": _s(
        "loftq_bits / loftq_iter: with init_lora_weights='loftq' the quantised base is recomputed from the original "
        "weights on load, as PEFT does; with init_lora_weights=true (PEFT's LoftQ example) the file belongs on the "
        "LoftQ-quantised base the user saved"
    ),
    "eva_config": _i("initialisation-time only (EVA): the file holds the resulting LoRA tensors"),
    "corda_config": _i("initialisation-time only (CorDA): the file holds the resulting LoRA tensors"),
    "lora_ga_config": _i("initialisation-time only (LoRA-GA): the file holds the resulting LoRA tensors"),
    "velora_config": _r("VeLoRA (compressed activations in the backward pass)"),
    "alora_invocation_tokens": _r("activated LoRA (aLoRA: the adapter acts after invocation tokens only)"),
    "use_qalora": _r("QA-LoRA (LoRA on grouped-pooled inputs of GPTQ layers)", False),
    "qalora_group_size": _i("read by PEFT only with use_qalora=true, which is refused"),
    "monteclora_config": _r("MonteCLoRA (Monte Carlo sampled LoRA)"),
    "layer_replication": _r("layer replication (duplicated base layers sharing weights)"),
    "runtime_config": _i("runtime-only (ephemeral GPU offload); PEFT itself leaves it out of saved configs"),
    "target_parameters": _r("LoRA on nn.Parameters (e.g. fused MoE expert weights)"),
    "use_bdlora": _r("BD-LoRA (block-diagonal LoRA for tensor-parallel serving)"),
    "arrow_config": _r("Arrow (routing among a library of LoRA experts)"),
    "kasa_config": _r("KaSA (knowledge-aware singular-value adaptation)"),
    "ensure_weight_tying": _i(
        "only acts on targets whose weights are tied to another module; lightning_adapters refuses such targets "
        "at inject (TargetError naming both tensors), so on every adapter it can load the option changes nothing"
    ),
}

LORA_FIELDS: dict[str, PeftField] = {
    **_BASE,
    **_TARGETING,
    "r": _s("r"),
    "lora_alpha": _s("alpha"),
    "lora_dropout": _s("dropout"),
    "fan_in_fan_out": _FAN_IN_FAN_OUT,
    "bias": _BIAS,
    "use_rslora": _s("use_rslora"),
    "init_lora_weights": _s(
        "init_weights ('pissa'/'olora' recomputed on load, 'corda' refused naming the fix, inits that only shape "
        "the saved tensors ('eva' with its rank_pattern, 'orthogonal', ...) load as plain LoRA; 'eva' is computed "
        "here from data by initialize_from_data or a Lightning fit); 'mica' is refused: MiCA trains lora_A only, and "
        "loading it as LoRA would train lora_B too",
        refused_values=(_MICA,),
    ),
    "rank_pattern": _s("rank_pattern"),
    "alpha_pattern": _s("alpha_pattern"),
    "use_dora": _s("use_dora"),
    "lora_bias": _s("lora_bias (a trainable bias on lora_B, added to the base bias on merge)"),
    **_LORA_VARIANTS,
    "trainable_token_indices": _s(
        "trainable_token_indices (only those embedding rows train; a head tied to the embedding shares them)"
    ),
    "target_parameters": _s("target_parameters (LoRA per expert on fused 3-D MoE weights, or on 2-D parameters)"),
}

ADALORA_FIELDS: dict[str, PeftField] = {
    **_BASE,
    **_TARGETING,
    "r": _i("PEFT's AdaLoRA ignores it (with a warning) and uses init_r"),
    "lora_alpha": _s("alpha"),
    "lora_dropout": _s("dropout"),
    "fan_in_fan_out": _FAN_IN_FAN_OUT,
    "bias": _BIAS,
    "use_rslora": _i("PEFT's AdaLoRA layers do not read it (their scale is alpha / ranknum)"),
    "init_lora_weights": _s("init_weights"),
    "rank_pattern": _s("rank_pattern (the pruned ranks, as keep-flags per module)"),
    "alpha_pattern": _i("PEFT's AdaLoRA layers do not read it"),
    "use_dora": _r("DoRA (PEFT's AdaLoRA refuses it too)", False),
    "lora_bias": _i("PEFT's AdaLoRA layers never create the lora_B bias, so the option has no effect there"),
    **_LORA_VARIANTS,
    "loftq_config": _r("LoftQ (PEFT's AdaLoRA refuses it too)", {}),
    "eva_config": _i("PEFT's AdaLoRA layers do not read it"),
    "corda_config": _i("PEFT's AdaLoRA layers do not read it"),
    "lora_ga_config": _i("PEFT's AdaLoRA layers do not read it"),
    "init_r": _s("init_r"),
    "target_r": _s("target_r"),
    "tinit": _s("tinit"),
    "tfinal": _s("tfinal"),
    "deltaT": _s("deltaT"),
    "beta1": _s("beta1"),
    "beta2": _s("beta2"),
    "orth_reg_weight": _s("orth_reg_weight"),
    "total_step": _s("total_step"),
}

_LYCORIS = {
    **_BASE,
    **_TARGETING,
    "r": _s("r"),
    "alpha": _s("alpha"),
    "rank_dropout": _s("rank_dropout"),
    "module_dropout": _s("module_dropout"),
    "use_effective_conv2d": _s("use_effective_conv2d"),
    "init_weights": _s("init_weights"),
    "rank_pattern": _s("rank_pattern"),
    "alpha_pattern": _s("alpha_pattern"),
}

LOHA_FIELDS: dict[str, PeftField] = dict(_LYCORIS)

LOKR_FIELDS: dict[str, PeftField] = {
    **_LYCORIS,
    "decompose_both": _s("decompose_both"),
    "decompose_factor": _s("decompose_factor"),
    "rank_dropout_scale": _s("rank_dropout_scale"),
}

OFT_FIELDS: dict[str, PeftField] = {
    **_BASE,
    **_TARGETING,
    "r": _s("r"),
    "oft_block_size": _s("oft_block_size"),
    "module_dropout": _s("module_dropout"),
    "fan_in_fan_out": _FAN_IN_FAN_OUT,
    "bias": _BIAS,
    "init_weights": _s("init_weights"),
    "coft": _s("coft"),
    "eps": _s("eps"),
    "block_share": _s("block_share"),
    "use_cayley_neumann": _s("use_cayley_neumann"),
    "num_cayley_neumann_terms": _s("num_cayley_neumann_terms"),
}

BOFT_FIELDS: dict[str, PeftField] = {
    **_BASE,
    **_TARGETING,
    "boft_block_size": _s("boft_block_size"),
    "boft_block_num": _s("boft_block_num"),
    "boft_n_butterfly_factor": _s("boft_n_butterfly_factor"),
    "boft_dropout": _s("boft_dropout"),
    "fan_in_fan_out": _FAN_IN_FAN_OUT,
    "bias": _BIAS,
    "init_weights": _s("init_weights"),
}

ADAPTION_PROMPT_FIELDS: dict[str, PeftField] = {
    **_BASE,
    "target_modules": _s("the attention module name, resolved per architecture as PEFT does"),
    "adapter_len": _s("adapter_len"),
    "adapter_layers": _s("adapter_layers"),
}

#: PEFT ``peft_type`` -> that config class's fields.
PEFT_FIELDS: dict[str, dict[str, PeftField]] = {
    "LORA": LORA_FIELDS,
    "ADALORA": ADALORA_FIELDS,
    "LOHA": LOHA_FIELDS,
    "LOKR": LOKR_FIELDS,
    "OFT": OFT_FIELDS,
    "BOFT": BOFT_FIELDS,
    "ADAPTION_PROMPT": ADAPTION_PROMPT_FIELDS,
}


def _neutral(value: Any, default: Any) -> bool:
    """Whether ``value`` leaves a refused option off: its PEFT default, or null / empty."""
    if value is None or (isinstance(value, (list, dict, str)) and not value):
        return True
    return type(value) is type(default) and value == default


def check_peft_fields(path: str | os.PathLike, config: dict[str, Any]) -> None:
    """Refuse, by name, every field of a PEFT ``adapter_config.json`` that would load as something else.

    A refused field must hold its default (or null / empty); a supported field must not hold one of its refused
    values; a field this table does not know (written by a newer PEFT) must be null, false or empty.

    Raises:
        AdapterConfigError: Naming the file, the field, its value and why it cannot be loaded.
    """
    table = PEFT_FIELDS.get(config.get("peft_type"))
    if table is None:
        return
    method = config["peft_type"]
    for name, value in config.items():
        rule = table.get(name)
        if rule is None:
            if value is None or value is False or (isinstance(value, (list, dict, str)) and not value):
                continue
            raise AdapterConfigError(
                f"{path}: PEFT {method} option {name}={value!r} is not known to lightning_adapters (written by a "
                f"newer PEFT?); refusing to load the adapter without it rather than give other outputs. Load it "
                f"with PEFT, or remove the field if it is off"
            )
        if rule.status == REFUSED and not _neutral(value, rule.default):
            raise AdapterConfigError(
                f"{path}: PEFT {method} option {name}={value!r} is not supported by lightning_adapters ({rule.why}); "
                f"only adapters with {name}={rule.default!r} load here. Load this one with PEFT"
            )
        if rule.status == SUPPORTED and isinstance(value, str) and value.lower() in rule.refused_values:
            raise AdapterConfigError(
                f"{path}: PEFT {method} option {name}={value!r} is not supported by lightning_adapters ({rule.why}). "
                f"Load this adapter with PEFT"
            )


def markdown() -> str:
    """``docs/PEFT_OPTIONS.md``: the table above, one section per PEFT config class."""
    titles = {
        "LORA": "LoraConfig (`LoRAConfig`)",
        "ADALORA": "AdaLoraConfig (`AdaLoRAConfig`)",
        "LOHA": "LoHaConfig (`LoHaConfig`)",
        "LOKR": "LoKrConfig (`LoKrConfig`)",
        "OFT": "OFTConfig (`OFTConfig`)",
        "BOFT": "BOFTConfig (`BOFTConfig`)",
        "ADAPTION_PROMPT": "AdaptionPromptConfig (`LlamaAdapterConfig`)",
    }
    lines = [
        "# PEFT 0.21.2 config fields in lightning_adapters",
        "",
        "Generated from `lightning_adapters/interop/peft_fields.py` "
        "(`python -m lightning_adapters.interop.peft_fields > docs/PEFT_OPTIONS.md`); "
        "`tests/peft_parity/test_options.py` checks that every field of PEFT's config classes is listed.",
        "",
        "- **supported**: translated both ways by `load_peft` / `save_peft` (the name we use is given).",
        "- **ignored**: read and deliberately not used, for the reason given.",
        "- **refused**: `load_peft` raises `AdapterConfigError` naming the field and its value unless the field "
        "holds PEFT's default (or null / empty). A field PEFT adds later is refused unless null, false or empty.",
        "",
    ]
    for peft_type, table in PEFT_FIELDS.items():
        lines += [f"## {titles[peft_type]}", "", "| field | status | notes |", "|---|---|---|"]
        for name in sorted(table):
            rule = table[name]
            lines.append(f"| `{name}` | {rule.status} | {rule.why} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown(), end="")
