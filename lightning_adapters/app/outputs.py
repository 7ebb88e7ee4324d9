"""What a training-app run leaves behind, and how to get its model back.

``load_task(run_dir)`` rebuilds the run's task module (backbone, pooling, head) with the base weights it started
from, from the config Hydra saved in ``<run dir>/.hydra/config.yaml``; the trained adapter then goes on with
``la.restore_from_checkpoint`` (a checkpoint) or ``la.load_peft`` / PEFT's ``PeftModel.from_pretrained`` (the
PEFT export, whose keys are those of the task module). ``report`` is the block the app prints when a run ends:
where everything is and the exact lines that load it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf


def quantize_task(task: Any, node: DictConfig | None) -> None:
    """Quantize the task's ``quantization.module`` (the backbone) as the ``quantization`` group says (``scheme: null``:
    leave it in full precision)."""
    import lightning_adapters as la

    if not node or node.get("scheme") is None:
        return
    opts = OmegaConf.to_container(node, resolve=True)
    module = opts.pop("module", None)
    scheme = opts.pop("scheme")
    la.quantize(task.get_submodule(module) if module else task, scheme, **opts)


def load_task(run_dir: str | os.PathLike) -> Any:
    """The task module of a training-app run, built as the run built it, before any training (its backbone
    quantized as the run's ``quantization`` group says).

    The module is built from ``<run_dir>/.hydra/config.yaml`` with the run's seed, so a part the adapter does
    not save (the head under Llama-Adapter, which cannot save extra modules) gets the same initial weights.
    The global random state is left as it was.

    Args:
        run_dir: A run's output directory (``logs/train/runs/<time>`` or one job of a multirun).

    Returns:
        The ``LightningModule`` of the run's ``model`` group (e.g. ``TextRegressor``), with its tokenizer as
        ``.tokenizer``; pass it to ``la.restore_from_checkpoint`` or ``la.load_peft``.

    Raises:
        FileNotFoundError: ``run_dir`` has no ``.hydra/config.yaml`` (not a training-app run directory).
    """
    from hydra.utils import instantiate

    from lightning_adapters.app.store import register_configs

    path = Path(run_dir) / ".hydra" / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist; pass the output directory of a training-app run")
    register_configs()  # the resolvers the saved config uses (${minilm_dir:}, ...)
    cfg = OmegaConf.load(path)
    with torch.random.fork_rng(devices=[]):
        if cfg.get("seed") is not None:
            torch.manual_seed(int(cfg.seed))  # the app seeds torch this way before building the model
        task = instantiate(cfg.model)
    quantize_task(task, cfg.get("quantization"))  # a QLoRA run trained on its quantized backbone
    return task


@dataclass
class RunOutputs:
    """Where a finished run's outputs are (``None``: not written by this run)."""

    run_dir: Path
    checkpoint: Path | None = None
    monitor: str | None = None
    best: float | None = None
    peft_dir: Path | None = None
    module: str | None = None
    wandb: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """Plain strings and numbers, for ``summary.json``."""
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}


def _shown(path: Path) -> str:
    """``path`` relative to the working directory when it lies below it (shorter to read and to paste)."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _size(path: Path) -> str:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    mb = sum(p.stat().st_size for p in files) / 1e6
    return f"{mb:.2f} MB" if mb < 10 else f"{mb:.0f} MB"


def _in_run(path: Path, run_dir: Path) -> str:
    """A Python expression for ``path``: ``f"{run}/..."`` when it lies in the run directory, else the literal."""
    try:
        return 'f"{run}/' + path.resolve().relative_to(run_dir.resolve()).as_posix() + '"'
    except ValueError:
        return repr(str(path))


def load_lines(out: RunOutputs) -> list[str]:
    """The Python lines that load this run's trained model: from the checkpoint, the PEFT export, and with PEFT.

    ``run`` is the run directory, ``load_task(run)`` the run's task module before training. The PEFT export's keys
    are those of the module the adapter was injected into: the task module, or its ``adapter.module`` sub-module.
    """
    if out.checkpoint is None and out.peft_dir is None:
        return []
    lines = ["import lightning_adapters as la", "from lightning_adapters.app import load_task"]
    lines.append(f"run = {_shown(out.run_dir)!r}".replace("'", '"'))
    if out.checkpoint is not None:
        lines.append(f"model = la.restore_from_checkpoint(load_task(run), {_in_run(out.checkpoint, out.run_dir)})")
    if out.peft_dir is not None:
        base = "load_task(run)" + (f".{out.module}" if out.module else "")
        peft = _in_run(out.peft_dir, out.run_dir)
        lines.append(f"model = la.load_peft({base}, {peft})")
        lines.append(f"from peft import PeftModel; model = PeftModel.from_pretrained({base}, {peft})")
    return lines


def report(out: RunOutputs) -> str:
    """The short block the app prints at the end of a run."""
    rows = [("run directory", _shown(out.run_dir))]
    if out.checkpoint is not None:
        best = f", {out.monitor} {out.best:.4f}" if out.monitor and out.best is not None else ""
        rows.append(("best checkpoint", f"{_shown(out.checkpoint)} ({_size(out.checkpoint)}{best})"))
    else:
        rows.append(("best checkpoint", "none written (checkpointing off, or fast_dev_run)"))
    if out.peft_dir is not None:
        rows.append(("PEFT export", f"{_shown(out.peft_dir)} ({_size(out.peft_dir)})"))
    if out.wandb is not None:
        rows.append(("W&B run", out.wandb))
    width = max(len(k) for k, _ in rows)
    text = [f"{k:<{width}}  {v}" for k, v in rows]
    loads = load_lines(out)
    if loads:
        text.append("load the trained model in Python (checkpoint, PEFT export, or PEFT itself):")
        text += [f"    {line}" for line in loads]
    return "\n".join(text)


def wandb_description(run: Any) -> str:
    """How to find a W&B run: its URL, or its offline directory and the command that uploads it."""
    if not getattr(run, "offline", False) and getattr(run, "url", None):
        return str(run.url)
    offline_dir = Path(run.dir).parent  # run.dir is <...>/wandb/offline-run-<time>-<id>/files
    return f"offline, upload it with: wandb sync {_shown(offline_dir)}"
