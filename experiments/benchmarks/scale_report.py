"""The scale results (``scale.json``, also ``gpu.json``) as a markdown table and one plot per method."""

from __future__ import annotations

from pathlib import Path
from typing import Any

TARGETS = {"lora": 0.95}  # ours/PEFT train-step target of a row's fp32 grid cells; 1.0 elsewhere and for memory


def _get(d: Any, *path: str) -> Any:
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


def _x(v: float | None, digits: int = 2) -> str:
    return "–" if v is None else f"{v:.{digits}f}×"


def target(label: str, key: str = "fp32/") -> float:
    """The ours/PEFT train-step ratio row ``label`` must not exceed in cell ``key`` (the bf16 and compiled
    variants: 1.0 for every row)."""
    return TARGETS.get(label, 1.0) if key.startswith("fp32/") else 1.0


def time_ratio(e: dict[str, Any], name: str = "ours_over_peft") -> float | None:
    """A train-step ratio as a cell is judged: wall clock, or process CPU time when the cell ran on one CPU
    thread (then CPU time is the work done, immune to other processes taking the core away)."""
    if e.get("threads") == 1 and e.get("device", "cpu") == "cpu":
        return _get(e, "train", "cpu_time", name)
    return _get(e, "train", name)


def floor(e: dict[str, Any]) -> float:
    """The lowest ours/PEFT train-step ratio possible: an adapter costing nothing over the frozen base
    (``1 / (PEFT × base)``)."""
    p = time_ratio(e, "peft_over_base")
    return 1 / p if p else 0.0


def misses(results: dict[str, Any]) -> list[str]:
    """``row cell: what`` for every measured cell above its target (time or peak memory)."""
    out = []
    for label, cells in results.get("rows", {}).items():
        for key, e in cells.items():
            t, m = time_ratio(e), _get(e, "memory", "ours_over_peft")
            goal = target(label, key)
            if t is not None and t > goal:
                fl = floor(e)
                why = f" (floor {fl:.3f}: PEFT's whole overhead over the base is smaller)" if fl > goal else ""
                out.append(f"{label} {key}: train step {t:.3f}× > {goal}{why}")
            if m is not None and m > 1.0:
                extra = _get(e, "memory", "ours", "peak_mib") - _get(e, "memory", "peft", "peak_mib")
                out.append(f"{label} {key}: peak memory {m:.3f}× > 1.0 (+{extra * 2**20:,.0f} bytes)")
    return out


HEADER = (
    "| method | cell | train step ours/PEFT (wall) | train step ours/PEFT (CPU time) | peak memory ours/PEFT "
    "| step memory ours/PEFT | ours × base | PEFT × base | floor ours/PEFT | FLOP limit × base | memory ours × base "
    "| ours / PEFT step (ms) | adapter dtype ours/PEFT | CPU use |\n" + "|---" * 15 + "|"
)


def _row(label: str, key: str, e: dict[str, Any]) -> str:
    if "error" in e:
        return f"| {label} | {key} | error: {e['error'].strip().splitlines()[-1][:90]} |" + " |" * 11
    t = time_ratio(e)
    flag = " ⚠" if t is not None and t > target(label, key) else ""
    wall, cpu = _get(e, "train", "ours_over_peft"), _get(e, "train", "cpu_time", "ours_over_peft")
    m = _get(e, "memory", "ours_over_peft")
    mflag = " ⚠" if m is not None and m > 1.0 else ""
    dtypes = e.get("adapter_dtype") or {}
    util = e.get("train_cpu_util")
    cells = [
        label,
        key,
        _x(wall) + (flag if t is wall else ""),
        _x(cpu) + (flag if t is cpu else ""),
        _x(m, 3) + mflag,
        _x(_get(e, "memory", "step_ours_over_peft")),
        _x(time_ratio(e, "ours_over_base")),
        _x(time_ratio(e, "peft_over_base")),
        _x(floor(e)),
        _x(_get(e, "flops", "limit_over_base")),
        _x(_get(e, "memory", "ours_over_base")),
        f"{_get(e, 'train', 'ours', 'median_s') * 1e3:.0f} / {_get(e, 'train', 'peft', 'median_s') * 1e3:.0f}",
        f"{','.join(dtypes.get('ours', []))} / {','.join(dtypes.get('peft', []))}",
        "–" if util is None else f"{util * 100:.0f}%",
    ]
    return "| " + " | ".join(cells) + " |"


GRID_INTRO = [
    "Cells `fp32/hH-sS-LN`: the Llama decoder at hidden H, sequence S, N layers, batch 1, fp32 (heads of 64 up to",
    "hidden 1024 and of 128 above, half as many KV heads, SwiGLU width ⌈8H/3⌉, vocab 32000). Cells `*/decoder`:",
    "the reference decoder workload (4 layers, hidden 512, batch 4×256) with a bf16 base and fp32 adapters",
    "(`bf16`), bf16 adapters (`bf16-adapters`), or fp32 with ours and PEFT compiled (`compile`, compilation not",
    "timed).",
    "",
]


def markdown(
    results: dict[str, Any], title: str = "Scale curves: lightning_adapters vs PEFT", intro: list[str] | None = None
) -> str:
    """Provenance, ``intro`` (what the cells are; the scale grid's by default), one table row per method and
    cell, then the cells that miss their target."""
    meta = results.get("meta", {})
    lines = [f"# {title}", ""]
    for run in meta.get("runs", []):
        m = run.get("machine", {})
        lines.append(
            f"- Run {run.get('started')} → {run.get('finished')} of commit `{(run.get('commit') or '?')[:10]}` on "
            f"{run.get('device')} (`{m.get('host')}`, {m.get('cpu')}, {m.get('cores')} cores, {m.get('threads')} "
            f"threads; torch {m.get('torch')}, transformers {m.get('transformers')}, peft {m.get('peft')}); load "
            f"average {run.get('load_average_start')} → {run.get('load_average_end')}; {run.get('steps')} timed "
            f"steps after {run.get('warmup')} warm-up; methods {run.get('methods')}."
        )
    if meta.get("quick"):
        lines += ["", "**Smoke run (`--quick`): toy sizes and two steps; these numbers measure nothing.**"]
    lines += ["", *(GRID_INTRO if intro is None else intro)]
    lines += [
        "Train-step ratios are medians of per-round ratios (ours, PEFT and the frozen base alternate step by",
        "step in one process per method). Peak memory is the tensor memory a configuration holds (weights, gradients,",
        "optimizer state) plus the high-water mark of its first train step above it (CPU: torch profiler allocation",
        "events; CUDA: `max_memory_allocated`); step memory is that high-water mark alone. ⚠ marks a cell above its",
        "target (train step ≤ 0.95× PEFT's for LoRA's fp32 cells, ≤ 1.0× otherwise; peak memory ≤ 1.0×), judged on",
        "the wall clock, or on process CPU time for cells run on one thread (CPU time is then the work done, immune to",
        "the other processes of a shared machine). CPU use is the process's CPU time over wall time during the timed",
        "steps (100% per thread = never descheduled). The floor is base/PEFT, the ratio of an adapter that cost",
        "nothing over the frozen base: a target below it cannot be met by any implementation.",
        "",
        HEADER,
    ]
    for label, cells in results.get("rows", {}).items():
        for key, e in cells.items():
            lines.append(_row(label, key, e))
    lines += ["", "## Cells above target", ""]
    lines += [f"- {m}" for m in misses(results)] or ["- none"]
    if meta.get("notes"):  # the explanations written after a run (profiles, what limits a cell)
        lines += ["", "## Notes", "", *meta["notes"]]
    skipped = meta.get("skipped") or []
    if skipped:
        lines += ["", "Not run: " + "; ".join(skipped)]
    return "\n".join(lines) + "\n"


def _series(cells: dict[str, Any]) -> tuple[list[tuple[int, dict]], list[tuple[int, dict]]]:
    """The grid's hidden sweep (``(base params, entry)`` at the smallest sequence) and sequence sweep
    (``(seq, entry)`` at the smallest hidden size), fp32 cells only."""
    pts = []
    for key, e in cells.items():
        variant, _, name = key.partition("/")
        if variant != "fp32" or "error" in e or not name.startswith("h"):
            continue
        h, s, _layers = (int(part[1:]) for part in name.split("-")[:3])
        pts.append((h, s, e))
    if not pts:
        return [], []
    s0, h0 = min(p[1] for p in pts), min(p[0] for p in pts)
    hidden = sorted((e["base_params"], e) for h, s, e in pts if s == s0)
    seq = sorted((s, e) for h, s, e in pts if h == h0)
    return hidden, seq


def plot(results: dict[str, Any], label: str, path: Path) -> None:
    """Ratio to PEFT (time, memory) and × frozen base (ours, PEFT) of row ``label`` against model size and
    against sequence length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hidden, seq = _series(results["rows"][label])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    lines = (
        ("train step ours/PEFT", lambda e: time_ratio(e), "-o"),
        ("peak memory ours/PEFT", lambda e: _get(e, "memory", "ours_over_peft"), "-s"),
        ("ours × base (step)", lambda e: time_ratio(e, "ours_over_base"), "--o"),
        ("PEFT × base (step)", lambda e: time_ratio(e, "peft_over_base"), ":o"),
    )
    for ax, series, xlabel in (
        (axes[0], hidden, "base model parameters (millions), shortest sequence"),
        (axes[1], seq, "sequence length, smallest hidden size"),
    ):
        scale = 1e6 if series is hidden else 1
        for name, get, style in lines:
            xs = [x / scale for x, e in series if get(e) is not None]
            ys = [get(e) for _, e in series if get(e) is not None]
            if xs:
                ax.plot(xs, ys, style, label=name)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.axhline(target(label), color="red", linewidth=0.6, linestyle="--")
        if series and series is hidden:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("ratio (lower is better)")
        ax.legend(fontsize=7)
    fig.suptitle(f"{label}: lightning_adapters vs PEFT as the decoder grows (fp32)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
