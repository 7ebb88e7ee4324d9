"""What a method that changes during training (AdaLoRA) gives the training loop: a schedule object.

A method registers a schedule class as its ``training_hooks``; it is built as ``cls(model, config, name)``
(``name``: the adapter trained, in a model that may hold several) once per fit and holds all of the method's
training-time logic (when to measure, when to reallocate, what to regularise, what to keep in checkpoints). It
knows nothing of Lightning: ``lightning_adapters.lightning.hooks`` drives it from the trainer and sends what it
reports to the loggers, and a hand-written loop can drive it the same way::

    schedule = AdaLoRASchedule(model, config)
    schedule.start(num_optimizer_steps)           # the length in the unit schedule.length_unit names
    for step, batch in enumerate(batches):
        loss = model(**batch).loss + schedule.loss_term()
        loss.backward(); optimizer.step()
        schedule.after_optimizer_step(step)        # before zero_grad: the schedule may read gradients
        optimizer.zero_grad()
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch


@dataclass
class Heatmap:
    """A matrix to draw as an image: ``values[i][j]`` is row ``i`` (a module) at column ``j`` (an event).

    Attributes:
        values: Rows of numbers, one row per entry of ``row_labels``.
        row_labels: One label per row (module names; the dotted prefix they share is moved to the title).
        column_labels: One label per column.
        vmax: Top of the colour scale (the bottom is 0).
        title: Figure title.
        xlabel: Label of the column axis.
        colorbar: Label of the colour bar.
    """

    values: list[list[float]]
    row_labels: list[str]
    column_labels: list[str]
    vmax: float
    title: str
    xlabel: str
    colorbar: str


@dataclass
class ScheduleReport:
    """A schedule's history for loggers: a table (one row per event) and, optionally, a heatmap.

    Attributes:
        table_key: Logger key of the table (``"adalora/ranks"``); file loggers write ``adalora_ranks.csv``.
        columns: Table columns.
        rows: Table rows.
        heatmap_key: Logger key of the heatmap image (file loggers write ``<key with _ for />.png``).
        heatmap: The heatmap, if the schedule has one.
    """

    table_key: str
    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)
    heatmap_key: str = ""
    heatmap: Heatmap | None = None


class TrainingSchedule(Protocol):
    """The training-time logic of a method, driven once per optimizer step and epoch (see the module docstring).

    Attributes:
        length_unit: What ``start`` needs as the run's length: ``"optimizer_steps"``, ``"epochs"``, or ``None`` when
            the schedule already knows it (from its config).
    """

    length_unit: str | None

    def start(self, length: float | None) -> str | None:
        """Size the schedule for a run of ``length`` (in ``length_unit``); returns a notice for the user, or None."""

    def loss_term(self) -> torch.Tensor | None:
        """A term to add to the training loss of the current batch (``None``: nothing to add)."""

    def after_optimizer_step(self, step: int, global_step: int | None = None) -> dict[str, float] | None:
        """After ``optimizer.step()`` and before gradients are zeroed (``step`` counts from 0); metrics to log."""

    def after_epoch(self, epoch: int, global_step: int | None = None) -> dict[str, float] | None:
        """After ``epoch`` epochs completed (counting from 1); metrics to log, or None."""

    def report(self) -> ScheduleReport | None:
        """The history so far, for loggers (``None``: nothing to show)."""

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue exactly."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of ``state_dict``; may be called before ``start``."""


__all__ = ["Heatmap", "ScheduleReport", "TrainingSchedule"]
