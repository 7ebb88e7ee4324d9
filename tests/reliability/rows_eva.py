"""Bad-input rows of EVA and LoftQ (``LoRAConfig(init_weights="eva" | "loftq")``): their options, layers they cannot
adapt, an EVA run without batches or a second run, a model used before the data init, a LoftQ adapter converted to
plain LoRA.

``rows(Row)`` builds them with ``test_bad_inputs.Row`` (passed in, so this module never imports the test module).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import lightning_adapters as la
from tests.helpers import tiny_gpt2, tiny_llama


def _cfg(**kw: Any):
    return lambda m, p: la.LoRAConfig(init_weights="eva", **kw)


def _eva_llama(**kw: Any):
    return lambda: la.inject(tiny_llama(), la.LoRAConfig(target_modules=["q_proj"], init_weights="eva", **kw))


def _tokens(n: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 128, (2, 12), generator=g) for _ in range(n)]


def _initialised_llama() -> nn.Module:
    model = _eva_llama(r=2, eva_tau=0.8)()
    return la.initialize_from_data(model, _tokens())


class _Spare(nn.Module):
    """``spare`` is never called by ``forward``."""

    def __init__(self) -> None:
        super().__init__()
        self.used, self.spare = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.used(x)


def rows(Row: type) -> list:  # noqa: N803 - the Row class of test_bad_inputs
    """The rows, as ``Row`` instances."""
    return [
        Row("lora-eva-rho-below-one", None, _cfg(eva_rho=0.5), la.AdapterConfigError, r"eva_rho must be .*got 0.5"),
        Row("lora-eva-tau-above-one", None, _cfg(eva_tau=1.5), la.AdapterConfigError, r"eva_tau must be .*got 1.5"),
        Row(
            "lora-eva-whiten-not-bool",
            None,
            _cfg(eva_whiten="yes"),
            la.AdapterConfigError,
            r"eva_whiten must be one of \[False, True\], got 'yes'",
        ),
        Row(
            "lora-eva-label-mask-value-not-int",
            None,
            _cfg(eva_label_mask_value=1.5),
            la.AdapterConfigError,
            r"eva_label_mask_value must be an int label .*got 1.5",
        ),
        Row(
            "lora-eva-rank-wider-than-inputs",
            _eva_llama(r=40),
            lambda m, p: la.initialize_from_data(m, _tokens(1)),
            la.AdapterConfigError,
            r"round\(r \* eva_rho\) = 80 components of inputs only 64 wide; use eva_rho <= 1.6",
        ),
        Row(
            "lora-eva-no-batches",
            _eva_llama(r=2),
            lambda m, p: la.initialize_from_data(m, []),
            la.AdapterStateError,
            r"EVA got no batches",
        ),
        Row(
            "lora-eva-layer-never-runs",
            lambda: la.inject(_Spare(), la.LoRAConfig(r=2, target_modules=["spare"], init_weights="eva")),
            lambda m, p: la.initialize_from_data(m, [torch.randn(4, 8)]),
            la.AdapterStateError,
            r"\['spare'\] never ran on the first batch",
        ),
        Row(
            "lora-eva-run-before-init",
            _eva_llama(r=2),
            lambda m, p: m(_tokens(1)[0]),
            la.AdapterStateError,
            r"init_weights='eva' and has not been initialised from data.*save_peft",
        ),
        Row(
            "lora-eva-second-run",
            _initialised_llama,
            lambda m, p: la.initialize_from_data(m, _tokens()),
            la.AdapterConfigError,
            r"EVA already initialised \['model.layers.0.self_attn.q_proj'.*inject the config again",
        ),
        Row(
            "lora-loftq-bits",
            None,
            lambda m, p: la.LoRAConfig(init_weights="loftq", loftq_bits=2),
            la.AdapterConfigError,
            r"loftq_bits must be one of \[4, 8\], got 2",
        ),
        Row(
            "lora-loftq-iter-zero",
            None,
            lambda m, p: la.LoRAConfig(init_weights="loftq", loftq_iter=0),
            la.AdapterConfigError,
            r"loftq_iter must be an integer > 0, got 0",
        ),
        Row(
            "lora-loftq-on-conv1d",
            tiny_gpt2,
            lambda m, p: la.inject(m, la.LoRAConfig(r=2, target_modules=["c_attn"], init_weights="loftq")),
            la.AdapterConfigError,
            r"'loftq' works on nn.Linear layers, not on the Conv1D 'transformer.h.0.attn.c_attn'",
        ),
        Row(
            "lora-loftq-convert-to-lora",
            lambda: la.inject(tiny_llama(), la.LoRAConfig(r=2, target_modules=["q_proj"], init_weights="loftq")),
            lambda m, p: la.save_peft(m, p / "out", convert_to_lora=True),
            la.AdapterConfigError,
            r"convert_to_lora=True\): .* hold LoftQ adapters.*save without convert_to_lora",
        ),
    ]
