"""AdaLoRA driven by the Lightning loop: importance after every optimizer step, reallocation, regulariser, state.

``AdapterCallback``/``AdapterMixin`` create one ``AdaLoRATrainingHooks`` per fit (it is the AdaLoRA spec's
``training_hooks``) and call it:

- ``setup``: resolves the schedule length (``trainer.estimated_stepping_batches`` in step mode,
  ``trainer.max_epochs`` in epoch mode, when ``total_step`` is None); a run too short for ``tinit + tfinal``
  (``fast_dev_run``, a one-epoch smoke test) trains without reallocation, with a one-line warning;
- ``loss_term``: ``orth_reg_weight · R_orth``, added to every training loss by the integration;
- ``on_optimizer_step_end`` (after ``optimizer.step()``, before ``zero_grad``, once per *optimizer* step, so
  gradient accumulation is counted right): importance update and, in step mode, PEFT's masking schedule;
- ``on_train_epoch_end``: in epoch mode the one reallocation of the epoch; in both modes the rank history
  (a table and a heatmap of layers × reallocations) goes to the trainer's loggers;
- ``state_dict``/``load_state_dict``: EMAs, masks, counters and history, so a resumed run continues exactly.

Under ``torch.distributed`` every rank masks with rank 0's scores, so all ranks keep identical masks.
"""

from __future__ import annotations

import csv
import math
import os
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_adapters.errors import AdapterConfigError, AdapterStateError
from lightning_adapters.lightning.hooks import MethodTrainingHooks


def _method():
    # Imported on use: methods/adalora.py imports this module to register the hooks class.
    from lightning_adapters.methods import adalora

    return adalora


class AdaLoRATrainingHooks(MethodTrainingHooks):
    """Per-fit AdaLoRA driver (see the module docstring for the call protocol).

    Args:
        model: The module ``inject`` was called on with an ``AdaLoRAConfig``.
        config: That config.

    Attributes:
        allocator: The ``RankAllocator`` (created by ``setup``).
        history: One entry per reallocation: ``{"t", "global_step", "budget", "ranks"}`` (``ranks`` in the
            order of ``names``).
        names: Module names of the adapted matrices.
    """

    def __init__(self, model: nn.Module, config: Any) -> None:
        super().__init__(model, config)
        self.names = list(_method().adalora_layers(model))
        if not self.names:
            raise AdapterConfigError("adalora: the model has no AdaLoRA layers; inject an AdaLoRAConfig first")
        self.allocator = None
        self.reallocate = True
        self.history: list[dict[str, Any]] = []
        self.last_epoch = 0
        self._logged = 0
        self._pending: dict[str, Any] | None = None

    # --- setup ---------------------------------------------------------------------------------------------

    def resolve_total(self, trainer: Any) -> int:
        """The schedule length: ``config.total_step``, else taken from the trainer."""
        cfg = self.config
        if cfg.total_step is not None:
            return int(cfg.total_step)
        if cfg.schedule == "step":
            est = trainer.estimated_stepping_batches
            if est is None or not math.isfinite(est):
                raise AdapterConfigError(
                    "adalora: total_step=None but the trainer's number of optimizer steps is unbounded; "
                    "set Trainer(max_epochs=...) or max_steps, or AdaLoRAConfig.total_step"
                )
            return int(est)
        epochs = trainer.max_epochs
        if epochs is None or epochs < 0:
            raise AdapterConfigError(
                "adalora: schedule='epoch' with total_step=None needs Trainer(max_epochs=N); "
                "or set AdaLoRAConfig.total_step to the number of epochs"
            )
        return int(epochs)

    def setup(self, trainer: Any, pl_module: Any) -> None:
        m = _method()
        total = self.resolve_total(trainer)
        cfg = self.config
        if cfg.total_step is None and cfg.tinit + cfg.tfinal >= total:
            # A run the trainer made too short for the schedule (fast_dev_run, a smoke test, one epoch): it still
            # trains, at the initial rank; an explicit total_step was validated with the config.
            unit = ("optimizer step" if cfg.schedule == "step" else "epoch") + ("" if total == 1 else "s")
            rank_zero_warn(
                f"adalora: this run has {total} {unit}, too few for tinit={cfg.tinit} + tfinal={cfg.tfinal}; "
                f"training without rank reallocation (every layer keeps init_r={cfg.init_r})"
            )
            self.reallocate = False
            return
        self.reallocate = True
        m.check_schedule(cfg.tinit, cfg.tfinal, total, cfg.schedule)
        if self.allocator is None:
            self.allocator = m.RankAllocator(self.model, self.config, total)
        self.allocator.total = total
        if self._pending is not None:
            self._apply_state(self._pending)
            self._pending = None
        rec = _record(self.model)
        if rec is not None and self.config.schedule == "step":
            # save_peft writes the resolved schedule length when the config left it to the trainer.
            rec.extra["adalora_total_step"] = total

    def _require(self):
        if self.allocator is None:
            raise AdapterStateError("adalora: training hooks used before setup(trainer, pl_module) was called")
        return self.allocator

    # --- loss ----------------------------------------------------------------------------------------------

    def loss_term(self) -> torch.Tensor | None:
        w = self.config.orth_reg_weight
        if w == 0:
            return None
        layers = list(_method().adalora_layers(self.model).values())
        return w * _method().orthogonal_regularizer(layers)

    # --- steps and epochs ----------------------------------------------------------------------------------

    def on_optimizer_step_end(self, trainer: Any, pl_module: Any, optimizer_step: int) -> None:
        if not self.reallocate:
            return
        alloc = self._require()
        if self.config.schedule == "step":
            budget, masks = alloc.step(optimizer_step)
            if masks is not None:
                self._record_allocation(trainer, optimizer_step, budget)
            return
        if alloc.final_pattern is None:
            alloc.update_importance()
        else:
            alloc.apply(alloc.final_pattern)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if not self.reallocate:
            return
        alloc = self._require()
        if self.config.schedule == "epoch":
            epoch = int(trainer.current_epoch) + 1  # epochs completed
            # Idempotent per epoch: a resumed run may reach the same epoch end twice.
            if epoch > self.last_epoch:
                self.last_epoch = epoch
                if alloc.final_pattern is None:
                    if epoch >= alloc.total - self.config.tfinal:
                        alloc.finalize()
                        self._record_allocation(trainer, epoch, alloc.target_budget)
                    else:
                        budget, now = alloc.budget(epoch)
                        if now:
                            alloc.allocate(budget)
                            self._record_allocation(trainer, epoch, budget)
        self._log_history(trainer)

    # --- history and logging -------------------------------------------------------------------------------

    @property
    def rank_pattern(self) -> dict[str, list[bool]]:
        """The current keep flags of every adapted matrix."""
        return _method().rank_pattern(self.model)

    def _record_allocation(self, trainer: Any, t: int, budget: int) -> None:
        layers = _method().adalora_layers(self.model)
        ranks = [layers[n].kept_rank for n in self.names]
        step = int(getattr(trainer, "global_step", t))
        self.history.append({"t": int(t), "global_step": step, "budget": int(budget), "ranks": ranks})
        metrics = {"adalora/budget": float(budget), "adalora/kept": float(sum(ranks))}
        metrics.update({f"adalora/rank/{n}": float(r) for n, r in zip(self.names, ranks)})
        for lg in getattr(trainer, "loggers", []) or []:
            lg.log_metrics(metrics, step=step)

    def _log_history(self, trainer: Any) -> None:
        if len(self.history) <= self._logged or not getattr(trainer, "is_global_zero", True):
            return
        self._logged = len(self.history)
        loggers = getattr(trainer, "loggers", []) or []
        if not loggers:
            return
        step = int(getattr(trainer, "global_step", 0))
        columns, rows = rank_history_table(self.names, self.history)
        try:
            fig = rank_heatmap(self.names, self.history, self.config.init_r)
        except ModuleNotFoundError:  # matplotlib is optional: the table and metrics still go out
            fig = None
        for lg in loggers:
            log_rank_history(lg, columns, rows, fig, step)

    # --- checkpoint state ----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        if self.allocator is None and self._pending is not None:
            return self._pending  # resumed into a run without reallocation: keep the loaded state as it was
        return {
            "allocator": None if self.allocator is None else self.allocator.state_dict(),
            "history": [dict(h, ranks=list(h["ranks"])) for h in self.history],
            "last_epoch": self.last_epoch,
            "names": list(self.names),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state.get("names", [])) != self.names:
            raise AdapterStateError(
                f"adalora: the checkpoint's AdaLoRA state is for modules {state.get('names', [])[:6]}, this model "
                f"has {self.names[:6]}; resume with the same model and target_modules"
            )
        if self.allocator is None:
            self._pending = state
        else:
            self._apply_state(state)

    def _apply_state(self, state: dict[str, Any]) -> None:
        total = self.allocator.total
        if state["allocator"] is not None:
            self.allocator.load_state_dict(state["allocator"])
            self.allocator.total = total
        self.history = [dict(h, ranks=list(h["ranks"])) for h in state["history"]]
        self.last_epoch = int(state["last_epoch"])
        self._logged = 0


def _record(model: nn.Module):
    from lightning_adapters.core.inject import find_records

    recs = find_records(model)
    return recs[0][2] if recs else None


# ------------------------------------------------------------------------------------------------------------
# Rank history: table, heatmap, loggers


def rank_history_table(names: list[str], history: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """Columns ``[t, global_step, budget, kept, <module>...]`` and one row per reallocation."""
    columns = ["t", "global_step", "budget", "kept", *names]
    rows = [[h["t"], h["global_step"], h["budget"], sum(h["ranks"]), *h["ranks"]] for h in history]
    return columns, rows


def _common_prefix(names: list[str]) -> str:
    """The dotted prefix every name shares (``"backbone.encoder."``), never a whole name."""
    parts = [n.split(".") for n in names]
    shared = []
    for column in zip(*[p[:-1] for p in parts]):
        if len(set(column)) != 1:
            break
        shared.append(column[0])
    return ".".join(shared) + "." if shared else ""


def rank_heatmap(names: list[str], history: list[dict[str, Any]], max_rank: int):
    """A matplotlib ``Figure``: kept rank of every matrix (rows) at every reallocation (columns).

    The prefix all module names share goes into the axis label; the figure is widened to the longest remaining
    name, so the title, the names and the colour bar all lie inside the image.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    data = torch.tensor([h["ranks"] for h in history], dtype=torch.float32).T.numpy()  # (layers, reallocations)
    prefix = _common_prefix(names) if len(names) > 1 else ""
    width = min(16.0, 3.0 + 0.25 * max(1, len(history)))
    height = min(16.0, 1.5 + 0.22 * max(1, len(names)))
    fig = Figure(figsize=(width, height), dpi=80, layout="constrained")
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(data, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0, vmax=max_rank)
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels([n[len(prefix) :] for n in names], fontsize=6)
    ticks = list(range(0, len(history), max(1, len(history) // 12)))
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(history[i]["t"]) for i in ticks], fontsize=7)
    ax.set_xlabel("reallocation (t)")
    ax.set_title("AdaLoRA kept rank per matrix" + (f"\nmodules under {prefix}" if prefix else ""), fontsize=9)
    fig.colorbar(im, ax=ax, label="kept rank")
    # Widen the figure by the longest name, then grow it by whatever still sticks out (measured, in inches).
    renderer = canvas.get_renderer()
    labels = max(t.get_window_extent(renderer).width for t in ax.get_yticklabels()) / fig.dpi
    fig.set_size_inches(width + labels, height + 0.3)
    for _ in range(3):
        canvas.draw()
        box = fig.get_tightbbox(renderer)
        w, h = fig.get_size_inches()
        grow_w = max(0.0, -box.x0) + max(0.0, box.x1 - w)
        grow_h = max(0.0, -box.y0) + max(0.0, box.y1 - h)
        if grow_w < 0.01 and grow_h < 0.01:
            break
        fig.set_size_inches(w + grow_w + 0.1, h + grow_h + 0.1)
    return fig


def figure_to_array(fig) -> Any:
    """RGB ``uint8`` array ``(H, W, 3)`` of a matplotlib figure drawn with Agg."""
    import numpy as np

    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def log_rank_history(logger: Any, columns: list[str], rows: list[list[Any]], fig, step: int) -> None:
    """Send the rank table and heatmap to one Lightning logger, in whatever form it supports.

    W&B-style loggers (``log_table``/``log_image``) get a table and an image; TensorBoard-style ones
    (``experiment.add_image``) an image and a markdown table; loggers with a ``log_dir`` (CSV) get
    ``adalora_ranks.csv`` and ``adalora_rank_heatmap.png`` files there; any other logger only gets the per-step
    rank metrics already sent with ``log_metrics``. ``fig`` may be None (no matplotlib): images are skipped.
    """
    if hasattr(logger, "log_table") and hasattr(logger, "log_image"):
        logger.log_table(key="adalora/ranks", columns=columns, data=rows, step=step)
        if fig is not None:
            logger.log_image(key="adalora/rank_heatmap", images=[figure_to_array(fig)], step=step)
        return
    experiment = getattr(logger, "experiment", None)
    if hasattr(experiment, "add_image"):
        if fig is not None:
            experiment.add_image("adalora/rank_heatmap", figure_to_array(fig), step, dataformats="HWC")
        if hasattr(experiment, "add_text"):
            lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
            experiment.add_text("adalora/ranks", "\n".join(lines), step)
        return
    log_dir = getattr(logger, "log_dir", None)
    if isinstance(log_dir, (str, os.PathLike)):
        os.makedirs(log_dir, exist_ok=True)
        with open(os.path.join(log_dir, "adalora_ranks.csv"), "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(columns)
            writer.writerows(rows)
        if fig is not None:
            fig.savefig(os.path.join(log_dir, "adalora_rank_heatmap.png"))


__all__ = ["AdaLoRATrainingHooks", "figure_to_array", "log_rank_history", "rank_heatmap", "rank_history_table"]
