"""Every accepted form of every selector field, on a model whose module names are prefixes of their siblings'.

``target_modules``, ``exclude_modules``, ``modules_to_save``, ``rank_pattern`` and ``alpha_pattern`` are given as
lists, tuples, OmegaConf containers (what Hydra hands over), regex strings and ``"all-linear"``; the model has
``fc``/``fc2``, ``layers.1``/``layers.10`` and ``proj``/``out_proj``, so a suffix test without its dot, a regex
search instead of a full match or a state filter by bare prefix selects a sibling too. Each test asserts exact
sets: the adapted modules, the trainable parameters, the ``adapter_state_dict`` keys (derived from the module
tree, not from a naming convention), and the ``save_peft`` keys and per-module ranks against PEFT's own
``save_pretrained`` on the same model and config.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file
from torch import nn

import lightning_adapters as la
from lightning_adapters.core.inject import adapted_modules


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 6)
        self.out_proj = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(torch.relu(self.proj(x)))


class Siblings(nn.Module):
    """``fc``/``fc2``, ``layers.1``/``layers.10`` (11 blocks), ``proj``/``out_proj``: prefixes of each other."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.fc2 = nn.Linear(6, 6)
        self.layers = nn.ModuleList(Block() for _ in range(11))
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc2(torch.relu(self.fc(x)))
        for block in self.layers:
            x = x + block(x)
        return self.head(x)


def _model() -> Siblings:
    torch.manual_seed(0)
    return Siblings()


def _adapted_names(model: nn.Module) -> set[str]:
    return {name for name, _, _ in adapted_modules(model)}


PROJ = {f"layers.{i}.proj" for i in range(11)}
ALL_LINEAR = {"fc", "fc2", "head"} | {f"layers.{i}.{p}" for i in range(11) for p in ("proj", "out_proj")}

# (id, target_modules, exclude_modules, expected adapted modules)
TARGETING = [
    ("list-fc", ["fc"], None, {"fc"}),
    ("tuple-fc", ("fc",), None, {"fc"}),
    ("omegaconf-fc", OmegaConf.create(["fc"]), None, {"fc"}),
    ("list-fc2", ["fc2"], None, {"fc2"}),
    ("regex-fc", r"fc", None, {"fc"}),
    ("regex-fc-any", r"fc\d*", None, {"fc", "fc2"}),
    ("list-proj", ["proj"], None, {f"layers.{i}.proj" for i in range(11)}),
    ("list-dotted", ["layers.1.proj"], None, {"layers.1.proj"}),
    ("list-dotted-10", ["layers.10.out_proj"], None, {"layers.10.out_proj"}),
    ("regex-layer-1", r"layers\.1\..*", None, {"layers.1.proj", "layers.1.out_proj"}),
    ("regex-layer-1x", r"layers\.1\d*\.proj", None, {"layers.1.proj", "layers.10.proj"}),
    ("all-linear", "all-linear", None, ALL_LINEAR),
    ("all-linear-case", "ALL-Linear", None, ALL_LINEAR),
    ("exclude-list-fc", ["fc", "fc2"], ["fc"], {"fc2"}),
    (
        "exclude-list-proj",
        "all-linear",
        ["proj", "head"],
        ALL_LINEAR - {"head"} - {f"layers.{i}.proj" for i in range(11)},
    ),
    ("exclude-regex-layer-1", ["proj"], r"layers\.1\..*", {f"layers.{i}.proj" for i in range(11) if i != 1}),
    ("exclude-omegaconf", ["proj"], OmegaConf.create(["layers.10.proj"]), {f"layers.{i}.proj" for i in range(10)}),
]


@pytest.mark.parametrize("target, exclude, expected", [c[1:] for c in TARGETING], ids=[c[0] for c in TARGETING])
def test_targeting_forms_select_exactly(target, exclude, expected) -> None:
    model = la.inject(_model(), la.LoRAConfig(r=2, target_modules=target, exclude_modules=exclude))
    assert _adapted_names(model) == expected


@pytest.mark.parametrize(
    "target, exclude",
    [(c[1], c[2]) for c in TARGETING if not isinstance(c[1], tuple) and "omegaconf" not in c[0]],
    ids=[c[0] for c in TARGETING if not isinstance(c[1], tuple) and "omegaconf" not in c[0]],
)
def test_targeting_equals_peft(target, exclude) -> None:
    """PEFT's own targeting of the same config adapts the same modules."""
    from peft import LoraConfig, get_peft_model

    ours = _adapted_names(la.inject(_model(), la.LoRAConfig(r=2, target_modules=target, exclude_modules=exclude)))
    peft_target = "all-linear" if isinstance(target, str) and target.lower() == "all-linear" else target
    peft_model = get_peft_model(_model(), LoraConfig(r=2, target_modules=peft_target, exclude_modules=exclude))
    prefix = "base_model.model."
    theirs = {n[len(prefix) :] for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and n.startswith(prefix)}
    assert ours == theirs


def _state_case(modules_to_save, target):
    before = set(_model().state_dict())
    model = la.inject(_model(), la.LoRAConfig(r=2, target_modules=target, modules_to_save=modules_to_save))
    added = set(model.state_dict()) - before
    return model, added


@pytest.mark.parametrize(
    "modules_to_save, target, saved_modules",
    [
        (["fc"], ["layers.1.proj"], {"fc"}),
        (["fc2"], ["layers.1.proj"], {"fc2"}),
        (("fc",), r"layers\.1\.proj", {"fc"}),
        (OmegaConf.create(["head", "fc"]), ["layers.10.proj"], {"head", "fc"}),
        (["layers.1.out_proj"], ["layers.10.proj"], {"layers.1.out_proj"}),
        (["layers.1"], ["fc"], {"layers.1"}),
    ],
    ids=["fc", "fc2", "tuple-regex", "omegaconf", "dotted", "block-1-not-10"],
)
def test_state_filtering_exact_keys(modules_to_save, target, saved_modules) -> None:
    """Trainable parameters and adapter state: the new adapter tensors plus exactly the saved modules' tensors."""
    model, added = _state_case(modules_to_save, target)
    adapted = _adapted_names(model)
    assert added and all(any(k.startswith(m + ".") for m in adapted) for k in added)
    saved = {k for k in model.state_dict() if any(k.startswith(m + ".") for m in saved_modules)} - added
    assert saved, "the saved modules have tensors"
    assert set(la.adapter_state_dict(model)) == added | saved
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {k for k in added | saved if k in dict(model.named_parameters())}


@pytest.mark.parametrize(
    "target, modules_to_save",
    [(["layers.1.proj"], ["fc"]), (r"layers\.1\..*", ["layers.10"]), (["fc"], ["fc2"]), ("all-linear", None)],
    ids=["dotted-fc", "regex-block10", "fc-fc2", "all-linear"],
)
def test_save_peft_keys_equal_peft_save_pretrained(target, modules_to_save, tmp_path) -> None:
    from peft import LoraConfig, PeftModel, get_peft_model

    ours = la.inject(_model(), la.LoRAConfig(r=2, target_modules=target, modules_to_save=modules_to_save))
    la.save_peft(ours, tmp_path / "ours")
    peft_model = get_peft_model(_model(), LoraConfig(r=2, target_modules=target, modules_to_save=modules_to_save))
    peft_model.save_pretrained(tmp_path / "peft")
    mine = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    theirs = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert {k: tuple(v.shape) for k, v in mine.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    # And PEFT reads our file back onto the same modules.
    back = PeftModel.from_pretrained(_model(), tmp_path / "ours")
    prefix = "base_model.model."
    wrapped = {n[len(prefix) :] for n, m in back.named_modules() if hasattr(m, "lora_A") and n.startswith(prefix)}
    assert wrapped == _adapted_names(ours)


# (id, rank_pattern, alpha_pattern)
PATTERNS = [
    ("fc-not-fc2", {"fc": 4}, {"fc": 7.0}),
    ("fc2-only", {"fc2": 4}, {"fc2": 7.0}),
    ("dotted-1-not-10", {"layers.1.proj": 4}, {"layers.1.proj": 7.0}),
    ("dotted-10", {"layers.10.proj": 4}, {"layers.10.out_proj": 7.0}),
    ("regex", {r"layers\.1\d*\.proj": 4}, {r"fc\d": 7.0}),
    ("suffix-proj-not-out_proj", {"proj": 4}, {"out_proj": 7.0}),
    ("omegaconf", OmegaConf.create({"fc": 4}), OmegaConf.create({"layers.1.out_proj": 7.0})),
]


@pytest.mark.parametrize("rank_pattern, alpha_pattern", [c[1:] for c in PATTERNS], ids=[c[0] for c in PATTERNS])
@pytest.mark.parametrize("method", ["lora", "loha", "lokr"])
def test_rank_and_alpha_patterns_equal_peft(method, rank_pattern, alpha_pattern) -> None:
    """Per-module r and alpha equal what PEFT assigns from the same patterns (read from its layers)."""
    import peft

    ours_cls, peft_cls, alpha_name = {
        "lora": (la.LoRAConfig, peft.LoraConfig, "lora_alpha"),
        "loha": (la.LoHaConfig, peft.LoHaConfig, "alpha"),
        "lokr": (la.LoKrConfig, peft.LoKrConfig, "alpha"),
    }[method]
    ours = la.inject(
        _model(),
        ours_cls(r=2, alpha=3.0, target_modules="all-linear", rank_pattern=rank_pattern, alpha_pattern=alpha_pattern),
    )
    got = {name: (layer.r, layer.alpha) for name, _, layer in adapted_modules(ours)}
    peft_model = peft.get_peft_model(
        _model(),
        peft_cls(
            r=2,
            **{alpha_name: 3.0},
            target_modules="all-linear",
            rank_pattern=dict(rank_pattern),
            alpha_pattern=dict(alpha_pattern),
        ),
    )
    prefix = "base_model.model."
    expected = {}
    for n, m in peft_model.named_modules():
        if n.startswith(prefix) and hasattr(m, "r") and isinstance(m.r, dict):
            alpha = m.lora_alpha["default"] if method == "lora" else m.alpha["default"]
            expected[n[len(prefix) :]] = (m.r["default"], float(alpha))
    assert got == expected
    assert any(r == 4 for r, _ in got.values()) and any(a == 7.0 for _, a in got.values())


def test_saved_config_round_trips_each_form(tmp_path) -> None:
    """A regex target and a list exclude survive save_peft/load_peft unchanged and select the same modules."""
    cfg = la.LoRAConfig(r=2, target_modules=r"layers\.1\d*\.(proj|out_proj)", exclude_modules=["layers.10.out_proj"])
    ours = la.inject(_model(), cfg)
    la.save_peft(ours, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["target_modules"] == cfg.target_modules and saved["exclude_modules"] == ["layers.10.out_proj"]
    back = la.load_peft(copy.deepcopy(_model()), tmp_path)
    assert _adapted_names(back) == {"layers.1.proj", "layers.1.out_proj", "layers.10.proj"}


def _new_keys(make, inject) -> tuple[nn.Module, set[str]]:
    """The model after ``inject`` and the state-dict keys the injection added (the adapter tensors)."""
    model = make()
    before = set(model.state_dict())
    inject(model)
    return model, set(model.state_dict()) - before


def test_adapter_state_of_an_injection_into_a_submodule() -> None:
    """Injected into ``outer.sub``: keys and the ``modules_to_save`` prefix carry the ``sub.`` path."""

    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.sub = _model()
            self.fc = nn.Linear(6, 6)  # the same leaf name as the saved module inside sub, outside the record

    model, added = _new_keys(
        Outer, lambda m: la.inject(m.sub, la.LoRAConfig(r=2, target_modules=["layers.1.proj"], modules_to_save=["fc"]))
    )
    assert added == {"sub.layers.1.proj.adapter.default.lora_A", "sub.layers.1.proj.adapter.default.lora_B"}
    assert set(la.adapter_state_dict(model)) == added | {"sub.fc.weight", "sub.fc.bias"}


def test_adapter_state_of_an_adapted_root_module() -> None:
    """A bare ``nn.Linear`` selected by ``"all-linear"`` is adapted itself: its adapter keys have no parent path."""
    model, added = _new_keys(
        lambda: nn.Linear(6, 4), lambda m: la.inject(m, la.LoRAConfig(r=2, target_modules="all-linear"))
    )
    assert added == {"adapter.default.lora_A", "adapter.default.lora_B"}
    assert set(la.adapter_state_dict(model)) == added


def test_llama_adapter_state_is_exactly_its_prompts_and_gates() -> None:
    """Llama-Adapter keeps its tensors on holder modules (``trainable_modules``): they are the adapter state."""
    from tests.helpers import tiny_llama

    model, added = _new_keys(tiny_llama, lambda m: la.inject(m, la.LlamaAdapterConfig(adapter_len=2, adapter_layers=1)))
    assert len(added) == 2 and {k.rsplit(".", 1)[-1] for k in added} == {"adaption_prompt", "adaption_gate"}
    assert set(la.adapter_state_dict(model)) == added
    assert {n for n, p in model.named_parameters() if p.requires_grad} == added


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda bad: la.adapter_state_dict(bad), "adapter_state_dict"),
        (lambda bad: la.load_adapter_state_dict(bad, {}), "load_adapter_state_dict"),
    ],
    ids=["adapter_state_dict", "load_adapter_state_dict"],
)
def test_state_functions_name_themselves_for_a_non_module(call, name) -> None:
    with pytest.raises(la.AdapterError, match=rf"^{name}: model must be a torch.nn.Module instance, got dict"):
        call({"fc.weight": torch.zeros(1)})


def test_adapter_state_of_a_model_without_adapters_says_what_to_do() -> None:
    with pytest.raises(la.AdapterStateError, match=r"^model has no adapters; call lightning_adapters\.inject\(model"):
        la.adapter_state_dict(_model())


def test_numpy_scalars_are_taken_as_the_python_numbers_they_hold(tmp_path):
    """A sweep's numpy values (np.int64 rank, np.float32 alpha, np.bool_ flags) were refused as "r must be an integer
    > 0, got np.int64(4)"; PEFT takes them. They become plain Python numbers, so adapter_config.json is written."""
    import numpy as np

    cfg = la.LoRAConfig(
        r=np.int64(4),
        alpha=np.float32(8.0),
        dropout=np.float64(0.25),
        use_rslora=np.bool_(True),
        rank_pattern={"fc": np.int64(2)},
        target_modules=["fc"],
    )
    assert (cfg.r, cfg.alpha, cfg.dropout, cfg.use_rslora, cfg.rank_pattern) == (4, 8.0, 0.25, True, {"fc": 2})
    assert [type(v) for v in (cfg.r, cfg.alpha, cfg.use_rslora, cfg.rank_pattern["fc"])] == [int, float, bool, int]
    net = nn.Module()
    net.fc = nn.Linear(4, 4)
    la.inject(net, cfg)
    la.save_peft(net, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["rank_pattern"] == {"fc": 2}
    with pytest.raises(la.AdapterConfigError, match=r"r must be an integer > 0, got 2.5"):
        la.LoRAConfig(r=np.float64(2.5), target_modules=["fc"])
