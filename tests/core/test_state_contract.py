"""The adapter-state contract (``lightning_adapters.core.state``) and the wording of the state report: exact key
sets of both layouts, exact refusals of bad values, the error text that names every bad key, and loads that must
reach the live tensors."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import lightning_adapters as la
from lightning_adapters.core.report import StateReport, key_list
from lightning_adapters.core.state import (
    adapter_state_dict,
    base_fingerprint,
    is_adapter_key,
    load_adapter_state_dict,
    value_problem,
)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(4, 4)
        self.other = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.other(self.body(x)))


def _two_adapters() -> Net:
    """Adapter "a" on ``body`` (nothing else), then "b" on ``other`` that also trains ``head`` and its own bias."""
    model = Net()
    la.inject(model, la.LoRAConfig(r=2, target_modules=["body"]), name="a")
    la.inject(model, la.LoRAConfig(r=2, target_modules=["other"], modules_to_save=["head"], bias="lora_only"), name="b")
    return model


def _filled(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone() for k, v in state.items()}


# --- the two key layouts --------------------------------------------------------------------------------------


def test_each_layout_holds_exactly_the_adapters_tensors_saved_modules_and_trained_biases():
    model = _two_adapters()
    assert sorted(adapter_state_dict(model)) == [
        "body.adapter.a.lora_A",
        "body.adapter.a.lora_B",
        "head.bias",
        "head.weight",
        "other.adapter.b.lora_A",
        "other.adapter.b.lora_B",
        "other.bias",
    ]
    # "b" comes second: its saved module and trained bias keep their base keys in its name-free state.
    assert sorted(adapter_state_dict(model, name="b")) == [
        "head.bias",
        "head.weight",
        "other.adapter.lora_A",
        "other.adapter.lora_B",
        "other.bias",
    ]
    assert sorted(adapter_state_dict(model, name="a")) == ["body.adapter.lora_A", "body.adapter.lora_B"]


def test_the_name_free_state_holds_the_live_tensors_under_their_keys():
    model = _two_adapters()
    state = adapter_state_dict(model, name="b")
    live = dict(model.named_parameters())
    for free, own in [
        ("other.adapter.lora_A", "other.adapter.b.lora_A"),
        ("head.weight", "head.weight"),
        ("other.bias", "other.bias"),
    ]:
        assert state[free].data_ptr() == live[own].data_ptr()


def test_a_name_free_state_round_trips_into_the_second_adapter_with_its_saved_module():
    model = _two_adapters()
    given = _filled(adapter_state_dict(model, name="b"), seed=3)
    load_adapter_state_dict(model, given, name="b")
    assert torch.equal(model.head.weight, given["head.weight"])
    assert torch.equal(model.other.bias, given["other.bias"])
    assert torch.equal(model.other.adapter.b.lora_B, given["other.adapter.lora_B"])


class _Outer(nn.Module):
    """A model whose adapters were injected into a sub-model (``net``), as a LightningModule holds its network."""

    def __init__(self) -> None:
        super().__init__()
        self.net = Net()
        la.inject(self.net, la.LoRAConfig(r=2, target_modules=["other"], modules_to_save=["head"], bias="lora_only"))


def test_keys_of_adapters_injected_into_a_sub_model_carry_its_prefix():
    outer = _Outer()
    assert sorted(adapter_state_dict(outer)) == [
        "net.head.bias",
        "net.head.weight",
        "net.other.adapter.default.lora_A",
        "net.other.adapter.default.lora_B",
        "net.other.bias",
    ]
    given = _filled(adapter_state_dict(outer), seed=4)
    load_adapter_state_dict(outer, given)
    assert torch.equal(outer.net.other.bias, given["net.other.bias"])


def test_exact_keys_are_matched_whole_and_prefixes_at_their_dot():
    prefixes = ["fc.bias", "fc.adapter.a."]
    assert is_adapter_key("fc.bias", prefixes)
    assert is_adapter_key("fc.adapter.a.lora_A", prefixes)
    assert not is_adapter_key("fc.bias_gain", prefixes)  # an exact key is not a prefix
    assert not is_adapter_key("fc.biasx.weight", prefixes)
    assert not is_adapter_key("fc.adapter.ab.lora_A", prefixes)  # "a." is not a prefix of "ab."


# --- base fingerprint -----------------------------------------------------------------------------------------


class _Base(nn.Module):
    """An empty float buffer first, then four linears: eight non-empty float tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("nothing", torch.zeros(0))
        torch.manual_seed(0)
        self.layers = nn.Sequential(*[nn.Linear(3, 3) for _ in range(4)])


def test_a_one_element_tensor_is_sampled():
    model = nn.Sequential(nn.Linear(1, 1), nn.Linear(3, 3))
    before = base_fingerprint(model)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    assert base_fingerprint(model) != before


def test_an_empty_tensor_does_not_use_up_one_of_the_sampled_tensors():
    model = _Base()
    before = base_fingerprint(model)
    with torch.no_grad():
        model.layers[3].bias.add_(1.0)  # the eighth tensor with values
    assert base_fingerprint(model) != before


# --- value_problem ----------------------------------------------------------------------------------------------


def test_value_problem_refuses_non_finite_values_by_default_with_no_hint():
    value = torch.tensor([1.0, float("nan"), float("inf")])
    assert value_problem("k", value, torch.zeros(3)) == "k: 2 non-finite values (NaN/Inf)"
    assert value_problem("k", value, torch.zeros(3), check_finite=False) is None


def test_a_complex_tensor_is_named_as_complex_for_a_float_target():
    problem = value_problem("k", torch.zeros(2, dtype=torch.complex64), torch.zeros(2))
    assert problem == "k: dtype complex64 (complex) for a floating tensor (float32)"


def test_a_complex_tensor_is_refused_for_a_bool_mask_even_with_zero_one_values():
    mask = torch.ones(3, dtype=torch.bool)
    assert value_problem("m", torch.tensor([0, 1, 1], dtype=torch.complex64), mask) is not None
    assert value_problem("m", torch.tensor([0.0, 1.0, 1.0]), mask) is None
    assert value_problem("m", torch.tensor([0, 1, 0], dtype=torch.int64), mask) is None


def test_load_refuses_a_complex_rank_mask_and_leaves_it_unchanged():
    model = Net()
    la.inject(model, la.AdaLoRAConfig(init_r=3, target_r=2, total_step=10, target_modules=["body"]))
    state = adapter_state_dict(model)
    key = "body.adapter.default.rank_mask"
    given = {k: v.clone() for k, v in state.items()}
    given[key] = torch.tensor([0, 1, 0], dtype=torch.complex64)
    with pytest.raises(la.AdapterStateError, match=re.escape(key) + ": a complex64 tensor with values other than 0/1"):
        load_adapter_state_dict(model, given)
    assert bool(model.body.adapter.default.rank_mask.all())


# --- the errors of load_adapter_state_dict ----------------------------------------------------------------------


def test_load_names_itself_when_the_adapter_name_is_wrong():
    model = _two_adapters()
    with pytest.raises(la.AdapterTypeError, match=r"^load_adapter_state_dict: name must be one adapter name"):
        load_adapter_state_dict(model, {}, name=3)
    with pytest.raises(la.AdapterConfigError, match=r"^load_adapter_state_dict: unknown adapter name 'c'"):
        load_adapter_state_dict(model, {}, name="c")


def _six_layers() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(6)])
    la.inject(model, la.LoRAConfig(r=2, target_modules=[str(i) for i in range(6)]))
    return model


def _part(message: str, head: str) -> str:
    """The part of an AdapterStateError's message that starts with ``head``, up to the fixed closing sentence."""
    match = re.search(re.escape(head) + r"(.*?)(?:; bad values |\. Check that the state)", message)
    assert match is not None, message
    return match.group(1)


@pytest.mark.parametrize("n", [10, 11])
def test_missing_keys_are_listed_up_to_ten(n):
    model = _six_layers()
    state = adapter_state_dict(model)  # 12 tensors
    keys = sorted(state)
    given = {k: state[k].clone() for k in keys[n:]}
    with pytest.raises(la.AdapterStateError) as err:
        load_adapter_state_dict(model, given)
    more = " and 1 more" if n > 10 else ""
    assert f"adapter state does not fit the model: missing keys {keys[:10]}{more}. Check" in str(err.value)


@pytest.mark.parametrize("n", [10, 11])
def test_shape_mismatches_name_the_first_ten_keys_and_mark_more(n):
    model = _six_layers()
    state = adapter_state_dict(model)  # 12 tensors
    keys = sorted(state)[:n]
    given = {k: v.clone() for k, v in state.items()}
    for k in keys:
        given[k] = torch.zeros(5, 5)
    with pytest.raises(la.AdapterStateError) as err:
        load_adapter_state_dict(model, given)
    shown = [f"{k}: got (5, 5), model has {tuple(state[k].shape)}" for k in keys[:10]]
    assert _part(str(err.value), "shape mismatches ") == ", ".join(shown) + (" ..." if n > 10 else "")


@pytest.mark.parametrize("n", [2, 10, 11])
def test_bad_values_name_the_first_ten_keys_and_mark_more(n):
    model = _six_layers()
    state = adapter_state_dict(model)
    keys = sorted(state)[:n]
    given = {k: v.clone() for k, v in state.items()}
    for k in keys:
        given[k] = torch.full(state[k].shape, float("nan"))
    with pytest.raises(la.AdapterStateError) as err:
        load_adapter_state_dict(model, given)
    hint = "; pass check_finite=False to load them anyway"
    # ``given`` is in the model's key order, which for these keys is the sorted order.
    shown = [f"{k}: {state[k].numel()} non-finite values (NaN/Inf){hint}" for k in keys[:10]]
    assert _part(str(err.value), "bad values ") == "; ".join(shown) + (" ..." if n > 10 else "")


def test_a_merged_adapter_does_not_block_loading_another_one_but_blocks_its_own():
    model = _two_adapters()
    la.merge(model, ["a"])
    given = _filled(adapter_state_dict(model, name="b"), seed=5)
    load_adapter_state_dict(model, given, name="b")
    assert torch.equal(model.other.adapter.b.lora_A, given["other.adapter.lora_A"])
    with pytest.raises(la.AdapterStateError, match=r"\['body'\] are merged into the base weights"):
        load_adapter_state_dict(model, _filled(adapter_state_dict(model, name="a"), seed=6), name="a")


class _SharedBuffer(nn.Module):
    """Two norms that share one running-mean buffer and one weight (tensors registered under two names)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(4, 4)
        self.norm1 = nn.BatchNorm1d(4)
        self.norm2 = nn.BatchNorm1d(4)
        self.norm2.running_mean = self.norm1.running_mean
        self.norm2.weight = self.norm1.weight


def test_a_saved_module_whose_buffer_is_shared_with_an_earlier_module_loads_that_buffer():
    model = _SharedBuffer()
    la.inject(model, la.LoRAConfig(r=2, target_modules=["fc"], modules_to_save=["norm2"]))
    state = adapter_state_dict(model)
    assert "norm2.running_mean" in state
    given = _filled(state, seed=7)
    load_adapter_state_dict(model, given)
    assert torch.equal(model.norm2.running_mean, given["norm2.running_mean"])
    assert torch.equal(model.norm2.running_var, given["norm2.running_var"])
    assert torch.equal(model.norm2.weight, given["norm2.weight"])


# --- the report's wording -------------------------------------------------------------------------------------


def test_describe_labels_the_two_shapes_given_and_model_by_default():
    report = StateReport(misshaped={"k": ((2,), (3,))})
    assert report.describe() == "mis-shaped k: given (2,), model (3,)"
    assert report.describe(given="file", expected="adapter") == "mis-shaped k: file (2,), adapter (3,)"


def test_describe_cuts_lists_after_eight_entries_by_default():
    keys = [f"k{i}" for i in range(9)]
    assert StateReport(missing=keys).describe() == f"missing keys {keys[:8]} and 1 more"
    assert StateReport(missing=keys[:8]).describe() == f"missing keys {keys[:8]}"


def test_describe_joins_mis_shaped_keys_with_commas():
    report = StateReport(misshaped={"a": ((1,), (2,)), "b": ((3,), (4,))})
    assert report.describe() == "mis-shaped a: given (1,), model (2,), b: given (3,), model (4,)"


def test_key_list_shows_eight_sorted_keys_by_default():
    keys = [f"k{i}" for i in range(9, 0, -1)]
    assert key_list(keys) == f"{sorted(keys)[:8]} and 1 more"
    assert key_list(keys[:8]) == f"{sorted(keys[:8])}"


def test_a_value_whose_repr_is_one_past_the_limit_is_cut():
    value = "x" * 39  # repr() adds two quotes: 41 characters
    assert value_problem("k", value, torch.zeros(1)) == f"k: a str ({repr(value)[:37]}...), not a torch.Tensor"


def test_the_several_adapters_hint_comes_only_with_unexpected_keys_of_a_several_adapter_model():
    one = _six_layers()
    given = dict(adapter_state_dict(one), extra=torch.zeros(1))
    with pytest.raises(la.AdapterStateError) as err:
        load_adapter_state_dict(one, given)
    assert "unexpected keys ['extra']" in str(err.value) and "several adapters" not in str(err.value)
    two = _two_adapters()
    state = adapter_state_dict(two)
    given = dict(state, **{"head.weight": torch.zeros(7)})  # a shape problem only
    with pytest.raises(la.AdapterStateError) as err:
        load_adapter_state_dict(two, given)
    assert "several adapters" not in str(err.value)
    with pytest.raises(la.AdapterStateError, match=r"The model holds several adapters \['a', 'b'\]"):
        load_adapter_state_dict(two, adapter_state_dict(two, name="b"))


def test_a_whole_model_adapter_in_a_sub_model_has_name_free_keys_under_the_sub_models_prefix():
    from tests.helpers import tiny_llama

    outer = nn.Module()
    outer.lm = tiny_llama()
    la.inject(outer.lm, la.LlamaAdapterConfig(adapter_len=4, adapter_layers=1), name="p")
    held = "lm.model.layers.1.self_attn.adapter"
    assert sorted(adapter_state_dict(outer, name="p")) == [f"{held}.adaption_gate", f"{held}.adaption_prompt"]
