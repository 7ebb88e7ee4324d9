"""The dtype policy on the layer kinds ``tests/methods/test_dtypes.py`` does not build: LoRA on parameters
(``target_parameters``). On a bf16 or fp16 base the adapter stays fp32 (the policy), the delta is added to the
parameter in the parameter's dtype, the output keeps the base dtype, and values and gradients agree with the same
weights in float64 to the half precision (a delta added in fp32 changed the output's dtype: a surviving mutant,
docs/MUTATION.md). And LoRA/DoRA on half Linear, Conv2d, Conv1D and Embedding bases against PEFT, bit for bit.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import lightning_adapters as la
from tests.helpers import Wrap
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


# --- LoRA and DoRA on half bases: PEFT's numbers bit for bit ---------------------------------------------------------

_KINDS = {
    "linear": (lambda: nn.Linear(16, 12), lambda g: torch.randn(3, 16, generator=g)),
    "conv2d": (lambda: nn.Conv2d(4, 6, 3), lambda g: torch.randn(2, 4, 5, 5, generator=g)),
    "conv1d_t": (lambda: Conv1D(12, 16), lambda g: torch.randn(3, 16, generator=g)),
    "embedding": (lambda: nn.Embedding(10, 6), lambda g: torch.tensor([[1, 2, 3], [0, 9, 2]])),
}


def _peft_tensors(layer: nn.Module) -> dict[str, torch.Tensor]:
    if len(layer.lora_A):
        out = {"lora_A": layer.lora_A["default"].weight, "lora_B": layer.lora_B["default"].weight}
    else:
        out = {"lora_A": layer.lora_embedding_A["default"], "lora_B": layer.lora_embedding_B["default"]}
    if "default" in layer.lora_magnitude_vector:
        out["magnitude"] = layer.lora_magnitude_vector["default"].weight
    return out


def _as(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return t if t.shape == shape else t.t() if t.t().shape == shape else t.reshape(shape)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "fp16"])
@pytest.mark.parametrize("kind", list(_KINDS))
def test_a_half_base_gives_peft_s_outputs_and_factor_gradients_bit_for_bit(kind, dtype, dora, train) -> None:
    """Float32 factors on a half base: the base output and the float32 term are summed in float32 and rounded
    once, as PEFT's ``result + ...`` and ``.to(result dtype)`` do (rounding the term first was up to 2 ulps off).
    The magnitude's gradient is a float32 reduction in another order: equal to float32 rounding."""
    from peft import LoraConfig, get_peft_model

    make, make_x = _KINDS[kind]
    torch.manual_seed(0)
    model = Wrap(make()).to(dtype)
    peft_cfg = LoraConfig(r=4, lora_alpha=8, use_dora=dora, target_modules=["layer"], fan_in_fan_out=kind == "conv1d_t")
    peft_model = get_peft_model(copy.deepcopy(model), peft_cfg)
    ours = la.inject(model, la.LoRAConfig(r=4, alpha=8.0, use_dora=dora, target_modules=["layer"]))
    layer, theirs = ours.layer.adapter["default"], _peft_tensors(peft_model.base_model.model.layer)
    mine = {"lora_A": layer.lora_A, "lora_B": layer.lora_B, "magnitude": getattr(layer, "magnitude", None)}
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, t in theirs.items():
            v = torch.randn(t.shape, generator=g) * 0.3 if name != "magnitude" else t * 1.1
            t.copy_(v)
            mine[name].copy_(_as(v, mine[name].shape))
    assert layer.lora_A.dtype == torch.float32
    x = make_x(g)
    x = x if kind == "embedding" else x.to(dtype)
    ours.train(train)
    peft_model.train(train)
    y_ours, y_theirs = ours(x), peft_model(x)
    assert y_ours.dtype == dtype and torch.equal(y_ours, y_theirs)
    grad = torch.randn(y_ours.shape, generator=g).to(dtype)
    y_ours.backward(grad)
    y_theirs.backward(grad)
    for name, t in theirs.items():
        got = _as(mine[name].grad, t.grad.shape)
        if name == "magnitude":
            torch.testing.assert_close(got, t.grad, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(got, t.grad), name


@pytest.mark.parametrize("tokens", [3, 96], ids=["few", "many"])
@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "fp16"])
@pytest.mark.parametrize("kind", ["linear", "wide", "conv2d"])  # wide: LoHa's rank-r² product pays
@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_loha_and_lokr_on_a_half_base_give_peft_s_outputs_bit_for_bit(method, kind, dtype, tokens, tmp_path) -> None:
    """PEFT's trained factors loaded here (float32 on a half base): every path, folded, rank-r², Kronecker or two
    products, sums the base output and the float32 term in float32 and rounds once, as PEFT's ``result + ...``
    does; in training too, and the factor gradients agree to float32 rounding."""
    from peft import LoHaConfig, LoKrConfig, get_peft_model

    torch.manual_seed(0)
    bases = {
        "linear": lambda: nn.Linear(16, 12),
        "wide": lambda: nn.Linear(128, 128),
        "conv2d": lambda: nn.Conv2d(4, 8, 3),
    }
    model = Wrap(bases[kind]()).to(dtype)
    cfg = (LoHaConfig if method == "loha" else LoKrConfig)(r=4, alpha=8, target_modules=["layer"], init_weights=False)
    peft_model = get_peft_model(copy.deepcopy(model), cfg)
    peft_model.save_pretrained(tmp_path)
    ours = la.load_peft(model, tmp_path)
    g = torch.Generator().manual_seed(1)
    shape = {"linear": (tokens, 16), "wide": (tokens, 128), "conv2d": (max(1, tokens // 9), 4, 5, 5)}[kind]
    x = torch.randn(shape, generator=g).to(dtype)
    for train in (False, True):
        peft_model.train(train)
        ours.train(train)
        y_ours, y_theirs = ours(x), peft_model(x)
        assert y_ours.dtype == dtype
        if method == "lokr" and kind == "wide" and tokens > 3:
            # The Kronecker product never forms ΔW: its float32 term differs from PEFT's in the last bits, which
            # can move a rounded half output by one ulp.
            torch.testing.assert_close(y_ours, y_theirs, rtol=torch.finfo(dtype).eps, atol=0)
        else:
            assert torch.equal(y_ours, y_theirs), train
    grad = torch.randn(y_ours.shape, generator=g).to(dtype)
    y_ours.backward(grad)
    y_theirs.backward(grad)
    theirs = [p.grad for _, p in sorted(peft_model.named_parameters()) if p.requires_grad]
    mine = [p.grad for _, p in sorted(ours.named_parameters()) if p.requires_grad]
    assert len(mine) == len(theirs)
    for u, v in zip(mine, theirs):
        torch.testing.assert_close(u.reshape(v.shape), v, rtol=1e-5, atol=1e-5)
