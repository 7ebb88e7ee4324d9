"""Several named adapters under Lightning: train ``b`` on top of a loaded ``a``, checkpoints, kill and resume.

Truths: an uninterrupted run (resume must equal it bit for bit), the PEFT directory ``a`` was loaded from (it
must come out unchanged), a run of ``b`` alone on the plain base (``a`` loaded but not acting must not matter),
and a run of ``b`` on a base with ``a`` merged into its weights (``a`` acting is ``a`` added to the base).
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

import lightning_adapters as la
from tests.helpers import randomize_adapter
from tests.lightning.models import TinyLlamaLM, token_data, trainer

CFG_A = la.LoRAConfig(r=2, alpha=4.0, target_modules=["q_proj", "v_proj"])
# b shares q_proj with a (the two stack there) and adapts o_proj alone.
CFG_B = la.LoRAConfig(r=2, alpha=4.0, target_modules=["q_proj", "o_proj"])


@pytest.fixture(scope="module")
def peft_a(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """Adapter ``a`` in a PEFT directory, trained (randomized) on the base every ``TinyLlamaLM`` builds."""
    base = TinyLlamaLM().model
    la.inject(base, CFG_A)
    randomize_adapter(base, seed=7)
    path = tmp_path_factory.mktemp("a") / "peft"
    la.save_peft(base, path)
    return path, {k: v.clone() for k, v in la.adapter_state_dict(base, name="default").items()}


@pytest.fixture(scope="module")
def peft_b0(tmp_path_factory) -> Path:
    """A fresh init of ``b`` in a PEFT directory: runs compared with each other all start ``b`` from it."""
    base = TinyLlamaLM().model
    torch.manual_seed(3)
    la.inject(base, CFG_B)
    path = tmp_path_factory.mktemp("b0") / "peft"
    la.save_peft(base, path)
    return path


def named(model: torch.nn.Module, name: str) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in la.adapter_state_dict(model, name=name).items()}


def fit(module: L.LightningModule, callback: L.Callback, *, seed: int = 0, ckpt_path=None, extra=(), **kw):
    """Fit 3 epochs of 4 steps; ``b``'s init is drawn from ``seed``."""
    t = trainer(**{"max_epochs": 3, **kw, "callbacks": [callback, *extra]})
    torch.manual_seed(seed)
    t.fit(module, token_data(), ckpt_path=ckpt_path)
    return t


def callback_b(peft_dir: Path, **kw) -> la.AdapterCallback:
    return la.AdapterCallback(CFG_B, module="model", name="b", init_from={"a": peft_dir}, verbose=False, **kw)


class Kill(L.Callback):
    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == 2:
            raise RuntimeError("killed")


def test_train_b_on_loaded_a_kill_and_resume_equals_an_uninterrupted_run(peft_a, tmp_path) -> None:
    peft_dir, a_saved = peft_a
    full = TinyLlamaLM()
    fit(full, callback_b(peft_dir))
    assert la.adapter_names(full.model) == ["a", "b"]
    assert la.active(full.model) == ["a", "b"]

    ckpt = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, save_on_train_epoch_end=True)
    with pytest.raises(RuntimeError, match="killed"):
        fit(TinyLlamaLM(), callback_b(peft_dir), extra=[ckpt, Kill()])
    mid = tmp_path / "epoch=1-step=8.ckpt"
    saved = torch.load(mid, weights_only=True)
    meta = saved["lightning_adapters"]
    assert list(meta["adapters"]) == ["a", "b"] and meta["name"] == "b"
    assert meta["active"] == ["a", "b"] and meta["trainable"] == ["b"]
    assert {k.split(".adapter.")[1].split(".")[0] for k in saved["state_dict"]} == {"a", "b"}

    resumed = TinyLlamaLM()
    fit(resumed, callback_b(peft_dir), seed=1, ckpt_path=str(mid))  # another init of b: all from the checkpoint
    want, got = la.adapter_state_dict(full.model), la.adapter_state_dict(resumed.model)
    assert set(got) == set(want) and any(".adapter.a." in k for k in want) and any(".adapter.b." in k for k in want)
    for k, v in want.items():
        assert torch.equal(got[k], v), k
    for model in (full, resumed):  # a is exactly what was loaded, b trained
        assert all(torch.equal(v, a_saved[k]) for k, v in named(model.model, "a").items())
        assert la.active(model.model) == ["a", "b"]
        assert [n for n, p in model.model.named_parameters() if p.requires_grad] == [
            k for k in la.adapter_state_dict(model.model) if ".adapter.b." in k
        ]


def from_b0(init_from: dict, **kw) -> la.AdapterCallback:
    return la.AdapterCallback(CFG_B, module="model", name="b", init_from=init_from, verbose=False, **kw)


def test_loaded_adapter_that_does_not_act_changes_nothing(peft_a, peft_b0) -> None:
    """``active=["b"]``: b trains as on the plain base (same init, same steps)."""
    peft_dir, _ = peft_a
    with_a = TinyLlamaLM()
    fit(with_a, from_b0({"a": peft_dir, "b": peft_b0}, active=["b"]), max_epochs=1)
    alone = TinyLlamaLM()
    fit(alone, from_b0({"b": peft_b0}), max_epochs=1)
    got, want = named(with_a.model, "b"), named(alone.model, "b")
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=0, msg=k)
    assert not torch.equal(want["model.layers.0.self_attn.o_proj.adapter.lora_B"], torch.zeros_like(want[k]))


def test_loaded_adapter_that_acts_is_added_to_the_base(peft_a, peft_b0) -> None:
    """``a`` acting under ``b`` equals training ``b`` on a base with ``a`` merged into its weights."""
    peft_dir, _ = peft_a
    on_top = TinyLlamaLM()
    fit(on_top, from_b0({"a": peft_dir, "b": peft_b0}), max_epochs=1)
    merged = TinyLlamaLM()
    la.load_peft(merged.model, peft_dir)
    la.eject(merged.model, merge=True)
    fit(merged, from_b0({"b": peft_b0}), max_epochs=1)
    got, want = named(on_top.model, "b"), named(merged.model, "b")
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-4, msg=k)


def test_checkpoint_sources_resume_a_subset_and_restore_roles(peft_a, tmp_path) -> None:
    """``a`` from one of our checkpoints; checkpoints holding only ``b``; ``restore_from_checkpoint`` of both."""
    peft_dir, a_saved = peft_a
    # A run that trains "a" itself (started from the PEFT directory) writes a checkpoint holding it.
    first = TinyLlamaLM()
    fit(first, la.AdapterCallback(None, module="model", name="a", init_from=peft_dir, verbose=False), max_epochs=1)
    a_trained = named(first.model, "a")
    assert any(not torch.equal(v, a_saved[k]) for k, v in a_trained.items())  # it trained from the loaded values
    a_ckpt = tmp_path / "a.ckpt"
    first.trainer.save_checkpoint(a_ckpt)

    ckpt = ModelCheckpoint(dirpath=tmp_path / "b", save_last=True)
    model = TinyLlamaLM()
    cb = la.AdapterCallback(CFG_B, module="model", name="b", init_from={"a": a_ckpt}, save=["b"], verbose=False)
    fit(model, cb, extra=[ckpt], max_epochs=1)
    assert all(torch.equal(v, a_trained[k]) for k, v in named(model.model, "a").items())
    last = torch.load(tmp_path / "b" / "last.ckpt", weights_only=True)
    assert list(last["lightning_adapters"]["adapters"]) == ["b"]
    assert all(".adapter.b." in k for k in last["state_dict"])

    # Resuming from the b-only checkpoint takes a from init_from again.
    resumed = TinyLlamaLM()
    cb = la.AdapterCallback(CFG_B, module="model", name="b", init_from={"a": a_ckpt}, save=["b"], verbose=False)
    fit(resumed, cb, ckpt_path=str(tmp_path / "b" / "last.ckpt"), max_epochs=2)
    assert la.active(resumed.model) == ["a", "b"]

    # The checkpoint of both adapters restores both, with which act and which train.
    both = tmp_path / "both.ckpt"
    full = TinyLlamaLM()
    fit(
        full,
        la.AdapterCallback(CFG_B, module="model", name="b", init_from={"a": a_ckpt}, active="b", verbose=False),
        max_epochs=1,
    )
    full.trainer.save_checkpoint(both)
    restored = la.restore_from_checkpoint(TinyLlamaLM(), both)
    assert la.adapter_names(restored.model) == ["a", "b"]
    assert la.active(restored.model) == ["b"]
    for k, v in la.adapter_state_dict(full.model).items():
        assert torch.equal(la.adapter_state_dict(restored.model)[k], v), k


def test_the_mixin_takes_the_same_options(peft_a) -> None:
    peft_dir, a_saved = peft_a

    class Module(la.AdapterMixin, TinyLlamaLM):
        def __init__(self) -> None:
            super().__init__()
            self.adapter_config = CFG_B
            self.adapter_module = "model"
            self.adapter_name = "b"
            self.adapter_init_from = {"a": str(peft_dir)}

    mixin = Module()
    t = trainer(max_epochs=1)
    torch.manual_seed(0)
    t.fit(mixin, token_data())
    plain = TinyLlamaLM()
    fit(plain, callback_b(peft_dir), max_epochs=1)
    assert la.adapter_names(mixin.model) == ["a", "b"]
    for k, v in la.adapter_state_dict(plain.model).items():
        assert torch.equal(la.adapter_state_dict(mixin.model)[k], v), k
    assert all(torch.equal(v, a_saved[k]) for k, v in named(mixin.model, "a").items())


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        (dict(init_from={"a": "/nonexistent/peft"}), ["init_from['a']", "/nonexistent/peft", "PEFT directory"]),
        (dict(init_from=3), ["init_from", "path"]),
        (dict(name="a b"), ["'a b'", "letters"]),
        (dict(active=[1]), ["active", "[1]"]),
    ],
)
def test_bad_options_are_refused_when_the_callback_is_built(kwargs, words) -> None:
    with pytest.raises(la.AdapterConfigError) as err:
        la.AdapterCallback(CFG_B, module="model", **kwargs)
    for w in words:
        assert w in str(err.value)


def test_an_unknown_active_name_is_refused_before_training(peft_a) -> None:
    peft_dir, _ = peft_a
    module = TinyLlamaLM()
    before = copy.deepcopy(module.model.state_dict())
    with pytest.raises(la.AdapterConfigError, match=r"unknown adapter name 'c'.*\['a', 'b'\]"):
        fit(module, callback_b(peft_dir, active=["a", "c"]), max_epochs=1)
    assert all(torch.equal(v, module.model.state_dict()[k]) for k, v in before.items() if ".adapter." not in k)


def test_adalora_b_on_adalora_a_reallocates_b_only(tmp_path) -> None:
    """The rank schedule of the trained AdaLoRA adapter never touches the ranks of a loaded AdaLoRA adapter."""
    from lightning_adapters.methods.adalora import rank_pattern

    config = la.AdaLoRAConfig(init_r=4, target_r=2, tinit=1, tfinal=2, deltaT=1, target_modules=["q_proj", "v_proj"])
    base = TinyLlamaLM().model
    la.inject(base, dataclasses.replace(config, target_modules=["q_proj", "k_proj"]))  # a alone on k_proj
    randomize_adapter(base, seed=5)
    la.save_peft(base, tmp_path / "a")
    a_saved = named(base, "default")

    module = TinyLlamaLM()
    fit(module, la.AdapterCallback(config, module="model", name="b", init_from={"a": tmp_path / "a"}, verbose=False))
    assert all(all(flags) for flags in rank_pattern(module.model, "a").values())
    assert all(torch.equal(v, a_saved[k]) for k, v in named(module.model, "a").items())
    kept = rank_pattern(module.model, "b")
    assert sum(sum(flags) for flags in kept.values()) == 2 * len(kept)  # b reached its target budget


@pytest.mark.parametrize(
    ("save", "words"), [(["b", "c"], ["unknown adapter name 'c'", "['a', 'b']"]), (["a"], ["save=['a']", "'b'"])]
)
def test_checkpoints_that_could_not_resume_are_refused_before_training(peft_a, save, words) -> None:
    peft_dir, _ = peft_a
    with pytest.raises(la.AdapterConfigError) as err:
        fit(TinyLlamaLM(), callback_b(peft_dir, save=save), max_epochs=1)
    for w in words:
        assert w in str(err.value)
