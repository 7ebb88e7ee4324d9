"""A training schedule's report (``lightning_adapters.schedules.ScheduleReport``) sent to Lightning loggers.

AdaLoRA reports its rank history: a table with one row per reallocation and a heatmap of kept rank, layers ×
reallocations. Each logger gets it in the form it supports: W&B-style loggers (``log_table``/``log_image``) a
table and an image; TensorBoard-style ones (``experiment.add_image``) an image and a markdown table; loggers
with a ``log_dir`` (CSV) files there (``adalora_ranks.csv``, ``adalora_rank_heatmap.png``); any other logger
only the metrics the schedule returned at each event, sent with ``log_metrics``.
"""

from __future__ import annotations

import csv
import os
from typing import Any

import torch

from lightning_adapters.schedules import Heatmap, ScheduleReport


def _common_prefix(names: list[str]) -> str:
    """The dotted prefix every name shares (``"backbone.encoder."``), never a whole name."""
    parts = [n.split(".") for n in names]
    shared = []
    for column in zip(*[p[:-1] for p in parts]):
        if len(set(column)) != 1:
            break
        shared.append(column[0])
    return ".".join(shared) + "." if shared else ""


def heatmap_figure(heatmap: Heatmap):
    """A matplotlib ``Figure`` of ``heatmap`` (rows: modules, columns: events).

    The prefix all row labels share goes into the title; the figure is widened to the longest remaining label,
    so the title, the labels and the colour bar all lie inside the image.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names, columns = heatmap.row_labels, heatmap.column_labels
    data = torch.tensor(heatmap.values, dtype=torch.float32).reshape(len(names), len(columns)).numpy()
    prefix = _common_prefix(names) if len(names) > 1 else ""
    width = min(16.0, 3.0 + 0.25 * max(1, len(columns)))
    height = min(16.0, 1.5 + 0.22 * max(1, len(names)))
    fig = Figure(figsize=(width, height), dpi=80, layout="constrained")
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(data, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0, vmax=heatmap.vmax)
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels([n[len(prefix) :] for n in names], fontsize=6)
    ticks = list(range(0, len(columns), max(1, len(columns) // 12)))
    ax.set_xticks(ticks)
    ax.set_xticklabels([columns[i] for i in ticks], fontsize=7)
    ax.set_xlabel(heatmap.xlabel)
    ax.set_title(heatmap.title + (f"\nmodules under {prefix}" if prefix else ""), fontsize=9)
    fig.colorbar(im, ax=ax, label=heatmap.colorbar)
    # Widen the figure by the longest label, then grow it by whatever still sticks out (measured, in inches).
    renderer = canvas.get_renderer()
    labels = max((t.get_window_extent(renderer).width for t in ax.get_yticklabels()), default=0.0) / fig.dpi
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


def _file_name(key: str) -> str:
    return key.replace("/", "_")


def report_figure(report: ScheduleReport):
    """The figure of ``report``'s heatmap; None without a heatmap or without matplotlib (an optional dependency)."""
    if report.heatmap is None:
        return None
    try:
        return heatmap_figure(report.heatmap)
    except ModuleNotFoundError:  # the table and metrics still go out
        return None


def log_report(logger: Any, report: ScheduleReport, fig: Any, step: int) -> None:
    """Send ``report`` (and ``fig``, its ``report_figure``) to one Lightning logger, in the form it supports."""
    columns, rows = report.columns, report.rows
    if hasattr(logger, "log_table") and hasattr(logger, "log_image"):
        logger.log_table(key=report.table_key, columns=columns, data=rows, step=step)
        if fig is not None:
            logger.log_image(key=report.heatmap_key, images=[figure_to_array(fig)], step=step)
        return
    experiment = getattr(logger, "experiment", None)
    if hasattr(experiment, "add_image"):
        if fig is not None:
            experiment.add_image(report.heatmap_key, figure_to_array(fig), step, dataformats="HWC")
        if hasattr(experiment, "add_text"):
            lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
            experiment.add_text(report.table_key, "\n".join(lines), step)
        return
    log_dir = getattr(logger, "log_dir", None)
    if isinstance(log_dir, (str, os.PathLike)):
        os.makedirs(log_dir, exist_ok=True)
        with open(os.path.join(log_dir, _file_name(report.table_key) + ".csv"), "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(columns)
            writer.writerows(rows)
        if fig is not None:
            fig.savefig(os.path.join(log_dir, _file_name(report.heatmap_key) + ".png"))


__all__ = ["figure_to_array", "heatmap_figure", "log_report", "report_figure"]
