"""Scale curves: every method against PEFT 0.21.2 as the decoder grows, plus bf16 and ``torch.compile`` rows.

Usage::

    python -m experiments.benchmarks.scale                    # the scale grid and the variant rows (~45 min CPU)
    python -m experiments.benchmarks.scale --quick            # smoke run on toy sizes, in this process
    python -m experiments.benchmarks.scale --methods lora --points h512-s1024-L2 --variants   # merged into results
    python -m experiments.benchmarks.scale --device cuda      # the same on a GPU (CUDA events, CUDA peak memory)

The grid (``--points``): the Llama decoder at hidden 512 → 1024 → 2048 → 4096 at sequence 256 (two layers, one at
4096, so the model fits and the run fits in ~40 minutes of two CPU cores), and at sequence 256 → 1024 → 2048 at
hidden 512; batch 1, fp32. The variant rows (``--variants``) run the reference decoder workload (4 layers, hidden
512, batch 4×256) as ``bf16`` (bf16 base, fp32 adapters: both libraries' default), ``bf16-adapters`` (adapters in
bf16 too) and ``compile`` (fp32, ours and PEFT each through ``Module.compile``; compilation is excluded from the
timing, the warm-up steps are run). Every cell times ours, PEFT and the frozen base alternately in one process (one
process per method, as ``run.py``; on the CPU with ``run.TIMING_ENV``) and takes each configuration's peak tensor
memory (``measure.step_peak_bytes``: the torch profiler's allocation events on CPU, ``max_memory_allocated`` on
CUDA) over its first train step on top of the tensors it holds.

Writes ``scale.json``, ``scale.md`` and one ``scale_<row>.png`` per method to ``--out`` (default
``experiments/benchmarks/results/``; ``--quick``: ``results/quick/``). A run restricted with ``--methods``,
``--points`` or ``--variants`` updates those cells of an existing ``scale.json`` and keeps the others.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from experiments.benchmarks.run import DEFAULT_OUT, TIMING_ENV

# (hidden, seq, layers): the hidden sweep at seq 256, then the sequence sweep at hidden 512. Hidden 4096 (one
# layer: 0.44 B parameters, ~7 GiB for the four copies a cell holds) fits in memory; it runs when named in --points.
FULL_POINTS = [(512, 256, 2), (1024, 256, 2), (2048, 256, 1), (512, 1024, 2), (512, 2048, 2)]
QUICK_POINTS = [(64, 16, 1), (128, 16, 1), (64, 32, 1)]
VARIANTS = ("bf16", "bf16-adapters", "compile")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.benchmarks.scale", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="toy sizes, few steps, in one process (smoke test)")
    p.add_argument("--methods", nargs="+", help="row labels of cases.py (default: every row PEFT also runs)")
    p.add_argument("--points", nargs="*", help="grid points like h512-s256-L2 (default: the full grid; none: skip)")
    p.add_argument("--variants", nargs="*", choices=VARIANTS, help="variant rows (default: all; none: skip)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--steps", type=int, help="timed train steps per cell (default 3; quick 2)")
    p.add_argument("--warmup", type=int, help="untimed rounds after the memory step (default 1)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default 2; quick 1)")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the compile rows")
    p.add_argument("--profile", action="store_true", help="also write torch.profiler op tables of ours and PEFT")
    p.add_argument("--out", type=Path, help="output directory")
    p.add_argument("--fresh", action="store_true", help="start new results instead of updating scale.json")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def point_name(hidden: int, seq: int, layers: int) -> str:
    """``h512-s256-L2``: the name of a grid point (also its workload's name)."""
    return f"h{hidden}-s{seq}-L{layers}"


def parse_point(name: str) -> tuple[int, int, int]:
    """``"h512-s256-L2"`` -> ``(512, 256, 2)``."""
    try:
        h, s, n = name.split("-")
        assert h[0] == "h" and s[0] == "s" and n[0] == "L"
        return int(h[1:]), int(s[1:]), int(n[1:])
    except (ValueError, AssertionError, IndexError):
        raise SystemExit(f"bad --points entry {name!r}: write hHIDDEN-sSEQ-LLAYERS, e.g. h1024-s256-L2") from None


# ------------------------------------------------------------------------------------------------------------
# One cell: one method at one point or variant, ours vs PEFT vs the frozen base, in this process


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_cell(
    w: Any,
    label: str,
    variant: str,
    device: str | torch.device,
    warmup: int,
    steps: int,
    adapter_dir: str,
    compile_backend: str = "inductor",
    profile: bool = False,
    base: torch.nn.Module | None = None,
) -> dict[str, Any]:
    """Train step, peak memory and FLOP limit of ours vs PEFT vs the frozen base for the row ``label`` on ``w``.

    Args:
        w: The workload (``workloads.Workload``).
        label: Row label of ``cases.py`` (a row PEFT runs).
        variant: ``fp32``, ``bf16`` (bf16 base, fp32 adapters), ``bf16-adapters`` or ``compile`` (fp32, compiled).
        device: Where the models run.
        warmup, steps: Untimed and timed rounds of the alternating timing.
        adapter_dir: Where our adapter is saved for PEFT to load.
        compile_backend: ``torch.compile`` backend of the ``compile`` variant.
        profile: Add the torch profiler's top-op tables of one step of ours and of PEFT.
        base: The base model in the variant's dtype on ``device`` (built from ``w`` when None); not modified.
    """
    import lightning_adapters as la
    from experiments.benchmarks import flops, measure
    from experiments.benchmarks.cases import case_by_label
    from experiments.benchmarks.workloads import build_model, make_batch

    dev = torch.device(device)
    case = case_by_label(label)
    dtype = torch.bfloat16 if variant.startswith("bf16") else torch.float32
    res: dict[str, Any] = {"label": label, "variant": variant, "workload": w.describe(), "measured_at": measure.now()}
    res["load_average_start"] = measure.load_average()
    own_base = base is None
    if base is None:
        base = build_model(w, device=dev).to(dtype)
    res["base_params"] = sum(p.numel() for p in base.parameters())
    batch = make_batch(w, device=dev)
    overrides: dict[str, Any] = {"adapter_dtype": "bfloat16"} if variant == "bf16-adapters" else {}
    if "adapter_layers" in case.config:  # Llama-Adapter: no more adapted layers than the model has
        overrides["adapter_layers"] = min(case.config["adapter_layers"], w.layers)
    cfg = measure.our_config(case, w, **overrides)
    ours = measure.build_ours(base, case, w, **overrides)
    Path(adapter_dir).mkdir(parents=True, exist_ok=True)
    la.save_peft(ours, adapter_dir)
    peft = measure.load_peft_model(base, adapter_dir, autocast_adapter_dtype=variant != "bf16-adapters")
    frozen = measure.freeze_as_base(base if own_base else copy.deepcopy(base))  # one weight copy less when ours
    models = {"ours": ours, "peft": peft, "base": frozen}
    res["adapter_dtype"] = {
        k: sorted({str(p.dtype).removeprefix("torch.") for p in m.parameters() if p.requires_grad})
        for k, m in models.items()
        if k != "base"
    }
    layers = measure.layer_infos(ours)
    base_macs = flops.base_train_macs(w)
    fields = dict(case.config, **overrides)
    res["flops"] = {"limit_over_base": (base_macs + case.adapter_macs(w, layers, fields)) / base_macs}
    if variant != "compile":
        res["max_abs_logit_diff"] = measure.outputs_diff(ours, peft, batch)
    kinds = {"ours": "ours", "peft": "peft", "base": "plain"}
    fns = {
        "ours": measure.train_step(ours, batch, "ours", cfg),
        "peft": measure.train_step(peft, batch, "peft"),
        "base": measure.train_step(frozen, batch, "plain"),
    }
    if variant == "compile":
        res["compile_s"] = {}
        for k, m in models.items():
            called = measure.called_module(m, kinds[k])  # what the step calls, not the wrapper around it
            called.compile(backend=compile_backend)
            t0 = time.perf_counter()
            fns[k]()  # compiles forward and backward; not timed
            res["compile_s"][k] = round(time.perf_counter() - t0, 1)
    # Peak tensor memory: what the configuration holds (weights, gradients, optimizer state) + one step's peak.
    res["memory"] = {}
    for k, fn in fns.items():
        held = measure.tensor_bytes(models[k], fn.optimizer) if fn.optimizer else measure.tensor_bytes(models[k])
        peak = measure.step_peak_bytes(fn, 1, dev)  # step 1 allocates the optimizer state; later steps repeat it
        res["memory"][k] = {"held_mib": held / 2**20, "step_peak_mib": peak / 2**20, "peak_mib": (held + peak) / 2**20}
    mem = res["memory"]
    res["memory"]["ours_over_peft"] = mem["ours"]["peak_mib"] / mem["peft"]["peak_mib"]
    res["memory"]["step_ours_over_peft"] = mem["ours"]["step_peak_mib"] / max(mem["peft"]["step_peak_mib"], 1e-9)
    res["memory"]["ours_over_base"] = mem["ours"]["peak_mib"] / mem["base"]["peak_mib"]
    cpu0, wall0 = measure.cpu_seconds(), time.perf_counter()
    times, cpu = measure.alternate(fns, warmup, steps, dev)
    res["train_cpu_util"] = round((measure.cpu_seconds() - cpu0) / (time.perf_counter() - wall0), 3)
    res["threads"], res["device"] = torch.get_num_threads(), dev.type
    pairs = {"ours_over_peft": ("ours", "peft"), "ours_over_base": ("ours", "base"), "peft_over_base": ("peft", "base")}
    res["train"] = measure.summarize(times)
    res["train"].update(measure.ratios(times, pairs))
    res["train"]["cpu_time"] = measure.ratios(cpu, pairs)
    if profile:
        res["profile"] = {k: op_table(fns[k], dev) for k in ("ours", "peft")}
    res["load_average_end"] = measure.load_average()
    del fns, models, ours, peft, frozen
    _free(dev)
    return res


def op_table(fn: Any, device: torch.device, rows: int = 25) -> str:
    """The torch profiler's table of the ``rows`` most expensive ops (self time) of one call of ``fn``."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts, profile_memory=True) as prof:
        fn()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=48)


def run_job(job: dict[str, Any], on_cell: Any = None) -> dict[str, Any]:
    """Every cell of one method (``job["cells"]``), in this process; a failed cell records its error.

    ``on_cell``: called with the results so far after each cell (the worker saves them, so a worker stopped
    midway still returns the cells it measured).
    """
    from experiments.benchmarks.run import _setup_torch
    from experiments.benchmarks.workloads import get_workload, scaled_decoder

    _setup_torch(job["quick"], job.get("threads"))
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="la-scale-") as tmp:
        for cell in job["cells"]:
            key = cell_key(cell["variant"], cell["point"])
            if cell["point"] == "decoder":
                w = get_workload("decoder", job["quick"])
            else:  # quick: a toy vocabulary, so the toy blocks are not lost behind the LM head
                w = scaled_decoder(*cell["point"], vocab=512 if job["quick"] else 32000)
            print(f"[scale] {job['label']}: {key}", flush=True)
            try:
                out[key] = measure_cell(
                    w,
                    job["label"],
                    cell["variant"],
                    job["device"],
                    job["warmup"],
                    job["steps"],
                    str(Path(tmp) / key.replace("/", "_")),
                    job.get("compile_backend", "inductor"),
                    job.get("profile", False),
                )
            except Exception:  # noqa: BLE001 - recorded as this cell's error; the other cells still run
                out[key] = {"error": traceback.format_exc()}
                _free(torch.device(job["device"]))
            if on_cell is not None:
                on_cell(out)
    return out


def cell_key(variant: str, point: Any) -> str:
    """``fp32/h512-s256-L2`` for grid points, ``bf16/decoder`` for the variant rows."""
    return f"{variant}/{point if isinstance(point, str) else point_name(*point)}"


def _worker_main(args: argparse.Namespace) -> None:
    job = json.loads(args.worker)
    path = Path(args.worker_out)
    try:
        out = run_job(job, on_cell=lambda so_far: path.write_text(json.dumps(so_far)))
    except Exception:  # noqa: BLE001 - the parent records any failure as this row's error
        out = {"error": traceback.format_exc()}
    path.write_text(json.dumps(out))


# ------------------------------------------------------------------------------------------------------------
# Orchestration


def _load(path: Path, fresh: bool, quick: bool) -> dict[str, Any]:
    if path.exists() and not fresh:
        old = json.loads(path.read_text())
        if bool(old.get("meta", {}).get("quick")) == quick:
            return old
    return {"meta": {"runs": [], "quick": quick}, "rows": {}}


def write(results: dict[str, Any], out: Path, name: str = "scale") -> None:
    """``<name>.json``, ``<name>.md`` and one ``<name>_<row>.png`` per method into ``out``."""
    from experiments.benchmarks import scale_report

    out.mkdir(parents=True, exist_ok=True)
    if results["meta"].get("quick") and out == DEFAULT_OUT / "quick":
        (out / ".gitignore").write_text("*\n")  # smoke-run numbers never belong in the repository
    (out / f"{name}.json").write_text(json.dumps(results, indent=1, default=str))
    (out / f"{name}.md").write_text(scale_report.markdown(results))
    for label in results["rows"]:
        scale_report.plot(results, label, out / f"{name}_{label}.png")


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.worker:
        _worker_main(args)
        return 0
    from experiments.benchmarks.run import _commit, _setup_torch, _spawn

    _setup_torch(args.quick, args.threads)
    import lightning_adapters as la
    from experiments.benchmarks import measure
    from experiments.benchmarks.cases import select

    quick = args.quick
    out = args.out or (DEFAULT_OUT / "quick" if quick else DEFAULT_OUT)
    steps = args.steps or (2 if quick else 3)
    warmup = args.warmup if args.warmup is not None else 1  # the memory step per configuration comes first
    chosen, skipped = select(args.methods, la.available_methods())
    cases = [c for c in chosen if c.peft and "decoder" in c.workloads]
    skipped += [f"{c.label}: PEFT cannot run it ({c.peft_note})" for c in chosen if not c.peft]
    if args.points is None:
        points = QUICK_POINTS if quick else FULL_POINTS
    else:
        points = [parse_point(p) for p in args.points]
    variants = list(VARIANTS) if args.variants is None else args.variants
    if quick and args.variants is None:
        variants.remove("compile")  # compiling takes minutes; the quick test compiles one row with aot_eager
    cells = [{"variant": "fp32", "point": list(p)} for p in points] + [
        {"variant": v, "point": "decoder"} for v in variants
    ]
    results = _load(out / "scale.json", args.fresh, quick)
    device = torch.device(args.device)
    run_meta = {
        "started": measure.now(),
        "commit": _commit(),
        "machine": measure.machine(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "methods": [c.label for c in cases],
        "cells": [cell_key(c["variant"], c["point"]) for c in cells],
        "steps": steps,
        "warmup": warmup,
        "timing_env": TIMING_ENV if device.type == "cpu" and not quick else "none",
        "load_average_start": measure.load_average(),
    }
    results["meta"]["runs"].append(run_meta)
    results["meta"]["skipped"] = skipped
    for c in cases:
        job = {
            "label": c.label,
            "cells": cells,
            "quick": quick,
            "device": str(device),
            "steps": steps,
            "warmup": warmup,
            "threads": args.threads,
            "compile_backend": args.compile_backend,
            "profile": args.profile,
        }
        print(f"[scale] {c.label}: {len(cells)} cells", flush=True)
        got = run_job(job) if quick else _spawn(job, device.type == "cpu", "experiments.benchmarks.scale")
        if "error" in got and isinstance(got["error"], str):
            got = {cell_key(cell["variant"], cell["point"]): {"error": got["error"]} for cell in cells}
        row = results["rows"].setdefault(c.label, {})
        for key, entry in got.items():
            if "error" in entry:
                print(f"[scale] {c.label} {key} failed:\n{entry['error']}", flush=True)
            profile = entry.pop("profile", None)
            if profile:
                pdir = out / "scale_profiles"
                pdir.mkdir(parents=True, exist_ok=True)
                for side, table in profile.items():
                    (pdir / f"{c.label}_{key.replace('/', '_')}_{side}.txt").write_text(table)
            row[key] = entry
        write(results, out)
    run_meta["finished"] = measure.now()
    run_meta["load_average_end"] = measure.load_average()
    write(results, out)
    print(f"[scale] wrote {out / 'scale.json'}, scale.md and the plots", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
