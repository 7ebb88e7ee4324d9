"""Beyond one machine: the SLURM trainer preset, the Hydra launcher presets (submitit, Ray) and the sweep summary
over many job directories and W&B offline runs."""

from __future__ import annotations

import csv
import json
import shutil
import time
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from lightning.pytorch.plugins.environments import SLURMEnvironment

from experiments.collect_sweep import collect, write_outputs
from experiments.wandb_offline import find_runs, read_run
from lightning_adapters.errors import AdapterConfigError
from lightning_adapters.train import build, train
from tests.app.conftest import compose_app, run_app, tiny

# One task of one node, as srun starts it.
SLURM_TASK = {
    "SLURM_NTASKS": "1",
    "SLURM_NTASKS_PER_NODE": "1",
    "SLURM_JOB_NUM_NODES": "1",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "0",
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_NAME": "lightning_adapters",
    "SLURM_NODELIST": "127.0.0.1",
}


def test_slurm_trainer_preset_takes_nodes_and_devices_from_the_allocation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "2")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "4")
    cfg = compose_app(["trainer=slurm"], tmp_path)
    assert (cfg.trainer.num_nodes, cfg.trainer.devices, cfg.trainer.accelerator) == (2, 4, "gpu")
    assert [p._target_ for p in cfg.trainer.plugins] == ["lightning.pytorch.plugins.environments.SLURMEnvironment"]


def test_slurm_trainer_preset_trains_under_lightnings_slurm_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in SLURM_TASK.items():
        monkeypatch.setenv(key, value)
    overrides = [*tiny(accelerator=None), "trainer=slurm", "trainer.accelerator=cpu", "trainer.fast_dev_run=true"]
    cfg = compose_app(overrides, tmp_path)
    job = build(cfg)
    env = job.trainer._accelerator_connector.cluster_environment
    assert isinstance(env, SLURMEnvironment) and env.auto_requeue
    assert (env.global_rank(), env.world_size(), env.main_address) == (0, 1, "127.0.0.1")
    assert train(cfg)["status"] == "ok"


RANK_VARIABLES = ("RANK", "SLURM_PROCID", "NODE_RANK", "GROUP_RANK", "LOCAL_RANK")


def _launch_env(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    for key in RANK_VARIABLES:
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)


@pytest.mark.parametrize(
    ("env", "zero"),
    [
        ({}, True),
        ({"NODE_RANK": "0", "LOCAL_RANK": "0"}, True),
        ({"NODE_RANK": "1", "LOCAL_RANK": "0", "WORLD_SIZE": "2"}, False),  # a second node (Lightning's launch)
        ({"LOCAL_RANK": "1", "WORLD_SIZE": "2"}, False),  # the second process of one node
        ({"GROUP_RANK": "1"}, False),
        ({"SLURM_PROCID": "4"}, False),  # the first task of the second node under trainer=slurm
        ({"SLURM_PROCID": "0", "LOCAL_RANK": "1"}, False),  # Lightning's process for a second device of task 0
        ({"SLURM_PROCID": "0"}, True),
        ({"RANK": "0", "NODE_RANK": "0"}, True),
        ({"RANK": "2", "LOCAL_RANK": "0"}, False),  # torchrun
        ({"RANK": "0", "SLURM_PROCID": "1", "LOCAL_RANK": "0"}, True),  # torchrun's rank 0 on SLURM's second task
    ],
)
def test_global_rank_zero_is_read_from_the_launchers_environment(
    env: dict[str, str], zero: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lightning_adapters.train import _launched_as_global_rank_zero

    _launch_env(monkeypatch, env)
    assert _launched_as_global_rank_zero() is zero


@pytest.mark.parametrize("node", [0, 1])
def test_a_failed_job_writes_its_summary_once_from_global_rank_zero(
    node: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every node of a multi-node job fails alike (here a config error raised while the adapter is injected, before
    any process group exists); only global rank 0 writes the failed job's summary.json."""
    _launch_env(monkeypatch, {"NODE_RANK": str(node), "LOCAL_RANK": "0", "WORLD_SIZE": "2"})
    cfg = compose_app([*tiny(), "method=oft", "method.r=3"], tmp_path)
    with pytest.raises(AdapterConfigError, match="does not divide"):
        train(cfg)
    assert (tmp_path / "summary.json").is_file() is (node == 0)
    if node == 0:
        assert json.loads((tmp_path / "summary.json").read_text())["status"] == "failed"


def test_launcher_presets_set_partition_gpus_time_and_array_parallelism(tmp_path: Path) -> None:
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    cfg = compose_app(["hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu"], tmp_path)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.partition, launcher.gpus_per_node, launcher.tasks_per_node) == ("gpu", 1, 1)
    assert (launcher.timeout_min, launcher.array_parallelism, launcher.signal_delay_s) == (60, 8, 120)
    local = compose_app(["hydra/launcher=submitit_local"], tmp_path).hydra.launcher
    assert local._target_.endswith("submitit_launcher.LocalLauncher") and local.timeout_min == 60
    # The plugin's config is the presets' schema: a misspelt or mistyped launcher value fails while composing.
    for bad in ("hydra.launcher.partion=gpu", "hydra.launcher.timeout_min=soon"):
        with pytest.raises(ConfigCompositionException):
            compose_app(["hydra/launcher=submitit_slurm", bad], tmp_path)


def test_ray_presets_connect_to_a_cluster_or_start_a_local_instance(tmp_path: Path) -> None:
    cluster = compose_app(["hydra/launcher=ray"], tmp_path).hydra.launcher
    assert cluster._target_.endswith("ray_launcher.RayLauncher") and cluster.ray.init.address == "auto"
    local = compose_app(["hydra/launcher=ray_local"], tmp_path).hydra.launcher.ray
    assert (local.init.address, local.init.num_cpus, local.remote.num_cpus, local.remote.num_gpus) == (None, 2, 1, 0)


# Four tiny jobs; OFT with r=3 blocks cannot split the 32 features of the tiny Bert, so exactly one job fails.
SWEEP = [
    "model=tiny_bert",
    "logger=wandb",
    "trainer.accelerator=cpu",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "callbacks.progress_bar.refresh_rate=0",
    "data.batch_size=16",
    "test=false",
    "method=lora,oft",
    "method.r=2,3",
]


def _check_sweep(sweep: Path, proc) -> list[dict]:
    """Every job ran in its own directory; the failed one did not stop the others and is listed with its error."""
    # The multirun ends with the failed job's error, after every job ran.
    assert proc.returncode != 0 and "does not divide in_features=32" in proc.stderr, proc.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in jobs] == ["0", "1", "2", "3"]
    summaries = {p.name: json.loads((p / "summary.json").read_text()) for p in jobs}
    failed = [name for name, s in summaries.items() if s["status"] == "failed"]
    assert len(failed) == 1 and summaries[failed[0]]["method"] == "oft"
    for job in jobs:
        # W&B ran offline inside the job's own directory, one run per job, failed job included.
        runs = list((job / "wandb").glob("offline-run-*"))
        assert len(runs) == 1, job
        if job.name in failed:
            continue
        assert summaries[job.name]["output_dir"] == str(job)
        assert (job / "checkpoints" / "last.ckpt").is_file() and (job / "peft" / "adapter_config.json").is_file()
    rows = collect(sweep)
    assert sorted((r["method"], r["rank"], r["status"]) for r in rows) == [
        ("lora", 2, "ok"),
        ("lora", 3, "ok"),
        ("oft", 2, "ok"),
        ("oft", 3, "failed"),
    ]
    bad = next(r for r in rows if r["status"] == "failed")
    assert (
        "AdapterConfigError" in bad["error"] and "method=oft" in bad["overrides"] and "method.r=3" in bad["overrides"]
    )
    table = write_outputs(sweep)["md"].read_text()
    assert "**1 failed job(s)**" in table and "does not divide" in table
    return rows


@pytest.mark.slow
def test_submitit_local_sweep_runs_every_job_in_its_own_directory_and_lists_the_failed_one(tmp_path: Path) -> None:
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep = tmp_path / "sweep"
    proc = run_app(
        ["-m", "hydra/launcher=submitit_local", *SWEEP, f"hydra.sweep.dir={sweep}"], cwd=tmp_path, timeout=600
    )
    rows = _check_sweep(sweep, proc)
    # submitit's own per-job folders (logs, pickled results) sit apart from the job directories.
    assert len([p for p in (sweep / ".submitit").iterdir() if any(p.glob("*_log.out"))]) == 4

    # Copied back from a cluster without one job's summary.json: that job is read from its W&B offline run, to
    # the same numbers. A folder holding only a job's wandb/ directory counts as a job too.
    copy = tmp_path / "copied" / "sweep"
    shutil.copytree(sweep, copy, ignore=shutil.ignore_patterns(".submitit", "checkpoints", "sweep_table*"))
    (copy / "0" / "summary.json").unlink()
    only_wandb = tmp_path / "copied" / "wandb_only"
    shutil.copytree(sweep / "1" / "wandb", only_wandb / "wandb")
    again = {r["job"]: r for r in collect(copy, only_wandb)}
    original = {r["job"]: r for r in rows}
    assert again["sweep/0"]["source"] == "wandb" and again["sweep/1"]["source"] == "summary.json"
    for key in ("method", "rank", "trainable_params", "trainable_pct", "metric", "value", "step_time_ms", "status"):
        assert again["sweep/0"][key] == pytest.approx(original["0"][key]), key
    assert "method.r=2" in again["sweep/0"]["overrides"]
    (wandb_job,) = [r for name, r in again.items() if name.startswith("wandb_only/")]
    assert wandb_job["source"] == "wandb" and wandb_job["value"] == pytest.approx(original["1"]["value"])
    assert len(again) == 5


@pytest.mark.slow
def test_ray_local_sweep_runs_every_job_in_its_own_directory_and_lists_the_failed_one(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    proc = run_app(["-m", "hydra/launcher=ray_local", *SWEEP, f"hydra.sweep.dir={sweep}"], cwd=tmp_path, timeout=600)
    _check_sweep(sweep, proc)
    assert "Ray Launcher is launching 4 jobs" in proc.stdout + proc.stderr


def test_wandb_sweep_yaml_drives_the_hydra_app_with_overrides_that_compose(tmp_path: Path) -> None:
    import yaml

    from lightning_adapters.train import CONFIG_DIR

    sweep = yaml.safe_load((Path(CONFIG_DIR).parent / "experiments" / "wandb_sweep.yaml").read_text())
    assert sweep["command"][-3:] == ["-m", "lightning_adapters.train", "${args_no_hyphens}"]
    # The metric W&B optimises is one the app puts into the run summary at fit end.
    assert sweep["metric"] == {"name": "best_metric", "goal": "maximize"}
    # Every value W&B can choose is a valid override of the app (the extremes of a range included).
    for name, spec in sweep["parameters"].items():
        for value in spec.get("values", [spec.get("min"), spec.get("max")]):
            cfg = compose_app([f"{name}={value}"], tmp_path)
            assert cfg is not None


def test_offline_run_reader_reads_config_history_summary_and_exit(tmp_path: Path) -> None:
    """A W&B offline run written here (no account, no network) decodes to what was logged."""
    import wandb

    run = wandb.init(mode="offline", dir=tmp_path, config={"optimized_metric": "val/x", "run": {"method": "lora"}})
    for step, value in enumerate([0.1, 0.7, 0.4]):
        run.log({"val/x": value, "params/trainable": 10.0}, step=step)
    run.summary.update({"best_metric": 0.7})
    run.finish(exit_code=3)
    (path,) = find_runs(tmp_path)
    deadline = time.monotonic() + 60
    got = read_run(path)
    while got.exit_code is None and time.monotonic() < deadline:  # W&B's writer may still be flushing the log
        time.sleep(0.5)
        got = read_run(path)
    assert got.config["run"] == {"method": "lora"} and got.exit_code == 3
    assert [h["val/x"] for h in got.history] == [0.1, 0.7, 0.4]
    assert got.best("val/x") == 0.7 and got.best("val/x", "min") == 0.1 and got.summary["best_metric"] == 0.7
    rows = collect(tmp_path)
    assert rows[0]["status"] == "failed" and "exited with code 3" in rows[0]["error"] and rows[0]["value"] == 0.7
    with open(write_outputs(tmp_path)["csv"]) as f:
        assert next(csv.DictReader(f))["source"] == "wandb"
