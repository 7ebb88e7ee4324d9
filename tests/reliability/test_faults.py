"""Faults: a training process killed mid-write resumes exactly; a failing DDP rank ends the run everywhere; an
export that fails midway leaves the previous export's files whole.

The training runs are ``tests/reliability/fault_script.py`` in fresh processes.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import lightning_adapters as la
from tests.reliability import fault_script

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("procs")]

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "reliability" / "fault_script.py"
HANG_LIMIT_S = 300  # far above a healthy run; reaching it means a hang


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Run:
    """A fault-script process: the command, its log file and, once finished, exit status, output and exit time."""

    args: tuple[str, ...]
    proc: subprocess.Popen
    log: Path
    returncode: int | None = None
    output: str = ""
    exited_at: float = 0.0

    @property
    def pgid(self) -> int:
        return self.proc.pid  # started in its own session: the process group of the script and its DDP ranks


_STARTED: list[Run] = []


@pytest.fixture(autouse=True)
def _no_leftover_processes():
    """A test that fails while a script still runs kills that script's process group."""
    yield
    while _STARTED:
        run = _STARTED.pop()
        if run.proc.poll() is None:
            os.killpg(run.pgid, signal.SIGKILL)
            run.proc.wait()


def start(log: Path, *args: str, tmpdir: Path | None = None) -> Run:
    """Start the fault script in its own session, stdout and stderr going to ``log``."""
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
    }
    if tmpdir is not None:
        env["TMPDIR"] = str(tmpdir)
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [sys.executable, str(SCRIPT), *args], env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )
    _STARTED.append(Run(args, proc, log))
    return _STARTED[-1]


def finish(run: Run) -> Run:
    """Wait for ``run``; one that outlives ``HANG_LIMIT_S`` is killed with its process group and fails the test."""
    try:
        run.returncode = run.proc.wait(timeout=HANG_LIMIT_S)
    except subprocess.TimeoutExpired:
        os.killpg(run.pgid, signal.SIGKILL)
        run.proc.wait()
        pytest.fail(f"fault_script {' '.join(run.args)} hung for {HANG_LIMIT_S} s:\n{run.log.read_text()[-4000:]}")
    run.exited_at = time.time()
    run.output = run.log.read_text()
    return run


def train(tmp_path: Path, name: str, *args: str, tmpdir: Path | None = None) -> Run:
    """Start a single-process training run checkpointing into ``tmp_path / name``."""
    return start(tmp_path / f"{name}.log", "--mode", "train", "--ckpt-dir", str(tmp_path / name), *args, tmpdir=tmpdir)


def adapter_keys() -> set[str]:
    """The adapter's keys as the LightningModule's state dict names them."""
    probe = la.inject(fault_script.TinyLlamaLM().model, fault_script.CONFIG)
    return {f"model.{k}" for k in la.adapter_state_dict(probe)}


def test_sigkill_mid_checkpoint_write_then_resume_matches_uninterrupted_run(tmp_path):
    # Checkpoints every 3 steps, 8 steps per epoch, 2 epochs. The process is killed halfway through writing the
    # step-12 checkpoint, so the run resumes from step 9: epoch 1, one batch in. ResumableBatches stores its
    # position in the checkpoint, so the resumed process trains on exactly the batches the uninterrupted run
    # trained on after step 9 (a plain DataLoader would restart the epoch and the adapters would differ).
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    # The uninterrupted reference runs in a fresh process too, next to the one that gets killed: a reference
    # computed inside the pytest worker can differ in the last bits (and AdamW grows that to ~1e-4).
    straight = train(tmp_path, "straight", "--out", str(tmp_path / "straight.pt"))
    killed = finish(train(tmp_path, "killed", "--kill-at-step", "12", tmpdir=scratch))
    ckpt_dir = tmp_path / "killed"
    assert killed.returncode == -signal.SIGKILL, killed.output[-4000:]

    # Lightning writes a checkpoint to a temporary file and renames it: the half-written bytes are in that file,
    # and the checkpoint directory holds only whole files from step 9.
    partial = [f for f in scratch.rglob("*") if f.is_file()]
    assert partial, "the kill did not happen during a checkpoint write"
    for f in partial:
        with pytest.raises((OSError, RuntimeError)):  # a cut zip archive
            torch.load(f, weights_only=True)
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["epoch=1-step=9.ckpt", "last.ckpt"]
    keys = adapter_keys()
    for f in ckpt_dir.iterdir():
        ck = torch.load(f, weights_only=True)
        assert ck["global_step"] == 9 and ck["epoch"] == 1, f.name
        assert set(ck["state_dict"]) == keys, f.name  # adapter tensors only
        assert ck["lightning_adapters"]["method"] == "lora"
        assert ck["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 1, "consumed": 1}]  # mid-epoch

    resumed = finish(
        train(tmp_path, "resumed", "--resume", str(ckpt_dir / "last.ckpt"), "--out", str(tmp_path / "resumed.pt"))
    )
    assert resumed.returncode == 0, resumed.output[-4000:]
    assert finish(straight).returncode == 0, straight.output[-4000:]
    got = torch.load(tmp_path / "resumed.pt", weights_only=True)
    want = torch.load(tmp_path / "straight.pt", weights_only=True)
    assert got["global_step"] == want["global_step"] == 16
    assert got["optimizer_steps"] == want["optimizer_steps"] == [16] * len(keys)  # AdamW's own step counts
    assert set(got["adapter"]) == set(want["adapter"])
    for k, v in want["adapter"].items():
        torch.testing.assert_close(got["adapter"][k], v, atol=1e-6, rtol=0, msg=k)


def test_ddp_rank_raising_ends_every_rank_without_hanging(tmp_path):
    run = finish(start(tmp_path / "ddp.log", "--mode", "ddp-fail", "--ckpt-dir", str(tmp_path / "ckpt")))
    assert run.returncode != 0, run.output[-4000:]
    failure = re.search(rf"\[rank1\]: RuntimeError: {fault_script.RANK1_FAILURE} 2 at t=([0-9.]+)", run.output)
    assert failure, run.output[-4000:]
    # Rank 0 was in DDP's gradient all-reduce with rank 1; it fails as soon as rank 1's process is gone instead
    # of waiting for the process group's 30-minute timeout, and the launcher exits with an error.
    rank0 = re.search(r"\[rank0\]: RuntimeError: .*(Connection closed by peer|Connection reset by peer)", run.output)
    assert rank0, run.output[-4000:]
    assert run.exited_at - float(failure.group(1)) < 60
    assert live_members(run.pgid) == []  # no rank outlived the launcher


def live_members(pgid: int) -> list[int]:
    """Processes of group ``pgid`` that are still running (exited ones awaiting their parent's reaping aside)."""
    live = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, pgrp, ...
        except OSError:
            continue  # exited while listing
        if int(fields[2]) == pgid and fields[0] not in "ZX":
            live.append(int(stat.parent.name))
    return live


def files_in(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` (temporary ones included) and its bytes."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _disk_full(path: str | os.PathLike, data: bytes) -> None:
    """Write half of ``data`` to ``path``, then fail as a full disk would."""
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    raise OSError(errno.ENOSPC, "No space left on device (simulated)", str(path))


class _HalfWritingFile:
    """A binary file object whose first write stops halfway with ENOSPC."""

    def __init__(self, f) -> None:
        self._f = f

    def write(self, data: bytes) -> int:
        self._f.write(data[: len(data) // 2])
        self._f.flush()
        raise OSError(errno.ENOSPC, "No space left on device (simulated)")

    def __getattr__(self, name: str):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._f.close()


def _safetensors_disk_full(tensors, filename, metadata=None) -> None:
    from safetensors.torch import save

    _disk_full(filename, save(tensors, metadata=metadata))


def test_failed_lightning_exports_leave_the_previous_export_whole(tmp_path, monkeypatch):
    from transformers import LlamaForCausalLM

    from tests.helpers import randomize_adapter, tiny_llama
    from tests.lightning.models import token_data, trainer

    peft_dir, merged_dir = tmp_path / "peft", tmp_path / "merged"
    model = fault_script.TinyLlamaLM()
    cb = la.AdapterCallback(
        fault_script.CONFIG, module="model", verbose=False, export_peft_dir=peft_dir, export_merged_dir=merged_dir
    )
    trainer(max_steps=2, callbacks=[cb]).fit(model, token_data())
    good_peft, good_merged = files_in(peft_dir), files_in(merged_dir)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(good_peft)
    assert {"config.json", "model.safetensors"} <= set(good_merged)

    randomize_adapter(model.model, seed=1)  # what a later export writes differs from what is on disk
    real_fdopen = os.fdopen
    with monkeypatch.context() as m:
        m.setattr(os, "fdopen", lambda fd, *a, **kw: _HalfWritingFile(real_fdopen(fd, *a, **kw)))
        with pytest.raises(OSError, match="No space left"):
            la.save_peft(model.model, peft_dir)
    assert files_in(peft_dir) == good_peft  # previous files byte for byte, no temporary file left
    with monkeypatch.context() as m:
        m.setattr("transformers.modeling_utils.safe_save_file", _safetensors_disk_full)
        with pytest.raises(OSError, match="No space left"):
            la.export_merged(model.model, merged_dir)
    assert files_in(merged_dir) == good_merged

    # Without a fault the same calls replace the files, and the new exports load.
    la.save_peft(model.model, peft_dir)
    la.export_merged(model.model, merged_dir)
    assert files_in(peft_dir).keys() == good_peft.keys() and files_in(peft_dir) != good_peft
    assert files_in(merged_dir).keys() == good_merged.keys() and files_in(merged_dir) != good_merged
    want = la.adapter_state_dict(model.model)
    torch.manual_seed(0)
    loaded = la.adapter_state_dict(la.load_peft(tiny_llama(), peft_dir))
    assert loaded.keys() == want.keys() and all(torch.equal(loaded[k], want[k]) for k in want)
    ids = torch.arange(16).reshape(2, 8)
    with torch.no_grad():
        torch.testing.assert_close(
            LlamaForCausalLM.from_pretrained(merged_dir).eval()(ids).logits,
            model.model.eval()(ids).logits,
            atol=1e-5,
            rtol=0,
        )


def test_failed_merged_export_of_a_plain_module_leaves_the_previous_file_whole(tmp_path, monkeypatch):
    from tests.helpers import SmallCNN, randomize_adapter

    model = la.inject(SmallCNN(), la.LoRAConfig(r=2, target_modules=["conv1", "fc"]))
    randomize_adapter(model)
    la.export_merged(model, tmp_path)
    good = files_in(tmp_path)
    assert set(good) == {"model.safetensors"}
    randomize_adapter(model, seed=1)
    with monkeypatch.context() as m:
        m.setattr("safetensors.torch.save_file", _safetensors_disk_full)
        with pytest.raises(OSError, match="No space left"):
            la.export_merged(model, tmp_path)
    assert files_in(tmp_path) == good
    la.export_merged(model, tmp_path)
    assert files_in(tmp_path).keys() == good.keys() and files_in(tmp_path) != good
