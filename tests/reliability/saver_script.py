"""Processes that save PEFT adapters, for ``test_faults.py``. Kept apart from ``fault_script.py`` so they do not
import Lightning and start quickly.

``DIR SAVER`` saves 20 different adapters into DIR (two of these run at once in the concurrency test).
``DIR SAVER --kill-at-rename N`` saves adapter 0, then saves adapter 1 and gets SIGKILL right after its N-th
rename (1: between moving the old directory aside and moving the new one in).

    python tests/reliability/saver_script.py DIR SAVER [--kill-at-rename N]
"""

from __future__ import annotations

import copy
import functools
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import lightning_adapters as la  # noqa: E402

SAVES = 20
# Each saver has its own config (rank and targets), so weights next to the other saver's config cannot load.
SAVER_CONFIGS = (
    la.LoRAConfig(r=2, alpha=4.0, target_modules=["q_proj"]),
    la.LoRAConfig(r=4, alpha=8.0, target_modules=["q_proj", "v_proj"]),
)


class Base(nn.Module):
    """Two 32-wide linear layers named like attention projections (plain torch: the savers start fast)."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.v_proj = nn.Linear(32, 32), nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.v_proj(self.q_proj(x))


@functools.cache
def base() -> nn.Module:
    """The base every adapter sits on."""
    torch.manual_seed(0)
    return Base()


def saved_adapter(saver: int, i: int) -> nn.Module:
    """The model whose adapter ``saver`` writes at its ``i``-th save (every value depends on both)."""
    model = la.inject(copy.deepcopy(base()), SAVER_CONFIGS[saver])
    g = torch.Generator().manual_seed(1000 * saver + i)
    with torch.no_grad():
        for t in la.adapter_state_dict(model).values():
            t.copy_(torch.randn(t.shape, generator=g))
    return model


def killed_mid_save(directory: str, saver: int, at_rename: int) -> None:
    """Save adapter 0, then die by SIGKILL right after the ``at_rename``-th rename of the save of adapter 1."""
    la.save_peft(saved_adapter(saver, 0), directory)
    real_rename, calls = os.rename, []

    def rename_then_die(src, dst, *args, **kwargs):
        real_rename(src, dst, *args, **kwargs)
        calls.append(dst)
        if len(calls) == at_rename:
            os.kill(os.getpid(), signal.SIGKILL)

    os.rename = rename_then_die
    la.save_peft(saved_adapter(saver, 1), directory)


def main() -> None:
    """Build the 20 models, announce readiness (``DIR.ready-SAVER``), wait for ``DIR.go``, then save them all."""
    directory, saver = sys.argv[1], int(sys.argv[2])
    torch.set_num_threads(1)
    if len(sys.argv) > 3:
        killed_mid_save(directory, saver, int(sys.argv[4]))
        return
    models = [saved_adapter(saver, i) for i in range(SAVES)]
    Path(f"{directory}.ready-{saver}").touch()
    while not Path(f"{directory}.go").exists():
        time.sleep(0.01)
    for model in models:
        la.save_peft(model, directory)
        time.sleep(0.05)  # spreads the saves over a second or two, so the test's loads overlap them


if __name__ == "__main__":
    main()
