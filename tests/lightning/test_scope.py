"""What is trained and saved around the adapted sub-module, and ``restore_from_checkpoint`` on every model shape.

Issue 14 (bug 2): a task head beside ``AdapterCallback(module="encoder")`` trained but was in no checkpoint, so
resuming gave a random head and ``restore_from_checkpoint`` predicted garbage; ``modules_to_save=["head"]`` was
refused; with ``module=None`` a head was frozen at its random init without a word. Bug 5: ``restore_from_checkpoint``
on a module that builds its model in ``configure_model``. Issue 15: a refused restore ejected the user's adapter.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

import lightning_adapters as la
from lightning_adapters.core.inject import find_records
from lightning_adapters.errors import AdapterStateError
from tests.lightning.models import BoringMLP, TinyLlamaLM, mlp_data, token_data, trainer

ENCODER_TARGETS = ["0", "2", "4"]  # relative to self.encoder


def lora(**kw) -> la.LoRAConfig:
    kw.setdefault("r", 4)
    kw.setdefault("alpha", 8.0)
    kw.setdefault("target_modules", ENCODER_TARGETS)
    return la.LoRAConfig(**kw)


class MixinMLP(la.AdapterMixin, BoringMLP):
    """``BoringMLP`` adapted through the mixin, on ``self.encoder``; the head beside it trains in full."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__(seed=seed)
        self.adapter_config = lora()
        self.adapter_module = "encoder"


def make(route: str, seed: int = 0) -> BoringMLP:
    return MixinMLP(seed=seed) if route == "mixin" else BoringMLP(seed=seed)


def callbacks(route: str, *extra, config=None) -> list:
    own = [] if route == "mixin" else [la.AdapterCallback(config or lora(), module="encoder", verbose=False)]
    return [*own, *extra]


def predictions(model) -> torch.Tensor:
    x = mlp_data().dataset.tensors[0][:16]
    model.eval()
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("route", ["callback", "mixin"])
def test_head_beside_the_adapted_module_is_checkpointed_resumed_and_restored(route, tmp_path):
    # Straight: 2 epochs. Split: 1 epoch, then resume from last.ckpt for the second.
    straight = make(route)
    trainer(max_epochs=2, callbacks=callbacks(route)).fit(straight, mlp_data())
    first = make(route)
    head_at_init = first.head.weight.detach().clone()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(max_epochs=1, callbacks=callbacks(route, ckpt)).fit(first, mlp_data())
    assert not torch.equal(first.head.weight, head_at_init)  # the head trains

    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert {"head.weight", "head.bias"} <= set(saved["state_dict"])
    assert not any(
        k.startswith("encoder.") and ".adapter.default." not in k for k in saved["state_dict"]
    )  # base left out
    assert torch.equal(saved["state_dict"]["head.weight"], first.head.weight.detach())

    resumed = make(route)
    trainer(max_epochs=2, callbacks=callbacks(route)).fit(resumed, mlp_data(), ckpt_path=tmp_path / "last.ckpt")
    torch.testing.assert_close(resumed.head.weight, straight.head.weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(predictions(resumed), predictions(straight), atol=1e-5, rtol=0)

    restored = la.restore_from_checkpoint(make(route), tmp_path / "last.ckpt")
    torch.testing.assert_close(predictions(restored), predictions(first), atol=0, rtol=0)


def test_modules_to_save_may_name_a_module_beside_the_adapted_one(tmp_path):
    model = BoringMLP()
    model.head.requires_grad_(False)  # frozen by the user: modules_to_save makes it train
    head = model.head.weight.detach().clone()
    cb = la.AdapterCallback(lora(modules_to_save=["head"]), module="encoder", verbose=False)
    t = trainer(callbacks=[cb])
    t.fit(model, mlp_data())
    assert model.head.weight.requires_grad and not torch.equal(model.head.weight, head)
    assert la.config_of(model.encoder).modules_to_save is None  # the injected config names only what is inside
    t.save_checkpoint(tmp_path / "c.ckpt")
    saved = torch.load(tmp_path / "c.ckpt", weights_only=True)
    assert saved["lightning_adapters"]["config"]["modules_to_save"] == ["head"]
    assert {"head.weight", "head.bias"} <= set(saved["state_dict"])
    fresh = BoringMLP()
    fresh.head.requires_grad_(False)
    restored = la.restore_from_checkpoint(fresh, tmp_path / "c.ckpt")
    torch.testing.assert_close(predictions(restored), predictions(model), atol=0, rtol=0)


def test_bare_model_restore_warns_about_the_head_it_cannot_hold(tmp_path):
    model = BoringMLP()
    t = trainer(callbacks=[la.AdapterCallback(lora(), module="encoder", verbose=False)])
    t.fit(model, mlp_data())
    t.save_checkpoint(tmp_path / "c.ckpt")
    encoder = BoringMLP().encoder
    with pytest.warns(UserWarning, match=r"trained outside module='encoder'.*head.bias.*head.weight"):
        la.restore_from_checkpoint(encoder, tmp_path / "c.ckpt")
    x = mlp_data().dataset.tensors[0][:4]
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(encoder(x), model.encoder(x), atol=0, rtol=0)


def _fit_warnings(model, config) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(max_steps=1, callbacks=[la.AdapterCallback(config, verbose=False)]).fit(model, mlp_data())
    return [str(w.message) for w in caught if "lightning_adapters:" in str(w.message)]


def test_a_head_frozen_or_low_ranked_by_whole_module_injection_is_warned_about():
    frozen = _fit_warnings(BoringMLP(), lora(target_modules=["encoder.0", "encoder.2", "encoder.4"]))
    assert len(frozen) == 1
    assert "'head' (Linear, 1,028 parameters) was trainable before injection and is now frozen" in frozen[0]
    assert "modules_to_save=['head']" in frozen[0] and "module='<backbone attribute>'" in frozen[0]

    low_rank = _fit_warnings(BoringMLP(), lora(target_modules="all-linear"))
    assert len(low_rank) == 1 and "'head' (Linear, 1,028 parameters) got a LoRAConfig adapter from" in low_rank[0]

    # The fixes the message names silence it; so does freezing the module on purpose.
    assert not _fit_warnings(BoringMLP(), lora(target_modules="all-linear", modules_to_save=["head"]))
    assert not _fit_warnings(BoringMLP(), lora(target_modules=["encoder.0"], modules_to_save=["head"]))
    deliberate = BoringMLP()
    deliberate.head.requires_grad_(False)
    assert not _fit_warnings(deliberate, lora(target_modules=["encoder.0"]))


def test_the_frozen_head_warning_only_suggests_fixes_the_method_accepts():
    from lightning_adapters.lightning.scope import frozen_parts_message

    model = BoringMLP()
    lora_message = frozen_parts_message(model, ["head"], [], lora())
    assert "modules_to_save=['head']" in lora_message and "module='<backbone attribute>'" in lora_message
    # Llama-Adapter's PEFT format has no modules_to_save: only the sub-module route is offered.
    llama_message = frozen_parts_message(model, ["head"], [], la.LlamaAdapterConfig())
    assert "modules_to_save=" not in llama_message and "module='<backbone attribute>'" in llama_message


class LazyMixinLM(la.AdapterMixin, TinyLlamaLM):
    """The README's mixin pattern: the model is built in ``configure_model``."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__(build_in_configure_model=True, seed=seed)
        self.adapter_config = la.LoRAConfig(r=2, target_modules=["q_proj", "v_proj"])
        self.adapter_module = "model"


def test_restore_calls_configure_model_as_the_trainer_would(tmp_path):
    model = LazyMixinLM()
    t = trainer(max_steps=2)
    t.fit(model, token_data())
    t.save_checkpoint(tmp_path / "c.ckpt")
    restored = la.restore_from_checkpoint(LazyMixinLM(), tmp_path / "c.ckpt")
    ids = token_data().dataset.tensors[0][:2]
    model.eval()
    restored.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            restored.model(input_ids=ids).logits, model.model(input_ids=ids).logits, atol=0, rtol=0
        )


def _trained_checkpoint(tmp_path: Path, seed: int = 0) -> Path:
    model = TinyLlamaLM(seed=seed)
    cb = la.AdapterCallback(la.LoRAConfig(r=2, target_modules=["q_proj"]), module="model", verbose=False)
    t = trainer(max_steps=2, callbacks=[cb])
    t.fit(model, token_data())
    path = tmp_path / f"seed{seed}.ckpt"
    t.save_checkpoint(path)
    return path


def test_a_refused_restore_keeps_the_adapter_the_model_had(tmp_path):
    own = _trained_checkpoint(tmp_path, seed=1)
    other = _trained_checkpoint(tmp_path, seed=0)
    model = la.restore_from_checkpoint(TinyLlamaLM(seed=1), own)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(AdapterStateError, match="different base model"):
        la.restore_from_checkpoint(model, other)
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], v) for k, v in before.items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    # Refused after injection on a model without an adapter: back to the plain model.
    plain = TinyLlamaLM(seed=1)
    plain_before = {k: v.clone() for k, v in plain.state_dict().items()}
    with pytest.raises(AdapterStateError, match="different base model"):
        la.restore_from_checkpoint(plain, other)
    assert set(plain.state_dict()) == set(plain_before) and not find_records(plain)


def test_restore_onto_a_part_of_the_adapted_module_then_export_it(tmp_path):
    # Adapter injected into the whole LightningModule (module=None), head in modules_to_save, as the app does.
    model = TinyLlamaLM()
    cb = la.AdapterCallback(la.LoRAConfig(r=2, target_modules="all-linear", modules_to_save=["lm_head"]), verbose=False)
    t = trainer(max_steps=2, callbacks=[cb])
    t.fit(model, token_data())
    t.save_checkpoint(tmp_path / "c.ckpt")
    ids = token_data().dataset.tensors[0][:2]
    model.eval()
    with torch.no_grad():
        expected = model.model.model(input_ids=ids).last_hidden_state

    bare = TinyLlamaLM().model.model  # the decoder body without the LM head
    la.restore_from_checkpoint(bare, tmp_path / "c.ckpt", module="model.model")
    with torch.no_grad():
        torch.testing.assert_close(bare(input_ids=ids).last_hidden_state, expected, atol=0, rtol=0)
    la.save_peft(bare, tmp_path / "peft")
    again = la.load_peft(TinyLlamaLM().model.model, tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).last_hidden_state, expected, atol=1e-6, rtol=0)


def test_export_of_a_sub_module_says_where_the_head_is_and_loads_onto_the_bare_sub_module(tmp_path):
    model = BoringMLP()
    cb = la.AdapterCallback(lora(), module="encoder", export_peft_dir=tmp_path / "peft", verbose=False)
    with pytest.warns(UserWarning, match=r"the exports hold 'encoder' only; \['head.bias', 'head.weight'\]"):
        trainer(callbacks=[cb]).fit(model, mlp_data())
    encoder = la.load_peft(BoringMLP().encoder, tmp_path / "peft")
    x = mlp_data().dataset.tensors[0][:4]
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(encoder(x), model.encoder(x), atol=1e-6, rtol=0)


def test_mixin_takes_its_config_as_a_mapping(tmp_path):
    class Model(la.AdapterMixin, BoringMLP):
        def __init__(self):
            super().__init__()
            self.adapter_config = {"method": "loha", "r": 2, "target_modules": ENCODER_TARGETS}
            self.adapter_module = "encoder"

    model = Model()
    trainer(max_steps=2).fit(model, mlp_data())
    config = la.config_of(model.encoder)
    assert isinstance(config, la.LoHaConfig) and config.r == 2
    assert {k.split(".adapter.default.")[0] for k in la.adapter_state_dict(model.encoder)} == set(ENCODER_TARGETS)
    assert model.head.weight.requires_grad  # beside the adapted module: trains in full


class HeadInConfigureModel(BoringMLP):
    """The encoder built in ``__init__``, the task head only in ``configure_model`` (as Lightning allows)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__(seed=seed)
        del self.head

    def configure_model(self) -> None:
        if not hasattr(self, "head"):
            torch.manual_seed(1)
            self.head = torch.nn.Linear(256, 4)


@pytest.mark.parametrize("module", ["encoder", None])
def test_restore_builds_a_head_that_only_configure_model_creates(module, tmp_path):
    # module=None: the head is in modules_to_save, its tensors are saved with the adapter's.
    config = lora() if module else lora(target_modules=["encoder.0", "encoder.2"], modules_to_save=["head"])
    model = HeadInConfigureModel()
    t = trainer(max_steps=2, callbacks=[la.AdapterCallback(config, module=module, verbose=False)])
    t.fit(model, mlp_data())
    t.save_checkpoint(tmp_path / "c.ckpt")
    assert {"head.weight", "head.bias"} <= set(torch.load(tmp_path / "c.ckpt", weights_only=True)["state_dict"])
    restored = la.restore_from_checkpoint(HeadInConfigureModel(), tmp_path / "c.ckpt")
    torch.testing.assert_close(predictions(restored), predictions(model), atol=0, rtol=0)


@pytest.mark.parametrize("modules_to_save", [["head"], None])
def test_an_export_of_the_whole_module_loaded_onto_its_sub_module_names_the_sub_module(modules_to_save, tmp_path):
    # The app's case: adapter injected into the whole LightningModule, exported, then loaded onto the bare encoder.
    # Before: 'modules_to_save entries ['head'] match no module', or missing/unexpected keys "check the architecture".
    config = lora(target_modules=["encoder.0", "encoder.2"], modules_to_save=modules_to_save)
    cb = la.AdapterCallback(config, export_peft_dir=tmp_path / "peft", verbose=False)
    trainer(max_steps=1, callbacks=[cb]).fit(BoringMLP(), mlp_data())
    encoder = BoringMLP().encoder
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    with pytest.raises(AdapterStateError, match=r"sub-module 'encoder'.*module='encoder'"):
        la.load_peft(encoder, tmp_path / "peft")
    assert not find_records(encoder)
    assert all(torch.equal(encoder.state_dict()[k], v) for k, v in before.items())


def test_a_misspelt_module_name_lists_the_sub_modules_there_are():
    cb = la.AdapterCallback(lora(), module="encodr", verbose=False)
    with pytest.raises(la.AdapterConfigError, match=r"module='encodr'.*sub-modules: \['encoder', 'head'\]"):
        trainer(max_steps=1, callbacks=[cb]).fit(BoringMLP(), mlp_data())


def test_a_checkpoint_written_before_a_config_field_existed_restores_and_resumes(tmp_path):
    # Fields added to LoRAConfig later (here lora_bias, bias) are absent from older checkpoints, which ran with
    # their defaults; such a checkpoint was refused as "a different lora config (lora_bias: checkpoint None ...)".
    model = BoringMLP()
    t = trainer(max_steps=2, callbacks=[la.AdapterCallback(lora(), module="encoder", verbose=False)])
    t.fit(model, mlp_data())
    t.save_checkpoint(tmp_path / "new.ckpt")
    old = torch.load(tmp_path / "new.ckpt", weights_only=True)
    for field in ("lora_bias", "bias"):
        del old["lightning_adapters"]["config"][field]
    torch.save(old, tmp_path / "old.ckpt")

    restored = la.restore_from_checkpoint(BoringMLP(), tmp_path / "old.ckpt")
    torch.testing.assert_close(predictions(restored), predictions(model), atol=0, rtol=0)
    trainer(max_steps=3, callbacks=[la.AdapterCallback(lora(), module="encoder", verbose=False)]).fit(
        BoringMLP(), mlp_data(), ckpt_path=tmp_path / "old.ckpt"
    )
    # A value other than the default is still a different config.
    changed = la.AdapterCallback(lora(lora_bias=True), module="encoder", verbose=False)
    with pytest.raises(AdapterStateError, match=r"lora_bias: checkpoint False, now True"):
        trainer(max_steps=3, callbacks=[changed]).fit(BoringMLP(), mlp_data(), ckpt_path=tmp_path / "old.ckpt")


def test_entries_beside_the_module_match_as_string_suffixes_like_inside() -> None:
    """``split_modules_to_save`` applies PEFT's rule for this field on both sides of ``module=``: an entry selects
    every name it ends (``"c2"`` selects ``fc2`` inside, ``"_c2"`` the ``head_c2`` beside), exactly those."""
    from torch import nn

    from lightning_adapters.lightning.scope import split_modules_to_save

    root = nn.Module()
    root.model = nn.ModuleDict({"fc": nn.Linear(2, 2), "fc2": nn.Linear(2, 2)})
    root.head_c2 = nn.Linear(2, 2)
    root.c3 = nn.Linear(2, 2)
    config = la.LoRAConfig(target_modules=["fc"], modules_to_save=["c2"])
    inner, outer = split_modules_to_save(root, "model", config)
    assert inner.modules_to_save == ["c2"] and outer == []  # matched inside (fc2) first, as before
    inner, outer = split_modules_to_save(root, "model", la.LoRAConfig(target_modules=["fc"], modules_to_save=["_c2"]))
    assert inner.modules_to_save is None and outer == ["head_c2"]
