"""QLoRA: LoRA and DoRA on a 4-bit NF4 base against PEFT 0.21's QLoRA, and against the fp32 base.

Decoder workload of the benchmark harness (Llama-style, 4 layers, hidden 512, ffn 1376, batch 4×256, CPU), every
linear of the blocks adapted (r = 8) and quantized with bitsandbytes NF4 (``lightning_adapters.quantize``; the
embedding and the LM head stay fp32, as transformers keeps them). Rows: ``lora`` and ``dora`` on the NF4 base,
ours against PEFT on the same quantized base and with the same adapter values (PEFT's, loaded with ``load_peft``),
and ``lora_fp32`` / ``dora_fp32``: ours on the fp32 base against the same PEFT QLoRA model, to show what the 4-bit
base costs in time. A step is zero_grad + forward + backward + AdamW; the two sides of a row alternate so drift in
machine speed hits both alike. Base-weight memory: the bytes the quantized layers' weights take (packed data and
quantization state), against the same layers in fp32. Each row also reports the share of the CPU the process got
while timing (process CPU time / (wall time × threads)) and the load average, since the development VM is shared.

``--layers`` profiles single layers instead: the process CPU time of forward + backward (to the input and the
adapter) of one NF4 layer of each decoder shape at the workload's rows, frozen, ours and PEFT's, sides alternating,
median over ``--reps`` calls (on one thread this is the layer's work, whatever else shares the machine).

Run::

    python -m experiments.benchmarks.qlora_vs_peft --steps 21 --md experiments/benchmarks/results/qlora_vs_peft.md
    python -m experiments.benchmarks.qlora_vs_peft --layers --rows dora --threads 1 --reps 15
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import tempfile
import time
from typing import Any

import torch
from torch import nn

from experiments.benchmarks.measure import cpu_seconds, randomize
from experiments.benchmarks.oft_boft_vs_peft import _stepper
from experiments.benchmarks.workloads import build_model, get_workload, make_batch

ROWS: dict[str, tuple[dict[str, Any], str]] = {
    # label: (LoRA options, our side's base: "nf4" or "fp32"); the reference is always PEFT on the NF4 base
    "lora": ({}, "nf4"),
    "dora": ({"use_dora": True}, "nf4"),
    "lora_fp32": ({}, "fp32"),
    "dora_fp32": ({"use_dora": True}, "fp32"),
}
RANK = 8


def base_weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the block linears' weights (quantization state included) and of the same weights in fp32."""
    from lightning_adapters.core.quant import is_quantized

    quantized = fp32 = 0
    for m in model.modules():
        if not is_quantized(m):
            continue
        sd = m.state_dict()
        quantized += sum(t.numel() * t.element_size() for k, t in sd.items() if k != "bias" and torch.is_tensor(t))
        fp32 += m.in_features * m.out_features * 4
    return {"quantized": quantized, "fp32": fp32}


def build_pair(label: str, quick: bool) -> tuple[dict[str, nn.Module], dict[str, torch.Tensor], dict[str, int]]:
    """``{"ours": model, "peft": model}`` of a row with equal base and adapter values, a batch, base-weight bytes."""
    from peft import LoraConfig, get_peft_model

    import lightning_adapters as la

    kw, our_base = ROWS[label]
    w = get_workload("decoder", quick)
    fp32 = build_model(w)
    nf4 = la.quantize(copy.deepcopy(fp32), "nf4", compute_dtype=torch.float32)
    nf4.is_loaded_in_4bit = True  # PEFT picks its bitsandbytes layers from this flag (transformers sets it)
    peft = get_peft_model(copy.deepcopy(nf4), LoraConfig(r=RANK, lora_alpha=16, target_modules=w.targets, **kw))
    randomize(peft)
    with tempfile.TemporaryDirectory() as d:
        peft.save_pretrained(d)
        ours = la.load_peft(copy.deepcopy(nf4 if our_base == "nf4" else fp32), d)
    return {"ours": ours.train(), "peft": peft.train()}, make_batch(w), base_weight_bytes(nf4)


def time_row(label: str, steps: int, warmup: int, quick: bool) -> dict[str, Any]:
    """Median step times of both sides, the median of per-round ratios ours / PEFT, and base-weight memory."""
    models, batch, weights = build_pair(label, quick)
    with torch.no_grad():
        diff = float((models["ours"](**batch).logits - models["peft"](**batch).logits).abs().max())
    fns = {k: _stepper(m, batch) for k, m in models.items()}
    times: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    load = os.getloadavg()[0]
    wall0 = cpu0 = 0.0
    for i in range(warmup + steps):
        if i == warmup:
            wall0, cpu0 = time.perf_counter(), cpu_seconds()
        for k in names[i % 2 :] + names[: i % 2]:
            c0, t0 = cpu_seconds(), time.perf_counter()
            fns[k]()
            if i >= warmup:
                times[k].append(time.perf_counter() - t0)
                cpu[k].append(cpu_seconds() - c0)
    cpu_share = (cpu_seconds() - cpu0) / ((time.perf_counter() - wall0) * torch.get_num_threads())
    return {
        "row": label,
        "our_base": ROWS[label][1],
        "median_ms": {k: 1000 * statistics.median(v) for k, v in times.items()},
        "ratio": statistics.median(a / b for a, b in zip(times["ours"], times["peft"])),
        "cpu_ratio": statistics.median(a / b for a, b in zip(cpu["ours"], cpu["peft"])),
        "max_abs_logit_diff_at_start": diff,
        "base_weight_mib": {k: v / 2**20 for k, v in weights.items()},
        "base_weight_ratio_fp32_over_nf4": weights["fp32"] / weights["quantized"],
        "steps": steps,
        "cpu_percent": 100 * cpu_share,
        "load_average": [load, os.getloadavg()[0]],
    }


# (in, out) of the decoder's block linears: q/o, k/v (4 of 8 heads), gate/up, down.
LAYER_SHAPES = [(512, 512), (512, 256), (512, 1376), (1376, 512)]


def layer_row(label: str, in_f: int, out_f: int, rows: int, reps: int) -> dict[str, Any]:
    """Median CPU ms of forward + backward of one NF4 layer: frozen, ours and PEFT's adapter of ``label``."""
    from peft import LoraConfig, get_peft_model

    import lightning_adapters as la

    torch.manual_seed(0)
    nf4 = la.quantize(nn.Sequential(nn.Linear(in_f, out_f, bias=False)), "nf4", compute_dtype=torch.float32, skip=[])
    nf4.is_loaded_in_4bit = True
    peft = get_peft_model(copy.deepcopy(nf4), LoraConfig(r=RANK, lora_alpha=16, target_modules=["0"], **ROWS[label][0]))
    randomize(peft)
    with tempfile.TemporaryDirectory() as d:
        peft.save_pretrained(d)
        ours = la.load_peft(copy.deepcopy(nf4), d)
    models = {"frozen": nf4.train(), "ours": ours.train(), "peft": peft.train()}
    x = torch.randn(rows, in_f, requires_grad=True)
    g = torch.randn(rows, out_f)

    def call(m: nn.Module) -> None:
        torch.autograd.backward(m(x), g)
        x.grad = None
        for p in m.parameters():
            p.grad = None

    cpu: dict[str, list[float]] = {k: [] for k in models}
    names = list(models)
    for i in range(reps + 1):
        for k in names[i % 3 :] + names[: i % 3]:
            c0 = cpu_seconds()
            call(models[k])
            if i:  # the first round warms up
                cpu[k].append(cpu_seconds() - c0)
    ms = {k: 1000 * statistics.median(v) for k, v in cpu.items()}
    return {"row": label, "in": in_f, "out": out_f, "rows": rows, "cpu_ms": ms, "reps": reps}


def layer_markdown(results: dict[str, Any]) -> str:
    """The per-layer rows as a Markdown table."""
    lines = [
        f"torch {results['torch']}, {results['threads']} threads; process CPU ms of forward + backward per layer",
        "",
        "| row | in → out | rows | frozen NF4 | ours | PEFT | ours − frozen | PEFT − frozen | ours / PEFT |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["layers"]:
        ms = r["cpu_ms"]
        lines.append(
            f"| {r['row']} | {r['in']} → {r['out']} | {r['rows']} | {ms['frozen']:.1f} | {ms['ours']:.1f} | "
            f"{ms['peft']:.1f} | {ms['ours'] - ms['frozen']:+.1f} | {ms['peft'] - ms['frozen']:+.1f} | "
            f"{ms['ours'] / ms['peft']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def markdown(results: dict[str, Any]) -> str:
    """The rows as a Markdown table (the README's)."""
    lines = [
        f"torch {results['torch']}, {results['threads']} threads",
        "",
        "| row (decoder) | our base | step ours / PEFT QLoRA (wall) | (process CPU time) | median step ours / PEFT "
        "| timed steps | CPU share | load avg (start, end) | our base weights |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        ms, mib = r["median_ms"], r["base_weight_mib"]
        if r["our_base"] == "nf4":
            weights = f"{mib['quantized']:.1f} MiB ({r['base_weight_ratio_fp32_over_nf4']:.1f}× < fp32)"
        else:
            weights = f"{mib['fp32']:.1f} MiB (fp32)"
        lines.append(
            f"| {r['row']} | {r['our_base']} | {r['ratio']:.3f}× | {r['cpu_ratio']:.3f}× | "
            f"{ms['ours'] / 1000:.2f} s / {ms['peft'] / 1000:.2f} s | {r['steps']} | {r['cpu_percent']:.0f}% | "
            f"{r['load_average'][0]:.1f}, {r['load_average'][1]:.1f} | {weights} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="toy sizes, for a smoke run")
    p.add_argument("--layers", action="store_true", help="profile single layers of each decoder shape instead")
    p.add_argument("--reps", type=int, default=15, help="calls per side and layer with --layers")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--md", help="also write the table here (Markdown)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    results: dict[str, Any] = {"torch": torch.__version__, "threads": args.threads, "rows": []}
    if args.layers:
        w = get_workload("decoder", args.quick)
        shapes = [(8, 8), (8, 4)] if args.quick else LAYER_SHAPES
        results["layers"] = []
        for label in args.rows:
            if ROWS[label][1] != "nf4":
                continue
            for in_f, out_f in shapes:
                row = layer_row(label, in_f, out_f, w.batch * w.seq, args.reps)
                results["layers"].append(row)
                ms = row["cpu_ms"]
                print(
                    f"{label} {in_f}->{out_f}: frozen {ms['frozen']:.1f} ms, ours {ms['ours']:.1f}, PEFT "
                    f"{ms['peft']:.1f} (ours / PEFT {ms['ours'] / ms['peft']:.3f})",
                    flush=True,
                )
        _write(args, results, layer_markdown)
        return
    for label in args.rows:
        row = time_row(label, args.steps, args.warmup, args.quick)
        results["rows"].append(row)
        ms, mib = row["median_ms"], row["base_weight_mib"]
        print(
            f"{label} ({row['our_base']} base): ours {ms['ours']:.0f} ms, PEFT QLoRA {ms['peft']:.0f} ms, ratio "
            f"{row['ratio']:.3f} (CPU time {row['cpu_ratio']:.3f}); base weights {mib['quantized']:.1f} MiB nf4 vs "
            f"{mib['fp32']:.1f} MiB fp32 ({row['base_weight_ratio_fp32_over_nf4']:.1f}x); start logit diff "
            f"{row['max_abs_logit_diff_at_start']:.2g}; CPU share {row['cpu_percent']:.0f}%, load "
            f"{row['load_average'][0]:.1f} -> {row['load_average'][1]:.1f}",
            flush=True,
        )
    _write(args, results, markdown)


def _write(args: argparse.Namespace, results: dict[str, Any], to_md: Any) -> None:
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    if args.md:
        with open(args.md, "w") as f:
            f.write(to_md(results))


if __name__ == "__main__":
    main()
