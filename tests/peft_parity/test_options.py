"""Every field of PEFT 0.21.2's config classes is supported, ignored on purpose or refused by name.

The table is ``lightning_adapters.interop.peft_fields.PEFT_FIELDS``. Here: it lists exactly PEFT's fields (a field
PEFT adds fails ``test_table_lists_every_peft_field``); every supported field set to a non-default value moves
PEFT -> ours -> PEFT with equal outputs and input gradients and is written back; every ignored field set to a
non-default value still loads with the outputs of the PEFT model that wrote the file; every refused field set to a
non-default value is refused naming the field. Plus pickled ``adapter_model.bin`` directories.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import pickle
import re

import peft
import pytest
import torch
from torch import nn

import lightning_adapters as la
from lightning_adapters.errors import AdapterConfigError, AdapterStateError
from lightning_adapters.interop.peft_fields import IGNORED, PEFT_FIELDS, REFUSED, SUPPORTED, markdown
from tests.peft_parity.test_boft import fbd_stand_in  # noqa: F401 (fixture)

PEFT_CLASSES = {
    "LORA": peft.LoraConfig,
    "ADALORA": peft.AdaLoraConfig,
    "LOHA": peft.LoHaConfig,
    "LOKR": peft.LoKrConfig,
    "OFT": peft.OFTConfig,
    "BOFT": peft.BOFTConfig,
    "ADAPTION_PROMPT": peft.AdaptionPromptConfig,
}


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(16, 16)
        self.v_proj = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.v_proj(torch.tanh(self.q_proj(x)))


class Tiny(nn.Module):
    """Three blocks under ``model.layers.<i>`` (PEFT's default layer pattern finds the index) and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([_Block() for _ in range(3)])
        self.lm_head = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.model.layers:
            x = block(x)
        return self.lm_head(x)


def tiny() -> Tiny:
    torch.manual_seed(0)
    return Tiny().double().eval()  # float64: the comparisons test the maths, not float32 rounding


def inputs() -> torch.Tensor:
    return torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


TARGETS = ["q_proj", "v_proj"]
BASE_KW = {
    "LORA": dict(r=4, lora_alpha=8, target_modules=TARGETS),
    "ADALORA": dict(init_r=4, target_r=2, total_step=10, lora_alpha=8, target_modules=TARGETS),
    "LOHA": dict(r=2, alpha=4, target_modules=TARGETS),
    "LOKR": dict(r=2, alpha=4, target_modules=TARGETS),
    "OFT": dict(r=0, oft_block_size=4, target_modules=TARGETS),
    "BOFT": dict(boft_block_size=4, target_modules=TARGETS),
}
_TARGETING = {
    "target_modules": {"target_modules": ["q_proj"]},
    "exclude_modules": {"exclude_modules": ["model.layers.0.v_proj"]},
    "modules_to_save": {"modules_to_save": ["lm_head"]},
    "layers_to_transform": {"layers_to_transform": [0, 2]},
    "layers_pattern": {"layers_to_transform": 1, "layers_pattern": "layers"},
}
# Non-default values for every supported field (the PEFT config kwargs that set it), per PEFT type.
SUPPORTED_EXAMPLES: dict[str, dict[str, dict]] = {
    "LORA": {
        **_TARGETING,
        "r": {"r": 2},
        "lora_alpha": {"lora_alpha": 3},
        "lora_dropout": {"lora_dropout": 0.1},
        "use_rslora": {"use_rslora": True},
        "init_lora_weights": {"init_lora_weights": "gaussian"},
        "rank_pattern": {"rank_pattern": {"v_proj": 2}},
        "alpha_pattern": {"alpha_pattern": {"q_proj": 3}},
        "use_dora": {"use_dora": True},
        "bias": {"bias": "all"},
        "lora_bias": {"lora_bias": True},
    },
    "ADALORA": {
        **_TARGETING,
        "lora_alpha": {"lora_alpha": 3},
        "lora_dropout": {"lora_dropout": 0.1},
        "init_lora_weights": {"init_lora_weights": False},
        "init_r": {"init_r": 3},
        "target_r": {"target_r": 1},
        "tinit": {"tinit": 1},
        "tfinal": {"tfinal": 2},
        "deltaT": {"deltaT": 2},
        "beta1": {"beta1": 0.5},
        "beta2": {"beta2": 0.6},
        "orth_reg_weight": {"orth_reg_weight": 0.1},
        "total_step": {"total_step": 20},
        "bias": {"bias": "lora_only"},
    },
    "LOHA": {
        **_TARGETING,
        "r": {"r": 3},
        "alpha": {"alpha": 5},
        "rank_dropout": {"rank_dropout": 0.1},
        "module_dropout": {"module_dropout": 0.1},
        "use_effective_conv2d": {"use_effective_conv2d": True},
        "init_weights": {"init_weights": False},
        "rank_pattern": {"rank_pattern": {"v_proj": 3}},
        "alpha_pattern": {"alpha_pattern": {"q_proj": 3}},
    },
    "LOKR": {
        **_TARGETING,
        "r": {"r": 3},
        "alpha": {"alpha": 5},
        "rank_dropout": {"rank_dropout": 0.1},
        "module_dropout": {"module_dropout": 0.1},
        "use_effective_conv2d": {"use_effective_conv2d": True},
        "init_weights": {"init_weights": "lycoris"},
        "rank_pattern": {"rank_pattern": {"v_proj": 3}},
        "alpha_pattern": {"alpha_pattern": {"q_proj": 3}},
        "decompose_both": {"decompose_both": True},
        "decompose_factor": {"decompose_factor": 2},
        "rank_dropout_scale": {"rank_dropout_scale": True},
    },
    "OFT": {
        **_TARGETING,
        "r": {"r": 4, "oft_block_size": 0},
        "oft_block_size": {"oft_block_size": 8},
        "module_dropout": {"module_dropout": 0.1},
        "init_weights": {"init_weights": False},
        "coft": {"coft": True},
        "eps": {"coft": True, "eps": 1e-3},
        "block_share": {"block_share": True},
        "use_cayley_neumann": {"use_cayley_neumann": False},
        "num_cayley_neumann_terms": {"num_cayley_neumann_terms": 3},
        "bias": {"bias": "all"},
    },
    "BOFT": {
        **_TARGETING,
        "boft_block_size": {"boft_block_size": 2},
        "boft_block_num": {"boft_block_size": 0, "boft_block_num": 4},
        "boft_n_butterfly_factor": {"boft_n_butterfly_factor": 2},
        "boft_dropout": {"boft_dropout": 0.1},
        "init_weights": {"init_weights": False},
        "bias": {"bias": "boft_only"},
    },
}
# Supported fields whose parity lives in a dedicated test (the generic model above cannot carry them).
_LLAMA_ADAPTER_PARITY = "tests/peft_parity/test_llama_adapter.py::test_peft_adapter_loads_with_equal_logits"
DEDICATED = {
    ("ADALORA", "rank_pattern"): "tests/peft_parity/test_adalora.py::test_peft_trained_adapter_loads_through_load_peft",
    ("ADAPTION_PROMPT", "target_modules"): _LLAMA_ADAPTER_PARITY,
    ("ADAPTION_PROMPT", "adapter_len"): _LLAMA_ADAPTER_PARITY,
    ("ADAPTION_PROMPT", "adapter_layers"): _LLAMA_ADAPTER_PARITY,
    ("LORA", "trainable_token_indices"): "tests/peft_parity/test_trainable_tokens.py::test_peft_to_ours_to_peft",
    ("LORA", "target_parameters"): "tests/peft_parity/test_lora_target_parameters.py::test_moe_experts_both_ways",
    ("LORA", "loftq_config"): "tests/peft_parity/test_loftq.py::test_loftq_equals_peft",
}

# Non-default values of ignored fields, written into a PEFT file by hand (JSON values).
IGNORED_EXAMPLES = {
    "task_type": "CAUSAL_LM",
    "inference_mode": False,
    "revision": "main",
    "base_model_name_or_path": "someone/some-model",
    "peft_version": "0.0.1",
    "auto_mapping": {"base_model_class": "Tiny", "parent_library": "tests"},
    "fan_in_fan_out": True,
    "megatron_core": "megatron.core.other",
    "eva_config": {"rho": 2.0},
    "corda_config": {"corda_method": "kpm"},
    "lora_ga_config": {"direction": "ArB2r"},
    "qalora_group_size": 32,
    "runtime_config": {"ephemeral_gpu_offload": True},
    "ensure_weight_tying": True,
    "r": 4,
    "use_rslora": True,
    "alpha_pattern": {"q_proj": 3},
    "lora_bias": True,
}
# Non-default values of refused fields (JSON values); anything else gets a generic non-empty value.
REFUSED_EXAMPLES = {
    "bias": "all",
    "lora_bias": True,
    "layers_to_transform": [0],
    "layers_pattern": "layers",
    "megatron_config": {"tensor_model_parallel_size": 2},
    "trainable_token_indices": [1, 2],
    "velora_config": {"rank": 4},
    "alora_invocation_tokens": [5, 6],
    "use_qalora": True,
    "monteclora_config": {"n_samples": 2},
    "layer_replication": [[0, 2], [1, 3]],
    "target_parameters": ["experts.gate_up_proj"],
    "use_bdlora": {"lora_a_is_blockdiagonal": ["q_proj"]},
    "arrow_config": {"top_k": 2},
    "kasa_config": {"beta": 0.1},
    "use_dora": True,
    "loftq_config": {"loftq_bits": 4},
}


def _rows(status: str) -> list[tuple[str, str]]:
    return [(t, f) for t, table in PEFT_FIELDS.items() for f, rule in table.items() if rule.status == status]


def _randomize(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            # PEFT's AdaLoRA ``ranknum`` turns trainable when cast to float64, but it is a constant (never saved).
            if p.requires_grad and "ranknum" not in name:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)


def _peft_config(peft_type: str, **kw):
    return PEFT_CLASSES[peft_type](**{**BASE_KW[peft_type], **kw})


def _write_peft(peft_type: str, directory, **kw) -> tuple[nn.Module, nn.Module]:
    """A PEFT model with random adapter values saved to ``directory``; returns (base, peft model)."""
    base = tiny()
    pm = peft.get_peft_model(copy.deepcopy(base), _peft_config(peft_type, **kw)).eval()
    _randomize(pm)
    pm.save_pretrained(directory)
    return base, pm


def _out_and_input_grad(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    x = inputs().requires_grad_(True)
    y = model(x)
    y.square().sum().backward()
    return y.detach(), x.grad


def _edit_config(directory, **fields) -> None:
    path = directory / "adapter_config.json"
    d = json.loads(path.read_text())
    d.update(fields)
    path.write_text(json.dumps(d))


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal within 1e-5 relative to the tensor's scale."""
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def _same(a, b) -> bool:
    if isinstance(a, (list, set, tuple)) and isinstance(b, (list, set, tuple)):
        return sorted(map(str, a)) == sorted(map(str, b))
    return a == b


@pytest.mark.parametrize("peft_type", list(PEFT_CLASSES))
def test_table_lists_every_peft_field(peft_type):
    fields = {f.name for f in dataclasses.fields(PEFT_CLASSES[peft_type])}
    table = set(PEFT_FIELDS[peft_type])
    assert fields - table == set(), f"PEFT {peft_type} fields not classified in peft_fields.py: {fields - table}"
    assert table - fields == set(), f"peft_fields.py lists fields PEFT {peft_type} does not have: {table - fields}"
    for name, rule in PEFT_FIELDS[peft_type].items():
        assert rule.status in (SUPPORTED, IGNORED, REFUSED) and rule.why, name


@pytest.mark.parametrize("peft_type", list(PEFT_CLASSES))
def test_refused_defaults_are_peft_defaults(peft_type):
    defaults = {
        f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
        for f in dataclasses.fields(PEFT_CLASSES[peft_type])
    }
    for name, rule in PEFT_FIELDS[peft_type].items():
        if rule.status == REFUSED:
            assert rule.default == defaults[name], (peft_type, name)


def test_every_supported_field_has_a_parity_case():
    for peft_type, name in _rows(SUPPORTED):
        if name == "peft_type":
            continue  # every case below loads a file of that type
        assert name in SUPPORTED_EXAMPLES.get(peft_type, {}) or (peft_type, name) in DEDICATED, (peft_type, name)
    for path_and_name in set(DEDICATED.values()):
        path, func = path_and_name.split("::")
        with open(path) as f:
            assert f"def {func}(" in f.read(), path_and_name


def test_every_ignored_and_refused_field_has_a_case():
    for _, name in _rows(IGNORED):
        assert name in IGNORED_EXAMPLES, name


def test_docs_are_generated_from_the_table():
    with open("docs/PEFT_OPTIONS.md") as f:
        regenerate = "python -m lightning_adapters.interop.peft_fields > docs/PEFT_OPTIONS.md"
        assert f.read() == markdown(), f"regenerate: {regenerate}"


SUPPORTED_CASES = [(t, f) for t, fields in SUPPORTED_EXAMPLES.items() for f in fields]


@pytest.mark.parametrize(("peft_type", "field"), SUPPORTED_CASES, ids=[f"{t}-{f}" for t, f in SUPPORTED_CASES])
def test_supported_field_round_trips_with_equal_outputs(peft_type, field, tmp_path, request):
    if peft_type == "BOFT":
        request.getfixturevalue("fbd_stand_in")
    kw = SUPPORTED_EXAMPLES[peft_type][field]
    base, pm = _write_peft(peft_type, tmp_path / "peft", **kw)
    want_y, want_gx = _out_and_input_grad(pm)

    ours = la.load_peft(copy.deepcopy(base), tmp_path / "peft").eval()
    y, gx = _out_and_input_grad(ours)
    _close(y, want_y)
    _close(gx, want_gx)

    la.save_peft(ours, tmp_path / "ours")
    written = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    for k, v in kw.items():
        assert _same(written[k], json.loads(json.dumps(v))), (k, written[k], v)
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    y2, gx2 = _out_and_input_grad(back)
    _close(y2, want_y)
    _close(gx2, want_gx)


IGNORED_CASES = [(t, f) for t, f in _rows(IGNORED) if t != "ADAPTION_PROMPT"]


@pytest.mark.parametrize(("peft_type", "field"), IGNORED_CASES, ids=[f"{t}-{f}" for t, f in IGNORED_CASES])
def test_ignored_field_loads_with_the_outputs_of_the_writer(peft_type, field, tmp_path):
    base, pm = _write_peft(peft_type, tmp_path)
    _edit_config(tmp_path, **{field: IGNORED_EXAMPLES[field]})
    want, _ = _out_and_input_grad(pm)
    y, _ = _out_and_input_grad(la.load_peft(copy.deepcopy(base), tmp_path).eval())
    _close(y, want)


REFUSED_CASES = _rows(REFUSED)


@pytest.mark.parametrize(("peft_type", "field"), REFUSED_CASES, ids=[f"{t}-{f}" for t, f in REFUSED_CASES])
def test_refused_field_is_named(peft_type, field, tmp_path):
    base = tiny()
    if peft_type == "ADAPTION_PROMPT":
        pytest.skip("AdaptionPromptConfig has no refused field")
    _write_peft(peft_type, tmp_path)
    value = REFUSED_EXAMPLES[field]
    _edit_config(tmp_path, **{field: value})
    model = copy.deepcopy(base)
    with pytest.raises(AdapterConfigError, match=rf"option {field}=") as err:
        la.load_peft(model, tmp_path)
    assert repr(value) in str(err.value)
    assert not list(la.core.inject.find_records(model)), "the model was changed by a refused load"


def test_mica_is_refused_by_name(tmp_path):
    base, _ = _write_peft("LORA", tmp_path)
    _edit_config(tmp_path, init_lora_weights="mica")
    with pytest.raises(AdapterConfigError, match=r"init_lora_weights='mica'.*MiCA trains lora_A only"):
        la.load_peft(copy.deepcopy(base), tmp_path)


@pytest.mark.parametrize("value", ["PiSSA", "pissa_niter_x", "foo"])
def test_init_lora_weights_peft_does_not_know_is_refused_and_the_model_is_unchanged(tmp_path, value):
    """PEFT refuses to build these layers ("Unknown initialization"); they used to load as the default init, which
    for a PiSSA-trained adapter means factors for the residual base on the unmodified base."""
    base, _ = _write_peft("LORA", tmp_path)
    _edit_config(tmp_path, init_lora_weights=value)
    with pytest.raises(ValueError):
        peft.PeftModel.from_pretrained(copy.deepcopy(base).float(), tmp_path)  # float32: PiSSA refuses float64
    model = copy.deepcopy(base)
    with pytest.raises(AdapterConfigError, match=re.escape(f"init_lora_weights={value!r} is not an initialisation")):
        la.load_peft(model, tmp_path)
    assert [n for n, _ in model.named_modules()] == [n for n, _ in base.named_modules()]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), base.state_dict().values()))


@pytest.mark.parametrize("field", ["rank_pattern", "alpha_pattern"])
def test_pattern_keys_keep_their_order_in_the_saved_file(tmp_path, field):
    """Pattern keys are regexes tried in order, first match wins (PEFT's rule): with ``{"q_proj": 2,
    "layers.1.q_proj": 3}`` every q_proj gets 2. Written with sorted keys, the file gave layer 1 the value 3, so
    neither PEFT nor load_peft could load it (and alpha loaded silently wrong)."""
    kw = {field: {"q_proj": 2, "layers.1.q_proj": 3}}  # the same field names in both configs
    pm = peft.get_peft_model(tiny(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], **kw))
    model = la.inject(tiny(), la.LoRAConfig(r=4, alpha=8, target_modules=["q_proj"], **kw))
    _randomize(model)
    layer = model.model.layers[1].q_proj.adapter["default"]
    peft_layer = pm.base_model.model.model.layers[1].q_proj
    assert (layer.r, layer.scale) == (peft_layer.r["default"], peft_layer.scaling["default"])
    la.save_peft(model, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert list(saved[field]) == ["q_proj", "layers.1.q_proj"] and list(saved) == sorted(saved)
    want, _ = _out_and_input_grad(model)
    _close(_out_and_input_grad(peft.PeftModel.from_pretrained(tiny(), tmp_path))[0], want)
    _close(_out_and_input_grad(la.load_peft(tiny(), tmp_path))[0], want)


@pytest.mark.parametrize("peft_type", ["LORA", "LOHA", "OFT"])
def test_layers_pattern_with_empty_layers_to_transform_loads_every_layer(tmp_path, peft_type):
    """PEFT reads ``layers_to_transform=[]`` as unset and then ignores ``layers_pattern``: every layer is adapted.
    Such a file was refused ("layers_pattern='layers' is only used with layers_to_transform")."""
    base, pm = _write_peft(peft_type, tmp_path, layers_to_transform=[], layers_pattern="layers")
    want, want_grad = _out_and_input_grad(pm)
    ours = la.load_peft(copy.deepcopy(base), tmp_path).eval()
    assert all(hasattr(block.q_proj, "adapter") and hasattr(block.v_proj, "adapter") for block in ours.model.layers)
    got, got_grad = _out_and_input_grad(ours)
    _close(got, want)
    _close(got_grad, want_grad)


def test_field_unknown_to_the_table_is_refused_unless_off(tmp_path):
    base, pm = _write_peft("LORA", tmp_path)
    _edit_config(tmp_path, some_future_option=None, another_future_flag=False)
    want, _ = _out_and_input_grad(pm)
    y, _ = _out_and_input_grad(la.load_peft(copy.deepcopy(base), tmp_path).eval())
    _close(y, want)
    _edit_config(tmp_path, some_future_option={"k": 1})
    with pytest.raises(AdapterConfigError, match=r"some_future_option=\{'k': 1\} is not known"):
        la.load_peft(copy.deepcopy(base), tmp_path)


# --- adapter_model.bin ----------------------------------------------------------------------------------------


def test_pickled_adapter_loads_with_equal_outputs_and_gradients(tmp_path):
    base = tiny()
    pm = peft.get_peft_model(copy.deepcopy(base), _peft_config("LORA", use_dora=True)).eval()
    _randomize(pm)
    pm.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert (tmp_path / "bin" / "adapter_model.bin").is_file()
    assert not (tmp_path / "bin" / "adapter_model.safetensors").exists()
    want_y, want_gx = _out_and_input_grad(pm)
    ours = la.load_peft(copy.deepcopy(base), tmp_path / "bin").eval()
    y, gx = _out_and_input_grad(ours)
    _close(y, want_y)
    _close(gx, want_gx)
    # We write safetensors (into the same directory: the stale pickle goes, so the two cannot disagree).
    la.save_peft(ours, tmp_path / "bin")
    assert (tmp_path / "bin" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "bin" / "adapter_model.bin").exists()


class _NotATensor:
    pass


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"not a pickle at all", r"adapter_model\.bin is not a readable PyTorch state dict"),
        ("pickle-object", r"adapter_model\.bin is not a readable PyTorch state dict"),
        ("list", r"adapter_model\.bin holds a list, not a state dict of tensors"),
        ("dict-of-ints", r"adapter_model\.bin is not a state dict of tensors: entries \['x'\]"),
    ],
)
def test_bad_pickled_adapter_is_refused_naming_the_file(payload, message, tmp_path):
    base, _ = _write_peft("LORA", tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()
    target = tmp_path / "adapter_model.bin"
    if payload == "pickle-object":
        target.write_bytes(pickle.dumps({"x": _NotATensor()}))
    elif payload == "list":
        torch.save([torch.zeros(1)], target)
    elif payload == "dict-of-ints":
        torch.save({"x": 1}, target)
    else:
        target.write_bytes(payload)
    model = copy.deepcopy(base)
    with pytest.raises(AdapterStateError, match=message):
        la.load_peft(model, tmp_path)
    assert not list(la.core.inject.find_records(model))


# --- bias="all" / "<method>_only" -------------------------------------------------------------------------------

OUR_CONFIGS = {
    "LORA": lambda bias: la.LoRAConfig(r=4, alpha=8, target_modules=TARGETS, bias=bias),
    "ADALORA": lambda bias: la.AdaLoRAConfig(init_r=4, target_r=2, total_step=10, target_modules=TARGETS, bias=bias),
    "OFT": lambda bias: la.OFTConfig(r=0, oft_block_size=4, target_modules=TARGETS, bias=bias),
    "BOFT": lambda bias: la.BOFTConfig(boft_block_size=4, target_modules=TARGETS, bias=bias),
}
ONLY = {"LORA": "lora_only", "ADALORA": "lora_only", "OFT": "oft_only", "BOFT": "boft_only"}
BIAS_CASES = [(t, mode) for t in OUR_CONFIGS for mode in ("all", ONLY[t])]


def _peft_bias_grads(pm: nn.Module) -> dict[str, torch.Tensor]:
    """Gradients of PEFT's trainable base biases, keyed by the base model's own parameter names."""
    out = {}
    for n, p in pm.named_parameters():
        if p.requires_grad and n.endswith(".bias") and ".lora_" not in n and ".modules_to_save." not in n:
            out[n.removeprefix("base_model.model.").replace(".base_layer.", ".")] = p.grad
    return out


@pytest.mark.parametrize(("peft_type", "mode"), BIAS_CASES, ids=[f"{t}-{m}" for t, m in BIAS_CASES])
def test_bias_option_trains_saves_and_loads_as_peft(peft_type, mode, tmp_path, request):
    if peft_type == "BOFT":
        request.getfixturevalue("fbd_stand_in")
    base, pm = _write_peft(peft_type, tmp_path / "peft", bias=mode)
    ours = la.load_peft(copy.deepcopy(base), tmp_path / "peft").eval()
    # Trainability is PEFT's: the same base biases (and, with our own config, the same ones again).
    want_y, want_gx = _out_and_input_grad(pm)
    y, gx = _out_and_input_grad(ours)
    _close(y, want_y)
    _close(gx, want_gx)
    peft_grads = _peft_bias_grads(pm)
    ours_biases = {n: p for n, p in ours.named_parameters() if p.requires_grad and n.endswith(".bias")}
    ours_biases = {n: p for n, p in ours_biases.items() if ".adapter.default." not in n}
    assert set(ours_biases) == set(peft_grads)
    expected = {"all": 7, ONLY[peft_type]: 6}[mode]  # 6 adapted layers (+ the head's bias with "all")
    assert len(ours_biases) == expected
    for n, p in ours_biases.items():
        _close(p.grad, peft_grads[n])
    fresh = OUR_CONFIGS[peft_type](mode)
    injected = la.inject(copy.deepcopy(base), fresh)
    assert {n for n, p in injected.named_parameters() if p.requires_grad and ".adapter.default." not in n} == set(
        ours_biases
    )

    # One SGD step on both sides changes the biases; the trained values go PEFT <- ours and ours <- ours.
    for model in (pm, ours):
        with torch.no_grad():
            for n, p in model.named_parameters():
                if p.requires_grad and p.grad is not None and "ranknum" not in n:  # see _randomize
                    p.sub_(0.5 * p.grad)
                    p.grad = None
    stepped, _ = _out_and_input_grad(pm)
    assert not torch.allclose(stepped, want_y)
    _close(_out_and_input_grad(ours)[0], stepped)
    state = la.adapter_state_dict(ours)
    assert set(ours_biases) <= set(state)
    assert not {k for k in state if k.endswith(".weight") and ".adapter.default." not in k}
    la.save_peft(ours, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    _close(_out_and_input_grad(back)[0], stepped)
    again = la.load_peft(copy.deepcopy(base), tmp_path / "ours").eval()
    _close(_out_and_input_grad(again)[0], stepped)
    other = la.inject(copy.deepcopy(base), OUR_CONFIGS[peft_type](mode))
    la.load_adapter_state_dict(other, state)
    _close(_out_and_input_grad(other.eval())[0], stepped)


def test_bias_all_with_modules_to_save_loads_peft_s_wrapper_copies(tmp_path):
    base, pm = _write_peft("LORA", tmp_path / "peft", bias="all", modules_to_save=["lm_head"])
    ours = la.load_peft(copy.deepcopy(base), tmp_path / "peft").eval()
    want, _ = _out_and_input_grad(pm)
    _close(_out_and_input_grad(ours)[0], want)
    la.save_peft(ours, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    _close(_out_and_input_grad(back)[0], want)


@pytest.mark.parametrize("make", [lambda: la.LoRAConfig(bias="some"), lambda: la.OFTConfig(bias="lora_only")])
def test_bad_bias_value_is_refused_naming_it(make):
    with pytest.raises(AdapterConfigError, match=r"bias must be one of"):
        make()


# --- layers_to_transform / layers_pattern ---------------------------------------------------------------------

LAYER_NAMES = [
    "model.layers.0.q_proj",
    "model.layers.12.self_attn.q_proj",
    "layers.1.q_proj",
    "q_proj",
    "transformer.h.2.attn.c_attn",
    "model.layers.1.mlp.experts.0.w1",
    "encoder.block.3.layer.0.SelfAttention.q",
    "model.decoder.layers.2.fc1",
    "model.layers.x.q_proj",
]
LAYER_OPTIONS = [
    (0, None),
    ([1, 2], None),
    ([2], "layers"),
    ([0, 3], ["h", "block"]),
    (1, "layers"),
    ([0], "layer"),
    ([], None),
    ([2], "decoder.layers"),
]


def _module_tree(names: list[str]) -> nn.Module:
    root = nn.Module()
    for name in names:
        *path, leaf = name.split(".")
        mod = root
        for part in path:
            if part not in mod._modules:
                mod.add_module(part, nn.Module())
            mod = mod._modules[part]
        mod.add_module(leaf, nn.Linear(2, 2))
    return root


@pytest.mark.parametrize(("ltt", "pattern"), LAYER_OPTIONS)
def test_layer_selection_is_peft_s(ltt, pattern):
    from peft.tuners.tuners_utils import check_target_module_exists

    from lightning_adapters.core.targeting import resolve_targets

    targets = sorted({n.rsplit(".", 1)[-1] for n in LAYER_NAMES}) + ["model.layers.12.self_attn.q_proj"]
    cfg = peft.LoraConfig(target_modules=targets, layers_to_transform=ltt, layers_pattern=pattern)
    want = sorted(n for n in LAYER_NAMES if check_target_module_exists(cfg, n))
    got = resolve_targets(
        _module_tree(LAYER_NAMES), targets, None, method="lora", layers_to_transform=ltt, layers_pattern=pattern
    )
    assert sorted(got) == want


def test_layers_to_transform_selects_the_modules_peft_selects_and_a_full_name_bypasses_it():
    names = lambda m: sorted(n for n, mod in m.named_modules() if la.core.layer.is_adapted(mod))  # noqa: E731
    ours = la.inject(tiny(), la.LoRAConfig(target_modules=["q_proj", "v_proj"], layers_to_transform=[1]))
    assert names(ours) == ["model.layers.1.q_proj", "model.layers.1.v_proj"]
    full = ["q_proj", "model.layers.2.v_proj"]
    ours = la.inject(tiny(), la.LoRAConfig(target_modules=full, layers_to_transform=0, layers_pattern="layers"))
    pm = peft.get_peft_model(
        tiny(), peft.LoraConfig(target_modules=full, layers_to_transform=0, layers_pattern="layers")
    )
    peft_names = sorted(n.removeprefix("base_model.model.") for n, m in pm.named_modules() if hasattr(m, "lora_A"))
    assert names(ours) == peft_names == ["model.layers.0.q_proj", "model.layers.2.v_proj"]


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (dict(target_modules=".*q_proj", layers_to_transform=[0]), r"layers_to_transform=\[0\] needs target_modules"),
        (dict(target_modules="all-linear", layers_to_transform=[0]), r"needs target_modules as a list"),
        (dict(target_modules=["q_proj"], layers_pattern="layers"), r"layers_pattern='layers' is only used with"),
        (dict(target_modules=["q_proj"], layers_to_transform=[-1]), r"layers_to_transform must be a layer index"),
        (dict(target_modules=["q_proj"], layers_to_transform="0"), r"layers_to_transform must be a layer index"),
        (dict(target_modules=["q_proj"], layers_to_transform=[0], layers_pattern=3), r"layers_pattern must be"),
        (dict(target_modules=["q_proj"], layers_to_transform=[0], layers_pattern="(x"), r"not a valid regular"),
    ],
)
def test_bad_layer_selection_is_refused_naming_it(kw, message):
    with pytest.raises(AdapterConfigError, match=message):
        la.LoRAConfig(**kw)


def test_llama_adapter_refuses_layers_to_transform():
    with pytest.raises(AdapterConfigError, match="layers_to_transform=\\[0\\] is not supported; .*adapter_layers"):
        la.LlamaAdapterConfig(layers_to_transform=[0])


# --- lora_bias --------------------------------------------------------------------------------------------------


class _ConvNet(nn.Module):
    """Conv1d, Conv2d and a bias-free Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(4, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 8, 3, padding=1)
        self.nobias = nn.Linear(8, 5, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (N, 4, L)
        h = torch.tanh(self.c1(x))  # (N, 6, L)
        h = self.c2(h.unsqueeze(-1)).squeeze(-1)  # (N, 8, L)
        return self.nobias(h.transpose(1, 2))  # (N, L, 5)


def _lora_bias_grads(model: nn.Module, peft_side: bool) -> dict[str, torch.Tensor]:
    if peft_side:
        return {
            n.removeprefix("base_model.model.").replace(".lora_B.default.bias", ""): p.grad
            for n, p in model.named_parameters()
            if n.endswith("lora_B.default.bias")
        }
    return {
        n.replace(".adapter.default.lora_B_bias", ""): p.grad for n, p in model.named_parameters() if "lora_B_bias" in n
    }


@pytest.mark.parametrize("rows", [5, 40], ids=["unfolded", "folded"])  # both sides of fold_pays (3·in < 2·rows)
def test_lora_bias_linear_outputs_gradients_merge_and_round_trip(rows, tmp_path):
    base = tiny()
    pm = peft.get_peft_model(copy.deepcopy(base), _peft_config("LORA", lora_bias=True)).eval()
    _randomize(pm)
    pm.save_pretrained(tmp_path / "peft")
    x = torch.randn(2, rows, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ours = la.load_peft(copy.deepcopy(base), tmp_path / "peft").eval()
    assert all(p.requires_grad for n, p in ours.named_parameters() if "lora_B_bias" in n)
    outs, grads = [], []
    for model, peft_side in ((pm, True), (ours, False)):
        xi = x.clone().requires_grad_(True)
        y = model(xi)
        y.square().sum().backward()
        outs.append((y.detach(), xi.grad))
        grads.append(_lora_bias_grads(model, peft_side))
    _close(outs[1][0], outs[0][0])
    _close(outs[1][1], outs[0][1])
    assert set(grads[0]) == set(grads[1]) and len(grads[0]) == 6
    for k in grads[0]:
        _close(grads[1][k], grads[0][k])
    # Merge adds s·b_B to the base bias, as PEFT's merge_and_unload does.
    with torch.no_grad():
        la.merge(ours)
        merged_peft = copy.deepcopy(pm).merge_and_unload()
        _close(ours(x), outs[0][0])
        for name, p in merged_peft.named_parameters():
            _close(ours.get_parameter(name), p)
        la.unmerge(ours)
        for name, p in base.named_parameters():
            _close(ours.get_parameter(name), p)
    la.save_peft(ours, tmp_path / "ours")
    written = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert written["lora_bias"] is True
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    _close(back(x), outs[0][0])


def test_lora_bias_on_convs_and_a_bias_free_layer(tmp_path):
    torch.manual_seed(0)
    base = _ConvNet().double().eval()
    kw = dict(r=2, lora_alpha=4, target_modules=["c1", "c2", "nobias"], lora_bias=True)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw)).eval()
    _randomize(pm)
    pm.save_pretrained(tmp_path / "peft")
    x = torch.randn(3, 4, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    ours = la.load_peft(copy.deepcopy(base), tmp_path / "peft").eval()
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    ys = [pm(xs[0]), ours(xs[1])]
    for y in ys:
        y.square().sum().backward()
    _close(ys[1].detach(), ys[0].detach())
    _close(xs[1].grad, xs[0].grad)
    g_peft, g_ours = _lora_bias_grads(pm, True), _lora_bias_grads(ours, False)
    assert set(g_peft) == set(g_ours) == {"c1", "c2", "nobias"}
    for k in g_peft:
        _close(g_ours[k], g_peft[k])
    before = {n: p.detach().clone() for n, p in ours.named_parameters()}
    with pytest.raises(la.NotMergeableError, match=r"'nobias' is not mergeable: it has no bias, so its lora_bias=True"):
        la.merge(ours)
    assert all(torch.equal(p, before[n]) for n, p in ours.named_parameters()), "a refused merge changed weights"
    la.save_peft(ours, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    _close(back(x).detach(), ys[0].detach())


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (dict(use_dora=True), r"lora_bias=True does not work with use_dora=True"),
        (dict(init_weights="gaussian"), r"lora_bias=True needs init_weights True or False"),
        (dict(lora_bias=1), r"lora_bias must be one of \[False, True\], got 1"),
    ],
)
def test_bad_lora_bias_is_refused_naming_it(kw, message):
    with pytest.raises(AdapterConfigError, match=message):
        la.LoRAConfig(**{"target_modules": ["q_proj"], "lora_bias": True, **kw})


@pytest.mark.parametrize(
    ("layer", "kind"), [(lambda: nn.Embedding(10, 4), "Embedding"), (lambda: nn.MultiheadAttention(4, 2), "nn.Multi")]
)
def test_lora_bias_on_an_embedding_or_attention_is_refused_naming_it(layer, kind):
    model = nn.Sequential(layer())
    with pytest.raises(AdapterConfigError, match=rf"lora_bias=True is not supported on the {kind}.* '0'"):
        la.inject(model, la.LoRAConfig(target_modules=["0"], lora_bias=True))
    assert not list(la.core.inject.find_records(model))


def test_lightning_checkpoint_carries_the_trained_biases(tmp_path):
    from tests.lightning.models import BoringMLP, mlp_data, trainer

    model = BoringMLP(optimizer="sgd")
    enc_bias, head = model.encoder[0].bias.detach().clone(), model.head.bias.detach().clone()
    cfg = la.LoRAConfig(r=4, target_modules=["encoder.0", "encoder.2", "encoder.4"], bias="lora_only")
    t = trainer(callbacks=[la.AdapterCallback(cfg, verbose=False)])
    t.fit(model, mlp_data())
    assert not torch.equal(model.encoder[0].bias, enc_bias)
    assert torch.equal(model.head.bias, head)  # not an adapted module: frozen
    t.save_checkpoint(tmp_path / "c.ckpt")
    sd = torch.load(tmp_path / "c.ckpt", weights_only=False)["state_dict"]
    assert {"encoder.0.bias", "encoder.2.bias", "encoder.4.bias"} <= set(sd)
    assert not {"head.bias", "encoder.0.weight", "head.weight"} & set(sd)
    restored = la.restore_from_checkpoint(BoringMLP(optimizer="sgd"), tmp_path / "c.ckpt").eval()
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(restored(x), model.eval()(x))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda: la.LoRAConfig(lora_alpha=16),
            r"LoRAConfig: unexpected keyword argument 'lora_alpha'; PEFT's lora_alpha is 'alpha' here$",
        ),
        (
            lambda: la.AdaLoRAConfig(lora_dropout=0.1),
            r"unexpected keyword argument 'lora_dropout'; PEFT's lora_dropout is 'dropout' here$",
        ),
        (lambda: la.LoRAConfig(init_lora_weights="gaussian"), r"PEFT's init_lora_weights is 'init_weights' here$"),
        (
            lambda: la.LoKrConfig(rank_dropuot=0.1),
            r"LoKrConfig: unexpected keyword argument 'rank_dropuot'; did you mean 'rank_dropout'\?$",
        ),
        (lambda: la.OFTConfig(bogus=1), r"^OFTConfig: unexpected keyword argument 'bogus'$"),
    ],
)
def test_peft_spelling_or_a_typo_passed_to_our_config_names_our_field(make, message):
    """A PEFT user writes lora_alpha: the error says which field that is here (it was Python's bare TypeError)."""
    with pytest.raises(la.AdapterTypeError, match=message):
        make()


@pytest.mark.parametrize(
    ("peft_type", "field", "value", "message"),
    [
        ("LORA", "lora_dropout", 1.5, r"lora: lora_dropout \(our dropout\) must be in \[0, 1\), got 1.5$"),
        ("LORA", "lora_alpha", -2, r"lora: lora_alpha \(our alpha\) must be a finite number > 0, got -2$"),
        ("LOHA", "rank_dropout", 2.0, r"loha: rank_dropout must be in \[0, 1\), got 2.0$"),
    ],
)
def test_a_bad_value_in_a_peft_file_is_refused_naming_the_file_and_peft_s_field(
    tmp_path, peft_type, field, value, message
):
    """It said 'lora: dropout must be ...', neither the file nor the field the user has to edit there."""
    base, _ = _write_peft(peft_type, tmp_path)
    _edit_config(tmp_path, **{field: value})
    model = copy.deepcopy(base)
    path = re.escape(str(tmp_path / "adapter_config.json"))
    with pytest.raises(AdapterConfigError, match=f"^{path}: {message}"):
        la.load_peft(model, tmp_path)
    assert not any(n.endswith("adapter") for n, _ in model.named_modules())


@pytest.mark.parametrize(("peft_type", "field"), REFUSED_CASES, ids=[f"{t}-{f}" for t, f in REFUSED_CASES])
def test_refused_field_passed_to_our_config_is_named(peft_type, field):
    cls = {"LORA": la.LoRAConfig, "ADALORA": la.AdaLoRAConfig}[peft_type]
    with pytest.raises(TypeError, match=rf"unexpected keyword argument '{field}'"):
        cls(target_modules=["q_proj"], **{field: REFUSED_EXAMPLES[field]})
