"""The benchmark harness's smoke mode writes its three outputs (numbers are never asserted: timings are noise)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.xdist_group("procs")
def test_quick_run_writes_json_table_and_chart(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.benchmarks.run", "--quick", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("results.json", "results.md", "ratios.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["meta"]["quick"] is True
    assert set(results["workloads"]) == {"encoder", "decoder"}
    assert (tmp_path / "ratios.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quick_merged_eval_covers_every_mergeable_method(tmp_path: Path) -> None:
    from experiments.benchmarks import merged_eval

    merged_eval.main(["--quick", "--workloads", "encoder", "--out", str(tmp_path)])
    res = json.loads((tmp_path / "merged_eval.json").read_text())
    labels = {r["label"] for r in res["rows"]}
    # Every benchmark row whose method can merge, and nothing that cannot (Llama-Adapter).
    assert labels == {"lora", "dora", "loha", "lokr", "oft", "boft_m1", "boft_m2", "adalora"}
    assert all(r["rounds"] == 2 and r["median_ratio"] > 0 for r in res["rows"])
    assert "| encoder | lora |" in (tmp_path / "merged_eval.md").read_text()


def test_step_peak_bytes_is_the_high_water_mark_of_tensor_allocations() -> None:
    import torch

    from experiments.benchmarks.measure import step_peak_bytes, tensor_bytes

    def fn() -> None:
        a = torch.empty(1000, 250)  # 1 MB
        b = torch.empty(500, 250)  # 0.5 MB while a lives: the peak
        del a, b
        torch.empty(1000, 250)  # 1 MB again, after both were freed

    assert step_peak_bytes(fn, steps=2) == 1_500_000
    lin = torch.nn.Linear(10, 20)
    lin.weight.grad = torch.zeros_like(lin.weight)
    tied = torch.nn.ModuleDict({"a": lin, "b": lin})  # one storage reached twice is counted once
    assert tensor_bytes(tied) == 4 * (2 * 200 + 20)


def test_peft_steps_run_the_tuner_forward_so_adalora_adds_its_orthogonal_regularizer(tmp_path: Path) -> None:
    """The timed PEFT step calls what PEFT's task models call; its AdaLoRA loss holds ``w · R_orth``.

    Regression: the plain ``PeftModel`` (no task type) skips the tuner's forward, so PEFT's AdaLoRA step computed
    no regularizer while ours did (less work and 0.9-1.9 MiB less peak memory on PEFT's side of the scale grid).
    """
    import torch

    import lightning_adapters as la
    from experiments.benchmarks import measure
    from experiments.benchmarks.cases import case_by_label
    from experiments.benchmarks.workloads import build_model, loss_of, make_batch, scaled_decoder

    w = scaled_decoder(64, 8, 1, vocab=64)
    case = case_by_label("adalora")
    base = build_model(w)
    ours = measure.build_ours(base, case, w)
    la.save_peft(ours, tmp_path)
    peft = measure.load_peft_model(base, tmp_path)
    batch = make_batch(w)
    plain = loss_of(peft, batch)
    pairs = [(m.lora_A["default"], m.lora_B["default"]) for m in peft.modules() if hasattr(m, "lora_E") and m.lora_E]
    assert pairs
    terms = [torch.linalg.matrix_norm(a @ a.T - torch.eye(a.shape[0])) for a, _ in pairs]
    terms += [torch.linalg.matrix_norm(b.T @ b - torch.eye(b.shape[1])) for _, b in pairs]
    weight = measure.our_config(case, w).orth_reg_weight
    assert weight > 0
    expected = plain + weight * torch.stack(terms).mean()
    assert not torch.allclose(plain, expected)  # the plain PeftModel's own forward leaves the regularizer out
    torch.testing.assert_close(loss_of(measure.peft_task_forward(peft), batch), expected)
    assert measure.peft_task_forward(ours) is ours  # ours is not a PEFT model: called as it is


def _scale_cells(tmp_path: Path, *args: str) -> dict:
    from experiments.benchmarks import scale

    assert scale.main(["--quick", "--out", str(tmp_path), *args]) == 0
    return json.loads((tmp_path / "scale.json").read_text())


@pytest.mark.slow
def test_quick_scale_grid_writes_table_plots_and_ours_equals_peft(tmp_path: Path) -> None:
    res = _scale_cells(tmp_path, "--methods", "lora", "llama_adapter", "--variants", "bf16", "bf16-adapters")
    assert set(res["rows"]) == {"lora", "llama_adapter"}
    grid = {"fp32/h64-s16-L1", "fp32/h128-s16-L1", "fp32/h64-s32-L1"}
    for label, cells in res["rows"].items():
        assert set(cells) == grid | {"bf16/decoder", "bf16-adapters/decoder"}, label
        for key, e in cells.items():
            assert "error" not in e, (label, key, e.get("error"))
            assert e["train"]["ours_over_peft"] > 0 and e["memory"]["ours_over_peft"] > 0
            # Both sides run the same adapter: equal logits (bf16 to its precision).
            assert e["max_abs_logit_diff"] < (1e-4 if key.startswith("fp32") else 0.1), (label, key)
        # bf16 base: we keep fp32 adapters by default, as PEFT does for LoRA (its autocast_adapter_dtype leaves
        # adaption prompts in the base's bf16); bf16 adapters on both sides when asked.
        peft_default = ["bfloat16"] if label == "llama_adapter" else ["float32"]
        assert cells["bf16/decoder"]["adapter_dtype"] == {"ours": ["float32"], "peft": peft_default}
        assert cells["bf16-adapters/decoder"]["adapter_dtype"] == {"ours": ["bfloat16"], "peft": ["bfloat16"]}
        assert (tmp_path / f"scale_{label}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "scale.md").read_text()
    assert "| lora | fp32/h128-s16-L1 |" in md and "| llama_adapter | bf16-adapters/decoder |" in md


_TRACED: list[str] = []  # per graph captured by the "la_test_recording" backend: its nodes' source stack traces


def _recording_backend(gm, example_inputs):
    from torch._dynamo import lookup_backend

    _TRACED.append("\n".join(str(n.meta.get("stack_trace", "")) for n in gm.graph.nodes))
    return lookup_backend("aot_eager")(gm, example_inputs)


@pytest.mark.slow
def test_quick_scale_compiled_row_compiles_both_sides(tmp_path: Path) -> None:
    """Each side's timed step runs through compiled graphs traced from its own adapter code: PEFT's step calls its
    tuner, not the ``PeftModel`` around it, so compiling the wrapper would time PEFT eager."""
    import torch
    from torch._dynamo import list_backends, register_backend

    if "la_test_recording" not in list_backends(exclude_tags=()):
        register_backend(_recording_backend, name="la_test_recording")
    torch.compiler.reset()  # graphs compiled earlier in this process would be reused without being traced again
    _TRACED.clear()
    res = _scale_cells(
        tmp_path, "--methods", "lora", "--points", "--variants", "compile", "--compile-backend", "la_test_recording"
    )
    e = res["rows"]["lora"]["compile/decoder"]
    assert "error" not in e, e.get("error")
    assert set(e["compile_s"]) == {"ours", "peft", "base"}
    assert e["train"]["ours_over_peft"] > 0
    assert any("/peft/tuners/lora/" in g for g in _TRACED), "PEFT's LoRA layers never ran compiled"
    assert any("lightning_adapters/methods/lora.py" in g for g in _TRACED), "our LoRA layers never ran compiled"
    assert not any("/peft/" in g and "lightning_adapters/" in g for g in _TRACED)


@pytest.mark.slow
def test_gpu_script_tiny_runs_its_logic_here_and_names_the_device(tmp_path: Path) -> None:
    import torch

    from experiments.benchmarks import gpu

    assert gpu.default_device() == ("cuda" if torch.cuda.is_available() else "cpu")
    assert gpu.order(["boft_m1", "lora", "oft"]) == ["lora", "oft", "boft_m1"]  # PEFT's BOFT may JIT-build
    assert gpu.main(["--tiny", "--device", "cpu", "--methods", "lora", "oft", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "gpu.json").read_text())
    run = res["meta"]["runs"][0]
    assert run["device"].startswith("CPU") and run["commit"] and run["started"]
    for label in ("lora", "oft"):
        e = res["rows"][label]["bf16/llama-tiny"]
        assert "error" not in e, e.get("error")
        assert e["max_abs_logit_diff"] < 0.1  # ours and PEFT run the same adapter on the bf16 base
    md = (tmp_path / "gpu.md").read_text()
    assert run["device"] in md and run["commit"][:10] in md and "| lora | bf16/llama-tiny |" in md
    # On CUDA the same code times with CUDA events and reads max_memory_allocated (tests/gpu/test_bench_cuda.py).
    assert gpu.LLAMA_1B.layers == 16 and 1.0e9 < _llama_params(gpu.LLAMA_1B) < 1.3e9


def _llama_params(w) -> int:
    from experiments.benchmarks.flops import block_linears

    return w.layers * (sum(i * o for _, i, o in block_linears(w)) + 2 * w.hidden) + 2 * w.vocab * w.hidden + w.hidden


def test_a_method_name_selects_its_rows_unless_a_row_has_that_label() -> None:
    """``--methods lora`` is the LoRA row alone (the ``dora`` row runs the same method); ``boft`` is both BOFT rows."""
    from experiments.benchmarks.cases import select

    every = ["lora", "boft", "loha"]
    assert [c.label for c in select(["lora"], every)[0]] == ["lora"]
    assert [c.label for c in select(["dora"], every)[0]] == ["dora"]
    assert [c.label for c in select(["lora", "dora"], every)[0]] == ["lora", "dora"]
    assert [c.label for c in select(["boft"], every)[0]] == ["boft_m1", "boft_m2"]


def test_qlora_layers_profile_times_frozen_ours_and_peft_per_shape(tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    from experiments.benchmarks import qlora_vs_peft

    out = tmp_path / "layers.json"
    qlora_vs_peft.main(["--layers", "--quick", "--rows", "dora", "dora_fp32", "--reps", "1", "--json", str(out)])
    layers = json.loads(out.read_text())["layers"]
    # Only the NF4 row has layers to profile: one per quick shape, every side timed.
    assert [(r["row"], r["in"], r["out"]) for r in layers] == [("dora", 8, 8), ("dora", 8, 4)]
    assert all(r["cpu_ms"].keys() == {"frozen", "ours", "peft"} and min(r["cpu_ms"].values()) > 0 for r in layers)


def test_a_failed_peft_boft_extension_build_is_tried_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """PEFT retries a failed build of its BOFT CUDA kernel for every layer; the GPU script lets it fail once."""
    import peft.tuners.boft.layer as boft_layer

    from experiments.benchmarks import gpu

    calls = []
    monkeypatch.setattr(boft_layer, "get_fbd_cuda", lambda: calls.append(1))  # a build that fails: None
    assert gpu.peft_boft_extension_once() is False
    assert boft_layer.get_fbd_cuda() is None and boft_layer.get_fbd_cuda() is None
    assert calls == [1]
    built = object()
    monkeypatch.setattr(boft_layer, "get_fbd_cuda", lambda: built)
    assert gpu.peft_boft_extension_once() is True and boft_layer.get_fbd_cuda() is built


def test_device_session_script_runs_the_gpu_tests_and_the_benchmark(tmp_path: Path) -> None:
    """The one command a lent GPU runs, dry-run here: tests/gpu (skipped without CUDA) and the benchmark's logic."""
    import os

    env = dict(
        os.environ,
        OUT=str(tmp_path),
        PYTHON=sys.executable,
        INSTALL_WHEELS="0",
        STEPS="1",
        BENCH_ARGS="--tiny --device cpu --methods lora --warmup 0",
    )
    script = ROOT / "experiments" / "benchmarks" / "device_session.sh"
    done = subprocess.run(["bash", str(script)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "pytest exit 0" in (tmp_path / "pytest.log").read_text()
    assert "bench exit 0" in (tmp_path / "bench.log").read_text()
    assert "torch" in (tmp_path / "env.txt").read_text()
    res = json.loads((tmp_path / "gpu.json").read_text())
    assert "error" not in res["rows"]["lora"]["bf16/llama-tiny"]
    assert (tmp_path / "gpu_profiles.md").read_text().count("```") >= 2  # --profile: ours and PEFT's op tables
