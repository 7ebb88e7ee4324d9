"""The plumbing the methods share: the low-rank config base, the PEFT-option refusals, the dtype policy and the
missing/unexpected/mis-shaped report of every loader."""

from __future__ import annotations

import copy

import pytest
import torch
from peft.utils.other import get_pattern_key
from torch import nn

import lightning_adapters as la
from lightning_adapters.config import LowRankConfig
from lightning_adapters.core.dtypes import adapter_dtype_for, working_dtype
from lightning_adapters.core.report import StateReport
from lightning_adapters.interop.peft_fields import PEFT_FIELDS, REFUSED

LOW_RANK = [la.LoRAConfig, la.LoHaConfig, la.LoKrConfig]

# --- LowRankConfig ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", LOW_RANK, ids=lambda c: c.__name__)
def test_low_rank_configs_share_fields_defaults_and_checks(cls) -> None:
    assert issubclass(cls, LowRankConfig)
    cfg = cls()
    assert (cfg.r, cfg.alpha, cfg.rank_pattern, cfg.alpha_pattern) == (8, 8.0, {}, {})
    method = cls.method_name
    assert la.get_method(method).config_cls is cls
    for kwargs, field in [
        ({"r": 0}, "r"),
        ({"alpha": float("nan")}, "alpha"),
        ({"rank_pattern": {"q_proj": 0}}, r"rank_pattern\['q_proj'\]"),
        ({"alpha_pattern": {"q_proj": -1.0}}, r"alpha_pattern\['q_proj'\]"),
        ({"rank_pattern": {"q_proj(": 4}}, "rank_pattern key"),
    ]:
        with pytest.raises(la.AdapterConfigError, match=rf"^{method}: {field}"):
            cls(**kwargs)


@pytest.mark.parametrize(
    "name", ["q_proj", "layers.0.self_attn.q_proj", "layers.0.self_attn.out_proj", "layers.10.mlp.fc", "fc2"]
)
def test_per_module_rank_and_alpha_follow_peft_pattern_rule(name: str) -> None:
    ranks = {"q_proj": 4, r"layers\.1\d\..*": 2, "proj": 6}
    alphas = {"fc": 3.0, "out_proj": 5.0}
    cfg = la.LoRAConfig(r=8, alpha=16.0, rank_pattern=ranks, alpha_pattern=alphas)
    # PEFT: the first key matching the end of the name, else the name itself (no entry), then the default.
    assert cfg.rank_for(name) == ranks.get(get_pattern_key(ranks, name), 8)
    assert cfg.alpha_for(name) == alphas.get(get_pattern_key(alphas, name), 16.0)


# --- PEFT-option refusals -------------------------------------------------------------------------------------


def _on(default):
    """A value that turns a refused PEFT option on (not its default, not null or empty)."""
    if default is False:
        return True
    if isinstance(default, dict):
        return {"on": 1}
    return "on"


@pytest.mark.parametrize("peft_type", ["LORA", "ADALORA"])
def test_config_from_peft_refuses_every_option_the_field_table_refuses(peft_type: str) -> None:
    method = la.get_method({"LORA": "lora", "ADALORA": "adalora"}[peft_type])
    refused = {k: rule for k, rule in PEFT_FIELDS[peft_type].items() if rule.status == REFUSED}
    assert refused
    for field, rule in refused.items():
        value = _on(rule.default)
        with pytest.raises(la.AdapterConfigError, match=rf"PEFT {peft_type} option {field}=.*not supported"):
            method.config_from_peft({"peft_type": peft_type, field: value})
        # Left at its default (or null / empty) the option is not in the way.
        method.config_from_peft({"peft_type": peft_type, field: rule.default})


# --- dtype policy ---------------------------------------------------------------------------------------------


def test_dtype_policy() -> None:
    assert working_dtype(torch.float16) == working_dtype(torch.bfloat16) == torch.float32
    assert working_dtype(torch.float64) == torch.float64 and working_dtype(torch.int8) == torch.float32
    assert adapter_dtype_for(torch.bfloat16, la.LoRAConfig()) == torch.float32
    assert adapter_dtype_for(torch.float32, la.LoRAConfig(adapter_dtype="bfloat16")) == torch.bfloat16


@pytest.mark.parametrize("method", ["lora", "loha", "lokr", "oft", "boft", "adalora"])
@pytest.mark.parametrize("base_dtype", [torch.bfloat16, torch.float64], ids=["bf16", "fp64"])
def test_every_layer_method_keeps_its_tensors_in_the_policy_dtype(method: str, base_dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16)).to(base_dtype)
    kw = {"boft": {"boft_block_size": 4}, "oft": {"oft_block_size": 4}}.get(method, {})
    la.inject(model, la.get_method(method).config_cls(target_modules=["0"], **kw))
    want = adapter_dtype_for(base_dtype, la.LoRAConfig())
    assert {t.dtype for t in la.adapter_state_dict(model).values() if t.is_floating_point()} == {want}


# --- the state report -----------------------------------------------------------------------------------------


def test_state_report_compares_keys_and_shapes() -> None:
    given = {"a": torch.zeros(2, 3), "b": [4], "x": torch.zeros(1), "keep": torch.zeros(1)}
    expected = {"a": (3, 2), "b": torch.zeros(4), "c": [1]}
    report = StateReport.compare(given, expected, allowed=["keep"])
    assert report.missing == ["c"] and report.unexpected == ["x"]
    assert report.misshaped == {"a": ((2, 3), (3, 2))}
    assert (
        report.describe(given="file")
        == "missing keys ['c']; unexpected keys ['x']; mis-shaped a: file (2, 3), model (3, 2)"
    )
    assert not StateReport.compare({"a": [1]}, {"a": torch.zeros(1)})
    many = StateReport.compare({}, {f"k{i}": [1] for i in range(10)})
    assert many.describe(limit=3) == "missing keys ['k0', 'k1', 'k2'] and 7 more"


def test_load_peft_and_the_checkpoint_check_word_a_mismatch_alike(tmp_path) -> None:
    from lightning_adapters.lightning.checkpoint import validate_checkpoint

    def model(hidden: int) -> nn.Module:
        torch.manual_seed(0)
        return la.inject(nn.Sequential(nn.Linear(4, hidden), nn.ReLU()), la.LoRAConfig(r=2, target_modules=["0"]))

    narrow, wide = model(6), model(8)
    la.save_peft(narrow, tmp_path)
    with pytest.raises(
        la.AdapterStateError, match=r"mis-shaped 0\.lora_B\.weight: file \(6, 2\), model \(8, 2\)\. Check"
    ):
        la.load_peft(la.eject(copy.deepcopy(wide)), tmp_path)
    state = la.adapter_state_dict(narrow)
    expected = {k: list(v.shape) for k, v in la.adapter_state_dict(wide).items()}
    with pytest.raises(
        la.AdapterStateError, match=r"mis-shaped 0\.adapter\.default\.lora_B: checkpoint \(6, 2\), model \(8, 2\)\."
    ):
        validate_checkpoint(
            {"state_dict": dict(state)},
            wide,
            adapters={"default": ("lora", la.LoRAConfig())},
            fingerprint=None,
            expected=lambda names: expected,
        )
