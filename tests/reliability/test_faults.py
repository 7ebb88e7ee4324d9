"""Faults: a training process killed mid-write resumes exactly; a failing DDP rank ends the run everywhere; every
directory writer (``save_peft``, ``export_merged``, the Lightning exports) survives a failure or a crash at each
of its file-system steps with the previous or the new content, never a mix; concurrent saves take turns.

The training runs and the concurrent savers are ``tests/reliability/fault_script.py`` in fresh processes.
"""

from __future__ import annotations

import builtins
import copy
import errno
import functools
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import lightning_adapters as la
from tests.reliability import fault_script, saver_script

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("procs")]

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "reliability" / "fault_script.py"
SAVER = ROOT / "tests" / "reliability" / "saver_script.py"
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


def start(log: Path, *args: str, tmpdir: Path | None = None, script: Path = SCRIPT) -> Run:
    """Start ``script`` (the fault script) in its own session, stdout and stderr going to ``log``."""
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
            [sys.executable, str(script), *args], env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
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


class InjectedFault(OSError):
    """What a patched ``os`` function raises (an I/O error, as a full or failing disk gives)."""


class Faults:
    """Patch file-system functions so that call number ``n`` (counted over all of them) fails.

    ``crash=False``: only that call fails, and the writer's own error handling runs (disk full, EIO).
    ``crash=True``: that call and every later one fail, so no clean-up reaches the disk: what is left is what
    a process killed at that step leaves (``os.close`` is left alone: a dead process's locks are released).
    """

    OS_STEPS = ("open", "write", "fsync", "rename", "replace", "link", "mkdir", "unlink", "rmdir", "chmod")

    def __init__(self, monkeypatch: pytest.MonkeyPatch, n: int, crash: bool) -> None:
        self.n, self.crash, self.calls, self.hit = n, crash, 0, False
        for name in self.OS_STEPS:
            monkeypatch.setattr(os, name, self._wrap(f"os.{name}", getattr(os, name)))
        # Weight files that third-party code writes itself (safetensors' Rust writer, transformers' json dumps).
        import safetensors.torch
        import transformers.modeling_utils

        monkeypatch.setattr(safetensors.torch, "save_file", self._wrap("save_file", safetensors.torch.save_file))
        monkeypatch.setattr(
            transformers.modeling_utils,
            "safe_save_file",
            self._wrap("safe_save_file", transformers.modeling_utils.safe_save_file),
        )
        monkeypatch.setattr(builtins, "open", self._wrap_open(builtins.open))

    def _fail(self, what: str) -> None:
        self.calls += 1
        if self.calls == self.n or (self.crash and self.hit):
            self.hit = True
            raise InjectedFault(errno.EIO, f"injected fault at {what} (call {self.calls})")

    def _wrap(self, what: str, real):
        def call(*args, **kwargs):
            self._fail(what)
            return real(*args, **kwargs)

        return call

    def _wrap_open(self, real):
        def call(file, mode="r", *args, **kwargs):
            if any(c in mode for c in "wax+"):  # only opens for writing are write steps
                self._fail(f"open({file!r}, {mode!r})")
            return real(file, mode, *args, **kwargs)

        return call


def files_in(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` and its bytes."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@dataclass
class WritePath:
    """One directory writer under test: ``write(model, dir)`` and ``outputs(dir)`` (the loaded content's outputs)."""

    write: Callable[[torch.nn.Module, Path], None]
    outputs: Callable[[Path], torch.Tensor]


def _ids() -> torch.Tensor:
    return torch.arange(16).reshape(2, 8)


@functools.cache
def _llama_base() -> torch.nn.Module:
    from tests.helpers import tiny_llama

    torch.manual_seed(0)
    return tiny_llama()


def _peft_outputs(d: Path) -> torch.Tensor:
    with torch.no_grad():
        return la.load_peft(copy.deepcopy(_llama_base()), d)(_ids()).logits


def _merged_llama_outputs(d: Path) -> torch.Tensor:
    from transformers import LlamaForCausalLM

    with torch.no_grad():
        return LlamaForCausalLM.from_pretrained(d).eval()(_ids()).logits


def _merged_cnn_outputs(d: Path) -> torch.Tensor:
    from safetensors.torch import load_model

    from tests.helpers import SmallCNN

    plain = SmallCNN()
    load_model(plain, str(d / "model.safetensors"))
    with torch.no_grad():
        return plain(torch.ones(1, 3, 8, 8))


def _lightning_export(kind: str):
    """Run the end-of-fit export of a fitted ``TinyLlamaLM`` with only the ``kind`` export switched on."""
    from lightning_adapters.lightning.export import export_at_fit_end

    def write(fitted, d: Path) -> None:
        trainer_, module = fitted
        export_at_fit_end(
            trainer_,
            module.model,
            peft_dir=str(d) if kind == "peft" else None,
            merged_dir=str(d) if kind == "merged" else None,
        )

    return write


WRITE_PATHS = {
    "save_peft": WritePath(lambda m, d: la.save_peft(m, d), _peft_outputs),
    "export_merged_transformers": WritePath(lambda m, d: la.export_merged(m, d), _merged_llama_outputs),
    "export_merged_module": WritePath(lambda m, d: la.export_merged(m, d), _merged_cnn_outputs),
    "lightning_peft_export": WritePath(_lightning_export("peft"), _peft_outputs),
    "lightning_merged_export": WritePath(_lightning_export("merged"), _merged_llama_outputs),
}


@functools.cache
def _subject(path: str, seed: int):
    """What ``WRITE_PATHS[path].write`` takes, with adapter values drawn from ``seed`` (built once per test run)."""
    from tests.helpers import SmallCNN, randomize_adapter, tiny_llama

    if path == "export_merged_module":
        torch.manual_seed(0)
        model = la.inject(SmallCNN(), la.LoRAConfig(r=2, target_modules=["conv1", "fc"]))
        randomize_adapter(model, seed=seed)
        return model
    if path.startswith("lightning"):
        return _fitted(seed)
    torch.manual_seed(0)
    # The adapters differ in their config too (alpha), so new weights next to an old config would show.
    model = la.inject(tiny_llama(), la.LoRAConfig(r=2, alpha=2.0 + seed, target_modules=["q_proj", "v_proj"]))
    randomize_adapter(model, seed=seed)
    return model


@functools.cache
def _fitted(seed: int):
    """A ``TinyLlamaLM`` fitted one step with ``AdapterCallback``, its adapter then drawn from ``seed``."""
    from tests.helpers import randomize_adapter
    from tests.lightning.models import token_data, trainer

    module = fault_script.TinyLlamaLM()
    trainer_ = trainer(max_steps=1, callbacks=[la.AdapterCallback(fault_script.CONFIG, module="model", verbose=False)])
    trainer_.fit(module, token_data(n=4))
    randomize_adapter(module.model, seed=seed)
    return trainer_, module


# The Lightning exports run the same writers as save_peft / export_merged: there a crash at each step suffices.
CASES = [(p, c) for p in WRITE_PATHS for c in (False, True) if c or not p.startswith("lightning")]


@pytest.mark.parametrize(("path", "crash"), CASES, ids=[f"{p}-{'crash' if c else 'error'}" for p, c in CASES])
def test_a_fault_at_any_write_step_leaves_the_old_or_the_new_content(path, crash, tmp_path, monkeypatch):
    """Fail the N-th file-system step of a write for N = 1, 2, ... until a write gets through.

    After every fault the directory holds exactly the previous export's files or exactly the new one's (plus
    a file of the user's that every write keeps), loads, and gives the outputs of that export; the next write
    (no fault) recovers whatever a crash left and leaves no temporary file next to the directory.
    """
    spec = WRITE_PATHS[path]
    old_subject, new_subject = _subject(path, seed=1), _subject(path, seed=2)
    ref_old, ref_new = tmp_path / "ref-old", tmp_path / "ref-new"
    spec.write(old_subject, ref_old)
    spec.write(new_subject, ref_new)
    old_files, new_files = files_in(ref_old), files_in(ref_new)
    assert old_files.keys() == new_files.keys() and old_files != new_files
    old_out, new_out = spec.outputs(ref_old), spec.outputs(ref_new)
    assert not torch.equal(old_out, new_out)

    parent = tmp_path / "out"
    target = parent / "adapter"
    n, outcomes = 0, {"old": 0, "new": 0}
    while True:
        n += 1
        spec.write(old_subject, target)
        (target / "NOTES.txt").write_text("the user's own file")
        with monkeypatch.context() as m:
            faults = Faults(m, n, crash)
            try:
                spec.write(new_subject, target)
            except InjectedFault:
                pass
        if not faults.hit:
            break
        # Only this library's loader knows the crash-between-renames fallback; PEFT and transformers read
        # ``target`` itself, so it is checked as those readers see it (``readable_directory`` is the same path
        # except in that one window).
        from lightning_adapters.core.files import readable_directory

        seen = readable_directory(target)
        on_disk = files_in(seen)
        assert on_disk.pop("NOTES.txt") == b"the user's own file", n
        state = "old" if on_disk == old_files else "new" if on_disk == new_files else None
        assert state is not None, f"fault {n}: a mix of files {sorted(on_disk)}"
        outcomes[state] += 1
        # Equal bytes load equally, so loading is checked the first time each state is seen, and whenever a crash
        # left only the backup (this library's loader reads it; PEFT and transformers would find no directory).
        peft = path in ("save_peft", "lightning_peft_export")
        if (seen == target and outcomes[state] == 1) or (seen != target and peft):
            assert torch.equal(spec.outputs(target), old_out if state == "old" else new_out), n
    assert n > 10 and outcomes["old"] > 0, (n, outcomes)  # every step of the write was failed once
    assert files_in(target) == {**new_files, "NOTES.txt": b"the user's own file"}
    assert torch.equal(spec.outputs(target), new_out)
    assert sorted(p.name for p in parent.iterdir()) == [".adapter.lock", "adapter"]  # nothing left over


def _equal_states(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _which_saved(directory: Path, saved: dict[tuple[int, int], dict[str, torch.Tensor]]) -> tuple[int, int]:
    """Load ``directory`` and return the (saver, save) whose adapter it holds; anything else fails the test."""
    loaded = la.adapter_state_dict(la.load_peft(copy.deepcopy(saver_script.base()), directory))
    hits = [key for key, state in saved.items() if _equal_states(loaded, state)]
    assert len(hits) == 1, f"{directory} holds none of the saved adapters (keys {sorted(loaded)[:2]} ...)"
    return hits[0]


def test_two_processes_saving_to_one_directory_take_turns(tmp_path):
    """2 processes x 20 saves of different adapters into one directory, with loads running all along."""
    target = tmp_path / "adapter"
    n = saver_script.SAVES
    savers = [start(tmp_path / f"saver{s}.log", str(target), str(s), script=SAVER) for s in (0, 1)]
    saved = {(s, i): la.adapter_state_dict(saver_script.saved_adapter(s, i)) for s in (0, 1) for i in range(n)}
    deadline = time.time() + HANG_LIMIT_S
    while not all(Path(f"{target}.ready-{s}").exists() for s in (0, 1)):
        assert time.time() < deadline and all(r.proc.poll() is None for r in savers), [
            r.log.read_text() for r in savers
        ]
        time.sleep(0.05)
    Path(f"{target}.go").touch()
    seen = []
    while any(r.proc.poll() is None for r in savers):
        if target.exists():
            seen.append(_which_saved(target, saved))
        time.sleep(0.005)  # leaves the savers room to take the lock
    for run in savers:
        assert finish(run).returncode == 0, run.output[-4000:]
    final = _which_saved(target, saved)
    assert final in {(0, n - 1), (1, n - 1)}  # the last save of one of the two
    assert seen, "no load overlapped the saves"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [".adapter.lock"]


def test_threads_saving_to_one_directory_take_turns(tmp_path):
    """The lock holds between threads of one process too (a flock per open file, not per process)."""
    import threading

    target = tmp_path / "adapter"
    models = {(s, i): saver_script.saved_adapter(s, i) for s in (0, 1) for i in range(4)}
    saved = {key: la.adapter_state_dict(m) for key, m in models.items()}
    errors: list[BaseException] = []

    def saver(s: int) -> None:
        try:
            for i in range(4):
                la.save_peft(models[(s, i)], target)
        except BaseException as err:  # noqa: BLE001 - reported by the assertion below
            errors.append(err)

    threads = [threading.Thread(target=saver, args=(s,)) for s in (0, 1)]
    for t in threads:
        t.start()
    seen = []
    while any(t.is_alive() for t in threads):
        if target.exists():
            seen.append(_which_saved(target, saved))
    for t in threads:
        t.join()
    assert not errors, errors
    assert _which_saved(target, saved) in {(0, 3), (1, 3)}


def test_lightning_exports_refuse_non_finite_weights_and_keep_the_previous_exports(tmp_path):
    from lightning_adapters.lightning.export import export_at_fit_end

    trainer_, module = _fitted(seed=3)
    export_at_fit_end(trainer_, module.model, peft_dir=str(tmp_path / "peft"))
    good = files_in(tmp_path)
    state = la.adapter_state_dict(module.model)
    key = next(iter(state))
    kept = state[key].clone()
    with torch.no_grad():
        state[key][0, 0] = float("inf")  # a diverged step
    try:
        with pytest.raises(la.AdapterStateError, match=r"save_peft: tensor .* holds 1 non-finite values"):
            export_at_fit_end(trainer_, module.model, peft_dir=str(tmp_path / "peft"))
        assert files_in(tmp_path) == good
        with pytest.raises(la.AdapterError, match=r"non-finite"):
            export_at_fit_end(trainer_, module.model, merged_dir=str(tmp_path / "m"))
        assert files_in(tmp_path) == good and not (tmp_path / "m").exists()
    finally:
        with torch.no_grad():
            state[key].copy_(kept)


def test_export_merged_refuses_a_merge_that_overflows_a_half_precision_base(tmp_path):
    """W + ΔW within fp32 but beyond fp16's 65504: the export checks the tensors it would write (in fp16)."""
    from tests.helpers import Wrap

    model = Wrap(torch.nn.Linear(4, 4, bias=False)).half()
    with torch.no_grad():
        model.layer.weight.fill_(6.0e4)
    la.inject(model, la.LoRAConfig(r=1, alpha=1.0, target_modules=["layer"]))
    la.export_merged(model, tmp_path / "out")  # ΔW = 0 at init: a good export
    good = files_in(tmp_path)
    with torch.no_grad():
        model.layer.adapter.default.lora_A.fill_(100.0)
        model.layer.adapter.default.lora_B.fill_(100.0)  # ΔW = 1e4 everywhere
    with pytest.raises(la.AdapterError, match=r"non-finite"):
        la.export_merged(model, tmp_path / "out")
    assert files_in(tmp_path) == good
    la.export_merged(model, tmp_path / "unsafe", safe=False)  # asked for: written as it is
    from safetensors.torch import load_file

    assert torch.isinf(load_file(tmp_path / "unsafe" / "model.safetensors")["layer.weight"]).all()


def test_a_saver_killed_between_its_renames_releases_the_lock_and_the_next_save_recovers(tmp_path):
    """A real SIGKILL inside ``save_peft``, with the old adapter moved aside and the new one not yet in place:
    the loader reads the old adapter, and a save from another process neither waits for the dead one's lock nor
    keeps its leftovers. (Every other step is crashed in-process by ``Faults(crash=True)`` above.)"""
    target = tmp_path / "adapter"
    run = finish(start(tmp_path / "killed.log", str(target), "0", "--kill-at-rename", "1", script=SAVER))
    assert run.returncode == -signal.SIGKILL, run.output[-4000:]
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".adapter."))
    assert not target.exists()
    assert (
        leftovers[0] == ".adapter.lock"
        and leftovers[1].startswith(".adapter.new-")
        and leftovers[2:] == [".adapter.old"]
    )
    saved = {(0, i): la.adapter_state_dict(saver_script.saved_adapter(0, i)) for i in range(3)}
    assert _which_saved(target, saved) == (0, 0)
    la.save_peft(saver_script.saved_adapter(0, 2), target)  # would block forever if the lock were still held
    assert _which_saved(target, saved) == (0, 2)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [".adapter.lock"]
