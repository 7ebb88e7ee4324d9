"""EVA inside a Lightning fit: the init of the fit's first batches, before the optimizer is built (which then holds
the resized factors), checkpoints that resume onto the EVA ranks, and on two DDP processes the init of all ranks'
rows gathered."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys

import pytest
import torch
from lightning.pytorch import Callback

import lightning_adapters as la
from tests.lightning.models import BoringMLP, trainer
from tests.lightning.scripts.eva_ddp import eva_config, eva_data


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
