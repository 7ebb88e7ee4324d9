"""AdaLoRA maths, bad input, and its training schedule driven by hand and through the Lightning driver."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

import lightning_adapters as la
from lightning_adapters.interop.peft import peft_config_dict
from lightning_adapters.lightning.hooks import ScheduleDriver
from lightning_adapters.methods.adalora import (
    AdaLoRASchedule,
    RankAllocator,
    adalora_layers,
    budget_schedule,
    masks_for_budget,
    orthogonal_regularizer,
)
from tests.helpers import LAYERS, Wrap, tiny_llama, token_batch


def cfg(**kw):
    base = dict(init_r=4, target_r=2, target_modules=["q_proj", "v_proj"])
    return la.AdaLoRAConfig(**{**base, **kw})


# --- bad input ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, words",
    [
        (dict(init_r=4, target_r=6), ["target_r=6", "init_r=4"]),
        (dict(tinit=5, tfinal=5, total_step=10), ["tinit=5", "tfinal=5", "total_step=10"]),
        (dict(beta1=1.0), ["beta1", "between 0 and 1"]),
        (dict(beta2=0.0), ["beta2", "between 0 and 1"]),
        (dict(beta1=-0.2), ["beta1"]),
        (dict(schedule="batch"), ["schedule", "'batch'"]),
        (dict(orth_reg_weight=-1.0), ["orth_reg_weight"]),
        (dict(deltaT=0), ["deltaT"]),
        (dict(rank_pattern={"model.layers.0.self_attn.q_proj": [True, False]}), ["rank_pattern", "init_r=4"]),
    ],
)
def test_bad_config_values_raise_clear_errors(kw, words) -> None:
    with pytest.raises(la.AdapterConfigError) as err:
        cfg(**kw)
    for w in words:
        assert w in str(err.value)


@pytest.mark.parametrize("kind", ["embedding", "conv1d"])
def test_unsupported_layers_raise_before_any_change(kind) -> None:
    model = Wrap(LAYERS[kind].make())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(la.UnsupportedLayerError, match="adalora"):
        la.inject(model, la.AdaLoRAConfig(init_r=2, target_r=1, target_modules=["layer"]))
    assert type(model.layer) is type(LAYERS[kind].make())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_grouped_conv2d_is_refused_with_the_fix() -> None:
    model = Wrap(LAYERS["conv2d_groups"].make())
    with pytest.raises(la.AdapterConfigError, match="groups=2"):
        la.inject(model, la.AdaLoRAConfig(init_r=2, target_r=1, target_modules=["layer"]))
    assert not hasattr(model.layer, "adapter")


def _fake_trainer(**kw):
    base = dict(estimated_stepping_batches=10, max_epochs=2, current_epoch=0, global_step=0, loggers=[])
    return SimpleNamespace(**{**base, **kw})


@pytest.mark.parametrize(
    "config, trainer, words",
    [
        (cfg(schedule="epoch"), _fake_trainer(max_epochs=-1), ["max_epochs"]),
        (cfg(), _fake_trainer(estimated_stepping_batches=float("inf")), ["unbounded"]),
    ],
)
def test_hooks_setup_rejects_schedules_the_trainer_cannot_size(config, trainer, words) -> None:
    model = la.inject(tiny_llama(), config)
    hooks = ScheduleDriver(AdaLoRASchedule(model, config))
    with pytest.raises(la.AdapterConfigError) as err:
        hooks.setup(trainer)
    for w in words:
        assert w in str(err.value)
    assert hooks.schedule.allocator is None


@pytest.mark.parametrize(
    "config, trainer, words",
    [
        (cfg(tinit=6, tfinal=4), _fake_trainer(estimated_stepping_batches=10), ["tinit=6", "10 optimizer steps"]),
        (cfg(schedule="epoch", tinit=1, tfinal=1), _fake_trainer(max_epochs=2), ["2 epochs", "tfinal=1"]),
    ],
)
def test_hooks_setup_turns_reallocation_off_when_the_trainer_run_is_too_short(config, trainer, words) -> None:
    model = la.inject(tiny_llama(), config)
    hooks = ScheduleDriver(AdaLoRASchedule(model, config))
    with pytest.warns(UserWarning, match="without rank reallocation") as caught:
        hooks.setup(trainer)
    for w in words:
        assert w in str(caught[0].message)
    assert hooks.schedule.reallocate is False and hooks.schedule.allocator is None
    # Driven by hand, the schedule returns the notice instead.
    notice = AdaLoRASchedule(la.inject(tiny_llama(), config), config).start(
        trainer.estimated_stepping_batches if config.schedule == "step" else trainer.max_epochs
    )
    assert notice == str(caught[0].message)


# --- maths ----------------------------------------------------------------------------------------------------


def test_budget_schedule_matches_peft_measured_example() -> None:
    # METHODS.md §6.1 (measured on PEFT 0.21): init 24, target 8, tinit 2, tfinal 4, total 14, deltaT 2.
    got = [budget_schedule(t, 24, 8, 2, 4, 14, 2) for t in range(16)]
    assert [b for b, _ in got] == [24, 24, 24, 18, 14, 11, 10, 8, 8, 8, 8, 8, 8, 8, 8, 8]
    assert [t for t, (_, m) in enumerate(got) if m and t <= 10] == [4, 6, 8, 10]


def test_masks_for_budget_prunes_ties_together() -> None:
    scores = {"a": torch.tensor([1.0, 2.0, 2.0]), "b": torch.tensor([2.0, 5.0])}
    masks = masks_for_budget(scores, 2)  # the 2nd smallest is 2.0, and every 2.0 goes
    assert masks["a"].tolist() == [False, False, False] and masks["b"].tolist() == [False, True]
    assert all(m.all() for m in masks_for_budget(scores, 0).values())


def test_orthogonal_regularizer_closed_form() -> None:
    model = la.inject(tiny_llama(), cfg())
    layers = list(adalora_layers(model).values())
    with torch.no_grad():
        for layer in layers:
            q_in = torch.linalg.qr(torch.randn(layer.lora_A.shape[1], 4))[0]  # (in, 4), orthonormal columns
            q_out = torch.linalg.qr(torch.randn(layer.lora_B.shape[0], 4))[0]  # (out, 4)
            layer.lora_A.copy_(q_in.T)
            layer.lora_B.copy_(q_out)
    assert orthogonal_regularizer(layers).item() < 1e-5
    with torch.no_grad():
        for layer in layers:
            layer.lora_A.mul_(2.0)  # A Aᵀ = 4 I: ‖3 I‖_F = 3·√r for every A, 0 for every B
    assert math.isclose(orthogonal_regularizer(layers).item(), 3 * math.sqrt(4) / 2, rel_tol=1e-5)


def test_export_before_any_pruning_has_no_rank_pattern_and_a_valid_total() -> None:
    model = la.inject(tiny_llama(), cfg(tinit=3, tfinal=2))
    d = peft_config_dict(model)
    assert d["rank_pattern"] is None and d["total_step"] == 6 and d["peft_type"] == "ADALORA"
    AdaLoRASchedule(model, cfg(tinit=3, tfinal=2)).start(40)
    assert peft_config_dict(model)["total_step"] == 40


# --- hooks called directly ------------------------------------------------------------------------------------


class MetricsOnly:
    """A logger with no image, table or directory support."""

    def __init__(self) -> None:
        self.metrics: list[dict] = []

    def log_metrics(self, metrics, step=None) -> None:
        self.metrics.append(dict(metrics))


class WandbLike(MetricsOnly):
    def __init__(self) -> None:
        super().__init__()
        self.tables, self.images = [], []

    def log_table(self, key, columns=None, data=None, step=None) -> None:
        self.tables.append((key, columns, data))

    def log_image(self, key, images, step=None) -> None:
        self.images.append((key, images))


def _drive(model, hooks, trainer, steps, start=0):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.02)
    for t in range(start, start + steps):
        ids = token_batch(128, (2, 8), seed=t)
        loss = model(input_ids=ids, labels=ids).loss + hooks.loss_term()
        loss.backward()
        opt.step()
        trainer.global_step = t + 1
        hooks.on_optimizer_step_end(trainer, t)
        opt.zero_grad()
    return opt


def test_hooks_log_to_any_logger_without_crashing() -> None:
    torch.manual_seed(0)
    config = cfg(tinit=1, tfinal=2, deltaT=1)
    model = la.inject(tiny_llama(), config)
    plain, wandb = MetricsOnly(), WandbLike()
    trainer = _fake_trainer(estimated_stepping_batches=8, loggers=[plain, wandb], is_global_zero=True)
    hooks = ScheduleDriver(AdaLoRASchedule(model, config))
    hooks.setup(trainer)
    _drive(model, hooks, trainer, 8)
    hooks.on_train_epoch_end(trainer)
    assert [h["t"] for h in hooks.schedule.history] == [2, 3, 4, 5, 6]
    assert plain.metrics[-1]["adalora/kept"] == 8.0 and plain.metrics[-1]["adalora/budget"] == 8.0
    key, columns, rows = wandb.tables[-1]
    assert columns[4:] == hooks.schedule.names and len(rows) == 5
    image = wandb.images[-1][1][0]
    assert isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8


def test_hooks_state_round_trip_continues_exactly() -> None:
    torch.manual_seed(0)
    config = cfg(tinit=1, tfinal=2, deltaT=2)
    model = la.inject(tiny_llama(), config)
    twin = copy.deepcopy(model)
    trainer = _fake_trainer(estimated_stepping_batches=10)
    hooks = ScheduleDriver(AdaLoRASchedule(model, config))
    hooks.setup(trainer)
    _drive(model, hooks, trainer, 10)

    # Interrupted twin: 5 steps, then a fresh schedule restored from the state (and the optimizer's).
    t_hooks = ScheduleDriver(AdaLoRASchedule(twin, config))
    t_hooks.setup(_fake_trainer(estimated_stepping_batches=10))
    opt = _drive(twin, t_hooks, _fake_trainer(), 5)
    state, opt_state = copy.deepcopy(t_hooks.state_dict()), copy.deepcopy(opt.state_dict())
    resumed = AdaLoRASchedule(twin, config)
    resumed.load_state_dict(state)  # before start, as Lightning restores before fit start
    resumed.start(10)
    opt2 = torch.optim.AdamW([p for p in twin.parameters() if p.requires_grad], lr=0.02)
    opt2.load_state_dict(opt_state)
    for t in range(5, 10):
        ids = token_batch(128, (2, 8), seed=t)
        (twin(input_ids=ids, labels=ids).loss + resumed.loss_term()).backward()
        opt2.step()
        resumed.after_optimizer_step(t, t + 1)
        opt2.zero_grad()
    assert resumed.rank_pattern == hooks.schedule.rank_pattern
    assert resumed.history == hooks.schedule.history
    for k, v in la.adapter_state_dict(model).items():
        assert torch.allclose(la.adapter_state_dict(twin)[k].float(), v.float(), atol=1e-6), k


def test_state_for_other_modules_is_refused() -> None:
    model = la.inject(tiny_llama(), cfg())
    other = la.inject(tiny_llama(), cfg(target_modules=["q_proj"]))
    schedule = AdaLoRASchedule(model, cfg())
    schedule.start(10)
    state = schedule.state_dict()
    with pytest.raises(la.AdapterStateError, match="target_modules"):
        AdaLoRASchedule(other, cfg(target_modules=["q_proj"])).load_state_dict(state)


def test_allocator_without_total_step_says_what_to_set() -> None:
    model = la.inject(tiny_llama(), cfg())
    with pytest.raises(la.AdapterConfigError, match="total_step"):
        RankAllocator(model, la.config_of(model))
    assert isinstance(
        RankAllocator(model, la.config_of(model), total=5).layers["model.layers.0.self_attn.q_proj"], nn.Module
    )


@pytest.mark.parametrize("offset", [None, 100], ids=["step", "loop-counter"])
def test_the_history_records_the_loop_s_counter_beside_the_optimizer_step(offset) -> None:
    """``after_optimizer_step(t, global_step)`` records ``t`` and the loop's counter (a resumed or accumulating loop
    counts differently); without a counter, ``t`` for both."""
    torch.manual_seed(0)
    config = cfg(tinit=1, tfinal=2, deltaT=2)
    model = la.inject(tiny_llama(), config)
    schedule = AdaLoRASchedule(model, config)
    schedule.start(10)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.02)
    for t in range(6):
        ids = token_batch(128, (2, 8), seed=t)
        (model(input_ids=ids, labels=ids).loss + schedule.loss_term()).backward()
        opt.step()
        if offset is None:
            schedule.after_optimizer_step(t)
        else:
            schedule.after_optimizer_step(t, offset + t)
        opt.zero_grad()
    assert [h["t"] for h in schedule.history] == [2, 4]  # deltaT=2 from tinit=1
    assert [h["global_step"] for h in schedule.history] == [t + (offset or 0) for t in (2, 4)]
    report = schedule.report()
    assert (report.table_key, report.heatmap_key) == ("adalora/ranks", "adalora/rank_heatmap")
    assert len(report.rows) == 2
