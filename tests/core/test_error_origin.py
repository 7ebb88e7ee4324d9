"""Every library refusal says which call or which method refused: a user reading ``AdapterConfigError`` from deep in
a Hydra run, or ``AdapterTypeError`` from a helper that passed the wrong object on, learns where to look. The
origin is the first word of the message (``"loha: rank_dropout must be ..."``, ``"load_peft: model must be ..."``);
these tests pin it for the shared checks (``check_probability``, ``check_choice``, ``check_module``), whose callers
pass the name in (a wrong or missing name there was a surviving mutant, docs/MUTATION.md).
"""

from __future__ import annotations

import re

import pytest
import torch

import lightning_adapters as la
from lightning_adapters.core.named import scale_of, trainable

# (config class, field, bad value, the method named in the refusal)
CONFIG_CASES = [
    ("LoRAConfig", "dropout", 1.5, "lora"),
    ("LoRAConfig", "bias", "some", "lora"),
    ("LoRAConfig", "lora_bias", "yes", "lora"),
    ("AdaLoRAConfig", "dropout", -0.1, "adalora"),
    ("AdaLoRAConfig", "bias", "some", "adalora"),
    ("AdaLoRAConfig", "init_weights", "pissa", "adalora"),
    ("AdaLoRAConfig", "schedule", "hour", "adalora"),
    ("LoHaConfig", "rank_dropout", 1.5, "loha"),
    ("LoHaConfig", "module_dropout", 1.0, "loha"),
    ("LoHaConfig", "use_effective_conv2d", 1, "loha"),
    ("LoHaConfig", "init_weights", "pissa", "loha"),
    ("LoKrConfig", "rank_dropout", 1.5, "lokr"),
    ("LoKrConfig", "module_dropout", 1.0, "lokr"),
    ("LoKrConfig", "decompose_both", 1, "lokr"),
    ("LoKrConfig", "init_weights", "pissa", "lokr"),
    ("OFTConfig", "module_dropout", 1.5, "oft"),
    ("OFTConfig", "bias", "some", "oft"),
    ("BOFTConfig", "boft_dropout", 1.5, "boft"),
    ("BOFTConfig", "bias", "some", "boft"),
]


def _config_kwargs(cls_name: str) -> dict:
    needs = {
        "AdaLoRAConfig": {"total_step": 10},
        "OFTConfig": {"oft_block_size": 4},
        "BOFTConfig": {"boft_block_size": 4},
    }
    return {"target_modules": ["layer"], **needs.get(cls_name, {})}


@pytest.mark.parametrize("cls_name, field, bad, method", CONFIG_CASES, ids=lambda v: str(v))
def test_config_refusals_name_the_method_the_field_and_the_value(cls_name, field, bad, method):
    with pytest.raises(la.AdapterConfigError) as info:
        getattr(la, cls_name)(**_config_kwargs(cls_name), **{field: bad})
    message = str(info.value)
    assert message.startswith(f"{method}: {field} must be"), message
    assert repr(bad) in message, message


# Each public call that takes a model, called with ``None`` (the rest of its arguments valid or irrelevant: the
# model is checked first, before anything else is read or changed).
CALLS = {
    "active": lambda m: la.active(m),
    "adapter_names": lambda m: la.adapter_names(m),
    "adapter_state_dict": lambda m: la.adapter_state_dict(m),
    "config_of": lambda m: la.config_of(m),
    "delete": lambda m: la.delete(m, "default"),
    "disabled": lambda m: la.disabled(m).__enter__(),
    "eject": lambda m: la.eject(m),
    "inject": lambda m: la.inject(m, la.LoRAConfig(target_modules=["layer"])),
    "load_adapter_state_dict": lambda m: la.load_adapter_state_dict(m, {}),
    "load_peft": lambda m: la.load_peft(m, "unused"),
    "merge": lambda m: la.merge(m),
    "per_sample": lambda m: la.per_sample(m, ["default"]).__enter__(),
    "quantize": lambda m: la.quantize(m, "nf4"),
    "restore_from_checkpoint": lambda m: la.restore_from_checkpoint(m, "unused.ckpt"),
    "save_peft": lambda m: la.save_peft(m, "unused"),
    "set_active": lambda m: la.set_active(m, "default"),
    "set_scale": lambda m: la.set_scale(m, "default", 1.0),
    "set_trainable": lambda m: la.set_trainable(m, "default"),
    "summary": lambda m: la.summary(m),
    "unmerge": lambda m: la.unmerge(m),
}


@pytest.mark.parametrize("name", sorted(CALLS))
@pytest.mark.parametrize("model", [None, torch.nn.Linear], ids=["None", "a-class"])
def test_calls_given_no_module_name_themselves(name, model):
    with pytest.raises(la.AdapterTypeError, match=rf"^{re.escape(name)}: model must be a torch\.nn\.Module") as info:
        CALLS[name](model)
    if isinstance(model, type):
        assert "instantiate it first" in str(info.value)


def test_a_rank_far_above_the_layer_is_refused_saying_why_and_what_to_use():
    """The refusal names the method, the value and the layer, says why (ranks above ``min(in, out)`` add nothing)
    and gives the largest useful value, before anything is allocated."""
    from tests.helpers import Wrap

    model = Wrap(torch.nn.Linear(4, 3))
    with pytest.raises(la.AdapterConfigError) as info:
        la.inject(model, la.LoRAConfig(r=10**6, target_modules=["layer"]))
    message = str(info.value)
    assert message.startswith("lora: r=1000000 on 'layer'"), message
    assert "more than 3 ranks add no expressiveness, so use r <= 3" in message, message
    assert not list(la.core.inject.find_records(model))


def test_llama_adapter_on_an_attention_without_head_dim_is_refused_naming_it():
    """Llama-Adapter reads the attention's ``head_dim``; one without it is refused as an unsupported layer (not an
    ``AttributeError`` from inside the method)."""
    from tests.helpers import tiny_llama

    model = tiny_llama()
    attn = model.model.layers[-1].self_attn
    del attn.head_dim
    with pytest.raises(la.UnsupportedLayerError, match=r"it has no integer head_dim attribute"):
        la.inject(model, la.LlamaAdapterConfig(adapter_len=2, adapter_layers=1))
    assert not list(la.core.inject.find_records(model))


@pytest.mark.parametrize("n_bad", [10, 11])
def test_a_long_list_of_bad_values_is_cut_at_ten_and_says_so(n_bad):
    """``load_adapter_state_dict`` lists at most ten bad tensors; a longer list ends with ``...`` so the reader knows
    there are more, a list of ten does not. Nothing is loaded."""
    model = torch.nn.Sequential(*[torch.nn.Linear(3, 3) for _ in range(6)])
    la.inject(model, la.LoRAConfig(r=1, target_modules=[str(i) for i in range(6)]))
    state = {k: v.clone() for k, v in la.adapter_state_dict(model).items()}
    assert len(state) == 12
    for key in sorted(state)[:n_bad]:
        state[key].fill_(float("nan"))
    before = {k: v.clone() for k, v in la.adapter_state_dict(model).items()}
    with pytest.raises(la.AdapterStateError) as info:
        la.load_adapter_state_dict(model, state)
    message = str(info.value)
    listed = re.findall(r"(\d\.adapter\.default\.lora_[AB]): 3 non-finite values", message)
    assert listed == sorted(state)[: min(n_bad, 10)], message
    bad_values = message.split("bad values ", 1)[1].split(". Check", 1)[0]
    assert bad_values.endswith(" ...") == (n_bad > 10), message
    assert all(torch.equal(v, before[k]) for k, v in la.adapter_state_dict(model).items())


def test_a_prompt_longer_than_the_hidden_size_is_refused_naming_adapter_len():
    """Llama-Adapter's prompt length is checked like a rank, under its own field name and reason."""
    from tests.helpers import tiny_llama

    model = tiny_llama()
    with pytest.raises(la.AdapterConfigError) as info:
        la.inject(model, la.LlamaAdapterConfig(adapter_len=10**6, adapter_layers=1))
    message = str(info.value)
    assert message.startswith("llama_adapter: adapter_len=1000000 on "), message
    assert "span at most hidden=64 dimensions, so use adapter_len <= 64" in message, message
    assert not list(la.core.inject.find_records(model))


def test_a_value_that_is_not_a_tensor_is_named_with_a_short_repr():
    """A state dict entry that is not a tensor is refused naming its type and a repr cut to 40 characters."""
    model = la.inject(torch.nn.Sequential(torch.nn.Linear(3, 3)), la.LoRAConfig(r=1, target_modules=["0"]))
    state = dict(la.adapter_state_dict(model))
    key = sorted(state)[0]
    state[key] = list(range(100))
    with pytest.raises(la.AdapterStateError) as info:
        la.load_adapter_state_dict(model, state)
    shown = repr(list(range(100)))[:37] + "..."
    assert f"{key}: a list ({shown}), not a torch.Tensor" in str(info.value), str(info.value)


# Calls that take adapter names, given one the model does not have.
NAMED_CALLS = {
    "adapter_state_dict": lambda m: la.adapter_state_dict(m, "nope"),
    "config_of": lambda m: la.config_of(m, "nope"),
    "delete": lambda m: la.delete(m, "nope"),
    "merge": lambda m: la.merge(m, ["nope"]),
    "set_active": lambda m: la.set_active(m, "nope"),
    "set_scale": lambda m: la.set_scale(m, "nope", 0.5),
    "set_trainable": lambda m: la.set_trainable(m, "nope"),
}


@pytest.mark.parametrize("name", sorted(NAMED_CALLS))
def test_calls_given_an_unknown_adapter_name_name_themselves_and_the_known_ones(name):
    model = la.inject(torch.nn.Sequential(torch.nn.Linear(3, 3)), la.LoRAConfig(r=1, target_modules=["0"]))
    with pytest.raises(la.AdapterConfigError) as info:
        NAMED_CALLS[name](model)
    message = str(info.value)
    assert message.startswith(f"{name}: unknown adapter name 'nope'"), message
    assert "['default']" in message, message


def test_adapters_that_cannot_stack_are_refused_naming_the_others():
    """A rotation (OFT) cannot act together with another adapter on one module: the refusal names the module, the
    one that cannot stack and the others to leave out."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    la.inject(model, la.OFTConfig(oft_block_size=4, target_modules=["0"]), name="rot")
    la.inject(model, la.LoRAConfig(r=1, target_modules=["0"]), name="low")
    la.inject(model, la.LoHaConfig(r=1, target_modules=["0"]), name="had")
    with pytest.raises(la.AdapterConfigError) as info:
        la.set_active(model, ["rot", "low", "had"])
    message = str(info.value)
    assert message.startswith("set_active: adapters ['rot', 'low', 'had'] would act together on '0'"), message
    assert "'rot' (OFTLayer) cannot stack" in message and "merge it without ['low', 'had']" in message, message


@pytest.mark.parametrize(
    "name, call",
    [
        ("inject", lambda m, bad: la.inject(m, la.LoRAConfig(r=1, target_modules=["0"]), name=bad)),
        ("load_peft", lambda m, bad: la.load_peft(m, "unused", name=bad)),
    ],
    ids=["inject", "load_peft"],
)
@pytest.mark.parametrize(
    "bad, why", [("a.b", "not usable"), ("keys", "not usable"), (3, "not usable"), ("__base__", "reserved")]
)
def test_unusable_adapter_names_are_refused_by_the_call_that_got_them(name, call, bad, why):
    """``"__base__"`` (per_sample's name for the base rows) is refused as reserved, anything else as not usable."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 3))
    with pytest.raises(la.AdapterConfigError) as info:
        call(model, bad)
    assert str(info.value).startswith(f"{name}: adapter name {bad!r} is {why};"), str(info.value)
    assert not list(la.core.inject.find_records(model))


# Calls that change which adapters act or exist, refused while an adapter is merged into the base weights.
MERGED_CALLS = {
    "delete": (lambda m: la.delete(m, "b"), "delete: adapters ['a'] are merged into the base weights"),
    "set_active": (lambda m: la.set_active(m, "b"), "set_active: adapters ['a'] are merged into the base weights"),
    "set_scale": (lambda m: la.set_scale(m, "a", 0.5), "set_scale: adapter 'a' is merged into the base weights"),
}


@pytest.mark.parametrize("name", sorted(MERGED_CALLS))
def test_calls_refused_on_a_merged_model_name_themselves_and_leave_it_as_it_was(name):
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3))
    la.inject(model, la.LoRAConfig(r=1, target_modules=["0"]), name="a")
    la.inject(model, la.LoRAConfig(r=1, target_modules=["1"]), name="b")
    la.set_active(model, "a")
    la.merge(model)
    call, start = MERGED_CALLS[name]
    with pytest.raises(la.AdapterStateError) as info:
        call(model)
    assert str(info.value).startswith(start), str(info.value)
    assert "unmerge(model) first" in str(info.value), str(info.value)
    assert la.adapter_names(model) == ["a", "b"] and la.active(model) == ["a"] and scale_of(model, "a") == 1.0


# Calls that take one name or a list of names, given names of another type: a number, a list holding a number, a
# set (unordered, so refused although it holds strings).
LIST_CALLS = {
    "merge": lambda m, names: la.merge(m, names),
    "set_active": lambda m, names: la.set_active(m, names),
    "set_trainable": lambda m, names: la.set_trainable(m, names),
}


@pytest.mark.parametrize("names", [3, ["default", 3], {"default"}], ids=["int", "list-with-int", "set"])
@pytest.mark.parametrize("name", sorted(LIST_CALLS))
def test_adapter_names_of_another_type_are_a_type_error_naming_the_call(name, names):
    model = la.inject(torch.nn.Sequential(torch.nn.Linear(3, 3)), la.LoRAConfig(r=1, target_modules=["0"]))
    with pytest.raises(la.AdapterTypeError) as info:
        LIST_CALLS[name](model, names)
    message = str(info.value)
    assert message.startswith(f"{name}: adapter names must be a string or a list of strings, got {names!r}"), message
    assert "['default']" in message, message
    assert la.active(model) == ["default"] and trainable(model) == ["default"]


def test_a_model_that_is_not_a_module_is_shown_whole_when_short_and_cut_when_long():
    with pytest.raises(la.AdapterTypeError) as info:
        la.inject(42, la.LoRAConfig(target_modules=["layer"]))
    assert str(info.value).endswith("got int 42"), str(info.value)
    long = "x" * 100
    with pytest.raises(la.AdapterTypeError) as info:
        la.inject(long, la.LoRAConfig(target_modules=["layer"]))
    assert str(info.value).endswith(f"got str {repr(long)[:57]}..."), str(info.value)


def test_modules_to_save_that_match_nothing_are_refused_naming_the_method():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    with pytest.raises(la.TargetError) as info:
        la.inject(model, la.LoHaConfig(r=2, target_modules=["0"], modules_to_save=["head"]))
    assert str(info.value).startswith("loha: modules_to_save entries ['head']"), str(info.value)


def test_merging_a_model_level_adapter_is_refused_naming_where_it_is():
    """A Llama-Adapter has no weight-space form; the refusal names the sub-module holding it, if not the root."""
    from tests.helpers import tiny_llama

    inner = tiny_llama()
    la.inject(inner, la.LlamaAdapterConfig(adapter_len=2, adapter_layers=1))
    with pytest.raises(la.NotMergeableError) as info:
        la.merge(inner)
    assert str(info.value).startswith("the llama_adapter adapter is not mergeable"), str(info.value)
    outer = torch.nn.ModuleDict({"llm": tiny_llama()})
    la.inject(outer["llm"], la.LlamaAdapterConfig(adapter_len=2, adapter_layers=1))
    with pytest.raises(la.NotMergeableError) as info:
        la.merge(outer)
    assert str(info.value).startswith("the llama_adapter adapter on 'llm' is not mergeable"), str(info.value)
