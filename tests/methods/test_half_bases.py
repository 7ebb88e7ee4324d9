"""The dtype policy on the layer kinds ``tests/methods/test_dtypes.py`` does not build: LoRA on parameters
(``target_parameters``). On a bf16 or fp16 base the adapter stays fp32 (the policy), the delta is added to the
parameter in the parameter's dtype, the output keeps the base dtype, and values and gradients agree with the same
weights in float64 to the half precision (a delta added in fp32 changed the output's dtype: a surviving mutant,
docs/MUTATION.md).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lightning_adapters as la
from tests.methods.test_dtypes import HALF, TOL, _close, _run


class Stacked(nn.Module):
    """``y = Σ_e x @ W[e]`` for a 3-D ``W`` (E, in, out) stored transposed, then a 2-D ``proj`` parameter."""

    is_transposed = True

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 8, 6) * 0.3)
        self.proj = nn.Parameter(torch.randn(5, 6) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.einsum("bi,eio->beo", x, self.w).sum(1)  # (B, out)
        return h @ self.proj.t()


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = Stacked()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


@pytest.mark.parametrize("dtype", HALF, ids=lambda d: str(d).split(".")[1])
def test_lora_on_half_parameters_keeps_the_dtype_and_the_values(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    cfg = la.LoRAConfig(r=2, alpha=3.0, target_modules=[], target_parameters=["block.w", "block.proj"])
    model = la.inject(Net(), cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in la.adapter_state_dict(model).values():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    ref = copy.deepcopy(model).double()
    model.to(dtype)
    la.apply_dtype_policy(model)
    assert {p.dtype for p in la.adapter_state_dict(model).values()} == {torch.float32}
    assert model.block.w.dtype == dtype
    x = torch.randn(4, 8, generator=g)
    y, grads = _run(model, x.to(dtype))
    y_ref, grads_ref = _run(ref, x.double())
    assert y.dtype == dtype
    _close(y, y_ref, TOL[dtype], "output")
    assert grads.keys() == grads_ref.keys()
    for name, grad in grads.items():
        assert grad.dtype == (dtype if name == "x" else torch.float32), name
        _close(grad, grads_ref[name], TOL[dtype] * 2, name)


@pytest.mark.parametrize("dtype", HALF, ids=lambda d: str(d).split(".")[1])
def test_llama_adapter_on_a_half_gpt2_keeps_the_dtype_and_the_values(dtype: torch.dtype) -> None:
    """Llama-Adapter's GPT-2 flavour adds ``g · A V_p`` after ``c_proj`` (``after_attention``); with fp32 gates on a
    half base the term is fp32 and must come back in the base dtype, so the hidden states and logits stay half."""
    from tests.helpers import tiny_gpt2, token_batch

    torch.manual_seed(0)
    model = la.inject(tiny_gpt2(), la.LlamaAdapterConfig(adapter_len=3, adapter_layers=2))
    with torch.no_grad():
        for p in la.adapter_state_dict(model).values():
            p.add_(torch.randn(p.shape) * 0.2)  # gates start at 0: make the term non-zero
    ref = copy.deepcopy(model).double()
    model.to(dtype)
    la.apply_dtype_policy(model)
    assert {p.dtype for p in la.adapter_state_dict(model).values()} == {torch.float32}
    x = token_batch(128)
    out = model(x, output_hidden_states=True)
    assert out.logits.dtype == dtype and all(h.dtype == dtype for h in out.hidden_states)
    want = ref(x).logits
    _close(out.logits, want, TOL[dtype] * 2, "logits")
