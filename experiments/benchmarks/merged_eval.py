"""Merged-model eval latency against the frozen base, measured with many more rounds than the main harness.

The main harness times eval with three models (ours, PEFT, base) and 21 rounds; on a shared 2-core VM a single
0.3 s forward varies by 5-10%, so its merged/base ratio scatters by a few percent around 1. This script times
only the two models the criterion compares (our merged model and the untouched base, alternating), for every
mergeable method on both reference workloads, and reports the median paired ratio, the ratio of the fastest
runs and the process-CPU-time ratio.

    python -m experiments.benchmarks.merged_eval [--rounds 61] [--quick]

Writes ``merged_eval.json`` and ``merged_eval.md`` next to the main results (quick runs go to ``results/quick``).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from experiments.benchmarks.run import DEFAULT_OUT, TIMING_ENV

TOLERANCE = 0.03


def measure(workloads: list[str], labels: list[str] | None, rounds: int, quick: bool) -> dict[str, Any]:
    import lightning_adapters as la
    from experiments.benchmarks import measure as m
    from experiments.benchmarks.cases import CASES, named
    from experiments.benchmarks.workloads import build_model, get_workload, make_batch

    rows: list[dict[str, Any]] = []
    for wname in workloads:
        w = get_workload(wname, quick)
        base = build_model(w).eval()
        batch = make_batch(w)
        for case in CASES:
            if wname not in case.workloads or not named(case, labels):
                continue
            ours = m.build_ours(base, case, w).eval()
            try:
                la.merge(ours)
            except la.NotMergeableError:
                continue
            plain = copy.deepcopy(base)
            fns = {"merged": m.eval_fn(ours, batch), "base": m.eval_fn(plain, batch)}
            wall, cpu = m.alternate(fns, 3, rounds)
            row = {
                "workload": wname,
                "label": case.label,
                "rounds": rounds,
                "median_ratio": m.paired_ratio(wall["merged"], wall["base"]),
                "fastest_ratio": min(wall["merged"]) / min(wall["base"]),
                "cpu_ratio": m.paired_ratio(cpu["merged"], cpu["base"]),
                "base_median_ms": 1000 * statistics.median(wall["base"]),
            }
            rows.append(row)
            print(
                f"[merged-eval] {wname}/{case.label}: merged/base {row['median_ratio']:.3f} "
                f"(fastest {row['fastest_ratio']:.3f}, CPU {row['cpu_ratio']:.3f})",
                flush=True,
            )
            del ours, plain
    return {"measured_at": m.now(), "machine": m.machine(), "load_average_end": m.load_average(), "rows": rows}


def markdown(res: dict[str, Any]) -> str:
    mach = res["machine"]
    lines = [
        "# Merged model vs frozen base: eval latency",
        "",
        f"Measured {res['measured_at']} on `{mach.get('host')}` ({mach.get('cpu')}, {mach.get('cores')} cores; torch "
        f"{mach.get('torch')}). Two models alternate forward by forward (our adapter merged into the weights, and "
        "the untouched base); ratios are medians of per-round ratios.",
        "",
        "| workload | method | rounds | merged / base (median) | fastest runs | CPU time | base eval ms | within ±3% |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        ok = abs(r["median_ratio"] - 1) <= TOLERANCE
        lines.append(
            f"| {r['workload']} | {r['label']} | {r['rounds']} | {r['median_ratio']:.3f}× | "
            f"{r['fastest_ratio']:.3f}× | {r['cpu_ratio']:.3f}× | {r['base_median_ms']:.0f} | {'yes' if ok else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m experiments.benchmarks.merged_eval", description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, help="timed rounds per method (default 61; quick 2)")
    p.add_argument("--methods", nargs="+", help="row labels or method names (default: every mergeable one)")
    p.add_argument("--workloads", nargs="+", choices=["encoder", "decoder"], default=["encoder", "decoder"])
    p.add_argument("--quick", action="store_true", help="toy sizes (smoke test)")
    p.add_argument("--out", type=Path, help="output directory")
    args = p.parse_args(argv)
    import os

    import torch

    from experiments.benchmarks.measure import THREADS

    missing = {k: v for k, v in TIMING_ENV.items() if os.environ.get(k) != v}
    if missing and not args.quick:
        # glibc reads its malloc settings at start-up: re-execute this command with them.
        os.execvpe(
            sys.executable,
            [sys.executable, "-m", "experiments.benchmarks.merged_eval", *(argv or sys.argv[1:])],
            {**os.environ, **TIMING_ENV},
        )
    torch.set_num_threads(1 if args.quick else THREADS)
    rounds = args.rounds or (2 if args.quick else 61)
    res = measure(args.workloads, args.methods, rounds, args.quick)
    out = args.out or (DEFAULT_OUT / "quick" if args.quick else DEFAULT_OUT)
    out.mkdir(parents=True, exist_ok=True)
    if args.quick and out == DEFAULT_OUT / "quick":
        (out / ".gitignore").write_text("*\n")  # smoke-run numbers never belong in the repository
    (out / "merged_eval.json").write_text(json.dumps(res, indent=1, default=str))
    (out / "merged_eval.md").write_text(markdown(res))
    print(f"[merged-eval] wrote {out / 'merged_eval.json'}, {out / 'merged_eval.md'}", flush=True)


if __name__ == "__main__":
    main()
