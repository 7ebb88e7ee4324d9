"""The benchmark harness on CUDA: CUDA-event timing, CUDA peak memory, and the GPU script end to end.

Skipped without CUDA, like the other ``tests/gpu`` files (``tests/test_benchmarks.py`` runs the same script on the
CPU with ``--tiny``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_step_peak_bytes_on_cuda_is_the_allocation_high_water_mark():
    from experiments.benchmarks.measure import step_peak_bytes

    def fn():
        a = torch.empty(1024, 1024, device="cuda")  # 4 MiB
        b = torch.empty(512, 1024, device="cuda")  # 2 MiB while a lives
        del a, b

    assert step_peak_bytes(fn, steps=2, device="cuda") == 6 * 2**20


def test_alternate_times_the_gpu_work_with_cuda_events():
    from experiments.benchmarks.measure import alternate

    x = torch.randn(2048, 2048, device="cuda")

    def one():
        x @ x

    def eight():
        for _ in range(8):
            x @ x

    wall, _ = alternate({"one": one, "eight": eight}, warmup=2, repeats=5, device="cuda")
    ratio = sorted(e / o for e, o in zip(wall["eight"], wall["one"]))[2]
    assert 4 < ratio < 12  # asynchronous launches would time ~0 without the events


def test_gpu_script_tiny_on_cuda_writes_device_and_rows(tmp_path: Path):
    from experiments.benchmarks import gpu

    assert gpu.main(["--tiny", "--device", "cuda", "--methods", "lora", "boft_m1", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "gpu.json").read_text())
    assert res["meta"]["runs"][0]["device"] == torch.cuda.get_device_name()
    for label in ("lora", "boft_m1"):
        e = res["rows"][label]["bf16/llama-tiny"]
        assert "error" not in e, e.get("error")
        assert e["max_abs_logit_diff"] < 0.1 and e["memory"]["ours"]["step_peak_mib"] > 0
    assert torch.cuda.get_device_name() in (tmp_path / "gpu.md").read_text()
