"""Collect a training-app multirun into a table and a plot of metric vs trainable parameters per method.

Every job of ``python -m lightning_adapters.train -m ...`` writes ``summary.json`` into its output directory,
also when it fails (``status: "failed"`` and its error line). This script reads them all, from one multirun
directory or many (local, submitit, Ray, or job directories copied back from a cluster), and reads a job whose
``summary.json`` is missing from its W&B offline run instead (``experiments/wandb_offline.py``). It writes,
next to them (or into ``--out``):

- ``sweep_table.md`` and ``sweep_table.csv``: method, rank, trainable parameters (and %), best validation
  metric, mean step time, peak memory, one row per job, sorted by method then rank; failed jobs are listed
  below the table with their overrides and error line (in the CSV: ``status`` and ``error`` columns), and so
  is a job directory without ``summary.json`` (killed, or still running);
- ``sweep_plot.png``: best validation metric against trainable parameters (log scale), one line per method,
  each point labelled with its rank.

Usage::

    python -m lightning_adapters.train -m method=lora,loha,lokr,oft,boft,adalora method.r=4,8,16
    python experiments/collect_sweep.py logs/train/multiruns/<date_time>
    python experiments/collect_sweep.py cluster_copy/multiruns/* --out sweep_summary/
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout, too

from experiments.wandb_offline import OfflineRun, find_runs, read_run  # noqa: E402

COLUMNS = ("method", "rank", "trainable_params", "trainable_pct", "metric", "value", "step_time_ms", "peak_mem_mb")
NO_SUMMARY = "no summary.json: the job was killed or is still running"
WANDB_UNFINISHED = "no summary.json, and its W&B run never finished: the job was killed or is still running"


def _overrides(job_dir: Path) -> str:
    """The job's command-line overrides (Hydra's ``.hydra/overrides.yaml``), space separated."""
    path = job_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return ""
    # One "- key=value" item per line; read without a YAML parser to keep the script's imports minimal.
    items = [line[2:].strip() for line in path.read_text().splitlines() if line.startswith("- ")]
    return " ".join(item.strip("'\"") for item in items)


def _row(job: str, s: dict[str, Any], overrides: str, source: str) -> dict[str, Any]:
    """A table row from a job's ``summary.json`` (or the same keys read back from its W&B run)."""
    return {
        "method": s.get("method"),
        "rank": s.get("rank"),
        "trainable_params": int(s.get("params/trainable") or 0),
        "trainable_pct": s.get("params/trainable_pct"),
        "metric": s.get("metric"),
        "value": s.get("best_metric"),
        "step_time_ms": s.get("perf/step_time_ms"),
        "peak_mem_mb": s.get("perf/peak_mem_mb"),
        "job": job,
        "status": s.get("status", "ok"),
        "error": s.get("error", ""),
        "overrides": overrides,
        "source": source,
    }


def _wandb_summary(run: OfflineRun) -> dict[str, Any]:
    """The ``summary.json`` keys of a job, from what its W&B offline run logged."""
    job = run.config.get("run") or {}
    metric = run.config.get("optimized_metric")
    best = run.summary.get("best_metric")
    if best is None and metric:
        best = run.best(metric, run.config.get("optimized_mode", "max"))
    out = {
        "method": job.get("method"),
        "rank": job.get("rank"),
        "metric": metric,
        "best_metric": best,
        **{k: run.summary.get(k) for k in ("params/trainable", "params/trainable_pct", "perf/step_time_ms")},
        "perf/peak_mem_mb": run.summary.get("perf/peak_mem_mb"),
        "status": "ok" if run.exit_code == 0 else "failed",
    }
    if run.exit_code is None:
        out["error"] = WANDB_UNFINISHED
    elif run.exit_code != 0:
        out["error"] = f"the W&B run exited with code {run.exit_code} (its log: {run.path / 'files' / 'output.log'})"
    return out


def collect(*sweep_dirs: str | Path) -> list[dict[str, Any]]:
    """One row per job below the ``sweep_dirs``, sorted by method then rank; failed jobs have ``status="failed"``.

    A job is a directory holding ``summary.json`` or Hydra's ``.hydra/`` folder, as a multirun (local, submitit,
    Ray) leaves it or as copied back from a cluster's nodes. A job without ``summary.json`` is read from its W&B
    offline run when it has one (``<job>/wandb/offline-run-*``), else listed as failed with ``NO_SUMMARY``; W&B
    offline runs outside any job directory (only ``wandb/`` folders copied back) are jobs of their own. Each row's
    ``source`` says where it was read from (``summary.json``, ``wandb`` or ``none``). With several directories, a
    job's name starts with its directory's name.

    Raises:
        FileNotFoundError: No job below any of ``sweep_dirs``.
    """
    rows = []
    for root in map(Path, sweep_dirs):
        prefix = f"{root.name}/" if len(sweep_dirs) > 1 else ""
        jobs = {p.parent for p in root.rglob("summary.json")} | {p.parent for p in root.rglob(".hydra")}
        runs: dict[Path, list[Path]] = {}
        for run in find_runs(root):
            owner = run.parent.parent if run.parent.name == "wandb" else run
            runs.setdefault(owner if owner in jobs else run, []).append(run)
        for job in sorted(jobs | set(runs)):
            name = prefix + (job.relative_to(root).as_posix() if job != root else ".")
            path = job / "summary.json"
            if path.is_file():
                rows.append(_row(name, json.loads(path.read_text()), _overrides(job), "summary.json"))
            elif job in runs:
                # The newest run of the job (a job resumed in the same directory logs a second one).
                run = read_run(sorted(runs[job], key=lambda p: p.name)[-1])
                overrides = _overrides(job) or " ".join((run.config.get("run") or {}).get("overrides", []))
                rows.append(_row(name, _wandb_summary(run), overrides, "wandb"))
            else:
                rows.append(_row(name, {"status": "failed", "error": NO_SUMMARY}, _overrides(job), "none"))
    if not rows:
        shown = ", ".join(repr(str(d)) for d in sweep_dirs)
        raise FileNotFoundError(
            f"no summary.json, .hydra/ or W&B offline run below {shown}; is it a training-app multirun directory?"
        )
    rows.sort(key=lambda r: (str(r["method"]), r["rank"] if r["rank"] is not None else -1, r["job"]))
    return rows


def _fmt(value: Any, digits: int) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The finished jobs as a Markdown table, then the failed ones with their overrides and error line."""
    done = [r for r in rows if r["status"] != "failed"]
    failed = [r for r in rows if r["status"] == "failed"]
    metric = next((r["metric"] for r in rows if r["metric"]), "metric")
    header = ["method", "rank", "trainable params", "trainable %", f"best {metric}", "step time (ms)", "peak mem (MiB)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in done:
        cells = [
            _fmt(r["method"], 0),
            _fmt(r["rank"], 0),
            _fmt(r["trainable_params"], 0),
            _fmt(r["trainable_pct"], 3),
            _fmt(r["value"], 4),
            _fmt(r["step_time_ms"], 1),
            _fmt(r["peak_mem_mb"], 0),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if failed:
        lines += ["", f"**{len(failed)} failed job(s)**", "", "| job | overrides | error |", "|---|---|---|"]
        for r in failed:
            error = str(r["error"]).replace("|", "\\|")
            lines.append(f"| {r['job']} | `{r['overrides']}` | {error} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: str | Path) -> None:
    """Best metric vs trainable parameters, one line per method, points labelled ``r=<rank>``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for method in sorted({str(r["method"]) for r in rows}):
        pts = sorted(
            (r["trainable_params"], r["value"], r["rank"])
            for r in rows
            if str(r["method"]) == method and isinstance(r["value"], (int, float)) and math.isfinite(r["value"])
        )
        if not pts:
            continue
        xs, ys, ranks = zip(*pts)
        ax.plot(xs, ys, marker="o", label=method)
        for x, y, rank in pts:
            if rank is not None:
                ax.annotate(f"r={rank}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel(f"best {next((r['metric'] for r in rows if r['metric']), 'metric')}")
    ax.set_title("Validation metric vs trainable parameters")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_outputs(sweep_dir: str | Path | list[str | Path], out_dir: str | Path | None = None) -> dict[str, Path]:
    """Collect ``sweep_dir`` (one directory or several) and write the table (Markdown, CSV) and the plot; return
    their paths (written into ``out_dir``, by default the first directory)."""
    dirs = list(sweep_dir) if isinstance(sweep_dir, (list, tuple)) else [sweep_dir]
    rows = collect(*dirs)
    out = Path(out_dir) if out_dir is not None else Path(dirs[0])
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / "sweep_table.md", "csv": out / "sweep_table.csv", "png": out / "sweep_plot.png"}
    paths["md"].write_text(markdown_table(rows))
    with paths["csv"].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*COLUMNS, "job", "status", "error", "overrides", "source"])
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, paths["png"])
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "sweep_dir",
        nargs="+",
        help="multirun directories (e.g. logs/train/multiruns/<date_time>), job directories copied back from a "
        "cluster, or folders of W&B offline runs",
    )
    parser.add_argument("--out", default=None, help="where to write the table and plot (default: the first sweep_dir)")
    args = parser.parse_args(argv)
    try:
        paths = write_outputs(args.sweep_dir, args.out)
    except FileNotFoundError as err:  # a wrong path is a usage error: one line, no traceback
        parser.error(str(err))
    print(paths["md"].read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    failed = sum(r["status"] == "failed" for r in collect(*args.sweep_dir))
    if failed:
        print(f"{failed} job(s) failed: listed with their error under the table above")


if __name__ == "__main__":
    main()
