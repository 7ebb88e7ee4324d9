"""EVA inside a Lightning fit: the init of the fit's first batches, before the optimizer is built (which then holds
the resized factors), checkpoints that resume onto the EVA ranks, and on two DDP processes the init of all ranks'
rows gathered."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys

import lightning as L
import pytest
import torch
from lightning.pytorch import Callback
from torch.utils.data import DataLoader, TensorDataset

import lightning_adapters as la
from lightning_adapters.interop.peft import peft_config_dict
from tests.lightning.models import BoringMLP, trainer
from tests.lightning.scripts.eva_ddp import eva_config, eva_data
from tests.peft_parity.test_eva import TwoBranch, branch_batches


class Snapshot(Callback):
    """The model's state at fit start: after injection, init and configure_optimizers, before any step."""

    def on_fit_start(self, trainer, pl_module):
        self.state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        self.optimized = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
        self.adapters = [p for n, p in pl_module.named_parameters() if ".adapter." in n]


def _plain_init(batches):
    model = la.inject(BoringMLP(), eva_config(len(batches)))
    la.initialize_from_data(model, batches)
    return model


def test_eva_in_a_fit_equals_the_plain_entry(tmp_path):
    expected = _plain_init(list(itertools.islice(eva_data(), 4)))
    ranks = {n: m.adapter.default.r for n, m in expected.named_modules() if hasattr(m, "adapter")}
    assert len(set(ranks.values())) > 1  # EVA moved ranks between the three layers
    snap = Snapshot()
    model = BoringMLP()
    t = trainer(max_steps=2, callbacks=[la.AdapterCallback(eva_config(), verbose=False), snap])
    t.fit(model, eva_data())
    assert {k: v.shape for k, v in snap.state.items()} == {k: v.shape for k, v in expected.state_dict().items()}
    for k, v in expected.state_dict().items():
        assert torch.equal(snap.state[k], v), k
    assert snap.adapters and all(id(p) in snap.optimized for p in snap.adapters)  # the resized tensors train
    trained = {k: v.clone() for k, v in la.adapter_state_dict(model).items()}
    assert any(not torch.equal(trained[k], la.adapter_state_dict(expected)[k]) for k in trained)
    # resume on a fresh module: the init runs again on the same batches (same ranks), then the checkpoint loads
    t.save_checkpoint(tmp_path / "eva.ckpt")
    fresh = BoringMLP()
    trainer(max_steps=3, callbacks=[la.AdapterCallback(eva_config(), verbose=False)]).fit(
        fresh, eva_data(), ckpt_path=tmp_path / "eva.ckpt"
    )
    assert {k: v.shape for k, v in la.adapter_state_dict(fresh).items()} == {k: v.shape for k, v in trained.items()}
    # the adapter saved from the fit loads in PEFT's format with its EVA ranks
    la.save_peft(model, tmp_path / "peft")
    again = la.load_peft(BoringMLP(), tmp_path / "peft")
    x = next(iter(eva_data()))[0]
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_eva_on_two_ddp_processes_gathers_every_rank(tmp_path):
    """Rank k runs batches k, k+2 of the first 4 and every EVA layer gathers both ranks' rows: each rank gets the init
    of one process reading the batches (0 ‖ 1), (2 ‖ 3)."""
    from tests.lightning.test_processes import _LAUNCH_VARS, ROOT, free_port

    out = tmp_path / "state"
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("PL_") and k not in _LAUNCH_VARS}
    env = {**inherited, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "PYTHONPATH": str(ROOT)}
    env["OMP_NUM_THREADS"] = "1"
    script = ROOT / "tests" / "lightning" / "scripts" / "eva_ddp.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--out", str(out), "--batches", "4"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [torch.load(f"{out}.rank{k}", weights_only=True) for k in range(2)]
    first = list(itertools.islice(eva_data(), 4))
    joined = [[torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]])] for a, b in (first[0:2], first[2:4])]
    expected = _plain_init(joined).state_dict()
    only_rank0 = _plain_init(first[0::2]).state_dict()
    assert {k: v.shape for k, v in ranks[0].items()} == {k: v.shape for k, v in expected.items()}
    for k, v in expected.items():
        assert torch.equal(ranks[0][k], ranks[1][k]), k  # every rank has the same init
        scale = v.abs().max().clamp_min(1e-12)
        assert ((ranks[0][k] - v).abs().max() / scale).item() < 1e-5, k
    differs = [
        k
        for k in expected
        if k.endswith("lora_A")
        and (only_rank0[k].shape != expected[k].shape or not torch.allclose(only_rank0[k], expected[k], atol=1e-3))
    ]
    assert differs  # rank 0's rows alone give another init


class Branches(L.LightningModule):
    """The EVA parity test's ``TwoBranch`` in a fit: EVA gives ``net.a`` the whole rank budget and ``net.b`` none."""

    def __init__(self) -> None:
        super().__init__()
        self.net = TwoBranch()
        self.net.head.requires_grad_(False)  # only the adapters train

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return self(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)


def test_an_eva_checkpoint_restores_onto_a_fresh_model_with_eva_ranks_and_removed_layers(tmp_path):
    """No data at restore time: the ranks, alphas (adjusted to r'/r) and removed layers come from the checkpoint, and
    the restored model computes, differentiates and exports as the trained one."""
    config = la.LoRAConfig(r=4, alpha=8.0, target_modules=["net.a", "net.b"], init_weights="eva", eva_tau=0.95)
    trained = Branches()
    data = DataLoader(TensorDataset(torch.cat(branch_batches())), batch_size=24)
    t = trainer(max_steps=3, callbacks=[la.AdapterCallback(config, verbose=False)])
    t.fit(trained, data)
    assert trained.net.a.adapter.default.r == 8 and not hasattr(trained.net.b, "adapter")
    t.save_checkpoint(tmp_path / "eva.ckpt")

    restored = la.restore_from_checkpoint(Branches(), tmp_path / "eva.ckpt")
    layer = restored.net.a.adapter.default
    assert (layer.r, layer.alpha, layer.needs_data) == (8, 16.0, False) and not hasattr(restored.net.b, "adapter")
    want = la.adapter_state_dict(trained)
    got = la.adapter_state_dict(restored)
    assert set(got) == set(want) == {"net.a.adapter.default.lora_A", "net.a.adapter.default.lora_B"}
    for k, v in want.items():
        assert torch.equal(got[k], v), k
    assert peft_config_dict(restored) == peft_config_dict(trained)  # rank_pattern, alpha_pattern, target_modules
    x = branch_batches(1, seed=1)[0]
    for model in (trained, restored):
        model.zero_grad()
        model(x).pow(2).mean().backward()
    torch.testing.assert_close(restored(x), trained(x), rtol=0, atol=0)
    for (n, p), (_, q) in zip(trained.named_parameters(), restored.named_parameters(), strict=True):
        assert p.requires_grad == q.requires_grad, n
        if p.requires_grad:
            torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=0, msg=n)
