"""OFT and BOFT train step and peak memory against PEFT 0.21, alternating in one process.

Encoder of PERFORMANCE.md (BERT-style, hidden 384, 6 layers, 12 heads, ffn 1536, batch 16×128, fp32, CPU),
every linear of the blocks targeted. Rows: OFT (block 32, PEFT's default Cayley-Neumann), BOFT (block 4, m = 1)
against PEFT, and our BOFT with m = 2 against our m = 1 (PEFT runs m > 1 only with its CUDA extension). A step
is zero_grad + forward + backward + AdamW; the two models of a row start from the same base and the same
adapter values (PEFT's, loaded with ``load_peft``) and their steps alternate, so drift in machine speed hits
both alike. Peak memory: each (row, side) in a fresh process, the RSS high-water mark of two steps minus the
resident model before them.

Run (glibc settings keep freed memory mapped, which removes most page-fault noise on these VMs)::

    MALLOC_TRIM_THRESHOLD_=-1 MALLOC_MMAP_THRESHOLD_=1000000000000 \\
        python -m experiments.benchmarks.oft_boft_vs_peft --steps 15
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch
from torch import nn

from experiments.benchmarks.measure import _reset_peak, _rss_kib, _trim, cpu_seconds, randomize
from experiments.benchmarks.workloads import get_workload

ROWS: dict[str, tuple[str, dict[str, Any], str, dict[str, Any] | None]] = {
    # label: (method, our/PEFT config, reference side, reference config when the reference is ours)
    "oft": ("oft", {"r": 0, "oft_block_size": 32}, "peft", None),
    "boft_m1": ("boft", {"boft_block_size": 4, "boft_block_num": 0, "boft_n_butterfly_factor": 1}, "peft", None),
    "boft_m2": (
        "boft",
        {"boft_block_size": 4, "boft_block_num": 0, "boft_n_butterfly_factor": 2},
        "ours",
        {"boft_block_size": 4, "boft_block_num": 0, "boft_n_butterfly_factor": 1},
    ),
}


def _peft_config(method: str, kw: dict[str, Any], targets: list[str]):
    from peft import BOFTConfig, OFTConfig

    return (OFTConfig if method == "oft" else BOFTConfig)(target_modules=list(targets), **kw)


def build_pair(label: str, quick: bool) -> tuple[dict[str, nn.Module], dict[str, torch.Tensor]]:
    """``{"ours": model, <reference>: model}`` for a row, with identical base and adapter values, and a batch."""
    import lightning_adapters as la
    from experiments.benchmarks.workloads import build_model, make_batch

    method, kw, ref_side, ref_kw = ROWS[label]
    w = get_workload("encoder", quick)
    base = build_model(w)
    cfg_cls = la.get_method(method).config_cls
    if ref_side == "peft":
        from peft import get_peft_model

        peft = get_peft_model(copy.deepcopy(base), _peft_config(method, kw, w.targets))
        randomize(peft)
        with tempfile.TemporaryDirectory() as d:
            peft.save_pretrained(d)
            ours = la.load_peft(copy.deepcopy(base), d)
        models = {"ours": ours.train(), "peft": peft.train()}
    else:
        ours = la.inject(copy.deepcopy(base), cfg_cls(target_modules=list(w.targets), **kw))
        ref = la.inject(copy.deepcopy(base), cfg_cls(target_modules=list(w.targets), **ref_kw))
        randomize(ours)
        randomize(ref)
        models = {"ours": ours.train(), "ours_m1": ref.train()}
    return models, make_batch(w)


def _stepper(model: nn.Module, batch: dict[str, torch.Tensor]):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        opt.step()

    return step


def time_row(label: str, steps: int, warmup: int, quick: bool) -> dict[str, Any]:
    """Median step times of both sides of a row and the median of per-round ratios ours / reference."""
    models, batch = build_pair(label, quick)
    names = list(models)
    with torch.no_grad():
        out = [m(**batch).logits for m in models.values()]
    fns = {k: _stepper(m, batch) for k, m in models.items()}
    times: dict[str, list[float]] = {k: [] for k in names}
    cpu: dict[str, list[float]] = {k: [] for k in names}
    for i in range(warmup + steps):
        order = names[i % 2 :] + names[: i % 2]  # alternate which side goes first
        for k in order:
            c0, t0 = cpu_seconds(), time.perf_counter()
            fns[k]()
            if i >= warmup:
                times[k].append(time.perf_counter() - t0)
                cpu[k].append(cpu_seconds() - c0)
    ours, ref = times[names[0]], times[names[1]]
    return {
        "row": label,
        "reference": names[1],
        "median_ms": {k: 1000 * statistics.median(v) for k, v in times.items()},
        "ratio": statistics.median(a / b for a, b in zip(ours, ref)),
        # Process CPU time is less distorted than wall time when other processes take the cores away.
        "cpu_ratio": statistics.median(a / b for a, b in zip(cpu[names[0]], cpu[names[1]])),
        "max_abs_logit_diff_at_start": float((out[0] - out[1]).abs().max()) if names[1] == "peft" else None,
        "steps": steps,
    }


def memory_side(label: str, side: str, quick: bool, steps: int = 2) -> dict[str, Any]:
    """Peak RSS added by ``steps`` train steps of one side of a row (call in a fresh process)."""
    models, batch = build_pair(label, quick)
    model = models[side]
    models.clear()
    fn = _stepper(model, batch)
    _trim()
    rss0 = _rss_kib("VmRSS")
    reset = _reset_peak()
    for _ in range(steps):
        fn()
    peak = _rss_kib("VmHWM")
    return {
        "row": label,
        "side": side,
        "step_peak_mib": (peak - rss0) / 1024 if reset else None,
        "peak_mib": peak / 1024,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="toy sizes, for a smoke run")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--memory-worker", nargs=2, metavar=("ROW", "SIDE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_worker:
        print(json.dumps(memory_side(*args.memory_worker, args.quick)))
        return
    results: dict[str, Any] = {"torch": torch.__version__, "threads": args.threads, "rows": []}
    for label in args.rows:
        row = time_row(label, args.steps, args.warmup, args.quick)
        if not args.no_memory:
            row["step_peak_mib"] = {}
            for side in ("ours", row["reference"]):
                cmd = [sys.executable, "-m", "experiments.benchmarks.oft_boft_vs_peft", "--memory-worker", label, side]
                cmd += ["--threads", str(args.threads)] + (["--quick"] if args.quick else [])
                env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}  # default allocator
                done = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
                row["step_peak_mib"][side] = json.loads(done.stdout.strip().splitlines()[-1])["step_peak_mib"]
            mem = row["step_peak_mib"]
            if all(v is not None for v in mem.values()):
                row["memory_ratio"] = mem["ours"] / mem[row["reference"]]
        results["rows"].append(row)
        ms = row["median_ms"]
        mem_txt = f", step memory ours/{row['reference']} {row['memory_ratio']:.2f}" if "memory_ratio" in row else ""
        print(
            f"{label}: ours {ms['ours']:.0f} ms, {row['reference']} {ms[row['reference']]:.0f} ms, "
            f"ratio {row['ratio']:.3f} (CPU time {row['cpu_ratio']:.3f}){mem_txt}",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
