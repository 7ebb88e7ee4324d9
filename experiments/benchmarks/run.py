"""Benchmark every registered method against PEFT 0.21.2: train step, peak memory, eval latency, merge, sizes.

Usage::

    python -m experiments.benchmarks.run                        # everything (takes a while)
    python -m experiments.benchmarks.run --quick                # smoke run on toy sizes, under a minute
    python -m experiments.benchmarks.run --methods lora adalora --workloads encoder   # merged into the results

Writes ``results.json``, ``results.md`` and ``ratios.png`` to ``--out`` (default
``experiments/benchmarks/results/``; ``--quick`` defaults to ``results/quick/``). A run restricted with
``--methods``/``--workloads`` updates those entries of an existing ``results.json`` and keeps the others.

Each method row runs in its own process (the timing, with glibc told to keep freed memory, which removes most
page-fault noise on these VMs) and each peak-memory configuration in another fresh process with default
settings. ``--quick`` runs everything in this process instead.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = Path(__file__).resolve().parent / "results"
# glibc for timing: every allocation from the heap (no mmap, so the decoder's 131 MB logits stop page-faulting
# afresh each step), freed memory never returned (no trim), heap grown 512 MiB at a time. Cuts system time ~15×.
TIMING_ENV = {
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": str(2**40),
    "MALLOC_TOP_PAD_": str(512 * 2**20),
}
WORKER_TIMEOUT_S = 3 * 3600


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.benchmarks.run", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="toy sizes, few steps, in one process (smoke test)")
    p.add_argument("--methods", nargs="+", help="row labels or method names (default: every registered method)")
    p.add_argument("--workloads", nargs="+", choices=["encoder", "decoder"], help="default: both")
    p.add_argument("--out", type=Path, help="output directory")
    p.add_argument("--steps", type=int, help="timed train steps per configuration (default 21; quick 2)")
    p.add_argument("--warmup", type=int, help="untimed warm-up steps (default 3; quick 1)")
    p.add_argument("--eval-repeats", type=int, help="timed eval forwards per configuration (default 21; quick 2)")
    p.add_argument("--fresh", action="store_true", help="start new results instead of updating results.json")
    p.add_argument("--anchors", action="store_true", help="re-measure the anchors even when updating results")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    p.add_argument("--threads", type=int, help="torch threads (default 2, the reference setting; quick 1)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------------------
# Worker side (one process per measurement in full mode)


def _setup_torch(quick: bool, threads: int | None = None) -> None:
    import warnings

    import torch

    from experiments.benchmarks.measure import THREADS

    # Quick mode's toy ops are too small to share between threads: one thread avoids OpenMP barrier waits.
    torch.set_num_threads(threads or (1 if quick else THREADS))
    warnings.filterwarnings("ignore")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except ImportError:
        pass


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Execute one measurement described by ``job`` in this process."""
    from experiments.benchmarks import measure
    from experiments.benchmarks.workloads import get_workload

    _setup_torch(job["quick"], job.get("threads"))
    w = get_workload(job["workload"], job["quick"])
    if job["kind"] == "anchors":
        return measure.anchors_worker(w, job["warmup"], job["steps"], job["eval_repeats"])
    if job["kind"] == "method":
        return measure.method_worker(
            w, job["label"], job["warmup"], job["steps"], job["eval_repeats"], job["adapter_dir"], not job["quick"]
        )
    return measure.memory_worker(w, job["side"], job.get("label"), job.get("adapter_dir"))


def _worker_main(args: argparse.Namespace) -> None:
    job = json.loads(args.worker)
    try:
        out = run_job(job)
    except Exception:  # noqa: BLE001 - the parent records any failure as this row's error
        out = {"error": traceback.format_exc()}
    Path(args.worker_out).write_text(json.dumps(out))


def _spawn(job: dict[str, Any], timing: bool, module: str = "experiments.benchmarks.run") -> dict[str, Any]:
    """Run ``job`` in a fresh ``python -m module --worker`` process (glibc's ``TIMING_ENV`` when ``timing``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    if timing:
        env.update(TIMING_ENV)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "out.json"
        cmd = [
            sys.executable,
            "-m",
            module,
            "--worker",
            json.dumps(job),
            "--worker-out",
            str(out),
        ]
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return {"error": f"worker timed out after {WORKER_TIMEOUT_S} s"}
        if not out.exists():
            return {"error": f"worker exited {proc.returncode}: {proc.stderr[-3000:]}"}
        return json.loads(out.read_text())


def _measure(job: dict[str, Any], timing: bool) -> dict[str, Any]:
    if job["quick"]:
        try:
            return run_job(job)
        except Exception:  # noqa: BLE001 - recorded as this row's error
            return {"error": traceback.format_exc()}
    return _spawn(job, timing)


# ------------------------------------------------------------------------------------------------------------
# Orchestration


def _load(path: Path, fresh: bool, quick: bool, restricted: bool) -> dict[str, Any]:
    if path.exists() and not fresh and restricted:
        old = json.loads(path.read_text())
        if bool(old.get("meta", {}).get("quick")) == quick:
            return old
    return {"meta": {"runs": [], "quick": quick}, "workloads": {}}


def _write(results: dict[str, Any], out: Path) -> None:
    from experiments.benchmarks import report

    out.mkdir(parents=True, exist_ok=True)
    if results["meta"].get("quick") and out == DEFAULT_OUT / "quick":
        (out / ".gitignore").write_text("*\n")  # smoke-run numbers never belong in the repository
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "results.md").write_text(report.markdown(results))
    report.chart(results, out / "ratios.png")


def _commit() -> str | None:
    """The measured code's git commit (``LA_BENCH_COMMIT`` when run from an exported snapshot)."""
    if os.environ.get("LA_BENCH_COMMIT"):
        return os.environ["LA_BENCH_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.worker:
        _worker_main(args)
        return 0
    _setup_torch(args.quick, args.threads)
    import lightning_adapters as la
    from experiments.benchmarks import measure
    from experiments.benchmarks.cases import case_by_label, select
    from experiments.benchmarks.workloads import get_workload

    quick = args.quick
    out = args.out or (DEFAULT_OUT / "quick" if quick else DEFAULT_OUT)
    steps = args.steps or (2 if quick else 21)
    warmup = args.warmup if args.warmup is not None else (1 if quick else 3)
    eval_repeats = args.eval_repeats or (2 if quick else 21)
    workloads = args.workloads or ["encoder", "decoder"]
    cases, skipped = select(args.methods, la.available_methods())
    results = _load(out / "results.json", args.fresh, quick, bool(args.methods or args.workloads))
    run_meta = {
        "started": measure.now(),
        "commit": _commit(),
        "machine": measure.machine(),
        "methods": [c.label for c in cases],
        "workloads": workloads,
        "quick": quick,
        "steps": steps,
        "warmup": warmup,
        "eval_repeats": eval_repeats,
        "timing_env": TIMING_ENV if not quick else "in-process (quick)",
        "load_average_start": measure.load_average(),
    }
    results["meta"]["runs"].append(run_meta)
    results["meta"]["skipped"] = skipped
    results["meta"]["peft_version"] = run_meta["machine"]["peft"]
    for s in skipped:
        print(f"[bench] skip {s}", flush=True)
    common = {"quick": quick, "steps": steps, "warmup": warmup, "eval_repeats": eval_repeats, "threads": args.threads}
    with tempfile.TemporaryDirectory(prefix="la-bench-") as tmp:
        for wname in workloads:
            wres = results["workloads"].setdefault(wname, {})
            wres["description"] = get_workload(wname, quick).describe()
            methods = wres.setdefault("methods", {})
            if args.anchors or "anchors" not in wres or not (args.methods or args.workloads):
                print(f"[bench] {wname}: anchors", flush=True)
                wres["anchors"] = _measure({"kind": "anchors", "workload": wname, **common}, timing=True)
                if not args.no_memory:
                    wres["memory"] = {
                        side: _measure({"kind": "memory", "workload": wname, "side": side, **common}, timing=False)
                        for side in ("base", "full")
                    }
                _write(results, out)
            for case in cases:
                if wname not in case.workloads:
                    continue
                print(f"[bench] {wname}: {case.label}", flush=True)
                adir = str(Path(tmp) / wname / case.label)
                job = {"kind": "method", "workload": wname, "label": case.label, "adapter_dir": adir, **common}
                entry = _measure(job, timing=True)
                if "error" not in entry and not args.no_memory:
                    mem = {"ours": {"side": "ours", "label": case.label}}
                    if case.peft:
                        mem["peft"] = {"side": "peft", "label": case.label, "adapter_dir": adir}
                    else:
                        mem[entry["other"]] = {"side": "ours", "label": case_by_label(case.compare_to).label}
                    entry["memory"] = {
                        k: _measure({"kind": "memory", "workload": wname, **spec, **common}, timing=False)
                        for k, spec in mem.items()
                    }
                if "error" in entry:
                    print(f"[bench] {wname}: {case.label} failed:\n{entry['error']}", flush=True)
                methods[case.label] = entry
                _write(results, out)
    run_meta["finished"] = measure.now()
    run_meta["load_average_end"] = measure.load_average()
    _write(results, out)
    print(f"[bench] wrote {out / 'results.json'}, results.md, ratios.png", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
