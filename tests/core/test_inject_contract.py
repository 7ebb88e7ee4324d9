"""The contracts of ``core/inject.py`` checked against numbers worked out by hand: the summary table's rows and
totals, which roots a model holds, what a snapshot puts back, which adapters a merge stacks, what a refused merge
or an eject leaves behind, which biases an adapter trains and the dtype each adapter's policy gives back."""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn

import lightning_adapters as la
from lightning_adapters.core import inject as inject_mod
from lightning_adapters.core.quant import is_quantized
from lightning_adapters.errors import (
    AdapterConfigError,
    AdapterStateError,
    AdapterTypeError,
    MergeError,
    TargetError,
    UnsupportedLayerError,
)
from tests.helpers import Wrap


class Two(nn.Module):
    """Two Linear(4, 4) layers and a head holding a nested Linear (``head.inner``)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Linear(4, 4)
        self.second = nn.Linear(4, 4)
        self.head = nn.Sequential()
        self.head.inner = nn.Linear(4, 2)
        self.head2 = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head.inner(self.second(self.first(x))) + self.head2(x)


def _rows(model: nn.Module) -> list[list[str]]:
    return [line.split() for line in la.summary(model).splitlines()]


def _x(n: int = 4) -> torch.Tensor:
    return torch.randn(3, n, generator=torch.Generator().manual_seed(5))


def _randomize(model: nn.Module, name: str = "default", seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in la.adapter_state_dict(model, name=name).values():
            t.add_(torch.randn(t.shape, generator=g) * 0.3)


# --- summary -------------------------------------------------------------------------------------------------


def test_summary_table_of_one_adapter_row_by_row():
    # LoRA r = 2 on Linear(4, 4): A (2, 4) + B (4, 2) = 16 per layer. head.inner Linear(4, 2): 8 + 2 = 10.
    # Total: 3 * 20 (first, second: 16 + 4 each; head2: 8 + 2) ... counted below from the model itself.
    model = la.inject(Two(), la.LoRAConfig(r=2, target_modules=["first", "second"], modules_to_save=["inner"]))
    rows = _rows(model)
    assert rows[0] == ["module", "base", "adapter", "params"]
    assert rows[1:4] == [
        ["first", "Linear", "LoRALayer", "16"],
        ["second", "Linear", "LoRALayer", "16"],
        ["head.inner", "Linear", "modules_to_save", "10"],
    ]
    # Base: 20 + 20 + 10 + 10 = 60; adapters 32: total 92, trainable 32 + 10 (head.inner) = 42.
    assert rows[4] == ["trainable", "params:", "42", "of", "92", "(45.6522%)"]
    assert rows[5:] == [["adapters:", "default", "(lora;", "active,", "trainable)"]]


def test_summary_names_the_adapter_of_each_row_once_there_are_two():
    model = la.inject(Two(), la.LoRAConfig(r=2, target_modules=["first"]), name="a")
    la.inject(model, la.LoRAConfig(r=1, target_modules=["first", "second"]), name="b")
    # r = 1 on Linear(4, 4): A (1, 4) + B (4, 1) = 8.
    assert _rows(model)[1:4] == [
        ["first", "Linear", "LoRALayer[a]", "16"],
        ["first", "Linear", "LoRALayer[b]", "8"],
        ["second", "Linear", "LoRALayer[b]", "8"],
    ]
    la.delete(model, "b")
    assert _rows(model)[1] == ["first", "Linear", "LoRALayer", "16"]


def test_summary_keeps_only_the_outermost_of_nested_modules_to_save():
    # "head" (a Sequential) and "inner" (head.inner) both match: saving head saves head.inner, so one row of 10.
    model = la.inject(Two(), la.LoRAConfig(r=2, target_modules=["first"], modules_to_save=["head", "inner"]))
    rows = _rows(model)
    assert [r for r in rows if "modules_to_save" in r] == [["head", "Sequential", "modules_to_save", "10"]]
    assert la.core.inject.get_adapters(model).records["default"].modules_to_save == ["head"]


def test_summary_of_a_model_without_parameters_reports_zero_of_zero():
    assert la.summary(nn.ReLU()).splitlines() == [
        f"{'module':<6}  {'base':<12}  {'adapter':<18}  {'params':>10}",
        "trainable params: 0 of 0 (0.0000%)",
    ]


def test_summary_rows_of_a_whole_model_adapter_injected_at_the_root_have_no_leading_dot():
    from tests.helpers import tiny_llama

    model = la.inject(tiny_llama(), la.LlamaAdapterConfig(adapter_len=2, adapter_layers=1))
    holders = [n for n, m in model.named_modules() if type(m).__name__ == "AdaptionPrompt"]
    assert len(holders) == 1
    names = [r[0] for r in _rows(model)[1:-2]]
    assert names == holders


# --- find_roots ------------------------------------------------------------------------------------------------


def test_a_root_registered_under_two_names_is_one_root():
    """A module object reachable under two names (``a`` and ``alias``) holds one set of adapters: it is found once,
    and the summary and the active names list its adapter once."""
    inner = la.inject(Two(), la.LoRAConfig(r=2, target_modules=["first"], modules_to_save=["head2"]))
    outer = nn.ModuleDict({"a": inner, "alias": inner})
    roots = inject_mod.find_roots(outer)
    assert [(p, r) for p, r, _ in roots] == [("a", inner)]
    assert inject_mod.known_names(outer) == ["default"]
    assert inject_mod.active_names(outer) == ["default"]
    rows = _rows(outer)
    # Rows named from the module the summary was asked of: a.first, a.head2 (Linear(4, 2): 8 + 2).
    assert rows[1:3] == [["a.first", "Linear", "LoRALayer", "16"], ["a.head2", "Linear", "modules_to_save", "10"]]
    assert rows[-1] == ["adapters:", "default", "(lora;", "active,", "trainable)"]


# --- ModelSnapshot ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change",
    [
        lambda t: torch.zeros_like(t),  # another tensor, same dtype and shape
        lambda t: t.view(torch.int32),  # the same memory read as another dtype
        lambda t: t.view(-1),  # the same memory in another shape
        lambda t: t[0],  # the same first element, a smaller shape
        lambda t: t.t(),  # the same memory, dtype and (square) shape, transposed
    ],
)
def test_snapshot_restore_gives_back_the_tensor_behind_each_parameter(change):
    model = Wrap(nn.Linear(4, 4))
    weight = model.layer.weight
    original = weight.data
    values = original.clone()
    snap = inject_mod.ModelSnapshot(model)
    weight.requires_grad_(False)
    weight.data = change(weight.data)
    snap.restore()
    assert weight.data.data_ptr() == original.data_ptr()
    assert weight.dtype == torch.float32 and weight.shape == (4, 4) and weight.stride() == (4, 1)
    assert torch.equal(weight, values) and weight.requires_grad


# --- merge -----------------------------------------------------------------------------------------------------


def test_merge_stacks_the_named_adapters_with_the_active_ones_only():
    """OFT (a rotation) cannot act together with another adapter on one module. With OFT ``a`` active on
    ``second`` and LoRA ``b`` inactive on ``first`` and ``second``: merging ``a`` alone is fine (``b`` does not
    act), merging ``b`` would stack it on the active ``a`` on ``second`` and is refused before any change (``b``
    alone on ``first`` is no reason to stop looking)."""
    model = la.inject(Two(), la.OFTConfig(oft_block_size=2, target_modules=["second"]), name="a")
    la.inject(model, la.LoRAConfig(r=2, target_modules=["first", "second"]), name="b")
    _randomize(model, "a", 1)
    _randomize(model, "b", 2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(AdapterConfigError, match=r"^merge: adapters \['a', 'b'\] would act together on 'second'"):
        la.merge(model, "b")
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert not model.first.adapter.b.merged and not model.second.adapter.b.merged
    out = model(_x())
    la.merge(model, "a")
    assert model.second.adapter.a.merged and not model.second.adapter.b.merged
    torch.testing.assert_close(model(_x()), out)


def test_a_refused_safe_merge_puts_every_float_weight_back_and_clears_the_flags():
    model = la.inject(Two(), la.LoRAConfig(r=2, target_modules=["first", "second"]))
    _randomize(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        model.second.adapter.default.lora_B.fill_(float("inf"))
        before["second.adapter.default.lora_B"].fill_(float("inf"))
    with pytest.raises(MergeError, match=r"merge of 'second' refused"):
        la.merge(model, safe=True)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    assert model.first.adapter.default.merged is False
    assert model.second.adapter.default.merged is False
    la.merge(model)  # without safe nothing is checked: the non-finite weight is written
    assert not bool(torch.isfinite(model.second.weight).all()) and model.second.adapter.default.merged


def test_a_refused_safe_merge_into_a_quantized_base_keeps_its_weight():
    pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    model = la.quantize(nn.Sequential(nn.Linear(64, 16)), "nf4", skip=[])
    la.inject(model, la.LoRAConfig(r=2, target_modules=["0"]))
    packed = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].adapter.default.lora_B.fill_(float("inf"))
    with pytest.raises(MergeError, match=r"merge of '0' refused: .*non-finite"):
        la.merge(model, safe=True)
    assert torch.equal(model[0].weight, packed)
    assert model[0].adapter.default.merged is False
    assert la.merge_errors(model) == {}


# --- unmerge messages ------------------------------------------------------------------------------------------


def test_unmerge_of_a_meta_model_names_the_tensor_and_the_call():
    with torch.device("meta"):
        model = Wrap(nn.Linear(4, 3))
    la.inject(model, la.LoRAConfig(r=2, target_modules=["layer"]))
    with pytest.raises(AdapterStateError, match=r"^unmerge: layer\.weight is on the meta device.*nothing to unmerge"):
        la.unmerge(model)


def test_merge_of_a_meta_model_names_the_tensor_and_the_call():
    with torch.device("meta"):
        model = Wrap(nn.Linear(4, 3))
    la.inject(model, la.LoRAConfig(r=2, target_modules=["layer"]))
    with pytest.raises(AdapterStateError, match=r"^merge: layer\.weight is on the meta device.*nothing to merge;"):
        la.merge(model)


def test_unmerge_of_an_inference_tensor_base_outside_inference_mode_says_how():
    with torch.inference_mode():
        model = Wrap(nn.Linear(4, 3))
        la.inject(model, la.LoRAConfig(r=2, target_modules=["layer"]))
        la.merge(model)
    with pytest.raises(AdapterStateError, match=r"^unmerge: layer\.weight is an inference tensor.*call unmerge inside"):
        la.unmerge(model)


# --- check_module ----------------------------------------------------------------------------------------------


def test_a_class_passed_for_a_model_is_refused_with_the_hint_to_instantiate_it():
    with pytest.raises(AdapterTypeError, match=r"got type <class 'torch\.nn\.modules\.linear\.Linear'> \(a class: "):
        la.inject(nn.Linear, la.LoRAConfig(r=2))


def test_the_refused_value_is_shown_whole_up_to_sixty_characters():
    sixty = "x" * 58  # repr adds two quotes: 60 characters
    with pytest.raises(AdapterTypeError, match=rf"got str '{sixty}'$"):
        la.summary(sixty)
    with pytest.raises(AdapterTypeError, match=rf"got str '{'x' * 56}\.\.\.$"):
        la.summary(sixty + "x")


# --- inject ----------------------------------------------------------------------------------------------------


def test_adalora_has_no_default_targets_for_mistral_as_in_peft():
    """LoRA's defaults know mistral; AdaLoRA's, as PEFT's, do not (so target_modules=None is refused)."""
    peft_constants = pytest.importorskip("peft.utils.constants")
    assert "mistral" in peft_constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    assert "mistral" not in peft_constants.TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING

    def mistral_like() -> nn.Module:
        model = nn.Module()
        model.config = types.SimpleNamespace(model_type="mistral")
        model.q_proj = nn.Linear(4, 4)
        model.v_proj = nn.Linear(4, 4)
        return model

    lora = la.inject(mistral_like(), la.LoRAConfig(r=2))
    assert inject_mod.get_adapters(lora).records["default"].targets == ["q_proj", "v_proj"]
    model = mistral_like()
    with pytest.raises(TargetError, match=r"no default for model type 'mistral'"):
        la.inject(model, la.AdaLoRAConfig(init_r=3, target_r=2, total_step=10))
    assert inject_mod.find_roots(model) == []


def test_an_unsupported_layer_is_refused_with_the_supported_types():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    with pytest.raises(UnsupportedLayerError, match=r"cannot adapt \{'1': 'LayerNorm'\}; supported .*'Linear'"):
        la.inject(model, la.OFTConfig(oft_block_size=2, target_modules=["0", "1"]))


def test_trainable_token_rows_of_an_embedding_that_is_also_a_target_are_refused():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4))
    cfg = la.LoRAConfig(r=2, target_modules=["0"], trainable_token_indices={"0": [1, 2]})
    with pytest.raises(TargetError, match=r"'0' is in trainable_token_indices and also in target_modules"):
        la.inject(model, cfg)
    assert not any(inject_mod.is_adapted(m) for m in model.modules())


def test_trainable_token_rows_train_only_their_rows_beside_the_targets():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4))
    ids = torch.tensor([[1, 2, 3]])
    before = model(ids).detach()
    la.inject(model, la.LoRAConfig(r=2, target_modules=["1"], trainable_token_indices={"0": [1, 2]}))
    assert inject_mod.is_adapted(model[0]) and inject_mod.is_adapted(model[1])
    torch.testing.assert_close(model(ids), before)  # both start as no-ops
    model(ids).sum().backward()
    delta = model[0].adapter.default.delta
    assert delta.shape == (2, 4) and delta.grad is not None and model[0].weight.grad is None


def test_modules_inside_a_module_to_save_are_not_targets():
    """``head`` is trained in full, so ``head.inner`` (matched by "inner") gets no adapter; "first" does."""
    model = la.inject(Two(), la.LoRAConfig(r=2, target_modules=["first", "inner"], modules_to_save=["head"]))
    assert inject_mod.get_adapters(model).records["default"].targets == ["first"]
    assert type(model.head.inner) is nn.Linear and model.head.inner.weight.requires_grad


def test_injecting_into_a_sub_module_of_an_injected_model_is_refused():
    model = la.inject(Wrap(nn.Linear(4, 4)), la.LoRAConfig(r=2, target_modules=["layer"]))
    with pytest.raises(AdapterConfigError, match=r"already contains adapter layers; eject them"):
        la.inject(model.layer, la.LoRAConfig(r=2, target_modules="all-linear"))


@pytest.mark.parametrize(
    "owned, wanted, wanted_full, refused",
    [
        (["head"], ["inner"], "head.inner", True),  # head.inner is inside head, owned by a
        (["inner"], ["head"], "head", True),  # head holds head.inner, owned by a
        (["head"], ["head2"], "head2", False),  # a sibling whose name merely starts with "head"
        (["head2"], ["inner"], "head.inner", False),
    ],
)
def test_two_adapters_cannot_own_one_module_to_save_nor_its_parent_or_child(owned, wanted, wanted_full, refused):
    model = la.inject(Two(), la.LoRAConfig(r=2, target_modules=["first"], modules_to_save=owned), name="a")
    cfg = la.LoRAConfig(r=2, target_modules=["second"], modules_to_save=wanted)
    if refused:
        with pytest.raises(
            AdapterConfigError,
            match=rf"^inject 'b': modules_to_save \[{wanted_full!r}\] are already saved by adapter 'a'",
        ):
            la.inject(model, cfg, name="b")
        assert inject_mod.known_names(model) == ["a"]
    else:
        la.inject(model, cfg, name="b")
        assert inject_mod.known_names(model) == ["a", "b"]


@pytest.mark.parametrize(
    "first, second, who",
    [
        ("pissa", True, "a"),  # a's base already holds W - s*B0*A0
        (True, "olora", "b"),  # b would rewrite a's base on attach
        (True, "corda", "b"),  # b would rewrite it once initialize_from_data runs
    ],
)
def test_an_init_that_rewrites_the_base_shares_no_module_whichever_comes_first(first, second, who):
    # b targets "first" (free) before "second" (held by a): the check goes on past a module without adapters.
    model = la.inject(Two(), la.LoRAConfig(r=2, init_weights=first, target_modules=["second"]), name="a")
    before = model.second.weight.detach().clone()
    with pytest.raises(AdapterConfigError, match=rf"'second' already holds adapter 'a', and adapter '{who}' uses"):
        la.inject(model, la.LoRAConfig(r=2, init_weights=second, target_modules=["first", "second"]), name="b")
    assert inject_mod.known_names(model) == ["a"]
    assert torch.equal(model.second.weight, before) and type(model.first) is nn.Linear
    la.inject(model, la.LoRAConfig(r=2, init_weights=second, target_modules=["first"]), name="b")


# --- eject -----------------------------------------------------------------------------------------------------


def test_eject_with_merge_keeps_a_residual_init_s_function():
    """PiSSA moves ``s·B0·A0`` out of ``W``; merged, ``W`` holds it again, so eject must not add it a second time."""
    model = la.inject(Two(), la.LoRAConfig(r=2, init_weights="pissa", target_modules=["first"]))
    _randomize(model)
    x = _x()
    out = model(x)
    la.eject(model, merge=True)
    assert type(model.first) is nn.Linear
    torch.testing.assert_close(model(x), out)


def test_eject_without_merge_gives_a_residual_init_s_base_back():
    model = Two()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    la.inject(model, la.LoRAConfig(r=2, init_weights="pissa", target_modules=["first"]))
    assert not torch.equal(model.first.weight, weights["first.weight"])  # W - s*B0*A0 while injected
    la.eject(model)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, weights[n], rtol=0, atol=1e-6)


def test_eject_with_merge_of_a_quantized_base_merged_without_its_original():
    """A quantized base merged without ``keep_original`` cannot be unmerged, but ``eject(merge=True)`` keeps the
    merge, so it is allowed; a plain ``eject`` (which unmerges) is refused before any change."""
    pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    model = la.quantize(nn.Sequential(nn.Linear(64, 16)), "nf4", skip=[])
    la.inject(model, la.LoRAConfig(r=2, target_modules=["0"]))
    _randomize(model)
    la.merge(model)
    with pytest.raises(MergeError, match=r"^eject: '0' is a quantized base with the adapter merged"):
        la.eject(model)
    assert inject_mod.is_adapted(model[0])
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(3))
    out = model(x)
    la.eject(model, merge=True)
    assert not inject_mod.is_adapted(model[0]) and inject_mod.find_roots(model) == []
    assert is_quantized(model[0])  # no dtype: the layer stays quantized
    torch.testing.assert_close(model(x), out)


def test_eject_to_a_float_dtype_drops_transformers_record_of_the_quantization():
    """``eject(dtype=...)`` leaves no quantized layer, so a transformers model's quantizer record goes too (its
    ``remove_quantization_config(model)``), and ``save_pretrained`` writes a plain model."""
    pytest.importorskip("bitsandbytes")

    class Quantizer:
        def __init__(self) -> None:
            self.removed_from: list[nn.Module] = []

        def remove_quantization_config(self, model: nn.Module) -> None:
            self.removed_from.append(model)

    torch.manual_seed(0)
    model = la.quantize(nn.Sequential(nn.Linear(64, 16)), "nf4", skip=[])
    model.hf_quantizer = Quantizer()
    la.inject(model, la.LoRAConfig(r=2, target_modules=["0"]))
    la.eject(model, merge=True, dtype=torch.float32)
    assert type(model[0]) is nn.Linear and model[0].weight.dtype == torch.float32
    assert model.hf_quantizer.removed_from == [model]


def test_merge_logs_the_layer_with_the_largest_requantization_error(caplog):
    pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    float_model = nn.Sequential(nn.Linear(64, 16), nn.Linear(16, 16))
    with torch.no_grad():
        float_model[0].weight.mul_(100.0)  # a 100x larger quantization step on "0"
    model = la.quantize(float_model, "nf4", skip=[])
    la.inject(model, la.LoRAConfig(r=2, target_modules=["0", "1"]))
    _randomize(model)
    with caplog.at_level("INFO", logger="lightning_adapters"):
        la.merge(model)
    errors = la.merge_errors(model)
    assert set(errors) == {"0", "1"} and errors["0"] > errors["1"]
    assert "(largest on '0')" in caplog.text


def test_eject_removes_two_adapters_of_one_module_and_every_record():
    model = Two()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    la.inject(model, la.LoRAConfig(r=2, target_modules=["first"]), name="a")
    la.inject(model, la.LoHaConfig(r=2, target_modules=["first"]), name="b")
    la.eject(model)
    assert type(model.first) is nn.Linear and "adapter" not in model.first._modules
    assert inject_mod.find_roots(model) == []
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())


# --- trained_biases --------------------------------------------------------------------------------------------


def test_lora_only_bias_of_an_adapted_root_module_is_its_own_bias():
    model = la.inject(nn.Linear(4, 3), la.LoRAConfig(r=2, target_modules="all-linear", bias="lora_only"))
    assert model.bias.requires_grad and not model.weight.requires_grad
    assert sorted(la.adapter_state_dict(model)) == ["adapter.default.lora_A", "adapter.default.lora_B", "bias"]


def test_lora_only_bias_trains_the_biases_of_its_own_adapter_s_modules_only():
    model = la.inject(Two(), la.LoRAConfig(r=2, target_modules=["first"], bias="lora_only"), name="a")
    la.inject(model, la.LoRAConfig(r=2, target_modules=["second"]), name="b")
    rec = inject_mod.get_adapters(model).records["a"]
    assert inject_mod.trained_biases(model, rec) == ["first.bias"]
    assert model.first.bias.requires_grad and not model.second.bias.requires_grad


# --- apply_dtype_policy ----------------------------------------------------------------------------------------


def test_apply_dtype_policy_gives_each_adapter_its_own_config_s_dtype():
    model = la.inject(Two(), la.LoRAConfig(r=2, target_modules=["first"]), name="a")
    la.inject(model, la.LoRAConfig(r=2, target_modules=["second"], adapter_dtype="float64"), name="b")
    model.to(torch.bfloat16)  # what a bf16-true Lightning run does to the whole module
    la.apply_dtype_policy(model)
    # a: no adapter_dtype, half-precision base -> fp32; b: float64 as configured.
    assert {p.dtype for p in model.first.adapter.a.parameters()} == {torch.float32}
    assert {p.dtype for p in model.second.adapter.b.parameters()} == {torch.float64}


def test_apply_dtype_policy_restores_a_whole_model_adapter_s_dtype():
    from tests.helpers import tiny_llama

    model = la.inject(tiny_llama(), la.LlamaAdapterConfig(adapter_len=2, adapter_layers=1))
    model.to(torch.bfloat16)
    la.apply_dtype_policy(model)
    prompts = la.adapter_state_dict(model)
    assert prompts and {t.dtype for t in prompts.values() if t.is_floating_point()} == {torch.float32}


def test_all_bias_lists_every_base_bias_and_no_adapter_tensor():
    """``target_parameters`` on a 2-D parameter called ``bias`` gives the adapter tensors ``lora_A.bias`` and
    ``lora_B.bias``: adapter tensors (trained anyway), not base biases."""

    class Experts(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(3, 4, 4))
            self.bias = nn.Parameter(torch.randn(3, 4))

    model = nn.Module()
    model.experts = Experts()
    model.lin = nn.Linear(4, 4)
    la.inject(model, la.LoRAConfig(r=2, target_modules=["lin"], target_parameters=["experts.bias"], bias="all"))
    assert "experts.adapter.default.lora_A.bias" in dict(model.named_parameters())
    rec = inject_mod.get_adapters(model).records["default"]
    assert inject_mod.trained_biases(model, rec) == ["experts.bias", "lin.bias"]
