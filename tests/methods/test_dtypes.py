"""The dtype policy for every method and layer kind, on each dtype it names: bf16, fp16, fp32 and fp64.

Policy (``AdapterConfig.adapter_dtype``): ``None`` keeps fp32 adapters on a half-precision base (bf16 *and* fp16)
and the base's own dtype otherwise; an explicit ``adapter_dtype`` wins; ``apply_dtype_policy`` restores it after a
whole-model cast (Lightning's ``*-true`` precisions). For every case the output keeps the input's dtype, the input
gradient keeps its dtype, adapter gradients come in the adapter dtype, and values and gradients agree with the
same weights run in float64 to the precision of the half dtype. Every test runs on bf16 and on fp16 alike.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lightning_adapters as la
from tests.helpers import Wrap, tiny_llama, token_batch

HALF = [torch.bfloat16, torch.float16]
# Relative tolerance of a half-precision forward/backward against float64 (bf16 keeps 8 mantissa bits).
TOL = {torch.bfloat16: 4e-2, torch.float16: 6e-3, torch.float32: 1e-5, torch.float64: 1e-12}


def _conv1d_t(in_f: int, out_f: int) -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    m = Conv1D(out_f, in_f)
    nn.init.normal_(m.weight, std=0.2)
    return m


LAYERS = {
    "linear": (lambda: nn.Linear(16, 12), lambda: torch.randn(2, 5, 16)),
    "linear-many-rows": (lambda: nn.Linear(16, 12), lambda: torch.randn(4, 40, 16)),  # folds in kernels.lowrank
    "conv1d_t": (lambda: _conv1d_t(16, 12), lambda: torch.randn(2, 5, 16)),
    "conv2d": (lambda: nn.Conv2d(4, 6, 3, padding=1), lambda: torch.randn(2, 4, 5, 5)),
    "embedding": (lambda: nn.Embedding(10, 8), lambda: torch.randint(0, 10, (2, 5))),
}

CONFIGS = {
    "lora": (
        lambda: la.LoRAConfig(r=3, alpha=5.0, target_modules=["layer"]),
        ["linear", "linear-many-rows", "conv1d_t", "conv2d", "embedding"],
    ),
    "dora": (
        lambda: la.LoRAConfig(r=3, alpha=5.0, use_dora=True, target_modules=["layer"]),
        ["linear", "conv1d_t", "conv2d", "embedding"],
    ),
    "adalora": (
        lambda: la.AdaLoRAConfig(init_r=4, target_r=2, alpha=5.0, total_step=10, target_modules=["layer"]),
        ["linear", "linear-many-rows", "conv1d_t", "conv2d"],
    ),
    "loha": (lambda: la.LoHaConfig(r=3, alpha=5.0, target_modules=["layer"]), ["linear", "conv1d_t", "conv2d"]),
    "lokr": (lambda: la.LoKrConfig(r=1, alpha=5.0, target_modules=["layer"]), ["linear", "conv1d_t", "conv2d"]),
    "oft": (
        lambda: la.OFTConfig(oft_block_size=4, target_modules=["layer"]),
        ["linear", "linear-many-rows", "conv2d", "embedding"],
    ),
    "boft": (
        lambda: la.BOFTConfig(boft_block_size=4, target_modules=["layer"]),
        ["linear", "linear-many-rows", "conv2d"],
    ),
}
CASES = [(m, layer) for m, (_, layers) in CONFIGS.items() for layer in layers]


def _build(method: str, layer: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    make, make_x = LAYERS[layer]
    model = la.inject(Wrap(make()), CONFIGS[method][0]())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in la.adapter_state_dict(model).values():
            if p.is_floating_point():
                p.add_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * 0.2)
    return model.train(), make_x()


def _run(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Output and gradients (``"x"`` for a float input, adapter tensors by name) of ``sum(y · g)``."""
    x = x.detach().clone().requires_grad_(x.is_floating_point())
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    y = model(x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(5)).to(y.dtype)
    wrt = ([x] if x.requires_grad else []) + list(params.values())
    grads = torch.autograd.grad((y * g).sum(), wrt)
    return y.detach(), dict(zip((["x"] if x.requires_grad else []) + list(params), grads))


def _close(got: torch.Tensor, ref: torch.Tensor, tol: float, what: str) -> None:
    err = (got.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-12)
    assert err <= tol, (what, err.item())


@pytest.mark.parametrize("dtype", HALF + [torch.float32, torch.float64], ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("method, layer", CASES, ids=[f"{m}-{layer}" for m, layer in CASES])
def test_default_policy_values_and_gradients(method: str, layer: str, dtype: torch.dtype) -> None:
    """Base in ``dtype``: fp32 adapters on a half base, else the base dtype; values and gradients vs float64."""
    model, x = _build(method, layer)
    ref_model = copy.deepcopy(model).double()
    la.apply_dtype_policy(ref_model)
    fresh = la.inject(Wrap(LAYERS[layer][0]()).to(dtype), CONFIGS[method][0]())  # injected on a `dtype` base
    adapter_dt = torch.float32 if dtype in HALF else dtype
    assert {p.dtype for p in la.adapter_state_dict(fresh).values() if p.is_floating_point()} == {adapter_dt}
    model_cast = copy.deepcopy(model)
    model_cast.to(dtype)  # a whole-model cast (Lightning's *-true precision) ...
    la.apply_dtype_policy(model_cast)  # ... and the policy re-applied
    assert {p.dtype for p in la.adapter_state_dict(model_cast).values() if p.is_floating_point()} == {adapter_dt}
    xin = x.to(dtype) if x.is_floating_point() else x
    y, grads = _run(model_cast, xin)
    y_ref, grads_ref = _run(ref_model, x.double() if x.is_floating_point() else x)
    assert y.dtype == dtype
    tol = TOL[dtype]
    _close(y, y_ref, tol, "output")
    assert grads.keys() == grads_ref.keys()
    for name, grad in grads.items():
        expected_dtype = dtype if name == "x" else adapter_dt
        assert grad.dtype == expected_dtype, name
        _close(grad, grads_ref[name], tol * 2, name)


@pytest.mark.parametrize("adapter_dtype", ["bfloat16", "float16", "float64"])
@pytest.mark.parametrize("base_dtype", HALF + [torch.float32], ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("method", ["lora", "adalora", "loha", "lokr", "oft", "boft"])
def test_explicit_adapter_dtype(method: str, base_dtype: torch.dtype, adapter_dtype: str) -> None:
    """An explicit ``adapter_dtype`` wins over the default, on every base dtype, including one equal to the base's
    half dtype (LoRA/AdaLoRA then run their fused half-precision path)."""
    torch.manual_seed(0)
    base = nn.Linear(16, 12)
    x = torch.randn(4, 40, 16)
    cfg = CONFIGS[method][0]()
    cfg.adapter_dtype = adapter_dtype
    ref = la.inject(Wrap(copy.deepcopy(base)).double(), CONFIGS[method][0]())
    model = la.inject(Wrap(copy.deepcopy(base).to(base_dtype)), cfg).train()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for (_, p), (_, q) in zip(
            sorted(la.adapter_state_dict(model).items()), sorted(la.adapter_state_dict(ref).items())
        ):
            noise = torch.randn(p.shape, generator=g) * 0.2
            p.add_(noise.to(p.dtype))
            q.copy_(p.double())
    want = getattr(torch, adapter_dtype)
    assert {p.dtype for p in la.adapter_state_dict(model).values() if p.is_floating_point()} == {want}
    y, grads = _run(model, x.to(base_dtype))
    y_ref, grads_ref = _run(ref.train(), x.double())
    assert y.dtype == base_dtype and grads["x"].dtype == base_dtype
    tol = max(TOL[base_dtype], TOL[want])
    _close(y, y_ref, tol, "output")
    for name, grad in grads.items():
        assert grad.dtype == (base_dtype if name == "x" else want), name
        _close(grad, grads_ref[name], tol * 2, name)


@pytest.mark.parametrize("dtype", HALF, ids=lambda d: str(d).split(".")[1])
def test_llama_adapter_policy_on_each_half_dtype(dtype: torch.dtype) -> None:
    """Llama-Adapter: fp32 prompts and gates on a bf16 or fp16 base, logits in the base dtype, policy re-applied."""
    x = token_batch(128)
    model = la.inject(tiny_llama().to(dtype), la.LlamaAdapterConfig(adapter_len=3, adapter_layers=2))
    assert {v.dtype for v in la.adapter_state_dict(model).values()} == {torch.float32}
    out = model(x, labels=x)
    assert out.logits.dtype == dtype and torch.isfinite(out.logits).all()
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    model.to(dtype)
    la.apply_dtype_policy(model)
    assert {v.dtype for v in la.adapter_state_dict(model).values()} == {torch.float32}


@pytest.mark.parametrize("dtype", HALF, ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("method, layer", [c for c in CASES if c[1] in ("linear", "linear-many-rows", "conv2d")])
def test_autocast_takes_the_plain_path_with_the_same_maths(method: str, layer: str, dtype: torch.dtype) -> None:
    """Under CPU autocast the fused Functions step aside (``fused_linear_applies``, ``kernels.folded``'s special path,
    LoKr's differentiable Kronecker form); values and gradients still match float64 to the half precision."""
    model, x = _build(method, layer)
    ref_model = copy.deepcopy(model).double()
    la.apply_dtype_policy(ref_model)
    with torch.autocast("cpu", dtype=dtype):
        y, grads = _run(model, x)
    y_ref, grads_ref = _run(ref_model, x.double())
    _close(y, y_ref, TOL[dtype], "output")
    assert grads.keys() == grads_ref.keys()
    for name, grad in grads.items():
        assert grad.dtype == torch.float32, name
        _close(grad, grads_ref[name], TOL[dtype] * 2, name)
