"""The training app runs: every method, every option of every group, DDP, FSDP2, a multirun, Optuna, W&B."""

from __future__ import annotations

import csv
import json
import socket
import struct
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from experiments.collect_sweep import write_outputs
from lightning_adapters.registry import available_methods
from lightning_adapters.train import CONFIG_DIR, build, train
from tests.app.conftest import compose_app, run_app, tiny
from tests.app.test_configs import extra_overrides

FAST_DEV = [*tiny(), "trainer.fast_dev_run=true"]


def method_overrides(method: str) -> list[str]:
    """Per-method settings for a run of a couple of steps (AdaLoRA's preset runs as is: too short a run trains
    without rank reallocation)."""
    if method == "llama_adapter":
        return ["model=tiny_llama"]
    return []


def check_peft_export(out: Path, method: str) -> None:
    config = json.loads((out / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == {"adalora": "ADALORA", "llama_adapter": "ADAPTION_PROMPT"}.get(method, method.upper())
    assert (out / "peft" / "adapter_model.safetensors").stat().st_size > 0


@pytest.mark.parametrize("method", ["lora", "loha", "lokr", "oft", "boft", "adalora", "llama_adapter"])
def test_fast_dev_run_every_method(method: str, tmp_path: Path) -> None:
    if method not in available_methods():
        pytest.skip(f"method {method!r} is not registered in this checkout")
    cfg = compose_app([*FAST_DEV, f"method={method}", *method_overrides(method)], tmp_path)
    summary = train(cfg)
    assert summary["method"] == method
    assert 0 < summary["params/trainable"] < summary["params/total"]
    assert set(summary["test_metrics"]) >= {"test/pearson", "test/mae"}
    check_peft_export(tmp_path, method)
    assert json.loads((tmp_path / "summary.json").read_text())["method"] == method


OWN_TESTS = {("strategy", "ddp"), ("strategy", "fsdp"), ("strategy", "fsdp2"), ("hparams_search", "lora_optuna")}
OWN_TESTS |= {("strategy", "deepspeed_zero2"), ("strategy", "deepspeed_zero3")}  # tests/lightning/test_deepspeed.py
OWN_TESTS |= {("logger", "wandb"), ("trainer", "slurm")}  # trainer=slurm: tests/app/test_cluster.py
OPTIONS = [
    (g.name, f.stem)
    for g in sorted(Path(CONFIG_DIR).iterdir())
    if g.is_dir() and g.name not in ("method", "hydra", "paths")
    for f in sorted(g.glob("*.yaml"))
    if (g.name, f.stem) not in OWN_TESTS
]


def plan(group: str, option: str) -> tuple[bool, list[str]]:
    """Whether the option is fitted (``fast_dev_run``) or only instantiated, and the overrides to use.

    Options that change what trains (target, model, data, precision, strategy, experiment) are fitted; the
    others (loggers, callbacks, trainer presets) are instantiated into a Trainer with everything else.
    """
    # torchao's NF4 quantizes whole groups of 256 blocks of 64 weights: tiny_bert's layers are too small for it, so
    # it quantizes the default encoder (instantiated only: its training is in tests/quant).
    models = {("target", "conv"): "text_cnn", ("experiment", "conv_lora"): None, ("quantization", "torchao_nf4"): None}
    model = models.get((group, option), "tiny_bert")
    if group == "model" or (group, option) == ("experiment", "llama_adapter_smoke"):
        model = None
    extra = ["target=conv"] if (group, option) == ("model", "text_cnn") else []
    overrides = tiny(
        model=model,
        logger=None if group == "logger" else "none",
        progress_bar=group != "callbacks",
        accelerator=None if group == "trainer" else "cpu",
    )
    # model=hf loads the same pretrained encoder as model=minilm, which is fitted: instantiating it is enough.
    fit = group not in ("logger", "callbacks", "trainer") and (group, option) not in (
        ("model", "hf"),
        ("quantization", "torchao_nf4"),
    )
    # The debug presets set their own run length (fast_dev_run would stop debug=overfit before it validates).
    dev_run = [] if group == "debug" else ["trainer.fast_dev_run=true"]
    return fit, [*overrides, *dev_run, *extra]


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_is_instantiated(group: str, option: str, tmp_path: Path) -> None:
    if (group, option) == ("trainer", "gpu") and not torch.cuda.is_available():
        pytest.skip("trainer=gpu needs CUDA")
    fit, overrides = plan(group, option)
    cfg = compose_app([*overrides, f"{group}={option}", *extra_overrides(group, option, tmp_path)], tmp_path)
    if fit:
        summary = train(cfg)
        assert summary["params/trainable"] > 0
        assert summary["last_metrics"], "validation produced no metric"
    else:
        job = build(cfg)
        assert job.trainer is not None and job.task is not None


@pytest.mark.slow
def test_frozen_baseline_trains_the_head_only(tmp_path: Path) -> None:
    cfg = compose_app([*tiny(), "experiment=frozen_baseline", "trainer.max_steps=3"], tmp_path)
    job = build(cfg)
    before = {k: v.clone() for k, v in job.task.backbone.state_dict().items()}
    head = job.task.head.weight.detach().clone()
    job.trainer.fit(job.task, datamodule=job.datamodule)
    assert all(torch.equal(before[k], v) for k, v in job.task.backbone.state_dict().items())
    assert not torch.equal(head, job.task.head.weight)
    assert job.config is None and all(not p.requires_grad for p in job.task.backbone.parameters())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _short(tmp_path: Path | None, logger: str = "csv") -> list[str]:
    """Command-line overrides for a few CPU steps on the tiny Bert (``tmp_path``: the single run's directory)."""
    return [
        "model=tiny_bert",
        f"logger={logger}",
        "trainer.accelerator=cpu",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=3",
        "trainer.limit_val_batches=2",
        "trainer.limit_test_batches=1",
        "callbacks.progress_bar.refresh_rate=0",
        "data.batch_size=16",
    ] + ([f"hydra.run.dir={tmp_path}"] if tmp_path is not None else [])


def _adapter_only(ckpt_path: Path) -> dict[str, Any]:
    state = torch.load(ckpt_path, map_location="cpu", weights_only=False)["state_dict"]
    assert state, "empty checkpoint state"
    base = [k for k in state if ".adapter." not in k and not k.startswith("head.")]
    assert not base, f"base tensors in {ckpt_path.name}: {base[:3]}"
    return state


@pytest.mark.slow
@pytest.mark.xdist_group("procs")
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_cpu_processes(strategy: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    proc = run_app([*_short(tmp_path), f"strategy={strategy}", "trainer.devices=2"], cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["method"] == "lora" and summary["best_metric"] is not None
    for ckpt in (tmp_path / "checkpoints").glob("*.ckpt"):
        state = _adapter_only(ckpt)
        lora_a = state["backbone.encoder.layer.0.attention.self.query.adapter.default.lora_A"]
        assert lora_a.shape == (8, 32)  # the full tensor, not one rank's shard
    check_peft_export(tmp_path, "lora")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FSDP1 (FSDPStrategy) runs on GPUs only")
def test_fsdp_on_gpu(tmp_path: Path) -> None:
    overrides = [*tiny(accelerator=None), "strategy=fsdp", "trainer.devices=1", "trainer.max_steps=3"]
    summary = train(compose_app(overrides, tmp_path))
    assert summary["params/trainable"] > 0 and summary["best_metric"] is not None
    ckpts = list((tmp_path / "checkpoints").glob("*.ckpt"))
    assert ckpts
    for ckpt in ckpts:
        _adapter_only(ckpt)
    check_peft_export(tmp_path, "lora")


def test_fsdp_preset_instantiates_without_gpu(tmp_path: Path) -> None:
    from hydra.utils import instantiate
    from lightning.pytorch.strategies import FSDPStrategy

    cfg = compose_app(["strategy=fsdp"], tmp_path)
    assert isinstance(instantiate(cfg.trainer.strategy), FSDPStrategy)
    assert cfg.trainer.accelerator == "gpu"


@pytest.mark.slow
def test_multirun_two_methods_two_ranks_and_summary(tmp_path: Path) -> None:
    second = next(m for m in ("loha", "lokr", "oft", "adalora") if m in available_methods())
    sweep = tmp_path / "sweep"
    args = ["-m", *_short(None, logger="none")]
    args += [f"method=lora,{second}", "method.r=2,4", f"hydra.sweep.dir={sweep}", "test=false"]
    if second == "adalora":
        args += ["method.tinit=0", "method.tfinal=0"]
    proc = run_app(args, cwd=tmp_path, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    paths = write_outputs(sweep)
    rows = list(csv.DictReader(paths["csv"].open()))
    assert sorted((r["method"], int(r["rank"])) for r in rows) == sorted(
        (m, r) for m in ("lora", second) for r in (2, 4)
    )
    lora = {int(r["rank"]): int(r["trainable_params"]) for r in rows if r["method"] == "lora"}
    assert lora[4] > lora[2]  # the rank reached the adapter
    assert all(r["value"] and float(r["step_time_ms"]) > 0 and float(r["peak_mem_mb"]) > 0 for r in rows)
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| lora | 2 |" in paths["md"].read_text()


@pytest.mark.slow
def test_optuna_hparams_search(tmp_path: Path) -> None:
    sweep = tmp_path / "optuna"
    args = [*_short(None, logger="none"), "hparams_search=lora_optuna", f"hydra.sweep.dir={sweep}"]
    args += ["hydra.sweeper.n_trials=2", "hydra.sweeper.sampler.n_startup_trials=2"]
    proc = run_app(args, cwd=tmp_path, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert result["name"] == "optuna" and set(result["best_params"]) >= {"method.r", "model.optimizer.lr"}
    assert -1.0 <= result["best_value"] <= 1.0  # a Pearson correlation
    assert len(list(sweep.rglob("summary.json"))) == 2


# --- W&B ------------------------------------------------------------------------------------------------------


def read_wandb_records(path: Path) -> list[Any]:
    """Records of a ``.wandb`` transaction log (LevelDB log format: 32 KiB blocks of checksummed chunks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    block, pos, chunks, records = 32768, 7, b"", []  # 7-byte file header ":W&B" + magic + version
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        if pos + 7 + length > len(data):
            break  # the writer is still appending this chunk: read only the records before it
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        chunks = chunk if kind in (1, 2) else chunks + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(chunks)
            records.append(rec)
    return records


@pytest.mark.slow
def test_wandb_offline_run_holds_config_metrics_and_adapter_artifact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import wandb

    monkeypatch.delenv("WANDB_MODE", raising=False)
    wandb.setup()  # wandb already set up in this process, unconfigured (an earlier job, a notebook): still offline
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc login
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "")  # not configured: the app must switch W&B offline by itself
    wide = ["model.backbone.hidden_size=128", "model.backbone.intermediate_size=256"]
    overrides = [*tiny(logger="wandb"), *wide, "trainer.limit_train_batches=4", "trainer.limit_val_batches=2"]
    cfg = compose_app(overrides, tmp_path)
    summary = train(cfg)

    run_files = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(run_files) == 1
    # wandb's writer process may still be flushing the log after run.finish() returns: wait for its exit record.
    deadline = time.monotonic() + 60
    records = read_wandb_records(run_files[0])
    while not any(r.HasField("exit") for r in records) and time.monotonic() < deadline:
        time.sleep(0.5)
        records = read_wandb_records(run_files[0])
    config = {u.key: json.loads(u.value_json) for r in records if r.HasField("config") for u in r.config.update}
    assert config["method"]["r"] == 8 and config["model"]["backbone"]["hidden_size"] == 128
    assert isinstance(config["method"]["target_modules"], list)  # plain containers, resolved
    items = [i for r in records if r.HasField("history") for i in r.history.item]
    history = {i.nested_key[0] if i.nested_key else i.key for i in items}
    assert {"val/pearson", "val/mae", "train/loss", "params/trainable", "perf/step_time_ms"} <= history
    arts = [r.artifact for r in records if r.HasField("artifact")]
    assert len(arts) == 1 and arts[0].type == "model" and {"best", "latest"} <= set(arts[0].aliases)
    entries = {e.path: e for e in arts[0].manifest.contents}
    assert "best.ckpt" in entries and "peft/adapter_model.safetensors" in entries

    # Size: the adapter (+ its Adam moments and Lightning's metadata), nowhere near the frozen base.
    adapter_bytes = 4 * summary["params/trainable"]
    base_bytes = 4 * (summary["params/total"] - summary["params/trainable"])
    size = entries["best.ckpt"].size
    assert size < 3 * adapter_bytes + 96 * 1024, (size, adapter_bytes)
    assert size < base_bytes / 5, (size, base_bytes)
    assert entries["peft/adapter_model.safetensors"].size < adapter_bytes + 4096
    staged = Path(entries["best.ckpt"].local_path)
    assert staged.is_file() and staged.stat().st_size == size
    _adapter_only(staged)
