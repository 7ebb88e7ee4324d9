"""DoRA's fused Linear/Conv1D path (``kernels.dora``) inside the layer, and its eval-mode weight-norm cache.

The fused path is checked against PEFT's DoRA form written with stock autograd ops on the layer's own tensors:
output and the gradients of ``x``, ``A``, ``B``, ``m`` and a trainable bias, in training (norm computed per step)
and in eval (norm from the cache), with and without dropout (the same seed on both sides), with and without an
input gradient, with a frozen ``B``, on Linear and transformers Conv1D, in fp32, fp16 and bf16; a spy asserts the
fused Function really ran (a silent fallback to the plain path would pass the maths but not this). A trainable
base weight, or an adapter in another dtype, takes the plain path instead, equally right.

The cache: a second eval forward computes no norm; writing ``m``, ``A``, ``B`` or ``W`` (an optimizer step,
``load_adapter_state_dict``, merge/unmerge, ``load_state_dict``) or ``train()`` makes the next eval forward use the
new weights; an eval forward after the change equals a freshly built layer's.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightning_adapters as la
from lightning_adapters.kernels import dora as dora_kernel
from lightning_adapters.kernels.lowrank import fold_pays, fold_pays_backward
from tests.helpers import Wrap, autograd_kept_bytes


def _reference(layer: nn.Module, x: torch.Tensor, p: float, train: bool) -> torch.Tensor:
    """PEFT's form: ``base(x) + (f − 1)·W x_d + f·s·B A x_d``, ``f = m / ‖W + s·B·A‖`` (norm detached)."""
    a = layer.adapter.default
    w = (layer.weight.t() if a.kind == "conv1d_t" else layer.weight).to(x.dtype)  # (out, in)
    n = (w + a.scale * a.lora_B @ a.lora_A).detach().norm(dim=1)
    f = a.magnitude / n
    xd = F.dropout(x, p, True) if p > 0 and train else x
    lora = a.scale * F.linear(F.linear(xd, a.lora_A), a.lora_B)
    return F.linear(x, w, layer.bias.to(x.dtype)) + (f - 1) * F.linear(xd, w) + f * lora


def _make(kind: str, in_f: int, out_f: int, dropout: float, dtype: torch.dtype = torch.float32) -> Wrap:
    torch.manual_seed(0)
    if kind == "conv1d_t":
        from transformers.pytorch_utils import Conv1D

        base = Conv1D(out_f, in_f)
        nn.init.normal_(base.weight, std=0.2)
        nn.init.normal_(base.bias, std=0.2)
    else:
        base = nn.Linear(in_f, out_f)
    model = Wrap(base.to(dtype))
    la.inject(model, la.LoRAConfig(r=4, alpha=8, dropout=dropout, use_dora=True, target_modules=["layer"]))
    a = model.layer.adapter.default
    a.to(dtype)
    with torch.no_grad():
        a.lora_B.normal_(std=0.3)
        a.magnitude.mul_(1 + 0.3 * torch.randn(out_f).to(dtype))
    return model


class _Spy:
    """Counts ``DoRALinear`` calls (and no-grad fused calls)."""

    def __init__(self, monkeypatch) -> None:
        self.calls = 0
        apply, no_grad = dora_kernel.DoRALinear.apply, dora_kernel.dora_linear_no_grad

        def counted_apply(*args):
            self.calls += 1
            return apply(*args)

        def counted_no_grad(*args):
            self.calls += 1
            return no_grad(*args)

        monkeypatch.setattr(dora_kernel.DoRALinear, "apply", counted_apply)
        monkeypatch.setattr(dora_kernel, "dora_linear_no_grad", counted_no_grad)


def _grads(model: Wrap, x: torch.Tensor, g: torch.Tensor, fn) -> dict[str, torch.Tensor]:
    for p in model.parameters():
        p.grad = None
    x = x.detach().clone().requires_grad_(x.requires_grad)
    torch.manual_seed(123)  # the same dropout mask for both paths
    y = fn(x)
    (y * g).sum().backward()
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    out["y"] = y.detach()
    if x.requires_grad:
        out["x"] = x.grad
    return out


# Half the largest relative errors of the plain path at these shapes are ~1e-3 (fp16) and ~8e-3 (bf16).
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("kind", ["linear", "conv1d_t"])
@pytest.mark.parametrize("rows", [3, 64], ids=["unfolded", "folded"])
@pytest.mark.parametrize("x_grad", [True, False], ids=["xgrad", "xfrozen"])
@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["nodrop", "drop"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_fused_dora_matches_autograd(kind, rows, x_grad, dropout, mode, monkeypatch) -> None:
    in_f, out_f = 12, 10
    assert fold_pays(rows * 2, in_f, out_f) == fold_pays_backward(rows * 2, in_f, out_f) == (rows == 64)
    model = _make(kind, in_f, out_f, dropout).train(mode == "train")
    model.layer.bias.requires_grad_(True)  # bias="all": a trainable base bias
    x = torch.randn(2, rows, in_f, generator=torch.Generator().manual_seed(1)).requires_grad_(x_grad)
    g = torch.randn(2, rows, out_f, generator=torch.Generator().manual_seed(2))
    spy = _Spy(monkeypatch)
    ours = _grads(model, x, g, model)
    assert spy.calls == 1
    ref = _grads(model, x, g, lambda t: _reference(model.layer, t, dropout, mode == "train"))
    assert ours.keys() == ref.keys() and {"layer.adapter.default.magnitude", "layer.bias"} <= ref.keys()
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], rtol=1e-5, atol=1e-5, msg=k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows", [3, 64], ids=["unfolded", "folded"])
@pytest.mark.parametrize("frozen_b", [False, True], ids=["B", "B-frozen"])
def test_fused_dora_in_each_float_dtype(dtype, rows, frozen_b, monkeypatch) -> None:
    """Base and adapter both in ``dtype`` (``adapter_dtype``): fused, and equal to the formula in float64."""
    model = _make("linear", 12, 10, 0.0, dtype).train()
    a = model.layer.adapter.default
    a.lora_B.requires_grad_(not frozen_b)
    x = torch.randn(2, rows, 12, generator=torch.Generator().manual_seed(1)).to(dtype).requires_grad_(True)
    g = torch.randn(2, rows, 10, generator=torch.Generator().manual_seed(2)).to(dtype)
    spy = _Spy(monkeypatch)
    ours = _grads(model, x, g, model)
    assert spy.calls == 1 and ("layer.adapter.default.lora_B" in ours) is not frozen_b
    exact = copy.deepcopy(model).double()
    ref = _grads(exact, x.double(), g.double(), lambda t: _reference(exact.layer, t, 0.0, True))
    assert ours.keys() == ref.keys()
    for k in ref:
        assert ours[k].dtype == dtype, k
        # Relative to the tensor's largest entry: a sum over 128 rounded rows is off by a few eps of its scale.
        err = (ours[k].double() - ref[k]).abs().max() / ref[k].abs().max()
        assert err < TOL[dtype], (k, float(err))


@pytest.mark.parametrize("why", ["trainable-base", "adapter-in-fp64"])
def test_plain_path_where_the_fused_one_does_not_apply(why, monkeypatch) -> None:
    p = 0.3 if why == "trainable-base" else 0.0  # dropout draws its mask per dtype: fp32 x vs the fp64 reference
    model = _make("linear", 12, 10, p).train()
    if why == "trainable-base":
        model.layer.weight.requires_grad_(True)
    else:
        model.layer.adapter.default.double()
    dt = model.layer.adapter.default.lora_A.dtype
    x = torch.randn(2, 64, 12, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    g = torch.randn(2, 64, 10, generator=torch.Generator().manual_seed(2))
    spy = _Spy(monkeypatch)
    ours = _grads(model, x, g, model)
    assert spy.calls == 0
    ref = _grads(model, x, g, lambda t: _reference(model.layer, t.to(dt), p, True))
    assert ours.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(ours[k].double(), ref[k].double(), rtol=1e-5, atol=1e-5, msg=k)


@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["nodrop", "drop"])
@pytest.mark.parametrize(
    "base_dtype, adapter_dtype", [(torch.bfloat16, None), (torch.float32, "bfloat16")], ids=["bf16-base", "bf16-ad"]
)
def test_plain_path_keeps_no_more_for_backward_than_peft(base_dtype, adapter_dtype, dropout) -> None:
    """Mixed dtypes take the plain form; what its graph keeps for backward is at most what PEFT's DoRA keeps.

    Regression: the plain form cast ``W x`` to the adapters' fp32 before ``(f − 1) ⊙ W x``, so a bf16 base with
    fp32 adapters kept an fp32 (rows, out) copy per layer where PEFT keeps the bf16 one (5% more peak memory than
    PEFT on the bf16 decoder); it now keeps the single sum ``W x + s·B A x`` for ``∂m``.
    """
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = Wrap(nn.Linear(64, 96)).to(base_dtype)
    extra = {} if adapter_dtype is None else {"adapter_dtype": adapter_dtype}
    cfg = la.LoRAConfig(r=8, alpha=16, dropout=dropout, use_dora=True, target_modules=["layer"], **extra)
    ours = la.inject(copy.deepcopy(base), cfg).train()
    peft_cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, use_dora=True, target_modules=["layer"])
    peft = get_peft_model(copy.deepcopy(base), peft_cfg, autocast_adapter_dtype=adapter_dtype is None).train()
    if adapter_dtype is not None:
        for p in peft.parameters():
            if p.requires_grad:
                p.data = p.data.to(torch.bfloat16)
    x = torch.randn(4, 32, 64).to(base_dtype)
    adapter = ours.layer.adapter.default
    assert not dora_kernel.dora_fused_applies(x, ours.layer.weight, adapter.lora_A, adapter.magnitude)
    rows = 4 * 32  # activation-sized: at least one value per input row
    assert autograd_kept_bytes(ours, x, rows) <= autograd_kept_bytes(peft, x, rows)


# --- the eval-mode norm cache -----------------------------------------------------------------------------------


def _norm_calls(monkeypatch, layer) -> list[int]:
    """Counts the weight-norm computations of ``layer``'s DoRA (``_merged_weight_fp`` is what the norm reads)."""
    calls = [0]
    original = type(layer)._merged_weight_fp

    def counted(self, base):
        calls[0] += 1
        return original(self, base)

    monkeypatch.setattr(type(layer), "_merged_weight_fp", counted)
    return calls


def _fresh_eval_output(model: Wrap, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return _reference(model.layer, x, 0.0, False)


@pytest.mark.parametrize("rows", [1, 64], ids=["unfolded", "folded"])
def test_eval_computes_the_norm_once(rows, monkeypatch) -> None:
    model = _make("linear", 12, 10, 0.0).eval()
    calls = _norm_calls(monkeypatch, model.layer.adapter.default)
    x = torch.randn(2, rows, 12)
    with torch.no_grad():
        y1, y2 = model(x), model(x)
    assert calls[0] == 1
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    torch.testing.assert_close(y1, _fresh_eval_output(model, x), rtol=1e-5, atol=1e-5)


def _write(model: Wrap, what: str) -> None:
    a = model.layer.adapter.default
    if what == "magnitude":
        with torch.no_grad():
            a.magnitude.mul_(1.5)
    elif what == "optimizer-step":  # A and B through AdamW (in place, under no_grad)
        opt = torch.optim.AdamW([a.lora_A, a.lora_B], lr=0.1)
        a.lora_A.grad, a.lora_B.grad = torch.ones_like(a.lora_A), torch.ones_like(a.lora_B)
        opt.step()
    elif what == "load_adapter_state_dict":
        state = {k: v * 2 for k, v in la.adapter_state_dict(model).items()}
        la.load_adapter_state_dict(model, state)
    elif what == "base-load_state_dict":
        state = model.state_dict()
        state["layer.weight"] = state["layer.weight"] * 0.5
        model.load_state_dict(state)
    elif what == "merge-unmerge-writes-W":  # unmerge restores W up to rounding; write W itself to see it
        la.merge(model)
        la.unmerge(model)
        with torch.no_grad():
            model.layer.weight.mul_(0.5)
    else:  # "replaced-parameter": a new tensor, same shape, version 0
        a.lora_B = nn.Parameter(a.lora_B.detach() * 3)


WRITES = [
    "magnitude",
    "optimizer-step",
    "load_adapter_state_dict",
    "base-load_state_dict",
    "merge-unmerge-writes-W",
    "replaced-parameter",
]


@pytest.mark.parametrize("what", WRITES)
@pytest.mark.parametrize("rows", [1, 64], ids=["unfolded", "folded"])
def test_eval_after_a_write_uses_the_new_weights(what, rows) -> None:
    """eval → write → eval: the output changes and equals the formula on the new weights (no stale norm)."""
    model = _make("linear", 12, 10, 0.0).eval()
    x = torch.randn(2, rows, 12)
    with torch.no_grad():
        before = model(x)
    _write(model, what)
    with torch.no_grad():
        after = model(x)
    assert not torch.allclose(after, before, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(after, _fresh_eval_output(model, x), rtol=1e-5, atol=1e-5)


def test_train_drops_the_cache(monkeypatch) -> None:
    model = _make("linear", 12, 10, 0.0).eval()
    calls = _norm_calls(monkeypatch, model.layer.adapter.default)
    x = torch.randn(2, 1, 12)
    with torch.no_grad():
        model(x)
    model.train()
    assert model.layer.adapter.default._norm_cache is None
    model.eval()
    with torch.no_grad():
        model(x)
    assert calls[0] == 2


def test_train_step_then_eval_sees_the_step() -> None:
    """eval → a real training step (forward, backward, SGD) → eval: the cached norm of the old weights is gone."""
    model = _make("linear", 12, 10, 0.0).eval()
    x = torch.randn(2, 64, 12)
    with torch.no_grad():
        before = model(x)
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(x).square().sum().backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        after = model(x)
    assert not torch.allclose(after, before, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(after, _fresh_eval_output(model, x), rtol=1e-4, atol=1e-4)


def test_norm_cached_in_inference_mode_is_not_reused_under_autograd() -> None:
    model = _make("linear", 12, 10, 0.0).eval()
    x = torch.randn(2, 1, 12, requires_grad=True)
    with torch.inference_mode():
        model(x.detach())
    model(x).sum().backward()  # would raise "Inference tensors cannot be saved for backward" on a reused norm
    assert model.layer.adapter.default.magnitude.grad is not None


def test_merged_eval_equals_the_unmerged_one() -> None:
    model = _make("linear", 12, 10, 0.0).eval()
    x = torch.randn(2, 64, 12)
    with torch.no_grad():
        unmerged = model(x)
        la.merge(model)
        merged = model(x)
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "conv1d_t"])
@pytest.mark.parametrize("rows", [2, 300], ids=["unfolded", "folded"])
@pytest.mark.parametrize("mode", ["train", "eval", "no-grad"])
def test_fused_dora_is_exactly_the_base_at_init(kind, rows, mode, monkeypatch) -> None:
    """``B = 0`` and ``m = ‖W‖``: ``f = 1`` exactly, and the output is the base module's bit for bit.

    At this size ``x Wᵀ`` followed by ``+ b`` rounds differently from the base's own product with the bias (and a
    Conv1D's ``(in, out)`` weight multiplied in the other layout differs too), so only the base's own product
    passes.
    """
    torch.manual_seed(0)
    if kind == "conv1d_t":
        from transformers.pytorch_utils import Conv1D

        base = Conv1D(320, 96)
        nn.init.normal_(base.bias)
    else:
        base = nn.Linear(96, 320)
    model = Wrap(base).train(mode == "train")
    x = torch.randn(1, rows, 96)
    expected = model(x)
    la.inject(model, la.LoRAConfig(r=4, use_dora=True, target_modules=["layer"]))
    spy = _Spy(monkeypatch)
    with torch.set_grad_enabled(mode != "no-grad"):
        got = model(x)
    assert spy.calls == 1 and torch.equal(got, expected)
