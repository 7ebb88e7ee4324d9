"""What each method is benchmarked with: one row per configuration, keyed by a label.

A row names the registry method, the config fields (the same hyper-parameters for this library and PEFT: the
PEFT adapter is loaded from this library's ``save_peft`` output, so both hold identical weights), the
workloads it runs on, whether PEFT can run it, and its FLOP floor. Rows whose method is not registered (yet)
are skipped by the runner.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from experiments.benchmarks import flops
from experiments.benchmarks.flops import LayerInfo
from experiments.benchmarks.workloads import Workload

# AdaLoRA's schedule: masks are recomputed after every optimizer step (tinit = 0, deltaT = 1), the most work
# its allocator can do per step, in both libraries.
ADALORA_TOTAL_STEP = 1000


@dataclass
class BenchCase:
    """One benchmarked configuration.

    Attributes:
        label: Row name in the results (e.g. ``"boft_m2"``).
        method: Registry name (``la.available_methods()``).
        config: Config fields besides ``target_modules`` (which is the workload's block linears unless
            ``own_targets``).
        adapter_macs: ``(workload, adapted layers, config fields) -> extra MACs per train step``.
        workloads: Workloads this row runs on.
        peft: Whether PEFT runs the same adapter (False: this library only).
        peft_note: Why PEFT is absent.
        compare_to: For rows without PEFT, the label whose *our* step time the ratio is taken against.
        own_targets: The method chooses its modules itself (no ``target_modules``).
    """

    label: str
    method: str
    config: dict[str, Any]
    adapter_macs: Callable[[Workload, list[LayerInfo], dict[str, Any]], int]
    workloads: tuple[str, ...] = ("encoder", "decoder")
    peft: bool = True
    peft_note: str = ""
    compare_to: str | None = None
    own_targets: bool = False
    notes: list[str] = field(default_factory=list)


def _block_size(layers: list[LayerInfo], cfg: dict[str, Any], size_key: str, count_key: str) -> list[int]:
    out = []
    for li in layers:
        size = cfg.get(size_key) or 0
        out.append(size if size else li.in_f // cfg[count_key])
    return out


def _oft(w: Workload, layers: list[LayerInfo], cfg: dict[str, Any]) -> int:
    sizes = _block_size(layers, cfg, "oft_block_size", "r")
    return sum(flops.oft_macs(w.tokens, [li], b) for li, b in zip(layers, sizes))


def _boft(w: Workload, layers: list[LayerInfo], cfg: dict[str, Any]) -> int:
    sizes = _block_size(layers, cfg, "boft_block_size", "boft_block_num")
    m = cfg.get("boft_n_butterfly_factor", 1)
    return sum(flops.oft_macs(w.tokens, [li], b, m) for li, b in zip(layers, sizes))


CASES: list[BenchCase] = [
    BenchCase("lora", "lora", {"r": 8, "alpha": 16}, lambda w, ls, c: flops.lora_macs(w.tokens, ls, c["r"])),
    BenchCase(
        "dora",
        "lora",
        {"r": 8, "alpha": 16, "use_dora": True},
        lambda w, ls, c: flops.dora_macs(w.tokens, ls, c["r"]),
    ),
    BenchCase("loha", "loha", {"r": 8, "alpha": 8}, lambda w, ls, c: flops.loha_macs(w.tokens, ls, c["r"])),
    BenchCase("lokr", "lokr", {"r": 8, "alpha": 8}, lambda w, ls, c: flops.lokr_macs(w.tokens, ls)),
    BenchCase("oft", "oft", {"r": 0, "oft_block_size": 32}, _oft),
    BenchCase("boft_m1", "boft", {"boft_block_size": 4, "boft_block_num": 0, "boft_n_butterfly_factor": 1}, _boft),
    BenchCase(
        "boft_m2",
        "boft",
        {"boft_block_size": 4, "boft_block_num": 0, "boft_n_butterfly_factor": 2},
        _boft,
        peft=False,
        peft_note="PEFT runs butterfly factor > 1 only with its CUDA extension (on CPU it silently uses 1)",
        compare_to="boft_m1",
    ),
    BenchCase(
        "adalora",
        "adalora",
        {
            "init_r": 12,
            "target_r": 8,
            "alpha": 8,
            "total_step": ADALORA_TOTAL_STEP,
            "tinit": 0,
            "tfinal": 0,
            "deltaT": 1,
        },
        lambda w, ls, c: flops.lora_macs(w.tokens, ls, c["init_r"]),
        notes=["allocator update (importance + budget mask) after every optimizer step, in both libraries"],
    ),
    BenchCase(
        "llama_adapter",
        "llama_adapter",
        {"adapter_len": 10, "adapter_layers": 2},
        lambda w, ls, c: flops.llama_adapter_macs(w, c["adapter_len"], c["adapter_layers"]),
        workloads=("decoder",),
        own_targets=True,
    ),
]


def case_by_label(label: str) -> BenchCase:
    """The row called ``label``."""
    for c in CASES:
        if c.label == label:
            return c
    raise KeyError(f"no benchmark case {label!r}; known: {[c.label for c in CASES]}")


def named(case: BenchCase, labels: list[str] | None) -> bool:
    """Whether ``labels`` (None: every row) names ``case``: by its label, or by its method unless that is also a
    row's label (``lora`` is the LoRA row alone, not the ``dora`` row of the same method; ``boft`` is both BOFT rows).
    """
    if not labels:
        return True
    return case.label in labels or (case.method in labels and all(c.label != case.method for c in CASES))


def select(labels: list[str] | None, registered: list[str]) -> tuple[list[BenchCase], list[str]]:
    """The rows to run (all registered ones, or those named by label or method) and notes on skipped ones."""
    chosen = [c for c in CASES if named(c, labels)]
    unknown = [x for x in labels or [] if not any(c.label == x or c.method == x for c in CASES)]
    if unknown:
        raise SystemExit(f"unknown --methods {unknown}; choose from {[c.label for c in CASES]}")
    run = [c for c in chosen if c.method in registered]
    skipped = [f"{c.label}: method {c.method!r} is not registered" for c in chosen if c.method not in registered]
    return run, skipped
