"""The GPU benchmark in one command: every method against PEFT on a ~1B-parameter random Llama, bf16, seq 2048.

Usage::

    python -m experiments.benchmarks.gpu              # on a CUDA machine: under 5 minutes on an H200
    python -m experiments.benchmarks.gpu --tiny       # the same logic on a toy Llama (the GPU if any, else the CPU)

The model is Llama-3.2-1B's shape (hidden 2048, 16 layers, 32 heads / 8 KV heads, SwiGLU 8192) with a 32000-token
vocabulary: 1.1 B parameters, created directly on the device in bf16 with random weights (nothing downloaded).
Batch 1×2048. Each row of ``cases.py`` that PEFT runs is measured as the ``bf16`` cell of ``scale.py``: fp32
adapters on the bf16 base (both libraries' default), ours, PEFT and the frozen base timed alternately with CUDA
events, peak memory from ``torch.cuda.max_memory_allocated``. Everything runs in this one process (on a GPU the
allocator is per configuration measurable and no glibc setting applies); the rows are written after each method,
so a run cut short keeps what it measured. BOFT runs last: PEFT may JIT-build its CUDA extension first.

Writes ``gpu.json`` and ``gpu.md`` (date, device name, commit) to ``--out`` (default
``experiments/benchmarks/results/``; ``--tiny``: ``results/quick/``).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from experiments.benchmarks.run import DEFAULT_OUT
from experiments.benchmarks.workloads import DECODER_TARGETS, Workload

LLAMA_1B = Workload("llama-1b", "llama", 16, 2048, 32, 8, 8192, 32000, 1, 2048, DECODER_TARGETS)
TINY = Workload("llama-tiny", "llama", 2, 64, 4, 2, 128, 512, 1, 32, DECODER_TARGETS)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.benchmarks.gpu", description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="a toy Llama and two steps: checks the logic anywhere")
    p.add_argument("--device", help="default: cuda when available, else cpu")
    p.add_argument("--methods", nargs="+", help="row labels of cases.py (default: every row PEFT also runs)")
    p.add_argument("--variants", nargs="+", default=["bf16"], choices=["bf16", "bf16-adapters", "fp32"])
    p.add_argument("--steps", type=int, help="timed train steps (default 30; tiny 2)")
    p.add_argument("--warmup", type=int, default=5, help="untimed rounds after the memory step (default 5)")
    p.add_argument("--out", type=Path, help="output directory")
    p.add_argument("--profile", action="store_true", help="add the torch profiler's top-op tables of ours and PEFT")
    return p.parse_args(argv)


def default_device() -> str:
    """``cuda`` when a GPU is visible, else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def device_name(device: torch.device) -> str:
    """The accelerator's name (``NVIDIA H200``), or the CPU's model name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from experiments.benchmarks.measure import machine

    return f"CPU: {machine()['cpu']}"


def order(labels: list[str]) -> list[str]:
    """``labels`` with the BOFT rows last (PEFT may spend minutes building its CUDA extension for them)."""
    return sorted(labels, key=lambda label: label.startswith("boft"))


def peft_boft_extension_once() -> bool:
    """Build PEFT's BOFT CUDA extension once; if that fails, let PEFT use its PyTorch path without retrying.

    PEFT 0.21 caches the extension only when the build succeeds, so a failed build (its kernel does not compile
    against torch 2.11's dispatch macros) is retried for every BOFT layer it creates: tens of seconds each, which
    would time the compiler, not BOFT. Returns whether PEFT runs its CUDA kernel.
    """
    import peft.tuners.boft.layer as boft_layer

    built = boft_layer.get_fbd_cuda() is not None
    if not built:
        boft_layer.get_fbd_cuda = lambda: None
    return built


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    import lightning_adapters as la
    from experiments.benchmarks import measure, scale
    from experiments.benchmarks.cases import select
    from experiments.benchmarks.run import _commit, _setup_torch
    from experiments.benchmarks.workloads import build_model

    device = torch.device(args.device or default_device())
    _setup_torch(args.tiny and device.type == "cpu")
    w = TINY if args.tiny else LLAMA_1B
    steps = args.steps or (2 if args.tiny else 30)
    out = args.out or (DEFAULT_OUT / "quick" if args.tiny else DEFAULT_OUT)
    chosen, skipped = select(args.methods, la.available_methods())
    labels = order([c.label for c in chosen if c.peft and "decoder" in c.workloads])
    results: dict[str, Any] = {
        "meta": {
            "quick": args.tiny,
            "skipped": skipped,
            "runs": [
                {
                    "started": measure.now(),
                    "commit": _commit(),
                    "machine": measure.machine(),
                    "device": device_name(device),
                    "methods": labels,
                    "steps": steps,
                    "warmup": args.warmup,
                    "load_average_start": measure.load_average(),
                }
            ],
        },
        "rows": {},
    }
    run = results["meta"]["runs"][0]
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="la-gpu-") as tmp:
        for variant in args.variants:
            dtype = torch.bfloat16 if variant.startswith("bf16") else torch.float32
            base = build_model(w, device=device).to(dtype)
            for label in labels:
                if label.startswith("boft") and device.type == "cuda" and "peft_boft_cuda_extension" not in run:
                    run["peft_boft_cuda_extension"] = peft_boft_extension_once()
                t0 = time.perf_counter()
                print(f"[gpu] {label} {variant} on {device_name(device)}", flush=True)
                try:
                    entry = scale.measure_cell(
                        w,
                        label,
                        variant,
                        device,
                        args.warmup,
                        steps,
                        f"{tmp}/{label}-{variant}",
                        profile=args.profile,
                        base=base,
                    )
                except Exception as err:  # noqa: BLE001 - recorded; the other methods still run
                    entry = {"error": f"{type(err).__name__}: {err}"}
                entry["wall_s"] = round(time.perf_counter() - t0, 1)
                results["rows"].setdefault(label, {})[f"{variant}/{w.name}"] = entry
                run["finished"], run["total_s"] = measure.now(), round(time.perf_counter() - t_start, 1)
                _write(results, out, w)
            del base
            scale._free(device)
    run["load_average_end"] = measure.load_average()
    _write(results, out, w)
    print(f"[gpu] wrote {out / 'gpu.json'} and gpu.md in {run['total_s']} s", flush=True)
    return 0


def _write(results: dict[str, Any], out: Path, w: Workload) -> None:
    from experiments.benchmarks import scale_report

    out.mkdir(parents=True, exist_ok=True)
    if results["meta"].get("quick") and out == DEFAULT_OUT / "quick":
        (out / ".gitignore").write_text("*\n")
    (out / "gpu.json").write_text(json.dumps(results, indent=1, default=str))
    run = results["meta"]["runs"][0]
    cuda = "CUDA" in run["device"] or "NVIDIA" in run["device"]
    timer = "CUDA events" if cuda else "the wall clock"
    peak = "`max_memory_allocated`" if cuda else "torch profiler allocation events"
    intro = [
        f"Measured {run['started']} on **{run['device']}**, commit `{(run.get('commit') or '?')[:10]}`, in "
        f"{run.get('total_s')} s. Model: {w.describe()} ({_params(results)}), bf16 base; cell `bf16`: fp32 "
        "adapters (both libraries' default; PEFT keeps Llama-Adapter's prompts in bf16), `bf16-adapters`: bf16 "
        f"adapters on both sides. Train step timed with {timer} (ours, PEFT and the frozen base alternating in one "
        f"process), peak memory = tensors held + the {peak} high-water mark of the first train step.",
        "",
    ]
    title = "GPU benchmark: lightning_adapters vs PEFT"
    (out / "gpu.md").write_text(scale_report.markdown(results, title=title, intro=intro))
    tables = [
        f"## {label} {cell}: {side}\n\n```\n{table}\n```\n"
        for label, cells in results["rows"].items()
        for cell, entry in cells.items()
        for side, table in entry.get("profile", {}).items()
    ]
    if tables:
        commit = (run.get("commit") or "?")[:10]
        head = f"# Top ops (self time) of one train step, {run['device']}, commit `{commit}`\n\n"
        (out / "gpu_profiles.md").write_text(head + "\n".join(tables))


def _params(results: dict[str, Any]) -> str:
    for cells in results["rows"].values():
        for e in cells.values():
            if "base_params" in e:
                return f"{e['base_params'] / 1e6:,.1f} M parameters"
    return "parameters not measured"


if __name__ == "__main__":
    raise SystemExit(main())
