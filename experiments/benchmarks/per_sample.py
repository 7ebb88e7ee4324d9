"""Per-sample routing vs one batched forward of a single adapter, on the decoder workload.

For each method, two adapters ``a`` and ``b`` of the same config are injected into the decoder workload's model.
Timed in one process, interleaved: the forward (eval, no grad) of the batch with only ``a`` active, and the same
batch routed ``a, b, a, b`` by ``la.per_sample``. The ratio routed / single is the cost of routing; the goal is
at most 1.3. ``--quick`` runs the toy workload (a smoke test of the script).

    python -m experiments.benchmarks.per_sample [--quick] [--repeats 7] [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import lightning_adapters as la
from experiments.benchmarks.workloads import DECODER_TARGETS, FULL, QUICK, build_model, make_batch

CONFIGS = {
    "lora": lambda: la.LoRAConfig(r=8, alpha=16, target_modules=DECODER_TARGETS, init_weights=False),
    "loha": lambda: la.LoHaConfig(r=8, alpha=16, target_modules=DECODER_TARGETS, init_weights=False),
    "lokr": lambda: la.LoKrConfig(r=8, alpha=16, target_modules=DECODER_TARGETS, init_weights=False),
    "oft": lambda: la.OFTConfig(r=0, oft_block_size=32, target_modules=DECODER_TARGETS),
}


def _time(fn) -> tuple[float, float]:
    """Wall and process-CPU seconds of one call (CPU time is the figure that survives a shared machine)."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def measure(method: str, quick: bool, repeats: int) -> dict[str, float]:
    """Median seconds (wall and CPU) of the single-adapter and the routed forward, and their ratios."""
    w = (QUICK if quick else FULL)["decoder"]
    model = build_model(w).eval()
    la.inject(model, CONFIGS[method](), name="a")
    la.inject(model, CONFIGS[method](), name="b")
    ids = make_batch(w)["input_ids"]
    names = ["a" if i % 2 == 0 else "b" for i in range(ids.shape[0])]

    def single() -> None:
        model(input_ids=ids)

    def routed() -> None:
        with la.per_sample(model, names):
            model(input_ids=ids)

    with torch.no_grad():
        single(), routed()  # warm-up
        s, r = [], []
        for _ in range(repeats):
            s.append(_time(single))
            r.append(_time(routed))
    wall_s, wall_r = statistics.median(t[0] for t in s), statistics.median(t[0] for t in r)
    cpu_s, cpu_r = statistics.median(t[1] for t in s), statistics.median(t[1] for t in r)
    return {
        "single_s": wall_s,
        "routed_s": wall_r,
        "ratio": wall_r / wall_s,
        "single_cpu_s": cpu_s,
        "routed_cpu_s": cpu_r,
        "cpu_ratio": cpu_r / cpu_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--methods", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's; 1 on a shared machine)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = {m: measure(m, args.quick, args.repeats) for m in args.methods}
    print("| method | single adapter (ms) | routed a,b,a,b (ms) | routed / single | CPU time routed / single |")
    print("|---|---|---|---|---|")
    for m, r in rows.items():
        print(
            f"| {m} | {r['single_s'] * 1e3:.1f} | {r['routed_s'] * 1e3:.1f} | {r['ratio']:.2f} | {r['cpu_ratio']:.2f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
