"""Precision plugins (bf16-true, bf16-mixed) with the adapter dtype policy, and gradient checkpointing."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Callback

import lightning_adapters as la
from tests.lightning.models import TinyLlamaLM, token_data, trainer

QV = ["q_proj", "v_proj"]


class Losses(Callback):
    def __init__(self):
        self.values = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.values.append(float(outputs["loss"]))


@pytest.mark.parametrize("precision", ["bf16-true", "bf16-mixed"])
def test_bf16_keeps_fp32_adapters_and_exports_for_peft(precision, tmp_path):
    from peft import PeftModel

    model = TinyLlamaLM(lr=0.5)
    losses = Losses()
    cb = la.AdapterCallback(
        la.LoRAConfig(r=2, alpha=4.0, target_modules=QV),
        module="model",
        verbose=False,
        export_peft_dir=tmp_path / "peft",
    )
    trainer(max_epochs=2, precision=precision, callbacks=[cb, losses]).fit(model, token_data())
    assert losses.values and all(torch.isfinite(torch.tensor(losses.values)))
    base_dtype = torch.bfloat16 if precision == "bf16-true" else torch.float32
    assert model.model.model.layers[0].self_attn.q_proj.weight.dtype == base_dtype
    adapter = la.adapter_state_dict(model.model)
    assert all(v.dtype == torch.float32 for v in adapter.values())
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if k.endswith("lora_B"))

    ids = token_data().dataset.tensors[0][:2]
    fresh = TinyLlamaLM().model.to(base_dtype)
    peft_model = PeftModel.from_pretrained(fresh, tmp_path / "peft").eval()
    model.model.eval()
    with torch.no_grad():
        want = model.model(input_ids=ids).logits.float()
        got = peft_model(input_ids=ids).logits.float()
    # Same maths; bf16 rounding differs where PEFT adds the fp32 update before casting back.
    atol = 3e-2 if precision == "bf16-true" else 1e-5
    torch.testing.assert_close(got, want, atol=atol, rtol=0)


def test_bf16_true_resume_keeps_the_checkpoints_fp32_adapter_and_ends_as_an_uninterrupted_run(tmp_path):
    # Lightning restores the checkpoint before bf16-true casts the module; the adapter put back in fp32 after the
    # cast must hold the saved values, not values rounded to bf16 (which moved lora_A by ~5e-4 per resume).
    from lightning.pytorch.callbacks import ModelCheckpoint

    class Start(Callback):
        def on_train_start(self, trainer, pl_module):
            self.adapter = {k: v.clone() for k, v in la.adapter_state_dict(pl_module.model).items()}

    def fit(root, model, epochs, ckpt_path=None, *extra):
        cb = la.AdapterCallback(
            la.LoRAConfig(r=2, target_modules=QV, init_weights=False), module="model", verbose=False
        )
        ckpt = ModelCheckpoint(dirpath=root, save_last=True)
        torch.manual_seed(1)  # the same random adapter init in every run
        trainer(max_epochs=epochs, precision="bf16-true", callbacks=[cb, ckpt, *extra]).fit(
            model, token_data(), ckpt_path=ckpt_path
        )

    straight, first, resumed, start = TinyLlamaLM(lr=0.1), TinyLlamaLM(lr=0.1), TinyLlamaLM(lr=0.1), Start()
    fit(tmp_path / "a", straight, 2)
    fit(tmp_path / "b", first, 1)
    fit(tmp_path / "c", resumed, 2, tmp_path / "b" / "last.ckpt", start)
    saved = la.adapter_state_dict(first.model)
    assert start.adapter.keys() == saved.keys() and all(v.dtype == torch.float32 for v in saved.values())
    for k, v in saved.items():
        assert torch.equal(start.adapter[k], v), k  # resumed from exactly the saved fp32 values
    want, got = la.adapter_state_dict(straight.model), la.adapter_state_dict(resumed.model)
    for k, v in want.items():
        assert torch.equal(got[k], v), k


class Grads(Callback):
    """Adapter gradients of the first optimizer step, and how often the first block's attention started."""

    def __init__(self):
        self.grads, self.calls = {}, 0

    def on_fit_start(self, trainer, pl_module):
        pl_module.model.model.layers[0].self_attn.register_forward_pre_hook(
            lambda *_: setattr(self, "calls", self.calls + 1)
        )

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads = {n: p.grad.clone() for n, p in pl_module.named_parameters() if p.requires_grad}


class TrainModeLlama(TinyLlamaLM):
    """The HF model in train mode (checkpointing only runs in training), optionally with reentrant checkpointing."""

    def __init__(self, reentrant: bool = False):
        super().__init__()
        self.model.train()
        if reentrant:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})


def first_step_grads(model, **callback_kwargs):
    grads = Grads()
    cfg = la.LoRAConfig(r=2, target_modules=QV, init_weights=False)  # random A and B: every grad non-zero
    cb = la.AdapterCallback(cfg, module="model", verbose=False, **callback_kwargs)
    trainer(max_steps=1, callbacks=[cb, grads]).fit(model, token_data())
    return grads


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_gradient_checkpointing_with_frozen_embeddings_gives_the_same_adapter_grads():
    plain = first_step_grads(TrainModeLlama())
    ours = first_step_grads(TrainModeLlama(), gradient_checkpointing=True)  # non-reentrant
    reentrant = first_step_grads(TrainModeLlama(reentrant=True))  # the integration hooks the frozen embedding
    assert plain.calls == 1 and ours.calls == 2 and reentrant.calls == 2  # the block really was recomputed
    assert len(plain.grads) == 8 and all(g.abs().sum() > 0 for g in plain.grads.values())
    for run in (ours, reentrant):
        assert set(run.grads) == set(plain.grads)
        for k, g in plain.grads.items():
            torch.testing.assert_close(run.grads[k], g, atol=1e-5, rtol=0, msg=k)
