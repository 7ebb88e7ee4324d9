"""Data-driven LoRA init (CorDA) inside a Lightning fit equals the plain entry on the same batches; LoRA+ groups
from the mixin."""

from __future__ import annotations

import itertools

import torch
from lightning.pytorch import Callback

import lightning_adapters as la
from tests.lightning.models import BoringMLP, mlp_data, trainer

TARGETS = ["encoder.0", "encoder.2", "encoder.4"]


def corda(**kw) -> la.LoRAConfig:
    return la.LoRAConfig(r=4, alpha=8.0, target_modules=TARGETS, init_weights="corda", init_batches=3, **kw)


class Snapshot(Callback):
    """The model's state at fit start: after injection, init and configure_optimizers, before any step."""

    def on_fit_start(self, trainer, pl_module):
        self.state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        self.optimized = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
        self.lora = [m.adapter.lora_A for m in pl_module.encoder if hasattr(m, "adapter")]


def _plain_init():
    model = la.inject(BoringMLP(), corda())
    la.initialize_from_data(model, itertools.islice(mlp_data(), 3))
    return model.state_dict()


def test_corda_in_a_fit_equals_the_plain_entry():
    expected = _plain_init()
    base = BoringMLP().state_dict()
    snap = Snapshot()
    model = BoringMLP()
    trainer(max_steps=1, callbacks=[la.AdapterCallback(corda(), verbose=False), snap]).fit(model, mlp_data())
    assert set(snap.state) == set(expected)
    for k, v in expected.items():
        assert torch.equal(snap.state[k], v), k  # adapters and residual base weights, bit for bit
    assert not torch.equal(snap.state["encoder.0.weight"], base["encoder.0.weight"])  # the residual W - s·B·A
    assert all(id(p) in snap.optimized for p in snap.lora)  # the optimizer holds the initialised tensors


def test_corda_with_the_mixin_and_loraplus_groups():
    class Model(la.AdapterMixin, BoringMLP):
        def __init__(self):
            super().__init__()
            self.adapter_config = corda()

        def configure_optimizers(self):
            return torch.optim.AdamW(self.loraplus_param_groups(lr=0.01, loraplus_lr_ratio=8))

    expected = _plain_init()
    snap = Snapshot()
    model = Model()
    trainer(max_steps=1, callbacks=[snap]).fit(model, mlp_data())
    for k, v in expected.items():
        assert torch.equal(snap.state[k], v), k
    groups = model.trainer.optimizers[0].param_groups
    assert [g["lr"] for g in groups] == [0.01, 1e-6, 0.08, 0.08]
    b_ids = {id(m.adapter.lora_B) for m in model.encoder if hasattr(m, "adapter")}
    assert {id(p) for p in groups[2]["params"]} == b_ids
