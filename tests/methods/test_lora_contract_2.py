"""LoRA's layer pinned function by function, continued from ``test_lora_contract.py``: ``lora_bias`` through every
path (forward on both kernels, gradients, merge, unmerge, PEFT files), ``additive_delta``, ``set_residual``'s
factor dtypes, ``set_rank``'s refusals, ``_prepare_peft_load``'s layout detection and which kernel a quantized DoRA
layer runs. Truths: closed forms written here, PEFT 0.21's files, round trips.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from transformers.models.bart.modeling_bart import BartScaledWordEmbedding

import lightning_adapters as la
from lightning_adapters.methods import lora as lora_method
from tests.helpers import Wrap
from tests.methods.test_lora_contract import nf4_dora_model

# ------------------------------------------------------------------------------------------------------------
# lora_bias: y = W x + b + s·(B A x + b_B), merged as b += s·b_B


def _lora_bias_model(bias: bool) -> tuple[nn.Module, nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = Wrap(nn.Linear(6, 5, bias=bias))
    base = copy.deepcopy(model.layer)
    la.inject(model, la.LoRAConfig(r=2, alpha=3, lora_bias=True, target_modules=["layer"]))
    layer = model.layer.adapter["default"]
    values = {"A": torch.randn(2, 6), "B": torch.randn(5, 2), "b": torch.randn(5)}
    with torch.no_grad():
        layer.lora_A.copy_(values["A"])
        layer.lora_B.copy_(values["B"])
        layer.lora_B_bias.copy_(values["b"])
    return model, base, values


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("mode", ["train", "eval", "mixed"])
def test_lora_bias_forward_and_gradients_are_the_closed_form(bias, mode):
    """``s = 1.5``. ``mixed``: a float64 input takes the plain (not fused) form; gradients of x, A, B and b_B."""
    model, base, v = _lora_bias_model(bias)
    model.train(mode == "train")
    layer = model.layer.adapter["default"]
    x = torch.randn(4, 6, requires_grad=True)
    if mode == "mixed":
        model.layer.to(torch.float64)
        layer.to(torch.float32)
        x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    y = model(x)
    xd = x.detach().double()
    w = base.weight.detach().double()
    want = xd @ w.t() + 1.5 * (xd @ v["A"].double().t() @ v["B"].double().t() + v["b"].double())
    if bias:
        want = want + base.bias.detach().double()
    assert torch.allclose(y.double(), want, atol=1e-5)
    g = torch.randn(y.shape, dtype=y.dtype)
    gx, ga, gb, gbb = torch.autograd.grad((y * g).sum(), [x, layer.lora_A, layer.lora_B, layer.lora_B_bias])
    g = g.double()
    h = xd @ v["A"].double().t()  # (4, r)
    assert torch.allclose(gbb.double(), 1.5 * g.sum(0), atol=1e-5)
    assert torch.allclose(gb.double(), 1.5 * g.t() @ h, atol=1e-5)
    assert torch.allclose(ga.double(), 1.5 * (g @ v["B"].double()).t() @ xd, atol=1e-5)
    assert torch.allclose(gx.double(), g @ (w + 1.5 * v["B"].double() @ v["A"].double()), atol=1e-5)


def test_lora_bias_merge_adds_s_b_b_and_unmerge_takes_it_back():
    model, base, v = _lora_bias_model(True)
    x = torch.randn(3, 6)
    y = model(x).detach()
    la.merge(model)
    assert torch.allclose(model.layer.bias, base.bias + 1.5 * v["b"], atol=1e-6)
    assert torch.allclose(model.layer.weight, base.weight + 1.5 * v["B"] @ v["A"], atol=1e-6)
    assert torch.allclose(model(x), y, atol=1e-5)
    la.unmerge(model)
    assert torch.allclose(model.layer.bias, base.bias, atol=1e-6)
    assert torch.allclose(model.layer.weight, base.weight, atol=1e-6)
    assert torch.allclose(model(x), y, atol=1e-5)


def test_lora_bias_round_trips_through_a_peft_file(tmp_path):
    """``save_peft`` writes ``lora_B.bias``; ``load_peft`` onto a fresh model puts it back into ``lora_B_bias``."""
    model, base, v = _lora_bias_model(True)
    la.save_peft(model, tmp_path)
    fresh = Wrap(copy.deepcopy(base))
    la.load_peft(fresh, tmp_path)
    layer = fresh.layer.adapter["default"]
    assert torch.equal(layer.lora_B_bias.detach(), v["b"])
    x = torch.randn(3, 6)
    assert torch.allclose(fresh(x), model(x), atol=1e-6)
    other = la.inject(Wrap(nn.Linear(6, 5)), la.LoRAConfig(r=2, lora_bias=True, target_modules=["layer"]))
    state = {k: t.double() for k, t in model.layer.adapter["default"].peft_state().items()}
    other.layer.adapter["default"].load_peft_state(state)  # float64 tensors land in the layer's float32
    got = other.layer.adapter["default"]
    assert got.lora_B_bias.dtype == torch.float32 and torch.equal(got.lora_B_bias.detach(), v["b"])
    assert torch.equal(got.lora_A.detach(), v["A"]) and torch.equal(got.lora_B.detach(), v["B"])


# ------------------------------------------------------------------------------------------------------------
# additive_delta


def test_additive_delta_is_s_b_a_or_a_refusal_naming_the_layer():
    torch.manual_seed(0)
    model = la.inject(Wrap(nn.Linear(6, 5)), la.LoRAConfig(r=2, alpha=3, target_modules=["layer"]))
    layer = model.layer.adapter["default"]
    with torch.no_grad():
        layer.lora_B.normal_()
    want = 1.5 * layer.lora_B.detach() @ layer.lora_A.detach()
    assert torch.allclose(layer.additive_delta(model.layer), want, atol=1e-6)
    dora = la.inject(Wrap(nn.Linear(6, 5)), la.LoRAConfig(r=2, use_dora=True, target_modules=["layer"]))
    with pytest.raises(la.NotMergeableError) as err:
        dora.layer.adapter["default"].additive_delta(dora.layer)
    assert str(err.value) == (
        "LoRA on 'layer' has no additive ΔW: DoRA rescales every output row of W + ΔW by its learned magnitude"
    )
    biased = la.inject(Wrap(nn.Linear(6, 5)), la.LoRAConfig(r=2, lora_bias=True, target_modules=["layer"]))
    with pytest.raises(la.NotMergeableError, match=r"^LoRA on 'layer' has lora_bias=True: its output adds s·b_B"):
        biased.layer.adapter["default"].additive_delta(biased.layer)


# ------------------------------------------------------------------------------------------------------------
# set_residual, set_rank


def test_set_residual_keeps_the_factors_in_the_adapter_dtype():
    """New residual factors given in float64 are held (and given back on eject) in the adapter's float32."""
    torch.manual_seed(0)
    model = Wrap(nn.Linear(6, 5))
    w0 = model.layer.weight.detach().clone()
    la.inject(model, la.LoRAConfig(r=2, alpha=4, init_weights="pissa", target_modules=["layer"]))
    layer = model.layer.adapter["default"]
    a1, b1 = torch.randn(2, 6, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    layer.set_residual(model.layer, a1, b1)
    assert layer.init_A.dtype == layer.init_B.dtype == torch.float32
    assert torch.equal(layer.init_B, b1.float()) and torch.equal(layer.init_A, a1.float())
    assert torch.allclose(model.layer.weight, w0 - 2 * b1.float() @ a1.float(), atol=1e-5)
    la.eject(model)
    assert torch.allclose(model.layer.weight, w0, atol=1e-5)


def test_set_rank_refuses_all_but_a_plain_unmerged_linear():
    def layer_of(base, **kw):
        model = la.inject(Wrap(base), la.LoRAConfig(r=2, target_modules=["layer"], **kw))
        return model, model.layer.adapter["default"]

    msg = r"^lora: the rank of 'layer' cannot change \(not a plain LoRA Linear\)$"
    for base, kw in ((nn.Embedding(6, 4), {}), (nn.Conv1d(4, 4, 1), {}), (nn.Linear(6, 5), {"init_weights": "pissa"})):
        _, layer = layer_of(base, **kw)
        with pytest.raises(la.AdapterStateError, match=msg):
            layer.set_rank(4, 8)
    model, layer = layer_of(nn.Linear(6, 5))
    la.merge(model)
    with pytest.raises(la.AdapterStateError, match=msg):
        layer.set_rank(4, 8)
    la.unmerge(model)
    layer.set_rank(4, 8)
    assert layer.lora_A.shape == (4, 6) and layer.scale == 2.0
    from transformers.pytorch_utils import Conv1D

    _, layer = layer_of(Conv1D(5, 6))
    layer.set_rank(3, 6)
    assert layer.lora_A.shape == (3, 6) and layer.lora_B.shape == (5, 3)


# ------------------------------------------------------------------------------------------------------------
# _prepare_peft_load: PEFT's grouped-conv layout detected from the file's shapes


def test_prepare_peft_load_picks_peft_s_layout_only_for_a_group_mixing_a():
    cfg = la.LoRAConfig(r=4)
    prepare = la.get_method("lora").prepare_peft_load
    dense = lora_method.grouped_to_dense_A(torch.randn(4, 2, 3, 3), 2)  # (4, 4, 3, 3), block-diagonal
    b = torch.randn(6, 2, 1, 1)  # groups = 4 / 2
    mixing = torch.randn(4, 4, 3, 3)

    def layout(tensors):
        got, same = prepare(cfg, {}, tensors)
        assert same is tensors
        return got.grouped_conv_layout

    assert layout({"m.conv.lora_A.weight": dense, "m.conv.lora_B.weight": b}) == "mergeable"
    assert layout({"m.conv.lora_A.weight": mixing, "m.conv.lora_B.weight": b}) == "peft"
    assert layout({"m.lin.lora_A.weight": torch.randn(4, 8), "m.lin.lora_B.weight": torch.randn(6, 4)}) == "mergeable"
    assert layout({"m.conv.lora_A.weight": mixing}) == "mergeable"  # no B
    assert layout({"m.conv.lora_A.weight": mixing, "m.conv.lora_B.weight": torch.randn(6, 2)}) == "mergeable"
    assert layout({"m.conv.lora_A.weight": mixing, "m.conv.lora_B.weight": torch.randn(6, 0, 1, 1)}) == "mergeable"
    assert layout({"m.conv.lora_A.weight": mixing, "m.conv.lora_B.weight": torch.randn(6, 3, 1, 1)}) == "mergeable"
    assert layout({"m.conv.lora_A.weight": mixing, "m.conv.lora_B.weight": torch.randn(6, 4, 1, 1)}) == "mergeable"
    odd = torch.randn(4, 3, 3, 3)  # 3 input channels cannot split into 2 groups
    assert layout({"m.conv.lora_A.weight": odd, "m.conv.lora_B.weight": b}) == "mergeable"
    assert layout({"m.conv.lora_B.weight": b, "m.conv.lora_A.weight": mixing, "x.lora_A.weight": dense}) == "peft"
    # A skipped entry (no B, or a rank the B does not divide) does not end the search.
    assert layout({"a.lora_A.weight": mixing, "m.conv.lora_A.weight": mixing, "m.conv.lora_B.weight": b}) == "peft"
    wide = lora_method.grouped_to_dense_A(torch.randn(4, 4, 3, 3), 2)  # (4, 8, 3, 3): r 4 and 8 input channels
    assert layout({"m.conv.lora_A.weight": wide, "m.conv.lora_B.weight": b}) == "mergeable"  # groups = r / 2
    mixing_1d = torch.randn(4, 4, 3)  # a Conv1d's A (r, in, k)
    assert layout({"m.conv.lora_A.weight": mixing_1d, "m.conv.lora_B.weight": torch.randn(6, 2, 1)}) == "peft"
    five = torch.randn(5, 4, 3, 3)  # 5 ranks: not a multiple of B's 2 columns
    assert layout({"m.conv.lora_A.weight": five, "m.conv.lora_B.weight": b}) == "mergeable"


# ------------------------------------------------------------------------------------------------------------
# Which kernel a DoRA layer on a quantized base runs


@pytest.mark.parametrize("needs_grad", ["x", "lora_A", "lora_B", "magnitude", "bias", "adapter"])
def test_quantized_dora_in_training_takes_the_function_whenever_autograd_records(needs_grad, monkeypatch):
    """Training on an NF4 base, DoRA: the quantized DoRA Function runs whenever autograd records the op, whichever
    one of x, A, B, m or the base bias needs a gradient (``adapter``: the adapter trains and x is frozen, so the
    base term could come from the layer's kernel, but training takes the Function); it computes what the plain form
    computes, output and that gradient."""
    model, layer = nf4_dora_model()
    trains = {"lora_A", "lora_B", "magnitude"} if needs_grad == "adapter" else {needs_grad}
    for name, p in layer.named_parameters():
        p.requires_grad_(name in trains)
    model.layer.bias.requires_grad_(needs_grad == "bias")
    model.train()
    calls = []
    real = lora_method.quantized_dora_linear
    monkeypatch.setattr(lora_method, "quantized_dora_linear", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(3, 128, requires_grad=needs_grad == "x")
    if needs_grad in ("x", "bias"):
        wrt = x if needs_grad == "x" else model.layer.bias
    else:
        wrt = getattr(layer, "lora_A" if needs_grad == "adapter" else needs_grad)
    y = model(x)
    (grad,) = torch.autograd.grad(y.sum(), [wrt])
    assert calls == [1]
    monkeypatch.setattr(lora_method, "quantized_dora_applies", lambda *a: False)
    y2 = model(x)
    (grad2,) = torch.autograd.grad(y2.sum(), [wrt])
    assert calls == [1]
    assert torch.allclose(y, y2, atol=1e-4) and torch.allclose(grad, grad2, atol=1e-4)


# ------------------------------------------------------------------------------------------------------------
# LoRALayer.__init__: rank checks, shapes, dtypes, DoRA's magnitude, the refusals


def test_rank_limit_counts_a_conv_kernel_and_groups_must_divide_r():
    """``check_rank`` sees (in·k, out): Conv2d(2 -> 3, 3×3) takes r up to 16·18 = 288 (not 16·3)."""
    model = la.inject(Wrap(nn.Conv2d(2, 3, 3)), la.LoRAConfig(r=288, target_modules=["layer"]))
    assert model.layer.adapter["default"].lora_A.shape == (288, 2, 3, 3)
    with pytest.raises(la.AdapterConfigError, match=r"r=289 on 'layer' is far above the layer's dimensions \(18, 3\)"):
        la.inject(Wrap(nn.Conv2d(2, 3, 3)), la.LoRAConfig(r=289, target_modules=["layer"]))
    with pytest.raises(la.AdapterConfigError, match=r"r=113 on 'layer' is far above the layer's dimensions \(5, 7\)"):
        la.inject(Wrap(nn.Linear(5, 7)), la.LoRAConfig(r=113, target_modules=["layer"]))
    with pytest.raises(la.AdapterConfigError, match=r"groups=2; use r in \[2, 4, 6, 8\]$"):
        la.inject(Wrap(nn.Conv2d(4, 6, 3, groups=2)), la.LoRAConfig(r=3, target_modules=["layer"]))


@pytest.mark.parametrize("dtype, want", [(torch.bfloat16, torch.float32), (torch.float64, torch.float64)])
def test_factor_shapes_and_dtypes(dtype, want):
    from transformers.pytorch_utils import Conv1D

    cases = {
        "linear": (nn.Linear(6, 5), (3, 6), (5, 3)),
        "conv1d_t": (Conv1D(5, 6), (3, 6), (5, 3)),
        "embedding": (nn.Embedding(6, 5), (3, 6), (5, 3)),
        "conv": (nn.Conv2d(6, 9, (3, 2), groups=3), (3, 2, 3, 2), (9, 1, 1, 1)),
        "conv_peft": (nn.Conv2d(6, 9, (3, 2), groups=3), (3, 6, 3, 2), (9, 1, 1, 1)),
    }
    for kind, (base, a_shape, b_shape) in cases.items():
        layout = "peft" if kind == "conv_peft" else "mergeable"
        cfg = la.LoRAConfig(r=3, grouped_conv_layout=layout, target_modules=["layer"])
        layer = la.inject(Wrap(base.to(dtype)), cfg).layer.adapter["default"]
        assert layer.lora_A.shape == a_shape and layer.lora_B.shape == b_shape, kind
        assert layer.lora_A.dtype == layer.lora_B.dtype == want, kind
        assert layer.mergeable is (kind != "conv_peft"), kind


def _weight_out_in(base):
    from transformers.pytorch_utils import Conv1D

    w = base.weight.detach().double()
    return w.t() if isinstance(base, (Conv1D, nn.Embedding)) else w.reshape(w.shape[0], -1)


@pytest.mark.parametrize("kind", ["linear", "conv1d_t", "embedding", "conv"])
def test_dora_magnitude_starts_as_the_row_norm_of_the_adapted_weight(kind):
    """``m = ||W + s·B·A||`` per output at init (``init_weights=False`` makes ΔW non-zero), shaped (out,) or
    (1, out, 1, 1) for a conv; PiSSA's residual init starts from ``||W||`` of the original weight."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    base = {
        "linear": lambda: nn.Linear(6, 5),
        "conv1d_t": lambda: Conv1D(5, 6),
        "embedding": lambda: nn.Embedding(6, 5),
        "conv": lambda: nn.Conv2d(4, 5, 3),
    }[kind]()
    w = _weight_out_in(base)
    model = la.inject(
        Wrap(base), la.LoRAConfig(r=2, alpha=3, use_dora=True, init_weights=False, target_modules=["layer"])
    )
    layer = model.layer.adapter["default"]
    a, b = layer.lora_A.detach().double(), layer.lora_B.detach().double()
    delta = 1.5 * b.reshape(5, 2) @ a.reshape(2, -1)
    if kind == "embedding":
        delta = 1.5 * b @ a  # (d, V): rows are the d outputs
    want = (w + delta).norm(dim=1)
    assert layer.magnitude.shape == ((1, 5, 1, 1) if kind == "conv" else (5,))
    assert torch.allclose(layer.magnitude.detach().double().reshape(-1), want, atol=1e-5)
    if kind in ("linear", "conv1d_t"):
        torch.manual_seed(0)
        fresh = {"linear": lambda: nn.Linear(6, 5), "conv1d_t": lambda: Conv1D(5, 6)}[kind]()
        w0 = _weight_out_in(fresh)
        cfg = la.LoRAConfig(r=2, use_dora=True, init_weights="pissa", target_modules=["layer"])
        layer = la.inject(Wrap(fresh), cfg).layer.adapter["default"]
        assert torch.allclose(layer.magnitude.detach().double(), w0.norm(dim=1), atol=1e-5)


def test_peft_layout_conv_refuses_to_merge_saying_why():
    cfg = la.LoRAConfig(r=4, grouped_conv_layout="peft", target_modules=["layer"])
    model = la.inject(Wrap(nn.Conv2d(4, 6, 3, groups=2)), cfg)
    layer = model.layer.adapter["default"]
    reason = (
        "its LoRA uses PEFT's grouped-conv layout (grouped_conv_layout='peft': lora_A reads all 4 input channels, "
        "the base conv has groups=2), so ΔW is not a kernel of the grouped base conv; PEFT cannot merge it either"
    )
    assert layer.not_mergeable_reason == reason
    with pytest.raises(la.NotMergeableError) as err:
        la.merge(model)
    assert reason in str(err.value)
    with pytest.raises(la.NotMergeableError, match=r"^LoRA on 'layer' cannot be merged: its LoRA uses PEFT's"):
        layer.delta_weight()
    plain = la.inject(Wrap(nn.Conv2d(4, 6, 3, groups=1)), cfg).layer.adapter["default"]
    assert plain.mergeable and not plain.peft_layout  # one group: nothing to choose


def _conv1d_t(nf: int, nx: int) -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    return Conv1D(nf, nx)


@pytest.mark.parametrize(
    "base, kw, message",
    [
        (nn.Embedding(6, 4), {"lora_bias": True}, "lora_bias=True is not supported on the Embedding 'layer'"),
        (nn.MultiheadAttention(4, 2), {"lora_bias": True}, "lora_bias=True is not supported on the nn.Multihead"),
        (nn.Conv2d(4, 6, 3, groups=2), {"use_dora": True, "grouped_conv_layout": "peft"}, "use_dora=True with grou"),
        (nn.Conv2d(4, 6, 3), {"init_weights": "pissa"}, "init_weights='pissa' works on Linear and Conv1D layers"),
        (nn.Embedding(6, 4), {"init_weights": "loftq"}, "init_weights='loftq' works on nn.Linear layers, not on"),
        (_conv1d_t(5, 6), {"init_weights": "olora"}, "init_weights='olora' on the transformers Conv1D 'layer' is"),
    ],
)
def test_layer_refusals(base, kw, message):
    with pytest.raises(la.AdapterConfigError, match=r"^lora: " + message):
        la.inject(Wrap(base), la.LoRAConfig(r=2, target_modules=["layer"], **kw))


@pytest.mark.parametrize(
    "bias, dropout, mode", [(True, 0.0, "train"), (False, 0.0, "train"), (True, 0.5, "train"), (False, 0.5, "eval")]
)
def test_lora_bias_on_a_quantized_base_folds_s_b_b_into_the_function_s_bias(bias, dropout, mode, monkeypatch):
    """NF4 base, under autograd: the quantized low-rank Function gets ``b + s·b_B`` (``s·b_B`` without a base bias)
    and the dropped input (the same seeded mask; none in eval mode), and computes what the plain form computes,
    outputs and the gradients of x, A, B and b_B."""
    pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    model = la.quantize(Wrap(nn.Linear(128, 128, bias=bias)), "nf4", skip=[])
    cfg = la.LoRAConfig(r=4, alpha=6, dropout=dropout, lora_bias=True, init_weights=False, target_modules=["layer"])
    la.inject(model, cfg)
    layer = model.layer.adapter["default"]
    model.train(mode == "train")
    x = torch.randn(3, 128, requires_grad=True)
    params = [x, layer.lora_A, layer.lora_B, layer.lora_B_bias]
    calls = []
    real = lora_method.quantized_lowrank_linear
    monkeypatch.setattr(lora_method, "quantized_lowrank_linear", lambda *a: calls.append(1) or real(*a))
    g = torch.randn(3, 128)
    torch.manual_seed(5)
    y = model(x)
    grads = torch.autograd.grad((y * g).sum(), params)
    assert calls == [1]
    monkeypatch.setattr(lora_method, "quantized_lowrank_applies", lambda *a: False)
    torch.manual_seed(5)
    y2 = model(x)
    grads2 = torch.autograd.grad((y2 * g).sum(), params)
    assert calls == [1]
    assert torch.allclose(y, y2, atol=1e-4)
    for u, v in zip(grads, grads2):
        assert torch.allclose(u, v, atol=1e-4)
    assert torch.allclose(grads[3], 1.5 * g.sum(0), atol=1e-5)


# ------------------------------------------------------------------------------------------------------------
# The forward paths with dropout: y = W x + b + s·B A x_d, DoRA y = W x + b + (f − 1)·W x_d + f·s·B A x_d


def _linear_op(base, x, w):
    """``x`` through the base's operator with weight ``w`` in (out, in, ...) layout, no bias, float64."""
    if isinstance(base, nn.Conv2d):
        return torch.nn.functional.conv2d(x, w, None, base.stride, base.padding, base.dilation, base.groups)
    return x @ w.t()


@pytest.mark.parametrize("kind", ["linear", "conv1d_t", "conv"])
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("path", ["fused", "plain"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_dropout_forward_is_the_closed_form_on_every_path(kind, dora, path, mode):
    """The dropout mask is the first random draw of the forward (``F.dropout`` of the input, as PEFT), so a seeded
    ``F.dropout(x)`` reproduces ``x_d``; in eval mode ``x_d = x``. ``plain``: a float64 adapter on the float32 base
    (no fused Function). s = 6 / 4 = 1.5, factors and magnitude far from their init, gradients of x as well."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    base = {"linear": lambda: nn.Linear(8, 6), "conv1d_t": lambda: Conv1D(6, 8), "conv": lambda: nn.Conv2d(4, 6, 3)}
    model = Wrap(base[kind]())
    cfg = la.LoRAConfig(r=4, alpha=6, dropout=0.5, use_dora=dora, target_modules=["layer"])
    la.inject(model, cfg)
    layer = model.layer.adapter["default"]
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.5)
        model.layer.bias.normal_()  # Conv1D starts with a zero bias: W·x_d must not take it
        if dora:
            layer.magnitude.mul_(1 + 0.3 * torch.randn(layer.magnitude.shape))
    if path == "plain":
        layer.to(torch.float64)
    model.train(mode == "train")
    x = torch.randn(3, 8) if kind != "conv" else torch.randn(2, 4, 5, 5)
    x.requires_grad_(True)
    torch.manual_seed(7)
    y = model(x)
    torch.manual_seed(7)
    xd = torch.nn.functional.dropout(x.detach(), 0.5, True) if mode == "train" else x.detach()
    xd, x64 = xd.double(), x.detach().double()
    w = model.layer.weight.detach().double()
    w = w.t() if kind == "conv1d_t" else w  # (out, in, ...)
    a, b = layer.lora_A.detach().double(), layer.lora_B.detach().double()
    dw = lora_method.conv_delta_weight(a, b, 1, 1.5) if kind == "conv" else 1.5 * b @ a
    shape = (1, -1, 1, 1) if kind == "conv" else (-1,)
    bias = model.layer.bias.detach().double().reshape(shape)
    want = _linear_op(model.layer, x64, w) + bias
    if dora:
        f = layer.magnitude.detach().double().reshape(-1) / (w + dw).flatten(1).norm(dim=1)
        f = f.reshape(shape)
        want = want + (f - 1) * _linear_op(model.layer, xd, w) + f * _linear_op(model.layer, xd, dw)
    else:
        want = want + _linear_op(model.layer, xd, dw)
    assert y.dtype == torch.float32
    assert torch.allclose(y.double(), want, atol=1e-5)
    g = torch.randn(y.shape)
    (gx,) = torch.autograd.grad((y * g).sum(), [x])
    # d/dx of the closed form, with x_d = mask ⊙ x (the mask read off x_d / x, 0 or 2).
    xr = x.detach().double().requires_grad_(True)
    mask = xd / x64 if mode == "train" else torch.ones_like(x64)
    xdr = xr * mask
    ref = _linear_op(model.layer, xr, w)
    if dora:
        ref = ref + (f - 1) * _linear_op(model.layer, xdr, w) + f * _linear_op(model.layer, xdr, dw)
    else:
        ref = ref + _linear_op(model.layer, xdr, dw)
    (gref,) = torch.autograd.grad((ref * g.double()).sum(), [xr])
    assert torch.allclose(gx.double(), gref, atol=1e-5)


# ------------------------------------------------------------------------------------------------------------
# load_peft_state: every PEFT key, the grouped conv's dense A


def test_load_peft_state_reads_every_peft_key_into_its_tensor():
    def layer_of(base, **kw):
        return la.inject(Wrap(base), la.LoRAConfig(r=2, target_modules=["layer"], **kw)).layer.adapter["default"]

    emb = layer_of(nn.Embedding(6, 4), use_dora=True)
    state = {"lora_embedding_A": torch.randn(2, 6), "lora_embedding_B": torch.randn(4, 2)}
    state["lora_magnitude_vector"] = torch.rand(4).double()
    emb.load_peft_state(state)
    assert torch.equal(emb.lora_A.detach(), state["lora_embedding_A"])
    assert torch.equal(emb.lora_B.detach(), state["lora_embedding_B"])
    assert emb.magnitude.dtype == torch.float32
    assert torch.equal(emb.magnitude.detach(), state["lora_magnitude_vector"].float())
    assert emb.peft_state().keys() == state.keys()
    conv = layer_of(nn.Conv2d(4, 6, 3, groups=2))
    grouped = torch.randn(2, 2, 3, 3)
    b = torch.randn(6, 1, 1, 1)
    conv.load_peft_state({"lora_A.weight": lora_method.grouped_to_dense_A(grouped, 2), "lora_B.weight": b})
    assert torch.equal(conv.lora_A.detach(), grouped) and torch.equal(conv.lora_B.detach(), b)
    with pytest.raises(la.AdapterStateError, match=r"^lora_A.weight mixes input channels across the conv's 2 groups"):
        conv.load_peft_state({"lora_A.weight": torch.ones(2, 4, 3, 3)})
    assert torch.equal(conv.lora_A.detach(), grouped)  # refused before anything was written
    conv.load_peft_state({"lora_B.weight": 2 * b})  # B alone: no A to regroup
    assert torch.equal(conv.lora_B.detach(), 2 * b)
    peft = layer_of(nn.Conv2d(4, 6, 3, groups=2), grouped_conv_layout="peft")
    dense = torch.randn(2, 4, 3, 3)
    peft.load_peft_state({"lora_A.weight": dense})
    assert torch.equal(peft.lora_A.detach(), dense)


# ------------------------------------------------------------------------------------------------------------
# DoRA merge / unmerge: W' = f ⊙ (W + ΔW) row-wise, a zero row kept aside


@pytest.mark.parametrize("kind", ["linear", "conv1d_t", "embedding", "conv"])
def test_dora_merge_scales_each_output_row_and_unmerge_restores_w(kind):
    """Merged weight (in the base layout) ``f_o · (W + ΔW)_o`` for every output o with ``f = m / ||W + ΔW||``; a row
    where ``W + ΔW`` is exactly 0 (f = 0) merges to 0 and unmerge gives the original row back; the merged layer's
    output is the adapted one."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    base = {
        "linear": lambda: nn.Linear(6, 5),
        "conv1d_t": lambda: Conv1D(5, 6),
        "embedding": lambda: nn.Embedding(6, 5),
        "conv": lambda: nn.Conv2d(3, 5, 2),
    }[kind]()
    model = la.inject(Wrap(base), la.LoRAConfig(r=2, alpha=3, use_dora=True, target_modules=["layer"]))
    layer = model.layer.adapter["default"]
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.5)
        layer.magnitude.mul_(1 + 0.3 * torch.randn(layer.magnitude.shape))
        # Output 1: W + ΔW = 0 there (its base row and its row of B zeroed).
        (layer.lora_B[:, 1] if kind == "embedding" else layer.lora_B[1]).zero_()
        if kind in ("conv1d_t", "embedding"):
            model.layer.weight[:, 1] = 0
        else:
            model.layer.weight[1] = 0
    w0 = model.layer.weight.detach().clone()
    wo = _weight_out_in(model.layer)  # (out, in·k)
    a, b = layer.lora_A.detach().double(), layer.lora_B.detach().double()
    delta = 1.5 * b @ a if kind == "embedding" else 1.5 * b.reshape(5, 2) @ a.reshape(2, -1)
    norm = (wo + delta).norm(dim=1)
    f = torch.where(norm == 0, torch.zeros_like(norm), layer.magnitude.detach().double().reshape(-1) / norm)
    merged_out_in = f[:, None] * (wo + delta)
    x = torch.randint(0, 6, (2, 3)) if kind == "embedding" else torch.randn(2, 3, 4, 4) if kind == "conv" else None
    x = torch.randn(2, 6) if x is None else x
    y = model(x).detach()
    la.merge(model)
    got = _weight_out_in(model.layer)
    assert torch.allclose(got, merged_out_in, atol=1e-5)
    assert not got[1].any()
    assert torch.allclose(model(x), y, atol=1e-5)
    la.unmerge(model)
    assert torch.allclose(model.layer.weight, w0, atol=1e-5)
    assert torch.equal(_weight_out_in(model.layer)[1], wo[1])
    assert torch.allclose(model(x), y, atol=1e-5)


# ------------------------------------------------------------------------------------------------------------
# delta_output (the term a scaled or stacked adapter adds): s·B A x_d (+ s·b_B) on every layer kind


@pytest.mark.parametrize("kind", ["linear_bias", "conv1d_t", "conv", "conv_peft", "embedding", "embedding_scaled"])
def test_scaled_adapter_adds_the_closed_form_term(kind):
    """``set_scale(c)`` runs ``base(x) + c·delta_output(x)``; by hand, with dropout 0.5 in training (the seeded mask;
    none on an Embedding, as PEFT), c = 0.5 and s = 1.5, ``lora_bias`` on the Linear and the mergeable conv, the
    gradients of A and B too."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    base = {
        "linear_bias": lambda: nn.Linear(8, 6),
        "conv1d_t": lambda: Conv1D(6, 8),
        "conv": lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2),
        "conv_peft": lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2, padding_mode="reflect"),
        "embedding": lambda: nn.Embedding(8, 6, padding_idx=0, scale_grad_by_freq=True),
        "embedding_scaled": lambda: BartScaledWordEmbedding(8, 6, padding_idx=0, embed_scale=2.5),
    }[kind]()
    model = Wrap(base)
    cfg = la.LoRAConfig(
        r=4,
        alpha=6,
        dropout=0.5,
        lora_bias=kind in ("linear_bias", "conv"),
        grouped_conv_layout="peft" if kind == "conv_peft" else "mergeable",
        target_modules=["layer"],
    )
    la.inject(model, cfg)
    layer = model.layer.adapter["default"]
    with torch.no_grad():
        for p in (layer.lora_A, layer.lora_B) + ((layer.lora_B_bias,) if layer.lora_B_bias is not None else ()):
            p.normal_(0, 0.5)
    la.set_scale(model, "default", 0.5)
    model.train()
    x = {"conv": (2, 4, 5, 5), "conv_peft": (2, 4, 5, 5), "embedding": None, "embedding_scaled": None}.get(kind, (3, 8))
    x = torch.tensor([[0, 3, 3, 7]]) if x is None else torch.randn(*x)
    with la.disabled(model):
        y0 = model(x).detach()
    torch.manual_seed(3)
    y = model(x)
    torch.manual_seed(3)
    xd = x if kind.startswith("embedding") else torch.nn.functional.dropout(x, 0.5, True)
    a = layer.lora_A.detach().clone().requires_grad_(True)
    b = layer.lora_B.detach().clone().requires_grad_(True)
    if kind == "embedding":
        term = torch.nn.functional.embedding(xd, a.t(), 0, None, 2.0, True) @ b.t()
    elif kind == "embedding_scaled":  # the lookup's factor 2.5 scales the term too
        term = 2.5 * torch.nn.functional.embedding(xd, a.t(), 0) @ b.t()
    elif kind == "conv":
        term = torch.nn.functional.conv2d(torch.nn.functional.conv2d(xd, a, None, 1, 1, 1, 2), b, None, groups=2)
    elif kind == "conv_peft":
        h = torch.nn.functional.conv2d(torch.nn.functional.pad(xd, (1, 1, 1, 1), mode="reflect"), a)
        term = torch.nn.functional.conv2d(h, b, None, groups=2)
    else:
        term = xd @ a.t() @ b.t()
    if layer.lora_B_bias is not None:  # s·b_B per output channel
        term = term + layer.lora_B_bias.detach().reshape((-1,) + (1,) * (term.dim() - 2))
    want = y0 + 0.5 * 1.5 * term
    assert torch.allclose(y, want, atol=1e-5)
    g = torch.randn(y.shape)
    got = torch.autograd.grad((y * g).sum(), [layer.lora_A, layer.lora_B])
    truth = torch.autograd.grad((want * g).sum(), [a, b])
    for u, v in zip(got, truth):
        assert torch.allclose(u, v, atol=1e-5)


# ------------------------------------------------------------------------------------------------------------
# DoRA's eval-mode norm cache: never stale


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_dora_eval_norm_follows_every_write_to_w_a_and_b(kind):
    """In eval mode the norm ``||W + s·B·A||`` is cached; after an in-place write to B, A or W, a cast to float64
    or a train/eval round trip the output is again the closed form with the current tensors."""
    torch.manual_seed(0)
    base = nn.Linear(8, 6) if kind == "linear" else nn.Conv2d(4, 6, 3)
    model = la.inject(Wrap(base), la.LoRAConfig(r=2, alpha=3, use_dora=True, target_modules=["layer"])).eval()
    layer = model.layer.adapter["default"]
    x = torch.randn(3, 8) if kind == "linear" else torch.randn(2, 4, 5, 5)

    def closed_form():
        return _dora_closed_form(model.layer, layer, x)

    with torch.no_grad():
        layer.lora_B.normal_(0, 0.5)
    assert torch.allclose(model(x).double(), closed_form(), atol=1e-5)
    for write in (
        lambda: layer.lora_B.mul_(2.0),
        lambda: layer.lora_A.add_(0.3),
        lambda: model.layer.weight.mul_(0.5),
    ):
        with torch.no_grad():
            write()
        assert torch.allclose(model(x).double(), closed_form(), atol=1e-5)
    model.double()
    x = x.double()
    assert torch.allclose(model(x), closed_form(), atol=1e-10)
    model.train()
    with torch.no_grad():
        layer.lora_B.data.mul_(3.0)  # invisible to the version counter, but training drops the cache
    model.eval()
    assert torch.allclose(model(x), closed_form(), atol=1e-10)


def _dora_closed_form(base, layer, x):
    w = base.weight.detach().double()
    a, b = layer.lora_A.detach().double(), layer.lora_B.detach().double()
    if isinstance(base, nn.Conv2d):
        dw = lora_method.conv_delta_weight(a, b, 1, layer.scale)
    else:
        dw = layer.scale * b @ a
    f = layer.magnitude.detach().double().reshape(-1) / (w + dw).flatten(1).norm(dim=1)
    if isinstance(base, nn.Conv2d):
        y = torch.nn.functional.conv2d(x.double(), (w + dw) * f.reshape(-1, 1, 1, 1))
        return y + base.bias.detach().double().reshape(1, -1, 1, 1)
    return x.double() @ ((w + dw) * f[:, None]).t() + base.bias.detach().double()


def test_orthogonal_init_makes_b_a_zero_on_linear_and_is_the_default_on_an_embedding():
    """``"orthogonal"``: A and B take alternate rows of one orthogonal matrix, so ``B·A = 0`` with neither zero;
    an Embedding (no such form, as in PEFT) gets the default A = 0, B ~ N(0, 1)."""
    torch.manual_seed(0)
    cfg = la.LoRAConfig(r=4, init_weights="orthogonal", target_modules=["layer"])
    lin = la.inject(Wrap(nn.Linear(16, 12)), cfg).layer.adapter["default"]
    a, b = lin.lora_A.detach().double(), lin.lora_B.detach().double()
    assert a.abs().sum() > 0 and b.abs().sum() > 0
    assert torch.allclose(b @ a, torch.zeros(12, 16, dtype=torch.float64), atol=1e-6)
    emb = la.inject(Wrap(nn.Embedding(64, 32)), cfg).layer.adapter["default"]
    assert not emb.lora_A.any() and abs(emb.lora_B.std().item() - 1) < 0.3


@pytest.mark.parametrize("kind", ["linear", "conv1d_t", "conv", "embedding"])
@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_lora_on_a_bf16_base_answers_in_bf16_with_the_closed_form(kind, dropout):
    """fp32 adapters on a bf16 base: the output stays bf16 in training and eval, and in eval is ``(W + s·B·A) x + b``
    up to bf16 rounding (s = 1.5)."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    base = {
        "linear": lambda: nn.Linear(16, 12),
        "conv1d_t": lambda: Conv1D(12, 16),
        "conv": lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2),
        "embedding": lambda: nn.Embedding(16, 12),
    }[kind]()
    model = Wrap(base.to(torch.bfloat16))
    la.inject(model, la.LoRAConfig(r=4, alpha=6, dropout=dropout, target_modules=["layer"]))
    layer = model.layer.adapter["default"]
    with torch.no_grad():
        layer.lora_A.normal_(0, 0.3)
        layer.lora_B.normal_(0, 0.3)
    x = {"conv": torch.randn(2, 4, 5, 5), "embedding": torch.randint(0, 16, (2, 5))}.get(kind, torch.randn(3, 16))
    x = x if kind == "embedding" else x.bfloat16()
    model.train()
    assert model(x).dtype == torch.bfloat16
    model.eval()
    y = model(x)
    assert y.dtype == torch.bfloat16
    w = model.layer.weight.detach().double()
    a, b = layer.lora_A.detach().double(), layer.lora_B.detach().double()
    if kind == "conv":
        merged = w + lora_method.conv_delta_weight(a, b, 2, 1.5)
        want = torch.nn.functional.conv2d(x.double(), merged, model.layer.bias.detach().double(), padding=1, groups=2)
    elif kind == "embedding":
        want = (w + 1.5 * (b @ a).t())[x]
    else:
        merged = (w.t() if kind == "conv1d_t" else w) + 1.5 * b @ a
        want = x.double() @ merged.t() + model.layer.bias.detach().double()
    err = (y.double() - want).abs().max().item()
    assert err <= 1e-2 * want.abs().max().item(), err


# ------------------------------------------------------------------------------------------------------------
# Residual inits: what the base holds after attach, eject and eject with merge


def test_residual_init_base_on_attach_eject_and_merged_eject():
    """PiSSA: attached, the base is ``W − s·B0·A0``; ejected it is W again; ejected with merge it keeps the trained
    adapter, ``W − s·B0·A0 + s·B·A``. Only inits that write the base say so (``rewrites_base``)."""
    torch.manual_seed(0)
    base = nn.Linear(8, 6)
    w = base.weight.detach().clone()
    cfg = la.LoRAConfig(r=2, alpha=3, init_weights="pissa", target_modules=["layer"])
    for merge in (False, True):
        model = la.inject(Wrap(copy.deepcopy(base)), cfg)
        layer = model.layer.adapter["default"]
        assert layer.rewrites_base and layer.residual_applied and not layer.changes_base_on_attach
        a0, b0 = layer.init_A.clone(), layer.init_B.clone()
        assert torch.allclose(model.layer.weight, w - 1.5 * b0 @ a0, atol=1e-5)
        with torch.no_grad():
            layer.lora_B.add_(0.1)
        a, b = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
        la.eject(model, merge=merge)
        want = w - 1.5 * b0 @ a0 + 1.5 * b @ a if merge else w
        assert torch.allclose(model.layer.weight, want, atol=1e-5)
    plain = la.inject(Wrap(nn.Linear(8, 6)), la.LoRAConfig(r=2, target_modules=["layer"])).layer.adapter["default"]
    assert not plain.rewrites_base and not plain.changes_base_on_attach
    for init, rewrites in (("corda", True), ("eva", False)):
        pending = la.inject(Wrap(nn.Linear(8, 6)), la.LoRAConfig(r=2, init_weights=init, target_modules=["layer"]))
        assert pending.layer.adapter["default"].rewrites_base is rewrites, init


def test_orthogonal_factors_are_rounded_to_a_half_base_dtype_as_peft_stores_them():
    """On a bf16 base the orthogonal factors are kept in fp32 but hold bf16 values (PEFT builds them in the base
    dtype), so ``B·A`` is still 0 up to bf16 rounding."""
    torch.manual_seed(0)
    cfg = la.LoRAConfig(r=4, init_weights="orthogonal", target_modules=["layer"])
    layer = la.inject(Wrap(nn.Linear(16, 12).to(torch.bfloat16)), cfg).layer.adapter["default"]
    for p in (layer.lora_A, layer.lora_B):
        assert p.dtype == torch.float32 and p.abs().sum() > 0
        assert torch.equal(p.detach(), p.detach().bfloat16().float())
    assert (layer.lora_B @ layer.lora_A).abs().max() < 1e-2


def test_extra_repr_names_kind_rank_scale_dora_layout_and_merge_state():
    def layer_of(base, **kw):
        return la.inject(Wrap(base), la.LoRAConfig(r=2, alpha=3, target_modules=["layer"], **kw))

    model = layer_of(nn.Linear(6, 5))
    assert model.layer.adapter["default"].extra_repr() == "linear, r=2, scale=1.5, merged=False"
    la.merge(model)
    assert model.layer.adapter["default"].extra_repr() == "linear, r=2, scale=1.5, merged=True"
    dora = layer_of(nn.Linear(6, 5), use_dora=True).layer.adapter["default"]
    assert dora.extra_repr() == "linear, r=2, scale=1.5, dora, merged=False"
    peft = layer_of(nn.Conv2d(4, 6, 3, groups=2), grouped_conv_layout="peft").layer.adapter["default"]
    assert peft.extra_repr() == "conv2d, r=2, scale=1.5, peft grouped-conv layout, merged=False"


def test_residual_factors_follow_a_float64_base_and_eject_clears_the_residual():
    """PiSSA on a float64 base keeps A0 and B0 in float64 like the factors; ejecting without merge gives the residual
    back and leaves the layer with none applied."""
    torch.manual_seed(0)
    model = Wrap(nn.Linear(8, 6).double())
    la.inject(model, la.LoRAConfig(r=2, init_weights="pissa", target_modules=["layer"]))
    layer = model.layer.adapter["default"]
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float64
    assert layer.init_A.dtype == layer.init_B.dtype == torch.float64
    assert layer.residual_applied
    la.eject(model)
    assert not layer.residual_applied and layer.changes_base_on_attach  # attached again, it would apply it again


def test_a_float64_adapter_on_a_float32_base_merges_in_float32():
    """``adapter_dtype="float64"`` on a float32 Linear with ``lora_bias``: merge rounds ΔW and ``s·b_B`` to float32
    and adds them in float32 (exactly the float32 sums computed here); unmerge subtracts the same terms."""
    torch.manual_seed(0)
    model = Wrap(nn.Linear(64, 48))
    cfg = la.LoRAConfig(
        r=4, alpha=6, lora_bias=True, init_weights=False, adapter_dtype="float64", target_modules=["layer"]
    )
    la.inject(model, cfg)
    layer = model.layer.adapter["default"]
    assert layer.lora_A.dtype == torch.float64
    w, b = model.layer.weight.detach().clone(), model.layer.bias.detach().clone()
    dw = (layer.lora_B.detach() @ layer.lora_A.detach() * 1.5).float()
    db = 1.5 * layer.lora_B_bias.detach().float()
    la.merge(model)
    assert model.layer.weight.dtype == torch.float32
    assert torch.equal(model.layer.weight.detach(), w + dw)
    assert torch.equal(model.layer.bias.detach(), b + db)
    la.unmerge(model)
    assert torch.equal(model.layer.weight.detach(), (w + dw) - dw)
    assert torch.equal(model.layer.bias.detach(), (b + db) - db)


@pytest.mark.parametrize("init", ["eva", "corda"])
def test_data_driven_init_is_pending_on_a_transformers_conv1d_too(init):
    """CorDA and EVA read the inputs of Linear and transformers Conv1D layers: both wait for their data."""
    model = la.inject(Wrap(_conv1d_t(6, 8)), la.LoRAConfig(r=2, init_weights=init, target_modules=["layer"]))
    assert model.layer.adapter["default"].needs_data
    with pytest.raises(la.AdapterStateError, match=r"has not been initialised from data"):
        model(torch.randn(2, 8))


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_a_float64_base_gets_its_residual_back_in_float64(init):
    """Ejecting a residual init restores a float64 weight to float64 precision (it went through float32)."""
    torch.manual_seed(0)
    model = Wrap(nn.Linear(16, 12).double())
    before = model.layer.weight.detach().clone()
    la.inject(model, la.LoRAConfig(r=2, alpha=4, target_modules=["layer"], init_weights=init))
    assert (model.layer.weight - before).abs().max() > 1e-3  # the base holds W - s·B0·A0 meanwhile
    la.eject(model)
    torch.testing.assert_close(model.layer.weight, before, rtol=0, atol=1e-12)


@pytest.mark.parametrize("conv", [nn.Conv1d, nn.Conv2d])
def test_gaussian_init_on_a_convolution_draws_a_with_std_one_over_r(conv):
    """``init_weights="gaussian"`` is accepted on convolutions (as PEFT): A ~ N(0, 1/r) drawn first, B = 0."""
    model = Wrap(conv(3, 5, 3))
    torch.manual_seed(7)
    la.inject(model, la.LoRAConfig(r=4, target_modules=["layer"], init_weights="gaussian"))
    A = next(p for n, p in model.named_parameters() if "lora_A" in n)
    B = next(p for n, p in model.named_parameters() if "lora_B" in n)
    torch.manual_seed(7)
    expected = torch.empty_like(A).normal_(0.0, 1.0 / 4)
    torch.testing.assert_close(A.detach(), expected, rtol=0, atol=0)
    assert B.shape[0] == 5 and not B.detach().any()


# ------------------------------------------------------------------------------------------------------------
# on_attach / on_eject: what the layer says about the base once its init was applied, and once it is ejected


def test_loftq_base_on_attach_eject_and_what_the_layer_says_it_rewrites():
    """LoftQ: attached, the base holds Q (its init is applied, so attaching no longer changes the base, but the layer
    still rewrites it); ejected it is W again and the layer rewrites nothing: both properties are plain ``False``."""
    from lightning_adapters.methods import lora_init

    torch.manual_seed(0)
    base = nn.Linear(16, 8)
    w = base.weight.detach().clone()
    q, _, _ = lora_init.loftq_factors(w, 2, 4, 1)
    model = la.inject(Wrap(base), la.LoRAConfig(r=2, init_weights="loftq", target_modules=["layer"]))
    layer = model.layer.adapter["default"]
    assert torch.equal(model.layer.weight.detach(), q)
    assert layer.changes_base_on_attach is False and layer.rewrites_base is True
    la.eject(model)
    assert torch.equal(model.layer.weight.detach(), w)
    assert layer.changes_base_on_attach is False and layer.rewrites_base is False


def test_a_residual_init_ejected_rewrites_nothing_until_attached_again():
    """PiSSA ejected without merge: ``residual_applied`` and ``rewrites_base`` are plain ``False``; only
    ``changes_base_on_attach`` says that attaching it again would write the residual again."""
    torch.manual_seed(0)
    model = la.inject(Wrap(nn.Linear(8, 6)), la.LoRAConfig(r=2, init_weights="pissa", target_modules=["layer"]))
    layer = model.layer.adapter["default"]
    la.eject(model)
    assert layer.residual_applied is False and layer.changes_base_on_attach is True
    assert layer.rewrites_base is True  # it is about to rewrite the base once attached again
    layer.on_attach(model.layer)
    layer.on_eject(model.layer, merged=True)
    assert layer.residual_applied is True  # merged: the base keeps W - s·B0·A0 + s·B·A, nothing is given back


def test_set_residual_writes_a_base_that_lives_on_another_device_than_the_adapter():
    """``W −= s·B0·A0`` is computed on the base's device, wherever the adapter's factors are (here a base on
    ``meta``, the one other device a CPU-only machine has: the write must not mix devices)."""
    torch.manual_seed(0)
    model = la.inject(Wrap(nn.Linear(8, 6)), la.LoRAConfig(r=2, init_weights="pissa", target_modules=["layer"]))
    layer = model.layer.adapter["default"]
    elsewhere = nn.Linear(8, 6, device="meta")
    layer.set_residual(elsewhere, torch.randn(2, 8), torch.randn(6, 2))
    assert elsewhere.weight.device.type == "meta" and elsewhere.weight.shape == (6, 8)
    assert layer.init_A.device.type == "cpu" and layer.residual_applied is True


# ------------------------------------------------------------------------------------------------------------
# Which norm the fused DoRA kernel gets, dropout on a quantized base, merge(safe=True) of an overflowing bias


@pytest.mark.parametrize("kind", ["linear", "conv1d_t"])
def test_fused_dora_kernel_gets_the_cached_norm_in_eval_and_none_in_training(kind, monkeypatch):
    """Training: the kernel computes ``‖W + s·B·A‖`` from the folded weight itself (``norm=None``). Eval: it gets the
    layer's cached norm, exactly ``row_norm(W + s·B·A)``, the same tensor on the next call."""
    torch.manual_seed(0)
    base = nn.Linear(6, 5) if kind == "linear" else _conv1d_t(5, 6)
    model = la.inject(Wrap(base), la.LoRAConfig(r=2, alpha=3, use_dora=True, target_modules=["layer"]))
    layer = model.layer.adapter["default"]
    with torch.no_grad():
        layer.lora_B.normal_()
    w = model.layer.weight.detach()
    w = w.t() if kind == "conv1d_t" else w
    want = (w + 1.5 * layer.lora_B.detach() @ layer.lora_A.detach()).norm(dim=1)
    norms = []
    real = lora_method.dora_linear
    monkeypatch.setattr(lora_method, "dora_linear", lambda *a: norms.append(a[8]) or real(*a))
    x = torch.randn(3, 6)
    model.train()
    model(x)
    assert norms == [None]
    model.eval()
    model(x)
    model(x)
    assert len(norms) == 3 and norms[2] is norms[1]
    torch.testing.assert_close(norms[1], want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_quantized_function_drops_the_adapter_input_only_in_training(dora):
    """NF4 base, dropout 0.5, an input that needs a gradient (the quantized Function runs): in eval the output is the
    one without dropout, exactly; in training two calls draw different masks."""
    pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    model = la.quantize(Wrap(nn.Linear(128, 128)), "nf4", skip=[])
    la.inject(model, la.LoRAConfig(r=4, alpha=8, use_dora=dora, dropout=0.5, target_modules=["layer"]))
    layer = model.layer.adapter["default"]
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.1)
    x = torch.randn(3, 128, requires_grad=True)
    model.eval()
    y = model(x)
    layer.dropout_p = 0.0
    assert torch.equal(y, model(x))
    layer.dropout_p = 0.5
    model.train()
    assert not torch.equal(model(x), model(x))


def test_safe_merge_refuses_a_bias_that_overflows_the_half_base_and_changes_nothing():
    """fp16 Linear with ``lora_bias``: ``b + s·b_B`` = 75000 is finite in float32 but not in float16, so
    ``merge(safe=True)`` raises before writing weight or bias."""
    model = Wrap(nn.Linear(4, 3).half())
    la.inject(model, la.LoRAConfig(r=2, alpha=2, lora_bias=True, target_modules=["layer"]))
    layer = model.layer.adapter["default"]
    with torch.no_grad():
        model.layer.bias.fill_(60000.0)
        layer.lora_B_bias.fill_(15000.0)
        layer.lora_B.fill_(0.5)
    w, b = model.layer.weight.detach().clone(), model.layer.bias.detach().clone()
    msg = r"^merge of .layer. refused: merged bias has 3 non-finite values \(NaN or Inf\) in float16"
    with pytest.raises(la.MergeError, match=msg):
        la.merge(model, safe=True)
    assert torch.equal(model.layer.weight, w) and torch.equal(model.layer.bias, b)
    assert not layer.merged


@pytest.mark.parametrize("quantized", [False, True], ids=["conv_train", "nf4_eval"])
def test_dora_norm_is_recomputed_every_call_where_it_is_not_cached(quantized):
    """Training mode (a conv, whose DoRA form always reads ``_dora_norm``) and a quantized base in eval never reuse a
    norm: a write through ``.data``, which no version counter sees, shows in the next output exactly as in a layer
    whose cache was just dropped (``train()``)."""
    torch.manual_seed(0)
    if quantized:
        pytest.importorskip("bitsandbytes")
        model = la.quantize(Wrap(nn.Linear(128, 128)), "nf4", skip=[])
        x = torch.randn(3, 128)
    else:
        model = Wrap(nn.Conv2d(4, 6, 3))
        x = torch.randn(2, 4, 5, 5)
    la.inject(model, la.LoRAConfig(r=4, alpha=8, use_dora=True, target_modules=["layer"]))
    layer = model.layer.adapter["default"]
    model.train(not quantized)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.1)
        y0 = model(x)
        layer.lora_B.data.mul_(3.0)
        y1 = model(x)
        model.train(not quantized)
        fresh = model(x)
    assert not torch.equal(y0, y1) and torch.equal(y1, fresh)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_dora_safe_merge_refuses_rows_that_overflow_a_half_base_and_unmerge_leaves_merged_false(kind):
    """fp16 base, DoRA with a magnitude of 1e6 (rows of ``m·(W + ΔW)/‖W + ΔW‖`` overflow float16): ``merge(safe=True)``
    raises, changing nothing. With a sane magnitude merge then unmerge ends with ``merged`` plain ``False``."""
    torch.manual_seed(0)
    model = Wrap((nn.Linear(6, 4) if kind == "linear" else nn.Conv1d(3, 4, 2)).half())
    la.inject(model, la.LoRAConfig(r=2, alpha=2, use_dora=True, target_modules=["layer"]))
    layer = model.layer.adapter["default"]
    w = model.layer.weight.detach().clone()
    m = layer.magnitude.detach().clone()
    with torch.no_grad():
        layer.magnitude.fill_(1e6)
    with pytest.raises(la.MergeError, match=r"^merge of .layer. refused: merged weight has \d+ non-finite values"):
        la.merge(model, safe=True)
    assert torch.equal(model.layer.weight, w) and layer.merged is False and layer.merge_norm is None
    with torch.no_grad():
        layer.magnitude.copy_(m)
    la.merge(model, safe=True)
    assert layer.merged is True
    la.unmerge(model)
    assert layer.merged is False and layer.extra_repr().endswith(", dora, merged=False")


@pytest.mark.parametrize("kind", ["linear", "conv1d_t", "conv"])
@pytest.mark.parametrize("mode", ["train_p0", "eval_p05"])
def test_dora_without_a_dropped_input_reads_w_x_off_the_base_output(kind, mode):
    """DoRA with no input dropped (training with p = 0, or eval): ``W x = base(x) − b`` in the base's float64,
    not recomputed from the adapter's float32 copy of x. B = 0 and m = 1.5·‖W‖, so y = b + 1.5·W x to 1e-12."""
    torch.manual_seed(0)
    base = {"linear": lambda: nn.Linear(8, 6), "conv1d_t": lambda: _conv1d_t(6, 8), "conv": lambda: nn.Conv2d(4, 6, 3)}
    model = Wrap(base[kind]().double())
    with torch.no_grad():
        model.layer.bias.normal_()
    dropout = 0.0 if mode == "train_p0" else 0.5
    la.inject(model, la.LoRAConfig(r=2, use_dora=True, dropout=dropout, target_modules=["layer"]))
    layer = model.layer.adapter["default"].to(torch.float32)
    with torch.no_grad():
        layer.magnitude.mul_(1.5)
    model.train(mode == "train_p0")
    x = torch.randn(3, 8, dtype=torch.float64) if kind != "conv" else torch.randn(2, 4, 5, 5, dtype=torch.float64)
    y = model(x)
    w = model.layer.weight.detach()
    w = w.t() if kind == "conv1d_t" else w  # (out, in, ...)
    # f = m / ‖W‖ in the adapter's float32, as the layer keeps both
    f = (layer.magnitude.detach().reshape(-1) / w.flatten(1).norm(dim=1).float()).double()
    shape = (1, -1, 1, 1) if kind == "conv" else (-1,)
    want = model.layer.bias.detach().reshape(shape) + f.reshape(shape) * _linear_op(model.layer, x, w)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, want, rtol=0, atol=1e-12)


_KERNELS = {
    "fused_lora": "lowrank_linear",
    "fused_dora": "dora_linear",
    "nf4_lora": "quantized_lowrank_linear",
    "nf4_dora": "quantized_dora_linear",
}


@pytest.mark.parametrize("path", list(_KERNELS))
@pytest.mark.parametrize("mode", ["train_p0", "eval_p05", "train_p05"])
def test_each_function_gets_a_dropped_input_only_when_training_with_dropout(path, mode, monkeypatch):
    """The Functions take ``x_d`` (their second argument) as ``F.dropout(x, p)`` (the forward's first random draw)
    when training with p > 0, else None (the adapter reads ``x`` itself, no copy): for the fused LoRA and DoRA
    Functions and for the quantized ones on an NF4 base, under autograd."""
    quantized = path.startswith("nf4")
    if quantized:
        pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    model = Wrap(nn.Linear(128, 128))
    if quantized:
        model = la.quantize(model, "nf4", skip=[])
    dropout = 0.0 if mode == "train_p0" else 0.5
    cfg = la.LoRAConfig(r=4, alpha=8, use_dora=path.endswith("dora"), dropout=dropout, target_modules=["layer"])
    la.inject(model, cfg)
    model.train(mode != "eval_p05")
    seen = []
    real = getattr(lora_method, _KERNELS[path])
    monkeypatch.setattr(lora_method, _KERNELS[path], lambda *a: seen.append(a[1]) or real(*a))
    x = torch.randn(3, 128, requires_grad=True)
    torch.manual_seed(7)
    model(x)
    assert len(seen) == 1
    if mode == "train_p05":
        torch.manual_seed(7)
        assert torch.equal(seen[0], torch.nn.functional.dropout(x, 0.5, True))
    else:
        assert seen[0] is None


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_eval_dora_norm_cache_survives_an_old_pickle_and_inference_mode(kind):
    """In eval: a layer pickled before the cache existed (no ``_norm_cache``) still runs; a norm cached under
    ``inference_mode`` is not reused outside it, where the output needs a gradient for the magnitude."""
    torch.manual_seed(0)
    model = Wrap(nn.Linear(6, 5) if kind == "linear" else nn.Conv1d(3, 5, 2))
    la.inject(model, la.LoRAConfig(r=2, use_dora=True, target_modules=["layer"]))
    layer = model.layer.adapter["default"]
    model.eval()
    x = torch.randn(4, 6) if kind == "linear" else torch.randn(2, 3, 6)
    del layer._norm_cache
    with torch.inference_mode():
        inferred = model(x)  # caches an inference-mode norm
        assert torch.equal(model(x), inferred)
    y = model(x)
    (gm,) = torch.autograd.grad(y.sum(), [layer.magnitude])
    assert torch.equal(y, inferred) and gm.abs().sum() > 0


@pytest.mark.parametrize("layout", ["mergeable", "peft"])
def test_lora_bias_on_a_grouped_conv_forward_is_the_closed_form(layout):
    """Conv2d(4, 6, 3, groups=2, padding=1), r=2, alpha=3 (s = 1.5), ``lora_bias``, random factors:
    ``y = conv(x, W) + b + s·(conv_B(conv_A(x)) + b_B)`` with ``A`` grouped (mergeable) or reading every input
    channel (PEFT's layout); ``∂b_B = s·Σ g``."""
    F = torch.nn.functional
    torch.manual_seed(0)
    model = Wrap(nn.Conv2d(4, 6, 3, groups=2, padding=1))
    cfg = la.LoRAConfig(
        r=2, alpha=3, lora_bias=True, init_weights=False, grouped_conv_layout=layout, target_modules=["layer"]
    )
    la.inject(model, cfg)
    layer = model.layer.adapter["default"]
    x = torch.randn(2, 4, 5, 5)
    y = model(x)
    conv = model.layer
    a, b, bb = layer.lora_A.detach(), layer.lora_B.detach(), layer.lora_B_bias.detach()
    h = F.conv2d(x, a, None, 1, 1, 1, 1 if layout == "peft" else 2)  # (N, r, 5, 5)
    want = F.conv2d(x, conv.weight, conv.bias, 1, 1, 1, 2) + 1.5 * (F.conv2d(h, b, bb, groups=2))
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    (gbb,) = torch.autograd.grad((y * g).sum(), [layer.lora_B_bias])
    torch.testing.assert_close(gbb, 1.5 * g.sum(dim=(0, 2, 3)), rtol=1e-5, atol=1e-5)


def test_layer_train_defaults_to_training_returns_itself_and_drops_the_norm_cache():
    """``LoRALayer.train()`` is ``nn.Module.train``: no argument means training, it returns the layer, and any call
    drops the eval-mode DoRA norm (a stale one is never read after a mode switch)."""
    model = la.inject(Wrap(nn.Linear(6, 5)), la.LoRAConfig(r=2, use_dora=True, target_modules=["layer"]))
    layer = model.layer.adapter["default"]
    model.eval()
    model(torch.randn(2, 6))
    assert layer._norm_cache is not None and layer.training is False
    assert layer.train() is layer
    assert layer.training is True and layer._norm_cache is None
    layer.eval()
    model(torch.randn(2, 6))
    assert layer.train(False) is layer and layer.training is False and layer._norm_cache is None


def test_unsafe_merge_writes_an_overflowing_half_bias_as_inf_and_safe_merge_passes_finite_values():
    """Without ``safe`` (the layer's default too) nothing is checked: the fp16 bias ``b + s·b_B`` = 75000 becomes
    inf. ``safe=True`` on finite values merges as usual, with or without ``lora_bias``."""
    for lora_bias in (False, True):
        model = Wrap(nn.Linear(4, 3).half())
        la.inject(model, la.LoRAConfig(r=2, alpha=2, lora_bias=lora_bias, target_modules=["layer"]))
        layer = model.layer.adapter["default"]
        with torch.no_grad():
            layer.lora_B.fill_(0.5)
        w = model.layer.weight.detach().float() + layer.lora_B.detach() @ layer.lora_A.detach()
        la.merge(model, safe=True)
        assert layer.merged is True and torch.equal(model.layer.weight, w.half())
        la.unmerge(model)
    with torch.no_grad():
        model.layer.bias.fill_(60000.0)
        layer.lora_B_bias.fill_(15000.0)
    layer.merge(model.layer)
    assert layer.merged is True and torch.isinf(model.layer.bias).all()
    assert torch.isfinite(model.layer.weight).all()


def test_layer_tensors_live_on_the_base_device_and_only_the_factors_are_state():
    """Every adapter tensor is made on the base's device (``meta`` here); residual factors and DoRA's merge norm are
    non-persistent buffers (moved with the layer, never saved); a PEFT-layout grouped conv and ``lora_bias`` on a
    base without bias are plainly unmergeable."""
    meta = lora_method.LoRALayer(nn.Linear(6, 5, device="meta"), la.LoRAConfig(r=2, lora_bias=True), "layer")
    assert {n: p.device.type for n, p in meta.named_parameters()} == dict.fromkeys(
        ["lora_A", "lora_B", "lora_B_bias"], "meta"
    )
    pissa = la.inject(Wrap(nn.Linear(8, 6)), la.LoRAConfig(r=2, init_weights="pissa", target_modules=["layer"]))
    layer = pissa.layer.adapter["default"]
    assert set(dict(layer.named_buffers())) == {"init_A", "init_B"}
    assert set(layer.state_dict()) == {"lora_A", "lora_B"}
    dora = la.inject(Wrap(nn.Linear(8, 6)), la.LoRAConfig(r=2, use_dora=True, target_modules=["layer"]))
    la.merge(dora)
    layer = dora.layer.adapter["default"]
    assert set(dict(layer.named_buffers())) == {"merge_norm"}
    assert set(layer.state_dict()) == {"lora_A", "lora_B", "magnitude"}
    cfg = la.LoRAConfig(r=2, grouped_conv_layout="peft", target_modules=["layer"])
    assert la.inject(Wrap(nn.Conv2d(4, 6, 3, groups=2)), cfg).layer.adapter["default"].mergeable is False
    cfg = la.LoRAConfig(r=2, lora_bias=True, target_modules=["layer"])
    assert la.inject(Wrap(nn.Linear(6, 5, bias=False)), cfg).layer.adapter["default"].mergeable is False


# ------------------------------------------------------------------------------------------------------------
# Dtypes the layer builds and computes in: a float64 base, a float64 adapter, a bf16 base with a residual init


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_residual_dora_on_a_bf16_base_starts_from_the_float32_norm_of_w(init):
    """PiSSA/OLoRA with DoRA on a bf16 Linear: ``m = ||W||`` per row, the norm of the bf16 weight taken in float32
    (the layer's compute dtype), not a bf16-rounded norm; ``m`` is a float32 parameter."""
    torch.manual_seed(0)
    base = nn.Linear(16, 12).to(torch.bfloat16)
    want = base.weight.detach().float().norm(p=2, dim=1)
    cfg = la.LoRAConfig(r=2, use_dora=True, init_weights=init, target_modules=["layer"])
    layer = la.inject(Wrap(base), cfg).layer.adapter["default"]
    assert layer.magnitude.dtype == torch.float32
    assert torch.equal(layer.magnitude.detach(), want)


def test_dora_merge_and_unmerge_of_a_float64_adapter_on_a_float32_base_compute_in_float32():
    """``adapter_dtype="float64"`` DoRA on a float32 Linear: merge writes ``(W + ΔW) ⊙ f`` with ``ΔW`` and the factor
    ``f = m / ||W + ΔW||`` rounded to float32 and the product taken in float32; unmerge multiplies by the float32
    ``1 / f`` and subtracts ``ΔW``, in float32 too (exactly the float32 expressions computed here)."""
    torch.manual_seed(0)
    model = Wrap(nn.Linear(32, 24))
    cfg = la.LoRAConfig(
        r=4, alpha=6, use_dora=True, init_weights=False, adapter_dtype="float64", target_modules=["layer"]
    )
    la.inject(model, cfg)
    layer = model.layer.adapter["default"]
    with torch.no_grad():
        layer.magnitude.mul_(1 + 0.3 * torch.randn(24, dtype=torch.float64))
    assert layer.magnitude.dtype == layer.lora_A.dtype == torch.float64
    w = model.layer.weight.detach().clone()
    dw = (layer.lora_B.detach() @ layer.lora_A.detach() * 1.5).float()
    norm = (w + dw).norm(p=2, dim=1).double()
    f = (layer.magnitude.detach() / norm).float()
    merged = (w + dw) * f[:, None]
    la.merge(model)
    assert model.layer.weight.dtype == torch.float32
    assert torch.equal(model.layer.weight.detach(), merged)
    la.unmerge(model)
    assert torch.equal(model.layer.weight.detach(), merged * (1.0 / f)[:, None] - dw)


# ------------------------------------------------------------------------------------------------------------
# Init and layer choices: CorDA's method, residual inits on an embedding, DoRA on a grouped conv in PEFT's format


@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_corda_layer_uses_the_configured_method(method):
    """CorDA from one batch: ``A, B = corda_factors(W, C, r, s, method)`` with ``C = Xᵀ X`` of the input scaled by
    its largest entry, for the ``corda_method`` of the config (ipm keeps the leading triplets, kpm the last)."""
    from lightning_adapters.methods import lora_data

    torch.manual_seed(0)
    model = Wrap(nn.Linear(8, 6))
    w = model.layer.weight.detach().clone()
    cfg = la.LoRAConfig(r=2, alpha=4, init_weights="corda", corda_method=method, target_modules=["layer"])
    la.inject(model, cfg)
    layer = model.layer.adapter["default"]
    assert layer.corda_method == method
    x = torch.randn(10, 8)
    la.initialize_from_data(model, [x])
    xs = x / x.max().abs()
    want_a, want_b = lora_data.corda_factors(w, xs.t() @ xs, 2, 2.0, method)
    other_a, _ = lora_data.corda_factors(w, xs.t() @ xs, 2, 2.0, "kpm" if method == "ipm" else "ipm")
    torch.testing.assert_close(layer.lora_A.detach(), want_a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_B.detach(), want_b, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(want_a, other_a, atol=1e-2)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora"])
def test_residual_inits_on_an_embedding_take_the_default_embedding_init(init):
    """PEFT's Embedding has no PiSSA/OLoRA form: ``A = 0`` and ``B ~ N(0, 1)`` (drawn from the seed), no residual
    factors, the base weight untouched."""
    torch.manual_seed(0)
    emb = nn.Embedding(6, 5)
    w0 = emb.weight.detach().clone()
    torch.manual_seed(1)
    model = la.inject(Wrap(emb), la.LoRAConfig(r=2, init_weights=init, target_modules=["layer"]))
    layer = model.layer.adapter["default"]
    torch.manual_seed(1)
    assert torch.equal(layer.lora_A.detach(), torch.zeros(2, 6))
    assert torch.equal(layer.lora_B.detach(), nn.init.normal_(torch.empty(5, 2)))
    assert layer.init_A is None and layer.init_B is None and not layer.rewrites_base
    assert torch.equal(model.layer.weight.detach(), w0)


@pytest.mark.parametrize("groups", [1, 2, 3])
def test_dora_peft_state_refuses_every_grouped_conv(groups):
    """DoRA on a conv: one group writes A, B and the magnitude; any ``groups > 1`` is refused, saying why."""
    cfg = la.LoRAConfig(r=6, use_dora=True, target_modules=["layer"])
    layer = la.inject(Wrap(nn.Conv2d(6, 6, 3, groups=groups)), cfg).layer.adapter["default"]
    if groups == 1:
        state = layer.peft_state()
        assert set(state) == {"lora_A.weight", "lora_B.weight", "lora_magnitude_vector"}
        assert torch.equal(state["lora_magnitude_vector"], layer.magnitude.detach())
        return
    with pytest.raises(la.AdapterConfigError) as err:
        layer.peft_state()
    assert str(err.value).startswith(
        f"DoRA on a conv with groups={groups} has no PEFT equivalent (PEFT 0.21 computes the DoRA weight norm"
    )


def test_a_module_in_trainable_tokens_and_target_parameters_is_refused():
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.lin = nn.Embedding(6, 4), nn.Linear(4, 3)

    cfg = la.LoRAConfig(
        r=2, target_modules=["lin"], trainable_token_indices={"emb": [1]}, target_parameters=["emb.weight"]
    )
    with pytest.raises(la.AdapterConfigError) as err:
        la.inject(Model(), cfg)
    assert str(err.value) == "lora: ['emb'] are in trainable_token_indices and target_parameters; choose one"


def test_grouped_conv_peft_layout_round_trips_under_a_meta_default_device():
    """PEFT's dense ``lora_A`` of a grouped conv is written and read back the same under a ``torch.device("meta")``
    context (as Lightning's empty-init builds run): the block indices live on the tensor's own device."""
    torch.manual_seed(0)
    a = torch.randn(4, 3, 2, 2)  # (r, in/g, k, k), groups = 2
    dense = lora_method.grouped_to_dense_A(a, 2)
    want = torch.zeros(4, 6, 2, 2)
    want[:2, :3], want[2:, 3:] = a[:2], a[2:]
    assert torch.equal(dense, want)
    model = la.inject(Wrap(nn.Conv2d(6, 4, 2, groups=2)), la.LoRAConfig(r=4, target_modules=["layer"]))
    layer = model.layer.adapter["default"]
    with torch.no_grad():
        layer.lora_A.copy_(a)
    with torch.device("meta"):
        assert torch.equal(lora_method.grouped_to_dense_A(a, 2), want)
        assert torch.equal(lora_method.dense_to_grouped_A(want, 2), a)
        state = layer.peft_state()
        assert torch.equal(state["lora_A.weight"], want)
        with torch.no_grad():
            layer.lora_A.zero_()
        layer.load_peft_state({"lora_A.weight": want})
    assert torch.equal(layer.lora_A.detach(), a)


# ------------------------------------------------------------------------------------------------------------
# Half and mixed adapter dtypes, meta tensors, and what a PEFT file's shapes select


def test_a_tensor_embed_scale_is_cast_to_a_bf16_term_as_the_base_casts_it():
    """Gemma 3's embedding keeps ``embed_scale`` as a float32 0-dim buffer and multiplies its lookup by it cast to its
    weight dtype; a bfloat16 adapter (``adapter_dtype``) scales its bfloat16 term by the scale cast to bfloat16
    (√6 → 2.453125) the same way, then adds it to the float32 base output, bit for bit."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3TextScaledWordEmbedding

    F = torch.nn.functional
    torch.manual_seed(0)
    base = Gemma3TextScaledWordEmbedding(8, 6, padding_idx=0, embed_scale=math.sqrt(6))
    model = la.inject(
        Wrap(base), la.LoRAConfig(r=2, alpha=3, init_weights=False, adapter_dtype="bfloat16", target_modules=["layer"])
    )
    layer = model.layer.adapter["default"]
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.bfloat16
    x = torch.tensor([[0, 3, 5, 7, 1]])
    with torch.no_grad():
        y = model(x)
        with la.disabled(model):
            y0 = model(x)
        term = F.linear(F.embedding(x, layer.lora_A.t(), 0), layer.lora_B) * 1.5  # (1, 5, 6) bf16
        scale = torch.tensor(math.sqrt(6)).to(torch.bfloat16)
        assert scale.item() == 2.453125
        want = y0 + (term * scale).float()
    assert y.dtype == torch.float32 and torch.equal(y, want)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_plain_dora_on_a_bias_free_linear_is_the_closed_form(mode):
    """A float32 DoRA adapter on a bias-free float64 Linear (mixed dtypes: the plain form, not the fused kernel):
    ``y = f ⊙ (W x + s·B A x)`` with ``f = m / ‖W + s·B A‖`` per output row, and its gradients."""
    torch.manual_seed(0)
    model = Wrap(nn.Linear(8, 6, bias=False).double())
    la.inject(model, la.LoRAConfig(r=2, alpha=3, use_dora=True, target_modules=["layer"]))
    layer = model.layer.adapter["default"].to(torch.float32)
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.magnitude.mul_(torch.linspace(0.5, 1.5, 6))
    model.train(mode == "train")
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    y = model(x)
    w = model.layer.weight.detach()
    a, b, m = (t.detach().double().requires_grad_() for t in (layer.lora_A, layer.lora_B, layer.magnitude))
    adapted = w + 1.5 * b @ a
    want = (m / adapted.norm(dim=1).detach()) * (x @ adapted.t())
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, want, rtol=1e-6, atol=1e-6)
    g = torch.randn(y.shape, dtype=torch.float64)
    got = torch.autograd.grad((y * g).sum(), [x, layer.lora_A, layer.lora_B, layer.magnitude])
    truth = torch.autograd.grad((want * g).sum(), [x, a, b, m])
    for u, v in zip(got, truth):
        torch.testing.assert_close(u.double(), v, rtol=1e-5, atol=1e-5)


def test_loftq_dora_magnitude_is_the_norm_of_the_quantised_base_it_writes():
    """LoftQ with DoRA on a bf16 Linear: the base becomes Q rounded to bf16, and the magnitude is the float32 norm of
    exactly that base plus s·B A (PEFT's DoRA reads the base after LoftQ replaced it), so the fresh adapter's
    scale m / ‖W + s·B A‖ is 1."""
    from lightning_adapters.methods import lora_init

    torch.manual_seed(0)
    base = nn.Linear(16, 8).to(torch.bfloat16)
    q, _, _ = lora_init.loftq_factors(base.weight.detach(), 2, 4, 1)
    assert not torch.equal(q.to(torch.bfloat16).float(), q)  # Q itself has more bits than bf16 holds
    model = la.inject(Wrap(base), la.LoRAConfig(r=2, use_dora=True, init_weights="loftq", target_modules=["layer"]))
    layer = model.layer.adapter["default"]
    w = model.layer.weight.detach()
    assert w.dtype == torch.bfloat16 and torch.equal(w, q.to(torch.bfloat16))
    a, b = layer.lora_A.detach(), layer.lora_B.detach()
    assert layer.scale == 4.0  # alpha 8 / r 2
    want = (w.float() + (4.0 * b) @ a).norm(dim=1)
    assert layer.magnitude.dtype == torch.float32 and torch.equal(layer.magnitude.detach(), want)


def test_a_dora_layer_built_on_a_meta_half_base_holds_every_tensor_in_float32():
    """The working dtype of a bf16 base is float32 on every device: a LoRALayer built directly on a meta bf16
    Linear or Conv2d (where the weight-space maths runs in bf16) keeps A, B and the DoRA magnitude in float32."""
    for make in (lambda: nn.Linear(6, 4), lambda: nn.Conv2d(3, 4, 2)):
        base = make().to(device="meta", dtype=torch.bfloat16)
        layer = lora_method.LoRALayer(base, la.LoRAConfig(r=2, use_dora=True), "layer")
        tensors = dict(layer.named_parameters())
        assert set(tensors) == {"lora_A", "lora_B", "magnitude"}
        assert {n: (t.dtype, t.device.type) for n, t in tensors.items()} == dict.fromkeys(
            tensors, (torch.float32, "meta")
        )


@pytest.mark.parametrize("kind", ["linear", "conv1d_t", "conv"])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_a_fresh_bf16_dora_adapter_on_a_float32_base_leaves_the_output_exact(kind, mode):
    """``adapter_dtype="bfloat16"`` on a float32 base: the magnitude is ‖W‖ rounded to bf16 and the norm the forward
    divides it by is rounded the same way (the magnitude's dtype), so m / n = 1 and, with B = 0, the output is the
    base output bit for bit (a float32 norm would scale every row by bf16(‖W‖) / ‖W‖ ≠ 1)."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    make = {"linear": lambda: nn.Linear(8, 6), "conv1d_t": lambda: Conv1D(6, 8), "conv": lambda: nn.Conv2d(4, 6, 3)}
    model = Wrap(make[kind]())
    x = torch.randn(3, 8) if kind != "conv" else torch.randn(2, 4, 5, 5)
    y0 = model(x).detach()
    cfg = la.LoRAConfig(r=2, use_dora=True, adapter_dtype="bfloat16", target_modules=["layer"])
    layer = la.inject(model, cfg).layer.adapter["default"]
    assert layer.magnitude.dtype == torch.bfloat16
    w = model.layer.weight.detach()
    w = w.t() if kind == "conv1d_t" else w
    norm = w.reshape(w.shape[0], -1).norm(dim=1)
    assert not torch.equal(norm.to(torch.bfloat16).float(), norm)
    assert torch.equal(layer.magnitude.detach().reshape(-1), norm.to(torch.bfloat16))
    model.train(mode == "train")
    assert torch.equal(model(x), y0)


@pytest.mark.parametrize("adapter_dtype", ["bfloat16", "float16"])
def test_dora_on_a_float32_embedding_with_a_half_adapter_computes_in_float32(adapter_dtype):
    """The base lookup stays float32 (PEFT's too): a fresh adapter leaves the output bit for bit (rounding the
    lookup to the adapter's dtype moved it by up to 6e-3), and a trained one gives ``m / ‖E + ΔEᵀ‖ ⊙ (E[x] +
    s·Aᵀ[x] Bᵀ)`` as a float32 output, to the half-precision rounding of the adapter's own term and norm."""
    torch.manual_seed(0)
    model = Wrap(nn.Embedding(10, 6))
    x = torch.tensor([[1, 2, 3], [0, 9, 2]])
    y0 = model(x).detach()
    cfg = la.LoRAConfig(r=2, alpha=3.0, use_dora=True, adapter_dtype=adapter_dtype, target_modules=["layer"])
    layer = la.inject(model, cfg).layer.adapter["default"]
    for mode in (False, True):
        model.train(mode)
        assert torch.equal(model(x), y0)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in (layer.lora_A, layer.lora_B):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model.eval()
    a, b, e = layer.lora_A.float(), layer.lora_B.float(), model.layer.weight.detach()
    s = 3.0 / 2
    factor = layer.magnitude.detach().float() / (e + s * (b @ a).t()).norm(dim=0)
    want = factor * (e[x] + s * (a.t()[x] @ b.t()))
    got = model(x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)


def test_prepare_peft_load_ignores_a_b_that_looks_like_a_group_mixing_a():
    """Only ``lora_A`` entries select the layout: an ungrouped conv's ``lora_B`` (8, 4, 1, 1), whose shape would pass
    for a 2-group A that mixes groups, leaves the mergeable layout; so does a 3-D tensor of another name."""
    cfg = la.LoRAConfig(r=4)
    prepare = la.get_method("lora").prepare_peft_load
    torch.manual_seed(0)
    tensors = {"m.conv.lora_A.weight": torch.randn(4, 3, 3, 3), "m.conv.lora_B.weight": torch.randn(8, 4, 1, 1)}
    assert prepare(cfg, {}, tensors)[0].grouped_conv_layout == "mergeable"
    other = {"m.conv.lora_magnitude_vector": torch.randn(1, 8, 4, 1), "m.conv.lora_B.weight": torch.randn(8, 4, 1, 1)}
    assert prepare(cfg, {}, other)[0].grouped_conv_layout == "mergeable"


def test_a_model_with_an_ungrouped_and_a_grouped_conv_loads_its_own_file_mergeable(tmp_path):
    """Our file of a model with an ungrouped Conv2d (r 4, 8 outputs: B (8, 4, 1, 1)) and a 2-group Conv2d (A block-
    diagonal) loads back in the mergeable layout: the grouped layer holds its grouped A, merges, answers the same."""

    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.plain = nn.Conv2d(3, 8, 3, padding=1)
            self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.grouped(self.plain(x))

    torch.manual_seed(0)
    model = Two()
    fresh = copy.deepcopy(model)
    cfg = la.LoRAConfig(r=4, rank_pattern={"grouped": 8}, init_weights=False, target_modules=["plain", "grouped"])
    la.inject(model, cfg)
    la.save_peft(model, tmp_path)
    la.load_peft(fresh, tmp_path)
    layer = fresh.grouped.adapter["default"]
    assert layer.peft_layout is False and layer.mergeable is True
    assert torch.equal(layer.lora_A.detach(), model.grouped.adapter["default"].lora_A.detach())
    x = torch.randn(1, 3, 5, 5)
    with torch.no_grad():
        y = model(x)
        assert torch.equal(fresh(x), y)
        la.merge(fresh)
        torch.testing.assert_close(fresh(x), y, rtol=1e-5, atol=1e-5)


def test_an_ungrouped_layer_loads_a_peft_state_of_meta_tensors_on_the_meta_device():
    """A model built on the meta device (an empty-init build) round-trips its own PEFT state: an ungrouped layer's
    ``load_peft_state`` reads no values (only a grouped conv's A must be checked for group-mixing weights)."""
    from transformers.pytorch_utils import Conv1D

    for base in (nn.Linear(6, 4), Conv1D(4, 6), nn.Conv2d(3, 4, 2), nn.Embedding(5, 4)):
        model = la.inject(Wrap(base), la.LoRAConfig(r=2, use_dora=True, target_modules=["layer"])).to("meta")
        layer = model.layer.adapter["default"]
        state = layer.peft_state()
        assert all(t.is_meta for t in state.values())
        layer.load_peft_state(state)
        assert all(p.is_meta for p in layer.parameters())


def _dora_eval_model(kind: str) -> tuple[nn.Module, torch.Tensor]:
    """A DoRA layer whose eval forward reads ``_dora_factor``: a bf16 Linear under fp32 adapters (the mixed-dtype
    plain form), a Conv1d, an Embedding; random factors and magnitude."""
    torch.manual_seed(0)
    if kind == "linear_bf16":
        base, x = nn.Linear(6, 5).to(torch.bfloat16), torch.randn(4, 6).to(torch.bfloat16)
    elif kind == "conv":
        base, x = nn.Conv1d(3, 5, 2), torch.randn(2, 3, 6)
    else:
        base, x = nn.Embedding(7, 5), torch.tensor([[1, 4, 6], [0, 2, 2]])
    model = la.inject(Wrap(base), la.LoRAConfig(r=2, use_dora=True, init_weights=False, target_modules=["layer"]))
    with torch.no_grad():
        model.layer.adapter["default"].magnitude.mul_(torch.rand_like(model.layer.adapter["default"].magnitude) + 0.5)
    return model, x


def _uncached(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    layer = model.layer.adapter["default"]
    layer._norm_cache = layer._factor_cache = None
    return model(x)


@pytest.mark.parametrize("kind", ["linear_bf16", "conv", "embedding"])
def test_eval_dora_factor_cache_is_reused_only_while_its_magnitude_and_norm_are_unchanged(kind):
    """Eval without a gradient to ``m``: the second forward reuses the factor ``m / n`` (the same tensor) and gives
    the uncached output bit for bit; an in-place write to ``m`` or to ``B`` (version counters) and ``train()``
    drop it, so each output equals a recomputation from scratch."""
    model, x = _dora_eval_model(kind)
    layer = model.layer.adapter["default"]
    model.eval()
    with torch.no_grad():
        first = model(x)
        factor = layer._factor_cache[2]
        again = model(x)
        assert layer._factor_cache[2] is factor and torch.equal(again, first)
        assert torch.equal(_uncached(model, x), first)
        model(x)
        layer.magnitude.mul_(1.5)
        y = model(x)
        assert layer._factor_cache[2] is not factor and not torch.equal(y, first)
        assert torch.equal(_uncached(model, x), y)
        model(x)
        layer.lora_B.add_(0.25)
        y = model(x)
        assert torch.equal(_uncached(model, x), y)
    model.train()
    assert layer._factor_cache is None and layer._norm_cache is None


@pytest.mark.parametrize("kind", ["linear_bf16", "conv", "embedding"])
def test_eval_dora_factor_is_not_cached_while_the_magnitude_gets_a_gradient(kind):
    """Eval with autograd on ``m`` (the other side of the cache's condition): the factor is rebuilt in the graph,
    so ``∂m`` flows, twice in a row, equal to the uncached run's values; a factor cached under ``inference_mode`` is
    not reused by a forward outside it that records autograd (no error, same output)."""
    model, x = _dora_eval_model(kind)
    layer = model.layer.adapter["default"]
    model.eval()
    with torch.inference_mode():
        inferred = model(x)
        model(x)
    grads = []
    for _ in range(2):
        y = model(x)
        (gm,) = torch.autograd.grad(y.float().sum(), [layer.magnitude])
        grads.append(gm)
        assert torch.equal(y, inferred) and gm.abs().sum() > 0
    assert torch.equal(grads[0], grads[1])
    layer.magnitude.requires_grad_(False)
    if kind == "linear_bf16":
        x = x.clone().requires_grad_(True)  # an input that needs a gradient saves the factor for the backward
    y = model(x)
    assert torch.equal(y, inferred)
    if kind == "linear_bf16":
        y.float().sum().backward()
        assert x.grad.abs().sum() > 0


@pytest.mark.parametrize("rows", [4, 16], ids=["unfolded", "folded"])
def test_eval_dora_fused_linear_reuses_the_cached_factor_on_both_sides_of_the_fold(rows):
    """fp32 Linear (``DoRALinear``'s no-grad forward with the cached norm): with few rows it adds the scaled rank-r
    term to ``x Wᵀ``, with more than 1.5·in rows it multiplies by the folded ``diag(f)(W + s·B·A)``. Both read the
    cached factor from the second forward on and give the uncached output bit for bit; an in-place write to ``m``
    is seen; with a gradient to ``m`` nothing is cached and ``∂m`` flows."""
    torch.manual_seed(0)
    model = la.inject(
        Wrap(nn.Linear(6, 5)), la.LoRAConfig(r=2, use_dora=True, init_weights=False, target_modules=["layer"])
    )
    layer = model.layer.adapter["default"]
    with torch.no_grad():
        layer.magnitude.mul_(torch.rand_like(layer.magnitude) + 0.5)
    x = torch.randn(rows, 6)
    model.eval()
    with torch.no_grad():
        first = model(x)
        factor = layer._factor_cache[2]
        assert torch.equal(model(x), first) and layer._factor_cache[2] is factor
        assert torch.equal(_uncached(model, x), first)
        model(x)
        layer.magnitude.mul_(0.75)
        y = model(x)
        assert not torch.equal(y, first) and torch.equal(_uncached(model, x), y)
    layer._factor_cache = None
    y = model(x)
    (gm,) = torch.autograd.grad(y.sum(), [layer.magnitude])
    assert layer._factor_cache is None and gm.abs().sum() > 0
    assert torch.equal(_uncached(model, x), y)
