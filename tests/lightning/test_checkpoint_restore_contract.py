"""Contract of ``restore_from_checkpoint`` and the helpers it splits a checkpoint with (surviving mutants of
``lightning/checkpoint.py``, restore half).

The checkpoints are written by hand, as the integration writes them (``build_metadata``, keys relative to the
LightningModule), so every expected value is known: the trained model's own tensors, the names it had active and
training, or a key set written out here. No Trainer runs.
"""

from __future__ import annotations

import re
import warnings
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

import lightning_adapters as la
from lightning_adapters.core.inject import find_records
from lightning_adapters.core.named import trainable
from lightning_adapters.core.state import base_fingerprint
from lightning_adapters.errors import AdapterConfigError, AdapterStateError, AdapterTypeError
from lightning_adapters.lightning.checkpoint import (
    METADATA_KEY,
    _locate,
    _modules_of,
    _needs_configure_model,
    _strategy_loads_state,
    build_metadata,
    restore_from_checkpoint,
)


def _backbone(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 4))


def _net_class() -> type:
    from lightning.pytorch import LightningModule

    class Net(LightningModule):
        """``backbone`` (the adapted sub-module) and ``head`` (trained beside it); counts ``configure_model``."""

        def __init__(self, seed: int = 0, head_out: int = 3, lazy: bool = False) -> None:
            super().__init__()
            self.seed, self.configured = seed, 0
            self.backbone = None if lazy else _backbone(seed)
            self.head = nn.Linear(4, head_out)

        def configure_model(self) -> None:
            self.configured += 1
            if self.backbone is None:
                self.backbone = _backbone(self.seed)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.backbone(x))

    return Net


Net = _net_class()

# "a" on backbone.0; "b" on backbone.2 with the LayerNorm and the head in modules_to_save. The head lies beside
# the adapted sub-module: the file's config names it, the config injected into the backbone does not.
CA = la.LoRAConfig(r=2, target_modules=["0"], init_weights=False)
CB = la.LoRAConfig(r=3, target_modules=["2"], init_weights=False, modules_to_save=["1", "head"])
CB_INNER = la.LoRAConfig(r=3, target_modules=["2"], init_weights=False, modules_to_save=["1"])


def _trained(bias: str = "none") -> Any:
    """A ``Net`` whose backbone holds "a" and "b" (both active, "b" training), every saved tensor moved off init."""
    net = Net()
    la.inject(net.backbone, la.LoRAConfig(**{**CA.to_dict(), "bias": bias}), name="a")
    la.inject(net.backbone, CB_INNER, name="b")
    la.set_active(net.backbone, ["a", "b"])
    la.set_trainable(net.backbone, ["b"])
    saved = la.adapter_state_dict(net.backbone)
    with torch.no_grad():
        for k, v in net.backbone.state_dict(keep_vars=True).items():
            if k in saved:
                v.add_(0.25)
        net.head.weight.add_(1.0)
    return net


def _state(net: Any) -> dict[str, torch.Tensor]:
    state = {f"backbone.{k}": v.detach().clone() for k, v in la.adapter_state_dict(net.backbone).items()}
    state.update({f"head.{k}": v.detach().clone() for k, v in net.head.state_dict().items()})
    return state


def _write(
    path: Any,
    state: dict,
    adapters: dict,
    name: str,
    active: list[str],
    module: str = "",
    fingerprint: Any = None,
    meta_over: dict | None = None,
) -> dict:
    """Write a checkpoint holding ``state`` whose adapter ``name`` is the trained one, as the callback does;
    ``meta_over`` edits the metadata. Returns the metadata."""
    meta = build_metadata(
        adapters=adapters,
        name=name,
        active=active,
        trainable=[name],
        module=module,
        fingerprint=fingerprint,
        shapes={k: list(v.shape) for k, v in state.items()},
    )
    meta.update(meta_over or {})
    torch.save({METADATA_KEY: meta, "state_dict": state}, path)
    return meta


def _save(path: Any, net: Any, config_a: la.LoRAConfig = CA, **meta_over: Any) -> Any:
    """Write ``net``'s checkpoint as the callback does (``module="backbone"``); ``meta_over`` edits the metadata."""
    adapters = {"a": ("lora", config_a), "b": ("lora", CB)}
    fingerprint = base_fingerprint(net.backbone)
    _write(path, _state(net), adapters, "b", ["a", "b"], "backbone", fingerprint, meta_over)
    return path


def _write_one(
    path: Any, name: str, method: str, config: Any, state: dict, module: str = "", fingerprint: Any = None
) -> dict:
    """Write a checkpoint of one adapter ``name``, active and trained, holding ``state``; return its metadata."""
    return _write(path, state, {name: (method, config)}, name, [name], module, fingerprint)


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_state(model: nn.Module, want: dict[str, torch.Tensor]) -> None:
    _assert_state_dict_equal(model.state_dict(), want)


def _assert_same_adapters(got: nn.Module, want: nn.Module) -> None:
    _assert_state_dict_equal(la.adapter_state_dict(got), la.adapter_state_dict(want))


def _assert_state_dict_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=0, equal_nan=True, msg=k)


def _restore_quietly(*args: Any, **kwargs: Any) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return restore_from_checkpoint(*args, **kwargs)


def _grad_names(model: nn.Module) -> list[str]:
    return sorted(n for n, p in model.named_parameters() if p.requires_grad)


# ------------------------------------------------------------------------------------------------------------
# The LightningModule itself


def test_a_lightning_module_gets_every_adapter_its_head_and_the_names_that_act_and_train(tmp_path) -> None:
    trained = _trained()
    path = _save(tmp_path / "a.ckpt", trained)
    fresh = Net()
    assert _restore_quietly(fresh, path) is fresh
    assert fresh.configured == 0  # the backbone and the head exist: no configure_model call
    _assert_same_adapters(fresh.backbone, trained.backbone)
    _assert_state(fresh.head, trained.head.state_dict())
    assert la.active(fresh.backbone) == ["a", "b"] and trainable(fresh.backbone) == ["b"]
    assert _grad_names(fresh.backbone) == _grad_names(trained.backbone)
    configs = {rec.name: rec.config.to_dict() for _, _, rec in find_records(fresh)}
    assert configs == {"a": CA.to_dict(), "b": CB_INNER.to_dict()}  # the head is not the backbone's to save
    x = torch.randn(3, 6)
    torch.testing.assert_close(fresh(x), trained(x), rtol=0, atol=0)


def test_a_lightning_module_whose_backbone_is_built_in_configure_model_gets_it_built_once(tmp_path) -> None:
    trained = _trained()
    path = _save(tmp_path / "a.ckpt", trained)
    lazy = Net(lazy=True)
    _restore_quietly(lazy, path)
    assert lazy.configured == 1
    _assert_same_adapters(lazy.backbone, trained.backbone)
    _assert_state(lazy.head, trained.head.state_dict())


@pytest.mark.parametrize(
    ("active", "training", "want_active", "want_training"),
    [
        (["b"], ["a"], ["b"], ["a"]),
        (["gone", "b"], [], ["b"], []),
        (["gone"], ["b", "gone"], ["a", "b"], ["b"]),  # no known name acts: every adapter does
        ([], ["b"], ["a"], ["a"]),  # an empty list says nothing: inject's own choice (the first adapter) stays
    ],
)
def test_the_names_that_act_and_train_are_the_file_s_known_ones(tmp_path, active, training, want_active, want_training):
    path = _save(tmp_path / "a.ckpt", _trained(), active=active, trainable=training)
    fresh = _restore_quietly(Net(), path)
    assert la.active(fresh.backbone) == want_active and trainable(fresh.backbone) == want_training


def test_a_lightning_module_on_another_base_is_refused_unless_check_base_is_false(tmp_path) -> None:
    trained = _trained()
    path = _save(tmp_path / "a.ckpt", trained)
    other = Net(seed=1)
    before = _snapshot(other)
    with pytest.raises(AdapterStateError, match="different base model"):
        restore_from_checkpoint(other, path)
    assert find_records(other) == []
    _assert_state(other, before)
    _restore_quietly(other, path, check_base=False)
    _assert_same_adapters(other.backbone, trained.backbone)
    _assert_state(other.head, trained.head.state_dict())


def test_a_file_whose_trained_config_disagrees_with_its_adapters_entry_is_refused(tmp_path) -> None:
    trained = _trained()
    meta_config = {**CB.to_dict(), "dropout": 0.5}  # edited: the "adapters" entry still says 0.0
    path = _save(tmp_path / "a.ckpt", trained, config=meta_config)
    fresh = Net()
    before = _snapshot(fresh)
    with pytest.raises(AdapterStateError, match="different lora config"):
        restore_from_checkpoint(fresh, path)
    assert find_records(fresh) == []
    _assert_state(fresh, before)


def test_the_trained_adapter_is_built_from_the_top_level_config(tmp_path) -> None:
    # The top-level config leaves adapter_dtype unset (filled at fit time: not compared), its "adapters" entry
    # says float64: "b" is built from the top-level config, so in the model's float32.
    trained = _trained()
    adapters = {
        "a": {"method": "lora", "config": CA.to_dict()},
        "b": {"method": "lora", "config": {**CB.to_dict(), "adapter_dtype": "float64"}},
    }
    path = _save(tmp_path / "a.ckpt", trained, adapters=adapters)
    fresh = _restore_quietly(Net(), path)
    assert fresh.backbone[2].adapter.b.lora_A.dtype == torch.float32
    _assert_same_adapters(fresh.backbone, trained.backbone)


def test_an_untrained_adapter_is_checked_against_its_own_entry(tmp_path) -> None:
    # "a" of the file says r=5 while its tensors and the model's "a" have r=2: the entry of "a" is what counts.
    trained = _trained()
    adapters = {
        "a": {"method": "lora", "config": {**CA.to_dict(), "r": 5}},
        "b": {"method": "lora", "config": CB.to_dict()},
    }
    path = _save(tmp_path / "a.ckpt", trained, adapters=adapters)
    fresh = Net()
    with pytest.raises(AdapterStateError):
        restore_from_checkpoint(fresh, path)
    assert find_records(fresh) == []


def test_non_finite_tensors_are_refused_unless_check_finite_is_false(tmp_path) -> None:
    trained = _trained()
    with torch.no_grad():
        trained.backbone[2].adapter.b.lora_B[0, 0] = float("nan")
    path = _save(tmp_path / "a.ckpt", trained)
    fresh = Net()
    before = _snapshot(fresh)
    with pytest.raises(AdapterStateError, match="non-finite"):
        restore_from_checkpoint(fresh, path)
    assert find_records(fresh) == []
    _assert_state(fresh, before)
    _restore_quietly(fresh, path, check_finite=False)
    assert torch.isnan(fresh.backbone[2].adapter.b.lora_B[0, 0])
    _assert_same_adapters(fresh.backbone, trained.backbone)


class _Opaque:
    """Not a tensor, dict or list: ``torch.load(weights_only=True)`` refuses to rebuild it."""


def test_a_file_holding_other_objects_loads_only_with_weights_only_false(tmp_path) -> None:
    trained = _trained()
    path = _save(tmp_path / "a.ckpt", trained)
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["extra"] = _Opaque()
    torch.save(checkpoint, path)
    with pytest.raises(AdapterStateError, match="weights_only"):
        restore_from_checkpoint(Net(), path)
    fresh = _restore_quietly(Net(), path, weights_only=False)
    _assert_same_adapters(fresh.backbone, trained.backbone)


# ------------------------------------------------------------------------------------------------------------
# A bare model: the trained sub-module, or a part of the adapted one


@pytest.mark.parametrize("module", [None, "backbone", ".backbone."])
def test_a_bare_backbone_gets_the_adapter_and_a_warning_naming_the_head_it_lacks(tmp_path, module) -> None:
    trained = _trained()
    path = _save(tmp_path / "a.ckpt", trained)
    bare = _backbone()
    want = (
        f"{re.escape(str(path))} also holds tensors trained outside module='backbone' that this model does not "
        r"contain: \['head.bias', 'head.weight'\]; pass an instance"
    )
    with pytest.warns(UserWarning) as caught:
        assert restore_from_checkpoint(bare, path, module=module) is bare
    assert len(caught) == 1 and re.match(want, str(caught[0].message))
    _assert_same_adapters(bare, trained.backbone)
    assert la.active(bare) == ["a", "b"] and trainable(bare) == ["b"]
    x = torch.randn(3, 6)
    torch.testing.assert_close(bare(x), trained.backbone(x), rtol=0, atol=0)


def test_a_module_name_is_taken_as_written_but_for_the_dots_around_it(tmp_path) -> None:
    # Trained in a sub-module named "encX": only dots are stripped from a name, never its letters.
    trained = _trained()
    path = _save(tmp_path / "a.ckpt", trained)
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["state_dict"] = {k.replace("backbone.", "encX.", 1): v for k, v in checkpoint["state_dict"].items()}
    checkpoint[METADATA_KEY]["module"] = "encX"
    torch.save(checkpoint, path)
    for module in (None, ".encX."):
        bare = _backbone()
        with pytest.warns(UserWarning, match=r"outside module='encX'"):
            restore_from_checkpoint(bare, path, module=module)
        _assert_same_adapters(bare, trained.backbone)


def _whole_module_checkpoint(path: Any, *, format_1: bool = False) -> Any:
    """A Net with adapters injected into the whole LightningModule (``module=""``): "a" on backbone.0 and
    backbone.2 (excluding the head by name), "b" on backbone.2 saving the head; "b" trains."""
    net = Net()
    config_a = la.LoRAConfig(
        r=2, target_modules=["backbone.0", "backbone.2"], exclude_modules=["head"], init_weights=False
    )
    config_b = la.LoRAConfig(r=3, target_modules=["backbone.2"], modules_to_save=["head"], init_weights=False)
    la.inject(net, config_a, name="a")
    if not format_1:
        la.inject(net, config_b, name="b")
        la.set_trainable(net, ["b"])
    with torch.no_grad():
        for v in la.adapter_state_dict(net).values():
            v.add_(0.5)
    state = {k: v.detach().clone() for k, v in la.adapter_state_dict(net).items()}
    if format_1:
        state = {k.replace(".adapter.a.", ".adapter."): v for k, v in state.items()}
        meta = {"format": 1, "method": "lora", "config": config_a.to_dict(), "module": ""}
        torch.save({METADATA_KEY: meta, "state_dict": state}, path)
    else:
        adapters = {"a": ("lora", config_a), "b": ("lora", config_b)}
        _write(path, state, adapters, "b", ["a"], "", base_fingerprint(net))
    return net


def test_a_part_of_the_adapted_module_gets_exactly_the_layers_each_adapter_had_there(tmp_path) -> None:
    trained = _whole_module_checkpoint(tmp_path / "a.ckpt")
    bare = _backbone()
    with pytest.warns(UserWarning, match=r"outside module='backbone'.*\['head.bias', 'head.weight'\]"):
        restore_from_checkpoint(bare, tmp_path / "a.ckpt", module="backbone")
    targets = {rec.name: (rec.config.target_modules, rec.config.exclude_modules) for _, _, rec in find_records(bare)}
    assert targets == {"a": ("0|2", None), "b": ("2", None)}
    inside = {k[len("backbone.") :]: v for k, v in la.adapter_state_dict(trained).items() if k.startswith("backbone.")}
    _assert_state_dict_equal(la.adapter_state_dict(bare), inside)
    assert la.active(bare) == ["a"] and trainable(bare) == ["b"]


def test_a_format_1_whole_module_checkpoint_restores_onto_a_part_of_it(tmp_path) -> None:
    trained = _whole_module_checkpoint(tmp_path / "a.ckpt", format_1=True)
    bare = _restore_quietly(_backbone(), tmp_path / "a.ckpt", module="backbone")
    assert [rec.config.target_modules for _, _, rec in find_records(bare)] == ["0|2"]
    x = torch.randn(3, 6)
    torch.testing.assert_close(bare(x), trained.backbone(x), rtol=0, atol=0)


def test_a_whole_module_checkpoint_needs_a_module_for_a_bare_model(tmp_path) -> None:
    _whole_module_checkpoint(tmp_path / "a.ckpt")
    bare = _backbone()
    with pytest.raises(
        AdapterStateError,
        match=r"^the adapter was injected into the whole LightningModule.*one of \['backbone', 'head'\]$",
    ):
        restore_from_checkpoint(bare, tmp_path / "a.ckpt")
    with pytest.raises(
        AdapterStateError, match=r"holds no adapter tensors under module='tail'; .* \['backbone', 'head'\]"
    ):
        restore_from_checkpoint(bare, tmp_path / "a.ckpt", module="tail")
    assert find_records(bare) == []


def test_a_bare_model_named_as_the_whole_module_or_another_one_is_refused(tmp_path) -> None:
    path = _save(tmp_path / "a.ckpt", _trained())
    bare = _backbone()
    before = _snapshot(bare)
    where = re.escape(str(path))
    with pytest.raises(
        AdapterStateError, match=f"^Sequential has no sub-module 'backbone', where the adapter of {where}"
    ):
        restore_from_checkpoint(bare, path, module="")
    with pytest.raises(AdapterStateError, match=f"^module='head' does not hold the adapter of {where}, which was"):
        restore_from_checkpoint(bare, path, module="head")
    assert find_records(bare) == []
    _assert_state(bare, before)


# ------------------------------------------------------------------------------------------------------------
# Refusals before anything changes


def test_arguments_that_are_not_a_model_a_path_or_a_module_name_are_refused(tmp_path) -> None:
    path = _save(tmp_path / "a.ckpt", _trained())
    with pytest.raises(AdapterTypeError, match="^restore_from_checkpoint: model must be a torch.nn.Module"):
        restore_from_checkpoint("model", path)
    for bad in (3, "", "   "):
        with pytest.raises(AdapterConfigError, match="^restore_from_checkpoint: ckpt_path must be"):
            restore_from_checkpoint(Net(), bad)
    with pytest.raises(AdapterConfigError, match="^module must be a dotted sub-module name"):
        restore_from_checkpoint(Net(), path, module=3)


def _edited(path: Any, edit: Any) -> Any:
    checkpoint = torch.load(path, weights_only=True)
    torch.save(edit(checkpoint), path)
    return path


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: [c], " holds a list, not a Lightning checkpoint"),
        (lambda c: {"state_dict": c["state_dict"]}, " has no 'lightning_adapters' entry"),
        (lambda c: {**c, METADATA_KEY: "lora"}, ": the 'lightning_adapters' entry must be a dict"),
        (lambda c: {METADATA_KEY: c[METADATA_KEY]}, " has no 'state_dict' key"),
        (lambda c: {**c, METADATA_KEY: {**c[METADATA_KEY], "method": "nope"}}, ": "),
        (lambda c: {**c, METADATA_KEY: {**c[METADATA_KEY], "adapters": []}}, r": 'lightning_adapters'\['adapters'\]"),
        (
            lambda c: {
                **c,
                METADATA_KEY: {
                    **c[METADATA_KEY],
                    "adapters": {**c[METADATA_KEY]["adapters"], "a": {"method": "lora", "config": {"rank": 2}}},
                },
            },
            r": the lora config in the checkpoint has unknown fields \['rank'\]",
        ),
    ],
)
def test_a_file_that_is_not_an_adapter_checkpoint_is_refused_naming_it(tmp_path, edit, message) -> None:
    path = _edited(_save(tmp_path / "a.ckpt", _trained()), edit)
    fresh = Net()
    before = _snapshot(fresh)
    with pytest.raises(AdapterStateError, match="^" + re.escape(str(path)) + message):
        restore_from_checkpoint(fresh, path)
    assert find_records(fresh) == []
    _assert_state(fresh, before)


def test_a_head_of_another_shape_is_refused_naming_the_file(tmp_path) -> None:
    path = _save(tmp_path / "a.ckpt", _trained())
    fresh = Net(head_out=5)
    with pytest.raises(AdapterStateError, match="^" + re.escape(str(path)) + ": the tensors trained beside"):
        restore_from_checkpoint(fresh, path)
    assert find_records(fresh) == []


def test_a_lightning_module_without_the_adapted_sub_module_is_refused(tmp_path) -> None:
    from lightning.pytorch import LightningModule

    path = _save(tmp_path / "a.ckpt", _trained())
    with pytest.raises(AdapterStateError, match="^LightningModule has no sub-module 'backbone', where the adapter of"):
        restore_from_checkpoint(LightningModule(), path)


# ------------------------------------------------------------------------------------------------------------
# A call refused after injection leaves the model as it was


@pytest.mark.parametrize("bare", [False, True])
def test_a_refused_restore_puts_back_the_bias_it_had_loaded_and_removes_its_adapters(tmp_path, bare) -> None:
    # "a" trains backbone.0's bias and loads first; "b" holds a NaN and is refused after it.
    trained = _trained(bias="lora_only")
    with torch.no_grad():
        trained.backbone[2].adapter.b.lora_B[0, 0] = float("nan")
    path = _save(tmp_path / "a.ckpt", trained, config_a=la.LoRAConfig(**{**CA.to_dict(), "bias": "lora_only"}))
    assert "backbone.0.bias" in torch.load(path, weights_only=True)["state_dict"]
    model = _backbone() if bare else Net()
    before = _snapshot(model)
    with pytest.raises(AdapterStateError, match="non-finite"):
        restore_from_checkpoint(model, path, module="backbone" if bare else None)
    assert find_records(model) == []
    _assert_state(model, before)


def test_a_refused_restore_keeps_the_adapter_the_model_already_had(tmp_path) -> None:
    trained = _trained()
    with torch.no_grad():
        trained.backbone[2].adapter.b.lora_B[0, 0] = float("nan")
    path = _save(tmp_path / "a.ckpt", trained)
    model = Net()
    la.inject(model.backbone, la.LoRAConfig(r=4, target_modules=["2"], init_weights=False), name="x")
    before = _snapshot(model)
    with pytest.raises(AdapterStateError, match="non-finite") as caught:
        restore_from_checkpoint(model, path)
    assert caught.type is AdapterStateError
    assert la.adapter_names(model.backbone) == ["x"] and la.active(model.backbone) == ["x"]
    _assert_state(model, before)


def test_a_restore_refused_after_the_head_was_loaded_puts_the_head_back(tmp_path) -> None:
    # An edited file makes a plain LoRA and a DoRA act together on backbone.2: set_active refuses, after the
    # head (trained beside the backbone) was copied in.
    trained = _trained()
    dora = la.LoRAConfig(r=2, target_modules=["2"], init_weights=False, use_dora=True)
    la.inject(trained.backbone, dora, name="d")
    adapters = {"a": ("lora", CA), "b": ("lora", CB), "d": ("lora", dora)}
    fingerprint = base_fingerprint(trained.backbone)
    _write(tmp_path / "a.ckpt", _state(trained), adapters, "b", ["b", "d"], "backbone", fingerprint)
    fresh = Net()
    before = _snapshot(fresh)
    with pytest.raises(AdapterConfigError, match="cannot stack"):
        restore_from_checkpoint(fresh, tmp_path / "a.ckpt")
    assert find_records(fresh) == []
    _assert_state(fresh, before)


def test_a_refused_restore_of_a_residual_init_gives_the_base_back_once(tmp_path) -> None:
    # PiSSA makes each base W - s·B0·A0 when injected and adds s·B0·A0 back when ejected: the rollback must not
    # also copy the old base in first (that would leave W + s·B0·A0).
    config = la.LoRAConfig(r=2, target_modules=["0", "2"], init_weights="pissa")
    state = {k: v.detach().clone() for k, v in la.adapter_state_dict(la.inject(_backbone(), config)).items()}
    state["2.adapter.default.lora_B"][0, 0] = float("nan")
    meta = _write_one(tmp_path / "p.ckpt", "default", "lora", config, state, module="")
    for module, model in (("", _backbone()), (None, Net())):
        if module is None:
            torch.save(
                {
                    METADATA_KEY: {**meta, "module": "backbone"},
                    "state_dict": {f"backbone.{k}": v for k, v in state.items()},
                },
                tmp_path / "p.ckpt",
            )
        before = _snapshot(model)
        with pytest.raises(AdapterStateError, match="non-finite"):
            restore_from_checkpoint(model, tmp_path / "p.ckpt", module=module)
        assert find_records(model) == []
        after = model.state_dict()
        assert sorted(after) == sorted(before)
        for k, v in before.items():
            torch.testing.assert_close(after[k], v, msg=k)  # eject's add-back: equal up to rounding


# ------------------------------------------------------------------------------------------------------------
# EVA: the ranks training chose, read from the saved shapes


class _Eva(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Linear(16, 8), nn.Linear(12, 8), nn.Conv2d(3, 5, 1)


def _eva_checkpoint(path: Any, *, format_1: bool, ranks: dict[str, int], adjust: bool = True) -> dict[str, Any]:
    """An EVA checkpoint whose linears got ``ranks`` (0: no tensors) and whose conv (no EVA there) kept r=4."""
    config = la.LoRAConfig(
        r=4, alpha=8.0, target_modules=["a", "b", "c"], init_weights="eva", eva_adjust_scaling_factors=adjust
    )
    marker = ".adapter." if format_1 else ".adapter.default."
    g = torch.Generator().manual_seed(0)
    state = {}
    for name, (fan_in, fan_out) in {"a": (16, 8), "b": (12, 8)}.items():
        if ranks[name]:
            state[f"{name}{marker}lora_A"] = torch.randn(ranks[name], fan_in, generator=g)
            state[f"{name}{marker}lora_B"] = torch.randn(fan_out, ranks[name], generator=g)
    state[f"c{marker}lora_A"] = torch.randn(4, 3, 1, 1, generator=g)
    state[f"c{marker}lora_B"] = torch.randn(5, 4, 1, 1, generator=g)
    if format_1:
        meta = {"format": 1, "method": "lora", "config": config.to_dict(), "module": ""}
        torch.save({METADATA_KEY: meta, "state_dict": state}, path)
    else:
        _write_one(path, "default", "lora", config, state)
    return {k.replace(marker, ".adapter.default."): v for k, v in state.items()}


@pytest.mark.parametrize("format_1", [False, True])
@pytest.mark.parametrize("adjust", [True, False])
def test_an_eva_checkpoint_gives_each_layer_the_rank_and_alpha_eva_chose(tmp_path, format_1, adjust) -> None:
    state = _eva_checkpoint(tmp_path / "e.ckpt", format_1=format_1, ranks={"a": 3, "b": 0}, adjust=adjust)
    model = _restore_quietly(_Eva(), tmp_path / "e.ckpt", module="")
    layer = model.a.adapter.default
    alpha = 8.0 * 3 / 4 if adjust else 8.0
    assert (layer.r, layer.alpha, layer.needs_data) == (3, alpha, False)
    assert not hasattr(model.b, "adapter")  # rank 0: EVA removed the layer
    assert model.c.adapter.default.r == 4
    _assert_state_dict_equal(la.adapter_state_dict(model), state)
    ((_, _, rec),) = find_records(model)
    assert rec.resolved_peft_fields["rank_pattern"] == {"a": 3}
    assert rec.resolved_peft_fields["alpha_pattern"] == ({"a": alpha} if adjust else {})
    assert sorted(rec.resolved_peft_fields["target_modules"]) == ["a", "c"]
    x = torch.randn(2, 16)
    base = _Eva().a
    want = base(x) + (alpha / 3) * (x @ state["a.adapter.default.lora_A"].t()) @ state["a.adapter.default.lora_B"].t()
    torch.testing.assert_close(model.a(x), want)


def test_an_eva_checkpoint_with_every_layer_kept_gives_each_its_own_rank(tmp_path) -> None:
    state = _eva_checkpoint(tmp_path / "e.ckpt", format_1=False, ranks={"a": 3, "b": 2})
    model = _restore_quietly(_Eva(), tmp_path / "e.ckpt", module="")
    assert (model.a.adapter.default.r, model.b.adapter.default.r, model.c.adapter.default.r) == (3, 2, 4)
    _assert_state_dict_equal(la.adapter_state_dict(model), state)


def test_an_eva_checkpoint_restored_beside_a_pending_eva_adapter_leaves_that_one_pending(tmp_path) -> None:
    # "x" (EVA on b, waiting for data) is the model's own; only the file's "y" gets the ranks EVA chose.
    config = la.LoRAConfig(r=4, alpha=8.0, target_modules=["a"], init_weights="eva")
    g = torch.Generator().manual_seed(0)
    state = {
        "a.adapter.y.lora_A": torch.randn(3, 16, generator=g),
        "a.adapter.y.lora_B": torch.randn(8, 3, generator=g),
    }
    _write_one(tmp_path / "e.ckpt", "y", "lora", config, state, module="")
    model = la.inject(_Eva(), la.LoRAConfig(r=4, target_modules=["b"], init_weights="eva"), name="x")
    _restore_quietly(model, tmp_path / "e.ckpt", module="")
    assert (model.a.adapter.y.r, model.a.adapter.y.needs_data) == (3, False)
    assert (model.b.adapter.x.r, model.b.adapter.x.needs_data) == (4, True)
    records = {rec.name: rec for _, _, rec in find_records(model)}
    assert records["x"].targets == ["b"] and records["y"].targets == ["a"]
    assert "target_modules" not in records["y"].resolved_peft_fields  # no layer of "y" was dropped
    assert records["y"].resolved_peft_fields["rank_pattern"] == {"a": 3}


def test_an_eva_checkpoint_whose_lora_a_does_not_fit_is_refused_by_the_loader(tmp_path) -> None:
    _eva_checkpoint(tmp_path / "e.ckpt", format_1=False, ranks={"a": 3, "b": 2})
    checkpoint = torch.load(tmp_path / "e.ckpt", weights_only=True)
    checkpoint["state_dict"]["a.adapter.default.lora_A"] = torch.zeros(3, 15)  # in_features is 16
    checkpoint[METADATA_KEY]["adapter_shapes"]["a.adapter.default.lora_A"] = [3, 15]
    torch.save(checkpoint, tmp_path / "e.ckpt")
    model = _Eva()
    with pytest.raises(AdapterStateError) as caught:
        restore_from_checkpoint(model, tmp_path / "e.ckpt", module="")
    assert caught.type is AdapterStateError
    assert find_records(model) == []


def test_a_loha_checkpoint_restores_without_eva_s_attributes(tmp_path) -> None:
    # LoHa layers have no init_mode: the EVA step must pass over them.
    trained = la.inject(_backbone(), la.LoHaConfig(r=2, target_modules=["0", "2"], init_weights=False))
    state = {f"backbone.{k}": v.detach().clone() for k, v in la.adapter_state_dict(trained).items()}
    _write_one(
        tmp_path / "h.ckpt",
        "default",
        "loha",
        la.LoHaConfig(r=2, target_modules=["0", "2"], init_weights=False),
        state,
        module="backbone",
        fingerprint=base_fingerprint(trained),
    )
    bare = _restore_quietly(_backbone(), tmp_path / "h.ckpt")
    _assert_same_adapters(bare, trained)


# ------------------------------------------------------------------------------------------------------------
# The helpers, directly


def test_modules_of_lists_the_top_level_names_and_the_trained_module() -> None:
    state = {"backbone.0.adapter.a.lora_A": 0, "head.weight": 1, "scale": 2}
    assert _modules_of(state, {"module": "trunk"}) == ["backbone", "head", "trunk"]
    assert _modules_of(state, {"module": ""}) == ["backbone", "head"]
    assert _modules_of(state, {}) == ["backbone", "head"]
    assert _modules_of({}, {"module": "backbone.inner"}) == ["backbone.inner"]


def test_strategy_loads_state_only_under_the_sharding_strategies() -> None:
    from lightning.pytorch import LightningModule

    def under(strategy_name: str, subclass: bool = False) -> bool:
        cls = type(strategy_name, (), {})
        if subclass:
            cls = type("Mine", (cls,), {})
        lm = LightningModule()
        lm._trainer = SimpleNamespace(strategy=cls())
        return _strategy_loads_state(lm)

    assert _strategy_loads_state(nn.Linear(2, 2)) is False  # no _trainer at all
    assert _strategy_loads_state(LightningModule()) is False  # not attached
    for name in ("FSDPStrategy", "ModelParallelStrategy", "DeepSpeedStrategy"):
        assert under(name) is True and under(name, subclass=True) is True, name
    assert under("DDPStrategy") is False and under("SingleDeviceStrategy", subclass=True) is False


def test_needs_configure_model_only_when_a_saved_module_or_tensor_is_missing() -> None:
    net = Net()
    adapter = {"0.adapter.a.lora_A": 0, "2.adapter.b.lora_A": 0, "1.weight": 0}
    beside = {"head.weight": 0}
    assert _needs_configure_model(net, "backbone", adapter, beside) is False
    assert _needs_configure_model(net, "trunk", adapter, beside) is True  # no such sub-module
    assert _needs_configure_model(net, "backbone", {"5.adapter.a.lora_A": 0}, {}) is True  # no module "5"
    assert _needs_configure_model(net, "backbone", {"1.running": 0}, {}) is True  # no tensor "backbone.1.running"
    assert _needs_configure_model(net, "backbone", {}, {"tail.weight": 0}) is True
    # The whole LightningModule: keys relative to it.
    whole = {"backbone.0.adapter.a.lora_A": 0, "head.weight": 0}
    assert _needs_configure_model(net, "", whole, {}) is False
    assert _needs_configure_model(net, "", {"backbone.9.weight": 0}, {}) is True
    assert _needs_configure_model(Net(lazy=True), "backbone", adapter, beside) is True


def test_locate_splits_the_checkpoint_for_each_place_the_model_can_have() -> None:
    t = {
        k: torch.tensor(float(i))
        for i, k in enumerate(["m.bb.0.adapter.a.lora_A", "m.bb.1.weight", "m.head.weight", "x.w"])
    }

    def keys(split: tuple) -> tuple:
        sub, adapter, beside, derived = split
        for part in (adapter, beside):
            assert all(any(v is w for w in t.values()) for v in part.values())
        return sub, sorted(adapter), sorted(beside), derived

    # The LightningModule (role ""), the trained module itself, and a module holding it.
    assert keys(_locate(t, "", "m.bb", {}, "f")) == (
        "m.bb",
        ["0.adapter.a.lora_A", "1.weight"],
        ["m.head.weight", "x.w"],
        None,
    )
    assert keys(_locate(t, "m.bb", "m.bb", {}, "f")) == ("", ["0.adapter.a.lora_A", "1.weight"], [], None)
    assert keys(_locate(t, "m", "m.bb", {}, "f")) == ("bb", ["0.adapter.a.lora_A", "1.weight"], ["head.weight"], None)
    # A part of the adapted module: adapted exactly where the checkpoint adapted it.
    assert keys(_locate(t, "m.bb", "", {}, "f")) == ("", ["0.adapter.a.lora_A", "1.weight"], [], ["0"])
    assert keys(_locate(t, "m.bb", "m", {}, "f")) == ("", ["0.adapter.a.lora_A", "1.weight"], [], ["0"])
    assert _locate(t, "m", "m.bb", {}, "f")[1]["1.weight"] is t["m.bb.1.weight"]
    with pytest.raises(
        AdapterStateError, match=r"^f holds no adapter tensors under module='y'; .* \['m', 'top', 'x'\]"
    ):
        _locate(t, "y", "", {"module": "top"}, "f")
    for role in ("x", "mm", "m.b"):  # beside, or sharing only a prefix of the name
        with pytest.raises(AdapterStateError, match=f"^module='{role}' does not hold the adapter of f, which was"):
            _locate(t, role, "m.bb", {}, "f")
