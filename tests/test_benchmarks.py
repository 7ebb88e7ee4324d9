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
    assert labels == {"lora", "loha", "lokr", "oft", "boft_m1", "boft_m2", "adalora"}
    assert all(r["rounds"] == 2 and r["median_ratio"] > 0 for r in res["rows"])
    assert "| encoder | lora |" in (tmp_path / "merged_eval.md").read_text()
