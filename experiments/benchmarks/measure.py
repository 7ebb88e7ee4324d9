"""The measurements: one method against PEFT in one process, the anchors, peak memory, file sizes.

Every timing alternates the configurations round by round (rotating which goes first), so slow drifts of the
machine hit all of them alike; the per-round ratio's median is the headline number.
"""

from __future__ import annotations

import copy
import ctypes
import datetime
import gc
import os
import platform
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from experiments.benchmarks import flops
from experiments.benchmarks.cases import BenchCase, case_by_label
from experiments.benchmarks.flops import LayerInfo
from experiments.benchmarks.workloads import Workload, build_model, input_embeddings, loss_of, make_batch

THREADS = 2
LR = 1e-4


def now() -> str:
    """The current UTC time, ISO format."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import peft
    import transformers

    return {
        "host": platform.node(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "platform": platform.platform(),
    }


def load_average() -> list[float]:
    """The 1/5/15-minute load averages (a busy machine shows here and in ``cpu_util``)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def cpu_seconds() -> float:
    """User + system CPU time of this process."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


# ------------------------------------------------------------------------------------------------------------
# Building the models


def our_config(case: BenchCase, w: Workload, **overrides: Any) -> Any:
    """This library's config for ``case`` on ``w`` (``overrides``: further config fields, e.g. ``adapter_dtype``)."""
    import lightning_adapters as la

    kw = dict(case.config, **overrides)
    if not case.own_targets:
        kw["target_modules"] = list(w.targets)
    return la.get_method(case.method).config_cls(**kw)


def randomize(model: nn.Module, seed: int = 0, std: float = 0.02) -> None:
    """Perturb every trainable tensor, so no adapter is the identity and equal outputs mean equal adapters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and p.is_floating_point():
                noise = torch.randn(p.shape, generator=g, dtype=torch.float32) * std
                p.add_(noise.to(device=p.device, dtype=p.dtype))


def layer_infos(model: nn.Module) -> list[LayerInfo]:
    """The adapted modules of one of our models, as the FLOP formulas need them."""
    from lightning_adapters.core.inject import adapted_modules

    out = []
    for name, base, layer in adapted_modules(model):
        w = getattr(base, "weight", None)
        in_f = getattr(base, "in_features", w.shape[1] if w is not None and w.dim() == 2 else 0)
        out_f = getattr(base, "out_features", w.shape[0] if w is not None and w.dim() == 2 else 0)
        out.append(LayerInfo(name, int(in_f), int(out_f), layer.peft_shapes()))
    return out


def build_ours(base: nn.Module, case: BenchCase, w: Workload, seed: int = 0, **overrides: Any) -> nn.Module:
    """A copy of ``base`` with our adapter for ``case`` (config ``overrides`` applied), randomised."""
    import lightning_adapters as la

    model = copy.deepcopy(base)
    la.inject(model, our_config(case, w, **overrides))
    randomize(model, seed)
    return model.train()


def load_peft_model(base: nn.Module, adapter_dir: str | os.PathLike, autocast_adapter_dtype: bool = True) -> nn.Module:
    """PEFT's model for the adapter saved in ``adapter_dir``, on a copy of ``base``, trainable.

    ``autocast_adapter_dtype``: PEFT's own switch; True (its default) keeps the adapter in fp32 on a bf16/fp16 base,
    False leaves it in the base's dtype.
    """
    from peft import PeftModel

    return PeftModel.from_pretrained(
        copy.deepcopy(base), str(adapter_dir), is_trainable=True, autocast_adapter_dtype=autocast_adapter_dtype
    ).train()


def freeze_as_base(model: nn.Module) -> nn.Module:
    """The frozen-base anchor: no trainable weight; the input embeddings' output requires grad, so the backward
    pass still runs through every block (input gradients only)."""
    for p in model.parameters():
        p.requires_grad_(False)

    def hook(_mod: nn.Module, _inp: Any, out: torch.Tensor) -> torch.Tensor:
        return out.requires_grad_(True) if torch.is_grad_enabled() else out

    input_embeddings(model).register_forward_hook(hook)
    return model.train()


def outputs_diff(a: nn.Module, b: nn.Module, batch: dict[str, torch.Tensor]) -> float:
    """Max abs difference of the two models' logits on ``batch`` (eval mode)."""
    a.eval(), b.eval()
    with torch.no_grad():
        d = (a(**batch).logits - b(**batch).logits).abs().max().item()
    a.train(), b.train()
    return d


# ------------------------------------------------------------------------------------------------------------
# Train steps


def train_step(model: nn.Module, batch: dict[str, torch.Tensor], kind: str, config: Any = None) -> Callable[[], None]:
    """One training step closure: zero_grad + forward + backward + AdamW (+ the method's per-step extras).

    ``kind``: ``"ours"`` (drives the method's training schedule, e.g. AdaLoRA's loss term and allocator),
    ``"peft"`` (calls ``update_and_allocate`` when PEFT's model has it), ``"plain"`` (anchors).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR) if params else None
    schedule = None
    if kind == "ours":
        import lightning_adapters as la

        schedule_cls = la.get_method(_method_name(config)).training_hooks
        if schedule_cls is not None:
            schedule = schedule_cls(model, config)
            schedule.start({"optimizer_steps": 10**6, "epochs": 1}.get(schedule.length_unit))
    allocate = getattr(getattr(model, "base_model", None), "update_and_allocate", None) if kind == "peft" else None
    forward = called_module(model, kind)
    counter = [0]

    def step() -> None:
        if opt is not None:
            opt.zero_grad(set_to_none=True)
        loss = loss_of(forward, batch)
        if schedule is not None:
            extra = schedule.loss_term()
            if extra is not None:
                loss = loss + extra
        loss.backward()
        if opt is not None:
            opt.step()
        if schedule is not None:
            schedule.after_optimizer_step(counter[0])
        if allocate is not None:
            allocate(counter[0])
        counter[0] += 1

    step.optimizer = opt  # type: ignore[attr-defined]  # the memory measurement counts its state
    return step


def called_module(model: nn.Module, kind: str) -> nn.Module:
    """The module whose ``__call__`` a ``train_step(model, batch, kind)`` step runs: PEFT's tuner for ``"peft"``,
    ``model`` itself otherwise. Whatever wraps the step (``Module.compile``, hooks) must wrap this module: compiling
    the outer ``PeftModel`` would leave the step PEFT times running eagerly."""
    return peft_task_forward(model) if kind == "peft" else model


def peft_task_forward(model: nn.Module) -> nn.Module:
    """What a PEFT task model (``PeftModelForCausalLM``, ...) calls: its tuner, ``model.base_model``.

    ``PeftModel.from_pretrained`` without a task type returns the plain ``PeftModel``, whose forward calls the
    transformers model directly and so skips the tuner's own forward, where PEFT's AdaLoRA adds its orthogonal
    regularizer to the loss: timed that way PEFT's AdaLoRA step did less work than ours (no regularizer, 0.9-1.9 MiB
    less peak memory on the scale grid). Every task class calls the tuner, as this does; any other model is returned
    as it is.
    """
    from peft import PeftModel

    return model.base_model if isinstance(model, PeftModel) else model


def _method_name(config: Any) -> str:
    from lightning_adapters.registry import spec_for_config

    return spec_for_config(config).name


def alternate(
    fns: dict[str, Callable[[], Any]], warmup: int, repeats: int, device: str | torch.device = "cpu"
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Run every function once per round, rotating the order; return the timed rounds' wall-clock durations and
    process CPU times (with one thread the CPU time is immune to the time other processes take the core away).

    On a CUDA ``device`` the duration is the GPU's, between CUDA events recorded around the call (the host may
    queue ahead; the events time what the stream ran), and the CPU time is the host's.
    """
    names = list(fns)
    wall: dict[str, list[float]] = {k: [] for k in names}
    cpu: dict[str, list[float]] = {k: [] for k in names}
    cuda = torch.device(device).type == "cuda"
    for i in range(warmup + repeats):
        k0 = i % len(names)
        for name in names[k0:] + names[:k0]:
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize(device)
                start.record()
            c0, t0 = time.process_time(), time.perf_counter()
            fns[name]()
            if cuda:
                end.record()
                end.synchronize()
                dt = start.elapsed_time(end) / 1e3
            else:
                dt = time.perf_counter() - t0
            dc = time.process_time() - c0
            if i >= warmup:
                wall[name].append(dt)
                cpu[name].append(dc)
    return wall, cpu


def ratios(times: dict[str, list[float]], pairs: dict[str, tuple[str, str]]) -> dict[str, float]:
    """``{name: paired_ratio(times[a], times[b])}`` for ``pairs = {name: (a, b)}``."""
    return {name: paired_ratio(times[a], times[b]) for name, (a, b) in pairs.items()}


def paired_ratio(a: list[float], b: list[float]) -> float:
    """Median over rounds of ``a_i / b_i``."""
    return statistics.median(x / y for x, y in zip(a, b))


def summarize(times: dict[str, list[float]]) -> dict[str, Any]:
    """Median, minimum and every timed value per configuration."""
    return {
        k: {"median_s": statistics.median(v), "min_s": min(v), "times_s": [round(t, 5) for t in v]}
        for k, v in times.items()
    }


def eval_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    inputs = {"input_ids": batch["input_ids"]}

    def run() -> None:
        with torch.no_grad():
            model(**inputs)

    return run


# ------------------------------------------------------------------------------------------------------------
# Sizes


def dir_bytes(path: str | os.PathLike) -> int:
    """Total size of the files under ``path``."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def approx_checkpoint_bytes(model: nn.Module, state: dict[str, torch.Tensor], steps: int = 1) -> int:
    """Size of ``torch.save`` of ``state`` plus AdamW's state for the trainable parameters (after one step)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR)
    for p in params:
        p.grad = torch.zeros_like(p)
    for _ in range(steps):
        opt.step()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "ckpt.pt"
        torch.save({"state_dict": state, "optimizer": opt.state_dict()}, path)
        size = path.stat().st_size
    opt.zero_grad(set_to_none=True)
    return size


def lightning_checkpoint_bytes(base: nn.Module, case: BenchCase, w: Workload, batch: dict[str, torch.Tensor]) -> int:
    """Size of a real adapter-only Lightning checkpoint: one step of ``Trainer.fit`` with ``AdapterCallback``,
    then ``trainer.save_checkpoint`` (weights + AdamW state + loop state)."""
    import lightning as L
    from torch.utils.data import DataLoader

    import lightning_adapters as la

    class Task(L.LightningModule):
        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.model = model

        def training_step(self, b: dict[str, torch.Tensor], _i: int) -> torch.Tensor:
            return loss_of(self.model, b)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=LR)

    trainer = L.Trainer(
        max_steps=1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[la.AdapterCallback(our_config(case, w), module="model", verbose=False)],
    )
    task = Task(copy.deepcopy(base).train())
    trainer.fit(task, train_dataloaders=DataLoader([batch], batch_size=None))
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "adapter.ckpt"
        trainer.save_checkpoint(path)
        return path.stat().st_size


# ------------------------------------------------------------------------------------------------------------
# Workers


def method_worker(
    w: Workload, label: str, warmup: int, steps: int, eval_repeats: int, adapter_dir: str, lightning_ckpt: bool
) -> dict[str, Any]:
    """Everything about one benchmark row on one workload, measured in this process.

    The other side is PEFT (the adapter ``save_peft`` wrote, loaded with ``PeftModel.from_pretrained``) or, for
    rows PEFT cannot run, our own ``compare_to`` row.
    """
    case = case_by_label(label)
    res: dict[str, Any] = {"label": label, "method": case.method, "workload": w.name, "measured_at": now()}
    res["load_average_start"] = load_average()
    base = build_model(w)
    batch = make_batch(w)
    ours = build_ours(base, case, w)
    cfg = our_config(case, w)
    res["config"] = {k: v for k, v in cfg.to_dict().items() if not isinstance(v, (dict, list)) or v}
    layers = layer_infos(ours)
    res["adapted_modules"] = len(layers)
    res["trainable_params"] = {"ours": sum(p.numel() for p in ours.parameters() if p.requires_grad)}

    import lightning_adapters as la

    Path(adapter_dir).mkdir(parents=True, exist_ok=True)
    la.save_peft(ours, adapter_dir)
    files: dict[str, Any] = {"ours_save_peft_bytes": dir_bytes(adapter_dir)}
    if case.peft:
        other = load_peft_model(base, adapter_dir)
        other_kind, other_name = "peft", "peft"
        res["max_abs_logit_diff"] = outputs_diff(ours, other, batch)
        with tempfile.TemporaryDirectory() as d:
            other.save_pretrained(d)
            files["peft_save_pretrained_bytes"] = dir_bytes(d)
    else:
        ref = case_by_label(case.compare_to)
        other = build_ours(base, ref, w)
        other_kind, other_name = "ours", f"ours_{ref.label}"
        res["peft_note"] = case.peft_note
        res["compared_to"] = ref.label
    res["trainable_params"][other_name] = sum(p.numel() for p in other.parameters() if p.requires_grad)

    frozen = freeze_as_base(base)
    other_cfg = our_config(case_by_label(case.compare_to), w) if other_kind == "ours" else None
    fns = {
        "ours": train_step(ours, batch, "ours", cfg),
        other_name: train_step(other, batch, other_kind, other_cfg),
        "base": train_step(frozen, batch, "plain"),
    }
    cpu0, wall0 = cpu_seconds(), time.perf_counter()
    times, cpu = alternate(fns, warmup, steps)
    res["train_cpu_util"] = round((cpu_seconds() - cpu0) / (time.perf_counter() - wall0), 3)
    pairs = {
        "ours_over_other": ("ours", other_name),
        "ours_over_base": ("ours", "base"),
        "other_over_base": (other_name, "base"),
    }
    res["train"] = summarize(times)
    res["train"].update(ratios(times, pairs))
    res["train"]["cpu_time"] = ratios(cpu, pairs)
    res["other"] = other_name

    base_macs = flops.base_train_macs(w)
    adapter_macs = case.adapter_macs(w, layers, case.config)
    res["flops"] = {
        "base_train_macs": base_macs,
        "adapter_macs": adapter_macs,
        "limit_over_base": (base_macs + adapter_macs) / base_macs,
    }

    # Eval latency, unmerged, then merged (when both sides can merge), then the cost of merging.
    for m in (ours, other, frozen):
        m.eval()
    evals = {"ours": eval_fn(ours, batch), other_name: eval_fn(other, batch), "base": eval_fn(frozen, batch)}
    t, c = alternate(evals, 1, eval_repeats)
    pairs = {"ours_over_other": ("ours", other_name), "ours_over_base": ("ours", "base")}
    res["eval_unmerged"] = summarize(t)
    res["eval_unmerged"].update(ratios(t, pairs))
    res["eval_unmerged"]["cpu_time"] = ratios(c, pairs)
    res["mergeable"] = _mergeable(ours)
    if res["mergeable"]:
        res["merge"] = _merge_costs(ours, other, other_kind)
        _merge(ours, "ours"), _merge(other, other_kind)
        t, c = alternate(evals, 1, eval_repeats)
        pairs = {"ours_over_base": ("ours", "base"), "other_over_base": (other_name, "base")}
        res["eval_merged"] = summarize(t)
        res["eval_merged"].update(ratios(t, pairs))
        res["eval_merged"]["cpu_time"] = ratios(c, pairs)
        _unmerge(ours, "ours"), _unmerge(other, other_kind)

    # Checkpoint of an adapter-only Lightning run (the real thing when AdapterCallback is available).
    try:
        if not lightning_ckpt:
            raise ImportError("skipped (quick mode)")
        files["lightning_ckpt_bytes"] = lightning_checkpoint_bytes(build_model(w), case, w, batch)
        files["lightning_ckpt_kind"] = "Trainer.save_checkpoint with AdapterCallback after 1 step"
    except Exception as err:  # noqa: BLE001 - a failed Lightning run must not lose the row's timings
        files["lightning_ckpt_bytes"] = approx_checkpoint_bytes(ours, la.adapter_state_dict(ours))
        files["lightning_ckpt_kind"] = f"approximation: torch.save(adapter_state_dict + AdamW state) ({err})"
    res["files"] = files
    res["load_average_end"] = load_average()
    return res


def _mergeable(model: nn.Module) -> bool:
    """Whether ``la.merge`` accepts the model (tried, then undone)."""
    import lightning_adapters as la

    try:
        la.merge(model)
    except la.NotMergeableError:
        return False
    la.unmerge(model)
    return True


def _merge(model: nn.Module, kind: str) -> None:
    import lightning_adapters as la

    if kind == "peft":
        model.merge_adapter()
    else:
        la.merge(model)


def _unmerge(model: nn.Module, kind: str) -> None:
    import lightning_adapters as la

    if kind == "peft":
        model.unmerge_adapter()
    else:
        la.unmerge(model)


def _merge_costs(ours: nn.Module, other: nn.Module, other_kind: str, repeats: int = 3) -> dict[str, float]:
    """Median seconds of merge and of unmerge for each side."""
    out: dict[str, list[float]] = {"ours_merge_s": [], "ours_unmerge_s": [], "other_merge_s": [], "other_unmerge_s": []}
    for _ in range(repeats):
        for side, model, kind in (("ours", ours, "ours"), ("other", other, other_kind)):
            t0 = time.perf_counter()
            _merge(model, kind)
            t1 = time.perf_counter()
            _unmerge(model, kind)
            t2 = time.perf_counter()
            out[f"{side}_merge_s"].append(t1 - t0)
            out[f"{side}_unmerge_s"].append(t2 - t1)
    return {k: statistics.median(v) for k, v in out.items()}


def anchors_worker(w: Workload, warmup: int, steps: int, eval_repeats: int) -> dict[str, Any]:
    """The frozen base against full fine-tuning, and the base model's sizes."""
    res: dict[str, Any] = {"workload": w.name, "measured_at": now(), "load_average_start": load_average()}
    base = build_model(w)
    batch = make_batch(w)
    full = copy.deepcopy(base).train()
    frozen = freeze_as_base(base)
    times, cpu = alternate(
        {"full": train_step(full, batch, "plain"), "base": train_step(frozen, batch, "plain")}, warmup, steps
    )
    res["train"] = summarize(times)
    res["train"]["full_over_base"] = paired_ratio(times["full"], times["base"])
    res["train"]["cpu_time"] = {"full_over_base": paired_ratio(cpu["full"], cpu["base"])}
    res["flops"] = {
        "base_train_macs": flops.base_train_macs(w),
        "full_train_macs": flops.full_train_macs(w),
        "full_limit_over_base": flops.full_train_macs(w) / flops.base_train_macs(w),
    }
    frozen.eval()
    t, _ = alternate({"base": eval_fn(frozen, batch)}, 1, eval_repeats)
    res["eval"] = summarize(t)
    with tempfile.TemporaryDirectory() as d:
        from safetensors.torch import save_file

        path = Path(d) / "model.safetensors"
        save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(path))
        res["files"] = {"base_model_bytes": path.stat().st_size}
    res["files"]["full_ckpt_bytes"] = approx_checkpoint_bytes(full, full.state_dict())
    res["params"] = sum(p.numel() for p in full.parameters())
    res["load_average_end"] = load_average()
    return res


# ------------------------------------------------------------------------------------------------------------
# Peak memory


def tensor_bytes(*objs: Any) -> int:
    """Bytes of the distinct tensor storages held by modules (parameters, their gradients, buffers) and
    optimizers (their state), each storage counted once."""
    seen: dict[int, int] = {}

    def add(t: Any) -> None:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            st = t.untyped_storage()
            seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())

    for o in objs:
        if isinstance(o, nn.Module):
            for p in o.parameters():
                add(p)
                add(p.grad)
            for b in o.buffers():
                add(b)
        elif isinstance(o, torch.optim.Optimizer):
            for st in o.state.values():
                for v in st.values():
                    add(v)
    return sum(seen.values())


def step_peak_bytes(fn: Callable[[], Any], steps: int = 2, device: str | torch.device = "cpu") -> int:
    """High-water mark of the tensor memory ``steps`` calls of ``fn`` allocate above what is allocated before them.

    CUDA: ``torch.cuda.max_memory_allocated`` after a reset, minus the memory allocated at the start. CPU: the
    allocation and free events of the torch profiler (``profile_memory``), summed in time order: the same
    quantity at the tensor allocator, blind to glibc's heap and to other processes (unlike the resident set).
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        before = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        for _ in range(steps):
            fn()
        torch.cuda.synchronize(dev)
        return torch.cuda.max_memory_allocated(dev) - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for _ in range(steps):
            fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        if str(e.device_type()).endswith("CPU"):
            live += e.nbytes()
            peak = max(peak, live)
    return peak


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def _reset_peak() -> bool:
    """Reset the kernel's RSS high-water mark of this process (Linux ``clear_refs`` 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def memory_worker(w: Workload, side: str, label: str | None, adapter_dir: str | None, steps: int = 2) -> dict[str, Any]:
    """Peak resident memory of training steps of one configuration (run each in a fresh process).

    ``side``: ``base`` (frozen), ``full`` (full fine-tuning), ``ours`` (our adapter for ``label``), ``peft``
    (PEFT's model loaded from ``adapter_dir``). The high-water mark is reset after building the model, so
    ``step_peak_mib`` is what the steps (activations, gradients, optimizer state) add to the resident model.
    """
    base = build_model(w)
    batch = make_batch(w)
    if side == "base":
        model = freeze_as_base(base)
    elif side == "full":
        model = base
    elif side == "ours":
        case = case_by_label(label)
        model = build_ours(base, case, w)
        del base
    else:
        model = load_peft_model(base, adapter_dir)
        del base
    kind = {"ours": "ours", "peft": "peft"}.get(side, "plain")
    cfg = our_config(case_by_label(label), w) if side == "ours" else None
    fn = train_step(model, batch, kind, cfg)
    _trim()
    rss0 = _rss_kib("VmRSS")
    reset = _reset_peak()
    for _ in range(steps):
        fn()
    peak = _rss_kib("VmHWM")
    return {
        "side": side,
        "label": label,
        "workload": w.name,
        "measured_at": now(),
        "rss_before_mib": rss0 / 1024,
        "peak_mib": peak / 1024,
        "step_peak_mib": (peak - rss0) / 1024 if reset else None,
        "peak_reset": reset,
        "steps": steps,
    }
