"""How the Lightning integration drives a method's training schedule (``lightning_adapters.schedules``).

Most methods need nothing from the loop. A method that does (AdaLoRA) registers a schedule class as
the method's ``training_hooks``; ``AdapterCallback`` and ``AdapterMixin`` build one per fit and a ``ScheduleDriver``
calls it: ``start`` at fit start with the trainer's number of optimizer steps or epochs, ``loss_term`` on every
training loss, ``after_optimizer_step`` once per optimizer step (after ``optimizer.step()``, before ``zero_grad``,
so gradients are still there and accumulation is counted right), ``after_epoch`` at every epoch end. What the
schedule returns goes to the trainer's loggers (metrics at each event, ``report()`` at epoch ends on rank zero);
its notices become rank-zero warnings. The schedule's state travels in the callback's checkpoint entry.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lightning_adapters.lightning.reports import log_report, report_figure
from lightning_adapters.schedules import TrainingSchedule


class ScheduleDriver:
    """Calls one schedule from the Lightning loop and logs what it reports.

    Args:
        schedule: The method's schedule for this fit.
    """

    def __init__(self, schedule: TrainingSchedule) -> None:
        self.schedule = schedule
        self._logged = 0  # report rows already sent to the loggers

    def setup(self, trainer: Any) -> None:
        """Size the schedule from the trainer (once it is configured, before training)."""
        unit = self.schedule.length_unit
        if unit == "optimizer_steps":
            length = trainer.estimated_stepping_batches
        elif unit == "epochs":
            length = trainer.max_epochs
        else:
            length = None
        notice = self.schedule.start(length)
        if notice:
            rank_zero_warn(notice)

    def loss_term(self) -> torch.Tensor | None:
        """The schedule's term for the current training loss."""
        return self.schedule.loss_term()

    def on_optimizer_step_end(self, trainer: Any, optimizer_step: int) -> None:
        """After optimizer step ``optimizer_step`` (from 0), gradients still present."""
        step = int(getattr(trainer, "global_step", optimizer_step))
        _log_metrics(trainer, self.schedule.after_optimizer_step(optimizer_step, step), step)

    def on_train_epoch_end(self, trainer: Any) -> None:
        """At every training epoch end: the schedule's epoch event, then its report."""
        step = int(getattr(trainer, "global_step", 0))
        _log_metrics(trainer, self.schedule.after_epoch(int(trainer.current_epoch) + 1, step), step)
        self._log_report(trainer, step)

    def _log_report(self, trainer: Any, step: int) -> None:
        loggers = getattr(trainer, "loggers", []) or []
        if not loggers or not getattr(trainer, "is_global_zero", True):
            return
        report = self.schedule.report()
        if report is None or len(report.rows) <= self._logged:
            return
        self._logged = len(report.rows)
        fig = report_figure(report)
        for lg in loggers:
            log_report(lg, report, fig, step)

    def state_dict(self) -> dict[str, Any]:
        """The schedule's state."""
        return self.schedule.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the schedule's state (its whole report is sent again at the next epoch end)."""
        self.schedule.load_state_dict(state)
        self._logged = 0


def _log_metrics(trainer: Any, metrics: dict[str, float] | None, step: int) -> None:
    if metrics:
        for lg in getattr(trainer, "loggers", []) or []:
            lg.log_metrics(metrics, step=step)


__all__ = ["ScheduleDriver"]
