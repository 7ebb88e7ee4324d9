"""Where a method's train step spends its time over the frozen base's, measured so that a shared machine hardly matters.

Usage::

    python -m experiments.benchmarks.profile_overhead --methods oft lokr --workloads encoder decoder --top 12

For each row and workload, in one process, with the benchmark's own models, adapters and train step
(``measure.py``): the CPU time of every aten op of one train step (a ``TorchDispatchMode`` reads the process and
thread CPU clocks around each op), summed per op and input shapes, ours minus the frozen base's, plus the
step's FLOP limit (``cases.py``). Wall-clock profiles (torch.profiler) are useless while other processes share
the cores: a preempted thread stretches whatever op it was in. CPU time is not, so with ``--threads 1`` (the
default) the figures are the single-thread work of each op. With ``--threads 2`` OpenMP waits passively
(``OMP_WAIT_POLICY=PASSIVE``, set by re-executing) and each op counts ``max(calling thread, other threads)``: its
wall time on two idle cores, which shows the products that BLAS runs on one thread only.

``× base`` here is the ratio of summed op time plus the calling thread's time outside ops (Python, autograd; it
includes this profiler's own per-op cost, a few µs per op, so a method with many small ops is overstated).
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from experiments.benchmarks.run import TIMING_ENV, _setup_torch

OpKey = tuple[str, tuple[tuple[int, ...], ...]]


def op_profile(step: Callable[[], None], steps: int) -> tuple[dict[OpKey, tuple[float, int]], float]:
    """``({(op, input shapes): (ms per step, calls per step)}, ms per step outside ops)`` over ``steps`` steps."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    proc, thread = time.process_time, time.thread_time

    class CpuClock(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ms: dict[OpKey, float] = collections.defaultdict(float)
            self.calls: collections.Counter[OpKey] = collections.Counter()
            self.main = 0.0

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            shapes = tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))
            p0, t0 = proc(), thread()
            out = func(*args, **(kwargs or {}))
            p1, t1 = proc(), thread()
            main = t1 - t0
            key = (func.overloadpacket.__name__, shapes)
            self.ms[key] += max(main, (p1 - p0) - main) * 1e3
            self.calls[key] += 1
            self.main += main
            return out

    clock = CpuClock()
    t0 = thread()
    with clock:
        for _ in range(steps):
            step()
    outside = (thread() - t0 - clock.main) * 1e3 / steps
    return {k: (v / steps, clock.calls[k] // steps) for k, v in clock.ms.items()}, outside


def diff_table(ours: dict[OpKey, tuple[float, int]], base: dict[OpKey, tuple[float, int]], top: int) -> list[str]:
    """Markdown rows of the ``top`` ops whose time grows most from the base's step to ours, then the (up to 3) that
    shrink most: the base's products that ours runs in another shape (e.g. a wider folded product)."""
    keys = sorted(set(ours) | set(base), key=lambda k: ours.get(k, (0.0, 0))[0] - base.get(k, (0.0, 0))[0])
    shrink = [k for k in keys[:3] if ours.get(k, (0.0, 0))[0] - base.get(k, (0.0, 0))[0] < -1.0]
    lines = ["| op | input shapes | ours ms | base ms | Δ ms | calls ours / base |", "|---|---|---|---|---|---|"]
    for k in [*reversed(keys[-top:]), *shrink]:
        (o, oc), (b, bc) = ours.get(k, (0.0, 0)), base.get(k, (0.0, 0))
        shapes = ", ".join("×".join(map(str, s)) or "scalar" for s in k[1])
        lines.append(f"| `{k[0]}` | {shapes} | {o:.1f} | {b:.1f} | {o - b:+.1f} | {oc} / {bc} |")
    return lines


def by_op(ours: dict[OpKey, tuple[float, int]], base: dict[OpKey, tuple[float, int]], top: int) -> str:
    """The ``top`` op names by added time over all shapes: ``name +ms (calls ours/base)``."""
    agg: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0, 0, 0])
    for side, prof in ((0, ours), (1, base)):
        for (name, _), (ms, calls) in prof.items():
            agg[name][side] += ms
            agg[name][2 + side] += calls
    rows = sorted(agg.items(), key=lambda kv: kv[1][1] - kv[1][0])[:top]
    return ", ".join(f"`{n}` {a[0] - a[1]:+.0f} ({a[2]:.0f}/{a[3]:.0f})" for n, a in rows)


def measure_row(label: str, workload: str, steps: int, top: int) -> list[str]:
    """The report lines of one row on one workload."""
    import torch

    import lightning_adapters as la  # noqa: F401 - registers the methods
    from experiments.benchmarks import flops
    from experiments.benchmarks.cases import case_by_label
    from experiments.benchmarks.measure import build_ours, freeze_as_base, layer_infos, our_config, train_step
    from experiments.benchmarks.workloads import build_model, get_workload, make_batch

    w = get_workload(workload, False)
    case = case_by_label(label)
    base = build_model(w)
    batch = make_batch(w)
    ours = build_ours(base, case, w)
    cfg = our_config(case, w)
    fns = {"ours": train_step(ours, batch, "ours", cfg), "base": train_step(freeze_as_base(base), batch, "plain")}
    for _ in range(2):
        fns["ours"](), fns["base"]()
    prof_o, out_o = op_profile(fns["ours"], steps)
    prof_b, out_b = op_profile(fns["base"], steps)
    tot_o = sum(v[0] for v in prof_o.values()) + out_o
    tot_b = sum(v[0] for v in prof_b.values()) + out_b
    base_macs = flops.base_train_macs(w)
    limit = (base_macs + case.adapter_macs(w, layer_infos(ours), case.config)) / base_macs
    threads = torch.get_num_threads()
    return [
        f"#### {label} × {workload}",
        "",
        f"Op-time profile ({threads} thread{'s' if threads > 1 else ''}, {steps} steps): ours {tot_o:.0f} ms, "
        f"base {tot_b:.0f} ms per step, × base {tot_o / tot_b:.3f} (FLOP limit {limit:.3f}); outside ops "
        f"(Python, autograd, profiler) ours {out_o:.0f} ms, base {out_b:.0f} ms. Added time by op: "
        f"{by_op(prof_o, prof_b, 8)}.",
        "",
        *diff_table(prof_o, prof_b, top),
        "",
    ]


def main(argv: list[str] | None = None) -> int:
    prog = "python -m experiments.benchmarks.profile_overhead"
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    p.add_argument("--methods", nargs="+", required=True, help="row labels of cases.py")
    p.add_argument("--workloads", nargs="+", choices=["encoder", "decoder"], default=["encoder", "decoder"])
    p.add_argument("--steps", type=int, default=2, help="profiled steps per side")
    p.add_argument("--threads", type=int, default=1, help="torch threads (2: per-op wall time on two idle cores)")
    p.add_argument("--top", type=int, default=12, help="ops listed per profile")
    args = p.parse_args(argv)
    env = {**TIMING_ENV, **({"OMP_WAIT_POLICY": "PASSIVE"} if args.threads > 1 else {})}
    if argv is None and any(os.environ.get(k) != v for k, v in env.items()):
        os.environ.update(env)  # glibc and OpenMP read these at start-up
        os.execv(sys.executable, [sys.executable, "-m", "experiments.benchmarks.profile_overhead", *sys.argv[1:]])
    _setup_torch(False, args.threads)
    for wname in args.workloads:
        for label in args.methods:
            print("\n".join(measure_row(label, wname, args.steps, args.top)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
