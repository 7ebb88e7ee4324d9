"""Contract tests of the checkpoint helpers of the Lightning integration: the metadata entry, its checks, the
filter that writes adapter-only checkpoints, the reading of checkpoint files and the resume-time validation.

Each function is called directly with hand-built checkpoints and a tiny ``nn.Sequential`` (no Trainer), and every
branch is pinned: exact returned dicts and key sets, which tensors are kept or loaded, which exception is raised
and where its message starts.
"""

from __future__ import annotations

import pickle
import re
from typing import Any

import pytest
import torch
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel  # imported here, once: expected_shapes imports it too

import lightning_adapters as la
from lightning_adapters.core.state import adapter_prefixes, is_adapter_key
from lightning_adapters.errors import AdapterStateError
from lightning_adapters.lightning.checkpoint import (
    DEEPSPEED_ADAPTER_KEY,
    DEEPSPEED_STATES,
    FORMAT_VERSION,
    METADATA_KEY,
    _adapted_names,
    _check_beside,
    _config_differences,
    _deepspeed_client_state,
    _field_defaults,
    _load_named,
    _shape,
    build_metadata,
    check_metadata,
    check_metadata_entry,
    check_state_entry,
    config_from_entry,
    expected_shapes,
    filter_checkpoint,
    load_checkpoint_file,
    saved_adapters,
    upgrade_unnamed_keys,
    validate_checkpoint,
)

W = "ckpt.ckpt"  # how the refusals name the checkpoint


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))


def _lora(r: int = 2, **kwargs: Any) -> la.LoRAConfig:
    return la.LoRAConfig(r=r, target_modules=["0", "2"], init_weights=False, **kwargs)


def _refused(message_start: str):
    """``pytest.raises(AdapterStateError)`` whose message starts with ``message_start`` (taken literally)."""
    return pytest.raises(AdapterStateError, match="^" + re.escape(message_start))


def _named_state(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """The model's own tensors of adapters ``names`` (named keys), as clones."""
    own = adapter_prefixes(model, names)
    return {k: v.detach().clone() for k, v in model.state_dict().items() if is_adapter_key(k, own)}


def _expected(model: nn.Module):
    """``expected`` as the integration passes it: the full shapes of the given adapters' tensors."""
    calls: list[list[str]] = []

    def expected(names: list[str]) -> dict[str, list[int]]:
        calls.append(names)
        own = adapter_prefixes(model, names)
        return expected_shapes(model, lambda k: is_adapter_key(k, own), {})

    expected.calls = calls
    return expected


class NotAllowed:
    """An object that ``torch.load(weights_only=True)`` refuses."""


# ------------------------------------------------------------------------------------------------------------
# _shape, _adapted_names, expected_shapes


def test_shape_is_a_list_of_ints() -> None:
    got = _shape(torch.zeros(2, 3, 1))
    assert got == [2, 3, 1] and all(type(s) is int for s in got)
    assert _shape(torch.zeros(())) == []


def test_adapted_names_cut_each_key_at_its_first_adapter_marker() -> None:
    keys = iter(
        [
            "enc.fc.adapter.lora_A",
            "enc.fc.adapter.lora_B",
            "dec.fc.adapter.x.lora_A",
            "head.weight",
            "a.adapter.b.adapter.c",
            "adapter.top",
        ]
    )
    assert _adapted_names(keys) == ["a", "dec.fc", "enc.fc"]
    assert _adapted_names([]) == []


def test_expected_shapes_are_the_live_shapes_of_the_saved_keys_and_the_partitions_full_shapes() -> None:
    model = _mlp()
    la.inject(model, _lora())
    lora_a = model[2].adapter.default.lora_A
    lora_a.data = torch.empty(0)  # a ZeRO-3 partition: its full shape is kept as ds_shape
    lora_a.ds_shape = torch.Size([2, 8])
    got = expected_shapes(model, lambda k: k.startswith("2."), {"ignored": [1]})
    assert got == {
        "2.weight": [4, 8],
        "2.bias": [4],
        "2.adapter.default.lora_A": [2, 8],
        "2.adapter.default.lora_B": [4, 2],
    }
    assert all(type(s) is int for shape in got.values() for s in shape)


def test_expected_shapes_under_fsdp1_are_a_copy_of_the_recorded_shapes() -> None:
    class Wrapped(FullyShardedDataParallel):
        def __init__(self) -> None:
            nn.Module.__init__(self)  # only its class matters here

    model = _mlp()
    model.add_module("wrapped", Wrapped())
    recorded = {"0.adapter.default.lora_A": [2, 6]}
    got = expected_shapes(model, lambda k: True, recorded)
    assert got == recorded and got is not recorded


# ------------------------------------------------------------------------------------------------------------
# build_metadata, saved_adapters


def test_build_metadata_describes_the_trained_adapter_among_several() -> None:
    from lightning_adapters import __version__

    a, b = _lora(), la.LoHaConfig(target_modules=["0"])
    active, trainable = ("a", "b"), ("b",)
    meta = build_metadata(
        adapters={"a": ("lora", a), "b": ("loha", b)},
        name="b",
        active=active,
        trainable=trainable,
        module="",
        fingerprint=None,
        shapes={"k": [2]},
    )
    assert meta == {
        "format": FORMAT_VERSION,
        "library_version": __version__,
        "method": "loha",
        "config": b.to_dict(),
        "module": "",
        "name": "b",
        "adapters": {"a": {"method": "lora", "config": a.to_dict()}, "b": {"method": "loha", "config": b.to_dict()}},
        "active": ["a", "b"],
        "trainable": ["b"],
        "base_fingerprint": None,
        "adapter_shapes": {"k": [2]},
    }
    assert FORMAT_VERSION == 2
    assert list(meta) == [
        "format",
        "library_version",
        "method",
        "config",
        "module",
        "name",
        "adapters",
        "active",
        "trainable",
        "base_fingerprint",
        "adapter_shapes",
    ]


def test_build_metadata_of_an_adapter_the_file_does_not_hold_describes_the_first() -> None:
    a, b = _lora(), la.LoHaConfig(target_modules=["0"])
    meta = build_metadata(
        adapters={"a": ("lora", a), "b": ("loha", b)},
        name="c",
        active=[],
        trainable=[],
        module="m",
        fingerprint="fp",
        shapes={},
    )
    assert (meta["method"], meta["config"], meta["name"]) == ("lora", a.to_dict(), "c")
    assert (meta["active"], meta["trainable"], meta["base_fingerprint"], meta["module"]) == ([], [], "fp", "m")


def test_saved_adapters_of_a_format_1_entry_is_its_one_adapter_under_the_given_name() -> None:
    meta = {"method": "lora", "config": {"r": 2}}
    assert saved_adapters(meta, W) == {"default": {"method": "lora", "config": {"r": 2}}}
    assert saved_adapters(meta, W, "x") == {"x": {"method": "lora", "config": {"r": 2}}}


def test_saved_adapters_of_a_format_2_entry_is_its_adapters_entry() -> None:
    adapters = {"a": {"method": "lora", "config": {}}, "b": {"method": "loha", "config": {"x": 1}}}
    meta = {"method": "lora", "config": {}, "adapters": adapters, "active": ["a"], "trainable": []}
    assert saved_adapters(meta, W, "ignored") is adapters
    # active and trainable may be absent
    assert saved_adapters({"method": "lora", "config": {}, "adapters": adapters}, W) is adapters


@pytest.mark.parametrize(
    "adapters",
    [
        [("a", {"method": "lora", "config": {}})],
        {},
        {1: {"method": "lora", "config": {}}},
        {"a": "lora"},
        {"a": {"method": 1, "config": {}}},
        {"a": {"config": {}}},
        {"a": {"method": "lora", "config": "r=2"}},
        {"a": {"method": "lora"}},
        {"a": {"method": "lora", "config": {}}, "b": {"method": "lora", "config": []}},
    ],
)
def test_saved_adapters_refuses_a_damaged_adapters_entry(adapters: Any) -> None:
    with _refused(f"{W}: 'lightning_adapters'['adapters'] must map adapter names"):
        saved_adapters({"method": "lora", "config": {}, "adapters": adapters}, W)


@pytest.mark.parametrize("key", ["active", "trainable"])
@pytest.mark.parametrize("names", [("a",), ["a", 1], "a", None])
def test_saved_adapters_refuses_active_or_trainable_that_are_not_lists_of_names(key: str, names: Any) -> None:
    meta = {"method": "lora", "config": {}, "adapters": {"a": {"method": "lora", "config": {}}}, key: names}
    with _refused(f"{W}: 'lightning_adapters'[{key!r}] must be a list of adapter names"):
        saved_adapters(meta, W)
    meta[key] = ["a"]
    assert list(saved_adapters(meta, W)) == ["a"]


# ------------------------------------------------------------------------------------------------------------
# filter_checkpoint


def _filter_input(**overrides: torch.Tensor) -> tuple[dict[str, Any], dict[str, Any]]:
    state = {
        "0.weight": torch.zeros(8, 6),
        "0.adapter.default.lora_A": torch.ones(2, 6),
        "0.adapter.default.lora_B": torch.ones(8, 2),
        "head.weight": torch.ones(4, 8),
    }
    state.update(overrides)
    meta = {
        "method": "lora",
        "adapter_shapes": {
            "0.adapter.default.lora_A": [2, 6],
            "0.adapter.default.lora_B": [8, 2],
            "head.weight": [4, 8],
        },
    }
    return {"state_dict": state, "epoch": 3}, meta


def _saved(key: str) -> bool:
    return ".adapter." in key or key.startswith("head.")


def test_filter_checkpoint_keeps_the_saved_tensors_and_adds_the_metadata() -> None:
    checkpoint, meta = _filter_input()
    state = checkpoint["state_dict"]
    filter_checkpoint(checkpoint, meta, _saved)
    assert list(checkpoint) == ["state_dict", "epoch", METADATA_KEY]
    assert list(checkpoint["state_dict"]) == ["0.adapter.default.lora_A", "0.adapter.default.lora_B", "head.weight"]
    assert all(checkpoint["state_dict"][k] is state[k] for k in checkpoint["state_dict"])
    assert checkpoint[METADATA_KEY] is meta and checkpoint["epoch"] == 3


def test_filter_checkpoint_of_a_rank_without_state_writes_nothing_and_checks_nothing() -> None:
    meta = {"adapter_shapes": {"0.adapter.default.lora_A": [2, 6]}}
    checkpoint: dict[str, Any] = {"epoch": 1}
    filter_checkpoint(checkpoint, meta, _saved)
    assert checkpoint == {"epoch": 1, "state_dict": {}, METADATA_KEY: meta}
    checkpoint = {"state_dict": {}}
    filter_checkpoint(checkpoint, {"no shapes": True}, _saved)
    assert checkpoint == {"state_dict": {}, METADATA_KEY: {"no shapes": True}}


def test_filter_checkpoint_refuses_a_missing_adapter_tensor_alone() -> None:
    checkpoint, meta = _filter_input()
    del checkpoint["state_dict"]["0.adapter.default.lora_B"]
    with _refused("refusing to write an adapter checkpoint that would not restore: missing"):
        filter_checkpoint(checkpoint, meta, _saved)
    assert METADATA_KEY not in checkpoint and "0.weight" in checkpoint["state_dict"]


def test_filter_checkpoint_refuses_a_partial_tensor_alone() -> None:
    checkpoint, meta = _filter_input(**{"head.weight": torch.ones(2, 8)})
    with _refused("refusing to write an adapter checkpoint that would not restore: partial or empty tensors"):
        filter_checkpoint(checkpoint, meta, _saved)


def test_filter_checkpoint_refuses_a_still_sharded_tensor_alone() -> None:
    sharded = torch.ones(2, 6)
    sharded.device_mesh = object()  # what a DTensor carries
    checkpoint, meta = _filter_input(**{"0.adapter.default.lora_A": sharded})
    with _refused("refusing to write an adapter checkpoint that would not restore: still-sharded tensors"):
        filter_checkpoint(checkpoint, meta, _saved)


# ------------------------------------------------------------------------------------------------------------
# check_metadata_entry, check_state_entry


@pytest.mark.parametrize(
    "meta",
    [
        {"method": "lora", "config": {}},
        {"method": "lora", "config": {}, "module": None, "base_fingerprint": None},
        {"method": "lora", "config": {}, "module": "model", "base_fingerprint": "fp", "adapter_shapes": {"k": [1]}},
    ],
)
def test_check_metadata_entry_accepts_what_the_integration_writes(meta: dict[str, Any]) -> None:
    check_metadata_entry(meta, W)


@pytest.mark.parametrize(
    ("meta", "message"),
    [
        (["method", "config"], f"{W}: the 'lightning_adapters' entry must be a dict, got list"),
        ({"config": {}}, f"{W}: the 'lightning_adapters' entry has no 'method' key"),
        ({"method": "lora"}, f"{W}: the 'lightning_adapters' entry has no 'config' key"),
        ({"method": 1, "config": {}}, f"{W}: 'lightning_adapters'['method'] must be a str"),
        ({"method": "lora", "config": []}, f"{W}: 'lightning_adapters'['config'] must be a dict"),
        ({"method": "lora", "config": {}, "module": 3}, f"{W}: 'lightning_adapters'['module'] must be a string"),
        (
            {"method": "lora", "config": {}, "base_fingerprint": b"fp"},
            f"{W}: 'lightning_adapters'['base_fingerprint'] must be a string",
        ),
        (
            {"method": "lora", "config": {}, "adapter_shapes": [["k", [1]]]},
            f"{W}: 'lightning_adapters'['adapter_shapes'] must be a dict",
        ),
    ],
)
def test_check_metadata_entry_refuses_each_damaged_field(meta: Any, message: str) -> None:
    with _refused(message):
        check_metadata_entry(meta, W)


def test_check_state_entry_returns_the_state_dict_itself() -> None:
    state = {"a": torch.zeros(1), "b": torch.ones(2)}
    assert check_state_entry({"state_dict": state, "epoch": 0}, W) is state
    empty: dict[str, Any] = {}
    assert check_state_entry({"state_dict": empty}, W) is empty


@pytest.mark.parametrize(
    ("checkpoint", "message"),
    [
        ({"epoch": 0, 1: 2}, f"{W} has no 'state_dict' key (it holds ['1', 'epoch'])"),
        ({"state_dict": [torch.zeros(1)]}, f"{W}: 'state_dict' must be a dict of tensors, got list"),
        (
            {"state_dict": {"a": torch.zeros(1), "b": 1, "c": [2]}},
            f"{W}: 'state_dict' values must be tensors; got b (int), c (list);",
        ),
    ],
)
def test_check_state_entry_refuses_what_is_not_a_dict_of_tensors(checkpoint: dict, message: str) -> None:
    with _refused(message):
        check_state_entry(checkpoint, W)


# ------------------------------------------------------------------------------------------------------------
# _field_defaults, _config_differences, check_metadata


def test_field_defaults_are_every_fields_default_factories_included() -> None:
    import dataclasses

    defaults = _field_defaults("lora")
    fresh = la.LoRAConfig()
    assert defaults == {f.name: getattr(fresh, f.name) for f in dataclasses.fields(la.LoRAConfig)}
    assert defaults["r"] == 8 and defaults["target_modules"] is None
    assert defaults["rank_pattern"] == {} and defaults["alpha_pattern"] == {}


def test_config_differences_list_each_changed_field_once_in_order() -> None:
    saved = {"a": 1, "b": "two", "d": 5, "f": 1}
    current = {"a": 1, "b": "three", "c": 4, "d": None, "e": 7}
    defaults = {"c": 4, "e": 6, "f": 0}
    assert _config_differences(saved, current, defaults) == [
        "b: checkpoint 'two', now 'three'",
        "e: checkpoint 6, now 7",
    ]
    assert _config_differences({}, {"g": 1}, {}) == ["g: checkpoint None, now 1"]
    assert _config_differences(saved, dict(saved), {}) == []


def _two_adapter_meta(b_method: str = "lora") -> dict[str, Any]:
    a, b = _lora().to_dict(), _lora(r=4).to_dict()
    return {
        "method": "lora",
        "config": a,
        "name": "a",
        "adapters": {"a": {"method": "lora", "config": a}, "b": {"method": b_method, "config": b}},
        "active": ["a", "b"],
        "trainable": ["a"],
        "base_fingerprint": "fp",
    }


def test_check_metadata_compares_the_trained_adapter_or_the_named_one() -> None:
    meta = _two_adapter_meta()
    a, b = _lora().to_dict(), _lora(r=4).to_dict()
    check_metadata(meta, "lora", a, "fp")
    check_metadata(meta, "lora", a, "fp", name="a")
    check_metadata(meta, "lora", b, "fp", name="b")
    with _refused("the checkpoint was trained with a different lora config (r: checkpoint 2, now 4); resume"):
        check_metadata(meta, "lora", b, "fp")
    with _refused("the checkpoint was trained with a different lora config (r: checkpoint 4, now 2) for adapter 'b'"):
        check_metadata(meta, "lora", a, "fp", name="b")


def test_check_metadata_names_the_adapter_only_when_the_file_holds_several() -> None:
    meta = _two_adapter_meta(b_method="loha")
    with _refused("the checkpoint holds a 'loha' adapter for adapter 'b' but this model uses 'lora'; resume"):
        check_metadata(meta, "lora", _lora(r=4).to_dict(), None, name="b")
    with _refused("the checkpoint holds a 'lora' adapter but this model uses 'loha'; resume"):
        check_metadata(meta, "loha", _lora().to_dict(), None)
    one = {**meta, "adapters": {"a": meta["adapters"]["a"]}}
    with _refused("the checkpoint holds a 'lora' adapter but this model uses 'loha'; resume"):
        check_metadata(one, "loha", _lora().to_dict(), None, name="a")
    with _refused("the checkpoint was trained with a different lora config (r: checkpoint 2, now 4); resume"):
        check_metadata(one, "lora", _lora(r=4).to_dict(), None, name="a")


def test_check_metadata_of_a_format_1_file_reads_its_one_adapter_under_the_given_name() -> None:
    meta = {"method": "lora", "config": _lora().to_dict()}
    check_metadata(meta, "lora", _lora().to_dict(), None, name="x")
    with _refused("the checkpoint was trained with a different lora config (r: checkpoint 2, now 4); resume"):
        check_metadata(meta, "lora", _lora(r=4).to_dict(), None, name="x")


def test_check_metadata_refuses_a_damaged_entry_naming_the_checkpoint() -> None:
    with _refused("the checkpoint: the 'lightning_adapters' entry has no 'config' key"):
        check_metadata({"method": "lora"}, "lora", {}, None)
    with _refused("the checkpoint: 'lightning_adapters'['adapters'] must map"):
        check_metadata({"method": "lora", "config": {}, "adapters": []}, "lora", {}, None, name="a")


def test_check_metadata_fills_fields_the_file_lacks_with_their_defaults() -> None:
    config = _lora().to_dict()
    saved = {k: v for k, v in config.items() if k not in ("alpha", "rank_pattern")}
    check_metadata({"method": "lora", "config": saved}, "lora", config, None)
    with _refused("the checkpoint was trained with a different lora config (alpha: checkpoint 8.0, now 5)"):
        check_metadata({"method": "lora", "config": saved}, "lora", _lora(alpha=5).to_dict(), None)


@pytest.mark.parametrize(
    ("saved", "current", "refused"),
    [("fp", "fp", False), ("fp", "other", True), (None, "fp", False), ("fp", None, False), (None, None, False)],
)
def test_check_metadata_compares_the_fingerprints_when_both_are_known(saved, current, refused) -> None:
    meta = {"method": "lora", "config": _lora().to_dict(), "base_fingerprint": saved}
    if refused:
        with _refused("the checkpoint was trained on a different base model (fingerprint fp, this model other)"):
            check_metadata(meta, "lora", _lora().to_dict(), current)
    else:
        check_metadata(meta, "lora", _lora().to_dict(), current)


# ------------------------------------------------------------------------------------------------------------
# config_from_entry


def test_config_from_entry_rebuilds_the_config() -> None:
    config = _lora(alpha=3)
    got = config_from_entry({"method": "lora", "config": config.to_dict()}, W)
    assert isinstance(got, la.LoRAConfig) and got == config
    # a field the file lacks takes its default
    assert config_from_entry({"method": "loha", "config": {"target_modules": ["0"]}}, W) == la.LoHaConfig(
        target_modules=["0"]
    )


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"method": "nope", "config": {}}, f"{W}: "),
        (
            {"method": "lora", "config": {"r": 2, "zz": 1, "yy": 2}},
            f"{W}: the lora config in the checkpoint has unknown fields ['yy', 'zz']; it was written by another "
            "version of lightning_adapters (library_version '0.0.1') or edited",
        ),
        ({"method": "lora", "config": {"r": 0}}, f"{W}: the checkpoint's lora config is invalid: lora: r must be"),
    ],
)
def test_config_from_entry_refuses_naming_the_file(entry: dict[str, Any], message: str) -> None:
    entry["library_version"] = "0.0.1"
    with _refused(message):
        config_from_entry(entry, W)


# ------------------------------------------------------------------------------------------------------------
# load_checkpoint_file, _deepspeed_client_state


def test_load_checkpoint_file_reads_onto_the_cpu(tmp_path, monkeypatch) -> None:
    import torch.serialization

    path = tmp_path / "a.ckpt"
    # A file written on a GPU: its storages are tagged "cuda:0" (loading them where they were fails without one).
    with monkeypatch.context() as m:
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save({"state_dict": {"w": torch.arange(3.0)}, "epoch": 2}, path)
    got = load_checkpoint_file(str(path))
    assert list(got) == ["state_dict", "epoch"] and got["epoch"] == 2
    assert got["state_dict"]["w"].device.type == "cpu" and torch.equal(got["state_dict"]["w"], torch.arange(3.0))


def test_load_checkpoint_file_is_weights_only_unless_told(tmp_path) -> None:
    path = tmp_path / "a.ckpt"
    torch.save({"obj": NotAllowed()}, path)
    refused = f"GLOBAL {NotAllowed.__module__}.{NotAllowed.__qualname__} was not an allowed global by default"
    with _refused(f"{path} holds objects that torch.load(weights_only=True) refuses (Unsupported global: {refused});"):
        load_checkpoint_file(path)
    with _refused(f"{path} holds objects that torch.load(weights_only=True) refuses"):
        load_checkpoint_file(path, weights_only=True)
    assert isinstance(load_checkpoint_file(path, weights_only=False)["obj"], NotAllowed)


def test_load_checkpoint_file_refuses_a_missing_file_or_a_plain_directory(tmp_path) -> None:
    with pytest.raises(
        AdapterStateError, match=f"^checkpoint file {re.escape(str(tmp_path / 'none.ckpt'))} does not exist$"
    ):
        load_checkpoint_file(tmp_path / "none.ckpt")
    (tmp_path / "dir.ckpt" / "checkpoint").mkdir(parents=True)
    with _refused(f"{tmp_path / 'dir.ckpt'} is a directory (a sharded checkpoint)"):
        load_checkpoint_file(tmp_path / "dir.ckpt")


def _torch_error(path, weights_only: bool) -> str:
    """``Type: first line`` of the error ``torch.load`` raises on ``path`` (its wording is torch's)."""
    try:
        torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as err:
        return f"{type(err).__name__}: {str(err).splitlines()[0]}"
    raise AssertionError(f"{path} loaded")


def test_load_checkpoint_file_refuses_an_unreadable_file_naming_the_first_line_of_the_error(tmp_path) -> None:
    path = tmp_path / "a.ckpt"
    torch.save({"state_dict": {"w": torch.ones(64)}}, path)
    path.write_bytes(path.read_bytes()[:200])  # a copy that did not finish
    reason = _torch_error(path, True)
    assert "weights_only" not in reason
    with _refused(f"{path} is not a readable checkpoint ({reason}); it may be truncated"):
        load_checkpoint_file(path)
    path.write_bytes(b"garbage bytes here")
    with _refused(f"{path} is not a readable checkpoint ({_torch_error(path, False)}); it may be truncated"):
        load_checkpoint_file(path, weights_only=False)
    # Bytes that are no pickle: torch's weights-only loader words it as a refusal, but no object was refused and
    # weights_only=False would not help; the reason is the unpickler's own complaint.
    with _refused(f"{path} is not a readable checkpoint (UnpicklingError: Unsupported operand 103); it may be"):
        load_checkpoint_file(path)


_WEIGHTS_ONLY = "Weights only load failed. Re-running `torch.load` with `weights_only` set to `False` ...\n"


@pytest.mark.parametrize(
    ("detail", "refusal"),
    [
        ("Trying to call reduce for unrecognized function <built-in function eval>", True),
        ("Can only build Tensor, Parameter, OrderedDict or types allowlisted via add_safe_globals, but got X", True),
        ("Unsupported operand 149", False),
        ("String is too long", False),
        ("unsupported persistent id encountered", False),
        ("pickle data was truncated", False),
    ],
)
def test_a_weights_only_failure_is_a_refusal_unless_the_bytes_are_no_pickle(tmp_path, monkeypatch, detail, refusal):
    path = tmp_path / "a.ckpt"
    path.write_bytes(b"x")

    def fail(*args: Any, **kwargs: Any) -> None:
        raise pickle.UnpicklingError(f"{_WEIGHTS_ONLY}\tWeightsUnpickler error: {detail}. More words.\n\nCheck ...")

    monkeypatch.setattr(torch, "load", fail)
    if refusal:
        with _refused(f"{path} holds objects that torch.load(weights_only=True) refuses ({detail}); if you trust"):
            load_checkpoint_file(path)
    else:
        with _refused(f"{path} is not a readable checkpoint (UnpicklingError: {detail}); it may be truncated"):
            load_checkpoint_file(path)
    # Asked not to be weights-only, the same words are no refusal (torch.load raised for another reason).
    with _refused(f"{path} is not a readable checkpoint (UnpicklingError: {detail}); it may be truncated"):
        load_checkpoint_file(path, weights_only=False)


@pytest.mark.parametrize("end", [".", ""])
def test_the_unpicklers_complaint_is_named_without_its_closing_full_stop(tmp_path, monkeypatch, end: str) -> None:
    path = tmp_path / "a.ckpt"
    path.write_bytes(b"x")

    def fail(*args: Any, **kwargs: Any) -> None:
        raise pickle.UnpicklingError(f"{_WEIGHTS_ONLY}WeightsUnpickler error: Unsupported operand 149{end}\n\nCheck")

    monkeypatch.setattr(torch, "load", fail)
    with pytest.raises(AdapterStateError, match=r"\(UnpicklingError: Unsupported operand 149\); it may be truncated"):
        load_checkpoint_file(path)


@pytest.mark.parametrize(
    ("error", "reason"),
    [(RuntimeError("first line\nsecond line"), "RuntimeError: first line"), (EOFError(), "EOFError")],
)
def test_load_checkpoint_file_names_the_first_line_of_the_error_or_its_type(tmp_path, monkeypatch, error, reason):
    path = tmp_path / "a.ckpt"
    path.write_bytes(b"x")

    def fail(*args: Any, **kwargs: Any) -> None:
        raise error

    monkeypatch.setattr(torch, "load", fail)
    with _refused(f"{path} is not a readable checkpoint ({reason}); it may be truncated"):
        load_checkpoint_file(path)


def _deepspeed_dir(tmp_path, which: int, states: dict[str, Any]):
    directory = tmp_path / "last.ckpt"
    (directory / DEEPSPEED_STATES[which]).parent.mkdir(parents=True)
    torch.save(states, directory / DEEPSPEED_STATES[which])
    return directory


@pytest.mark.parametrize("which", [0, 1])
def test_a_deepspeed_directory_reads_as_the_adapter_checkpoint_it_holds(tmp_path, which: int) -> None:
    adapter = {"0.adapter.default.lora_A": torch.ones(2, 6)}
    states = {METADATA_KEY: {"method": "lora"}, DEEPSPEED_ADAPTER_KEY: adapter, "module": {"big": torch.zeros(1)}}
    directory = _deepspeed_dir(tmp_path, which, states)
    for got in (
        load_checkpoint_file(directory),
        _deepspeed_client_state(directory, directory / DEEPSPEED_STATES[which], True),
    ):
        assert list(got) == [METADATA_KEY, DEEPSPEED_ADAPTER_KEY, "module", "state_dict"]
        assert got[METADATA_KEY] == {"method": "lora"} and list(got["state_dict"]) == list(adapter)
        assert torch.equal(got["state_dict"]["0.adapter.default.lora_A"], torch.ones(2, 6))


@pytest.mark.parametrize("missing", [METADATA_KEY, DEEPSPEED_ADAPTER_KEY])
def test_a_deepspeed_directory_without_the_integrations_entries_is_refused(tmp_path, missing: str) -> None:
    states = {METADATA_KEY: {"method": "lora"}, DEEPSPEED_ADAPTER_KEY: {}}
    del states[missing]
    directory = _deepspeed_dir(tmp_path, 0, states)
    with _refused(f"{directory} is a DeepSpeed checkpoint written without lightning_adapters"):
        load_checkpoint_file(directory)


def test_the_deepspeed_client_state_is_read_weights_only_unless_told(tmp_path) -> None:
    states = {METADATA_KEY: {}, DEEPSPEED_ADAPTER_KEY: {}, "obj": NotAllowed()}
    directory = _deepspeed_dir(tmp_path, 1, states)
    with _refused(f"{directory / DEEPSPEED_STATES[1]} holds objects that torch.load(weights_only=True) refuses"):
        load_checkpoint_file(directory)
    assert isinstance(load_checkpoint_file(directory, weights_only=False)["obj"], NotAllowed)
    assert isinstance(_deepspeed_client_state(directory, directory / DEEPSPEED_STATES[1], False)["obj"], NotAllowed)


# ------------------------------------------------------------------------------------------------------------
# upgrade_unnamed_keys


def test_unnamed_keys_are_renamed_for_a_one_adapter_model() -> None:
    model = _mlp()
    la.inject(model, _lora(), name="x")
    a = torch.ones(2, 6)
    checkpoint = {
        "state_dict": {"0.adapter.lora_A": a, "0.weight": torch.zeros(8, 6), "2.adapter.x.lora_B": torch.ones(4, 2)},
        METADATA_KEY: {"adapter_shapes": {"0.adapter.lora_A": [2, 6], "other": [1]}, "method": "lora"},
        "epoch": 1,
    }
    upgrade_unnamed_keys(checkpoint, model)
    assert list(checkpoint) == ["state_dict", METADATA_KEY, "epoch"]
    assert list(checkpoint["state_dict"]) == ["0.adapter.x.lora_A", "0.weight", "2.adapter.x.lora_B"]
    assert checkpoint["state_dict"]["0.adapter.x.lora_A"] is a
    assert checkpoint[METADATA_KEY] == {
        "adapter_shapes": {"0.adapter.x.lora_A": [2, 6], "other": [1]},
        "method": "lora",
    }


def test_unnamed_keys_are_left_alone_without_a_state_or_shapes_entry() -> None:
    model = _mlp()
    la.inject(model, _lora(), name="x")
    checkpoint: dict[str, Any] = {"epoch": 1}
    upgrade_unnamed_keys(checkpoint, model)
    assert checkpoint == {"epoch": 1}
    checkpoint = {"state_dict": [1], METADATA_KEY: {"method": "lora"}}
    upgrade_unnamed_keys(checkpoint, model)
    assert checkpoint == {"state_dict": [1], METADATA_KEY: {"method": "lora"}}
    checkpoint = {"state_dict": {"0.adapter.lora_A": 1}, METADATA_KEY: "damaged"}
    upgrade_unnamed_keys(checkpoint, model)
    assert checkpoint == {"state_dict": {"0.adapter.x.lora_A": 1}, METADATA_KEY: "damaged"}


@pytest.mark.parametrize("names", [[], ["a", "b"]])
def test_unnamed_keys_are_left_alone_unless_the_model_has_one_adapter(names: list[str]) -> None:
    model = _mlp()
    for n in names:
        la.inject(model, _lora(), name=n)
    checkpoint = {"state_dict": {"0.adapter.lora_A": 1}, METADATA_KEY: {"adapter_shapes": {"0.adapter.lora_A": [1]}}}
    upgrade_unnamed_keys(checkpoint, model)
    assert checkpoint == {
        "state_dict": {"0.adapter.lora_A": 1},
        METADATA_KEY: {"adapter_shapes": {"0.adapter.lora_A": [1]}},
    }


# ------------------------------------------------------------------------------------------------------------
# _load_named, _check_beside


def _trained(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g))
    return model


def _one_adapter(seed: int = 0) -> nn.Module:
    model = _mlp()
    la.inject(model, _lora(), name="x")
    return _trained(model, seed)


def test_load_named_of_a_one_adapter_model_takes_the_unnamed_layout_strictly() -> None:
    trained, fresh = _one_adapter(1), _one_adapter(2)
    unnamed = {k.replace(".adapter.x.", ".adapter."): v for k, v in _named_state(trained, ["x"]).items()}
    _load_named(fresh, unnamed, ["x"], True)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in _named_state(trained, ["x"]).items())
    # strict: a missing tensor is refused
    partial = dict(unnamed)
    del partial["2.adapter.lora_B"]
    with _refused("adapter state does not fit the model: missing keys"):
        _load_named(_one_adapter(2), partial, ["x"], True)


def test_load_named_of_a_one_adapter_model_checks_finiteness_only_when_asked() -> None:
    state = _named_state(_one_adapter(1), ["x"])
    state["0.adapter.x.lora_A"][0, 0] = float("nan")
    with _refused("adapter state does not fit the model: bad values"):
        _load_named(_one_adapter(2), state, ["x"], True)
    fresh = _one_adapter(2)
    _load_named(fresh, state, ["x"], False)
    assert torch.isnan(fresh[0].adapter.x.lora_A[0, 0])


def _two_adapters(seed: int) -> nn.Module:
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    la.inject(model, la.LoRAConfig(r=2, target_modules=["0"], modules_to_save=["4"], init_weights=False), name="a")
    la.inject(model, la.LoRAConfig(r=2, target_modules=["2"], init_weights=False), name="b")
    return _trained(model, seed)


def test_load_named_loads_only_the_named_adapters_with_their_saved_modules() -> None:
    trained = _two_adapters(1)
    a_state = _named_state(trained, ["a"])
    assert any(".adapter." not in k for k in a_state)  # modules_to_save tensors ride along with "a"
    fresh = _two_adapters(2)
    b_before = _named_state(fresh, ["b"])
    _load_named(fresh, a_state, ["a"], True)
    got = fresh.state_dict()
    assert all(torch.equal(got[k], v) for k, v in a_state.items())
    assert all(torch.equal(got[k], v) for k, v in b_before.items())
    # both, from one state holding both
    fresh = _two_adapters(2)
    _load_named(fresh, _named_state(trained, ["a", "b"]), ["a", "b"], True)
    got = fresh.state_dict()
    assert all(torch.equal(got[k], v) for k, v in _named_state(trained, ["a", "b"]).items())


def test_load_named_of_several_adapters_is_strict_and_checks_finiteness_only_when_asked() -> None:
    state = _named_state(_two_adapters(1), ["a", "b"])
    partial = dict(state)
    del partial["2.adapter.b.lora_B"]
    with _refused("adapter state does not fit the model: missing keys"):
        _load_named(_two_adapters(2), partial, ["a", "b"], True)
    state["2.adapter.b.lora_A"][0, 0] = float("inf")
    with _refused("adapter state does not fit the model: bad values"):
        _load_named(_two_adapters(2), state, ["a", "b"], True)
    fresh = _two_adapters(2)
    _load_named(fresh, state, ["a", "b"], False)
    assert torch.isinf(fresh[2].adapter.b.lora_A[0, 0])


def test_check_beside_accepts_tensors_of_the_model_and_refuses_others() -> None:
    model = _mlp()
    _check_beside(model, {}, W)
    _check_beside(model, {"2.weight": torch.zeros(4, 8), "0.bias": torch.zeros(8)}, W)
    message = f"{W}: the tensors trained beside the adapter do not fit this model"
    with _refused(message):
        _check_beside(model, {"2.weight": torch.zeros(8, 4)}, W)
    with _refused(message):
        _check_beside(model, {"head.weight": torch.zeros(4, 8)}, W)


# ------------------------------------------------------------------------------------------------------------
# validate_checkpoint


def _with_adapters(names_and_ranks: dict[str, int]) -> tuple[nn.Module, dict[str, tuple[str, la.LoRAConfig]]]:
    model = _mlp()
    adapters = {}
    for n, r in names_and_ranks.items():
        la.inject(model, _lora(r=r), name=n)
        adapters[n] = ("lora", _lora(r=r))
    return _trained(model, 1), adapters


def _meta(model: nn.Module, adapters: dict, names: list[str]) -> dict[str, Any]:
    state = _named_state(model, names)
    meta = build_metadata(
        adapters={n: adapters[n] for n in names},
        name=names[0],
        active=names,
        trainable=names,
        module="",
        fingerprint="fp",
        shapes={k: list(v.shape) for k, v in state.items()},
    )
    return meta


def _validate(checkpoint: dict, model: nn.Module, adapters: dict, fingerprint: str | None = "fp", expected=None):
    expected = expected or _expected(model)
    validate_checkpoint(checkpoint, model, adapters=adapters, fingerprint=fingerprint, expected=expected)
    return expected.calls


def test_validate_accepts_the_checkpoint_of_the_model_and_asks_for_the_held_adapters_shapes() -> None:
    model, adapters = _with_adapters({"a": 2, "b": 4})
    checkpoint = {"state_dict": _named_state(model, ["a"]), METADATA_KEY: _meta(model, adapters, ["a"])}
    before = {k: v.clone() for k, v in checkpoint["state_dict"].items()}
    assert _validate(checkpoint, model, adapters) == [["a"]]
    assert list(checkpoint["state_dict"]) == list(before)
    # a full save: the model's other tensors may be there too
    checkpoint["state_dict"] = {**{k: v.clone() for k, v in model.state_dict().items() if ".b." not in k}}
    assert _validate(checkpoint, model, adapters) == [["a"]]
    # without metadata, all of the model's adapters are expected
    assert _validate({"state_dict": _named_state(model, ["a", "b"])}, model, adapters) == [["a", "b"]]


def test_validate_upgrades_unnamed_keys_in_place() -> None:
    model, adapters = _with_adapters({"x": 2})
    named = _named_state(model, ["x"])
    meta = _meta(model, adapters, ["x"])
    meta["adapter_shapes"] = {k.replace(".adapter.x.", ".adapter."): v for k, v in meta["adapter_shapes"].items()}
    del meta["adapters"]  # format 1
    unnamed = {k.replace(".adapter.x.", ".adapter."): v for k, v in named.items()}
    checkpoint = {"state_dict": unnamed, METADATA_KEY: meta}
    assert _validate(checkpoint, model, adapters) == [["x"]]
    assert list(checkpoint["state_dict"]) == list(named)
    assert list(checkpoint[METADATA_KEY]["adapter_shapes"]) == list(named)


def test_validate_reads_a_format_1_file_as_the_default_adapter_of_a_model_with_several() -> None:
    model, adapters = _with_adapters({"b": 4, "default": 2})
    meta = _meta(model, adapters, ["default"])
    del meta["adapters"]
    checkpoint = {"state_dict": _named_state(model, ["default"]), METADATA_KEY: meta}
    assert _validate(checkpoint, model, adapters) == [["default"]]


def test_validate_refuses_adapters_the_model_lacks() -> None:
    model, adapters = _with_adapters({"a": 2, "b": 4})
    checkpoint = {"state_dict": _named_state(model, ["a", "b"]), METADATA_KEY: _meta(model, adapters, ["a", "b"])}
    with _refused("the checkpoint holds adapters ['b'] this model does not have (it has ['a'])"):
        _validate(checkpoint, model, {"a": adapters["a"]})


def test_validate_compares_each_held_adapters_own_config_and_the_fingerprint() -> None:
    model, adapters = _with_adapters({"a": 2, "b": 4})
    checkpoint = {"state_dict": _named_state(model, ["a", "b"]), METADATA_KEY: _meta(model, adapters, ["a", "b"])}
    assert _validate(checkpoint, model, adapters) == [["a", "b"]]
    changed = {**adapters, "b": ("lora", _lora(r=4, alpha=3))}
    with _refused("the checkpoint was trained with a different lora config (alpha: checkpoint 8.0, now 3) for "):
        _validate(checkpoint, model, changed)
    with _refused("the checkpoint holds a 'lora' adapter for adapter 'b' but this model uses 'loha'"):
        _validate(checkpoint, model, {**adapters, "b": ("loha", _lora(r=4))})
    with _refused("the checkpoint was trained on a different base model (fingerprint fp, this model other)"):
        _validate(checkpoint, model, adapters, fingerprint="other")
    _validate(checkpoint, model, adapters, fingerprint=None)


def test_validate_refuses_a_damaged_metadata_entry_naming_the_checkpoint() -> None:
    model, adapters = _with_adapters({"a": 2})
    state = _named_state(model, ["a"])
    with _refused("the checkpoint: the 'lightning_adapters' entry has no 'method' key"):
        _validate({"state_dict": state, METADATA_KEY: {"config": {}}}, model, adapters)
    meta = _meta(model, adapters, ["a"])
    meta["adapters"] = []
    with _refused("the checkpoint: 'lightning_adapters'['adapters'] must map"):
        _validate({"state_dict": state, METADATA_KEY: meta}, model, adapters)


def test_validate_compares_the_saved_shapes_even_when_the_tensors_fit() -> None:
    model, adapters = _with_adapters({"a": 2})
    meta = _meta(model, adapters, ["a"])
    meta["adapter_shapes"]["0.adapter.a.lora_A"] = [3, 6]
    with _refused("the checkpoint's adapter does not fit this model: mis-shaped 0.adapter.a.lora_A"):
        _validate({"state_dict": _named_state(model, ["a"]), METADATA_KEY: meta}, model, adapters)
    del meta["adapter_shapes"]
    with _refused("the checkpoint's adapter does not fit this model: missing keys"):
        _validate({"state_dict": _named_state(model, ["a"]), METADATA_KEY: meta}, model, adapters)


@pytest.mark.parametrize("with_meta", [True, False])
def test_validate_refuses_tensors_that_are_not_the_models_adapter(with_meta: bool) -> None:
    model, adapters = _with_adapters({"a": 2})
    origin = "" if with_meta else " (it was not written by lightning_adapters)"
    message = f"the checkpoint{origin} does not hold this model's adapter: "

    def check(state: dict[str, torch.Tensor], part: str) -> None:
        checkpoint: dict[str, Any] = {"state_dict": state}
        if with_meta:
            checkpoint[METADATA_KEY] = _meta(model, adapters, ["a"])
        with _refused(message + part):
            _validate(checkpoint, model, adapters)

    state = _named_state(model, ["a"])
    check({**state, "head.weight": torch.zeros(1)}, "unexpected keys ['head.weight']")
    check({k: v for k, v in state.items() if k != "2.adapter.a.lora_B"}, "missing keys ['2.adapter.a.lora_B']")
    check({**state, "2.adapter.a.lora_B": torch.zeros(4, 3)}, "mis-shaped 2.adapter.a.lora_B")
    with _refused("the checkpoint: 'state_dict' must be a dict of tensors, got list"):
        _validate(
            {"state_dict": [], **({METADATA_KEY: _meta(model, adapters, ["a"])} if with_meta else {})}, model, adapters
        )


def _under(model: nn.Module, strategy_class: str) -> nn.Module:
    model._trainer = type("Trainer", (), {"strategy": type(strategy_class, (), {})()})()
    return model


def test_validate_leaves_the_tensors_to_a_sharded_strategy_that_has_loaded_them() -> None:
    model, adapters = _with_adapters({"a": 2})
    meta = _meta(model, adapters, ["a"])
    _validate({METADATA_KEY: meta}, _under(model, "FSDPStrategy"), adapters)
    # ...but a state it did not load is still checked
    bad = {**_named_state(model, ["a"]), "head.weight": torch.zeros(1)}
    with _refused("the checkpoint does not hold this model's adapter: unexpected keys ['head.weight']"):
        _validate({"state_dict": bad, METADATA_KEY: meta}, model, adapters)
    # and a strategy that does not load them needs the state
    model, adapters = _with_adapters({"a": 2})
    with _refused("the checkpoint has no 'state_dict' key"):
        _validate({METADATA_KEY: _meta(model, adapters, ["a"])}, _under(model, "DDPStrategy"), adapters)
