"""Fresh processes: kill-and-resume on one process; DDP and FSDP2 (ModelParallelStrategy) on two CPU processes.

Each run is ``tests/lightning/scripts/run_training.py`` in a subprocess (Lightning's launchers re-run it per
rank), compared against a single-process run in this process on the same global batches.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("procs")]

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "lightning" / "scripts" / "run_training.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_LAUNCH_VARS = {"WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT"}


# What a rank waiting for a peer that never came says (TCPStore's server and client): the run failed before it
# started, not because of anything under test, so it gets one more try on a fresh port.
_RENDEZVOUS_FAILURES = ("clients joined", "DistStoreError", "DistNetworkError")


def run(tmp_path: Path, name: str, *args: str, expect_ok: bool = True) -> dict | subprocess.CompletedProcess:
    out = tmp_path / f"{name}.pt"
    # Other tests in this worker may have run Lightning in-process (DDP launchers export WORLD_SIZE, LOCAL_RANK,
    # ...; seed_everything exports PL_GLOBAL_SEED): a child seeing those would think it was already launched.
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("PL_") and k not in _LAUNCH_VARS}
    for attempt in (1, 2):
        env = {
            **inherited,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port()),
            "PYTHONPATH": str(ROOT),
            "OMP_NUM_THREADS": "1",
        }
        proc = subprocess.run(
            [sys.executable, str(SCRIPT), *args, "--out", str(out)],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if proc.returncode == 0 or not any(s in proc.stderr for s in _RENDEZVOUS_FAILURES) or attempt == 2:
            break
    if not expect_ok:
        return proc
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out, weights_only=True)


def assert_adapters_close(got: dict, want: dict, atol: float) -> None:
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=atol, rtol=0, msg=k)


def test_kill_and_resume_in_a_fresh_process_is_exact(tmp_path):
    # The uninterrupted reference runs in its own process as well: a reference computed inside the (threaded,
    # long-lived) pytest worker can differ from a fresh process in the last bits, which AdamW then amplifies.
    straight = run(tmp_path, "straight", "--optimizer", "adamw", "--epochs", "2", "--ckpt-dir", str(tmp_path / "s"))
    want = straight["adapter"]

    ckpt_dir = tmp_path / "ckpt"
    run(tmp_path, "first", "--optimizer", "adamw", "--epochs", "1", "--ckpt-dir", str(ckpt_dir))
    resumed = run(
        tmp_path,
        "second",
        "--optimizer",
        "adamw",
        "--epochs",
        "2",
        "--ckpt-dir",
        str(tmp_path / "ckpt2"),
        "--resume",
        str(ckpt_dir / "last.ckpt"),
    )
    assert_adapters_close(resumed["adapter"], want, atol=1e-6)
    assert resumed["global_step"] == straight["global_step"] == 16
    assert resumed["steps"] == [16] * 6  # AdamW's own step count for each of the 6 adapter tensors


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_processes_train_save_full_adapter_and_resume(strategy, tmp_path):
    # 16 samples, global batch 4: 8 optimizer steps. The reference also runs in a fresh process (see above).
    want = run(
        tmp_path,
        "reference",
        "--strategy",
        "single",
        "--model",
        "llama",
        "--global-batch",
        "4",
        "--epochs",
        "2",
        "--ckpt-dir",
        str(tmp_path / "ref"),
    )["adapter"]
    # One launch: 1 epoch with checkpoints every 2 steps, then a new Trainer and model resume from last.ckpt.
    out = run(
        tmp_path,
        "run",
        "--strategy",
        strategy,
        "--model",
        "llama",
        "--global-batch",
        "4",
        "--epochs",
        "1",
        "--resume-epochs",
        "2",
        "--ckpt-dir",
        str(tmp_path / "a"),
    )
    assert out["first_step"] == 4 and out["global_step"] == 8
    shapes = {k: list(v.shape) for k, v in want.items()}
    assert sorted(out["files"]) == ["epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt", "last.ckpt"]
    for name, saved in out["files"].items():
        assert saved == shapes, name  # adapter keys only, every tensor full-shape (no rank's slice, none empty)
    assert_adapters_close(out["adapter"], want, atol=1e-5)


def test_fsdp2_on_a_quantized_base_equals_one_process(tmp_path):
    # QLoRA under FSDP2 (adapter_parallelize_fn): bitsandbytes NF4 attention weights stay whole on every rank,
    # torchao NF4 MLP weights are sharded over two ranks (and kept whole on one: torch's world-size-1 path cannot
    # gather them, core.quant.fsdp2_kept_whole). Both give the one-process adapter on the same quantized base.
    common = ["--model", "llama", "--quantized", "--global-batch", "4", "--epochs", "1"]
    want = run(tmp_path, "reference", "--strategy", "single", *common, "--ckpt-dir", str(tmp_path / "ref"))["adapter"]
    assert any(float(v.abs().max()) > 0 for k, v in want.items() if "lora_B" in k)  # it trained
    for world in (1, 2):
        sharded = ["--strategy", "fsdp2", "--world", str(world), "--ckpt-dir", str(tmp_path / f"w{world}")]
        got = run(tmp_path, f"fsdp2_{world}", *sharded, *common)["adapter"]
        assert_adapters_close(got, want, atol=1e-5)


def test_ddp_reports_an_adapter_without_gradient_before_ddp_fails(tmp_path):
    proc = run(
        tmp_path,
        "unused",
        "--strategy",
        "ddp",
        "--model",
        "llama",
        "--unused",
        "--global-batch",
        "4",
        "--ckpt-dir",
        str(tmp_path / "c"),
        expect_ok=False,
    )
    assert proc.returncode != 0
    assert "got no gradient in the first backward: ['model.lm_head.adapter.default.lora_A'" in proc.stderr
    assert "AdapterStateError" in proc.stderr and "RuntimeError: Expected to have finished reduction" not in proc.stderr
