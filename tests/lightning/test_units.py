"""Direct tests of the Lightning integration's helpers, without a Trainer (issue 21: surviving mutants).

Each test pins a behaviour the Trainer-driven tests reach only on one side (one logger kind, one strategy, the
default arguments), against a value written out by hand.
"""

from __future__ import annotations

import csv
from typing import Any

import numpy as np
import pytest
import torch

import lightning_adapters as la
from lightning_adapters.core.state import base_fingerprint, name_free_keys
from lightning_adapters.errors import AdapterConfigError, AdapterStateError
from lightning_adapters.lightning import reports, scope
from lightning_adapters.lightning.callback import swap_class
from lightning_adapters.lightning.checkpoint import (
    DEEPSPEED_ADAPTER_KEY,
    DEEPSPEED_STATES,
    METADATA_KEY,
    _needs_configure_model,
    build_metadata,
    load_checkpoint_file,
    restore_from_checkpoint,
    validate_checkpoint,
)
from lightning_adapters.lightning.export import export_at_fit_end
from lightning_adapters.lightning.runtime import (
    RUNTIME_ATTR,
    AdapterOptions,
    as_config,
    attach_runtime,
    detach_runtime,
)
from lightning_adapters.lightning.strategies import adapter_parallelize_fn, block_types_of, prepare_strategy
from lightning_adapters.schedules import Heatmap, ScheduleReport
from tests.lightning.models import two_fc_backbone


def _report(names: list[str] | None = None) -> ScheduleReport:
    names = names or ["model.layers.0.q_proj", "model.layers.1.q_proj"]
    heatmap = Heatmap(
        values=[[float((i + j) % 3) for j in range(2)] for i in range(len(names))],
        row_labels=names,
        column_labels=["10", "20"],
        vmax=2.0,
        title="ranks",
        xlabel="step",
        colorbar="rank",
    )
    return ScheduleReport(
        table_key="adalora/ranks",
        columns=["step", "budget"],
        rows=[[10, 4], [20, 2]],
        heatmap_key="adalora/rank_heatmap",
        heatmap=heatmap,
    )


class _Recorder:
    """Records every call made on it: ``calls`` is a list of ``(method, args, kwargs)``."""

    def __init__(self, methods: tuple[str, ...]) -> None:
        self.calls: list[tuple[str, tuple, dict]] = []
        for m in methods:
            setattr(self, m, self._record(m))

    def _record(self, method: str):
        def call(*args, **kwargs):
            self.calls.append((method, args, kwargs))

        return call


@pytest.mark.parametrize("with_figure", [True, False])
def test_log_report_to_a_wandb_like_logger_sends_the_table_and_the_image(with_figure: bool) -> None:
    pytest.importorskip("matplotlib")
    report = _report()
    fig = reports.report_figure(report) if with_figure else None
    logger = _Recorder(("log_table", "log_image"))
    reports.log_report(logger, report, fig, step=7)
    assert logger.calls[0] == (
        "log_table",
        (),
        {"key": "adalora/ranks", "columns": ["step", "budget"], "data": [[10, 4], [20, 2]], "step": 7},
    )
    if not with_figure:
        assert len(logger.calls) == 1
        return
    (method, args, kwargs), expected = logger.calls[1], reports.figure_to_array(fig)
    assert (method, args, kwargs["key"], kwargs["step"]) == ("log_image", (), "adalora/rank_heatmap", 7)
    (image,) = kwargs["images"]
    assert image.dtype == np.uint8 and image.shape == expected.shape and image.shape[2] == 3
    assert np.array_equal(image, expected)


def test_log_report_to_a_tensorboard_like_logger_writes_a_markdown_table_and_an_hwc_image() -> None:
    pytest.importorskip("matplotlib")
    report = _report()
    fig = reports.report_figure(report)
    logger = type("TB", (), {})()
    logger.experiment = _Recorder(("add_image", "add_text"))
    reports.log_report(logger, report, fig, step=3)
    (image_call, text_call) = logger.experiment.calls
    method, (key, image, step), kwargs = image_call
    assert (method, key, step, kwargs) == ("add_image", "adalora/rank_heatmap", 3, {"dataformats": "HWC"})
    assert np.array_equal(image, reports.figure_to_array(fig))
    table = "| step | budget |\n|---|---|\n| 10 | 4 |\n| 20 | 2 |"
    assert text_call == ("add_text", ("adalora/ranks", table, 3), {})


def test_log_report_to_a_file_logger_writes_the_csv_and_the_png(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    report = _report()
    logger = type("CSV", (), {"log_dir": str(tmp_path / "logs")})()
    reports.log_report(logger, report, reports.report_figure(report), step=0)
    with open(tmp_path / "logs" / "adalora_ranks.csv", newline="") as f:
        assert list(csv.reader(f)) == [["step", "budget"], ["10", "4"], ["20", "2"]]
    png = tmp_path / "logs" / "adalora_rank_heatmap.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == ["adalora_rank_heatmap.png", "adalora_ranks.csv"]


def test_rank_heatmap_grows_only_as_much_as_its_labels_need() -> None:
    pytest.importorskip("matplotlib")
    # Twelve rows with long labels: the first layout leaves the labels outside, so the figure is grown (measured).
    names = [
        f"model.backbone_with_a_rather_long_name.encoder.layer.{i}.attention.self.{p}_projection_of_the_block"
        for i in range(6)
        for p in ("query", "value")
    ]
    fig = reports.heatmap_figure(_report(names).heatmap)
    fig.canvas.draw()
    box = fig.get_tightbbox(fig.canvas.get_renderer())
    w, h = fig.get_size_inches()
    # Everything is on the canvas, with at most a small margin on each side (no empty band).
    margins = (box.x0, box.y0, w - box.x1, h - box.y1)
    assert all(-0.01 <= m <= 0.3 for m in margins), margins
    # The height is the layout's estimate (1.5 in + 0.22 in a row + 0.3 in) plus what the labels needed.
    assert h <= 1.5 + 0.22 * len(names) + 0.3 + 0.5, h
    assert fig.axes[0].get_title() == "ranks\nmodules under model.backbone_with_a_rather_long_name.encoder.layer."


@pytest.mark.parametrize(
    ("names", "prefix"),
    [
        (["a.b.c", "a.b.d"], "a.b."),
        (["a.b.c", "a.x.c"], "a."),
        (["a.b.c", "z.b.c"], ""),
        (["a.b", "a.b.c"], "a."),  # never a whole name: "a.b" keeps its last part
        (["x", "y"], ""),
    ],
)
def test_common_prefix_is_the_shared_dotted_prefix(names: list[str], prefix: str) -> None:
    assert reports._common_prefix(names) == prefix


# ------------------------------------------------------------------------------------------------------------
# export_at_fit_end: every rank calls it; rank zero writes, in each branch (plain, DTensor shards).


class _Strategy:
    def __init__(self) -> None:
        self.model, self.barriers = None, []

    def barrier(self, name: str) -> None:
        self.barriers.append(name)


def _injected_mlp_named(name: str = "default") -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    la.inject(model, la.LoRAConfig(r=2, target_modules=["0", "2"], init_weights=False), name=name)
    return model


def _injected_mlp() -> torch.nn.Module:
    return _injected_mlp_named()


def _files(directory) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(directory / "adapter_model.safetensors"))


def _deepspeed_zero3() -> Any:
    from lightning.pytorch.strategies import DeepSpeedStrategy

    pytest.importorskip("deepspeed")
    strategy = DeepSpeedStrategy(stage=3)  # not set up: the export's gathering is a no-op on plain parameters
    strategy.barriers = []
    strategy.barrier = strategy.barriers.append
    return strategy


@pytest.mark.parametrize("global_zero", [True, False])
@pytest.mark.parametrize("kind", ["plain", "dtensor", "zero3"])
def test_export_at_fit_end_writes_the_peft_adapter_on_rank_zero_only(tmp_path, kind, global_zero) -> None:
    import torch.distributed as dist

    model = _injected_mlp()
    la.save_peft(model, tmp_path / "want")
    want = _files(tmp_path / "want")
    strategy = _deepspeed_zero3() if kind == "zero3" else _Strategy()
    trainer = type("Trainer", (), {"is_global_zero": global_zero, "strategy": strategy})()
    if kind != "dtensor":
        export_at_fit_end(trainer, model, peft_dir=str(tmp_path / "peft"))
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        if dist.is_initialized():
            pytest.skip("a process group is already set up in this process")
        dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
        try:
            mesh = init_device_mesh("cpu", (1,))
            for module in model.modules():
                for name, p in list(module.named_parameters(recurse=False)):
                    if p.requires_grad:
                        setattr(module, name, torch.nn.Parameter(distribute_tensor(p.detach(), mesh, [Shard(0)])))
            export_at_fit_end(trainer, model, peft_dir=str(tmp_path / "peft"))
        finally:
            dist.destroy_process_group()
    assert strategy.barriers == ["lightning_adapters.export"]
    if not global_zero:
        assert not (tmp_path / "peft").exists()
        return
    got = _files(tmp_path / "peft")
    assert got.keys() == want.keys() and len(got) == 4
    for k in want:
        assert torch.equal(got[k], want[k]), k


# ------------------------------------------------------------------------------------------------------------
# Configs given as YAML mappings, runtimes attached twice, strategies prepared before setup.


@pytest.mark.parametrize("class_path", ["lightning_adapters.LoRAConfig", "LoRAConfig"])
def test_as_config_reads_a_jsonargparse_class_path(class_path: str) -> None:
    config = as_config({"class_path": class_path, "init_args": {"r": 3, "target_modules": ["fc"]}})
    assert config == la.LoRAConfig(r=3, target_modules=["fc"])


@pytest.mark.parametrize("class_path", ["lightning_adapters.AdapterConfig", "torch.nn.Linear", "NoSuchConfig"])
def test_as_config_refuses_a_class_path_that_is_not_an_adapter_config(class_path: str) -> None:
    with pytest.raises(AdapterConfigError, match="is not an adapter config class"):
        as_config({"class_path": class_path})


def test_attaching_a_different_config_to_a_set_up_module_names_the_earlier_setup() -> None:
    from lightning.pytorch import LightningModule

    pl_module = LightningModule()
    attach_runtime(pl_module, la.LoRAConfig(r=2), AdapterOptions())
    assert attach_runtime(pl_module, la.LoRAConfig(r=2), AdapterOptions()).config == la.LoRAConfig(r=2)
    with pytest.raises(AdapterConfigError, match="differs from an earlier setup"):
        attach_runtime(pl_module, la.LoRAConfig(r=4), AdapterOptions())


def test_prepare_strategy_under_deepspeed_keeps_the_adapter_state_in_the_client_state() -> None:
    pytest.importorskip("deepspeed")
    from lightning.pytorch.strategies import DeepSpeedStrategy

    model = _injected_mlp()
    strategy = DeepSpeedStrategy(stage=2)
    written = []
    strategy.save_checkpoint = lambda checkpoint, path, storage_options=None: written.append((checkpoint, path))
    prepare_strategy(type("Trainer", (), {"strategy": strategy})(), model, model)
    assert strategy.exclude_frozen_parameters is True
    state = {"0.adapter.lora_A": torch.ones(1)}
    strategy.save_checkpoint({"state_dict": state, "epoch": 1}, "ckpt")
    assert written == [({"state_dict": state, "epoch": 1, DEEPSPEED_ADAPTER_KEY: state}, "ckpt")]


def test_block_types_of_a_transformers_model_are_its_no_split_modules() -> None:
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from tests.helpers import tiny_llama

    assert block_types_of(tiny_llama()) == (LlamaDecoderLayer,)
    assert block_types_of(torch.nn.Sequential(torch.nn.Linear(2, 2))) == ()


# ------------------------------------------------------------------------------------------------------------
# Checkpoint files: refusals that name the cause.


class _NotAllowed:
    """A class torch.load(weights_only=True) refuses to unpickle."""


def test_a_checkpoint_holding_arbitrary_objects_is_refused_with_the_weights_only_hint(tmp_path) -> None:
    path = tmp_path / "x.ckpt"
    torch.save({"state_dict": {}, "obj": _NotAllowed()}, path)
    with pytest.raises(AdapterStateError, match="if you trust the file, pass weights_only=False"):
        load_checkpoint_file(path)
    assert isinstance(load_checkpoint_file(path, weights_only=False)["obj"], _NotAllowed)


@pytest.mark.parametrize("keys", [("meta",), ("adapter",), ()])
def test_a_deepspeed_checkpoint_without_the_integrations_entries_is_refused(tmp_path, keys) -> None:
    states = {"module": None}
    if "meta" in keys:
        states[METADATA_KEY] = {"format": 2}
    if "adapter" in keys:
        states[DEEPSPEED_ADAPTER_KEY] = {}
    directory = tmp_path / "last.ckpt"
    (directory / DEEPSPEED_STATES[0]).parent.mkdir(parents=True)
    torch.save(states, directory / DEEPSPEED_STATES[0])
    with pytest.raises(AdapterStateError, match="written without lightning_adapters"):
        load_checkpoint_file(directory)


def test_a_deepspeed_checkpoint_with_the_integrations_entries_reads_its_adapter_state(tmp_path) -> None:
    state = {"0.adapter.lora_A": torch.ones(2)}
    directory = tmp_path / "last.ckpt"
    (directory / DEEPSPEED_STATES[0]).parent.mkdir(parents=True)
    torch.save({METADATA_KEY: {"format": 2}, DEEPSPEED_ADAPTER_KEY: state}, directory / DEEPSPEED_STATES[0])
    got = load_checkpoint_file(directory)
    assert got[METADATA_KEY] == {"format": 2} and torch.equal(got["state_dict"]["0.adapter.lora_A"], torch.ones(2))


def test_needs_configure_model_looks_for_saved_tensors_inside_the_sub_module() -> None:
    lm = torch.nn.Module()
    lm.model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    adapter = ["0.adapter.lora_A", "1.weight"]  # relative to the sub-module: an adapted layer, a saved head
    assert not _needs_configure_model(lm, "model", adapter, [])
    assert _needs_configure_model(lm, "model", ["0.adapter.lora_A", "2.weight"], [])  # the head is not built yet
    assert _needs_configure_model(lm, "model", ["5.adapter.lora_A"], [])
    assert _needs_configure_model(lm, "encoder", adapter, [])
    assert not _needs_configure_model(lm.model, "", adapter, [])


def test_scope_examples_are_the_shallowest_names_first() -> None:
    names = ["a.b.c", "z", "a.b", "y.x", "a"]
    assert scope._examples(names) == ["a", "z", "a.b", "y.x", "a.b.c"]
    assert scope._examples(names, limit=2) == ["a", "z"]


def test_a_format_1_checkpoint_resumes_into_a_model_whose_one_adapter_has_another_name() -> None:
    # Format 1 files hold one unnamed adapter (``<module>.adapter.<tensor>`` keys, no "adapters" entry); it is the
    # model's one adapter whatever that adapter is called.
    model = _injected_mlp_named("b")
    config = la.config_of(model, "b")
    free = name_free_keys(model, "b")
    live = {k: v.detach().clone() for k, v in model.state_dict().items() if k in free}
    meta = {
        "format": 1,
        "method": "lora",
        "config": config.to_dict(),
        "module": "",
        "adapter_shapes": {free[k]: list(v.shape) for k, v in live.items()},
    }
    checkpoint = {METADATA_KEY: meta, "state_dict": {free[k]: v for k, v in live.items()}}
    validate_checkpoint(
        checkpoint,
        model,
        adapters={"b": ("lora", config)},
        fingerprint=None,
        expected=lambda names: {k: list(v.shape) for k, v in live.items()} if names == ["b"] else {},
    )
    assert sorted(checkpoint["state_dict"]) == sorted(live)  # keys upgraded to the model's named ones


def test_a_mixin_adapter_name_is_checked_like_the_callbacks() -> None:
    from lightning.pytorch import LightningModule

    pl_module = LightningModule()
    pl_module.adapter_name = "not a name"
    with pytest.raises(AdapterConfigError, match="adapter_name: adapter name 'not a name' is not usable"):
        attach_runtime(pl_module, la.LoRAConfig(r=2), AdapterOptions())


def test_a_callback_not_yet_set_up_has_empty_state() -> None:
    callback = la.AdapterCallback(la.LoRAConfig(r=2), verbose=False)
    assert callback.state_dict() == {}
    callback.load_state_dict({})  # Lightning may restore callback state before setup; nothing to restore
    assert callback.state_dict() == {}


def test_detach_runtime_restores_the_module_as_it_was_before_attach() -> None:
    from lightning.pytorch import LightningModule

    class Plain(LightningModule):
        pass

    pl_module = Plain()
    pl_module.strict_loading = True
    attach_runtime(pl_module, la.LoRAConfig(r=2), AdapterOptions())
    swap_class(pl_module)
    assert type(pl_module) is not Plain and pl_module.strict_loading is False
    assert detach_runtime(pl_module) is True
    assert type(pl_module) is Plain and pl_module.strict_loading is True
    assert RUNTIME_ATTR not in pl_module.__dict__
    assert detach_runtime(pl_module) is False


def test_adapter_parallelize_fn_shards_every_unit_with_the_given_mixed_precision_policy(tmp_path) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy
    from torch.distributed.tensor import DTensor

    with pytest.raises(AdapterStateError, match="needs an injected model"):
        adapter_parallelize_fn(torch.nn.Linear(2, 2), None)
    model = _injected_mlp()
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(1))
    want = model(x)
    if dist.is_initialized():
        pytest.skip("a process group is already set up in this process")
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        adapter_parallelize_fn(model, mesh, mp_policy=MixedPrecisionPolicy(param_dtype=torch.float64))
        assert all(isinstance(p, DTensor) for p in model.parameters())  # before a forward gathers them
        got = model(x.double())
    finally:
        dist.destroy_process_group()
    assert got.dtype == torch.float64  # the policy's parameter dtype: the policy reached the units
    torch.testing.assert_close(got.float(), want, rtol=1e-5, atol=1e-6)


def test_restore_onto_a_sub_module_adapts_exactly_the_trained_modules_whatever_the_exclude_regex(tmp_path) -> None:
    # A regex exclude_modules full-matches names relative to where it was injected: r"enc\.fc" excluded nothing
    # in the LightningModule ("backbone.enc.fc"), but would exclude "enc.fc" of the bare backbone.
    from lightning.pytorch import LightningModule

    lm = LightningModule()
    lm.backbone = two_fc_backbone()
    config = la.LoRAConfig(r=2, target_modules=["fc"], exclude_modules=r"enc\.fc", init_weights=False)
    la.inject(lm, config)
    state = la.adapter_state_dict(lm)
    meta = build_metadata(
        adapters={"default": ("lora", config)},
        name="default",
        active=["default"],
        trainable=["default"],
        module="",
        fingerprint=base_fingerprint(lm),
        shapes={k: list(v.shape) for k, v in state.items()},
    )
    torch.save({METADATA_KEY: meta, "state_dict": state}, tmp_path / "a.ckpt")
    bare = restore_from_checkpoint(two_fc_backbone(), tmp_path / "a.ckpt", module="backbone")
    assert sorted(n for n, _ in bare.named_modules() if n.endswith(".adapter")) == ["dec.fc.adapter", "enc.fc.adapter"]
    x = torch.randn(2, 4)
    for name in ("enc.fc", "dec.fc"):
        assert torch.equal(bare.get_submodule(name)(x), lm.backbone.get_submodule(name)(x)), name


def test_merged_export_owns_exactly_the_files_save_pretrained_writes() -> None:
    from lightning_adapters.lightning.export import _merged_owned

    owned = ["config.json", "model.safetensors", "model-00001-of-00002.safetensors", "model.safetensors.index.json"]
    assert all(_merged_owned(n) for n in owned)
    assert not any(_merged_owned(n) for n in ["README.md", "adapter_model.safetensors", "notes.json"])


def test_a_bad_callback_adapter_name_is_refused_naming_the_callback() -> None:
    with pytest.raises(AdapterConfigError, match="^AdapterCallback: adapter name 'a b' is not usable"):
        la.AdapterCallback(la.LoRAConfig(r=2), name="a b")


def test_the_mixin_passes_positional_arguments_to_the_module_it_is_mixed_into() -> None:
    from lightning.pytorch import LightningModule

    class Base(LightningModule):
        def __init__(self, width: int, depth: int = 1) -> None:
            super().__init__()
            self.width, self.depth = width, depth

    class Model(la.AdapterMixin, Base):
        pass

    model = Model(7, 3)
    assert (model.width, model.depth, model.strict_loading) == (7, 3, False)
