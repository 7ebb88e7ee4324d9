"""The README's "Inference with what you trained" code, run as written on the outputs of a real (short) app run.

Only the run directory is substituted. The three routes (checkpoint, PEFT export through this library and
through PEFT, the bare encoder with its own PEFT adapter) must agree with each other, and differ from an
untrained task module.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
SECTION = "## Inference with what you trained"


def readme_python_block(section: str) -> str:
    text = (ROOT / "README.md").read_text()
    body = text.split(section, 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", body, flags=re.S)
    assert len(blocks) == 1, f"expected one python block under {section!r}"
    return blocks[0]


def test_readme_inference_code_runs_on_an_app_run(tmp_path):
    run = tmp_path / "run"
    short = [
        "logger=none",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1",
        "callbacks.progress_bar.refresh_rate=0",
        f"hydra.run.dir={run}",
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    done = subprocess.run(
        [sys.executable, "-m", "lightning_adapters.train", *short],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]

    code = readme_python_block(SECTION)
    pattern = r'run = Path\("logs/train/runs/[^"]*"\)'
    assert re.search(pattern, code)
    code = re.sub(pattern, f"run = Path({str(run)!r})", code, count=1)
    ns: dict = {}
    with pytest.warns(UserWarning, match=r"trained outside module='backbone'.*head\.bias"):
        exec(compile(code, "README.md", "exec"), ns)

    from_checkpoint = ns["from_checkpoint"]
    assert from_checkpoint.shape == (3,)
    torch.testing.assert_close(ns["from_export"], from_checkpoint, atol=1e-6, rtol=0)
    torch.testing.assert_close(ns["from_peft"], from_checkpoint, atol=1e-5, rtol=0)
    batch = ns["batch"]
    with torch.no_grad():
        trained_hidden = ns["task"].backbone(**batch).last_hidden_state
        untrained = ns["instantiate"](ns["cfg"].model).eval()(batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(ns["hidden"], trained_hidden, atol=1e-6, rtol=0)
    torch.testing.assert_close(ns["hidden_peft"], trained_hidden, atol=1e-5, rtol=0)
    assert (untrained - from_checkpoint).abs().max() > 1e-3  # the restored head and adapter are not the initial ones
