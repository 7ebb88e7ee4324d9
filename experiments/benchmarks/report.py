"""Turn the results JSON into the markdown table and the PNG bar chart of ours/PEFT ratios."""

from __future__ import annotations

from pathlib import Path
from typing import Any

MIB = 1024 * 1024


def _x(v: float | None, digits: int = 2) -> str:
    return "–" if v is None else f"{v:.{digits}f}×"


def _kib(b: int | None) -> str:
    if b is None:
        return "–"
    return f"{b / 1024:,.0f} KiB" if b < 10 * MIB else f"{b / MIB:,.1f} MiB"


def _get(d: dict[str, Any] | None, *path: str) -> Any:
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


def memory_ratio(entry: dict[str, Any]) -> float | None:
    """Ours/other peak resident memory of a training step (whole process)."""
    mem = entry.get("memory") or {}
    ours, other = _get(mem, "ours", "peak_mib"), _get(mem, entry.get("other", "peft"), "peak_mib")
    return None if not ours or not other else ours / other


def step_memory_ratio(entry: dict[str, Any]) -> float | None:
    """Ours/other memory the training steps add over the resident model."""
    mem = entry.get("memory") or {}
    ours, other = _get(mem, "ours", "step_peak_mib"), _get(mem, entry.get("other", "peft"), "step_peak_mib")
    return None if not ours or not other else ours / other


def _row(label: str, e: dict[str, Any]) -> str:
    if "error" in e and "train" not in e:
        return f"| {label} | error: {e['error'].strip().splitlines()[-1][:80]} |" + " |" * 10
    other = e.get("other", "peft")
    vs = "" if other == "peft" else f" (vs {e.get('compared_to')}, ours)"
    merged = _get(e, "eval_merged", "ours_over_base") if e.get("mergeable") else None
    merge = e.get("merge") or {}
    merge_ms = (
        f"{merge['ours_merge_s'] * 1e3:.0f} / {merge['other_merge_s'] * 1e3:.0f} ms" if merge else "not mergeable"
    )
    files = e.get("files") or {}
    ckpt = _kib(files.get("lightning_ckpt_bytes"))
    if str(files.get("lightning_ckpt_kind", "")).startswith("approx"):
        ckpt += " (approx.)"
    diff = e.get("max_abs_logit_diff")
    cells = [
        f"{label}{vs}",
        _x(_get(e, "train", "ours_over_other")),
        _x(memory_ratio(e)),
        _x(step_memory_ratio(e)),
        _x(_get(e, "train", "ours_over_base")),
        _x(_get(e, "train", "other_over_base")) if other == "peft" else "–",
        _x(_get(e, "flops", "limit_over_base")),
        _x(merged, 3),
        _x(_get(e, "eval_unmerged", "ours_over_other")),
        merge_ms,
        f"{_kib(files.get('ours_save_peft_bytes'))} / {_kib(files.get('peft_save_pretrained_bytes'))}",
        ckpt,
        "–" if diff is None else f"{diff:.1e}",
    ]
    return "| " + " | ".join(cells) + " |"


HEADER = (
    "| method | train step ours/PEFT | peak RSS ours/PEFT | step memory ours/PEFT | ours × base | PEFT × base "
    "| FLOP limit × base | merged eval / base eval | unmerged eval ours/PEFT | merge ours / PEFT "
    "| adapter file ours / PEFT | Lightning ckpt | max abs Δlogit |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def markdown(results: dict[str, Any]) -> str:
    """The results as markdown: provenance, anchors and one table per workload."""
    meta = results.get("meta", {})
    lines = ["# Benchmarks: lightning_adapters vs PEFT " + meta.get("peft_version", ""), ""]
    for run in meta.get("runs", []):
        m = run.get("machine", {})
        lines.append(
            f"- Run {run.get('started')} → {run.get('finished')} of commit `{(run.get('commit') or '?')[:10]}` "
            f"on `{m.get('host')}` ({m.get('cpu')}, "
            f"{m.get('cores')} cores, {m.get('threads')} threads; torch {m.get('torch')}, transformers "
            f"{m.get('transformers')}, peft {m.get('peft')}); methods {run.get('methods')}, "
            f"workloads {run.get('workloads')}{' (--quick)' if run.get('quick') else ''}."
        )
    if meta.get("quick"):
        lines += ["", "**Smoke run (`--quick`): toy sizes and two steps; these numbers measure nothing.**"]
    lines += [
        "",
        "Ratios are medians over rounds of per-round ratios (configurations alternate step by step in one process);",
        "`× base` is the train step over the frozen base's (no trainable weight, backward through every block);",
        "the FLOP limit is (base + cheapest adapter matrix products) / base. Peak RSS is the whole process's",
        "high-water mark during two train steps, each configuration in a fresh process; step memory is that peak",
        "minus the resident model before the steps. `max abs Δlogit` compares our outputs with PEFT's on the same",
        "batch (identical weights). Timing uses glibc malloc settings that keep freed memory (see PERFORMANCE.md).",
        "",
    ]
    for wname, wres in results.get("workloads", {}).items():
        lines.append(f"## {wname}: {wres.get('description', '')}")
        lines.append("")
        a = wres.get("anchors") or {}
        mem = wres.get("memory") or {}
        if a and "train" in a:
            lines.append(
                f"Anchors: frozen base train step {a['train']['base']['median_s'] * 1e3:.0f} ms, eval "
                f"{a['eval']['base']['median_s'] * 1e3:.0f} ms; full fine-tuning "
                f"{_x(a['train']['full_over_base'])} the base (FLOP limit {_x(a['flops']['full_limit_over_base'])}); "
                f"peak RSS base {_get(mem, 'base', 'peak_mib') or 0:.0f} MiB, full fine-tuning "
                f"{_get(mem, 'full', 'peak_mib') or 0:.0f} MiB; model file {_kib(a['files']['base_model_bytes'])}, "
                f"full fine-tuning checkpoint (weights + AdamW) {_kib(a['files']['full_ckpt_bytes'])}."
            )
            lines.append("")
        lines.append(HEADER)
        for label, e in wres.get("methods", {}).items():
            lines.append(_row(label, e))
        lines.append("")
        notes = [f"- {label}: {e['peft_note']}" for label, e in wres.get("methods", {}).items() if e.get("peft_note")]
        util = [
            f"{label} {e['train_cpu_util'] * 100:.0f}%"
            for label, e in wres.get("methods", {}).items()
            if e.get("train_cpu_util") is not None
        ]
        if util:
            notes.append(f"- CPU use during the timed steps (200% = both threads busy): {', '.join(util)}")
        lines += notes + [""]
    lines += checks(results)
    skipped = meta.get("skipped") or []
    if skipped:
        lines += ["Not run: " + "; ".join(skipped), ""]
    return "\n".join(lines)


TARGETS = {"lora": 0.95, "dora": 0.8, "adalora": 1.0}
MERGED_TOLERANCE = 0.03


def checks(results: dict[str, Any]) -> list[str]:
    """The issue's acceptance checks, stated against the measured numbers."""
    out = ["## Checks", ""]
    for label, target in TARGETS.items():
        vals = {
            w: _get(r, "methods", label, "train", "ours_over_other") for w, r in results.get("workloads", {}).items()
        }
        vals = {w: v for w, v in vals.items() if v is not None}
        if vals:
            got = ", ".join(f"{w} {v:.3f}×" for w, v in vals.items())
            cpu = {
                w: _get(r, "methods", label, "train", "cpu_time", "ours_over_other")
                for w, r in results.get("workloads", {}).items()
            }
            cpu_txt = ", ".join(f"{w} {v:.3f}×" for w, v in cpu.items() if v is not None)
            ok = all(v <= target for v in vals.values())
            out.append(
                f"- {label} train step ≤ {target}× PEFT's: wall clock {got} — {'met' if ok else 'NOT met'}"
                + (f" (process CPU time: {cpu_txt})." if cpu_txt else ".")
            )
    bad, good = [], []
    for w, r in results.get("workloads", {}).items():
        for label, e in r.get("methods", {}).items():
            v = _get(e, "eval_merged", "ours_over_base")
            c = _get(e, "eval_merged", "cpu_time", "ours_over_base")
            if v is not None:
                fast = _get(e, "eval_merged", "ours", "min_s"), _get(e, "eval_merged", "base", "min_s")
                txt = f"{w}/{label} {v:.3f}×" + (f" (CPU {c:.3f}×" if c is not None else " (")
                txt += f", fastest runs {fast[0] / fast[1]:.3f}×)" if None not in fast else ")"
                (good if abs(v - 1) <= MERGED_TOLERANCE else bad).append(txt)
    if good or bad:
        verdict = "all within" if not bad else f"outside: {', '.join(bad)}; within"
        out.append(
            f"- Merged eval latency / base eval latency, ±{MERGED_TOLERANCE:.0%} (median of paired ratios; the ratio "
            f"of the fastest runs in brackets, since interference only ever adds time): {verdict}: "
            f"{', '.join(good)}."
        )
    busy = [
        f"{run.get('started')}: load {run.get('load_average_start')} → {run.get('load_average_end')}"
        for run in results.get("meta", {}).get("runs", [])
        if (run.get("load_average_start") or [0])[0] > (run.get("machine", {}).get("cores") or 1)
    ]
    if busy:
        out.append(
            "- The machine was shared while measuring (more runnable processes than cores: "
            + "; ".join(busy)
            + "). Under such contention every parallel op waits for a descheduled thread now and then, which "
            "penalises configurations that run more, smaller ops (PEFT's) beyond what alternation cancels; "
            "see `train_cpu_util` per row."
        )
    return out + [""]


def chart(results: dict[str, Any], path: Path) -> None:
    """Grouped bars of the ours/PEFT train-step and peak-memory ratios per method and workload."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(results.get("workloads", {}))
    labels: list[str] = []
    for w in workloads:
        for label in results["workloads"][w].get("methods", {}):
            if label not in labels:
                labels.append(label)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / max(1, len(workloads))
    metrics = (
        ("train step, ours / PEFT", lambda e: _get(e, "train", "ours_over_other")),
        ("peak memory, ours / PEFT", memory_ratio),
    )
    for ax, (title, fn) in zip(axes, metrics):
        for k, w in enumerate(workloads):
            methods = results["workloads"][w].get("methods", {})
            vals = [fn(methods[label]) if label in methods else None for label in labels]
            xs = [i + (k - (len(workloads) - 1) / 2) * width for i in range(len(labels))]
            bars = ax.bar(xs, [v or 0 for v in vals], width, label=w)
            for b, v in zip(bars, vals):
                if v:
                    ax.annotate(f"{v:.2f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=7)
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=30, ha="right")
        ax.set_title(title + " (lower is better)")
        ax.legend()
    fig.suptitle("lightning_adapters vs PEFT (CPU, fp32, 2 threads); boft_m2 is against our boft_m1")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
