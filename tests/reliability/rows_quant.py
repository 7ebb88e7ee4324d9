"""Bad-input rows of issue 17 (quantized bases): bad ``quantize`` arguments, quantizing an injected model, an init
that rewrites a quantized weight, a trainable-weight int8 layer, and unmerging a re-quantized merge.

``rows(Row)`` builds them with ``test_bad_inputs.Row`` (passed in, so this module never imports the test module).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import lightning_adapters as la


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.q = nn.Linear(64, 64)
        self.v = nn.Linear(64, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.v(self.q(x))


def _quantized() -> nn.Module:
    return la.quantize(_Net(), "nf4", skip=[])


def _merged() -> nn.Module:
    model = la.inject(_quantized(), la.LoRAConfig(r=2, target_modules=["q"]))
    with torch.no_grad():
        model.q.adapter.default.lora_B.fill_(0.1)
    return la.merge(model)


def _fp16_weights_int8() -> nn.Module:
    import bitsandbytes as bnb

    model = _Net()
    model.q = bnb.nn.Linear8bitLt(64, 64, has_fp16_weights=True)
    return model


def _float64_second() -> nn.Module:
    """``q`` in float32, ``v`` in float64: a failure at ``v`` must not leave ``q`` quantized."""
    model = _Net()
    model.v.double()
    return model


def _enter_disabled(m: nn.Module, p: Any) -> None:
    with la.disabled(m):
        pass


def rows(Row: type) -> list:  # noqa: N803 - the Row class of test_bad_inputs
    """The rows, as ``Row`` instances."""
    return [
        Row(
            "quantize-unknown-scheme",
            _Net,
            lambda m, p: la.quantize(m, "nf3"),
            la.AdapterConfigError,
            r"scheme='nf3' is not one of \['nf4', 'fp4', 'int8'",
        ),
        Row(
            "quantize-double-quant-int8",
            _Net,
            lambda m, p: la.quantize(m, "int8", double_quant=True),
            la.AdapterConfigError,
            r"double_quant=True applies to bitsandbytes 4-bit scales .*not 'int8'",
        ),
        Row(
            "quantize-bad-blocksize",
            _Net,
            lambda m, p: la.quantize(m, "nf4", blocksize=48),
            la.AdapterConfigError,
            r"blocksize=48 must be one of \[32, 64",
        ),
        Row(
            "quantize-bad-compute-dtype",
            _Net,
            lambda m, p: la.quantize(m, "nf4", compute_dtype="int8"),
            la.AdapterConfigError,
            r"compute_dtype='int8' is not a floating dtype; use 'float32', 'bfloat16'",
        ),
        Row(
            "quantize-compute-dtype-int8",
            _Net,
            lambda m, p: la.quantize(m, "int8", compute_dtype="bfloat16"),
            la.AdapterConfigError,
            r"compute_dtype=torch.bfloat16 applies to bitsandbytes 4-bit layers .*not 'int8'",
        ),
        Row(
            "quantize-torchao-nf4-odd-size",
            _Net,
            lambda m, p: la.quantize(m, "torchao_nf4"),
            la.AdapterConfigError,
            r"'q' has 4096 weights, which torchao's NF4 cannot split .*add it to skip",
        ),
        Row(
            "quantize-injected-model",
            lambda: la.inject(_Net(), la.LoRAConfig(r=2, target_modules=["q"])),
            lambda m, p: la.quantize(m, "nf4"),
            la.AdapterConfigError,
            r"already holds adapters; quantize the plain model first, then inject",
        ),
        Row(
            "quantize-nothing-left",
            _Net,
            lambda m, p: la.quantize(m, "nf4", skip=["q", "v"]),
            la.TargetError,
            r"no plain nn.Linear layer left to quantize \(skip=\['q', 'v'\]\)",
        ),
        Row(
            "quantize-float64-layer",
            _float64_second,
            lambda m, p: la.quantize(m, "nf4", skip=[]),
            la.AdapterConfigError,
            r"'v' has a torch.float64 weight, which scheme 'nf4' cannot quantize .*model.float\(\)\) or add",
        ),
        Row(
            "quantize-torchao-int8-float64-layer",
            _float64_second,
            lambda m, p: la.quantize(m, "torchao_int8", skip=[]),
            la.AdapterConfigError,
            r"'v' has a torch.float64 weight, which scheme 'torchao_int8' cannot quantize",
        ),
        Row(
            "quantize-skip-not-names",
            _Net,
            lambda m, p: la.quantize(m, "nf4", skip=["q", None]),
            la.AdapterConfigError,
            r"skip=\['q', None\] must be a list of module name suffixes or a full-match regex string",
        ),
        Row(
            "quantize-skip-bad-regex",
            _Net,
            lambda m, p: la.quantize(m, "nf4", skip="(q"),
            la.AdapterConfigError,
            r"skip: '\(q' is not a valid regular expression",
        ),
        Row(
            "quantize-twice",
            _quantized,
            lambda m, p: la.quantize(m, "int8"),
            la.TargetError,
            r"no plain nn.Linear layer left to quantize \(skip=\[\]\); already quantized: 'q' \(nf4\), 'v' \(nf4\)",
        ),
        Row(
            "residual-init-on-quantized-base",
            _quantized,
            lambda m, p: la.inject(m, la.LoRAConfig(r=2, init_weights="pissa", target_modules=["q"])),
            la.UnsupportedLayerError,
            r"'q' is a quantized base, which an init that rewrites the base weight \(init_weights='pissa'\)",
        ),
        Row(
            "int8-layer-with-fp16-weights",
            _fp16_weights_int8,
            lambda m, p: la.inject(m, la.LoRAConfig(r=2, target_modules=["q"])),
            la.UnsupportedLayerError,
            r"cannot adapt 'q': a bitsandbytes Linear8bitLt with has_fp16_weights=True .*has_fp16_weights=False",
        ),
        Row(
            "unmerge-requantized-base",
            _merged,
            lambda m, p: la.unmerge(m),
            la.MergeError,
            r"unmerge: 'q' is a quantized base .*merge\(model, keep_original=True\)",
        ),
        Row(
            "disabled-requantized-base",
            _merged,
            _enter_disabled,
            la.MergeError,
            r"disabled: 'q' is a quantized base .*keep_original=True",
        ),
    ]
