"""LoHa / LoKr train-step time and peak memory against PEFT 0.21, on the reference encoder (or decoder).

Every linear layer of the blocks is adapted with r = 8. PEFT's adapter is created first, given random
non-zero factors (so every factor carries gradient, as in real training) and saved; ours is loaded from
that directory with ``load_peft``, so both start from the same weights. A step is zero_grad + forward +
backward + AdamW over the adapter parameters.

- Time: both models live in one process and their steps alternate, so drift in machine speed hits both
  alike; the medians and their ratio are printed.
- Memory: each implementation runs alone in a child process with a fixed glibc mmap threshold (so freed
  blocks go back to the OS and RSS follows live memory); the peak resident size during a few steps
  (``VmHWM`` after a reset through ``/proc/self/clear_refs``) is printed with the ratio. Linux only.

Run::

    MALLOC_TRIM_THRESHOLD_=-1 MALLOC_MMAP_THRESHOLD_=1000000000000 \\
        python -m experiments.benchmarks.lycoris_vs_peft --method loha lokr --steps 15
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from experiments.benchmarks.workloads import build_model, get_workload, make_batch


def _peft_config(method: str, targets: list[str]):
    from peft import LoHaConfig, LoKrConfig

    cls = LoHaConfig if method == "loha" else LoKrConfig
    return cls(r=8, alpha=8, target_modules=targets)


def _save_peft_adapter(method: str, workload: str, quick: bool, directory: str) -> None:
    from peft import get_peft_model

    w = get_workload(workload, quick)
    peft = get_peft_model(build_model(w), _peft_config(method, w.targets))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in peft.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    peft.save_pretrained(directory)


def _load(impl: str, workload: str, quick: bool, directory: str) -> torch.nn.Module:
    w = get_workload(workload, quick)
    base = build_model(w)
    if impl == "peft":
        from peft import PeftModel

        return PeftModel.from_pretrained(base, directory, is_trainable=True).train()
    import lightning_adapters as la

    return la.load_peft(base, directory).train()


def _optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, batch: dict) -> float:
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    opt.step()
    return time.perf_counter() - t0


def time_ratio(method: str, workload: str, quick: bool, steps: int, warmup: int, directory: str) -> dict:
    """Median step times of ours and PEFT's, alternating in this process."""
    w = get_workload(workload, quick)
    batch = make_batch(w)
    runs = {}
    for impl in ("ours", "peft"):
        model = _load(impl, workload, quick, directory)
        runs[impl] = (model, _optimizer(model))
    times: dict[str, list[float]] = {k: [] for k in runs}
    for i in range(warmup + steps):
        order = list(runs) if i % 2 == 0 else list(reversed(runs))
        for impl in order:
            t = _step(*runs[impl], batch)
            if i >= warmup:
                times[impl].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"ours_ms": med["ours"] * 1e3, "peft_ms": med["peft"] * 1e3, "ratio": med["ours"] / med["peft"]}


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _memory_child(impl: str, workload: str, quick: bool, directory: str, steps: int) -> None:
    w = get_workload(workload, quick)
    batch = make_batch(w)
    model = _load(impl, workload, quick, directory)
    opt = _optimizer(model)
    for _ in range(2):
        _step(model, opt, batch)
    opt.zero_grad(set_to_none=True)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _rss_kib("VmRSS")
    for _ in range(steps):
        _step(model, opt, batch)
    print(json.dumps({"peak_mib": _rss_kib("VmHWM") / 1024, "step_peak_mib": (_rss_kib("VmHWM") - before) / 1024}))


def peak_memory(impl: str, method: str, workload: str, quick: bool, directory: str, threads: int) -> dict:
    """Peak RSS of ``impl`` training alone, measured in a child process."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    cmd = [
        sys.executable,
        "-m",
        "experiments.benchmarks.lycoris_vs_peft",
        "--child",
        impl,
        "--method",
        method,
        "--workload",
        workload,
        "--dir",
        directory,
        "--threads",
        str(threads),
    ] + (["--quick"] if quick else [])
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", nargs="+", default=["loha", "lokr"], choices=["loha", "lokr"])
    parser.add_argument("--workload", default="encoder", choices=["encoder", "decoder"])
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="toy sizes, for a smoke run")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory children")
    parser.add_argument("--child", choices=["ours", "peft"], help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        _memory_child(args.child, args.workload, args.quick, args.dir, steps=3)
        return
    for method in args.method:
        with tempfile.TemporaryDirectory() as d:
            _save_peft_adapter(method, args.workload, args.quick, d)
            res = time_ratio(method, args.workload, args.quick, args.steps, args.warmup, d)
            print(
                f"{method} {args.workload}: ours {res['ours_ms']:.1f} ms, peft {res['peft_ms']:.1f} ms, "
                f"time ratio {res['ratio']:.3f}",
                flush=True,
            )
            if not args.no_memory:
                mem = {
                    impl: peak_memory(impl, method, args.workload, args.quick, d, args.threads)
                    for impl in ("ours", "peft")
                }
                print(
                    f"{method} {args.workload}: peak RSS ours {mem['ours']['peak_mib']:.0f} MiB "
                    f"(+{mem['ours']['step_peak_mib']:.0f} in steps), peft {mem['peft']['peak_mib']:.0f} MiB "
                    f"(+{mem['peft']['step_peak_mib']:.0f}), ratio {mem['ours']['peak_mib'] / mem['peft']['peak_mib']:.3f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
