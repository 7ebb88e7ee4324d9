"""AdaLoRA driven by AdapterCallback / AdapterMixin on a tiny Llama, on CPU."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

import lightning_adapters as la
from lightning_adapters.lightning.runtime import get_runtime
from lightning_adapters.methods.adalora import adalora_layers, rank_pattern
from tests.helpers import tiny_llama

REPO = Path(__file__).resolve().parents[2]
N_MATRICES = 4  # q_proj and v_proj of 2 layers


class LlamaLM(L.LightningModule):
    """Causal-LM loss on a tiny Llama; ``extra_term(module)`` is added to the loss when given."""

    def __init__(self, seed: int = 0, extra_term: Any = None) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.model = tiny_llama()
        self.extra_term = extra_term

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (ids,) = batch
        loss = self.model(input_ids=ids, labels=ids).loss
        return loss if self.extra_term is None else loss + self.extra_term(self)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=0.02)


class MixinLM(la.AdapterMixin, LlamaLM):
    """The same module with the mixin, adding ``adapter_regularization()`` to its loss explicitly."""

    def __init__(self, config: la.AdaLoRAConfig) -> None:
        super().__init__(extra_term=lambda m: m.adapter_regularization())
        self.adapter_config = config
        self.adapter_module = "model"


def data(n: int = 16, batch_size: int = 4) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randint(0, 128, (n, 8), generator=g)), batch_size=batch_size)


def cfg(**kw: Any) -> la.AdaLoRAConfig:
    base = dict(init_r=4, target_r=2, alpha=8.0, target_modules=["q_proj", "v_proj"])
    return la.AdaLoRAConfig(**{**base, **kw})


def fit(module: L.LightningModule, config, callbacks=(), ckpt_path=None, adapter_seed: int = 0, **kw: Any):
    """Fit for 3 epochs (by default); the adapter init is drawn from ``adapter_seed``."""
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        max_epochs=3,
    )
    extra = [] if config is None else [la.AdapterCallback(config, module="model", verbose=False)]
    trainer = L.Trainer(callbacks=[*extra, *callbacks], **{**defaults, **kw})
    torch.manual_seed(adapter_seed)
    trainer.fit(module, data(), ckpt_path=ckpt_path)
    return trainer, get_runtime(module).schedule


def _kept(module: LlamaLM) -> int:
    return sum(sum(v) for v in rank_pattern(module.model).values())


def _pruned_e_are_zero(module: LlamaLM) -> bool:
    return all(
        bool((layer.lora_E.view(-1)[~layer.rank_mask] == 0).all()) for layer in adalora_layers(module.model).values()
    )


@pytest.mark.parametrize(
    "schedule, kw, total",
    [("epoch", dict(tinit=0, tfinal=1), 3), ("step", dict(tinit=2, tfinal=3, deltaT=2), 12)],
)
def test_both_schedules_reach_the_target_budget_and_log_ranks(schedule, kw, total, tmp_path) -> None:
    module = LlamaLM()
    logger = CSVLogger(tmp_path, name="run")
    trainer, hooks = fit(module, cfg(schedule=schedule, **kw), logger=logger)
    # total_step=None was taken from the trainer: 3 epochs, or 3 × 4 optimizer steps.
    assert hooks.allocator.total == total
    assert _kept(module) == 2 * N_MATRICES
    assert _pruned_e_are_zero(module)
    assert hooks.history[-1]["budget"] == 2 * N_MATRICES and sum(hooks.history[-1]["ranks"]) == 2 * N_MATRICES
    if schedule == "epoch":
        # One reallocation per epoch end until the final mask (after epoch 2 of 3).
        assert [h["t"] for h in hooks.history] == [1, 2]
    else:
        assert [h["t"] for h in hooks.history] == [4, 6, 8, 9]
    log_dir = Path(logger.log_dir)
    with open(log_dir / "adalora_ranks.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0][4:] == hooks.names and len(rows) == 1 + len(hooks.history)
    assert (log_dir / "adalora_rank_heatmap.png").stat().st_size > 1000
    with open(log_dir / "metrics.csv") as f:
        header = next(csv.reader(f))
    assert f"adalora/rank/{hooks.names[0]}" in header


def test_importance_is_updated_once_per_optimizer_step_with_accumulation() -> None:
    module = LlamaLM()
    trainer, hooks = fit(module, cfg(tinit=0, tfinal=1), max_epochs=2, accumulate_grad_batches=2)
    # 8 batches, 2 per optimizer step: 4 steps; the schedule length counts optimizer steps.
    assert trainer.global_step == 4 and hooks.allocator.total == 4
    # PEFT's schedule updates importance while t < total - tfinal = 3, then takes the final mask at t = 3.
    assert hooks.allocator.updates == 3
    assert [h["t"] for h in hooks.history][-1] == 3
    assert _kept(module) == 2 * N_MATRICES


def _reg_by_hand(module: LlamaLM) -> torch.Tensor:
    """0.5 × mean over all A and B of the Frobenius distance of their r×r Gram matrix from I."""
    terms = []
    for layer in adalora_layers(module.model).values():
        eye = torch.eye(layer.r)
        terms.append(torch.linalg.matrix_norm(layer.lora_A @ layer.lora_A.T - eye))
        terms.append(torch.linalg.matrix_norm(layer.lora_B.T @ layer.lora_B - eye))
    return 0.5 * torch.stack(terms).mean()


class GradRecorder(L.Callback):
    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if not self.grads:
            self.grads = {n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None}


def test_automatic_regulariser_equals_adding_it_by_hand() -> None:
    runs = {}
    for name, module, config in [
        ("auto", LlamaLM(), cfg(orth_reg_weight=0.5, tinit=2, total_step=10)),
        ("by_hand", LlamaLM(extra_term=_reg_by_hand), cfg(orth_reg_weight=0.0, tinit=2, total_step=10)),
        ("mixin", MixinLM(cfg(orth_reg_weight=0.5, tinit=2, total_step=10)), None),
    ]:
        rec = GradRecorder()
        fit(module, config, callbacks=[rec], max_steps=1)
        runs[name] = rec.grads
    assert set(runs["auto"]) == set(runs["by_hand"]) == set(runs["mixin"])
    a_grads = [g for n, g in runs["auto"].items() if n.endswith("lora_A")]
    # At init E = 0, so the task loss gives A no gradient: what A gets comes from the regulariser alone.
    assert all(g.abs().max() > 1e-3 for g in a_grads)
    for n, g in runs["auto"].items():
        assert torch.allclose(g, runs["by_hand"][n], atol=1e-6), n
        assert torch.allclose(g, runs["mixin"][n], atol=1e-6), n  # explicit use switches the automatic term off


class Kill(L.Callback):
    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == 2:
            raise RuntimeError("killed")


def test_kill_and_resume_matches_an_uninterrupted_run(tmp_path) -> None:
    config = cfg(tinit=2, tfinal=3, deltaT=2)  # 12 steps: masks at t = 4, 6, 8, final at 9
    full = LlamaLM()
    _, full_hooks = fit(full, config)

    ckpt = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, save_on_train_epoch_end=True)
    with pytest.raises(RuntimeError, match="killed"):
        fit(LlamaLM(), config, callbacks=[ckpt, Kill()], enable_checkpointing=True)
    mid = tmp_path / "epoch=1-step=8.ckpt"
    assert mid.exists()

    resumed = LlamaLM()
    # Another adapter init: everything must come from the checkpoint.
    _, hooks = fit(resumed, config, ckpt_path=str(mid), adapter_seed=1)
    assert rank_pattern(resumed.model) == rank_pattern(full.model)
    assert hooks.history == full_hooks.history
    expected = la.adapter_state_dict(full.model)
    got = la.adapter_state_dict(resumed.model)
    for k, v in expected.items():
        if v.is_floating_point():
            assert torch.allclose(got[k], v, atol=1e-6), k
        else:
            assert torch.equal(got[k], v), k


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.xdist_group("procs")
def test_ddp_ranks_end_with_identical_masks(tmp_path) -> None:
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "PYTHONPATH": str(REPO)}
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run(
        [sys.executable, "-m", "tests.lightning.adalora_ddp_script", str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    # The script makes rank 1's local importance disagree with rank 0's before every reallocation.
    assert results[0]["perturbed"] is False and results[1]["perturbed"] is True
    assert results[0]["pattern"] == results[1]["pattern"]
    assert sum(sum(v) for v in results[0]["pattern"].values()) == 2 * N_MATRICES
    assert results[0]["history"] == results[1]["history"] and len(results[0]["history"]) == 2
