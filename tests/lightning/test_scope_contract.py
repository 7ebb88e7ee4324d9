"""Contract of ``lightning.scope``, ``lightning.sources``, ``lightning.export`` and ``lightning.callback``.

Each function is called directly on tiny hand-built modules, checkpoint dicts and stand-in trainers, and its
result is compared with exact values written here (key sets, names, messages, files written, exceptions).
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import signal
from collections import OrderedDict
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from safetensors.torch import load_file
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel

import lightning_adapters as la
from lightning_adapters.core.inject import find_records, inject
from lightning_adapters.core.state import adapter_state_dict
from lightning_adapters.errors import AdapterConfigError, AdapterStateError, AdapterTypeError, TargetError
from lightning_adapters.lightning import callback, export, scope, sources
from lightning_adapters.lightning.callback import (
    AdapterModuleHooks,
    AdapterSetupHooks,
    init_context_refused,
    swap_class,
)
from lightning_adapters.lightning.checkpoint import build_metadata
from lightning_adapters.lightning.export import _merged_owned, export_at_fit_end, export_merged
from lightning_adapters.lightning.runtime import RUNTIME_ATTR, AdapterOptions

try:  # imported here, once, so that the quantized export test does not pay for it
    import bitsandbytes  # noqa: F401
except ImportError:
    bitsandbytes = None


@pytest.fixture(autouse=True)
def _deadline():
    """Fail a test that runs for minutes (a naming loop that never ends) instead of hanging the run."""

    def expire(signum, frame):
        raise TimeoutError("test_scope_contract: a test ran past its 120 s deadline")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(120)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


# ------------------------------------------------------------------------------------------------------------
# scope


def _tree() -> nn.Module:
    torch.manual_seed(0)
    root = nn.Module()
    blk = nn.Sequential(OrderedDict(fc1=nn.Linear(4, 4), fc2=nn.Linear(4, 4)))
    root.encoder = nn.Sequential(OrderedDict(blk=blk, norm=nn.LayerNorm(4)))
    root.head = nn.Linear(4, 2)
    root.extra = nn.Sequential(OrderedDict(proj=nn.Linear(4, 4), fc2=nn.Linear(4, 3)))
    return root


@pytest.mark.parametrize(
    ("name", "module", "expected"),
    [
        ("a", "", True),
        ("", "", True),
        ("a", "a", True),
        ("a.b", "a", True),
        ("a.b.c", "a.b", True),
        ("ab", "a", False),
        ("b", "a", False),
        ("a", "a.b", False),
        ("", "a", False),
    ],
)
def test_inside_is_the_module_itself_or_a_dotted_descendant(name: str, module: str, expected: bool) -> None:
    assert scope.inside(name, module) is expected


def _save_lora_a(path: Path, config: la.LoRAConfig, module: str, state: dict[str, torch.Tensor]) -> None:
    """A checkpoint of one LoRA adapter ``a``, active and trained inside ``module``, holding ``state``."""
    meta = build_metadata(
        adapters={"a": ("lora", config)},
        name="a",
        active=["a"],
        trainable=["a"],
        module=module,
        fingerprint=None,
        shapes={},
    )
    torch.save({"lightning_adapters": meta, "state_dict": state}, path)


def test_outside_names_are_the_modules_beside_the_sub_module_without_its_ancestors() -> None:
    root = _tree()
    assert scope._outside_names(root, "encoder.blk") == ["encoder.norm", "head", "extra", "extra.proj", "extra.fc2"]
    assert scope._outside_names(root, "encoder") == ["head", "extra", "extra.proj", "extra.fc2"]
    assert scope._outside_names(root, "extra.proj") == [
        "encoder",
        "encoder.blk",
        "encoder.blk.fc1",
        "encoder.blk.fc2",
        "encoder.norm",
        "head",
        "extra.fc2",
    ]


def test_inner_config_keeps_only_the_entries_inside_the_target() -> None:
    root = _tree()
    config = la.LoRAConfig(r=2, target_modules=["fc1"], modules_to_save=["fc2", "head", "norm"])
    inner = scope.inner_config(root.encoder, config)
    assert inner.modules_to_save == ["fc2", "norm"]
    assert (inner.r, inner.target_modules) == (2, ["fc1"])
    assert config.modules_to_save == ["fc2", "head", "norm"]  # the user's config is left as it was
    # Nothing inside: None, not an empty list.
    assert scope.inner_config(root.head, config).modules_to_save is None
    # Every entry inside, or no entries at all: the config itself.
    same = la.LoRAConfig(r=2, target_modules=["fc1"], modules_to_save=["fc2"])
    assert scope.inner_config(root.encoder, same) is same
    plain = la.LoRAConfig(r=2, target_modules=["fc1"])
    assert scope.inner_config(root.encoder, plain) is plain
    # The target's own (empty) name selects nothing: "" ends every name.
    assert scope.inner_config(root.head, la.LoRAConfig(modules_to_save=["head"])).modules_to_save is None


def test_split_modules_to_save_sends_inside_entries_to_inject_and_returns_the_outermost_modules_beside() -> None:
    root = _tree()
    config = la.LoRAConfig(r=2, target_modules=["fc1"], modules_to_save=["fc2", "head", "norm"])
    inner, outer = scope.split_modules_to_save(root, "encoder.blk", config)
    assert inner.modules_to_save == ["fc2"]  # "fc2" matches inside first: extra.fc2 is not taken
    assert outer == ["head", "encoder.norm"]
    inner, outer = scope.split_modules_to_save(root, "encoder", config)
    assert (inner.modules_to_save, outer) == (["fc2", "norm"], ["head"])
    # An outer module and its descendants: only the outermost, once.
    config = la.LoRAConfig(r=2, target_modules=["fc1"], modules_to_save=["extra", "proj", "extra"])
    inner, outer = scope.split_modules_to_save(root, "encoder", config)
    assert inner.modules_to_save is None
    assert outer == ["extra"]
    config = la.LoRAConfig(r=2, target_modules=["fc1"], modules_to_save=["proj", "a.fc2"])
    inner, outer = scope.split_modules_to_save(root, "encoder", config)
    assert outer == ["extra.proj", "extra.fc2"]
    # Every entry inside: the config itself.
    config = la.LoRAConfig(r=2, target_modules=["fc1"], modules_to_save=["fc2"])
    assert scope.split_modules_to_save(root, "encoder", config) == (config, [])


def test_split_modules_to_save_without_a_module_or_entries_returns_the_config_unchanged() -> None:
    root = _tree()
    config = la.LoRAConfig(r=2, target_modules=["fc1"], modules_to_save=["zzz"])
    got, outer = scope.split_modules_to_save(root, "", config)
    assert got is config and outer == []
    plain = la.LoRAConfig(r=2, target_modules=["fc1"])
    got, outer = scope.split_modules_to_save(root, "nonexistent", plain)
    assert got is plain and outer == []


def test_split_modules_to_save_refuses_entries_that_match_nothing_naming_them_and_examples() -> None:
    root = _tree()
    config = la.LoRAConfig(r=2, target_modules=["fc1"], modules_to_save=["zzz", "head", "qq"])
    message = (
        "modules_to_save entries ['zzz', 'qq'] match no module of the LightningModule, neither inside "
        "module='encoder' nor beside it; use module names such as "
        "['blk', 'extra', 'head', 'norm', 'blk.fc1', 'blk.fc2']"
    )
    with pytest.raises(TargetError, match=f"^{re.escape(message)}$"):
        scope.split_modules_to_save(root, "encoder", config)


def test_examples_are_the_shallowest_names_first_then_alphabetical_up_to_the_limit() -> None:
    names = ["b.c.d", "z", "a.b", "b", "a", "c.a", "y", "x"]
    assert scope._examples(names) == ["a", "b", "x", "y", "z", "a.b"]
    assert scope._examples(names, limit=2) == ["a", "b"]
    assert scope._examples(names, limit=20) == ["a", "b", "x", "y", "z", "a.b", "c.a", "b.c.d"]


class _Scoped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.temp = nn.Parameter(torch.ones(1))
        self.register_buffer("step", torch.zeros(1))
        self.register_buffer("cache", torch.zeros(1), persistent=False)
        self.encoder = nn.Sequential(OrderedDict(fc1=nn.Linear(4, 4), norm=nn.BatchNorm1d(4)))
        self.head = nn.Sequential(OrderedDict(lin=nn.Linear(4, 2), bn=nn.BatchNorm1d(2)))
        self.head.bn.register_buffer("tmp", torch.zeros(1), persistent=False)
        self.frozen = nn.BatchNorm1d(2)
        self.frozen.requires_grad_(False)
        self.act = nn.ReLU()


def test_outside_state_is_every_tensor_of_the_trainable_modules_beside_and_the_saved_prefixes() -> None:
    root = _Scoped()
    inject(root.encoder, la.LoRAConfig(r=2, target_modules=["fc1"]))
    keys, prefixes = scope.outside_state(root, "encoder", ["head", "x.y"])
    assert keys == {
        "temp",
        "step",
        "head.lin.weight",
        "head.lin.bias",
        "head.bn.weight",
        "head.bn.bias",
        "head.bn.running_mean",
        "head.bn.running_var",
        "head.bn.num_batches_tracked",
    }
    assert prefixes == ["head.", "x.y."]
    assert scope.outside_state(root, "encoder", []) == (keys, [])
    # A frozen module beside adds nothing; a trainable parameter alone brings its module's buffers.
    root.head.requires_grad_(False)
    root.head.bn.bias.requires_grad_(True)
    keys, _ = scope.outside_state(root, "encoder", [])
    assert keys == {
        "temp",
        "step",
        "head.bn.weight",
        "head.bn.bias",
        "head.bn.running_mean",
        "head.bn.running_var",
        "head.bn.num_batches_tracked",
    }
    # Nothing at the root trains: its buffer is not saved either.
    root.temp.requires_grad_(False)
    keys, _ = scope.outside_state(root, "encoder", [])
    assert "step" not in keys and "temp" not in keys


def test_outside_state_of_the_whole_module_is_empty() -> None:
    root = _Scoped()
    inject(root, la.LoRAConfig(r=2, target_modules=["fc1"]))
    assert scope.outside_state(root, "", ["head"]) == (set(), [])


class _Heads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Sequential(OrderedDict(fc1=nn.Linear(4, 4), fc2=nn.Linear(4, 4)))
        self.head = nn.Linear(4, 2)  # one layer: "all-linear" adapts it
        self.cls = nn.Sequential(OrderedDict(norm=nn.LayerNorm(4)))  # no adapter: frozen
        self.was_frozen = nn.LayerNorm(4)
        self.saved = nn.LayerNorm(4)
        self.act = nn.ReLU()
        self.part = nn.LayerNorm(4)
        self.old = nn.Linear(4, 2)  # frozen before injection: never reported, even given an adapter


def _heads(config: la.LoRAConfig) -> tuple[nn.Module, object]:
    root = _Heads()
    root.was_frozen.requires_grad_(False)
    root.part.weight.requires_grad_(False)  # one trainable parameter before injection is enough
    root.old.requires_grad_(False)
    inject(root, config)
    return root, find_records(root)[0][2]


_FROZEN_MESSAGE = (
    "lightning_adapters: 'cls' (Sequential, 8 parameters), 'part' (LayerNorm, 8 parameters) was trainable before "
    "injection and is now frozen at its current values: it holds no adapter and is not in modules_to_save, so it "
    "never trains; 'head' (Linear, 10 parameters) got a LoRAConfig adapter from target_modules='all-linear': its "
    "weights stay frozen at their current values and only a low-rank update trains. If this is a new task head, "
    "train it in full: modules_to_save=['cls', 'part', 'head'] in the config, or adapt only the backbone with "
    "AdapterCallback(config, module='<backbone attribute>') (AdapterMixin: adapter_module), which trains and "
    "checkpoints everything beside it that requires grad. If it is meant to stay frozen, call requires_grad_(False) "
    "on it in __init__ and this warning goes away"
)


def test_frozen_parts_finds_frozen_children_and_single_layers_given_an_all_linear_adapter() -> None:
    root, record = _heads(la.LoRAConfig(r=2, target_modules="all-linear", modules_to_save=["saved"]))
    frozen, low_rank = scope.frozen_parts(root, record)
    assert (frozen, low_rank) == (["cls", "part"], ["head"])
    assert scope.frozen_parts_message(root, frozen, low_rank, record.config) == _FROZEN_MESSAGE


def test_frozen_parts_with_listed_targets_reports_no_low_rank_and_skips_children_holding_adapters() -> None:
    root, record = _heads(la.LoRAConfig(r=2, target_modules=["fc1", "head"]))
    assert scope.frozen_parts(root, record) == (["cls", "saved", "part"], [])
    # A child holding an adapter is never "frozen by mistake", even with every parameter frozen; a child that
    # requires grad again is not frozen.
    root.encoder.requires_grad_(False)
    root.cls.requires_grad_(True)
    assert scope.frozen_parts(root, record) == (["saved", "part"], [])


def test_frozen_parts_skips_a_saved_child_and_an_all_linear_head_in_modules_to_save() -> None:
    root, record = _heads(la.LoRAConfig(r=2, target_modules="all-linear", modules_to_save=["cls", "part", "saved"]))
    assert record.targets == ["encoder.fc1", "encoder.fc2", "head", "old"]
    assert scope.frozen_parts(root, record) == ([], ["head"])


def test_frozen_parts_message_for_frozen_children_only_and_a_config_without_modules_to_save() -> None:
    root, record = _heads(la.LoRAConfig(r=2, target_modules=["fc1"]))
    message = scope.frozen_parts_message(root, ["cls"], [], la.LlamaAdapterConfig())
    assert message == (
        "lightning_adapters: 'cls' (Sequential, 8 parameters) was trainable before injection and is now frozen at "
        "its current values: it holds no adapter and is not in modules_to_save, so it never trains. If this is a "
        "new task head, train it in full: adapt only the backbone with AdapterCallback(config, module='<backbone "
        "attribute>') (AdapterMixin: adapter_module), which trains and checkpoints everything beside it that "
        "requires grad. If it is meant to stay frozen, call requires_grad_(False) on it in __init__ and this "
        "warning goes away"
    )


def test_frozen_parts_message_for_low_rank_only_counts_base_parameters_of_the_adapted_class() -> None:
    root, record = _heads(la.LoRAConfig(r=2, target_modules="all-linear"))
    message = scope.frozen_parts_message(root, [], ["head", "encoder"], la.LoHaConfig())
    assert message == (
        "lightning_adapters: 'head' (Linear, 10 parameters), 'encoder' (Sequential, 40 parameters) got a "
        "LoHaConfig adapter from target_modules='all-linear': its weights stay frozen at their current values and "
        "only a low-rank update trains. If this is a new task head, train it in full: "
        "modules_to_save=['head', 'encoder'] in the config, or adapt only the backbone with "
        "AdapterCallback(config, module='<backbone attribute>') (AdapterMixin: adapter_module), which trains and "
        "checkpoints everything beside it that requires grad. If it is meant to stay frozen, call "
        "requires_grad_(False) on it in __init__ and this warning goes away"
    )


def test_accepts_modules_to_save_is_whether_the_config_takes_the_field() -> None:
    assert scope._accepts_modules_to_save(la.LoRAConfig(), ["x"]) is True
    assert scope._accepts_modules_to_save(la.LlamaAdapterConfig(), ["x"]) is False


# ------------------------------------------------------------------------------------------------------------
# sources


def test_check_source_returns_the_path_as_a_string_for_a_file_or_a_peft_directory(tmp_path) -> None:
    (tmp_path / "f.ckpt").write_bytes(b"x")
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "adapter_config.json").write_text("{}")
    (tmp_path / "multi" / "b").mkdir(parents=True)
    (tmp_path / "multi" / "b" / "adapter_config.json").write_text("{}")
    got = sources.check_source("a", tmp_path / "f.ckpt")
    assert got == str(tmp_path / "f.ckpt") and type(got) is str
    assert sources.check_source("a", str(tmp_path / "root")) == str(tmp_path / "root")
    assert sources.check_source("b", tmp_path / "multi") == str(tmp_path / "multi")


@pytest.mark.parametrize("path", [None, 3, "", "   ", b"x.ckpt"])
def test_check_source_refuses_what_is_not_a_path(path) -> None:
    message = f"init_from['a'] must be the path of a PEFT directory or an adapter checkpoint (.ckpt), got {path!r}"
    with pytest.raises(AdapterConfigError, match=f"^{re.escape(message)}$"):
        sources.check_source("a", path)


def test_check_source_refuses_a_path_with_no_source_there(tmp_path) -> None:
    (tmp_path / "multi" / "b").mkdir(parents=True)
    (tmp_path / "multi" / "b" / "adapter_config.json").write_text("{}")
    for path in (tmp_path / "missing", tmp_path / "multi"):
        message = (
            f"init_from['a'] = {str(path)!r} is neither a PEFT directory (with adapter_config.json) nor an adapter "
            "checkpoint file; pass the directory save_peft / export_peft_dir wrote, or a .ckpt of this integration"
        )
        with pytest.raises(AdapterConfigError, match=f"^{re.escape(message)}$"):
            sources.check_source("a", path)


def _encoder() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(OrderedDict(fc1=nn.Linear(4, 4), fc2=nn.Linear(4, 4), act=nn.ReLU()))


_CONFIG_A = la.LoRAConfig(r=2, alpha=4.0, target_modules=["fc1"])
_CONFIG_B = la.LoRAConfig(r=3, alpha=6.0, target_modules=["fc1", "fc2"])


def _trained_encoder() -> nn.Module:
    """An encoder with adapters "a" and "b", every adapter tensor set to distinct random values."""
    encoder = _encoder()
    inject(encoder, _CONFIG_A, name="a")
    inject(encoder, _CONFIG_B, name="b")
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for t in adapter_state_dict(encoder).values():
            t.copy_(torch.randn(t.shape, generator=g))
    return encoder


def _write_ckpt(path: Path, encoder: nn.Module, names: list[str], module: str = "encoder") -> Path:
    """A checkpoint as the integration writes it, holding ``names`` of ``encoder`` trained as ``module``."""
    configs = {"a": _CONFIG_A, "b": _CONFIG_B}
    prefix = f"{module}." if module else ""
    state = {
        prefix + k: v.clone()
        for k, v in adapter_state_dict(encoder).items()
        if any(f".adapter.{n}." in k or k.startswith(f"adapter.{n}.") for n in names)
    }
    meta = build_metadata(
        adapters={n: ("lora", configs[n]) for n in names},
        name=names[-1],
        active=list(names),
        trainable=[names[-1]],
        module=module,
        fingerprint=None,
        shapes={},
    )
    torch.save({"lightning_adapters": meta, "state_dict": state, "epoch": 0}, path)
    return path


def _renamed(state: dict[str, torch.Tensor], old: str, new: str) -> dict[str, torch.Tensor]:
    return {k.replace(f".adapter.{old}.", f".adapter.{new}."): v for k, v in state.items() if f".{old}." in k}


def _named(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in adapter_state_dict(model).items() if f"adapter.{name}." in k}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_load_adapter_from_a_checkpoint_of_several_adapters_takes_the_named_one(tmp_path) -> None:
    source = _trained_encoder()
    path = _write_ckpt(tmp_path / "ab.ckpt", source, ["a", "b"])
    target = _encoder()
    inject(target, la.LoRAConfig(r=2, target_modules=["fc2"]), name="x")  # an adapter already there stays
    x_before = {k: v.clone() for k, v in _named(target, "x").items()}
    sources.load_adapter(target, "b", str(path))
    assert [r.name for _, _, r in find_records(target)] == ["x", "b"]
    assert find_records(target)[1][2].config == _CONFIG_B
    _assert_same(_named(target, "b"), _renamed(adapter_state_dict(source), "b", "b"))
    _assert_same(_named(target, "x"), x_before)


def test_load_adapter_from_a_checkpoint_of_one_adapter_takes_it_under_the_given_name(tmp_path) -> None:
    source = _trained_encoder()
    path = _write_ckpt(tmp_path / "a.ckpt", source, ["a"])
    target = _encoder()
    sources.load_adapter(target, "mine", str(path))
    (record,) = [r for _, _, r in find_records(target)]
    assert (record.name, record.config) == ("mine", _CONFIG_A)
    _assert_same(adapter_state_dict(target), _renamed(adapter_state_dict(source), "a", "mine"))
    assert sources.stored_config("anything", str(path)) == _CONFIG_A


def test_load_adapter_from_a_checkpoint_of_the_whole_module_and_onto_a_single_layer(tmp_path) -> None:
    source = _trained_encoder()
    path = _write_ckpt(tmp_path / "root.ckpt", source, ["b"], module="")
    target = _encoder()
    sources.load_adapter(target, "b", str(path))
    _assert_same(adapter_state_dict(target), _renamed(adapter_state_dict(source), "b", "b"))
    # A checkpoint of one layer (its adapter keys have no module name) loads into that layer.
    layer = nn.Linear(4, 4)
    inject(layer, la.LoRAConfig(r=2, target_modules="all-linear"), name="a")
    with torch.no_grad():
        for t in adapter_state_dict(layer).values():
            t.normal_()
    state = {f"head.{k}": v.clone() for k, v in adapter_state_dict(layer).items()}
    _save_lora_a(tmp_path / "head.ckpt", la.LoRAConfig(r=2, target_modules="all-linear"), "head", state)
    fresh = nn.Linear(4, 4)
    sources.load_adapter(fresh, "z", str(tmp_path / "head.ckpt"))
    assert sorted(adapter_state_dict(fresh)) == ["adapter.z.lora_A", "adapter.z.lora_B"]
    _assert_same(adapter_state_dict(fresh), {k[len("head.") :].replace(".a.", ".z."): v for k, v in state.items()})


def test_load_adapter_from_a_format_1_checkpoint_whose_keys_carry_no_adapter_name(tmp_path) -> None:
    source = _trained_encoder()
    state = {f"encoder.{k.replace('.adapter.a.', '.adapter.')}": v.clone() for k, v in _named(source, "a").items()}
    assert sorted(state) == ["encoder.fc1.adapter.lora_A", "encoder.fc1.adapter.lora_B"]
    meta = {"method": "lora", "config": _CONFIG_A.to_dict(), "module": "encoder"}
    torch.save({"lightning_adapters": meta, "state_dict": state}, tmp_path / "v1.ckpt")
    target = _encoder()
    sources.load_adapter(target, "c", str(tmp_path / "v1.ckpt"))
    _assert_same(adapter_state_dict(target), _renamed(adapter_state_dict(source), "a", "c"))
    assert sources.stored_config("c", str(tmp_path / "v1.ckpt")) == _CONFIG_A


def test_load_adapter_drops_modules_to_save_entries_outside_the_target(tmp_path) -> None:
    config = la.LoRAConfig(r=2, alpha=4.0, target_modules=["fc1"], modules_to_save=["head"])
    source = _encoder()
    inject(source, la.LoRAConfig(r=2, alpha=4.0, target_modules=["fc1"]), name="a")
    state = {f"encoder.{k}": v.clone() + 1 for k, v in adapter_state_dict(source).items()}
    _save_lora_a(tmp_path / "h.ckpt", config, "encoder", state)
    target = _encoder()
    sources.load_adapter(target, "a", str(tmp_path / "h.ckpt"))
    (record,) = [r for _, _, r in find_records(target)]
    assert record.config.modules_to_save is None and record.modules_to_save == []
    _assert_same(adapter_state_dict(target), {k[len("encoder.") :]: v for k, v in state.items()})
    assert sources.stored_config("a", str(tmp_path / "h.ckpt")) == config


def test_load_adapter_takes_saved_modules_and_trained_biases_under_their_own_keys(tmp_path) -> None:
    config = la.LoRAConfig(r=2, target_modules=["fc1"], modules_to_save=["fc2"], bias="lora_only")
    source = _encoder()
    inject(source, config, name="a")
    with torch.no_grad():
        for t in adapter_state_dict(source).values():
            t.add_(torch.randn(t.shape))
    state = {f"encoder.{k}": v.clone() for k, v in adapter_state_dict(source).items()}
    _save_lora_a(tmp_path / "m.ckpt", config, "encoder", state)
    target = _encoder()
    sources.load_adapter(target, "z", str(tmp_path / "m.ckpt"))
    want = {
        "fc1.bias": state["encoder.fc1.bias"],
        "fc1.adapter.z.lora_A": state["encoder.fc1.adapter.a.lora_A"],
        "fc1.adapter.z.lora_B": state["encoder.fc1.adapter.a.lora_B"],
        "fc2.weight": state["encoder.fc2.weight"],
        "fc2.bias": state["encoder.fc2.bias"],
    }
    _assert_same(adapter_state_dict(target), want)


def test_a_checkpoint_lacking_tensors_is_refused_and_leaves_the_target_as_it_was(tmp_path) -> None:
    source = _trained_encoder()
    path = _write_ckpt(tmp_path / "b.ckpt", source, ["b"])
    saved = torch.load(path, weights_only=True)
    for k in ("encoder.fc2.adapter.b.lora_A", "encoder.fc1.adapter.b.lora_B"):
        del saved["state_dict"][k]
    torch.save(saved, path)
    message = (
        f"init_from['b'] = {str(path)!r} lacks ['encoder.fc1.adapter.b.lora_B', 'encoder.fc2.adapter.b.lora_A'] "
        "for its lora adapter 'b' on this model; pass the model (sub-module) that adapter was trained on"
    )
    target = _encoder()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(AdapterStateError, match=f"^{re.escape(message)}$"):
        sources.load_adapter(target, "b", str(path))
    assert find_records(target) == []
    _assert_same(target.state_dict(), before)
    assert type(target.fc1) is nn.Linear
    # With an adapter already there, only the one being loaded goes.
    inject(target, la.LoRAConfig(r=2, target_modules=["fc2"]), name="x")
    with pytest.raises(AdapterStateError, match=f"^{re.escape(message)}$"):
        sources.load_adapter(target, "b", str(path))
    assert [r.name for _, _, r in find_records(target)] == ["x"]
    assert sorted(adapter_state_dict(target)) == ["fc2.adapter.x.lora_A", "fc2.adapter.x.lora_B"]


def test_a_checkpoint_under_another_module_prefix_is_refused(tmp_path) -> None:
    source = _trained_encoder()
    path = _write_ckpt(tmp_path / "b.ckpt", source, ["a"])
    saved = torch.load(path, weights_only=True)
    saved["lightning_adapters"]["module"] = "model"
    torch.save(saved, path)
    with pytest.raises(
        AdapterStateError, match=re.escape("lacks ['model.fc1.adapter.a.lora_A', 'model.fc1.adapter.a.lora_B']")
    ):
        sources.load_adapter(_encoder(), "a", str(path))


def test_read_checkpoint_returns_metadata_state_adapters_and_the_source_name(tmp_path) -> None:
    source = _trained_encoder()
    path = str(_write_ckpt(tmp_path / "ab.ckpt", source, ["a", "b"]))
    meta, state, held, name = sources._read_checkpoint("a", path)
    saved = torch.load(path, weights_only=True)
    assert meta == saved["lightning_adapters"]
    _assert_same(state, saved["state_dict"])
    assert held == {
        "a": {"method": "lora", "config": _CONFIG_A.to_dict()},
        "b": {"method": "lora", "config": _CONFIG_B.to_dict()},
    }
    assert name == "a"
    assert sources._read_checkpoint("b", path)[3] == "b"
    assert sources.stored_config("a", path) == _CONFIG_A
    assert sources.stored_config("b", path) == _CONFIG_B
    message = f"init_from['c'] = {path!r} holds the adapters ['a', 'b']; name the one to load as one of them"
    for call in (sources._read_checkpoint, sources.stored_config):
        with pytest.raises(AdapterStateError, match=f"^{re.escape(message)}$"):
            call("c", path)
    target = _encoder()
    with pytest.raises(AdapterStateError, match=f"^{re.escape(message)}$"):
        sources.load_adapter(target, "c", path)
    assert find_records(target) == []
    assert sources._read_checkpoint("c", str(_write_ckpt(tmp_path / "b.ckpt", source, ["b"])))[3] == "b"


@pytest.mark.parametrize("content", [{"state_dict": {}}, [1, 2], {"lightning_adapters": None, "state_dict": {}}])
def test_a_file_without_the_integrations_entry_is_refused(tmp_path, content) -> None:
    path = str(tmp_path / "plain.ckpt")
    torch.save(content, path)
    message = (
        f"init_from['a'] = {path!r} is not an adapter checkpoint of AdapterCallback/AdapterMixin (no "
        "'lightning_adapters' entry); pass one of those, or a PEFT directory"
    )
    for call in (sources._read_checkpoint, sources.stored_config):
        with pytest.raises(AdapterStateError, match=f"^{re.escape(message)}$"):
            call("a", path)


def test_a_damaged_checkpoint_is_refused_naming_the_file(tmp_path) -> None:
    source = _trained_encoder()
    path = _write_ckpt(tmp_path / "a.ckpt", source, ["a"])
    good = torch.load(path, weights_only=True)
    cases = {
        "nostate": ({**good, "state_dict": None} | {}, "'state_dict' must be a dict of tensors"),
        "meta": ({**good, "lightning_adapters": {**good["lightning_adapters"], "method": 3}}, "'method'"),
        "adapters": ({**good, "lightning_adapters": {**good["lightning_adapters"], "adapters": {}}}, "'adapters'"),
        "config": (
            {
                **good,
                "lightning_adapters": {
                    **good["lightning_adapters"],
                    "adapters": {"a": {"method": "lora", "config": {"zz": 1}}},
                },
            },
            "unknown fields ['zz']",
        ),
    }
    for case, (content, what) in cases.items():
        p = str(tmp_path / f"{case}.ckpt")
        torch.save(content, p)
        for call in (sources.stored_config, sources.load_adapter):
            args = ("a", p) if call is sources.stored_config else (_encoder(), "a", p)
            with pytest.raises(AdapterStateError, match=re.escape(what)) as err:
                call(*args)
            assert str(err.value).startswith(p), (case, str(err.value))


def test_stored_config_and_load_adapter_read_a_peft_directory_and_its_sub_folders(tmp_path) -> None:
    source = _encoder()
    inject(source, _CONFIG_A)
    inject(source, _CONFIG_B, name="b")
    with torch.no_grad():
        for t in adapter_state_dict(source).values():
            t.normal_()
    la.save_peft(source, tmp_path / "peft")
    directory = str(tmp_path / "peft")
    assert sorted(os.listdir(directory)) == ["adapter_config.json", "adapter_model.safetensors", "b"]
    assert json.loads((tmp_path / "peft" / "b" / "adapter_config.json").read_text())["r"] == 3
    assert sources.stored_config("default", directory) == _CONFIG_A
    assert sources.stored_config("b", directory) == _CONFIG_B
    assert sources.stored_config("other", directory) == _CONFIG_A  # no sub-folder of that name: the root's
    assert sources.stored_config("b", Path(directory) / "b") == _CONFIG_B
    target = _encoder()
    sources.load_adapter(target, "b", directory)
    (record,) = [r for _, _, r in find_records(target)]
    assert (record.name, record.config) == ("b", _CONFIG_B)
    _assert_same(adapter_state_dict(target), _named(source, "b"))
    target = _encoder()
    sources.load_adapter(target, "default", directory)
    _assert_same(adapter_state_dict(target), _named(source, "default"))
    with pytest.raises(
        AdapterConfigError, match=re.escape(f"init_from['b'] = {str(tmp_path / 'nothing')!r} is neither")
    ):
        sources.load_adapter(_encoder(), "b", str(tmp_path / "nothing"))
    # Only named sub-folders, nothing at the root.
    named = _trained_encoder()
    la.save_peft(named, tmp_path / "ab")
    assert sorted(os.listdir(tmp_path / "ab")) == ["a", "b"]
    assert sources.stored_config("a", str(tmp_path / "ab")) == _CONFIG_A
    assert sources.stored_config("b", str(tmp_path / "ab")) == _CONFIG_B
    target = _encoder()
    sources.load_adapter(target, "a", str(tmp_path / "ab"))
    _assert_same(adapter_state_dict(target), _named(named, "a"))
    with pytest.raises(AdapterConfigError, match=re.escape("init_from['c'] =")):
        sources.stored_config("c", str(tmp_path / "ab"))
    with pytest.raises(AdapterConfigError, match="must be the path"):
        sources.stored_config("b", "")


# ------------------------------------------------------------------------------------------------------------
# export


def _lora_mlp(init_weights: bool = False) -> nn.Module:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    model.register_buffer("steps", torch.tensor([3], dtype=torch.int64))
    inject(model, la.LoRAConfig(r=2, alpha=6.0, target_modules=["0", "2"], init_weights=init_weights))
    return model


def _merged_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """W + (alpha / r) * B @ A for each adapted layer, written out here."""
    out = {"steps": torch.tensor([3])}
    for i in ("0", "2"):
        layer = model.get_submodule(i)
        a = layer.adapter["default"].lora_A.detach()
        b = layer.adapter["default"].lora_B.detach()
        out[f"{i}.weight"] = layer.weight.detach() + 3.0 * (b @ a)  # (out, r) @ (r, in) -> (out, in)
        out[f"{i}.bias"] = layer.bias.detach()
    return out


def test_export_merged_writes_the_merged_weights_and_leaves_the_model_adapted(tmp_path) -> None:

    model = _lora_mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("kept")
    (tmp_path / "out" / "model-00001-of-00002.safetensors").write_text("old shard")
    got = export_merged(model, tmp_path / "out")
    assert got == tmp_path / "out" and isinstance(got, Path)
    assert sorted(os.listdir(tmp_path / "out")) == ["model.safetensors", "notes.txt"]
    written = load_file(str(tmp_path / "out" / "model.safetensors"))
    want = _merged_weights(model)
    assert sorted(written) == sorted(want)
    for k in want:
        torch.testing.assert_close(written[k], want[k], rtol=1e-6, atol=1e-6)
    assert len(find_records(model)) == 1 and type(model[0]) is not nn.Linear  # the model keeps its adapter
    _assert_same(model.state_dict(), before)
    assert export_merged(model, str(tmp_path / "str")) == tmp_path / "str"


def test_export_merged_uses_save_pretrained_when_the_model_has_it(tmp_path) -> None:

    class Pretrained(nn.Sequential):
        def save_pretrained(self, directory: Path) -> None:
            (Path(directory) / "config.json").write_text(json.dumps(sorted(self.state_dict())))

    torch.manual_seed(0)
    model = Pretrained(nn.Linear(4, 4))
    inject(model, la.LoRAConfig(r=2, target_modules=["0"]))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "model.safetensors").write_text("old single file")
    export_merged(model, tmp_path / "out")
    assert os.listdir(tmp_path / "out") == ["config.json"]
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == ["0.bias", "0.weight"]


def test_export_merged_refuses_non_finite_weights_unless_safe_is_off(tmp_path) -> None:

    model = _lora_mlp()
    with torch.no_grad():
        model[2].adapter["default"].lora_B[0, 0] = float("nan")
    message = (
        "export_merged: merged tensor '2.weight' holds 8 non-finite values (NaN/inf); nothing was written to "
        f"{str(tmp_path / 'out')!r}. Check the adapter (a diverged run, or a merge overflowing a half-precision base) "
        "or pass safe=False to write it anyway"
    )
    with pytest.raises(AdapterStateError, match=f"^{re.escape(message)}$"):
        export_merged(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    export_merged(model, tmp_path / "out", safe=False)
    assert int(torch.isnan(load_file(str(tmp_path / "out" / "model.safetensors"))["2.weight"]).sum()) == 8


def test_export_merged_refuses_a_model_on_the_meta_device_and_a_bad_directory(tmp_path) -> None:

    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(AdapterStateError, match=re.escape("export_merged: '0.weight' is on the meta device")):
        export_merged(model, tmp_path / "out")
    model = nn.Sequential(nn.Linear(4, 4))
    model.register_buffer("b", torch.empty(2, device="meta"))
    with pytest.raises(AdapterStateError, match=re.escape("export_merged: 'b' is on the meta device")):
        export_merged(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(AdapterConfigError, match="^export_merged: directory '' is empty"):
        export_merged(_lora_mlp(), "")


def test_export_merged_with_a_dtype_dequantizes_a_quantized_base_into_plain_weights(tmp_path) -> None:
    if bitsandbytes is None:
        pytest.skip("bitsandbytes is not installed")

    torch.manual_seed(0)
    model = la.quantize(nn.Sequential(nn.Linear(64, 64)), "nf4", skip=[])
    inject(model, la.LoRAConfig(r=2, alpha=4.0, target_modules=["0"], init_weights=False))
    x = torch.randn(3, 64)
    out = model(x).detach()
    export_merged(model, tmp_path / "out", dtype=torch.float32)
    written = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert {k: (v.dtype, tuple(v.shape)) for k, v in written.items()} == {
        "0.weight": (torch.float32, (64, 64)),
        "0.bias": (torch.float32, (64,)),
    }
    plain = nn.Linear(64, 64)
    plain.load_state_dict({k[2:]: v for k, v in written.items()})
    torch.testing.assert_close(plain(x).detach(), out, atol=1e-5, rtol=0)


def test_merged_owned_names() -> None:

    owned = [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "model-00001-of-00002.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
        "pytorch_model-00001-of-00002.bin",
        "pytorch_model.bin.index.json",
    ]
    assert [n for n in owned if not _merged_owned(n)] == []
    assert [n for n in ["README.md", "adapter_model.safetensors", "notes.json", "model.bin"] if _merged_owned(n)] == []


class _Recorder:
    """Stand-ins for ``save_peft``, ``export_merged``, the FSDP/ZeRO-3 gathering and the strategy's barrier."""

    def __init__(self, monkeypatch, zero3: bool = False) -> None:

        self.events: list[tuple] = []
        self.model = None
        self.scratch: list[Path] = []

        def save_peft(target, directory, **kwargs):
            if not isinstance(directory, str):
                self.scratch.append(Path(directory))
                directory = ("scratch", Path(directory).name, Path(directory).parent.is_dir())
            self.events.append(("save_peft", target, directory, kwargs))

        @contextlib.contextmanager
        def summon(model, **kwargs):
            self.events.append(("summon", model, kwargs))
            yield
            self.events.append(("summoned",))

        @contextlib.contextmanager
        def gathered(strategy, params):
            self.events.append(("gather", strategy, list(params)))
            yield
            self.events.append(("gathered",))

        monkeypatch.setattr(export, "save_peft", save_peft)
        monkeypatch.setattr(export, "export_merged", lambda *a, **k: self.events.append(("merged", a, k)))
        monkeypatch.setattr(export, "gathered", gathered)
        monkeypatch.setattr(export, "is_zero3", lambda strategy: zero3 and strategy is self)
        monkeypatch.setattr(FullyShardedDataParallel, "summon_full_params", summon)

    def barrier(self, name: str) -> None:
        self.events.append(("barrier", name))


def _trainer(strategy: _Recorder, zero: bool) -> object:
    return type("Trainer", (), {"is_global_zero": zero, "strategy": strategy})()


@pytest.mark.parametrize("zero", [True, False])
def test_export_at_fit_end_plain_writes_both_exports_on_rank_zero_then_waits_for_every_rank(monkeypatch, zero) -> None:

    rec = _Recorder(monkeypatch)
    target = _lora_mlp()
    export_at_fit_end(_trainer(rec, zero), target, peft_dir="p", merged_dir="m", names=["default"])
    saves = [("save_peft", target, "p", {"safe": True, "names": ["default"]}), ("merged", (target, "m"), {})]
    assert rec.events == [*(saves if zero else []), ("barrier", "lightning_adapters.export")]
    rec.events.clear()
    export_at_fit_end(_trainer(rec, zero), target, peft_dir="p")
    assert rec.events == [
        *([("save_peft", target, "p", {"safe": True, "names": None})] if zero else []),
        ("barrier", "lightning_adapters.export"),
    ]
    rec.events.clear()
    export_at_fit_end(_trainer(rec, zero), target, merged_dir="m")
    assert rec.events == [*([("merged", (target, "m"), {})] if zero else []), ("barrier", "lightning_adapters.export")]
    rec.events.clear()
    export_at_fit_end(_trainer(rec, zero), target, peft_dir="", merged_dir=None, names=["default"])
    assert rec.events == []  # nothing to export: not even the barrier


@pytest.mark.parametrize("zero", [True, False])
def test_export_at_fit_end_with_dtensor_parameters_saves_on_every_rank_keeping_rank_zeros_files(
    monkeypatch, zero
) -> None:

    rec = _Recorder(monkeypatch, zero3=True)  # sharded parameters come first, whatever the strategy
    target = _lora_mlp()
    target[0].adapter["default"].lora_A.device_mesh = object()
    export_at_fit_end(_trainer(rec, zero), target, peft_dir="p", names=["a"])
    where = "p" if zero else ("scratch", "adapter", True)
    assert rec.events == [
        ("save_peft", target, where, {"safe": True, "names": ["a"]}),
        ("barrier", "lightning_adapters.export"),
    ]
    assert all(not p.parent.exists() for p in rec.scratch)  # the scratch directory is gone afterwards


@pytest.mark.parametrize("zero", [True, False])
def test_export_at_fit_end_under_fsdp1_saves_inside_summon_full_params_without_writeback(monkeypatch, zero) -> None:

    class Wrapped(FullyShardedDataParallel):
        def __init__(self) -> None:
            nn.Module.__init__(self)

    rec = _Recorder(monkeypatch)
    rec.model = Wrapped()
    target = _lora_mlp()
    export_at_fit_end(_trainer(rec, zero), target, peft_dir="p", merged_dir="m", names=["a"])
    assert rec.events == [
        ("summon", rec.model, {"writeback": False}),
        *([("save_peft", target, "p", {"safe": True, "names": ["a"]})] if zero else []),
        ("summoned",),
        *([("merged", (target, "m"), {})] if zero else []),
        ("barrier", "lightning_adapters.export"),
    ]


@pytest.mark.parametrize("zero", [True, False])
def test_export_at_fit_end_under_zero3_gathers_the_trainable_parameters_around_the_save(monkeypatch, zero) -> None:

    rec = _Recorder(monkeypatch, zero3=True)
    target = _lora_mlp()
    export_at_fit_end(_trainer(rec, zero), target, peft_dir="p", names=["a"])
    trainable = [p for p in target.parameters() if p.requires_grad]
    assert len(trainable) == 4
    assert rec.events[0][:2] == ("gather", rec)
    assert [id(p) for p in rec.events[0][2]] == [id(p) for p in trainable]
    assert rec.events[1:] == [
        *([("save_peft", target, "p", {"safe": True, "names": ["a"]})] if zero else []),
        ("gathered",),
        ("barrier", "lightning_adapters.export"),
    ]


def test_export_at_fit_end_refuses_a_non_finite_adapter_for_real(tmp_path) -> None:

    strategy = type("S", (), {"model": None, "barrier": lambda self, name: None})()
    target = _lora_mlp()
    with torch.no_grad():
        target[0].adapter["default"].lora_A[0, 0] = float("inf")
    with pytest.raises(AdapterStateError):
        export_at_fit_end(_trainer(strategy, True), target, peft_dir=str(tmp_path / "p"))
    assert not (tmp_path / "p").exists()


# ------------------------------------------------------------------------------------------------------------
# callback: the arguments, and the class swap that puts the hooks in front of the user's module


def test_adapter_callback_defaults_and_arguments_become_its_options(tmp_path) -> None:

    config = la.LoRAConfig(r=4)
    cb = la.AdapterCallback(config)
    assert cb.options == AdapterOptions(
        module=None,
        name="default",
        init_from={},
        active=None,
        save=None,
        export_peft_dir=None,
        export_merged_dir=None,
        gradient_checkpointing=False,
        verbose=True,
    )
    assert cb.config is config and cb._runtime is None
    assert cb.state_dict() == {}
    cb.load_state_dict({"anything": 1})  # nothing set up: ignored
    (tmp_path / "a.ckpt").write_bytes(b"x")
    cb = la.AdapterCallback(
        None,
        "encoder",
        export_peft_dir=tmp_path / "peft",
        export_merged_dir=tmp_path / "merged",
        gradient_checkpointing=True,
        verbose=False,
        name="b",
        init_from=tmp_path / "a.ckpt",
        active="a",
        save=("a", "b"),
    )
    assert cb.options == AdapterOptions(
        module="encoder",
        name="b",
        init_from={"b": str(tmp_path / "a.ckpt")},
        active=["a"],
        save=["a", "b"],
        export_peft_dir=str(tmp_path / "peft"),
        export_merged_dir=str(tmp_path / "merged"),
        gradient_checkpointing=True,
        verbose=False,
    )
    assert cb.config is None
    assert la.AdapterCallback(None, init_from={"a": str(tmp_path / "a.ckpt")}).options.init_from == {
        "a": str(tmp_path / "a.ckpt")
    }


def test_adapter_callback_reads_a_mapping_config_on_first_access() -> None:
    cb = la.AdapterCallback({"method": "lora", "r": 4, "target_modules": ["q"]})
    assert cb.config == la.LoRAConfig(r=4, target_modules=["q"])
    assert cb.config is cb.config


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (
            {"config": 3},
            AdapterTypeError,
            "config must be an adapter config such as LoRAConfig(...) or a mapping such as {'method': 'lora', 'r': 8}, "
            "got int",
        ),
        ({"name": "a.b"}, AdapterConfigError, "AdapterCallback: adapter name 'a.b' is not usable"),
        (
            {"active": 3},
            AdapterConfigError,
            "active must be an adapter name or a list of them (or None for all), got 3",
        ),
        (
            {"save": [1]},
            AdapterConfigError,
            "save must be an adapter name or a list of them (or None for all), got [1]",
        ),
        ({"init_from": "/nonexistent/x"}, AdapterConfigError, "init_from['c'] = '/nonexistent/x' is neither"),
    ],
)
def test_adapter_callback_refuses_bad_arguments_naming_them(kwargs, error, message) -> None:
    kwargs = {"config": la.LoRAConfig(), "name": "c", **kwargs}
    with pytest.raises(error, match=f"^{re.escape(message)}"):
        la.AdapterCallback(**kwargs)


def test_the_callback_uses_its_own_runtime_else_the_modules() -> None:

    module = L.LightningModule()
    own, modules = object(), object()
    module.__dict__[RUNTIME_ATTR] = modules
    cb = la.AdapterCallback(la.LoRAConfig())
    assert cb._rt(module) is modules
    cb._runtime = own
    assert cb._rt(module) is own


class _Log:
    """A stand-in runtime that records what the swapped hooks pass it."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def add_loss_term(self, module, out):
        self.calls.append(("loss", module, out))
        return ("with term", out)

    def on_save_checkpoint(self, module, checkpoint) -> None:
        self.calls.append(("save", module, checkpoint))

    def on_load_checkpoint(self, module, checkpoint) -> None:
        self.calls.append(("load", module, checkpoint))

    def after_configure_model(self, module) -> None:
        self.calls.append(("after", module))


def _user_module_class():

    class ScopeContractNet(L.LightningModule):
        def __init__(self, log: list, callbacks=None) -> None:
            super().__init__()
            self.log_, self.own_callbacks = log, callbacks

        def training_step(self, *args, **kwargs):
            self.log_.append(("user step", args, kwargs))
            return 5

        def on_save_checkpoint(self, checkpoint) -> None:
            self.log_.append(("user save", checkpoint))

        def on_load_checkpoint(self, checkpoint) -> None:
            self.log_.append(("user load", checkpoint))

        def configure_callbacks(self):
            return self.own_callbacks

        def setup(self, stage: str) -> None:
            self.log_.append(("user setup", stage))

    return ScopeContractNet


def _swapped(cls, trainer=None, callbacks=None):

    log = _Log()
    module = cls(log.calls, callbacks)
    module.__dict__[RUNTIME_ATTR] = log
    swap_class(module, trainer)
    return module, log


def test_swapped_hooks_call_the_users_own_hook_and_the_runtime_in_order() -> None:
    module, log = _swapped(_user_module_class())
    assert module.training_step(1, 2, b=3) == ("with term", 5)
    assert log.calls == [("user step", (1, 2), {"b": 3}), ("loss", module, 5)]
    log.calls.clear()
    checkpoint = {"k": 1}
    module.on_save_checkpoint(checkpoint)
    assert log.calls == [("user save", checkpoint), ("save", module, checkpoint)]
    assert log.calls[1][2] is checkpoint
    log.calls.clear()
    module.on_load_checkpoint(checkpoint)
    assert log.calls == [("load", module, checkpoint), ("user load", checkpoint)]
    assert log.calls[0][2] is checkpoint and log.calls[1][1] is checkpoint
    log.calls.clear()
    module.configure_model()
    assert log.calls == [("after", module)]
    log.calls.clear()
    module.setup("fit")  # the user's own setup only: injection follows configure_model
    assert log.calls == [("user setup", "fit")]


class BitsandbytesPrecision:
    """Stands in for Lightning's plugin of that name (only the class name and ``ignore_modules`` are read)."""

    def __init__(self, ignore_modules) -> None:
        self.ignore_modules = ignore_modules


def _trainer_with(plugin) -> object:
    return type("Trainer", (), {"precision_plugin": plugin})()


def test_init_context_refused_only_for_bitsandbytes_with_ignore_modules_and_no_own_configure_model() -> None:

    cls = _user_module_class()
    module = cls([])

    class OwnConfigureModel(cls):
        def configure_model(self) -> None:
            pass

    assert init_context_refused(module, _trainer_with(BitsandbytesPrecision({"head"}))) is True
    assert init_context_refused(OwnConfigureModel([]), _trainer_with(BitsandbytesPrecision({"head"}))) is False
    assert init_context_refused(module, _trainer_with(BitsandbytesPrecision(set()))) is False
    assert init_context_refused(module, _trainer_with(BitsandbytesPrecision(None))) is False
    other = type("OtherPrecision", (), {"ignore_modules": {"head"}})()
    assert init_context_refused(module, _trainer_with(other)) is False
    assert init_context_refused(module, None) is False
    # Any nn.Module is compared with LightningModule's hooks (a plain one has no configure_model of its own).
    assert init_context_refused(nn.Linear(2, 2), _trainer_with(BitsandbytesPrecision({"head"}))) is True
    bare = type("BitsandbytesPrecision", (), {})()  # no ignore_modules at all
    assert init_context_refused(module, _trainer_with(bare)) is False
    assert init_context_refused(module, object()) is False


def test_a_refusing_precision_plugin_moves_the_step_after_configure_model_to_the_end_of_setup() -> None:

    module, log = _swapped(_user_module_class(), _trainer_with(BitsandbytesPrecision({"head"})))
    assert type(module).__mro__[1] is AdapterSetupHooks
    module.setup("fit")
    assert log.calls == [("user setup", "fit"), ("after", module)]

    class OwnConfigureModel(_user_module_class()):
        def configure_model(self) -> None:
            self.log_.append(("user configure_model",))

    # A module with its own configure_model meets the refusal anyway: it keeps the usual hooks.
    module, log = _swapped(OwnConfigureModel, _trainer_with(BitsandbytesPrecision({"head"})))
    assert type(module).__mro__[1] is AdapterModuleHooks
    module.configure_model()
    assert log.calls == [("user configure_model",), ("after", module)]


def test_swap_class_names_a_picklable_class_once_per_user_class_and_hooks() -> None:

    taken = {n for n in vars(callback) if n.startswith("AdapterScopeContractNet")}
    expected = ["AdapterScopeContractNet" + "_" * k for k in range(20)]
    expected = [n for n in expected if n not in taken]
    cls = _user_module_class()
    first, _ = _swapped(cls)
    new = type(first)
    assert new.__bases__ == (AdapterModuleHooks, cls)
    assert (new.__name__, new.__qualname__, new.__module__) == (expected[0], expected[0], callback.__name__)
    assert getattr(callback, expected[0]) is new
    assert sorted(vars(new)) == ["__doc__", "__module__"]
    second, _ = _swapped(cls)
    assert type(second) is new  # one class per user class
    swap_class(second)  # a swapped module is left as it is
    assert type(second) is new
    refused, _ = _swapped(cls, _trainer_with(BitsandbytesPrecision({"head"})))
    assert type(refused).__bases__ == (AdapterSetupHooks, cls)
    assert type(refused).__name__ == expected[1]
    other, _ = _swapped(_user_module_class())  # another class of the same name
    assert type(other).__name__ == expected[2] and type(other) is not new
    restored = pickle.loads(pickle.dumps(first))
    assert type(restored) is new


def test_configure_callbacks_adds_an_adapter_callback_unless_the_trainer_has_one() -> None:

    cls = _user_module_class()
    user = Callback()
    for own, kept in [(None, []), ([user], [user]), ((user,), [user]), (user, [user])]:
        module, _ = _swapped(cls, callbacks=own)
        got = module.configure_callbacks()
        assert isinstance(got, list) and got[:-1] == kept and len(got) == len(kept) + 1
        assert type(got[-1]) is la.AdapterCallback and got[-1].config is None
    trainer = type("Trainer", (), {"callbacks": [Callback()]})()
    module, _ = _swapped(cls, callbacks=(user,))
    module._trainer = trainer
    got = module.configure_callbacks()
    assert got[:-1] == [user] and type(got[-1]) is la.AdapterCallback
    trainer.callbacks.append(la.AdapterCallback(la.LoRAConfig()))
    own = (user,)
    module, _ = _swapped(cls, callbacks=own)
    module._trainer = trainer
    assert module.configure_callbacks() is own
