"""Data-driven LoRA init (CorDA) inside a Lightning fit equals the plain entry on the same batches; LoRA+ groups
from the mixin."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys

import pytest
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
        self.lora = [m.adapter.default.lora_A for m in pl_module.encoder if hasattr(m, "adapter")]


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
    b_ids = {id(m.adapter.default.lora_B) for m in model.encoder if hasattr(m, "adapter")}
    assert {id(p) for p in groups[2]["params"]} == b_ids


@pytest.mark.slow
def test_corda_on_two_ddp_processes_uses_every_rank(tmp_path):
    """Rank k reads batches k, k+2 of the first 4; the summed statistics give every rank the single-process init."""
    from tests.lightning.test_processes import _LAUNCH_VARS, ROOT, free_port

    out = tmp_path / "state"
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("PL_") and k not in _LAUNCH_VARS}
    env = {**inherited, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "PYTHONPATH": str(ROOT)}
    env["OMP_NUM_THREADS"] = "1"
    script = ROOT / "tests" / "lightning" / "scripts" / "corda_ddp.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--out", str(out), "--batches", "4"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [torch.load(f"{out}.rank{k}", weights_only=True) for k in range(2)]
    model = la.inject(BoringMLP(), corda())
    la.initialize_from_data(model, itertools.islice(mlp_data(), 4))
    expected = model.state_dict()
    only_rank0 = la.inject(BoringMLP(), corda())
    la.initialize_from_data(only_rank0, [b for i, b in enumerate(itertools.islice(mlp_data(), 4)) if i % 2 == 0])
    half = only_rank0.state_dict()

    def rel(a, b):
        return ((a - b).abs().max() / b.abs().max()).item()

    for k, v in expected.items():
        assert torch.equal(ranks[0][k], ranks[1][k]), k  # every rank has the same init
        # = one process on all 4 batches; C (256 x 256 from 32 rows) is inverted, so summation order shows at 1e-3
        assert rel(ranks[0][k], v) < 5e-3, (k, rel(ranks[0][k], v))
        if k.endswith("lora_A"):
            assert rel(half[k], v) > 0.1, k  # rank 0's batches alone give another init


def test_pissa_fit_checkpoint_restores_onto_a_fresh_model(tmp_path):
    """The residual base is rebuilt from the plain base on restore: same outputs as the trained model."""
    cfg = la.LoRAConfig(r=4, alpha=8.0, target_modules=TARGETS, init_weights="pissa", modules_to_save=["head"])
    model = BoringMLP()
    x = torch.randn(5, 256)
    with torch.no_grad():
        base_out = model(x)
    t = trainer(max_steps=3, callbacks=[la.AdapterCallback(cfg, verbose=False)])
    t.fit(model, mlp_data())
    t.save_checkpoint(tmp_path / "p.ckpt")
    with torch.no_grad():
        trained = model(x)
    assert not torch.allclose(trained, base_out)
    fresh = la.restore_from_checkpoint(BoringMLP(), tmp_path / "p.ckpt")
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), trained, rtol=1e-5, atol=1e-6)
        plain = la.eject(fresh)  # the base the residual came from (the head trained in full stays trained)
        torch.testing.assert_close(plain.encoder(x), BoringMLP().encoder(x), rtol=1e-5, atol=1e-5)
