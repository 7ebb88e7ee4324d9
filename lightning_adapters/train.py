"""The training app: ``python -m lightning_adapters.train [group=option ...] [key=value ...]``.

It composes ``configs/train.yaml`` with Hydra and fine-tunes a model with an adapter method. With no
arguments it trains LoRA on the pretrained all-MiniLM-L6-v2 encoder to predict the human valence rating of
English words and emoticons (the VADER lexicon), on the CPU in a few minutes, offline.

The app builds only user-facing pieces: a LightningDataModule, a LightningModule for the task, the callbacks
and loggers of the config, and ``AdapterCallback(method config)``, which does all the adapter work (injection,
freezing, adapter-only checkpoints, the PEFT export). Each run writes ``summary.json`` (method, rank, trainable
parameters, best metric, step time, peak memory; for a failed job its error line) to its output directory, which
``experiments/collect_sweep.py`` collects across a multirun, and ends by printing where its outputs are and the
lines that load the trained model (``lightning_adapters.app.outputs``).

Examples::

    python -m lightning_adapters.train                                  # the default job
    python -m lightning_adapters.train experiment=frozen_baseline       # same head on the frozen encoder
    python -m lightning_adapters.train method=oft target=all_linear trainer.max_epochs=5
    python -m lightning_adapters.train -m method=lora,loha,lokr,oft,boft,adalora method.r=4,8,16
    python -m lightning_adapters.train hparams_search=lora_optuna
"""

from __future__ import annotations

import dataclasses
import json
import math
import netrc
import os
import time
import warnings
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from lightning_adapters.app.outputs import RunOutputs, quantize_task, report, wandb_description
from lightning_adapters.app.store import RANK_ALIASES, check_trainer, from_schema, register_configs
from lightning_adapters.config import AdapterConfig
from lightning_adapters.core.inject import DEFAULT_NAME
from lightning_adapters.errors import AdapterConfigError
from lightning_adapters.registry import spec_for_config

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")


def method_config(node: DictConfig | None, head: str | None = None) -> AdapterConfig | None:
    """The validated method config dataclass of a composed ``method`` node (``None`` when no method is chosen).

    ``method.r`` is mapped onto the method's own rank-like field where it has no ``r`` (``RANK_ALIASES``), and
    ``head`` is added to ``modules_to_save`` so a new task head is trained and saved with the adapter.

    Raises:
        AdapterConfigError: A key the method's config does not have (e.g. added with ``+method.x=...``), or a
            value the config's own validation refuses.
    """
    if node is None:
        return None
    schema = OmegaConf.get_type(node)
    if schema is None or not dataclasses.is_dataclass(schema):
        raise AdapterConfigError(
            "the method node is not a method schema; choose a preset with method=<name> (configs/method/)"
        )
    known = {f.name for f in dataclasses.fields(schema)}
    unknown = sorted(set(node.keys()) - known)
    if unknown:
        raise AdapterConfigError(f"method keys {unknown} are not fields of {schema.__name__}; known: {sorted(known)}")
    config = from_schema(OmegaConf.to_object(node))
    if head is not None:
        saved = list(config.modules_to_save or [])
        if head not in saved:
            try:
                config = dataclasses.replace(config, modules_to_save=[*saved, head])
            except AdapterConfigError:
                # The method's format cannot save extra modules (Llama-Adapter): the head stays frozen as built.
                warnings.warn(
                    f"{spec_for_config(config).name} cannot train extra modules, so the task head {head!r} stays "
                    "frozen at its initial weights; the adapter learns to steer the features into it",
                    stacklevel=2,
                )
    return config


def rank_of(config: AdapterConfig | None) -> int | None:
    """The rank-like value a sweep varies: ``r``, or the field ``RANK_ALIASES`` maps it to."""
    if config is None:
        return None
    name = spec_for_config(config).name
    value = getattr(config, RANK_ALIASES.get(name, "r"), None)
    return int(value) if isinstance(value, int) else None


def _wandb_configured() -> bool:
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def _json_safe(value: Any) -> Any:
    """Plain JSON: NaN and infinities become null, unknown objects their string."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def _wandb_run(trainer: Any) -> Any:
    """This job's W&B run (started by its ``WandbLogger``), or ``None``."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and trainer.is_global_zero:
            return logger.experiment
    return None


def _finish_active_wandb_run(exit_code: int) -> None:
    """Finish the W&B run this process has open, if any, so the next job of a multirun starts its own.

    Called when a job ends, failed or not: an unfinished run would be picked up by the next job's
    ``WandbLogger``, which then logs into the failed job's run directory.
    """
    import sys

    wandb = sys.modules.get("wandb")  # never imported: no run can be open
    if wandb is not None and wandb.run is not None:
        wandb.run.finish(exit_code=exit_code)


def _instantiate_dict(node: DictConfig | None) -> list[Any]:
    from hydra.utils import instantiate

    if not node:
        return []
    return [instantiate(v) for v in node.values() if v is not None and "_target_" in v]


@dataclasses.dataclass
class Job:
    """Everything a composed config builds, before ``fit``."""

    task: Any
    datamodule: Any
    trainer: Any
    config: AdapterConfig | None


def build(cfg: DictConfig) -> Job:
    """Instantiate the task module, data module, callbacks, loggers and trainer of a composed config.

    The adapter method (``cfg.method``) becomes ``AdapterCallback``, first among the callbacks; the task's head
    is added to its ``modules_to_save``. W&B runs offline unless the user has configured it.
    """
    import lightning.pytorch as L
    from hydra.utils import instantiate

    import lightning_adapters as la
    from lightning_adapters.lightning.sources import stored_config

    check_trainer(cfg.trainer)
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    task = instantiate(cfg.model)
    quantize_task(task, cfg.get("quantization"))
    adapter = OmegaConf.to_container(cfg.get("adapter") or OmegaConf.create({}), resolve=True)
    name = adapter.get("name") or DEFAULT_NAME
    init_from = adapter.get("init_from")
    head = getattr(task, "head_name", None)
    if isinstance(init_from, dict) and set(init_from) - {name} and not adapter.get("module"):
        # The loaded adapters come from runs of the app, which trained the head with them: it stays theirs, frozen.
        head = None
    config = method_config(cfg.get("method"), head=head)
    datamodule = instantiate(cfg.data, tokenizer=task.tokenizer)
    callbacks = _instantiate_dict(cfg.get("callbacks"))
    if config is not None:
        start = init_from if isinstance(init_from, str) else (init_from or {}).get(name)
        if start is not None:
            # The trained adapter is the loaded one and keeps the config it was saved with (not the method group's).
            config = stored_config(name, start)
        callbacks.insert(
            0,
            la.AdapterCallback(
                None if start is not None else config,
                module=adapter.get("module"),
                export_peft_dir=adapter.get("export_peft_dir"),
                name=name,
                init_from=init_from,
                active=adapter.get("active"),
            ),
        )
    logger_cfgs = [v for v in (cfg.get("logger") or {}).values() if v]
    wandb_cfgs = [v for v in logger_cfgs if str(v.get("_target_", "")).endswith("WandbLogger")]
    if wandb_cfgs and not _wandb_configured():
        os.environ["WANDB_MODE"] = "offline"
        # wandb reads the environment once per process (its setup singleton): a process that already touched wandb
        # (an earlier job of an in-process sweep, a notebook) would otherwise still try to log in.
        import wandb

        if wandb.run is None:
            wandb.teardown()
        for v in wandb_cfgs:
            with open_dict(v):
                v.offline = True
    loggers = _instantiate_dict(cfg.get("logger"))
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    return Job(task=task, datamodule=datamodule, trainer=trainer, config=config)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one training job from a composed config; return its summary (also written to ``summary.json``).

    A job that fails still writes ``summary.json`` (``status: "failed"`` and its error line, which
    ``experiments/collect_sweep.py`` lists) and finishes its W&B run before the error propagates.
    """
    started = time.perf_counter()
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        summary = _train(cfg, out_dir, started)
    except BaseException as err:
        first_line = (str(err).strip().splitlines() or [""])[0]
        failed = {
            "status": "failed",
            "error": f"{type(err).__name__}: {first_line}" if first_line else type(err).__name__,
            "method": _method_choice(),
            "rank": OmegaConf.select(cfg, "method.r", default=None),
            "metric": cfg.get("optimized_metric"),
            "wall_s": time.perf_counter() - started,
            "output_dir": str(out_dir),
        }
        if _launched_as_global_rank_zero():
            (out_dir / "summary.json").write_text(json.dumps(_json_safe(failed), indent=2))
        _finish_active_wandb_run(exit_code=1)
        raise
    _finish_active_wandb_run(exit_code=0)
    return summary


def _launched_as_global_rank_zero() -> bool:
    """Whether this process is global rank 0 by what its launcher put in the environment.

    Read from the environment, not the trainer: a job can fail before its trainer or process group exists.
    torchrun, DeepSpeed and Kubeflow set the global ``RANK``. Lightning's own launches set ``NODE_RANK`` (torchelastic
    ``GROUP_RANK``) and ``LOCAL_RANK`` for one process per device, under SLURM each task has its ``SLURM_PROCID``,
    and a process Lightning starts for a further device inherits its task's: global rank 0 is the process all of
    them, where set, put at 0.
    """
    if "RANK" in os.environ:
        return int(os.environ["RANK"]) == 0
    node = os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", "0"))
    ranks = (os.environ.get("SLURM_PROCID", "0"), node, os.environ.get("LOCAL_RANK", "0"))
    return all(int(rank) == 0 for rank in ranks)


def _task_overrides() -> list[str]:
    """The job's command-line overrides (empty outside a Hydra run)."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def _method_choice() -> str | None:
    """The ``method`` option Hydra composed (``None`` outside a Hydra run)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    return HydraConfig.get().runtime.choices.get("method")


def _train(cfg: DictConfig, out_dir: Path, started: float) -> dict[str, Any]:
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_adapters.app.tracking import RunStats

    job = build(cfg)
    trainer = job.trainer
    # Plain resolved containers (never ListConfig/DictConfig) for the loggers; Hydra's own node is not logged.
    plain = OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)
    # What a sweep summary reads back from a W&B run whose summary.json did not come back from a cluster.
    plain["run"] = {
        "method": spec_for_config(job.config).name if job.config is not None else "none",
        "rank": rank_of(job.config),
        "overrides": _task_overrides(),
    }
    for logger in trainer.loggers:
        logger.log_hyperparams(plain)

    trainer.fit(job.task, datamodule=job.datamodule, ckpt_path=cfg.get("ckpt_path"))

    checkpoint = next((c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)), None)
    best = checkpoint.best_model_path if checkpoint is not None else ""
    test_metrics: dict[str, float] = {}
    if cfg.get("test"):
        results = trainer.test(job.task, datamodule=job.datamodule, ckpt_path=best or None, weights_only=False)
        test_metrics = {k: float(v) for k, v in (results[0] if results else {}).items()}

    stats = next((c for c in trainer.callbacks if isinstance(c, RunStats)), None)
    config = job.config
    adapter = cfg.get("adapter") or {}
    peft_dir = adapter.get("export_peft_dir") if config is not None else None
    run = _wandb_run(trainer)
    score = checkpoint.best_model_score if checkpoint is not None else None
    outputs = RunOutputs(
        run_dir=out_dir,
        checkpoint=Path(best) if best and Path(best).exists() else None,  # a directory under DeepSpeed
        monitor=checkpoint.monitor if checkpoint is not None else None,
        best=float(score) if score is not None else None,
        peft_dir=Path(peft_dir) if peft_dir and (Path(peft_dir) / "adapter_config.json").is_file() else None,
        module=adapter.get("module"),
        wandb=wandb_description(run) if run is not None else None,
    )
    summary = {
        "status": "ok",
        "method": spec_for_config(config).name if config is not None else "none",
        "rank": rank_of(config),
        "method_config": config.to_dict() if config is not None else None,
        "frozen_backbone": config is None and bool(cfg.model.get("freeze_backbone")),
        "metric": cfg.get("optimized_metric"),
        **(stats.summary() if stats is not None else {}),
        "test_metrics": test_metrics,
        "wall_s": time.perf_counter() - started,
        "output_dir": str(out_dir),
        "outputs": outputs.as_dict(),
    }
    if trainer.is_global_zero:
        (out_dir / "summary.json").write_text(json.dumps(_json_safe(summary), indent=2))
        if run is not None:
            run.summary.update(test_metrics)
        print("\n" + report(outputs), flush=True)
    return summary


def _hydra_entry(cfg: DictConfig) -> float | None:
    # A launcher plugin (submitit, Ray) runs this in another process, which has not registered the resolvers.
    register_configs()
    summary = train(cfg)
    best = summary.get("best_metric")
    # Optuna maximises or minimises this value; a failed metric must not look like a good one.
    return float(best) if isinstance(best, (int, float)) and math.isfinite(best) else None


def main() -> float | None:
    """Console entry point (``lightning-adapters-train``): register the config schemas, then run Hydra."""
    import hydra

    # Nothing is downloaded unless the user allows it; the default model and data ship in Python packages.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # Lightning 2.6 calls a torch.utils._pytree API that newer torch deprecates, on every fit: nothing a user of
    # the app can act on.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    # configs/hydra/launcher/<name>.yaml tunes the launcher plugin's config of the same name, which Hydra 1.3 uses
    # as its schema (so a wrong key or type still fails at compose time) while warning that this matching by name
    # is deprecated: nothing a user of the app can act on.
    warnings.filterwarnings("ignore", message=r"'hydra/launcher/\w+' is validated against ConfigStore schema")
    register_configs()
    return hydra.main(config_path=CONFIG_DIR, config_name="train", version_base="1.3")(_hydra_entry)()


if __name__ == "__main__":
    main()
