"""AdapterCallback / AdapterMixin on one process: training, adapter-only checkpoints, resume checks, hooks, export."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint

import lightning_adapters as la
from lightning_adapters.errors import AdapterConfigError, AdapterStateError
from tests.lightning.models import BoringMLP, TinyLlamaLM, mlp_data, token_data, trainer

TARGETS = ["encoder.0", "encoder.2", "encoder.4"]


def lora(**kw) -> la.LoRAConfig:
    kw.setdefault("r", 4)
    kw.setdefault("alpha", 8.0)
    kw.setdefault("target_modules", TARGETS)
    return la.LoRAConfig(**kw)


def tensor_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def assert_size(path: Path, expected: int) -> None:
    size = os.path.getsize(path)
    assert abs(size - expected) <= 0.1 * expected + 64 * 1024, (path.name, size, expected)


def test_callback_trains_only_adapters_of_an_unaware_module():
    model = BoringMLP()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer(max_epochs=1, callbacks=[la.AdapterCallback(lora(), verbose=False)]).fit(model, mlp_data())
    after = model.state_dict()
    adapter = la.adapter_state_dict(model)
    assert set(after) - set(before) == set(adapter) and len(adapter) == 6
    for k, v in before.items():
        assert torch.equal(after[k], v), k  # every base tensor, head included, is bit-identical
    assert all(adapter[k].abs().sum() > 0 for k in adapter if k.endswith("lora_B"))


def test_modules_to_save_train_and_are_checkpointed(tmp_path):
    model = BoringMLP()
    head = model.head.weight.clone()
    cb = la.AdapterCallback(lora(modules_to_save=["head"]), verbose=False)
    t = trainer(callbacks=[cb])
    t.fit(model, mlp_data())
    assert not torch.equal(model.head.weight, head)
    t.save_checkpoint(tmp_path / "c.ckpt")
    sd = torch.load(tmp_path / "c.ckpt", weights_only=False)["state_dict"]
    assert {"head.weight", "head.bias"} <= set(sd) and "encoder.0.weight" not in sd


def test_every_checkpoint_file_is_adapter_only_and_sized(tmp_path):
    model = BoringMLP()
    topk = ModelCheckpoint(
        dirpath=tmp_path / "topk", save_top_k=2, save_last=True, every_n_train_steps=2, monitor="train_loss"
    )
    weights = ModelCheckpoint(
        dirpath=tmp_path / "weights", save_weights_only=True, every_n_train_steps=4, save_top_k=-1
    )
    t = trainer(max_epochs=2, callbacks=[la.AdapterCallback(lora(), verbose=False), topk, weights])
    t.fit(model, mlp_data())
    t.save_checkpoint(tmp_path / "manual.ckpt")
    t.save_checkpoint(tmp_path / "manual_weights.ckpt", weights_only=True)

    adapter = la.adapter_state_dict(model)
    adapter_bytes = tensor_bytes(adapter)
    optim_bytes = tensor_bytes(t.optimizers[0].state_dict()["state"])
    base_bytes = tensor_bytes(model.state_dict()) - adapter_bytes
    assert base_bytes > 10 * (adapter_bytes + optim_bytes)  # a leaked base tensor would show in the sizes
    full = sorted((tmp_path / "topk").glob("*.ckpt")) + [tmp_path / "manual.ckpt"]
    weights_only = sorted((tmp_path / "weights").glob("*.ckpt")) + [tmp_path / "manual_weights.ckpt"]
    assert len(full) == 4 and len(weights_only) == 5  # top-2 + last + manual; 4 step saves + manual
    for path in full + weights_only:
        ckpt = torch.load(path, weights_only=True)
        assert set(ckpt["state_dict"]) == set(adapter), path.name
        meta = ckpt["lightning_adapters"]
        assert meta["method"] == "lora" and meta["config"]["r"] == 4
        assert meta["base_fingerprint"] == la.base_fingerprint(model)
        assert meta["library_version"] == la.__version__
    for path in full:
        assert_size(path, adapter_bytes + optim_bytes)
    for path in weights_only:
        assert "optimizer_states" not in torch.load(path, weights_only=True)
        assert_size(path, adapter_bytes)


def test_mixin_route_checkpoints_are_adapter_only(tmp_path):
    class Model(la.AdapterMixin, BoringMLP):
        def __init__(self):
            super().__init__()
            self.adapter_config = lora()

        def configure_optimizers(self):
            return torch.optim.AdamW(self.trainable_parameters(), lr=0.02)

    model = Model()
    weights = ModelCheckpoint(dirpath=tmp_path, save_weights_only=True, every_n_train_steps=4, save_top_k=-1)
    t = trainer(callbacks=[weights], enable_model_summary=False)
    t.fit(model, mlp_data())
    t.save_checkpoint(tmp_path / "manual.ckpt")
    adapter = la.adapter_state_dict(model)
    files = list(tmp_path.glob("*.ckpt"))
    assert len(files) == 3
    for path in files:
        assert set(torch.load(path, weights_only=True)["state_dict"]) == set(adapter)

    restored = Model.load_from_checkpoint(tmp_path / "manual.ckpt")
    for k, v in la.adapter_state_dict(restored).items():
        assert torch.equal(v, adapter[k])

    x = mlp_data().dataset.tensors[0][:4]
    with torch.no_grad():
        adapted = model(x)
        with model.disabled():
            torch.testing.assert_close(model(x), BoringMLP()(x), atol=0, rtol=0)  # the untouched base
        model.merge_adapters()
        torch.testing.assert_close(model(x), adapted, atol=1e-5, rtol=0)
        model.unmerge_adapters()
        torch.testing.assert_close(model(x), adapted, atol=1e-6, rtol=0)


def fit_with_last(tmp_path: Path, model, epochs: int, ckpt_path=None, config=None):
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    t = trainer(
        max_epochs=epochs,
        enable_checkpointing=True,
        callbacks=[la.AdapterCallback(config or lora(), verbose=False), ckpt],
    )
    t.fit(model, mlp_data(), ckpt_path=ckpt_path)
    return t


def test_resume_in_process_is_exact(tmp_path):
    straight = BoringMLP()
    t_straight = fit_with_last(tmp_path / "a", straight, 2)
    first = BoringMLP()
    fit_with_last(tmp_path / "b", first, 1)
    resumed = BoringMLP()
    t_resumed = fit_with_last(tmp_path / "c", resumed, 2, ckpt_path=tmp_path / "b" / "last.ckpt")
    a, b = la.adapter_state_dict(straight), la.adapter_state_dict(resumed)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0)
    assert t_resumed.global_step == t_straight.global_step == 16
    steps = [s["step"] for s in t_resumed.optimizers[0].state.values()]
    assert steps and all(int(s) == 16 for s in steps)


def test_resume_refuses_other_config_and_other_base(tmp_path):
    fit_with_last(tmp_path, BoringMLP(), 1)
    last = tmp_path / "last.ckpt"
    with pytest.raises(AdapterStateError, match=r"different lora config \(r: checkpoint 4, now 8"):
        fit_with_last(tmp_path / "x", BoringMLP(), 2, ckpt_path=last, config=lora(r=8))
    with pytest.raises(AdapterStateError, match="different base model"):
        fit_with_last(tmp_path / "y", BoringMLP(seed=1), 2, ckpt_path=last)


def test_optimizer_without_adapters_is_reported():
    class Early(BoringMLP):
        def __init__(self):
            super().__init__()
            self.frozen_list = list(self.parameters())  # captured before injection

        def configure_optimizers(self):
            return torch.optim.SGD(self.frozen_list, lr=0.1)

    with pytest.raises(AdapterConfigError, match=r"6 adapter parameters are in no optimizer.*requires_grad"):
        trainer(callbacks=[la.AdapterCallback(lora(), verbose=False)]).fit(Early(), mlp_data())


def test_target_built_in_configure_model(tmp_path):
    model = TinyLlamaLM(build_in_configure_model=True)
    cb = la.AdapterCallback(la.LoRAConfig(r=2, target_modules=["q_proj", "v_proj"]), module="model", verbose=False)
    t = trainer(callbacks=[cb])
    t.fit(model, token_data())
    assert len(la.adapter_state_dict(model.model)) == 8
    t.save_checkpoint(tmp_path / "c.ckpt")
    meta = torch.load(tmp_path / "c.ckpt", weights_only=True)["lightning_adapters"]
    assert meta["module"] == "model" and all(k.startswith("model.") for k in meta["adapter_shapes"])

    # The bare model restores from it, and answers as the trained one does.
    base = TinyLlamaLM().model
    la.restore_from_checkpoint(base, tmp_path / "c.ckpt")
    ids = token_data().dataset.tensors[0][:2]
    model.model.eval()
    torch.testing.assert_close(base(input_ids=ids).logits, model.model(input_ids=ids).logits, atol=1e-6, rtol=0)
    with pytest.raises(AdapterStateError, match="different base model"):
        la.restore_from_checkpoint(TinyLlamaLM(seed=3).model, tmp_path / "c.ckpt")


def test_mixin_injects_after_configure_model_once():
    calls = []

    class Model(la.AdapterMixin, TinyLlamaLM):
        def __init__(self):
            super().__init__(build_in_configure_model=True)
            self.adapter_config = la.LoRAConfig(r=2, target_modules=["q_proj"])
            self.adapter_module = "model"

        def configure_model(self):
            calls.append(self.model is None)
            super().configure_model()

    model = Model()
    t = trainer(max_steps=2)
    t.fit(model, token_data())
    assert calls == [True]
    assert len(la.adapter_state_dict(model.model)) == 4
    assert model.inject_adapters() is model.model  # idempotent
    assert len(model.trainable_parameters()) == 4


# ------------------------------------------------------------------------------------------------------------
# Method training schedules (a fake schedule stands in for AdaLoRA's)


class FakeSchedule:
    """A ``TrainingSchedule`` recording how the integration drives it."""

    instances: list[FakeSchedule] = []
    length_unit = "optimizer_steps"

    def __init__(self, model, config, name):
        self.model = model
        self.events: list = []
        self.steps = 0
        FakeSchedule.instances.append(self)

    def start(self, length):
        self.events.append(("start", length))

    def loss_term(self):
        return torch.tensor(1.5)

    def after_optimizer_step(self, step, global_step=None):
        grads = [p.grad for n, p in self.model.named_parameters() if "adapter" in n]
        self.events.append(("step", step, all(g is not None for g in grads)))
        self.steps += 1
        return {"fake/steps": float(self.steps)}

    def after_epoch(self, epoch, global_step=None):
        self.events.append(("epoch_end", epoch, global_step))

    def report(self):
        return None

    def state_dict(self):
        return {"steps": self.steps}

    def load_state_dict(self, state):
        self.events.append(("load", state["steps"]))
        self.steps = state["steps"]


class LossRecorder(Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


class RawLoss(BoringMLP):
    """Records the loss it computes before the integration sees it."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.raw = []

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.raw.append(float(loss))
        return {"loss": loss}


@pytest.fixture
def fake_hooks(monkeypatch):
    monkeypatch.setattr(la.get_method("lora"), "training_hooks", FakeSchedule)
    FakeSchedule.instances.clear()
    return FakeSchedule.instances


def test_hooks_driven_per_optimizer_step_and_loss_term_added(fake_hooks, tmp_path):
    rec = LossRecorder()
    model = RawLoss()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    t = trainer(
        max_epochs=2,
        accumulate_grad_batches=3,
        enable_checkpointing=True,
        callbacks=[la.AdapterCallback(lora(), verbose=False), rec, ckpt],
    )
    t.fit(model, mlp_data())  # 8 batches, accumulate 3 -> steps after batches 3, 6, 8 (epoch end flushes)
    (hooks,) = fake_hooks
    steps = [e for e in hooks.events if e[0] == "step"]
    assert steps == [("step", i, True) for i in range(6)]
    assert hooks.events[0] == ("start", 6)  # sized in optimizer steps, as its length_unit asks
    assert [e for e in hooks.events if e[0] == "epoch_end"] == [("epoch_end", 1, 3), ("epoch_end", 2, 6)]
    # Lightning divides the loss by the accumulation factor before backward.
    assert rec.losses == pytest.approx([(r + 1.5) / 3 for r in model.raw], abs=1e-6)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)["callbacks"]["AdapterCallback"]
    assert saved == {"training_hooks": {"steps": 6}}

    fake_hooks.clear()
    trainer(max_epochs=3, accumulate_grad_batches=3, callbacks=[la.AdapterCallback(lora(), verbose=False)]).fit(
        RawLoss(), mlp_data(), ckpt_path=tmp_path / "last.ckpt"
    )
    (resumed,) = fake_hooks
    assert resumed.events[:2] == [("start", 9), ("load", 6)]  # state arrives after start
    assert [e[1] for e in resumed.events if e[0] == "step"] == [6, 7, 8]


def test_loss_term_added_once_with_mixin_and_callback(fake_hooks):
    class Model(la.AdapterMixin, RawLoss):
        def __init__(self):
            super().__init__()
            self.adapter_config = lora()

    rec = LossRecorder()
    model = Model()
    trainer(max_steps=3, callbacks=[la.AdapterCallback(lora(), verbose=False), rec]).fit(model, mlp_data())
    assert len(fake_hooks) == 1
    assert rec.losses == pytest.approx([r + 1.5 for r in model.raw], abs=1e-6)


def test_adapter_regularization_switches_off_the_automatic_term(fake_hooks):
    class Model(la.AdapterMixin, RawLoss):
        def __init__(self):
            super().__init__()
            self.adapter_config = lora()

        def training_step(self, batch, batch_idx):
            out = super().training_step(batch, batch_idx)
            return {"loss": out["loss"] + self.adapter_regularization()}

    rec = LossRecorder()
    model = Model()
    trainer(max_steps=3, callbacks=[rec]).fit(model, mlp_data())  # the mixin adds its own callback
    assert rec.losses == pytest.approx([r + 1.5 for r in model.raw], abs=1e-6)


# ------------------------------------------------------------------------------------------------------------
# Export and diagnostics


def test_export_peft_and_merged_at_fit_end(tmp_path):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    model = TinyLlamaLM()
    cfg = la.LoRAConfig(r=2, alpha=4.0, target_modules=["q_proj", "v_proj"])
    cb = la.AdapterCallback(
        cfg, module="model", export_peft_dir=tmp_path / "peft", export_merged_dir=tmp_path / "merged", verbose=False
    )
    trainer(callbacks=[cb]).fit(model, token_data())
    ids = token_data().dataset.tensors[0][:2]
    model.model.eval()
    with torch.no_grad():
        want = model.model(input_ids=ids).logits
        peft_model = PeftModel.from_pretrained(TinyLlamaLM().model, tmp_path / "peft").eval()
        torch.testing.assert_close(peft_model(input_ids=ids).logits, want, atol=1e-5, rtol=0)
        merged = LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
        torch.testing.assert_close(merged(input_ids=ids).logits, want, atol=1e-5, rtol=0)
    assert la.adapter_state_dict(model.model)  # the trained model keeps its adapter


def test_adapter_without_gradient_is_reported():
    cfg = la.LoRAConfig(
        r=2,
        target_modules=["q_proj", "lm_head"],
    )

    class HiddenOnly(TinyLlamaLM):
        def training_step(self, batch, batch_idx):  # never reaches lm_head
            (ids,) = batch
            return self.model.model(input_ids=ids).last_hidden_state.pow(2).mean()

    with pytest.warns(
        UserWarning, match=r"got no gradient in the first backward: \['model.lm_head.adapter.default.lora_A'"
    ):
        trainer(max_steps=1, callbacks=[la.AdapterCallback(cfg, module="model", verbose=False)]).fit(
            HiddenOnly(), token_data()
        )


def test_export_merged_plain_module_loads_into_a_fresh_instance(tmp_path):
    from safetensors.torch import load_model

    model = BoringMLP()
    cb = la.AdapterCallback(lora(), export_merged_dir=tmp_path / "merged", verbose=False)
    trainer(callbacks=[cb]).fit(model, mlp_data())
    fresh = BoringMLP(seed=5)
    load_model(fresh, str(tmp_path / "merged" / "model.safetensors"))
    x = mlp_data().dataset.tensors[0][:4]
    torch.testing.assert_close(fresh(x), model(x), atol=1e-5, rtol=0)
    assert not hasattr(fresh.encoder[0], "adapter") and la.adapter_state_dict(model)


def test_callback_accepts_a_model_injected_beforehand_with_the_same_config(tmp_path):
    model = la.inject(BoringMLP(), lora())
    t = trainer(callbacks=[la.AdapterCallback(lora(), verbose=False)])
    t.fit(model, mlp_data())
    t.save_checkpoint(tmp_path / "c.ckpt")
    meta = torch.load(tmp_path / "c.ckpt", weights_only=True)["lightning_adapters"]
    assert meta["base_fingerprint"] == la.base_fingerprint(model) and len(meta["adapter_shapes"]) == 6

    other = la.inject(BoringMLP(), lora(r=2))
    with pytest.raises(AdapterConfigError, match="different config"):
        trainer(callbacks=[la.AdapterCallback(lora(), verbose=False)]).fit(other, mlp_data())


def test_restore_refuses_a_non_finite_checkpoint_unless_asked(tmp_path):
    trained = BoringMLP()
    fit_with_last(tmp_path, trained, 1)
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=False)
    key = next(k for k in ckpt["state_dict"] if k.endswith("lora_B"))
    ckpt["state_dict"][key][0, 0] = float("nan")
    torch.save(ckpt, tmp_path / "nan.ckpt")
    fresh = BoringMLP()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(AdapterStateError, match="check_finite=False"):
        la.restore_from_checkpoint(fresh, tmp_path / "nan.ckpt")
    assert fresh.state_dict().keys() == before.keys()  # the refused call left no adapter behind
    la.restore_from_checkpoint(fresh, tmp_path / "nan.ckpt", check_finite=False)
    assert torch.isnan(fresh.state_dict()[key]).sum() == 1


class CompiledEncoder(BoringMLP):
    """Compiles its encoder in ``configure_model``, after the callback has injected into it (eager backend: fast)."""

    def configure_model(self):
        if not isinstance(self.encoder, torch._dynamo.eval_frame.OptimizedModule):
            self.encoder = torch.compile(self.encoder, backend="eager")


def test_a_sub_module_compiled_in_configure_model_is_checkpointed_and_resumes_exactly(tmp_path):
    def fit(root, model, epochs, ckpt_path=None):
        cb = la.AdapterCallback(lora(target_modules=["0", "2", "4"]), module="encoder", verbose=False)
        ckpt = ModelCheckpoint(dirpath=root, save_last=True)
        t = trainer(max_epochs=epochs, callbacks=[cb, ckpt])
        t.fit(model, mlp_data(), ckpt_path=ckpt_path)
        return t

    straight = CompiledEncoder()
    fit(tmp_path / "a", straight, 2)
    fit(tmp_path / "b", CompiledEncoder(), 1)
    saved = torch.load(tmp_path / "b" / "last.ckpt", weights_only=True)["state_dict"]
    adapter_keys = {k for k in saved if ".adapter.default." in k}
    assert len(adapter_keys) == 6 and all(k.startswith("encoder._orig_mod.") for k in adapter_keys)
    assert set(saved) - adapter_keys == {"head.weight", "head.bias"}  # no base tensor
    resumed = CompiledEncoder()
    t = fit(tmp_path / "c", resumed, 2, ckpt_path=tmp_path / "b" / "last.ckpt")
    assert t.global_step == 16
    a, b = la.adapter_state_dict(straight), la.adapter_state_dict(resumed)
    assert a.keys() == b.keys() and len(a) == 6
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert torch.equal(straight.head.weight, resumed.head.weight)
    # The checkpoint restores onto a module that compiles its encoder the same way.
    fresh = la.restore_from_checkpoint(CompiledEncoder(), tmp_path / "b" / "last.ckpt")
    assert len(la.adapter_state_dict(fresh)) == 6


class Predicting(BoringMLP):
    def predict_step(self, batch, batch_idx):
        return self(batch[0])


def test_predict_loads_an_adapter_checkpoint_into_a_fresh_unaware_module(tmp_path):
    trained = Predicting()
    fit_with_last(tmp_path, trained, 1)
    last = tmp_path / "last.ckpt"
    x = mlp_data().dataset.tensors[0]
    with torch.no_grad():
        want = trained(x)
    t = trainer(callbacks=[la.AdapterCallback(lora(), verbose=False)])
    got = torch.cat(t.predict(Predicting(), mlp_data(), ckpt_path=last))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    with pytest.raises(RuntimeError, match="Missing key"):  # Lightning's strict load: the README points elsewhere
        BoringMLP.load_from_checkpoint(last)


class MixinMLP(la.AdapterMixin, BoringMLP):
    """The mixin route on BoringMLP, at module level so spawned processes can import it."""

    def __init__(self):
        super().__init__()
        self.adapter_config = lora()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.trainable_parameters(), lr=0.02)


def test_a_mixin_module_pickles_by_its_own_class_for_a_process_that_never_swapped_it():
    import pickle

    from lightning_adapters.lightning import callback

    model = MixinMLP()
    swapped = type(model)
    data = pickle.dumps(model)
    # A spawned DDP worker has no swapped class yet: drop it from this process as if it were new.
    delattr(callback, swapped.__name__)
    callback._CLASS_CACHE.clear()
    try:
        again = pickle.loads(data)
    finally:
        setattr(callback, swapped.__name__, swapped)
    assert type(again).__bases__ == swapped.__bases__ and again.adapter_config == model.adapter_config
    assert getattr(type(again), "_la_swapped", False)


@pytest.mark.slow
def test_under_ddp_spawn_the_mixin_module_of_the_launching_process_gets_the_trained_adapter(tmp_path):
    model = MixinMLP()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    t = trainer(callbacks=[ckpt], strategy="ddp_spawn", devices=2, enable_model_summary=False)
    t.fit(model, mlp_data())
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]
    got = la.adapter_state_dict(model)  # this process never injected: the weights rank 0 sent back did
    assert got.keys() == saved.keys() and len(got) == 6
    for k, v in saved.items():
        assert torch.equal(got[k], v), k


def test_a_callback_module_of_a_spawned_fit_is_warned_about_the_launching_processes_copy():
    from types import SimpleNamespace

    from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher

    from lightning_adapters.lightning.callback import _weights_go_back_to_an_unaware_module

    spawned = SimpleNamespace(strategy=SimpleNamespace(launcher=object.__new__(_MultiProcessingLauncher)))
    plain = SimpleNamespace(strategy=SimpleNamespace(launcher=None))
    swapped_here, swapped_before = (
        SimpleNamespace(attached=(True, True, True)),
        SimpleNamespace(attached=(False, True, True)),
    )
    assert _weights_go_back_to_an_unaware_module(spawned, swapped_here)
    assert not _weights_go_back_to_an_unaware_module(spawned, swapped_before)  # the mixin: injects on load
    assert not _weights_go_back_to_an_unaware_module(plain, swapped_here)


def test_a_mixin_module_loading_other_extra_keys_before_fit_is_not_injected_early():
    model = MixinMLP()
    extra = {**model.state_dict(), "pooler.weight": torch.zeros(2)}  # e.g. a larger pretrained file
    model.load_state_dict(extra, strict=False)
    assert not any(".adapter." in k for k in model.state_dict())


class ConfigInHparams(la.AdapterMixin, BoringMLP):
    """A mixin module taking its config as an argument and saving it with its hyperparameters (as LightningCLI does)."""

    def __init__(self, adapter_config: la.LoRAConfig | None = None):
        super().__init__()
        self.save_hyperparameters()
        self.adapter_config = adapter_config

    def configure_optimizers(self):
        return torch.optim.AdamW(self.trainable_parameters(), lr=0.02)


def test_a_config_in_the_hyperparameters_loads_weights_only(tmp_path):
    fit_with_last(tmp_path / "a", ConfigInHparams(lora()), 1)
    last = tmp_path / "a" / "last.ckpt"
    hparams = torch.load(last, weights_only=True)["hyper_parameters"]  # refused before: LoRAConfig was no safe global
    assert hparams["adapter_config"] == lora()
    resumed = ConfigInHparams(lora())
    assert fit_with_last(tmp_path / "b", resumed, 2, ckpt_path=last).global_step == 16
    loaded = ConfigInHparams.load_from_checkpoint(last)
    saved = torch.load(last, weights_only=True)["state_dict"]
    assert all(torch.equal(v, saved[k]) for k, v in la.adapter_state_dict(loaded).items())
