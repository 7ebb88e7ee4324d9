"""Contract tests of the strategy preparation, the mixin and the schedule driver, without a Trainer.

Each function of ``lightning/strategies.py``, ``lightning/mixin.py`` and ``lightning/hooks.py`` is called directly
with hand-built stand-ins (a recording ``fully_shard``, a strategy object of Lightning's own class, a schedule that
records its calls), and every branch is pinned to the exact values, keys and calls written out here.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

import lightning_adapters as la
from lightning_adapters.errors import AdapterConfigError, AdapterStateError
from lightning_adapters.lightning import hooks, strategies
from lightning_adapters.lightning.checkpoint import DEEPSPEED_ADAPTER_KEY
from lightning_adapters.lightning.hooks import ScheduleDriver


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4), nn.Linear(4, 4))


def _lora(**kwargs: Any) -> la.LoRAConfig:
    return la.LoRAConfig(r=2, target_modules=["0", "2"], init_weights=False, **kwargs)


def _injected(**kwargs: Any) -> nn.Sequential:
    model = _mlp()
    la.inject(model, _lora(**kwargs))
    return model


def _trainer(strategy: Any, **kwargs: Any) -> Any:
    return SimpleNamespace(strategy=strategy, **kwargs)


class _Plugin:
    """A precision plugin whose conversion casts the whole module to bf16 (as ``bf16-true`` does)."""

    def __init__(self) -> None:
        self.converted: list[nn.Module] = []

    def convert_module(self, module: nn.Module) -> nn.Module:
        self.converted.append(module)
        return module.to(torch.bfloat16)


def _recorded_warnings(fn: Any) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return [str(w.message) for w in caught]


# ------------------------------------------------------------------------------------------------------------
# Wrapping policies


class _Block(nn.Module):
    pass


class _SubBlock(_Block):  # its first base is named in _no_split_modules
    pass


class _DeepBlock(_SubBlock):  # only its second base is: not a block
    pass


def test_block_types_are_the_named_classes_and_their_direct_subclasses_anywhere_in_the_model() -> None:
    model = nn.Module()
    model._no_split_modules = ["_Block"]
    model.a, model.b, model.c = _Block(), _SubBlock(), _DeepBlock()
    model.inner = nn.Module()
    model.inner._no_split_modules = ["Linear"]  # a nested model's names count too
    model.inner.fc = nn.Linear(2, 2)
    model.none = nn.Module()
    model.none._no_split_modules = None
    got = strategies.block_types_of(model)
    assert isinstance(got, tuple) and len(got) == 3
    assert set(got) == {_Block, _SubBlock, nn.Linear}
    assert strategies.block_types_of(nn.Sequential(nn.ReLU())) == ()


def test_fully_trainable_reads_the_modules_own_parameters_only() -> None:
    head = nn.Linear(2, 2)
    assert strategies._fully_trainable(head) is True
    head.bias.requires_grad_(False)
    assert strategies._fully_trainable(head) is False
    assert strategies._fully_trainable(nn.Sequential(nn.Linear(2, 2))) is False  # no own parameters
    assert strategies._fully_trainable(nn.ReLU()) is False
    head.requires_grad_(False)
    assert strategies._fully_trainable(head) is False


def test_the_wrap_policy_with_and_without_block_types() -> None:
    model = _injected()
    model[3].requires_grad_(False)
    head = nn.Linear(2, 2)
    plain = strategies.adapter_auto_wrap_policy()
    blocks = strategies.adapter_auto_wrap_policy([nn.ReLU])
    assert plain(model[1], True, 10**6) is True  # recursing is always allowed
    assert plain(model[1], False, 0) is False and blocks(model[1], False, 0) is True
    assert plain(model[0].adapter.default, False, 0) is True and blocks(model[0].adapter.default, False, 0) is True
    assert plain(head, False, 0) is True and blocks(head, False, 0) is True
    assert plain(model[3], False, 0) is False and blocks(model[3], False, 0) is False
    assert plain(model[0], False, 0) is False and blocks(model[0], False, 0) is False
    assert blocks(model, False, 0) is False
    model[2].adapter.default.requires_grad_(False)
    assert plain(model[2].adapter.default, False, 0) is True  # a frozen adapter layer: still its own unit


# ------------------------------------------------------------------------------------------------------------
# FSDP2 sharding, with a recording fully_shard


def _record_sharding(monkeypatch) -> list[tuple]:
    import torch.distributed.fsdp as fsdp

    calls: list[tuple] = []
    monkeypatch.setattr(fsdp, "fully_shard", lambda module, **kwargs: calls.append(("shard", module, kwargs)))
    monkeypatch.setattr(
        fsdp, "register_fsdp_forward_method", lambda module, name: calls.append(("register", module, name))
    )
    return calls


class _Mesh:
    def __init__(self, size: int) -> None:
        self.n = size

    def size(self) -> int:
        return self.n


def _same_calls(got: list[tuple], want: list[tuple]) -> None:
    assert len(got) == len(want), [(c[0], type(c[1]).__name__) for c in got]
    for (kind, module, extra), (w_kind, w_module, w_extra) in zip(got, want, strict=True):
        assert kind == w_kind and module is w_module, (kind, type(module).__name__)
        assert extra == w_extra, (kind, type(module).__name__, extra)


def test_adapter_parallelize_fn_shards_adapters_then_saved_modules_then_blocks_then_the_root(monkeypatch) -> None:
    calls = _record_sharding(monkeypatch)
    model = _injected(modules_to_save=["3"])
    model._no_split_modules = ["ReLU"]  # the default block types
    mesh = _Mesh(1)
    assert strategies.adapter_parallelize_fn(model, mesh) is model
    whole = {"mesh": mesh, "reshard_after_forward": True}
    gathered = {"mesh": mesh, "reshard_after_forward": False}
    a0, a2 = model[0].adapter.default, model[2].adapter.default
    _same_calls(
        calls,
        [
            ("shard", a0, gathered),
            ("register", a0, "adapted_forward"),
            ("shard", a2, gathered),
            ("register", a2, "adapted_forward"),
            ("shard", model[3], whole),
            ("shard", model[1], whole),
            ("shard", model, whole),
        ],
    )


def test_adapter_parallelize_fn_passes_the_policy_the_reshard_flag_and_the_quantized_weights(monkeypatch) -> None:
    calls = _record_sharding(monkeypatch)
    kept = {nn.Parameter(torch.zeros(1))}
    seen = []
    monkeypatch.setattr(strategies, "fsdp2_kept_whole", lambda module, size: seen.append((module, size)) or kept)
    model = _injected()
    model._no_split_modules = ["ReLU"]
    mesh, policy = _Mesh(3), object()
    strategies.adapter_parallelize_fn(model, mesh, block_types=(), mp_policy=policy, reshard_after_forward=False)
    assert len(seen) == 1 and seen[0][0] is model and seen[0][1] == 3
    want = {"mesh": mesh, "reshard_after_forward": False, "ignored_params": kept, "mp_policy": policy}
    a0, a2 = model[0].adapter.default, model[2].adapter.default
    _same_calls(  # block_types=() shards no block, whatever _no_split_modules says
        calls,
        [
            ("shard", a0, want),
            ("register", a0, "adapted_forward"),
            ("shard", a2, want),
            ("register", a2, "adapted_forward"),
            ("shard", model, want),
        ],
    )
    calls.clear()
    strategies.adapter_parallelize_fn(model, mesh, block_types=[nn.Linear], mp_policy=policy)
    linears = [("shard", model[i], {**want, "reshard_after_forward": True}) for i in (0, 2, 3)]
    assert [c[1] for c in calls[4:7]] == [model[0], model[2], model[3]]
    _same_calls(calls[4:7], linears)


def test_adapter_parallelize_fn_refuses_a_model_without_adapters(monkeypatch) -> None:
    calls = _record_sharding(monkeypatch)
    with pytest.raises(AdapterStateError, match="adapter_parallelize_fn needs an injected model"):
        strategies.adapter_parallelize_fn(_mlp(), _Mesh(1))
    assert calls == []


# ------------------------------------------------------------------------------------------------------------
# DeepSpeed


def test_gathered_is_a_no_op_off_zero3_and_a_full_gather_under_it(monkeypatch) -> None:
    deepspeed = pytest.importorskip("deepspeed")
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

    params = [nn.Parameter(torch.zeros(2)), nn.Parameter(torch.ones(3))]
    for strategy in (object(), DDPStrategy(), DeepSpeedStrategy(stage=2)):
        assert isinstance(strategies.gathered(strategy, iter(params)), contextlib.nullcontext)
    assert strategies.is_zero3(object()) is False
    assert strategies.is_deepspeed(DeepSpeedStrategy(stage=2)) is True and strategies.is_deepspeed(object()) is False
    seen = []
    monkeypatch.setattr(deepspeed.zero, "GatheredParameters", lambda p, **kw: seen.append((p, kw)) or "ctx")
    assert strategies.gathered(DeepSpeedStrategy(stage=3), iter(params)) == "ctx"
    ((got, kwargs),) = seen
    assert type(got) is list and len(got) == 2 and got[0] is params[0] and got[1] is params[1]
    assert kwargs == {"modifier_rank": None}


def test_the_deepspeed_save_puts_the_state_dict_under_the_adapter_key() -> None:
    saved = []
    save = strategies._keep_adapter_state(lambda *args: saved.append(args))
    state = {"w": torch.zeros(1)}
    checkpoint = {"state_dict": state, "epoch": 1}
    save(checkpoint, "path", "opts")
    save({"epoch": 2}, "other")
    assert checkpoint == {"state_dict": state, "epoch": 1}  # the caller's dict is left alone
    assert saved[0] == ({"state_dict": state, "epoch": 1, DEEPSPEED_ADAPTER_KEY: state}, "path", "opts")
    assert saved[0][0][DEEPSPEED_ADAPTER_KEY] is state
    assert saved[1] == ({"epoch": 2, DEEPSPEED_ADAPTER_KEY: {}}, "other", None)


def _deepspeed(stage: int, model: nn.Module, monkeypatch) -> Any:
    pytest.importorskip("deepspeed")
    from lightning.pytorch.strategies import DeepSpeedStrategy

    strategy = DeepSpeedStrategy(stage=stage)
    monkeypatch.setattr(DeepSpeedStrategy, "lightning_module", property(lambda self: model))
    strategy.precision_plugin = _Plugin()
    strategy.saved = []
    strategy.save_checkpoint = lambda *args: strategy.saved.append(args)
    return strategy


def test_deepspeed_preparation_excludes_frozen_parameters_and_saves_the_gathered_adapter(monkeypatch) -> None:
    model = _injected()
    strategy = _deepspeed(2, model, monkeypatch)
    assert strategy.exclude_frozen_parameters is False
    strategies.prepare_strategy(_trainer(strategy), model, model)
    assert strategy.exclude_frozen_parameters is True
    state = strategy.lightning_module_state_dict()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(state) == trainable and len(trainable) == 4
    for k, v in state.items():
        assert torch.equal(v, model.state_dict()[k]), k
    strategy.save_checkpoint({"state_dict": state}, "file")
    ((checkpoint, path, options),) = strategy.saved
    assert (path, options) == ("file", None) and checkpoint[DEEPSPEED_ADAPTER_KEY] is state
    assert strategy.__dict__["_la_prepared"] is True


def test_deepspeed_refuses_every_adalora_adapter_by_name_and_accepts_other_methods(monkeypatch) -> None:
    model = _mlp()
    la.inject(model, la.AdaLoRAConfig(target_modules=["2"], total_step=10), name="zeta")
    la.inject(model, la.LoRAConfig(r=2, target_modules=["3"]), name="beta")
    la.inject(model, la.AdaLoRAConfig(target_modules=["0"], total_step=10), name="alpha")
    strategy = _deepspeed(2, model, monkeypatch)
    with pytest.raises(AdapterConfigError, match=r"\(adapter\(s\) 'alpha', 'zeta'\): its rank allocation"):
        strategies.prepare_strategy(_trainer(strategy), model, model)
    assert strategy.exclude_frozen_parameters is False
    lora = _injected()
    strategy = _deepspeed(2, lora, monkeypatch)
    strategies.prepare_strategy(_trainer(strategy), lora, lora)
    assert strategy.exclude_frozen_parameters is True


def test_zero3_preparation_registers_the_adapters_with_the_base_layers(monkeypatch) -> None:
    deepspeed = pytest.importorskip("deepspeed")
    model = _injected()
    registered = []
    monkeypatch.setattr(deepspeed.zero, "register_external_parameter", lambda m, p: registered.append((m, p)))
    strategy = _deepspeed(2, model, monkeypatch)
    strategies.prepare_strategy(_trainer(strategy), model, model)
    assert registered == []  # stage 2 partitions no parameter
    strategy = _deepspeed(3, model, monkeypatch)
    strategies.prepare_strategy(_trainer(strategy), model, model)
    want = [(model[i], p) for i in (0, 2) for p in model[i].adapter.default.parameters()]
    assert len(registered) == 4
    assert all(m is wm and p is wp for (m, p), (wm, wp) in zip(registered, want, strict=True))
    gathers = []

    def gather(params: Any, modifier_rank: Any = "unset") -> contextlib.AbstractContextManager:
        gathers.append((params, modifier_rank))
        return contextlib.nullcontext()

    monkeypatch.setattr(deepspeed.zero, "GatheredParameters", gather)
    state = strategy.lightning_module_state_dict()  # the trainable partitions gathered before reading them
    ((params, modifier_rank),) = gathers
    assert [id(p) for p in params] == [id(p) for _, p in want] and modifier_rank is None
    assert set(state) == {n for n, p in model.named_parameters() if p.requires_grad}


# ------------------------------------------------------------------------------------------------------------
# prepare_strategy and the dtype policy after the precision cast


def test_the_dtype_policy_is_reapplied_after_the_conversion_once() -> None:
    model = _injected()
    plugin = _Plugin()
    strategies._reapply_dtype_policy_after_conversion(plugin)
    wrapped = plugin.convert_module
    assert plugin.__dict__["_la_dtype_policy"] is True
    strategies._reapply_dtype_policy_after_conversion(plugin)
    assert plugin.convert_module is wrapped  # not wrapped twice
    assert wrapped(model) is model
    assert plugin.converted == [model]
    assert model[0].weight.dtype == torch.bfloat16 and model[3].weight.dtype == torch.bfloat16
    adapter = [p.dtype for p in model[0].adapter.parameters()] + [p.dtype for p in model[2].adapter.parameters()]
    assert adapter == [torch.float32] * 4  # an adapter on a bf16 base is kept in fp32


def test_preparing_a_plain_strategy_wraps_its_plugin_and_marks_it_once() -> None:
    from lightning.pytorch.strategies import DDPStrategy

    model = _injected()
    strategy = DDPStrategy()
    plugin = _Plugin()
    strategy.precision_plugin = plugin
    strategies.prepare_strategy(_trainer(strategy), model, model, merged_export=True)  # fine under DDP
    assert strategy.__dict__["_la_prepared"] is True and plugin.__dict__["_la_dtype_policy"] is True
    assert strategy.precision_plugin.convert_module(model) is model and plugin.converted == [model]
    other = _Plugin()
    strategy.precision_plugin = other  # a plugin set later is wrapped too, though the strategy is prepared
    strategies.prepare_strategy(_trainer(strategy), model, model)
    assert other.__dict__["_la_dtype_policy"] is True


def _fsdp(**kwargs: Any) -> Any:
    from lightning.pytorch.plugins.precision import FSDPPrecision
    from lightning.pytorch.strategies import FSDPStrategy

    strategy = FSDPStrategy(**kwargs)
    strategy.precision_plugin = FSDPPrecision("32-true")
    return strategy


def test_fsdp1_preparation_is_idempotent_and_keeps_a_users_wrap_policy() -> None:
    model = _injected()
    model._no_split_modules = ["ReLU"]
    strategy = _fsdp(state_dict_type="sharded")
    messages = _recorded_warnings(lambda: strategies.prepare_strategy(_trainer(strategy), model, model))
    assert strategy._state_dict_type == "full"
    assert [m for m in messages if "state_dict_type='full'" in m] and len(messages) == 1
    policy = strategy.kwargs["auto_wrap_policy"]
    assert policy(model[1], False, 0) is True  # the target's block types
    assert policy(model[0].adapter.default, False, 0) is True and policy(model[3], False, 0) is False
    strategy._state_dict_type = "sharded"
    strategy.kwargs["auto_wrap_policy"] = None
    assert _recorded_warnings(lambda: strategies.prepare_strategy(_trainer(strategy), model, model)) == []
    assert strategy._state_dict_type == "sharded" and strategy.kwargs["auto_wrap_policy"] is None  # prepared once

    def mine(module: nn.Module, recurse: bool, numel: int) -> bool:
        return False

    strategy = _fsdp(auto_wrap_policy=mine)
    assert strategy._state_dict_type == "full"
    assert _recorded_warnings(lambda: strategies.prepare_strategy(_trainer(strategy), model, model)) == []
    assert strategy.kwargs["auto_wrap_policy"] is mine and strategy._state_dict_type == "full"


def _model_parallel(tensor_parallel: int, monkeypatch, save_distributed: bool = True) -> tuple[Any, list]:
    from lightning.pytorch.strategies import ModelParallelStrategy

    calls: list = []
    monkeypatch.setattr(strategies, "adapter_parallelize_fn", lambda *args, **kwargs: calls.append((args, kwargs)))
    strategy = ModelParallelStrategy(save_distributed_checkpoint=save_distributed)
    strategy._device_mesh = {"tensor_parallel": _Mesh(tensor_parallel), "data_parallel": "dp-mesh"}
    strategy.precision_plugin = _Plugin()
    return strategy, calls


def test_model_parallel_preparation_shards_the_target_only_when_nothing_is_sharded_yet(monkeypatch) -> None:
    import torch.distributed.checkpoint.state_dict as dcp_state

    target = _injected()
    pl_module = nn.Module()
    pl_module.model = target
    strategy, calls = _model_parallel(1, monkeypatch)
    messages = _recorded_warnings(lambda: strategies.prepare_strategy(_trainer(strategy), pl_module, target))
    assert len(messages) == 1 and "save_distributed_checkpoint=False" in messages[0]
    assert strategy._save_distributed_checkpoint is False
    assert len(calls) == 1 and calls[0][0][0] is target and calls[0][0][1] == "dp-mesh" and calls[0][1] == {}
    gathers = []
    monkeypatch.setattr(
        dcp_state, "get_model_state_dict", lambda model, options: gathers.append((model, options)) or "full"
    )
    strategy.model = pl_module
    assert strategy.lightning_module_state_dict() == "full"
    ((model, options),) = gathers
    assert model is pl_module
    assert (options.full_state_dict, options.cpu_offload, options.ignore_frozen_params) == (True, True, True)

    strategy, calls = _model_parallel(1, monkeypatch, save_distributed=False)
    assert _recorded_warnings(lambda: strategies.prepare_strategy(_trainer(strategy), pl_module, target)) == []
    assert strategy._save_distributed_checkpoint is False and len(calls) == 1

    strategy, calls = _model_parallel(2, monkeypatch)
    with pytest.raises(AdapterConfigError, match="configure_model did not shard the model"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            strategies.prepare_strategy(_trainer(strategy), pl_module, target)
    assert calls == []

    pl_module.extra = nn.Parameter(torch.zeros(1))
    pl_module.extra.device_mesh = "sharded by the user"  # a DTensor parameter: already sharded
    strategy, calls = _model_parallel(2, monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        strategies.prepare_strategy(_trainer(strategy), pl_module, target)
    assert calls == [] and strategy.__dict__["_la_prepared"] is True


def test_a_merged_export_is_refused_under_every_sharding_strategy(monkeypatch) -> None:
    pytest.importorskip("deepspeed")
    from lightning.pytorch.strategies import DeepSpeedStrategy

    model = _injected()
    mp, calls = _model_parallel(1, monkeypatch)
    zero3 = DeepSpeedStrategy(stage=3)
    zero3.precision_plugin = _Plugin()
    for strategy in (_fsdp(), mp, zero3):
        with pytest.raises(
            AdapterConfigError, match="^export_merged_dir is not supported under " + type(strategy).__name__
        ):
            strategies.prepare_strategy(_trainer(strategy), model, model, merged_export=True)
        assert "_la_prepared" not in strategy.__dict__
    assert calls == []
    strategy = _fsdp()
    strategies.prepare_strategy(_trainer(strategy), model, model)  # merged_export defaults to False
    assert strategy.__dict__["_la_prepared"] is True
    zero2 = _deepspeed(2, model, monkeypatch)
    strategies.prepare_strategy(_trainer(zero2), model, model, merged_export=True)  # whole parameters: allowed
    assert zero2.__dict__["_la_prepared"] is True


# ------------------------------------------------------------------------------------------------------------
# Fit-time checks


def _params(n: int, frozen: int = 0) -> nn.Module:
    target = nn.Module()
    for i in range(n):
        target.register_parameter(f"p{i}", nn.Parameter(torch.zeros(1)))
    for i in range(frozen):
        target.register_parameter(f"f{i}", nn.Parameter(torch.zeros(1), requires_grad=False))
    return target


def test_optimizer_params_read_deepspeeds_groups_before_the_param_groups() -> None:
    a, b, c, flat = (nn.Parameter(torch.zeros(1)) for _ in range(4))
    param_groups = [{"params": [flat]}]
    got = strategies._optimizer_params(SimpleNamespace(bit16_groups=[[a], [b]], fp16_groups=[[c]], param_groups=[]))
    assert [id(p) for p in got] == [id(a), id(b)]
    got = strategies._optimizer_params(SimpleNamespace(bit16_groups=[], fp16_groups=[[c], [a]], param_groups=[]))
    assert [id(p) for p in got] == [id(c), id(a)]
    got = strategies._optimizer_params(SimpleNamespace(fp16_groups=None, param_groups=param_groups))
    assert [id(p) for p in got] == [id(flat)]
    optimizer = torch.optim.SGD([{"params": [a, b]}, {"params": [c]}], lr=0.1)
    assert [id(p) for p in strategies._optimizer_params(optimizer)] == [id(a), id(b), id(c)]


def test_check_optimizers_in_automatic_and_manual_optimization() -> None:
    target = _params(7, frozen=1)
    trainable = [target.p0, target.p1, target.p2, target.p3, target.p4, target.p5, target.p6]
    auto, manual = SimpleNamespace(automatic_optimization=True), SimpleNamespace(automatic_optimization=False)
    full = SimpleNamespace(optimizers=[torch.optim.SGD(trainable[:3], lr=0.1), torch.optim.SGD(trainable[3:], lr=0.1)])
    assert strategies.check_optimizers(full, auto, target, "model.") is None  # the frozen one may be left out
    assert strategies.check_optimizers(full, manual, target, "model.") is None
    zero = SimpleNamespace(optimizers=[SimpleNamespace(bit16_groups=[trainable], param_groups=[{"params": []}])])
    assert strategies.check_optimizers(zero, auto, target, "model.") is None
    none = SimpleNamespace(optimizers=[])
    assert strategies.check_optimizers(none, manual, target, "model.") is None  # manual: may optimize elsewhere
    with pytest.raises(AdapterConfigError) as err:
        strategies.check_optimizers(none, auto, target, "model.")
    names = [f"model.p{i}" for i in range(5)]
    assert str(err.value).startswith(f"7 adapter parameters are in no optimizer ({names + ['... 2 more']}), so")
    for kept, shown in (
        (1, [f"model.p{i}" for i in range(1, 6)] + ["... 1 more"]),
        (2, [f"model.p{i}" for i in range(2, 7)]),
    ):
        with pytest.raises(AdapterConfigError) as err:
            strategies.check_optimizers(
                SimpleNamespace(optimizers=[torch.optim.SGD(trainable[:kept], lr=0.1)]), auto, target, "model."
            )
        assert str(err.value).startswith(f"{7 - kept} adapter parameters are in no optimizer ({shown}), so")
    partial = SimpleNamespace(optimizers=[torch.optim.SGD(trainable[:6], lr=0.1)])
    for pl_module in (auto, manual):
        with pytest.raises(AdapterConfigError) as err:
            strategies.check_optimizers(partial, pl_module, target, "model.")
        assert str(err.value).startswith("1 adapter parameters are in no optimizer (['model.p6']), so they")


def test_check_gradients_per_strategy() -> None:
    from lightning.pytorch.strategies import DDPStrategy

    target = _params(2, frozen=1)  # the frozen one has no gradient either: not reported
    want = (
        "1 adapter parameters got no gradient in the first backward: ['m.p1']. Their modules do not reach the loss "
        "(e.g. an unused pooler). Add them to exclude_modules or narrow target_modules"
    )
    target.p0.grad = torch.ones(1)
    assert strategies.check_gradients(_trainer(object()), target, "m.") == want
    assert strategies.check_gradients(_trainer(DDPStrategy(find_unused_parameters=True)), target, "m.") == want
    for ddp in (DDPStrategy(), DDPStrategy(find_unused_parameters=False)):
        with pytest.raises(AdapterStateError) as err:
            strategies.check_gradients(_trainer(ddp), target, "m.")
        assert str(err.value).startswith(want + "; DDP would otherwise fail at the next step")
    assert strategies.check_gradients(_trainer(_fsdp()), target, "m.") is None  # FSDP1 leaves .grad unset
    target.p1.grad = torch.ones(1)
    assert strategies.check_gradients(_trainer(DDPStrategy()), target, "m.") is None
    many = _params(9)
    names = [f"p{i}" for i in range(8)]
    assert strategies.check_gradients(_trainer(object()), many, "") == (
        f"9 adapter parameters got no gradient in the first backward: {names} ...{want.split(']', 1)[1]}"
    )
    del many.p8
    assert strategies.check_gradients(_trainer(object()), many, "") == (
        f"8 adapter parameters got no gradient in the first backward: {names}{want.split(']', 1)[1]}"
    )
    assert strategies.check_gradients(_trainer(object()), target, "m.") is None


def test_check_gradients_skips_deepspeed() -> None:
    pytest.importorskip("deepspeed")
    from lightning.pytorch.strategies import DeepSpeedStrategy

    assert strategies.check_gradients(_trainer(DeepSpeedStrategy(stage=2)), _params(2), "m.") is None


# ------------------------------------------------------------------------------------------------------------
# Gradient checkpointing


def test_enable_gradient_checkpointing_prefers_the_newer_method_and_refuses_other_models() -> None:
    calls = []

    class Both(nn.Module):
        def activation_checkpointing_enable(self, **kwargs: Any) -> None:
            calls.append(("activation", kwargs))

        def gradient_checkpointing_enable(self, **kwargs: Any) -> None:
            calls.append(("gradient", kwargs))

    class Older(nn.Module):
        def gradient_checkpointing_enable(self, **kwargs: Any) -> None:
            calls.append(("older", kwargs))

    strategies.enable_gradient_checkpointing(Both())
    strategies.enable_gradient_checkpointing(Older())
    assert calls == [
        ("activation", {"activation_checkpointing_kwargs": {"use_reentrant": False}}),
        ("older", {"gradient_checkpointing_kwargs": {"use_reentrant": False}}),
    ]
    with pytest.raises(AdapterConfigError, match="^gradient_checkpointing=True needs a transformers model; Linear has"):
        strategies.enable_gradient_checkpointing(nn.Linear(2, 2))


def _checkpointed(flag: Any, fn: Any = "unset") -> nn.Module:
    block = nn.Linear(2, 2)
    block.gradient_checkpointing = flag
    if fn != "unset":
        block._gradient_checkpointing_func = fn
    return block


def test_reentrant_checkpointing_per_layer_setting() -> None:
    checkpoint = torch.utils.checkpoint.checkpoint
    non_reentrant = functools.partial(checkpoint, use_reentrant=False)
    cases = [
        (_checkpointed(True), True),  # no function recorded: torch's default is reentrant
        (_checkpointed(True, checkpoint), True),  # not a partial: no keyword, reentrant
        (_checkpointed(True, functools.partial(checkpoint)), True),
        (_checkpointed(True, functools.partial(checkpoint, use_reentrant=True)), True),
        (_checkpointed(True, non_reentrant), False),
        (_checkpointed(False, checkpoint), False),  # switched off
        (_checkpointed(1, checkpoint), False),  # only the boolean True counts
        (nn.Sequential(_checkpointed(True, non_reentrant), _checkpointed(True, checkpoint)), True),
        (nn.Sequential(_checkpointed(True, non_reentrant), nn.Linear(2, 2)), False),
        (nn.Linear(2, 2), False),
    ]
    for i, (model, want) in enumerate(cases):
        assert strategies._reentrant_checkpointing(model) is want, i


class _Embedded(nn.Module):
    def __init__(self, reentrant: bool = True, emb_trainable: bool = False) -> None:
        super().__init__()
        self.emb = nn.Embedding(5, 4)
        self.emb.weight.requires_grad_(emb_trainable)
        kwargs = {"use_reentrant": reentrant}
        self.block = _checkpointed(True, functools.partial(torch.utils.checkpoint.checkpoint, **kwargs))

    def get_input_embeddings(self) -> nn.Module | None:
        return self.emb


def test_handle_input_grads_installs_a_hook_only_where_reentrant_checkpointing_needs_it() -> None:
    ids = torch.tensor([1, 2])
    model = _Embedded()
    assert model.emb(ids).requires_grad is False
    assert strategies.handle_input_grads(model) is True
    assert model.__dict__["_la_input_grads"] is True
    assert model.emb(ids).requires_grad is True and len(model.emb._forward_hooks) == 1
    assert strategies.handle_input_grads(model) is False and len(model.emb._forward_hooks) == 1

    for other in (_Embedded(reentrant=False), _Embedded(emb_trainable=True)):
        assert strategies.handle_input_grads(other) is False
        assert len(other.emb._forward_hooks) == 0 and "_la_input_grads" not in other.__dict__
    without = nn.Sequential(_checkpointed(True))  # no get_input_embeddings
    assert strategies.handle_input_grads(without) is False
    no_embedding = _Embedded()
    no_embedding.get_input_embeddings = lambda: None
    assert strategies.handle_input_grads(no_embedding) is False


def test_handle_input_grads_uses_the_models_own_switch_when_it_has_one() -> None:
    calls = []

    class HF(_Embedded):
        def enable_input_require_grads(self) -> None:
            calls.append(self)

    model = HF()
    assert strategies.handle_input_grads(model) is True
    assert calls == [model] and len(model.emb._forward_hooks) == 0
    assert strategies.handle_input_grads(model) is False and calls == [model]


# ------------------------------------------------------------------------------------------------------------
# The mixin


def _mixin_model(build: bool = True) -> Any:
    from lightning.pytorch import LightningModule

    class Model(la.AdapterMixin, LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = _mlp() if build else None  # else built in configure_model
            self.adapter_config = _lora()
            self.adapter_module = "model"

    return Model()


def test_the_mixin_swaps_in_the_hooks_and_loads_non_strictly() -> None:
    from lightning_adapters.lightning.callback import AdapterModuleHooks

    m = _mixin_model()
    assert isinstance(m, AdapterModuleHooks) and m.strict_loading is False
    assert m.inject_adapters() is m.model
    assert m.inject_adapters() is m.model  # idempotent
    assert la.config_of(m.model, "default").r == 2


def test_the_mixin_passes_positional_and_keyword_arguments_on() -> None:
    from lightning.pytorch import LightningModule

    class Base(LightningModule):
        def __init__(self, width: int, depth: int = 1, *, name: str = "") -> None:
            super().__init__()
            self.got = (width, depth, name)

    class Model(la.AdapterMixin, Base):
        pass

    assert Model(7, 3, name="n").got == (7, 3, "n")
    assert Model(5, name="m").got == (5, 1, "m")


def test_the_mixins_merge_unmerge_and_parameter_lists() -> None:
    m = _mixin_model()
    m.inject_adapters()
    x = torch.randn(3, 6)
    base = m.model[0].weight.detach().clone()
    adapted = m.model(x)
    m.merge_adapters()
    assert not torch.equal(m.model[0].weight, base)
    assert torch.allclose(m.model(x), adapted, atol=1e-6)
    m.unmerge_adapters()
    assert torch.allclose(m.model[0].weight, base, atol=1e-6)
    state, want_state = m.adapter_state_dict(), la.adapter_state_dict(m.model)
    assert list(state) == list(want_state) and len(state) == 4
    assert all(torch.equal(state[k], want_state[k]) for k in want_state)
    trainable = m.trainable_parameters()
    assert [id(p) for p in trainable] == [id(p) for p in m.parameters() if p.requires_grad] and len(trainable) == 4
    groups = m.loraplus_param_groups(lr=0.01, loraplus_lr_ratio=4.0, weight_decay=0.5)
    want = la.loraplus_param_groups(m, 0.01, 4.0, weight_decay=0.5)
    assert [(g["lr"], g["weight_decay"], [id(p) for p in g["params"]]) for g in groups] == [
        (g["lr"], g["weight_decay"], [id(p) for p in g["params"]]) for g in want
    ]
    assert sorted(g["lr"] for g in groups if g["params"]) == [0.01, 0.04]


def test_the_mixins_regularization_follows_the_parameters_device_and_the_schedules_term() -> None:
    from lightning_adapters.lightning.runtime import get_runtime

    m = _mixin_model()
    m.inject_adapters()
    runtime = get_runtime(m)
    assert runtime.manual_regularization is False
    m.to("meta")
    term = m.adapter_regularization()
    assert term.shape == () and term.device.type == "meta"
    assert runtime.manual_regularization is True
    m.to_empty(device="cpu")
    zero = m.adapter_regularization()
    assert zero.shape == () and zero.device.type == "cpu" and zero.item() == 0.0
    bare = _mixin_model(build=False)
    assert list(bare.parameters()) == []
    empty = bare.adapter_regularization()  # no parameter at all: a zero on the default device
    assert empty.shape == () and empty.device.type == "cpu" and empty.item() == 0.0
    penalty = torch.tensor(2.5)
    runtime.hooks = SimpleNamespace(loss_term=lambda: penalty)
    assert m.adapter_regularization() is penalty


# ------------------------------------------------------------------------------------------------------------
# The schedule driver


class _Logger:
    def __init__(self) -> None:
        self.metrics: list[tuple] = []

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.metrics.append((metrics, step))


class _Schedule:
    def __init__(self, unit: str | None = None, notice: str | None = None) -> None:
        self.length_unit, self.notice = unit, notice
        self.calls: list[tuple] = []
        self.rows: list | None = None
        self.metrics: dict[str, float] | None = {"m": 1.0}

    def start(self, length: Any) -> str | None:
        self.calls.append(("start", length))
        return self.notice

    def loss_term(self) -> torch.Tensor:
        return torch.tensor(0.25)

    def after_optimizer_step(self, step: int, global_step: int | None = None) -> dict[str, float] | None:
        self.calls.append(("step", step, global_step))
        return self.metrics

    def after_epoch(self, epoch: int, global_step: int | None = None) -> dict[str, float] | None:
        self.calls.append(("epoch", epoch, global_step))
        return self.metrics

    def report(self) -> Any:
        return None if self.rows is None else SimpleNamespace(rows=list(self.rows))

    def state_dict(self) -> dict[str, Any]:
        return {"budget": 3}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.calls.append(("load", state))


@pytest.mark.parametrize(("unit", "want"), [("optimizer_steps", 120), ("epochs", 3), (None, None), ("tokens", None)])
def test_the_driver_sizes_the_schedule_in_its_unit(unit: str | None, want: int | None) -> None:
    schedule = _Schedule(unit)
    trainer = SimpleNamespace(estimated_stepping_batches=120, max_epochs=3)
    assert _recorded_warnings(lambda: ScheduleDriver(schedule).setup(trainer)) == []
    assert schedule.calls == [("start", want)] and (want is not None or schedule.calls[0][1] is None)


def test_the_schedules_notice_becomes_a_warning() -> None:
    schedule = _Schedule("epochs", notice="total_step set to 3 epochs")
    messages = _recorded_warnings(lambda: ScheduleDriver(schedule).setup(SimpleNamespace(max_epochs=3)))
    assert messages == ["total_step set to 3 epochs"]


def test_the_driver_logs_step_and_epoch_metrics_at_the_global_step_or_its_fallback() -> None:
    schedule = _Schedule()
    driver = ScheduleDriver(schedule)
    assert driver.schedule is schedule and driver._logged == 0
    first, second = _Logger(), _Logger()
    trainer = SimpleNamespace(loggers=[first, second], global_step=7, current_epoch=1)
    driver.on_optimizer_step_end(trainer, 3)
    driver.on_train_epoch_end(trainer)
    assert first.metrics == second.metrics == [({"m": 1.0}, 7), ({"m": 1.0}, 7)]
    bare = SimpleNamespace(loggers=[first], current_epoch=4)  # no global_step
    driver.on_optimizer_step_end(bare, 5)
    driver.on_train_epoch_end(bare)
    assert first.metrics[2:] == [({"m": 1.0}, 5), ({"m": 1.0}, 0)]
    assert schedule.calls == [("step", 3, 7), ("epoch", 2, 7), ("step", 5, 5), ("epoch", 5, 0)]
    schedule.metrics = {}
    driver.on_optimizer_step_end(trainer, 6)
    schedule.metrics = None
    driver.on_train_epoch_end(trainer)
    assert len(first.metrics) == 4 and len(second.metrics) == 2
    schedule.metrics = {"m": 2.0}
    driver.on_train_epoch_end(SimpleNamespace(current_epoch=0, loggers=None))  # no loggers at all
    driver.on_optimizer_step_end(SimpleNamespace(global_step=1), 0)
    assert len(first.metrics) == 4 and len(second.metrics) == 2
    assert driver.loss_term().item() == 0.25


def test_the_driver_sends_each_report_once_from_rank_zero_and_again_after_a_restore(monkeypatch) -> None:
    sent = []
    monkeypatch.setattr(hooks, "report_figure", lambda report: ("figure", len(report.rows)))
    monkeypatch.setattr(hooks, "log_report", lambda lg, report, fig, step: sent.append((lg, report.rows, fig, step)))
    schedule = _Schedule()
    schedule.metrics = None
    driver = ScheduleDriver(schedule)
    logger, other = _Logger(), _Logger()
    trainer = SimpleNamespace(loggers=[logger, other], global_step=4, current_epoch=0)
    driver.on_train_epoch_end(trainer)  # no report yet
    schedule.rows = [[1]]
    for quiet in (
        SimpleNamespace(loggers=[logger], global_step=4, current_epoch=0, is_global_zero=False),
        SimpleNamespace(loggers=[], global_step=4, current_epoch=0),
        SimpleNamespace(global_step=4, current_epoch=0),
    ):
        driver.on_train_epoch_end(quiet)
    assert sent == [] and driver._logged == 0
    driver.on_train_epoch_end(trainer)  # one row, none sent yet
    assert sent == [(logger, [[1]], ("figure", 1), 4), (other, [[1]], ("figure", 1), 4)] and driver._logged == 1
    driver.on_train_epoch_end(trainer)  # nothing new
    assert len(sent) == 2
    schedule.rows = [[1], [2]]
    driver.on_train_epoch_end(SimpleNamespace(loggers=[logger], global_step=9, current_epoch=1, is_global_zero=True))
    assert sent[2:] == [(logger, [[1], [2]], ("figure", 2), 9)] and driver._logged == 2
    assert driver.state_dict() == {"budget": 3}
    driver.load_state_dict({"budget": 5})
    assert schedule.calls[-1] == ("load", {"budget": 5}) and driver._logged == 0
    schedule.rows = [[1]]
    driver.on_train_epoch_end(SimpleNamespace(loggers=[logger], current_epoch=2))  # the whole report again
    assert sent[3:] == [(logger, [[1]], ("figure", 1), 0)]
