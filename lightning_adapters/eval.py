"""The evaluation app: ``python -m lightning_adapters.eval ckpt_path=<checkpoint or PEFT directory>``.

It composes ``configs/eval.yaml`` with Hydra, rebuilds the task module a training-app run trained, puts the
trained adapter on it and runs ``Trainer.test`` on the test split:

- ``ckpt_path`` is an adapter-only ``.ckpt`` written by the training app, or the checkpoint directory it writes
  under DeepSpeed (``la.restore_from_checkpoint``: the adapter and the head), or a PEFT export directory
  (``la.load_peft``);
- the model and the data split come from the run that wrote it: the run directory holding ``ckpt_path`` (its
  ``.hydra/config.yaml``), so the test split is the one the run tested on. ``model.*`` and ``data.*`` overrides
  given to the eval app apply on top (e.g. ``data.batch_size=256``); with ``run_dir=null`` the ``model`` and
  ``data`` groups composed here are used instead.

The test metrics are printed by Lightning and written, with where they came from, to ``eval.json`` in the eval
run's directory (``logs/eval/runs/<time>/``).

Examples::

    python -m lightning_adapters.eval ckpt_path=logs/train/runs/<time>/checkpoints/last.ckpt
    python -m lightning_adapters.eval ckpt_path=logs/train/runs/<time>/peft
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from lightning_adapters.app.store import check_trainer, register_configs
from lightning_adapters.errors import AdapterConfigError
from lightning_adapters.lightning.checkpoint import DEEPSPEED_STATES
from lightning_adapters.train import CONFIG_DIR, _instantiate_dict, _json_safe

RUN_CONFIG = Path(".hydra") / "config.yaml"
PEFT_CONFIG = "adapter_config.json"
# Overrides of the eval command that reach the run's own model and data nodes.
RUN_GROUPS = ("model", "data")


def find_run_dir(ckpt_path: str | os.PathLike) -> Path | None:
    """The training-app run directory holding ``ckpt_path`` (the nearest ancestor with ``.hydra/config.yaml``)."""
    path = Path(ckpt_path).resolve()
    for folder in [path, *path.parents]:
        if (folder / RUN_CONFIG).is_file():
            return folder
    return None


def _task_overrides() -> list[Any]:
    """The eval command's overrides (Hydra's parsed form), empty outside a Hydra run."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if not HydraConfig.initialized():
        return []
    return OverridesParser.create().parse_overrides(list(HydraConfig.get().overrides.task))


def run_config(cfg: DictConfig) -> tuple[DictConfig, Path | None]:
    """The config the model and the data are built from, and the run directory it was read from (or ``None``).

    Raises:
        AdapterConfigError: ``run_dir`` is not a training-app run directory, or a ``model=``/``data=`` group choice
            was given together with a run directory (its model must be the trained one).
    """
    choice = cfg.get("run_dir")
    if choice is None:
        return cfg, None
    run_dir = find_run_dir(cfg.ckpt_path) if choice == "auto" else Path(str(choice))
    if run_dir is None:
        return cfg, None
    if not (run_dir / RUN_CONFIG).is_file():
        raise AdapterConfigError(
            f"run_dir={str(run_dir)!r} has no {RUN_CONFIG}; pass the output directory of a training-app run, or "
            "run_dir=null to build the model and data from this command's groups"
        )
    run = OmegaConf.load(run_dir / RUN_CONFIG)
    for override in _task_overrides():
        key = override.key_or_group
        if key in RUN_GROUPS:
            raise AdapterConfigError(
                f"{key}={override.value()} replaces the model or data of the run in {str(run_dir)!r}, which the "
                f"adapter was trained with; set single values ({key}.<name>=...) or pass run_dir=null"
            )
        if key.split(".", 1)[0] in RUN_GROUPS:
            OmegaConf.update(run, key, override.value(), force_add=override.is_add())
    return run, run_dir


def load_adapter(task: Any, ckpt_path: Path, module: str | None, active: Any = None) -> Any:
    """Put the adapter of ``ckpt_path`` (an adapter-only checkpoint, a DeepSpeed checkpoint directory or a PEFT
    directory) on ``task``.

    A PEFT directory of several adapters (the ``default`` one at its root, the others in sub-folders named after
    them, as a run with ``adapter.name``/``adapter.init_from`` exports) loads every one of them; ``active`` (the
    run's ``adapter.active``) says which act, all of them by default, as in training.

    Raises:
        AdapterConfigError: ``ckpt_path`` is neither a file nor a directory with ``adapter_config.json`` (at its root
            or in sub-folders).
    """
    import lightning_adapters as la

    if ckpt_path.is_file() or any((ckpt_path / f).is_file() for f in DEEPSPEED_STATES):
        return la.restore_from_checkpoint(task, ckpt_path)
    target = task.get_submodule(module) if module else task
    names = sorted(p.name for p in ckpt_path.iterdir() if (p / PEFT_CONFIG).is_file()) if ckpt_path.is_dir() else []
    if (ckpt_path / PEFT_CONFIG).is_file():
        la.load_peft(target, ckpt_path)
        if not names:
            return task
        names = ["default", *names]
    if names:
        for name in names[1:] if names[0] == "default" else names:
            la.load_peft(target, ckpt_path, name=name)
        acting = [active] if isinstance(active, str) else list(active) if active else names
        la.set_active(target, acting)
        return task
    raise AdapterConfigError(
        f"ckpt_path={str(ckpt_path)!r} is neither a checkpoint file nor a PEFT directory (no {PEFT_CONFIG}); pass a "
        "run's checkpoints/<name>.ckpt or its peft/ directory"
    )


def _check_export_holds_the_head(task: Any, ckpt_path: Path, module: str | None) -> None:
    """Refuse a PEFT export of a run that adapted only ``module``: what trained beside it (the head) is not in the
    export, only in the run's checkpoints, so the test would run an untrained head.

    Raises:
        AdapterConfigError: Naming the sub-module, what lies beside it and the checkpoints to pass instead.
    """
    if not module or ckpt_path.is_file() or any((ckpt_path / f).is_file() for f in DEEPSPEED_STATES):
        return
    inside = module.strip(".") + "."
    beside = sorted(
        {n.split(".")[0] for n, p in task.named_parameters() if p.requires_grad and not n.startswith(inside)}
    )
    if beside:
        found = sorted(str(p) for p in ckpt_path.parent.glob("checkpoints/*.ckpt"))
        where = f" ({', '.join(found)})" if found else ""
        raise AdapterConfigError(
            f"ckpt_path={str(ckpt_path)!r} is the PEFT export of a run that adapted only {module!r} (adapter.module); "
            f"{beside} trained beside it and are not in the export, so the test would run them untrained. Pass one "
            f"of the run's checkpoints instead{where}: they hold the adapter and {beside}"
        )


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Test the adapter at ``cfg.ckpt_path`` on the test split; return the result (also written to ``eval.json``)."""
    from hydra.utils import instantiate

    check_trainer(cfg.trainer)
    ckpt_path = Path(str(cfg.ckpt_path))
    if not ckpt_path.exists():
        raise AdapterConfigError(f"ckpt_path={str(ckpt_path)!r} does not exist")
    source, run_dir = run_config(cfg)
    module = cfg.get("module")
    if module == "auto":
        module = OmegaConf.select(source, "adapter.module", default=None) if run_dir is not None else None
    with open_dict(source):  # the run's model reads ${objective}; a run config holds its own
        source.objective = source.get("objective", cfg.objective)
    seed = source.get("seed")
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(int(seed))  # the training app seeds torch this way before building the model
        task = instantiate(source.model)
    _check_export_holds_the_head(task, ckpt_path, module)
    active = OmegaConf.select(source, "adapter.active", default=None) if run_dir is not None else None
    load_adapter(task, ckpt_path, module, OmegaConf.to_object(active) if OmegaConf.is_config(active) else active)
    datamodule = instantiate(source.data, tokenizer=task.tokenizer)
    loggers = _instantiate_dict(cfg.get("logger"))
    trainer = instantiate(cfg.trainer, callbacks=_instantiate_dict(cfg.get("callbacks")), logger=loggers or False)
    results = trainer.test(task, datamodule=datamodule)
    metrics = {k: float(v) for k, v in (results[0] if results else {}).items()}
    out_dir = Path(cfg.paths.output_dir)
    result = {
        "ckpt_path": str(ckpt_path),
        "run_dir": str(run_dir) if run_dir is not None else None,
        "test_metrics": metrics,
    }
    if trainer.is_global_zero:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "eval.json").write_text(json.dumps(_json_safe(result), indent=2))
        print(f"test metrics written to {out_dir / 'eval.json'}", flush=True)
    return result


def main() -> None:
    """Console entry point (``lightning-adapters-eval``): register the config schemas, then run Hydra."""
    import hydra

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    register_configs()
    hydra.main(config_path=CONFIG_DIR, config_name="eval", version_base="1.3")(evaluate)()


if __name__ == "__main__":
    main()
