"""Direct tests of the Lightning integration's helpers, without a Trainer (issue 21: surviving mutants, second
sample of the lightning package).

Each test pins one behaviour that only multi-process, GPU or Trainer-driven runs reached before, against a value
written out by hand.
"""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch

import lightning_adapters as la
from lightning_adapters.core.state import adapter_prefixes, base_fingerprint, is_adapter_key, name_free_keys
from lightning_adapters.errors import AdapterStateError
from lightning_adapters.lightning.checkpoint import (
    METADATA_KEY,
    _config_differences,
    _load_named,
    _modules_of,
    _strategy_loads_state,
    build_metadata,
    check_metadata,
    restore_from_checkpoint,
    validate_checkpoint,
)
from tests.lightning.models import mlp_lora, tiny_mlp, two_fc_backbone


def _mixin_model(trainer: Any = None) -> Any:
    """A LightningModule with the mixin: ``tiny_mlp()`` as ``self.model``, ``mlp_lora()`` injected into it (under
    ``trainer`` when one is given, as ``_trainer``)."""
    from lightning.pytorch import LightningModule

    class Model(la.AdapterMixin, LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = tiny_mlp()
            self.adapter_config = mlp_lora()
            self.adapter_module = "model"

    m = Model()
    m._trainer = trainer
    m.inject_adapters()
    return m


def _checkpoint(model: torch.nn.Module, config: la.LoRAConfig, module: str = "") -> dict[str, Any]:
    state = la.adapter_state_dict(model)
    meta = build_metadata(
        adapters={"default": ("lora", config)},
        name="default",
        active=["default"],
        trainable=["default"],
        module=module,
        fingerprint=base_fingerprint(model),
        shapes={k: list(v.shape) for k, v in state.items()},
    )
    return {METADATA_KEY: meta, "state_dict": state}


# ------------------------------------------------------------------------------------------------------------
# Checkpoint checks


def test_a_field_the_saved_config_lacks_counts_as_its_default() -> None:
    # A checkpoint written before a field existed ran with that field's default: not a difference.
    defaults = {"r": 8, "lora_alpha": 8, "lora_dropout": 0.0}
    assert _config_differences({"r": 2}, {"r": 2, "lora_alpha": 8, "lora_dropout": 0.0}, defaults) == []
    assert _config_differences({"r": 2}, {"r": 2, "lora_alpha": 16}, defaults) == ["lora_alpha: checkpoint 8, now 16"]
    assert _config_differences({"r": 2, "lora_alpha": 4}, {"r": 2, "lora_alpha": None}, defaults) == []


def test_check_metadata_of_a_format_1_file_compares_its_one_adapter_under_any_name() -> None:
    config = mlp_lora()
    meta = {"format": 1, "method": "lora", "config": config.to_dict(), "module": ""}
    check_metadata(meta, "lora", config.to_dict(), None, name="b")
    check_metadata(meta, "lora", config.to_dict(), None)
    with pytest.raises(AdapterStateError, match="holds a 'lora' adapter but this model uses 'ia3'"):
        check_metadata(meta, "ia3", config.to_dict(), None, name="b")


def test_strategy_loads_state_only_under_a_sharded_strategy() -> None:
    def module_with(strategy_class: str | None) -> torch.nn.Module:
        m = torch.nn.Linear(2, 2)
        if strategy_class is not None:
            m._trainer = type("Trainer", (), {"strategy": type(strategy_class, (), {})()})()
        return m

    assert _strategy_loads_state(module_with(None)) is False
    assert _strategy_loads_state(module_with("DDPStrategy")) is False
    for name in ("FSDPStrategy", "ModelParallelStrategy", "DeepSpeedStrategy"):
        assert _strategy_loads_state(module_with(name)) is True, name


def test_modules_of_are_the_top_level_names_and_the_trained_module() -> None:
    state = {"backbone.enc.fc.adapter.lora_A": 0, "head.weight": 0, "scale": 0}
    assert _modules_of(state, {"module": ""}) == ["backbone", "head"]
    assert _modules_of(state, {"module": "encoder"}) == ["backbone", "encoder", "head"]


def _validate(checkpoint: dict[str, Any], model: torch.nn.Module, config: la.LoRAConfig) -> None:
    live = {k: list(v.shape) for k, v in la.adapter_state_dict(model).items()}
    validate_checkpoint(
        checkpoint, model, adapters={"default": ("lora", config)}, fingerprint=None, expected=lambda names: live
    )


def test_validate_checkpoint_compares_the_saved_shapes_and_accepts_a_file_without_metadata() -> None:
    config = mlp_lora()
    model = tiny_mlp()
    la.inject(model, config)
    checkpoint = _checkpoint(model, config)
    _validate(checkpoint, model, config)
    # The shapes entry is checked on its own (the tensors may be loaded by a sharded strategy instead).
    bad = _checkpoint(model, config)
    key = next(iter(bad[METADATA_KEY]["adapter_shapes"]))
    bad[METADATA_KEY]["adapter_shapes"][key] = [99, 99]
    with pytest.raises(AdapterStateError, match="the checkpoint's adapter does not fit this model"):
        _validate(bad, model, config)
    # A file without the metadata entry: only its tensors are checked.
    plain = {"state_dict": dict(checkpoint["state_dict"])}
    _validate(plain, model, config)
    del plain["state_dict"][key]
    with pytest.raises(AdapterStateError, match=r"\(it was not written by lightning_adapters\)"):
        _validate(plain, model, config)


# ------------------------------------------------------------------------------------------------------------
# Loading into several adapters; restoring onto a part of the trained module


def test_load_named_loads_each_adapters_own_tensors_and_its_saved_modules() -> None:
    def two_adapters(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        model = torch.nn.Sequential(
            torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4)
        )
        la.inject(model, la.LoRAConfig(r=2, target_modules=["0"], modules_to_save=["4"], init_weights=False), name="a")
        la.inject(model, la.LoRAConfig(r=2, target_modules=["2"], init_weights=False), name="b")
        for p in model.parameters():
            if p.requires_grad:
                with torch.no_grad():
                    p.normal_()
        return model

    trained, fresh = two_adapters(0), two_adapters(1)
    own = adapter_prefixes(trained)
    state = {k: v.detach().clone() for k, v in trained.state_dict().items() if is_adapter_key(k, own)}
    saved_module_keys = [k for k in state if not any(k in name_free_keys(trained, n) for n in ("a", "b"))]
    assert saved_module_keys  # modules_to_save tensors: adapter keys that are not layer keys
    _load_named(fresh, state, ["a", "b"], True)
    got = fresh.state_dict()
    for k, v in state.items():
        assert torch.equal(got[k], v), k


@pytest.mark.parametrize("module", ["backbone", "backbone.", ".backbone"])  # dots around the name are ignored
def test_a_format_1_checkpoint_is_restored_onto_a_part_of_the_trained_module(tmp_path, module: str) -> None:
    from lightning.pytorch import LightningModule

    lm = LightningModule()
    lm.backbone = two_fc_backbone()
    config = la.LoRAConfig(r=2, target_modules=["fc"], init_weights=False)
    la.inject(lm, config)
    free = name_free_keys(lm, "default")
    state = {free[k]: v.detach().clone() for k, v in la.adapter_state_dict(lm).items()}
    assert all(".adapter.default." not in k for k in state)  # format 1: unnamed keys
    meta = {
        "format": 1,
        "method": "lora",
        "config": config.to_dict(),
        "module": "",
        "base_fingerprint": base_fingerprint(lm),
        "adapter_shapes": {k: list(v.shape) for k, v in state.items()},
    }
    torch.save({METADATA_KEY: meta, "state_dict": state}, tmp_path / "a.ckpt")
    bare = restore_from_checkpoint(two_fc_backbone(), tmp_path / "a.ckpt", module=module)
    assert sorted(n for n, _ in bare.named_modules() if n.endswith(".adapter")) == ["dec.fc.adapter", "enc.fc.adapter"]
    x = torch.randn(2, 4)
    for name in ("enc.fc", "dec.fc"):
        assert torch.equal(bare.get_submodule(name)(x), lm.backbone.get_submodule(name)(x)), name


def test_a_format_1_eva_checkpoint_restores_the_ranks_eva_chose(tmp_path) -> None:
    # Format 1 keys carry no adapter name: the saved lora_A shapes are found under ".adapter." alone.
    from lightning.pytorch import LightningModule

    from tests.peft_parity.test_eva import TwoBranch, branch_batches

    class Module(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = TwoBranch()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

    module = Module

    config = la.LoRAConfig(r=4, alpha=8.0, target_modules=["net.a", "net.b"], init_weights="eva", eva_tau=0.95)
    trained = la.inject(module(), config)
    la.initialize_from_data(trained, branch_batches())
    assert trained.net.a.adapter.default.r == 8 and not hasattr(trained.net.b, "adapter")
    free = name_free_keys(trained, "default")
    state = {free[k]: v.detach().clone() for k, v in la.adapter_state_dict(trained).items()}
    meta = {"format": 1, "method": "lora", "config": config.to_dict(), "module": ""}
    torch.save({METADATA_KEY: meta, "state_dict": state}, tmp_path / "eva.ckpt")
    restored = restore_from_checkpoint(module(), tmp_path / "eva.ckpt", check_base=False)
    assert restored.net.a.adapter.default.r == 8 and not hasattr(restored.net.b, "adapter")
    x = branch_batches(1, seed=1)[0]
    torch.testing.assert_close(restored(x), trained(x), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------------------
# Adapter sources (init_from): a checkpoint file or a PEFT directory


def test_stored_config_reads_the_config_of_a_checkpoint_and_of_a_peft_directory(tmp_path) -> None:
    from lightning_adapters.lightning.sources import stored_config

    config = mlp_lora(alpha=5)
    model = tiny_mlp()
    la.inject(model, config)
    torch.save(_checkpoint(model, config), tmp_path / "a.ckpt")
    la.save_peft(model, tmp_path / "peft")
    assert stored_config("x", str(tmp_path / "a.ckpt")) == config
    got = stored_config("x", str(tmp_path / "peft"))
    assert (got.r, got.alpha, sorted(got.target_modules)) == (2, 5, ["0", "2"])


def test_stored_config_picks_the_named_adapter_of_a_file_holding_several(tmp_path) -> None:
    from lightning_adapters.lightning.sources import stored_config

    model = tiny_mlp()
    la.inject(model, la.LoRAConfig(r=2, target_modules=["0"]))
    la.inject(model, la.LoRAConfig(r=3, target_modules=["2"]), name="other")
    la.save_peft(model, tmp_path / "peft")  # "default" at the top, "other" in a sub-folder
    assert (tmp_path / "peft" / "other").is_dir()
    assert stored_config("other", str(tmp_path / "peft")).r == 3
    assert stored_config("default", str(tmp_path / "peft")).r == 2
    adapters = {"default": ("lora", la.LoRAConfig(r=2)), "other": ("lora", la.LoRAConfig(r=3))}
    meta = build_metadata(
        adapters=adapters,
        name="default",
        active=["default"],
        trainable=["default"],
        module="",
        fingerprint=None,
        shapes={},
    )
    torch.save({METADATA_KEY: meta, "state_dict": {}}, tmp_path / "two.ckpt")
    assert stored_config("other", str(tmp_path / "two.ckpt")) == la.LoRAConfig(r=3)
    assert stored_config("default", str(tmp_path / "two.ckpt")) == la.LoRAConfig(r=2)


def test_stored_config_refusals_name_the_source_and_the_file(tmp_path) -> None:
    from lightning_adapters.errors import AdapterConfigError
    from lightning_adapters.lightning.sources import stored_config

    with pytest.raises(AdapterConfigError, match=r"^init_from\['mine'\] = '.*nowhere' is neither"):
        stored_config("mine", str(tmp_path / "nowhere"))
    meta = {"format": 1, "method": "lora", "config": {"r": -1}, "module": ""}
    torch.save({METADATA_KEY: meta, "state_dict": {}}, tmp_path / "bad.ckpt")
    with pytest.raises(AdapterStateError, match=f"^{tmp_path / 'bad.ckpt'}: the checkpoint's lora config is invalid"):
        stored_config("mine", str(tmp_path / "bad.ckpt"))


def test_a_checkpoint_source_lacking_tensors_leaves_the_model_without_adapters(tmp_path) -> None:
    from lightning_adapters.core.state import find_records
    from lightning_adapters.lightning.sources import load_adapter

    config = mlp_lora()
    model = tiny_mlp()
    la.inject(model, config)
    checkpoint = _checkpoint(model, config)
    dropped = next(k for k in checkpoint["state_dict"] if k.startswith("2."))
    del checkpoint["state_dict"][dropped]
    torch.save(checkpoint, tmp_path / "a.ckpt")
    target = tiny_mlp()
    with pytest.raises(AdapterStateError, match="lacks"):
        load_adapter(target, "x", str(tmp_path / "a.ckpt"))
    assert find_records(target) == []
    assert sorted(target.state_dict()) == ["0.bias", "0.weight", "2.bias", "2.weight"]


# ------------------------------------------------------------------------------------------------------------
# The module class swap's configure_callbacks


class _Callbacks:
    def __init__(self, callbacks: list) -> None:
        self.callbacks = callbacks


@pytest.mark.parametrize("returned", ["none", "one", "list"])
def test_the_swapped_module_adds_a_callback_only_when_the_trainer_has_none(returned: str) -> None:
    from lightning.pytorch import LightningModule
    from lightning.pytorch.callbacks import Callback

    from lightning_adapters.lightning.callback import swap_class

    mine = Callback()

    class Module(LightningModule):
        def configure_callbacks(self):
            return {"none": None, "one": mine, "list": [mine]}[returned]

    pl_module = Module()
    swap_class(pl_module)
    pl_module._trainer = _Callbacks([])
    got = pl_module.configure_callbacks()
    own = [] if returned == "none" else [mine]
    assert got[:-1] == own and len(got) == len(own) + 1
    assert isinstance(got[-1], la.AdapterCallback) and got[-1].config is None
    # A trainer that already has an AdapterCallback gets the module's own callbacks as they were.
    pl_module._trainer = _Callbacks([la.AdapterCallback(la.LoRAConfig(r=2), verbose=False)])
    assert pl_module.configure_callbacks() == {"none": None, "one": mine, "list": [mine]}[returned]


# ------------------------------------------------------------------------------------------------------------
# Strategies: gradient checkpointing, DeepSpeed ZeRO-3, FSDP2 units, FSDP1 export


class _Embedded(torch.nn.Module):
    def __init__(self, use_reentrant: bool | None) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(5, 4)
        self.emb.weight.requires_grad_(False)
        self.block = torch.nn.Linear(4, 4)
        self.block.gradient_checkpointing = True
        if use_reentrant is not None:
            kwargs = {"use_reentrant": use_reentrant}
            self.block._gradient_checkpointing_func = functools.partial(torch.utils.checkpoint.checkpoint, **kwargs)

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.emb


@pytest.mark.parametrize(("use_reentrant", "expected"), [(False, False), (True, True), (None, True)])
def test_reentrant_checkpointing_reads_the_layers_checkpoint_function(use_reentrant, expected) -> None:
    from lightning_adapters.lightning.strategies import _reentrant_checkpointing

    assert _reentrant_checkpointing(_Embedded(use_reentrant)) is expected
    assert _reentrant_checkpointing(tiny_mlp()) is False


def test_the_input_grads_hook_is_installed_once() -> None:
    from lightning_adapters.lightning.strategies import handle_input_grads

    model = _Embedded(True)
    assert handle_input_grads(model) is True
    assert handle_input_grads(model) is False
    assert len(model.emb._forward_hooks) == 1
    assert model.emb(torch.tensor([1, 2])).requires_grad
    assert handle_input_grads(_Embedded(False)) is False


def test_zero3_preparation_registers_every_adapter_parameter_with_its_base_layer(monkeypatch) -> None:
    deepspeed = pytest.importorskip("deepspeed")
    from lightning.pytorch.strategies import DeepSpeedStrategy

    from lightning_adapters.lightning.strategies import prepare_strategy

    model = tiny_mlp()
    la.inject(model, mlp_lora())
    registered = []
    monkeypatch.setattr(deepspeed.zero, "register_external_parameter", lambda m, p: registered.append((m, p)))
    strategy = DeepSpeedStrategy(stage=3)
    strategy.save_checkpoint = lambda *args, **kwargs: None
    prepare_strategy(type("Trainer", (), {"strategy": strategy})(), model, model)
    want = [(model[i], p) for i in (0, 2) for p in model[i].adapter.parameters()]
    assert len(registered) == len(want) == 4
    assert all(m is wm and p is wp for (m, p), (wm, wp) in zip(registered, want, strict=True))


def _one_process_group(tmp_path) -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already set up in this process")
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)


def test_adapter_units_stay_gathered_after_forward_while_the_root_reshards(tmp_path) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from lightning_adapters.lightning.strategies import adapter_parallelize_fn

    model = tiny_mlp()
    la.inject(model, mlp_lora())
    _one_process_group(tmp_path)
    try:
        adapter_parallelize_fn(model, init_device_mesh("cpu", (1,)), reshard_after_forward=True)
        model(torch.randn(3, 6))
        adapter = list(model[0].adapter.parameters())
        assert adapter and not any(isinstance(p, DTensor) for p in adapter)  # kept gathered
        assert isinstance(model[0].weight, DTensor)  # the root's own parameters resharded
    finally:
        dist.destroy_process_group()


def test_has_dtensor_sees_a_sharded_parameter(tmp_path) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from lightning_adapters.lightning.runtime import _has_dtensor

    model = tiny_mlp()
    assert _has_dtensor(model) is False
    _one_process_group(tmp_path)
    try:
        mesh = init_device_mesh("cpu", (1,))
        model[2].weight = torch.nn.Parameter(distribute_tensor(model[2].weight.detach(), mesh, [Shard(0)]))
        assert _has_dtensor(model) is True
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("finite", [True, False])
def test_export_under_fsdp1_gathers_the_wrapped_model(tmp_path, monkeypatch, finite: bool) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel

    from lightning_adapters.lightning.export import export_at_fit_end

    model = tiny_mlp()
    la.inject(model, mlp_lora())
    if not finite:
        with torch.no_grad():
            model[0].adapter.default.lora_B[0, 0] = float("nan")
    wrapped = FullyShardedDataParallel.__new__(FullyShardedDataParallel)  # only its type is read before gathering
    summoned = []

    @staticmethod
    def summon(module, writeback=True, **kwargs):
        summoned.append((module, writeback))
        return torch.no_grad()

    monkeypatch.setattr(FullyShardedDataParallel, "summon_full_params", summon)
    strategy = type("S", (), {"model": wrapped, "barrier": lambda self, name: None})()
    trainer = type("Trainer", (), {"is_global_zero": True, "strategy": strategy})()
    if not finite:  # the export refuses what it would write as NaN, as on every other strategy
        with pytest.raises(AdapterStateError, match="not finite|non-finite|NaN"):
            export_at_fit_end(trainer, model, peft_dir=str(tmp_path / "peft"))
        return
    export_at_fit_end(trainer, model, peft_dir=str(tmp_path / "peft"))
    assert summoned == [(wrapped, False)]
    assert (tmp_path / "peft" / "adapter_model.safetensors").is_file()


# ------------------------------------------------------------------------------------------------------------
# Functions no selected test reached: the FSDP1 wrap policy, the adapter-state gathering of sharded strategies,
# the mixin's adapter_state_dict.


def test_adapter_auto_wrap_policy_makes_units_of_adapters_blocks_and_fully_trainable_modules() -> None:
    from lightning_adapters.lightning.strategies import adapter_auto_wrap_policy

    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4), torch.nn.Linear(4, 4))
    la.inject(model, la.LoRAConfig(r=2, target_modules=["0"]))
    model[2].requires_grad_(False)
    model[3].requires_grad_(True)
    model[3].bias.requires_grad_(False)
    head = torch.nn.Linear(4, 2)  # every own parameter trainable (a modules_to_save head)
    plain = adapter_auto_wrap_policy()
    with_blocks = adapter_auto_wrap_policy({torch.nn.ReLU})
    assert plain(model, True, 0) is True  # recursing is always allowed
    assert plain(model[0].adapter.default, False, 0) is True  # an adapter layer
    assert plain(model[0], False, 0) is False  # the adapted layer: its own weight is frozen
    model[0].adapter.default.requires_grad_(False)
    assert plain(model[0].adapter.default, False, 0) is True  # a frozen adapter too (its own unit all the same)
    assert plain(head, False, 0) is True
    assert plain(model[2], False, 0) is False  # frozen
    assert plain(model[3], False, 0) is False  # partly trainable
    assert plain(model, False, 0) is False  # no parameters of its own
    assert plain(torch.nn.Sequential(head), False, 0) is False  # nor here: only its trainable child is a unit
    assert plain(model[1], False, 0) is False
    assert with_blocks(model[1], False, 0) is True  # a block type
    assert with_blocks(model[2], False, 0) is False


def test_the_deepspeed_state_holds_the_trainable_tensors_and_buffers_on_the_cpu() -> None:
    from lightning_adapters.lightning.strategies import _gather_deepspeed_state

    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 4))
    la.inject(model, mlp_lora())
    strategy = type("Strategy", (), {"lightning_module": model})()  # not DeepSpeed: no gathering needed
    got = _gather_deepspeed_state(strategy)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    buffers = {"1.running_mean", "1.running_var", "1.num_batches_tracked"}
    assert set(got) == trainable | buffers and len(trainable) == 4
    live = model.state_dict()
    for k, v in got.items():
        assert torch.equal(v, live[k]) and v.device.type == "cpu", k
        assert v.data_ptr() != live[k].data_ptr(), k  # a copy, not the live tensor


def test_the_sharded_adapter_state_is_the_full_trainable_state(tmp_path) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from lightning_adapters.lightning.strategies import _gather_adapter_state, adapter_parallelize_fn

    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 4))
    la.inject(model, mlp_lora())
    want = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    _one_process_group(tmp_path)
    try:
        adapter_parallelize_fn(model, init_device_mesh("cpu", (1,)))
        got = _gather_adapter_state(type("Strategy", (), {"model": model})())
    finally:
        dist.destroy_process_group()
    assert set(got) == trainable | {"1.running_mean", "1.running_var", "1.num_batches_tracked"}
    for k, v in got.items():
        assert type(v) is torch.Tensor and torch.equal(v, want[k]), k  # whole tensors, not shards


def test_the_sharded_adapter_state_is_asked_for_whole_on_the_cpu_without_frozen_parameters(monkeypatch) -> None:
    import torch.distributed.checkpoint.state_dict as dcp_state

    from lightning_adapters.lightning.strategies import _gather_adapter_state

    calls = []
    monkeypatch.setattr(dcp_state, "get_model_state_dict", lambda model, options: calls.append((model, options)))
    model = tiny_mlp()
    _gather_adapter_state(type("Strategy", (), {"model": model})())
    ((got, options),) = calls
    assert got is model
    assert (options.full_state_dict, options.cpu_offload, options.ignore_frozen_params) == (True, True, True)


def test_the_deepspeed_state_under_zero3_gathers_the_trainable_parameters(monkeypatch) -> None:
    import contextlib

    deepspeed = pytest.importorskip("deepspeed")
    from lightning.pytorch.strategies import DeepSpeedStrategy

    from lightning_adapters.lightning.strategies import _gather_deepspeed_state

    model = tiny_mlp()
    la.inject(model, mlp_lora())
    gathered = []

    def gather(params, modifier_rank=None):
        gathered.append((params, modifier_rank))
        return contextlib.nullcontext()

    monkeypatch.setattr(deepspeed.zero, "GatheredParameters", gather)
    strategy = DeepSpeedStrategy(stage=3)
    monkeypatch.setattr(DeepSpeedStrategy, "lightning_module", property(lambda self: model))
    got = _gather_deepspeed_state(strategy)
    ((params, modifier_rank),) = gathered
    assert modifier_rank is None
    assert [id(p) for p in params] == [id(p) for p in model.parameters() if p.requires_grad] and len(params) == 4
    assert set(got) == {n for n, p in model.named_parameters() if p.requires_grad}


def test_the_mixins_adapter_state_dict_is_keyed_relative_to_the_injected_module() -> None:
    m = _mixin_model()
    got, want = m.adapter_state_dict(), la.adapter_state_dict(m.model)
    assert sorted(got) == sorted(want) and all(k.startswith(("0.", "2.")) for k in got)
    assert all(torch.equal(got[k], want[k]) for k in want)


# ------------------------------------------------------------------------------------------------------------
# Survivors of the held-out sample (seed 2323), written after it was measured.


def test_a_saved_config_without_the_fields_built_by_a_factory_matches_their_defaults() -> None:
    from lightning_adapters.lightning.checkpoint import _field_defaults

    defaults = _field_defaults("lora")
    assert defaults["rank_pattern"] == {} and defaults["alpha_pattern"] == {} and defaults["r"] == 8
    config = mlp_lora()
    saved = {k: v for k, v in config.to_dict().items() if k not in ("rank_pattern", "alpha_pattern")}
    check_metadata({"method": "lora", "config": saved}, "lora", config.to_dict(), None)


def test_the_schedule_report_is_logged_by_a_trainer_without_a_rank() -> None:
    pytest.importorskip("matplotlib")
    from lightning_adapters.lightning.hooks import ScheduleDriver
    from tests.lightning.test_units import _Recorder, _report

    report = _report()
    driver = ScheduleDriver(type("Schedule", (), {"report": lambda self: report})())
    logger = _Recorder(("log_table", "log_image"))
    driver._log_report(type("Trainer", (), {"loggers": [logger], "is_global_zero": False})(), 3)
    assert logger.calls == []
    driver._log_report(type("Trainer", (), {"loggers": [logger]})(), 3)  # no rank: a single process
    assert [c[0] for c in logger.calls] == ["log_table", "log_image"]
    driver._log_report(type("Trainer", (), {"loggers": [logger]})(), 4)  # nothing new in the report
    assert len(logger.calls) == 2


def test_the_frozen_parts_warning_in_full() -> None:
    from lightning_adapters.lightning.scope import frozen_parts_message

    model = torch.nn.Module()
    model.body, model.head = torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)
    la.inject(model, la.LoRAConfig(r=2, target_modules=["body"]))
    assert frozen_parts_message(model, ["head"], ["body"], la.LoRAConfig(r=2)) == (
        "lightning_adapters: 'head' (Linear, 10 parameters) was trainable before injection and is now frozen at its "
        "current values: it holds no adapter and is not in modules_to_save, so it never trains; 'body' (Linear, 20 "
        "parameters) got a LoRAConfig adapter from target_modules='all-linear': its weights stay frozen at their "
        "current values and only a low-rank update trains. If this is a new task head, train it in full: "
        "modules_to_save=['head', 'body'] in the config, or adapt only the backbone with AdapterCallback(config, "
        "module='<backbone attribute>') (AdapterMixin: adapter_module), which trains and checkpoints everything "
        "beside it that requires grad. If it is meant to stay frozen, call requires_grad_(False) on it in __init__ "
        "and this warning goes away"
    )


def test_adalora_under_deepspeed_is_refused_naming_the_adapter() -> None:
    pytest.importorskip("deepspeed")
    from lightning.pytorch.strategies import DeepSpeedStrategy

    from lightning_adapters.errors import AdapterConfigError
    from lightning_adapters.lightning.strategies import prepare_strategy

    model = tiny_mlp()
    la.inject(model, la.AdaLoRAConfig(target_modules=["0"], total_step=10), name="ada")
    strategy = DeepSpeedStrategy(stage=2)
    with pytest.raises(
        AdapterConfigError, match="AdaLoRA under DeepSpeedStrategy is not supported \\(adapter\\(s\\) 'ada'\\)"
    ):
        prepare_strategy(type("Trainer", (), {"strategy": strategy})(), model, model)


def test_resuming_restores_which_adapters_act_and_train() -> None:
    from lightning.pytorch import LightningModule

    from lightning_adapters.core.named import active, set_active, set_trainable, trainable
    from lightning_adapters.lightning.runtime import AdapterOptions, attach_runtime

    lm = LightningModule()
    lm.model = tiny_mlp()
    runtime = attach_runtime(lm, la.LoRAConfig(r=2, target_modules=["0"]), AdapterOptions(module="model"))
    runtime.inject(lm)
    la.inject(lm.model, la.LoRAConfig(r=2, target_modules=["2"]), name="b")
    set_active(lm.model, ["default", "b"])
    set_trainable(lm.model, ["b"])
    checkpoint = {"state_dict": lm.state_dict()}
    runtime.on_save_checkpoint(lm, checkpoint)
    set_active(lm.model, ["default"])
    set_trainable(lm.model, ["default"])
    runtime.on_load_checkpoint(lm, checkpoint)
    assert (active(lm.model), trainable(lm.model)) == (["default", "b"], ["b"])


def test_a_checkpoint_source_of_an_adapted_root_layer_loads(tmp_path) -> None:
    # "all-linear" on a bare Linear adapts the root itself: its adapter keys have no module name in front.
    from lightning_adapters.lightning.sources import load_adapter

    torch.manual_seed(0)
    trained = torch.nn.Linear(3, 3)
    config = la.LoRAConfig(r=2, target_modules="all-linear", init_weights=False)
    la.inject(trained, config)
    torch.save(_checkpoint(trained, config), tmp_path / "a.ckpt")
    torch.manual_seed(0)
    target = torch.nn.Linear(3, 3)
    load_adapter(target, "x", str(tmp_path / "a.ckpt"))
    x = torch.randn(2, 3)
    assert torch.equal(target(x), trained(x))


@pytest.mark.parametrize("hook", ["adapter_init_batch", "adapter_init_forward"])
def test_the_data_init_in_a_fit_reads_its_batches_through_the_modules_hooks(hook: str) -> None:
    from types import SimpleNamespace

    from lightning.pytorch.trainer.states import TrainerFn

    from lightning_adapters.lightning.data_init import initialize_in_fit
    from tests.peft_parity.test_eva import TwoBranch, branch_batches

    config = la.LoRAConfig(r=4, target_modules=["a", "b"], init_weights="eva", eva_tau=0.95, init_batches=3)
    batches = branch_batches(5)
    source = SimpleNamespace(is_defined=lambda: True, dataloader=lambda: [{"raw": x} for x in batches])
    trainer = SimpleNamespace(
        state=SimpleNamespace(fn=TrainerFn.FITTING),
        fit_loop=SimpleNamespace(_data_source=source),
        global_rank=0,
        world_size=1,
    )
    seen = []
    pl_module = torch.nn.Module()
    pl_module._trainer = trainer
    target = la.inject(TwoBranch(), config)
    if hook == "adapter_init_batch":  # the model takes a tensor, the loader gives mappings
        pl_module.adapter_init_batch = lambda batch: seen.append(batch) or batch["raw"]
    else:
        pl_module.adapter_init_forward = lambda batch: seen.append(batch) or target(batch["raw"])
    assert initialize_in_fit(pl_module, target, config) is True
    assert {id(b["raw"]) for b in seen} == {id(x) for x in batches[:3]}  # the first init_batches, through the hook
    want = la.inject(TwoBranch(), config)
    la.initialize_from_data(want, batches[:3])
    got_state, want_state = la.adapter_state_dict(target), la.adapter_state_dict(want)
    assert got_state.keys() == want_state.keys()
    for k, v in want_state.items():
        assert torch.equal(got_state[k], v), k


def test_runtime_inject_says_whether_the_target_is_injected() -> None:
    from lightning.pytorch import LightningModule

    from lightning_adapters.lightning.runtime import AdapterOptions, attach_runtime

    lm = LightningModule()
    runtime = attach_runtime(lm, la.LoRAConfig(r=2, target_modules=["0"]), AdapterOptions(module="model"))
    assert runtime.inject(lm, defer=True) is False  # the model is not built yet
    lm.model = tiny_mlp()
    assert runtime.inject(lm) is True
    assert runtime.inject(lm) is True  # already injected: the same config again is a no-op
    assert la.config_of(lm.model, "default").r == 2


@pytest.mark.parametrize(("n", "every"), [(2, 1), (12, 1), (30, 2)])
def test_the_heatmap_labels_every_column_up_to_twelve_then_every_kth(n: int, every: int) -> None:
    pytest.importorskip("matplotlib")
    from lightning_adapters.lightning import reports
    from lightning_adapters.schedules import Heatmap

    columns = [str(10 * (i + 1)) for i in range(n)]
    heatmap = Heatmap(
        values=[[1.0] * n, [2.0] * n],
        row_labels=["m.a", "m.b"],
        column_labels=columns,
        vmax=2.0,
        title="ranks",
        xlabel="step",
        colorbar="rank",
    )
    ax = reports.heatmap_figure(heatmap).axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == columns[::every]
    assert {t.get_fontsize() for t in ax.get_xticklabels()} == {7.0}
    assert {t.get_fontsize() for t in ax.get_yticklabels()} == {6.0}
    assert list(ax.get_xticks()) == list(range(0, n, every))


def test_expected_shapes_reads_the_full_shape_of_a_zero3_partition() -> None:
    from lightning_adapters.lightning.checkpoint import expected_shapes

    model = tiny_mlp()
    la.inject(model, mlp_lora())
    lora_a = model[0].adapter.default.lora_A
    lora_a.data = torch.empty(0)  # a ZeRO-3 partition: empty here, its full shape kept as ds_shape
    lora_a.ds_shape = torch.Size([2, 6])
    got = expected_shapes(model, lambda k: ".adapter." in k, {})
    assert got == {
        "0.adapter.default.lora_A": [2, 6],
        "0.adapter.default.lora_B": [8, 2],
        "2.adapter.default.lora_A": [2, 8],
        "2.adapter.default.lora_B": [4, 2],
    }


def test_the_schedules_epoch_metrics_are_logged_at_the_global_step() -> None:
    from lightning_adapters.lightning.hooks import ScheduleDriver
    from tests.lightning.test_units import _Recorder

    calls = []

    class Schedule:
        def after_epoch(self, epoch: int, step: int) -> dict[str, float]:
            calls.append((epoch, step))
            return {"adalora/budget": 3.0}

        def report(self) -> None:
            return None

    logger = _Recorder(("log_metrics",))
    trainer = type("Trainer", (), {"loggers": [logger], "global_step": 7, "current_epoch": 1})()
    ScheduleDriver(Schedule()).on_train_epoch_end(trainer)
    assert calls == [(2, 7)]
    assert logger.calls == [("log_metrics", ({"adalora/budget": 3.0},), {"step": 7})]


def test_model_parallel_preparation_shards_over_the_data_parallel_mesh(monkeypatch) -> None:
    import warnings

    from lightning.pytorch.strategies import ModelParallelStrategy

    from lightning_adapters.lightning import strategies

    model = tiny_mlp()
    la.inject(model, mlp_lora())
    calls = []
    monkeypatch.setattr(strategies, "adapter_parallelize_fn", lambda *args, **kwargs: calls.append((args, kwargs)))
    tensor_parallel = type("Mesh", (), {"size": lambda self: 1})()
    strategy = ModelParallelStrategy()
    strategy._device_mesh = {"tensor_parallel": tensor_parallel, "data_parallel": "dp-mesh"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the note that checkpoints hold full adapter tensors
        strategies.prepare_strategy(type("Trainer", (), {"strategy": strategy})(), model, model)
    assert calls == [((model, "dp-mesh"), {})]
    assert strategy._save_distributed_checkpoint is False


@pytest.mark.parametrize(
    ("n", "shown"),
    [(5, "['p0', 'p1', 'p2', 'p3', 'p4']"), (6, "['p0', 'p1', 'p2', 'p3', 'p4', '... 1 more']")],
)
def test_parameters_in_no_optimizer_are_named_five_at_most(n: int, shown: str) -> None:
    from lightning_adapters.errors import AdapterConfigError
    from lightning_adapters.lightning.strategies import check_optimizers

    target = torch.nn.Module()
    for i in range(n):
        target.register_parameter(f"p{i}", torch.nn.Parameter(torch.zeros(1)))
    target.register_parameter("frozen", torch.nn.Parameter(torch.zeros(1), requires_grad=False))
    pl_module = type("Module", (), {"automatic_optimization": True})()
    trainer = type("Trainer", (), {"optimizers": [torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)]})()
    with pytest.raises(AdapterConfigError) as err:
        check_optimizers(trainer, pl_module, target, "")
    assert str(err.value).startswith(f"{n} adapter parameters are in no optimizer ({shown}), so")


@pytest.mark.parametrize("shapes", [[], "x", [[1, 2]]])
def test_metadata_whose_shapes_entry_is_not_a_mapping_is_refused(shapes: Any) -> None:
    from lightning_adapters.lightning.checkpoint import check_metadata_entry

    meta = {"method": "lora", "config": {}, "adapter_shapes": shapes}
    with pytest.raises(AdapterStateError, match=r"\['adapter_shapes'\] must be a dict"):
        check_metadata_entry(meta, "the checkpoint")
    check_metadata_entry({**meta, "adapter_shapes": {"a": [1]}}, "the checkpoint")


def test_a_bad_save_list_is_refused_naming_the_argument() -> None:
    from lightning.pytorch import LightningModule

    from lightning_adapters.errors import AdapterConfigError
    from lightning_adapters.lightning.runtime import AdapterOptions, attach_runtime

    with pytest.raises(AdapterConfigError, match="^save must be an adapter name or a list of them"):
        la.AdapterCallback(la.LoRAConfig(r=2), save=3)
    lm = LightningModule()
    lm.model = tiny_mlp()
    runtime = attach_runtime(lm, la.LoRAConfig(r=2, target_modules=["0"]), AdapterOptions(module="model", save=["b"]))
    with pytest.raises(AdapterConfigError, match=r"^AdapterCallback\(save=\.\.\.\): unknown adapter name 'b'"):
        runtime.inject(lm)


def test_gradient_checkpointing_of_a_model_with_the_older_method_name() -> None:
    from lightning_adapters.lightning.strategies import enable_gradient_checkpointing

    calls = []

    class Older(torch.nn.Module):
        def gradient_checkpointing_enable(self, **kwargs: Any) -> None:
            calls.append(kwargs)

    enable_gradient_checkpointing(Older())
    assert calls == [{"gradient_checkpointing_kwargs": {"use_reentrant": False}}]


def test_a_method_mismatch_names_the_adapter_when_the_file_holds_two() -> None:
    config = mlp_lora()
    meta = build_metadata(
        adapters={"a": ("lora", config), "b": ("lora", config)},
        name="a",
        active=["a", "b"],
        trainable=["a"],
        module="",
        fingerprint=None,
        shapes={},
    )
    with pytest.raises(AdapterStateError, match="holds a 'lora' adapter for adapter 'b' but this model uses 'ia3'"):
        check_metadata(meta, "ia3", config.to_dict(), None, name="b")
    one = build_metadata(
        adapters={"a": ("lora", config)},
        name="a",
        active=["a"],
        trainable=["a"],
        module="",
        fingerprint=None,
        shapes={},
    )
    with pytest.raises(AdapterStateError, match="holds a 'lora' adapter but this model uses 'ia3'"):
        check_metadata(one, "ia3", config.to_dict(), None, name="a")


def test_fsdp1_preparation_saves_full_adapter_state_and_wraps_adapters_apart() -> None:
    import warnings

    from lightning.pytorch.strategies import FSDPStrategy

    from lightning_adapters.lightning.strategies import prepare_strategy

    model = tiny_mlp()
    la.inject(model, mlp_lora())
    strategy = FSDPStrategy(state_dict_type="sharded")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prepare_strategy(type("Trainer", (), {"strategy": strategy})(), model, model)
    assert strategy._state_dict_type == "full"
    assert any("state_dict_type='full'" in str(w.message) for w in caught)
    policy = strategy.kwargs["auto_wrap_policy"]
    assert policy(model[0].adapter.default, False, 0) is True and policy(model[2], False, 0) is False


def test_an_invalid_config_in_a_checkpoint_source_is_refused_naming_the_file(tmp_path) -> None:
    from lightning_adapters.lightning.sources import load_adapter

    meta = {"format": 1, "method": "lora", "config": {"r": -1}, "module": ""}
    torch.save({METADATA_KEY: meta, "state_dict": {}}, tmp_path / "bad.ckpt")
    with pytest.raises(AdapterStateError, match=f"^{tmp_path / 'bad.ckpt'}: the checkpoint's lora config is invalid"):
        load_adapter(tiny_mlp(), "x", str(tmp_path / "bad.ckpt"))


def test_a_restore_refused_halfway_puts_back_the_base_tensors_it_had_loaded(tmp_path) -> None:
    # Adapter "a" trains net.0's bias (bias="lora_only") and loads first; "b" holds a NaN and is refused after it.
    from lightning.pytorch import LightningModule

    def module() -> LightningModule:
        torch.manual_seed(0)
        lm = LightningModule()
        lm.net = tiny_mlp()
        return lm

    config_a = la.LoRAConfig(r=2, target_modules=["net.0"], bias="lora_only", init_weights=False)
    config_b = la.LoRAConfig(r=2, target_modules=["net.2"], init_weights=False)
    trained = module()
    la.inject(trained, config_a, name="a")
    la.inject(trained, config_b, name="b")
    with torch.no_grad():
        trained.net[0].bias.add_(1.0)
        trained.net[2].adapter.b.lora_B[0, 0] = float("nan")
    state = la.adapter_state_dict(trained)
    assert "net.0.bias" in state
    meta = build_metadata(
        adapters={"a": ("lora", config_a), "b": ("lora", config_b)},
        name="a",
        active=["a", "b"],
        trainable=["a"],
        module="",
        fingerprint=base_fingerprint(trained),
        shapes={k: list(v.shape) for k, v in state.items()},
    )
    torch.save({METADATA_KEY: meta, "state_dict": state}, tmp_path / "a.ckpt")
    fresh = module()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(AdapterStateError, match="non-finite"):
        restore_from_checkpoint(fresh, tmp_path / "a.ckpt")
    after = fresh.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), k


def test_weights_only_false_reaches_the_deepspeed_client_state(tmp_path) -> None:
    from lightning_adapters.lightning.checkpoint import DEEPSPEED_ADAPTER_KEY, DEEPSPEED_STATES, load_checkpoint_file
    from tests.lightning.test_units import _NotAllowed

    directory = tmp_path / "last.ckpt"
    (directory / DEEPSPEED_STATES[0]).parent.mkdir(parents=True)
    states = {METADATA_KEY: {"format": 2}, DEEPSPEED_ADAPTER_KEY: {}, "obj": _NotAllowed()}
    torch.save(states, directory / DEEPSPEED_STATES[0])
    with pytest.raises(AdapterStateError, match="if you trust the file, pass weights_only=False"):
        load_checkpoint_file(directory)
    assert isinstance(load_checkpoint_file(directory, weights_only=False)["obj"], _NotAllowed)


def test_a_partial_adapter_tensor_is_not_written_to_a_checkpoint() -> None:
    from lightning_adapters.lightning.checkpoint import filter_checkpoint

    meta = {"adapter_shapes": {"0.adapter.default.lora_A": [2, 6]}}
    checkpoint = {"state_dict": {"0.adapter.default.lora_A": torch.zeros(1, 6), "0.weight": torch.zeros(8, 6)}}
    with pytest.raises(AdapterStateError, match=r"partial or empty tensors \['0.adapter.default.lora_A: \[1, 6\]"):
        filter_checkpoint(checkpoint, meta, lambda k: ".adapter." in k)
    checkpoint["state_dict"]["0.adapter.default.lora_A"] = torch.zeros(2, 6)
    filter_checkpoint(checkpoint, meta, lambda k: ".adapter." in k)
    assert list(checkpoint["state_dict"]) == ["0.adapter.default.lora_A"] and checkpoint[METADATA_KEY] is meta


@pytest.mark.parametrize(("n", "more"), [(8, False), (9, True)])
def test_parameters_without_gradient_are_named_eight_at_most(n: int, more: bool) -> None:
    from lightning_adapters.lightning.strategies import check_gradients

    target = torch.nn.Module()
    for i in range(n):
        target.register_parameter(f"p{i}", torch.nn.Parameter(torch.zeros(1)))
    message = check_gradients(type("Trainer", (), {"strategy": object()})(), target, "model.")
    names = [f"model.p{i}" for i in range(8)]
    assert message.startswith(f"{n} adapter parameters got no gradient in the first backward: {names}")
    ending = ". Their modules do not reach the loss (e.g. an unused pooler). Add them to exclude_modules or narrow"
    assert (
        message
        == f"{n} adapter parameters got no gradient in the first backward: {names}"
        + (" ..." if more else "")
        + ending
        + " target_modules"
    )
    assert message.startswith(f"{n} adapter parameters got no gradient in the first backward: {names} ...") == more


# ------------------------------------------------------------------------------------------------------------
# Survivors of the held-out sample's mutants 141-200 (seed 2323), written after it was measured.


def test_the_plain_export_refuses_non_finite_adapter_tensors(tmp_path) -> None:
    from lightning_adapters.lightning.export import export_at_fit_end

    model = tiny_mlp()
    la.inject(model, mlp_lora())
    with torch.no_grad():
        model[2].adapter.default.lora_A[0, 0] = float("inf")
    trainer = type("Trainer", (), {"is_global_zero": True, "strategy": type("S", (), {"model": model})()})()
    with pytest.raises(AdapterStateError, match="non-finite"):
        export_at_fit_end(trainer, model, peft_dir=str(tmp_path / "peft"))


def test_the_mixins_regularization_is_a_zero_scalar_without_a_schedule() -> None:
    from lightning_adapters.lightning.runtime import get_runtime

    m = _mixin_model()
    term = m.adapter_regularization()
    assert term.shape == () and term.item() == 0.0 and term.device == m.model[0].weight.device
    assert get_runtime(m).manual_regularization is True


def test_restoring_a_checkpoint_with_an_invalid_config_names_the_file(tmp_path) -> None:
    meta = {"format": 1, "method": "lora", "config": {"r": -1}, "module": "model"}
    torch.save({METADATA_KEY: meta, "state_dict": {}}, tmp_path / "bad.ckpt")
    with pytest.raises(AdapterStateError, match=f"^{tmp_path / 'bad.ckpt'}: the checkpoint's lora config is invalid"):
        restore_from_checkpoint(tiny_mlp(), tmp_path / "bad.ckpt")


def test_build_metadata_writes_every_field_of_the_format() -> None:
    from lightning_adapters import __version__
    from lightning_adapters.lightning.checkpoint import FORMAT_VERSION

    config = mlp_lora()
    meta = build_metadata(
        adapters={"a": ("lora", config)},
        name="a",
        active=["a"],
        trainable=["a"],
        module="model",
        fingerprint="fp",
        shapes={"k": [1]},
    )
    assert meta == {
        "format": FORMAT_VERSION,
        "library_version": __version__,
        "method": "lora",
        "config": config.to_dict(),
        "module": "model",
        "name": "a",
        "adapters": {"a": {"method": "lora", "config": config.to_dict()}},
        "active": ["a"],
        "trainable": ["a"],
        "base_fingerprint": "fp",
        "adapter_shapes": {"k": [1]},
    }


def test_a_checkpoint_source_with_modules_to_save_loads_them(tmp_path) -> None:
    from lightning_adapters.lightning.sources import load_adapter

    config = la.LoRAConfig(r=2, target_modules=["0"], modules_to_save=["2"], init_weights=False)
    trained = tiny_mlp()
    la.inject(trained, config)
    with torch.no_grad():
        for p in trained.parameters():
            if p.requires_grad:
                p.add_(0.5)
    torch.save(_checkpoint(trained, config), tmp_path / "a.ckpt")
    target = tiny_mlp()
    load_adapter(target, "default", str(tmp_path / "a.ckpt"))
    x = torch.randn(2, 6)
    assert torch.equal(target(x), trained(x))


def test_a_damaged_adapters_entry_is_refused_naming_the_checkpoint() -> None:
    meta = {"method": "lora", "config": {}, "adapters": {"a": "not a mapping"}}
    with pytest.raises(AdapterStateError, match=r"^the checkpoint: 'lightning_adapters'\['adapters'\] must map"):
        check_metadata(meta, "lora", {}, None, name="a")


def test_the_mixins_loraplus_groups_pass_the_optimizer_options_on() -> None:
    m = _mixin_model()
    groups = m.loraplus_param_groups(lr=1e-3, loraplus_lr_ratio=16, weight_decay=0.1)
    assert groups == la.loraplus_param_groups(m, lr=1e-3, loraplus_lr_ratio=16, weight_decay=0.1)
    assert 0.1 in {g["weight_decay"] for g in groups}  # the groups that take weight decay get the one given


@pytest.mark.parametrize(("bias", "frozen"), [("none", ["head"]), ("all", [])])
def test_a_head_that_still_trains_a_bias_is_not_reported_frozen(bias: str, frozen: list[str]) -> None:
    from lightning.pytorch import LightningModule

    from lightning_adapters.core.state import find_records
    from lightning_adapters.lightning.scope import frozen_parts

    lm = LightningModule()
    lm.body, lm.head = torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)
    la.inject(lm, la.LoRAConfig(r=2, target_modules=["body"], bias=bias))
    ((_, _, record),) = find_records(lm)
    assert frozen_parts(lm, record) == (frozen, [])


# ------------------------------------------------------------------------------------------------------------
# Survivors of the held-out sample's mutants 201-260 (seed 2323), written after it was measured.


def test_restoring_a_checkpoint_with_a_damaged_entry_names_the_file(tmp_path) -> None:
    import re

    path = tmp_path / "bad.ckpt"
    torch.save({METADATA_KEY: "not a dict", "state_dict": {}}, path)
    with pytest.raises(AdapterStateError, match=f"^{re.escape(str(path))}: the '{METADATA_KEY}' entry must be a dict"):
        restore_from_checkpoint(tiny_mlp(), path)


class _Unpicklable:
    """A class torch.load(weights_only=True) refuses to unpickle."""


def test_restore_from_checkpoint_loads_only_plain_tensors_unless_told_otherwise(tmp_path) -> None:
    config = mlp_lora()
    trained = tiny_mlp()
    la.inject(trained, config)
    path = tmp_path / "a.ckpt"
    torch.save({**_checkpoint(trained, config), "extra": _Unpicklable()}, path)
    with pytest.raises(AdapterStateError, match="weights_only=False"):
        restore_from_checkpoint(tiny_mlp(), path)
    # Read in full when asked: the file gets as far as matching its keys to the model (a bare MLP here).
    with pytest.raises(AdapterStateError, match="injected into the whole LightningModule"):
        restore_from_checkpoint(tiny_mlp(), path, weights_only=False)


def test_a_bad_adapter_name_in_init_from_is_refused_naming_init_from(tmp_path) -> None:
    from lightning_adapters.errors import AdapterConfigError
    from lightning_adapters.lightning.runtime import adapter_sources

    with pytest.raises(AdapterConfigError, match=r"^init_from: adapter name 'bad name' is not usable"):
        adapter_sources({"bad name": str(tmp_path)}, "default")


def test_the_deepspeed_save_wrapper_passes_the_storage_options_on() -> None:
    from lightning_adapters.lightning.checkpoint import DEEPSPEED_ADAPTER_KEY
    from lightning_adapters.lightning.strategies import _keep_adapter_state

    calls = []
    save = _keep_adapter_state(
        lambda checkpoint, filepath, storage_options: calls.append((checkpoint, filepath, storage_options))
    )
    save({"state_dict": {"k": 1}, "epoch": 0}, "out.ckpt", {"retries": 2})
    assert calls == [
        ({"state_dict": {"k": 1}, "epoch": 0, DEEPSPEED_ADAPTER_KEY: {"k": 1}}, "out.ckpt", {"retries": 2})
    ]


def test_the_rank_heatmap_is_drawn_in_viridis_whatever_the_default_colour_map() -> None:
    import matplotlib

    from lightning_adapters.lightning.reports import heatmap_figure
    from lightning_adapters.schedules import Heatmap

    heatmap = Heatmap(
        values=[[0.0, 1.0], [2.0, 1.0]],
        row_labels=["a", "b"],
        column_labels=["1", "2"],
        vmax=2.0,
        title="ranks",
        xlabel="step",
        colorbar="rank",
    )
    with matplotlib.rc_context({"image.cmap": "gray"}):
        fig = heatmap_figure(heatmap)
    assert fig.axes[0].images[0].get_cmap().name == "viridis"


def test_the_schedule_driver_gives_the_schedule_the_loop_s_step_and_logs_at_it() -> None:
    from lightning_adapters.lightning.hooks import ScheduleDriver

    seen, logged = [], []

    class Schedule:
        def after_optimizer_step(self, step: int, global_step: int | None = None) -> dict[str, float]:
            seen.append((step, global_step))
            return {"budget": 4.0}

    class Logger:
        def log_metrics(self, metrics: dict[str, float], step: int) -> None:
            logged.append((metrics, step))

    trainer = type("Trainer", (), {"global_step": 7, "loggers": [Logger()]})()
    ScheduleDriver(Schedule()).on_optimizer_step_end(trainer, 3)
    assert seen == [(3, 7)] and logged == [({"budget": 4.0}, 7)]


def test_a_checkpoint_whose_active_names_are_all_unknown_restores_with_every_adapter_active(tmp_path) -> None:
    from lightning.pytorch import LightningModule

    lm = LightningModule()
    lm.backbone = two_fc_backbone()
    config = la.LoRAConfig(r=2, target_modules=["fc"], init_weights=False)
    la.inject(lm, config)
    state = {k: v.detach().clone() for k, v in la.adapter_state_dict(lm).items()}
    meta = build_metadata(
        adapters={"default": ("lora", config)},
        name="default",
        active=["gone"],  # an edited file: no adapter of that name is held
        trainable=[],
        module="",
        fingerprint=base_fingerprint(lm),
        shapes={k: list(v.shape) for k, v in state.items()},
    )
    torch.save({METADATA_KEY: meta, "state_dict": state}, tmp_path / "a.ckpt")
    bare = restore_from_checkpoint(two_fc_backbone(), tmp_path / "a.ckpt", module="backbone")
    assert la.active(bare) == ["default"]
    x = torch.randn(2, 4)
    assert torch.equal(bare.enc.fc(x), lm.backbone.enc.fc(x))


def test_every_rank_keeps_rank_zero_s_base_fingerprint() -> None:
    # Ranks may initialise the base differently before DDP broadcasts rank 0's weights: the fingerprint a
    # checkpoint records is the one the strategy broadcasts from rank 0, not the rank's own.
    from lightning_adapters.lightning.runtime import get_runtime

    sent = []

    class Strategy:
        def broadcast(self, obj: Any, src: int = 0) -> Any:
            sent.append(obj)
            return "rank-0 fingerprint"

    m = _mixin_model(trainer=type("Trainer", (), {"strategy": Strategy()})())
    assert sent == [base_fingerprint(m.model)]
    assert get_runtime(m).fingerprint == "rank-0 fingerprint"
