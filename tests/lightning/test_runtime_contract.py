"""Contract tests of ``lightning_adapters.lightning.runtime``, called directly (no Trainer).

Every function of the runtime is pinned branch by branch against values written out here: the exact options a
mixin module's ``adapter_*`` attributes give, the exact checkpoint entry and kept keys, the exact state each hook
leaves behind, the warnings and messages emitted. Trainers and strategies are small stand-ins.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from lightning.pytorch import LightningModule
from torch.distributed.fsdp import FullyShardedDataParallel

import lightning_adapters as la
from lightning_adapters.core.inject import known_names, summary
from lightning_adapters.core.named import active, set_active, set_trainable, trainable
from lightning_adapters.core.state import base_fingerprint
from lightning_adapters.errors import AdapterConfigError, AdapterStateError, TargetError
from lightning_adapters.lightning import runtime as rt
from lightning_adapters.lightning.callback import swap_class
from lightning_adapters.lightning.checkpoint import METADATA_KEY
from lightning_adapters.lightning.runtime import (
    RUNTIME_ATTR,
    AdapterOptions,
    AdapterRuntime,
    adapter_list,
    adapter_sources,
    as_config,
    attach_runtime,
    detach_runtime,
    get_runtime,
)
from tests.lightning.models import mlp_lora, tiny_mlp


def _lm(**children: torch.nn.Module) -> LightningModule:
    lm = LightningModule()
    for name, child in children.items():
        setattr(lm, name, child)
    return lm


def _whole_mlp() -> LightningModule:
    """``tiny_mlp()``'s layers as the LightningModule's own children."""
    lm = LightningModule()
    for name, child in tiny_mlp().named_children():
        lm.add_module(name, child)
    return lm


def _runtime(config: Any = None, **options: Any) -> AdapterRuntime:
    options.setdefault("verbose", False)
    return AdapterRuntime(mlp_lora() if config is None else config, AdapterOptions(**options))


class _Strategy:
    """Records broadcasts; answers with rank zero's value."""

    def __init__(self) -> None:
        self.precision_plugin = SimpleNamespace(convert_module=lambda m: m)
        self.broadcasts: list[Any] = []

    def broadcast(self, obj: Any) -> str:
        self.broadcasts.append(obj)
        return "rank-zero-fingerprint"


def _shapes_default(prefix: str = "model.") -> dict[str, list[int]]:
    return {
        f"{prefix}0.adapter.default.lora_A": [2, 6],
        f"{prefix}0.adapter.default.lora_B": [8, 2],
        f"{prefix}2.adapter.default.lora_A": [2, 8],
        f"{prefix}2.adapter.default.lora_B": [4, 2],
    }


def _peft_dir(tmp_path: Path, name: str, config: la.LoRAConfig, seed: int = 1) -> tuple[Path, dict[str, Any]]:
    """A PEFT directory of one adapter trained on ``tiny_mlp()``'s base; returns it and the adapter's tensors."""
    model = tiny_mlp()
    la.inject(model, config, name=name)
    torch.manual_seed(seed)
    with torch.no_grad():
        for k, v in la.adapter_state_dict(model).items():
            model.get_parameter(k).copy_(torch.randn_like(v))
    directory = tmp_path / f"peft_{name}"
    la.save_peft(model, directory)
    return directory, {k: v.clone() for k, v in la.adapter_state_dict(model).items()}


# ------------------------------------------------------------------------------------------------------------
# Configs, sources and name lists as given


def test_as_config_accepts_a_config_a_method_mapping_and_a_class_path_exactly() -> None:
    config = la.LoRAConfig(r=3)
    assert as_config(config) is config
    assert as_config({"method": "LoRA", "r": 5, "target_modules": ["fc"]}) == la.LoRAConfig(r=5, target_modules=["fc"])
    assert as_config({"method": "loha", "r": 4}) == la.LoHaConfig(r=4)
    given = {"class_path": "lightning_adapters.methods.lora.LoRAConfig", "init_args": {"alpha": 7}}
    assert as_config(given) == la.LoRAConfig(alpha=7)
    assert given == {"class_path": "lightning_adapters.methods.lora.LoRAConfig", "init_args": {"alpha": 7}}
    assert as_config({"class_path": "LoKrConfig"}) == la.LoKrConfig()
    assert as_config({"class_path": "LoRAConfig", "init_args": None}) == la.LoRAConfig()
    assert as_config({"class_path": "LoRAConfig", "init_args": {}}) == la.LoRAConfig()


def test_as_config_refusals_name_what_is_wrong() -> None:
    with pytest.raises(AdapterConfigError, match="^expected an adapter config such as LoRAConfig"):
        as_config("lora")
    with pytest.raises(AdapterConfigError, match=r"^unexpected keys \['r', 'z'\] next to class_path"):
        as_config({"class_path": "LoRAConfig", "z": 1, "r": 2, "init_args": {}})
    with pytest.raises(AdapterConfigError, match="^init_args of LoRAConfig must be a mapping of its fields"):
        as_config({"class_path": "LoRAConfig", "init_args": [1]})
    with pytest.raises(AdapterConfigError, match="^an adapter config given as a mapping needs 'method'"):
        as_config({"r": 2})
    with pytest.raises(
        AdapterConfigError,
        match=r"^LoRAConfig has no field \['a', 'zz'\]; its fields are \['target_modules', 'exclude_modules',",
    ):
        as_config({"method": "lora", "zz": 1, "a": 2, "r": 3})
    with pytest.raises(AdapterConfigError, match="^unknown adapter method 5"):
        as_config({"method": 5})


@pytest.mark.parametrize(
    "path",
    [5, "", "lightning_adapters.nosuchmodule.LoRAConfig", "lightning_adapters.config.AdapterConfig", "os.path"],
)
def test_a_class_path_that_is_no_adapter_config_class_is_refused(path: Any) -> None:
    want = "^class_path must be the name" if not isinstance(path, str) or not path else "is not an adapter config"
    with pytest.raises(AdapterConfigError, match=want):
        as_config({"class_path": path})


def test_adapter_sources_are_checked_paths_keyed_by_adapter_name(tmp_path) -> None:
    ckpt = tmp_path / "a.ckpt"
    ckpt.write_bytes(b"")
    assert adapter_sources(None, "x") == {}
    assert adapter_sources(str(ckpt), "b") == {"b": str(ckpt)}
    assert adapter_sources(ckpt, "b") == {"b": str(ckpt)}
    got = adapter_sources({"a": ckpt, "c": str(ckpt)}, "b")
    assert got == {"a": str(ckpt), "c": str(ckpt)} and all(type(v) is str for v in got.values())
    with pytest.raises(AdapterConfigError, match="^init_from must be a path or a mapping"):
        adapter_sources([str(ckpt)], "b")
    with pytest.raises(AdapterConfigError, match="^init_from: adapter name 'a b' is not usable"):
        adapter_sources({"a b": ckpt}, "x")
    with pytest.raises(AdapterConfigError, match=r"^init_from\['a'\] = '.*missing' is neither a PEFT directory"):
        adapter_sources({"a": tmp_path / "missing"}, "x")
    with pytest.raises(AdapterConfigError, match=r"^init_from\['a'\] must be the path"):
        adapter_sources({"a": 3}, "x")


def test_adapter_list_is_none_or_a_fresh_list_of_names() -> None:
    assert adapter_list(None, "save") is None
    assert adapter_list("a", "save") == ["a"]
    given = ("a", "b")
    got = adapter_list(given, "save")
    assert got == ["a", "b"] and type(got) is list
    names = ["a"]
    assert adapter_list(names, "save") == ["a"] and adapter_list(names, "save") is not names
    for bad in (5, ["a", 1], {"a": 1}):
        with pytest.raises(AdapterConfigError, match="^active must be an adapter name or a list of them"):
            adapter_list(bad, "active")


def test_has_dtensor_looks_for_a_device_mesh_on_any_parameter() -> None:
    model = tiny_mlp()
    assert rt._has_dtensor(model) is False
    model[2].bias.device_mesh = None
    assert rt._has_dtensor(model) is True


# ------------------------------------------------------------------------------------------------------------
# The runtime's state and where the adapter lives


def test_a_new_runtime_starts_empty() -> None:
    options = AdapterOptions()
    runtime = AdapterRuntime({"method": "lora", "r": 3}, options)
    assert runtime.config == la.LoRAConfig(r=3) and runtime.inject_config is runtime.config
    assert runtime.options is options
    assert runtime.outside_keys == set() and runtime.outside_prefixes == []
    assert runtime.attached is None and runtime.fingerprint is None and runtime._prepared is None
    assert runtime.shapes == {} and runtime.hooks is None and runtime.pending_hooks_state is None
    assert runtime.manual_regularization is False and runtime.grads_checked is False
    assert runtime.last_step == 0 and type(runtime.last_step) is int
    assert runtime._warned == set()
    assert runtime.schedule is None and runtime.loss_term() is None
    assert runtime.hooks_state() == {"training_hooks": None}
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        runtime.warn_once("k", "message")  # _warned is a set
    assert runtime._warned == {"k"}
    assert AdapterRuntime(None, AdapterOptions()).config is None


def test_target_key_prefix_and_injected_target() -> None:
    lm = _lm(model=tiny_mlp())
    whole = _runtime()
    assert whole.target(lm) is lm and whole.key_prefix() == ""
    assert _runtime(module="").target(lm) is lm and _runtime(module="").key_prefix() == ""
    sub = _runtime(module="model")
    assert sub.target(lm) is lm.model and sub.key_prefix() == "model."
    assert _runtime(module="model.2").target(lm) is lm.model[2]
    missing = _runtime(module="encoder")
    assert missing.target(lm) is None
    with pytest.raises(AdapterStateError, match="^the LightningModule has no adapters yet"):
        missing.injected_target(lm)
    with pytest.raises(AdapterStateError, match="^the LightningModule has no adapters yet"):
        sub.injected_target(lm)
    la.inject(lm.model, mlp_lora())
    assert sub.injected_target(lm) is lm.model


def test_adapter_key_prefixes_leave_out_wrapper_attributes_and_keep_the_module_prefix() -> None:
    lm = _lm(model=torch.nn.Module())
    lm.model._fsdp_wrapped_module = torch.nn.Module()
    lm.model._fsdp_wrapped_module._orig_mod = torch.nn.Module()
    lm.model._fsdp_wrapped_module._orig_mod.layer = torch.nn.Module()
    lm.model._fsdp_wrapped_module._orig_mod.layer._checkpoint_wrapped_module = tiny_mlp()
    la.inject(lm.model, mlp_lora(target_modules=["0"]))
    la.inject(lm.model, mlp_lora(target_modules=["2"]), name="b")
    runtime = _runtime(module="model")
    # FSDP1's and activation checkpointing's attributes are left out, as their state-dict hooks do; a torch.compile
    # wrapper's ``_orig_mod`` stays, as in every state dict of a module holding a compiled sub-module.
    want = ["model._orig_mod.layer.0.adapter.default.", "model._orig_mod.layer.2.adapter.b."]
    assert runtime.adapter_key_prefixes(lm) == want
    assert runtime.adapter_key_prefixes(lm, ["b"]) == want[1:]
    assert _runtime().adapter_key_prefixes(lm, ["default"]) == ["model._orig_mod.layer.0.adapter.default."]


def test_saved_names_keys_and_records_follow_the_save_option() -> None:
    lm = _lm(model=tiny_mlp(), head=torch.nn.Linear(4, 2))
    la.inject(lm.model, mlp_lora())
    la.inject(lm.model, la.LoRAConfig(r=3, target_modules=["2"]), name="b")
    both = _runtime(module="model")
    assert both.saved_names(lm) == ["default", "b"]
    only = _runtime(module="model", save=["default"])
    assert only.saved_names(lm) == ["default"]
    assert _runtime(module="model", save=["b", "default"]).saved_names(lm) == ["default", "b"]
    only.outside_keys, only.outside_prefixes = {"head.weight"}, ["extra."]
    keys = [*lm.state_dict(), "extra.x", "other.x"]
    assert [k for k in keys if only.saved_keys(lm)(k)] == [
        "model.0.adapter.default.lora_A",
        "model.0.adapter.default.lora_B",
        "model.2.adapter.default.lora_A",
        "model.2.adapter.default.lora_B",
        "head.weight",
        "extra.x",
    ]
    assert [k for k in keys if only.saved_keys(lm, ["b"])(k)] == [
        "model.2.adapter.b.lora_A",
        "model.2.adapter.b.lora_B",
        "head.weight",
        "extra.x",
    ]
    assert [k for k in keys if both.saved_keys(lm)(k)] == [k for k in lm.state_dict() if ".adapter." in k]
    assert both.record(lm.model).name == "default" and both.record(lm.model).config == mlp_lora()
    assert both.record(lm.model, "b").name == "b" and both.record(lm.model, "b").config.r == 3
    named = _runtime(module="model", name="b")
    assert named.record(lm.model).name == "b"


# ------------------------------------------------------------------------------------------------------------
# Injection


def test_inject_into_a_sub_module_not_built_yet() -> None:
    lm = _lm(other=torch.nn.Linear(2, 2))
    runtime = _runtime(module="model")
    assert runtime.inject(lm, defer=True) is False
    with pytest.raises(AdapterConfigError, match=r"^AdapterCallback\(module='model'\): .*sub-modules: \['other'\]\)"):
        runtime.inject(lm)
    with pytest.raises(AdapterConfigError, match="has no sub-module of that name"):
        runtime.inject(lm, defer=False)


def test_inject_sets_up_the_adapter_the_fingerprint_and_the_shapes() -> None:
    lm = _lm(model=tiny_mlp())
    lm.strict_loading = True
    strategy = _Strategy()
    runtime = _runtime(module="model")
    assert runtime.inject(lm) is True
    assert known_names(lm.model) == ["default"] and runtime._prepared is lm.model
    assert lm.strict_loading is False
    assert runtime.fingerprint == base_fingerprint(tiny_mlp())
    assert runtime.shapes == _shapes_default()
    assert runtime.outside_keys == set() and runtime.outside_prefixes == []
    assert [n for n, p in lm.named_parameters() if p.requires_grad] == list(_shapes_default())
    # Under a trainer the fingerprint is rank zero's.
    lm2 = _lm(model=tiny_mlp())
    lm2._trainer = SimpleNamespace(strategy=strategy)
    runtime2 = _runtime(module="model")
    assert runtime2.inject(lm2) is True
    assert strategy.broadcasts == [base_fingerprint(tiny_mlp())]
    assert runtime2.fingerprint == "rank-zero-fingerprint"


def test_inject_reports_the_summary_when_verbose(monkeypatch) -> None:
    messages: list[str] = []
    monkeypatch.setattr(rt, "_rank_zero_info", messages.append)
    lm = _lm(model=tiny_mlp())
    runtime = AdapterRuntime(mlp_lora(), AdapterOptions(module="model"))
    runtime.inject(lm)
    assert messages == ["lightning_adapters: injected LoRAConfig as 'default'\n" + summary(lm.model)]
    messages.clear()
    lm = _lm(model=tiny_mlp(), head=torch.nn.Linear(4, 2))
    lm.head.requires_grad_(False)
    runtime = AdapterRuntime(mlp_lora(modules_to_save=["head"]), AdapterOptions(module="model", name="t"))
    runtime.inject(lm)
    assert messages == [
        "lightning_adapters: injected LoRAConfig as 't'\n"
        + summary(lm.model)
        + "\ntrained in full beside 'model': ['head.bias', 'head.weight', 'head.']"
    ]
    messages.clear()
    _runtime(module="model").inject(_lm(model=tiny_mlp()))
    assert messages == []


def test_modules_to_save_beside_the_sub_module_train_in_full_and_are_saved() -> None:
    lm = _lm(model=tiny_mlp(), head=torch.nn.Linear(4, 2), frozen=torch.nn.Linear(2, 2))
    lm.head.requires_grad_(False)
    lm.frozen.requires_grad_(False)
    config = mlp_lora(modules_to_save=["head"])
    runtime = _runtime(config, module="model")
    assert runtime.inject(lm) is True
    assert runtime.inject_config == mlp_lora() and runtime.config is config
    assert lm.head.weight.requires_grad and lm.head.bias.requires_grad and not lm.frozen.weight.requires_grad
    assert runtime.outside_keys == {"head.weight", "head.bias"} and runtime.outside_prefixes == ["head."]
    assert runtime.shapes == {**_shapes_default(), "head.weight": [2, 4], "head.bias": [2]}
    assert runtime.inject(lm) is True  # again: the same state
    assert runtime.outside_keys == {"head.weight", "head.bias"} and runtime.outside_prefixes == ["head."]


def test_modules_to_save_matching_nothing_defers_or_raises() -> None:
    lm = _lm(model=tiny_mlp())
    runtime = _runtime(mlp_lora(modules_to_save=["nowhere"]), module="model")
    assert runtime.inject(lm, defer=True) is False
    with pytest.raises(TargetError, match=r"^modules_to_save entries \['nowhere'\] match no module"):
        runtime.inject(lm)
    assert known_names(lm) == []


def test_target_modules_matching_nothing_defers_or_raises() -> None:
    lm = _lm(model=tiny_mlp())
    runtime = _runtime(mlp_lora(target_modules=["nowhere"]), module="model")
    assert runtime.inject(lm, defer=True) is False
    with pytest.raises(TargetError):
        runtime.inject(lm)
    assert runtime._prepared is None


def test_inject_adopts_an_adapter_the_user_injected_once() -> None:
    lm = _lm(model=tiny_mlp())
    la.inject(lm.model, mlp_lora(), name="t")
    lm.model[0].weight.requires_grad_(True)
    runtime = _runtime(module="model", name="t")
    assert runtime.inject(lm) is True
    assert known_names(lm.model) == ["t"] and runtime._prepared is lm.model
    assert lm.model[0].weight.requires_grad is False  # trainability applied again
    assert runtime.fingerprint == base_fingerprint(tiny_mlp()) and runtime.shapes == {
        k.replace("default", "t"): v for k, v in _shapes_default().items()
    }
    runtime.fingerprint = "kept"
    lm.model[2].weight.requires_grad_(True)
    assert runtime.inject(lm) is True  # prepared already: nothing recomputed, trainability applied
    assert runtime.fingerprint == "kept" and lm.model[2].weight.requires_grad is False
    with pytest.raises(AdapterConfigError):
        _runtime(la.LoRAConfig(r=4, target_modules=["0"]), module="model", name="t").inject(lm)


def test_the_sharded_check_and_the_precision_plugin_quantization() -> None:
    class BitsandbytesPrecision:
        def __init__(self) -> None:
            self.converted: list[Any] = []

        def convert_module(self, module: torch.nn.Module) -> torch.nn.Module:
            self.converted.append(module)
            return module

    lm = _lm(model=tiny_mlp())
    strategy = _Strategy()
    strategy.precision_plugin = BitsandbytesPrecision()
    lm._trainer = SimpleNamespace(strategy=strategy)
    assert _runtime(module="model").inject(lm) is True
    assert strategy.precision_plugin.converted == [lm]
    lm = _lm(model=tiny_mlp())
    lm.model[0].weight.device_mesh = None
    with pytest.raises(AdapterConfigError, match="^the model was sharded"):
        _runtime(module="model").inject(lm)


def test_init_from_loads_the_sources_and_takes_the_trained_adapters_config(tmp_path) -> None:
    config_a = la.LoRAConfig(r=3, target_modules=["2"], init_weights=False)
    source, tensors = _peft_dir(tmp_path, "a", config_a)
    lm = _lm(model=tiny_mlp())
    runtime = _runtime(module="model", init_from={"a": str(source)})
    assert runtime.inject(lm) is True
    assert known_names(lm.model) == ["a", "default"]
    assert active(lm.model) == ["a", "default"] and trainable(lm.model) == ["default"]
    state = la.adapter_state_dict(lm.model)
    for k, v in tensors.items():
        assert torch.equal(state[k], v), k
    assert la.config_of(lm.model, "a") == config_a
    assert runtime.inject(lm) is True and known_names(lm.model) == ["a", "default"]  # not loaded twice
    # The trained adapter itself from a source: its config, or a refusal of another one.
    lm = _lm(model=tiny_mlp())
    runtime = AdapterRuntime(
        None, AdapterOptions(module="model", name="a", init_from={"a": str(source)}, verbose=False)
    )
    assert runtime.inject(lm) is True
    assert runtime.config == config_a and trainable(lm.model) == ["a"]
    same = _runtime(config_a, module="model", name="a", init_from={"a": str(source)})
    assert same.inject(_lm(model=tiny_mlp())) is True and same.config is config_a
    other = _runtime(la.LoRAConfig(r=4, target_modules=["2"]), module="model", name="a", init_from={"a": str(source)})
    with pytest.raises(AdapterConfigError, match="^adapter 'a' loaded from .* has the config"):
        other.inject(_lm(model=tiny_mlp()))
    loha = _runtime(la.LoHaConfig(r=3, target_modules=["2"]), module="model", name="a", init_from={"a": str(source)})
    with pytest.raises(AdapterConfigError, match="^adapter 'a' loaded from .* has the config"):
        loha.inject(_lm(model=tiny_mlp()))


def test_init_from_is_not_loaded_into_a_sharded_module(tmp_path) -> None:
    source, _ = _peft_dir(tmp_path, "a", la.LoRAConfig(r=3, target_modules=["2"]))
    lm = _lm(model=tiny_mlp())
    la.inject(lm.model, mlp_lora())
    lm.model[0].weight.device_mesh = None
    runtime = _runtime(module="model", init_from={"a": str(source)})
    assert runtime.inject(lm) is True
    assert known_names(lm.model) == ["default"]


def test_roles_train_the_named_adapter_and_make_the_chosen_ones_act() -> None:
    def two(**options: Any) -> tuple[LightningModule, AdapterRuntime]:
        lm = _lm(model=tiny_mlp())
        la.inject(lm.model, la.LoRAConfig(r=3, target_modules=["2"]), name="b")
        return lm, _runtime(module="model", **options)

    lm, runtime = two()
    runtime.inject(lm)
    assert active(lm.model) == ["b", "default"] and trainable(lm.model) == ["default"]
    lm, runtime = two(active=["default"], save=["default"])
    runtime.inject(lm)
    assert active(lm.model) == ["default"] and trainable(lm.model) == ["default"]
    lm, runtime = two(save=["b"])
    with pytest.raises(AdapterConfigError, match=r"^AdapterCallback\(save=\['b'\]\) leaves out the adapter it trains"):
        runtime.inject(lm)
    lm, runtime = two(save=["default", "c"])
    with pytest.raises(AdapterConfigError, match=r"^AdapterCallback\(save=\.\.\.\)"):
        runtime.inject(lm)
    lm, runtime = two(active=["c"])
    with pytest.raises(AdapterConfigError) as err:
        runtime.inject(lm)
    assert "act together unless told otherwise" not in str(err.value)


def test_every_adapter_acting_together_is_refused_with_the_active_hint() -> None:
    lm = _lm(model=tiny_mlp())
    la.inject(lm.model, la.OFTConfig(r=0, oft_block_size=4, target_modules=["2"]), name="b")
    runtime = _runtime(module="model")
    with pytest.raises(AdapterConfigError, match=r"AdapterCallback makes every adapter of the module act together"):
        runtime.inject(lm)


def test_gradient_checkpointing_needs_a_transformers_model() -> None:
    runtime = _runtime(module="model", gradient_checkpointing=True)
    with pytest.raises(AdapterConfigError, match="^gradient_checkpointing=True needs a transformers model; Sequential"):
        runtime.inject(_lm(model=tiny_mlp()))


_FROZEN_HEAD = (
    "lightning_adapters: 'head' (Linear, 10 parameters) was trainable before injection and is now frozen at its "
    "current values: it holds no adapter and is not in modules_to_save, so it never trains. If this is a new task "
    "head, train it in full: modules_to_save=['head'] in the config, or adapt only the backbone with "
    "AdapterCallback(config, module='<backbone attribute>') (AdapterMixin: adapter_module), which trains and "
    "checkpoints everything beside it that requires grad. If it is meant to stay frozen, call requires_grad_(False) "
    "on it in __init__ and this warning goes away"
)


def test_a_task_head_frozen_by_a_whole_module_injection_is_warned_about_once() -> None:
    lm = _lm(body=torch.nn.Linear(4, 4), head=torch.nn.Linear(4, 2))
    runtime = _runtime(la.LoRAConfig(r=2, target_modules=["body"]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runtime.inject(lm)
        runtime._prepared = None
        runtime.inject(lm)
    assert [str(w.message) for w in caught] == [_FROZEN_HEAD]
    assert runtime._warned == {"frozen-parts"}


def test_no_frozen_part_warning_inside_a_sub_module_or_without_one() -> None:
    lm = _lm(model=tiny_mlp())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runtime = _runtime(mlp_lora(target_modules=["0"]), module="model")
        runtime.inject(lm)
        whole = _runtime(la.LoRAConfig(r=2, target_modules=["0", "2"]))
        whole.inject(_whole_mlp())
    assert [str(w.message) for w in caught] == []
    assert runtime._warned == set() and whole._warned == set()


def test_local_fingerprint_is_none_on_the_meta_device() -> None:
    assert AdapterRuntime._local_fingerprint(tiny_mlp()) == base_fingerprint(tiny_mlp())
    with torch.device("meta"):
        meta = torch.nn.Linear(2, 2)
    assert AdapterRuntime._local_fingerprint(meta) is None


def test_after_configure_model_injects_initializes_from_data_and_prepares_the_strategy() -> None:
    from lightning.pytorch.trainer.states import TrainerFn

    config = la.LoRAConfig(r=2, target_modules=["0"], init_weights="eva", eva_tau=0.95, init_batches=2)
    batches = [torch.randn(5, 6, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    strategy = _Strategy()
    source = SimpleNamespace(is_defined=lambda: True, dataloader=lambda: batches)
    trainer = SimpleNamespace(
        strategy=strategy,
        state=SimpleNamespace(fn=TrainerFn.FITTING),
        fit_loop=SimpleNamespace(_data_source=source),
        global_rank=0,
        world_size=1,
    )
    lm = _lm(model=tiny_mlp())
    lm._trainer = trainer
    runtime = _runtime(config, module="model")
    runtime.after_configure_model(lm)
    assert strategy.__dict__.get("_la_prepared") is True
    assert strategy.precision_plugin.__dict__.get("_la_dtype_policy") is True
    want = la.inject(tiny_mlp(), config)
    la.initialize_from_data(want, batches[:2])
    got = la.adapter_state_dict(lm.model)
    assert got.keys() == la.adapter_state_dict(want).keys()
    for k, v in la.adapter_state_dict(want).items():
        assert torch.equal(got[k], v), k
    # Without a trainer: injection only.
    lm = _lm(model=tiny_mlp())
    _runtime(module="model").after_configure_model(lm)
    assert known_names(lm.model) == ["default"]


@pytest.mark.parametrize("merged", [None, "out"])
def test_after_configure_model_refuses_a_merged_export_under_fsdp(merged: str | None) -> None:
    from lightning.pytorch.strategies import FSDPStrategy

    strategy = FSDPStrategy()
    lm = _lm(model=tiny_mlp())
    lm._trainer = SimpleNamespace(strategy=strategy)
    runtime = _runtime(module="model", export_merged_dir=merged)
    if merged is None:
        runtime.after_configure_model(lm)
        assert strategy.__dict__.get("_la_prepared") is True
    else:
        with pytest.raises(AdapterConfigError, match="^export_merged_dir is not supported under FSDPStrategy"):
            runtime.after_configure_model(lm)


def test_after_configure_model_refuses_tensor_parallelism_the_model_did_not_apply() -> None:
    from lightning.pytorch.strategies import ModelParallelStrategy

    strategy = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2)
    strategy._save_distributed_checkpoint = False
    strategy._device_mesh = {"tensor_parallel": SimpleNamespace(size=lambda: 2)}
    lm = _lm(model=tiny_mlp())
    lm._trainer = SimpleNamespace(strategy=strategy)
    with pytest.raises(AdapterConfigError, match="^ModelParallelStrategy: configure_model did not shard the model"):
        _runtime(module="model").after_configure_model(lm)


# ------------------------------------------------------------------------------------------------------------
# Checkpoints


def _two_adapter_module(**options: Any) -> tuple[LightningModule, AdapterRuntime]:
    lm = _lm(model=tiny_mlp(), head=torch.nn.Linear(4, 2))
    lm.head.requires_grad_(False)
    la.inject(lm.model, la.LoRAConfig(r=3, target_modules=["2"], init_weights=False), name="b")
    runtime = _runtime(mlp_lora(modules_to_save=["head"]), module="model", **options)
    runtime.inject(lm)
    return lm, runtime


def test_on_save_checkpoint_keeps_the_adapters_and_what_trains_beside_them() -> None:
    lm, runtime = _two_adapter_module(save=["default"])
    runtime.fingerprint = None  # taken at the first save then
    checkpoint = {"state_dict": lm.state_dict(), "epoch": 3}
    runtime.on_save_checkpoint(lm, checkpoint)
    shapes = {**_shapes_default(), "head.weight": [2, 4], "head.bias": [2]}
    assert sorted(checkpoint) == ["epoch", "lightning_adapters", "state_dict"] and checkpoint["epoch"] == 3
    assert list(checkpoint["state_dict"]) == [k for k in lm.state_dict() if k in shapes]
    assert checkpoint[METADATA_KEY] == {
        "format": 2,
        "library_version": la.__version__,
        "method": "lora",
        "config": mlp_lora(modules_to_save=["head"]).to_dict(),
        "module": "model",
        "name": "default",
        "adapters": {"default": {"method": "lora", "config": mlp_lora(modules_to_save=["head"]).to_dict()}},
        "active": ["b", "default"],
        "trainable": ["default"],
        "base_fingerprint": base_fingerprint(tiny_mlp()),
        "adapter_shapes": shapes,
    }
    assert runtime.fingerprint == base_fingerprint(tiny_mlp())
    lm, runtime = _two_adapter_module()
    runtime.fingerprint = "given"
    checkpoint = {"state_dict": lm.state_dict()}
    runtime.on_save_checkpoint(lm, checkpoint)
    meta = checkpoint[METADATA_KEY]
    assert meta["base_fingerprint"] == "given" and runtime.fingerprint == "given"
    assert meta["adapters"] == {
        "b": {"method": "lora", "config": la.LoRAConfig(r=3, target_modules=["2"], init_weights=False).to_dict()},
        "default": {"method": "lora", "config": mlp_lora(modules_to_save=["head"]).to_dict()},
    }
    assert list(meta["adapters"]) == ["b", "default"]
    assert sorted(checkpoint["state_dict"]) == sorted([*shapes, "model.2.adapter.b.lora_A", "model.2.adapter.b.lora_B"])


def test_on_save_checkpoint_of_a_whole_module_writes_an_empty_module_name() -> None:
    model = _whole_mlp()
    runtime = _runtime()
    runtime.inject(model)
    assert runtime.outside_keys == set() and runtime.outside_prefixes == []  # nothing lies beside the whole module
    checkpoint = {"state_dict": model.state_dict()}
    runtime.on_save_checkpoint(model, checkpoint)
    assert checkpoint[METADATA_KEY]["module"] == ""
    assert checkpoint[METADATA_KEY]["adapter_shapes"] == _shapes_default("")
    assert sorted(checkpoint["state_dict"]) == sorted(_shapes_default(""))


def test_on_load_checkpoint_restores_the_roles_and_checks_the_base_and_shapes() -> None:
    lm, runtime = _two_adapter_module()
    set_active(lm.model, ["b"])
    set_trainable(lm.model, ["b"])
    checkpoint = {"state_dict": lm.state_dict()}
    runtime.on_save_checkpoint(lm, checkpoint)
    set_active(lm.model, ["default"])
    set_trainable(lm.model, ["default"])
    runtime.on_load_checkpoint(lm, checkpoint)
    assert (active(lm.model), trainable(lm.model)) == (["b"], ["b"])
    # Without the roles in the entry (an older file): left as they are.
    partial = {**checkpoint, METADATA_KEY: {k: v for k, v in checkpoint[METADATA_KEY].items() if k != "trainable"}}
    set_active(lm.model, ["default"])
    set_trainable(lm.model, ["default"])
    runtime.on_load_checkpoint(lm, partial)
    assert (active(lm.model), trainable(lm.model)) == (["default"], ["default"])
    partial = {**checkpoint, METADATA_KEY: {k: v for k, v in checkpoint[METADATA_KEY].items() if k != "active"}}
    runtime.on_load_checkpoint(lm, partial)
    assert (active(lm.model), trainable(lm.model)) == (["default"], ["default"])
    # Roles naming an adapter the model lacks.
    unknown = {**checkpoint, METADATA_KEY: {**checkpoint[METADATA_KEY], "trainable": ["c"]}}
    with pytest.raises(
        AdapterStateError, match=r"^the checkpoint's adapters \['b'\] act and \['c'\] train.*no \['c'\]"
    ):
        runtime.on_load_checkpoint(lm, unknown)
    unknown = {**checkpoint, METADATA_KEY: {**checkpoint[METADATA_KEY], "active": ["d", "b"]}}
    with pytest.raises(AdapterStateError, match=r"this model has no \['d'\] \(it has \['b', 'default'\]\)"):
        runtime.on_load_checkpoint(lm, unknown)
    # Another base.
    runtime.fingerprint = "another base"
    with pytest.raises(AdapterStateError):
        runtime.on_load_checkpoint(lm, {**checkpoint})
    runtime.fingerprint = checkpoint[METADATA_KEY]["base_fingerprint"]
    # A tensor of another shape.
    bad = {**checkpoint, "state_dict": dict(checkpoint["state_dict"])}
    bad["state_dict"]["model.0.adapter.default.lora_A"] = torch.zeros(5, 6)
    with pytest.raises(AdapterStateError, match="model.0.adapter.default.lora_A"):
        runtime.on_load_checkpoint(lm, bad)


def test_a_checkpoint_of_some_adapters_loads_into_a_runtime_saving_all() -> None:
    lm, runtime = _two_adapter_module(save=["default"])
    checkpoint = {"state_dict": lm.state_dict()}
    runtime.on_save_checkpoint(lm, checkpoint)
    runtime.options.save = None
    runtime.on_load_checkpoint(lm, checkpoint)
    assert (active(lm.model), trainable(lm.model)) == (["b", "default"], ["default"])


class _FSDP1Unit(FullyShardedDataParallel):
    """Matches ``isinstance(m, FullyShardedDataParallel)`` and is otherwise a plain empty module."""

    __init__ = torch.nn.Module.__init__
    __getattr__ = torch.nn.Module.__getattr__
    named_parameters = torch.nn.Module.named_parameters
    named_buffers = torch.nn.Module.named_buffers
    state_dict = torch.nn.Module.state_dict


def test_under_fsdp1_the_shapes_are_the_ones_recorded_at_injection() -> None:
    lm = _lm(model=tiny_mlp())
    runtime = _runtime(module="model")
    runtime.inject(lm)
    checkpoint = {"state_dict": lm.state_dict()}
    lm.unit = _FSDP1Unit()
    runtime.on_save_checkpoint(lm, checkpoint)
    assert checkpoint[METADATA_KEY]["adapter_shapes"] == _shapes_default()
    runtime.on_load_checkpoint(lm, checkpoint)
    runtime.shapes = {**_shapes_default(), "model.0.adapter.default.lora_A": [3, 6]}
    with pytest.raises(AdapterStateError, match="model.0.adapter.default.lora_A"):
        runtime.on_load_checkpoint(lm, checkpoint)
    lm = _lm(model=tiny_mlp(), unit=_FSDP1Unit())
    runtime = _runtime(module="model")
    runtime.shapes = {"recorded": [1]}
    runtime.inject(lm)
    assert runtime.shapes == {"recorded": [1]}


def test_on_load_checkpoint_refuses_another_config_of_an_untrained_adapter() -> None:
    lm, runtime = _two_adapter_module()
    checkpoint = {"state_dict": lm.state_dict()}
    runtime.on_save_checkpoint(lm, checkpoint)
    meta = checkpoint[METADATA_KEY]
    other = {
        **meta,
        "adapters": {
            **meta["adapters"],
            "b": {"method": "lora", "config": {**meta["adapters"]["b"]["config"], "alpha": 9}},
        },
    }
    with pytest.raises(AdapterStateError, match="alpha"):
        runtime.on_load_checkpoint(lm, {**checkpoint, METADATA_KEY: other})


# ------------------------------------------------------------------------------------------------------------
# Fit-time hooks


class _Hooks:
    """A stand-in ScheduleDriver."""

    schedule = "stand-in schedule"

    def __init__(self, term: torch.Tensor | None = None) -> None:
        self.term = term
        self.steps: list[tuple[Any, int]] = []
        self.loaded: list[dict[str, Any]] = []

    def loss_term(self) -> torch.Tensor | None:
        return self.term

    def on_optimizer_step_end(self, trainer: Any, step: int) -> None:
        self.steps.append((trainer, step))

    def state_dict(self) -> dict[str, Any]:
        return {"state": 1}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loaded.append(state)


def test_hook_state_is_kept_until_the_schedule_exists() -> None:
    runtime = _runtime()
    runtime.load_hooks_state({})
    runtime.load_hooks_state({"training_hooks": None})
    assert runtime.pending_hooks_state is None
    given = {"a": 1}
    runtime.load_hooks_state({"training_hooks": given})
    assert runtime.pending_hooks_state == {"a": 1} and runtime.pending_hooks_state is not given
    runtime.apply_pending_state()
    assert runtime.pending_hooks_state == {"a": 1}
    hooks = _Hooks()
    runtime.hooks = hooks
    runtime.apply_pending_state()
    assert hooks.loaded == [{"a": 1}] and runtime.pending_hooks_state is None
    runtime.apply_pending_state()
    assert hooks.loaded == [{"a": 1}]
    runtime.load_hooks_state({"training_hooks": {"b": 2}})
    assert hooks.loaded == [{"a": 1}, {"b": 2}] and runtime.pending_hooks_state is None
    assert runtime.hooks_state() == {"training_hooks": {"state": 1}}
    assert runtime.schedule == "stand-in schedule"


def test_after_batch_reports_each_optimizer_step_once() -> None:
    runtime = _runtime()
    trainer = SimpleNamespace(global_step=0)
    runtime.after_batch(trainer, None)
    assert runtime.last_step == 0
    trainer.global_step = 2
    runtime.after_batch(trainer, None)  # no schedule: the step is still counted
    assert runtime.last_step == 2
    hooks = _Hooks()
    runtime.hooks = hooks
    runtime.after_batch(trainer, None)
    trainer.global_step = 3
    runtime.after_batch(trainer, None)
    runtime.after_batch(trainer, None)
    trainer.global_step = 5
    runtime.after_batch(trainer, None)
    assert hooks.steps == [(trainer, 2), (trainer, 4)] and runtime.last_step == 5


def test_add_loss_term_adds_the_schedules_term_to_what_training_step_returned() -> None:
    auto = SimpleNamespace(automatic_optimization=True)
    runtime = _runtime()
    loss = torch.tensor(2.0)
    assert runtime.add_loss_term(auto, loss) is loss  # no schedule
    runtime.hooks = _Hooks(None)
    assert runtime.add_loss_term(auto, loss) is loss  # no term
    runtime.hooks = _Hooks(torch.tensor(0.25))
    assert runtime.loss_term().item() == 0.25
    assert runtime.add_loss_term(auto, loss).item() == 2.25
    out = {"loss": loss, "acc": 1}
    got = runtime.add_loss_term(auto, out)
    assert got["loss"].item() == 2.25 and got["acc"] == 1 and sorted(got) == ["acc", "loss"]
    assert out["loss"] is loss
    other = {"logits": loss}
    assert runtime.add_loss_term(auto, other) is other
    assert runtime.add_loss_term(auto, None) is None
    runtime.manual_regularization = True
    assert runtime.add_loss_term(auto, loss) is loss


def test_manual_optimization_gets_one_warning_and_its_output_back() -> None:
    runtime = _runtime()
    runtime.hooks = _Hooks(torch.tensor(0.5))
    manual = SimpleNamespace(automatic_optimization=False)
    loss = torch.tensor(1.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert runtime.add_loss_term(manual, loss) is loss
        assert runtime.add_loss_term(manual, loss) is loss
    assert [str(w.message) for w in caught] == [
        "the adapter method has a regularisation term, but with manual optimization training_step's return value is "
        "not backpropagated: add self.adapter_regularization() (AdapterMixin) to your loss"
    ]
    assert runtime._warned == {"manual-opt"}


def test_warn_once_warns_once_per_key() -> None:
    runtime = _runtime()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runtime.warn_once("a", "first")
        runtime.warn_once("a", "again")
        runtime.warn_once("b", "second")
    assert [str(w.message) for w in caught] == ["first", "second"]
    assert runtime._warned == {"a", "b"}


def test_start_fit_checks_the_optimizers_and_builds_the_schedule() -> None:
    from lightning_adapters.lightning.hooks import ScheduleDriver
    from lightning_adapters.methods.adalora import AdaLoRASchedule

    lm = _lm(model=tiny_mlp())
    runtime = _runtime(module="model")
    runtime.inject(lm)
    runtime.grads_checked = runtime.manual_regularization = True
    runtime.hooks = _Hooks()
    optimizer = torch.optim.SGD([p for p in lm.parameters() if p.requires_grad], lr=0.1)
    runtime.start_fit(SimpleNamespace(optimizers=[optimizer]), lm)
    assert runtime.grads_checked is False and runtime.manual_regularization is False and runtime.hooks is None
    partial = torch.optim.SGD([lm.model[0].adapter.default.lora_A], lr=0.1)
    with pytest.raises(AdapterConfigError, match=r"^3 adapter parameters are in no optimizer \(\['model\.0\.adapter"):
        runtime.start_fit(SimpleNamespace(optimizers=[partial]), lm)
    # AdaLoRA has a schedule: built for the trained adapter, sized from the trainer, given the restored state.
    lm = _lm(model=tiny_mlp())
    config = la.AdaLoRAConfig(target_modules=["0", "2"], init_r=4, target_r=2, tinit=1, tfinal=1)
    runtime = _runtime(config, module="model", name="ada")
    runtime.inject(lm)
    optimizer = torch.optim.SGD([p for p in lm.parameters() if p.requires_grad], lr=0.1)
    trainer = SimpleNamespace(optimizers=[optimizer], estimated_stepping_batches=10)
    runtime.start_fit(trainer, lm)
    assert isinstance(runtime.hooks, ScheduleDriver) and runtime.schedule is runtime.hooks.schedule
    schedule = runtime.schedule
    assert isinstance(schedule, AdaLoRASchedule)
    assert schedule.model is lm.model and schedule.config is config and schedule.adapter == "ada"
    assert schedule.allocator is not None and schedule.allocator.total == 10
    state = schedule.state_dict()
    state["last_epoch"] = 4
    runtime.pending_hooks_state = state
    runtime.start_fit(trainer, lm)
    assert runtime.pending_hooks_state is None and runtime.schedule.last_epoch == 4
    assert runtime.hooks_state()["training_hooks"]["last_epoch"] == 4


# ------------------------------------------------------------------------------------------------------------
# The mixin's attributes, attaching and detaching


def test_mixin_options_read_every_adapter_attribute(tmp_path) -> None:
    ckpt = tmp_path / "a.ckpt"
    ckpt.write_bytes(b"")
    lm = LightningModule()
    options = rt._mixin_options(lm, AdapterOptions())
    assert options == AdapterOptions()
    lm.adapter_module, lm.adapter_name, lm.adapter_init_from = "model", "t", str(ckpt)
    lm.adapter_active, lm.adapter_save = "t", ("t", "u")
    options = rt._mixin_options(lm, AdapterOptions(verbose=False))
    assert options == AdapterOptions(
        module="model", name="t", init_from={"t": str(ckpt)}, active=["t"], save=["t", "u"], verbose=False
    )
    # The same values on both sides are no conflict; an empty mixin init_from leaves the callback's.
    lm = LightningModule()
    lm.adapter_module, lm.adapter_init_from = "model", {}
    given = AdapterOptions(module="model", init_from={"a": str(ckpt)})
    assert rt._mixin_options(lm, given) == AdapterOptions(module="model", init_from={"a": str(ckpt)})


@pytest.mark.parametrize(
    ("attr", "mine", "given"),
    [("module", "model", "encoder"), ("active", ["a"], ["b"]), ("save", ["a"], ["b"]), ("name", "a", "b")],
)
def test_mixin_options_refuse_a_conflict_with_the_callback(attr: str, mine: Any, given: Any) -> None:
    lm = LightningModule()
    setattr(lm, f"adapter_{attr}", mine)
    with pytest.raises(
        AdapterConfigError, match=re.escape(f"AdapterCallback({attr}={given!r}) differs from the module's")
    ):
        rt._mixin_options(lm, AdapterOptions(**{attr: given}))


def test_mixin_options_refuse_a_conflicting_init_from_and_bad_values(tmp_path) -> None:
    ckpt = tmp_path / "a.ckpt"
    ckpt.write_bytes(b"")
    lm = LightningModule()
    lm.adapter_init_from = {"a": str(ckpt)}
    with pytest.raises(AdapterConfigError, match=r"^AdapterCallback\(init_from=\{'b'"):
        rt._mixin_options(lm, AdapterOptions(init_from={"b": str(ckpt)}))
    lm = LightningModule()
    lm.adapter_save = 5
    with pytest.raises(AdapterConfigError, match="^adapter_save must be an adapter name"):
        rt._mixin_options(lm, AdapterOptions())
    lm = LightningModule()
    lm.adapter_active = [1]
    with pytest.raises(AdapterConfigError, match="^adapter_active must be an adapter name"):
        rt._mixin_options(lm, AdapterOptions())
    lm = LightningModule()
    lm.adapter_name = "a b"
    with pytest.raises(AdapterConfigError, match="^adapter_name: adapter name 'a b' is not usable"):
        rt._mixin_options(lm, AdapterOptions())


def test_get_runtime_builds_the_mixins_runtime_once(tmp_path) -> None:
    ckpt = tmp_path / "a.ckpt"
    ckpt.write_bytes(b"")
    lm = LightningModule()
    lm.adapter_config = {"method": "lora", "r": 3}
    lm.adapter_module = "model"
    runtime = get_runtime(lm)
    assert lm.__dict__[RUNTIME_ATTR] is runtime and get_runtime(lm) is runtime
    assert runtime.config == la.LoRAConfig(r=3) and runtime.options == AdapterOptions(module="model")
    lm = LightningModule()
    with pytest.raises(AdapterConfigError, match="^LightningModule has no adapter config"):
        get_runtime(lm)
    assert RUNTIME_ATTR not in lm.__dict__
    lm.adapter_init_from = str(ckpt)
    runtime = get_runtime(lm)
    assert runtime.config is None and runtime.options.init_from == {"default": str(ckpt)}
    assert lm.__dict__[RUNTIME_ATTR] is runtime


def test_attach_runtime_takes_the_config_from_the_call_the_module_or_an_earlier_setup(tmp_path) -> None:
    ckpt = tmp_path / "a.ckpt"
    ckpt.write_bytes(b"")

    class Plain(LightningModule):
        pass

    lm = Plain()
    lm.strict_loading = True
    runtime = attach_runtime(lm, {"method": "lora", "r": 2}, AdapterOptions())
    assert lm.__dict__[RUNTIME_ATTR] is runtime and runtime.config == la.LoRAConfig(r=2)
    assert runtime.attached == (True, True, True) and lm.strict_loading is False
    options = AdapterOptions(verbose=False)
    assert attach_runtime(lm, None, options) is runtime  # the earlier setup's config
    assert runtime.config == la.LoRAConfig(r=2) and runtime.options is options
    assert runtime.attached == (True, True, True)  # what the first attach changed
    with pytest.raises(AdapterConfigError, match="differs from an earlier setup"):
        attach_runtime(lm, la.LoRAConfig(r=4), AdapterOptions())
    with pytest.raises(AdapterConfigError, match="differs from an earlier setup"):
        attach_runtime(lm, la.LoHaConfig(r=2), AdapterOptions())
    # From the module's adapter_config.
    lm = LightningModule()
    lm.adapter_config = la.LoRAConfig(r=5)
    runtime = attach_runtime(lm, None, AdapterOptions())
    assert runtime.config == la.LoRAConfig(r=5)
    assert attach_runtime(lm, {"method": "lora", "r": 5}, AdapterOptions()) is runtime
    with pytest.raises(AdapterConfigError, match="differs from the module's adapter_config"):
        attach_runtime(lm, la.LoRAConfig(r=6), AdapterOptions())
    lm = LightningModule()
    lm.adapter_config = {"method": "lora", "r": 5}
    with pytest.raises(AdapterConfigError, match="differs from the module's adapter_config"):
        attach_runtime(lm, la.LoRAConfig(r=6), AdapterOptions())
    # No config anywhere: only for an adapter loaded from init_from.
    with pytest.raises(AdapterConfigError, match="^AdapterCallback needs a config"):
        attach_runtime(LightningModule(), None, AdapterOptions())
    with pytest.raises(AdapterConfigError, match="^AdapterCallback needs a config"):
        attach_runtime(LightningModule(), None, AdapterOptions(init_from={"other": str(ckpt)}))
    runtime = attach_runtime(LightningModule(), None, AdapterOptions(init_from={"default": str(ckpt)}))
    assert runtime.config is None
    with pytest.raises(AdapterConfigError, match="^module must be the dotted attribute name"):
        attach_runtime(LightningModule(), la.LoRAConfig(), AdapterOptions(module=5))
    assert attach_runtime(LightningModule(), la.LoRAConfig(), AdapterOptions(module="model")).options.module == "model"


def test_attach_runtime_records_what_it_changed_once_and_before_injection() -> None:
    lm = LightningModule()
    lm.adapter_config = la.LoRAConfig(r=2)
    lm.strict_loading = True
    mixin = get_runtime(lm)
    swap_class(lm)
    runtime = attach_runtime(lm, None, AdapterOptions())
    assert runtime is mixin and runtime.attached == (False, True, False) and lm.strict_loading is False
    lm = LightningModule()
    lm.strict_loading = True
    runtime = attach_runtime(lm, la.LoRAConfig(r=2), AdapterOptions())
    runtime.attached, runtime._prepared = None, lm  # injected since
    attach_runtime(lm, la.LoRAConfig(r=2), AdapterOptions())
    assert runtime.attached is None and lm.strict_loading is False


def test_detach_runtime_undoes_attach_only_before_injection() -> None:
    class Plain(LightningModule):
        pass

    lm = Plain()
    lm.strict_loading = True
    attach_runtime(lm, la.LoRAConfig(r=2), AdapterOptions())
    swap_class(lm)
    assert detach_runtime(lm) is True
    assert type(lm) is Plain and lm.strict_loading is True and RUNTIME_ATTR not in lm.__dict__
    # A mixin's runtime (created before) stays; a class swapped before stays swapped.
    lm = Plain()
    lm.adapter_config = la.LoRAConfig(r=2)
    lm.strict_loading = False
    mixin = get_runtime(lm)
    swap_class(lm)
    swapped = type(lm)
    attach_runtime(lm, None, AdapterOptions())
    assert detach_runtime(lm) is True
    assert type(lm) is swapped and lm.strict_loading is False and lm.__dict__[RUNTIME_ATTR] is mixin
    assert mixin.attached is None and detach_runtime(lm) is False
    # Injected: nothing undone.
    lm = Plain()
    runtime = attach_runtime(lm, la.LoRAConfig(r=2), AdapterOptions())
    swap_class(lm)
    runtime._prepared = lm
    swapped = type(lm)
    assert detach_runtime(lm) is False
    assert type(lm) is swapped and lm.strict_loading is False and runtime.attached == (True, True, True)
    assert detach_runtime(Plain()) is False
