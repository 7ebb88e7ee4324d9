"""Which modules a config selects and which it refuses (``lightning_adapters.core.targeting``): default tables,
PEFT's layer filter with names given in full, the hint of a target that matched nothing, ties found anywhere in
a weight's memory, and the layers whose parent reads their weight directly."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import lightning_adapters as la
from lightning_adapters.core.targeting import DEFAULT_TARGETS, check_called, check_plain_layers, resolve_targets


class _Layers(nn.Module):
    """``layers.<i>.fc`` for i in 0..2, as a decoder's blocks are named."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([nn.ModuleDict({"fc": nn.Linear(2, 2), "gate": nn.Linear(2, 2)}) for _ in range(3)])


# --- resolve_targets ------------------------------------------------------------------------------------------


def test_a_method_default_table_is_used_when_target_modules_is_none():
    model = _Layers()
    model.config = type("Config", (), {"model_type": "toy"})()
    names = resolve_targets(model, None, None, method="m", default_targets={"toy": ["gate"]})
    assert names == ["layers.0.gate", "layers.1.gate", "layers.2.gate"]
    with pytest.raises(la.TargetError, match=r"no default for model type 'toy'; set target_modules"):
        resolve_targets(model, None, None, method="m")  # the library's own table has no "toy"


def test_layers_to_transform_filters_suffixes_but_keeps_names_given_in_full():
    model = _Layers()
    by_layer = dict(layers_to_transform=[0], layers_pattern="layers")
    assert resolve_targets(model, ["fc"], None, method="m", **by_layer) == ["layers.0.fc"]
    # PEFT's rule: a name given in full is kept whatever its layer index.
    assert resolve_targets(model, ["layers.2.fc", "gate"], None, method="m", **by_layer) == [
        "layers.0.gate",
        "layers.2.fc",
    ]


def test_layers_to_transform_does_not_filter_a_regex():
    model = _Layers()
    names = resolve_targets(
        model, r"layers\.\d\.fc", None, method="m", layers_to_transform=[0], layers_pattern="layers"
    )
    assert names == ["layers.0.fc", "layers.1.fc", "layers.2.fc"]


def _no_match(model: nn.Module, targets) -> str:
    with pytest.raises(la.TargetError) as err:
        resolve_targets(model, targets, None, method="m")
    return str(err.value)


def _listed(message: str, head: str) -> list[str]:
    match = re.search(re.escape(head) + r"(\[.*?\])", message)
    assert match is not None, message
    return eval(match.group(1))  # a list of quoted names, as repr() writes it


def test_the_hint_keeps_close_matches_of_every_wanted_name():
    model = _Layers()
    message = _no_match(model, ["gat", "zzzzzzzz"])  # only the first has a close match
    assert _listed(message, "closest module names: ") == ["gate"]


def test_the_hint_keeps_loose_matches():
    assert _listed(_no_match(_Layers(), ["attn"]), "closest module names: ") == ["gate"]  # shares "at" only


def test_the_hint_of_a_regex_matches_the_whole_pattern():
    assert _listed(_no_match(_Layers(), "layrs"), "closest module names: ") == ["layers"]


def test_the_hint_shows_three_close_matches_per_wanted_name():
    model = nn.ModuleDict({f"proj{i}": nn.Linear(2, 2) for i in range(1, 6)})
    names = _listed(_no_match(model, ["proj"]), "closest module names: ")
    assert len(names) == 3 and set(names) <= {f"proj{i}" for i in range(1, 6)}


def test_without_a_close_match_the_hint_shows_the_first_eight_module_names():
    model = _Layers()  # 1 + 3 * 3 = 10 named modules
    all_names = [n for n, _ in model.named_modules() if n]
    assert _listed(_no_match(model, ["zzzzzzzz"]), "some module names: ") == all_names[:8]


# --- check_untied ---------------------------------------------------------------------------------------------


def test_a_tie_in_the_last_row_of_a_weight_is_found():
    flat = torch.randn(12)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(4, 4))
    model[0].weight = nn.Parameter(flat.view(3, 4))  # rows at elements 0-3, 4-7, 8-11
    model[1].bias = nn.Parameter(flat[8:])  # shares the last row
    with pytest.raises(la.TargetError, match=r"'0.weight' shares its memory with '1.bias'"):
        la.inject(model, la.LoRAConfig(r=2, target_modules=["0"]))


def test_a_tensor_that_ends_where_the_weight_begins_is_not_a_tie():
    flat = torch.randn(16)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 3))
    model[0].bias = nn.Parameter(flat[:4])
    model[1].weight = nn.Parameter(flat[4:].view(3, 4))  # right after the bias, not overlapping it
    la.inject(model, la.LoRAConfig(r=2, target_modules=["1"]))
    assert la.adapter_state_dict(model)


def test_a_target_without_a_weight_does_not_stop_the_tie_check_of_the_next():
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)  # in_proj_weight, no "weight"
            self.emb = nn.Embedding(10, 8)
            self.fc = nn.Linear(8, 10, bias=False)
            self.fc.weight = self.emb.weight

    untie = "model.fc.weight = torch.nn.Parameter(model.fc.weight.detach().clone())"
    with pytest.raises(la.TargetError, match=r"'fc.weight' shares its memory with 'emb.weight'") as err:
        la.inject(Model(), la.LoRAConfig(r=2, target_modules=["attn", "fc"]))
    assert f"untie it before inject: {untie} (" in str(err.value)


def test_a_model_that_is_itself_the_target_names_its_tensors_without_a_prefix():
    class Linear(nn.Linear):
        def __init__(self) -> None:
            super().__init__(4, 4)
            self.register_buffer("w_copy", self.weight.data)

    with pytest.raises(la.TargetError, match=r"^lora: 'weight' shares its memory with 'w_copy' \("):
        la.inject(Linear(), la.LoRAConfig(r=2, target_modules="all-linear"))


# --- check_called and check_plain_layers ----------------------------------------------------------------------


def test_a_bare_attention_module_is_named_without_a_parent():
    mha = nn.MultiheadAttention(8, 2)
    with pytest.raises(la.UnsupportedLayerError, match=r"^loha: 'out_proj' is the out_proj of nn.MultiheadAttention,"):
        check_called(mha, ["out_proj"], "loha")


def test_the_self_attention_of_an_encoder_layer_is_refused_while_the_fast_path_is_on():
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), 1)
    was = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(True)
    try:
        with pytest.raises(la.UnsupportedLayerError, match=r"'layers.0.self_attn' belongs to"):
            check_called(model, ["layers.0.self_attn"], "lora")
        torch.backends.mha.set_fastpath_enabled(False)
        check_called(model, ["layers.0.self_attn"], "lora")
    finally:
        torch.backends.mha.set_fastpath_enabled(was)


def test_lora_adapts_a_plain_attention_module_and_refuses_a_parametrized_one():
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    model = Model()
    la.inject(model, la.LoRAConfig(r=2, target_modules=["attn"]))
    assert la.adapter_state_dict(model)

    class Scale(nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return 2 * w

    model = Model()
    nn.utils.parametrize.register_parametrization(model.attn, "in_proj_weight", Scale())
    with pytest.raises(la.UnsupportedLayerError, match=r"the weight of 'attn' is computed"):
        la.inject(model, la.LoRAConfig(r=2, target_modules=["attn"]))


def test_a_conv_with_its_own_conv_forward_is_refused():
    class PaddedConv(nn.Conv2d):
        def _conv_forward(self, x, weight, bias):
            return super()._conv_forward(nn.functional.pad(x, (1, 1, 1, 1)), weight, bias)

    model = nn.Sequential(PaddedConv(2, 2, 3))
    with pytest.raises(la.UnsupportedLayerError, match=r"a subclass of Conv2d with its own _conv_forward"):
        la.inject(model, la.LoRAConfig(r=2, target_modules=["0"]))


def test_a_leaf_called_linear1_outside_an_encoder_layer_is_not_refused():
    model = nn.Sequential()
    model.add_module("linear1", nn.Linear(2, 2))
    was = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(True)
    try:
        check_called(model, ["linear1"], "lora")
    finally:
        torch.backends.mha.set_fastpath_enabled(was)


def test_plain_layer_checks_skip_unsupported_targets_and_go_on():
    class Doubled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    model = nn.Sequential(nn.Conv1d(2, 2, 1), Doubled(2, 2))
    with pytest.raises(la.UnsupportedLayerError, match=r"'1' is a Doubled, a subclass of Linear with its own forward"):
        check_plain_layers(model, ["0", "1"], "lora", (nn.Linear,))


def test_a_quantized_target_does_not_end_the_checks_of_the_targets_after_it():
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

    class Doubled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64, bias=False), Doubled(2, 2))
    model[0].weight = nn.Parameter(to_nf4(model[0].weight.detach(), 64, 64), requires_grad=False)
    check_plain_layers(model, ["0"], "lora", (nn.Linear,))  # a quantized base passes
    with pytest.raises(la.UnsupportedLayerError, match=r"'1' is a Doubled"):
        check_plain_layers(model, ["0", "1"], "lora", (nn.Linear,))


def test_default_targets_are_peft_s_tables():
    """target_modules=None takes PEFT 0.21.2's per-architecture defaults: LoRA, LoHa, LoKr, OFT and BOFT share one
    table, AdaLoRA has its own (e.g. all of q/k/v/o/wi/wo on t5, query/key/value/dense on roberta). Only six
    architectures (four for AdaLoRA, with roberta's differing from PEFT's) were known here."""
    from peft.utils import constants

    from lightning_adapters.registry import get_method

    lora_like = constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    for method in ("lora", "loha", "lokr", "oft", "boft"):
        peft_table = getattr(constants, f"TRANSFORMERS_MODELS_TO_{method.upper()}_TARGET_MODULES_MAPPING")
        assert peft_table == lora_like
        assert (get_method(method).default_targets or DEFAULT_TARGETS) == lora_like, method
    assert get_method("adalora").default_targets == constants.TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING


@pytest.mark.parametrize(("method", "want"), [("lora", ["q", "v"]), ("adalora", ["k", "o", "q", "v", "wi", "wo"])])
def test_t5_defaults_select_the_modules_peft_selects(method, want):
    import transformers

    cfg = transformers.T5Config(vocab_size=32, d_model=16, d_kv=4, d_ff=24, num_layers=1, num_heads=2)
    model = transformers.T5ForConditionalGeneration(cfg)
    config = la.LoRAConfig(r=2) if method == "lora" else la.AdaLoRAConfig(init_r=3, target_r=2, total_step=10)
    la.inject(model, config)
    names = [n for n, _ in model.named_modules() if n.endswith(".adapter")]
    assert sorted({n.split(".")[-2] for n in names}) == want
