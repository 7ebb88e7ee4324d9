"""``methods._common`` pinned function by function: layer kinds and shapes, the CPU-drawn init (on CPU, meta,
another device and DTensors), finite checks and weight writes, row stash/restore per layout, the rank limit,
the compute dtype, ``add_delta_``, divisors, OFT's rotated size and the block-dropout mask."""

from __future__ import annotations

import math
import sys
import types

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lightning_adapters.errors import AdapterConfigError, MergeError, UnsupportedLayerError
from lightning_adapters.methods import _common as c

# --- layer kinds and shapes ----------------------------------------------------------------------------------

LAYERS = {
    "linear": (lambda: nn.Linear(3, 5), (3, 5)),
    "conv1d_t": (lambda: Conv1D(5, 3), (3, 5)),  # transformers Conv1D(nf=out, nx=in), weight (in, out)
    "embedding": (lambda: nn.Embedding(7, 4), (7, 4)),
    "conv1d": (lambda: nn.Conv1d(3, 6, 2), (3, 6)),
    "conv2d": (lambda: nn.Conv2d(2, 4, 3), (2, 4)),
    "conv3d": (lambda: nn.Conv3d(2, 5, 1), (2, 5)),
}


def test_layer_kind_in_out_features_and_weight_layout():
    for kind, (make, dims) in LAYERS.items():
        layer = make()
        assert c.layer_kind(layer) == kind
        assert c.in_out_features(layer) == dims
        w = c.weight_as_out_in(layer)
        if kind == "conv1d_t":
            assert w.shape == (5, 3) and torch.equal(w, layer.weight.t())
            assert w.data_ptr() == layer.weight.data_ptr()  # a view, not a copy
        else:
            assert w is layer.weight
    with pytest.raises(UnsupportedLayerError, match=r"^unsupported layer type LayerNorm$"):
        c.layer_kind(nn.LayerNorm(3))
    with pytest.raises(UnsupportedLayerError, match="unsupported layer type ConvTranspose2d"):
        c.in_out_features(nn.ConvTranspose2d(2, 3, 1))


# --- draw_ / kaiming_uniform_ ------------------------------------------------------------------------------


class _Spy:
    """An ``init`` that records what it was called with and fills with a known constant."""

    def __init__(self) -> None:
        self.calls: list[tuple[torch.Tensor, dict]] = []

    def __call__(self, t, **kwargs):
        self.calls.append((t, kwargs))
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            with torch.no_grad():
                t.fill_(kwargs.get("value", 1.5))
        return t


class _FakeDeviceTensor:
    """Duck-typed tensor on a non-CPU device (the GPU path of ``draw_`` runs on a CPU-only machine)."""

    def __init__(self, shape, dtype) -> None:
        self.device = types.SimpleNamespace(type="cuda")
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self.copied: list[torch.Tensor] = []

    def copy_(self, src):
        self.copied.append(src)
        return self


def test_draw_on_cpu_fills_the_tensor_itself_with_the_kwargs():
    t = torch.zeros(2, 3).t()  # non-contiguous on purpose: filled where it is
    spy = _Spy()
    assert c.draw_(t, spy, value=2.5) is t
    assert len(spy.calls) == 1 and spy.calls[0][0] is t and spy.calls[0][1] == {"value": 2.5}
    assert torch.equal(t, torch.full((3, 2), 2.5))


def test_draw_on_meta_draws_nothing_from_the_cpu_generator():
    t = torch.empty(4, 5, device="meta")
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    spy = _Spy()
    assert c.draw_(t, spy, value=1.0) is t
    assert spy.calls[0][0] is t
    assert c.kaiming_uniform_(t) is t
    assert torch.equal(torch.rand(3), expected)  # the generator was not advanced


def test_draw_on_another_device_draws_on_the_cpu_and_copies():
    fake = _FakeDeviceTensor((3, 4), torch.float16)
    spy = _Spy()
    with torch.device("meta"):  # a default-device context must not move the CPU draw
        assert c.draw_(fake, spy, value=0.25) is fake
    ((drawn, kwargs),) = spy.calls
    assert kwargs == {"value": 0.25}
    assert drawn.device.type == "cpu" and drawn.dtype == torch.float16 and drawn.shape == (3, 4)
    assert fake.copied == [drawn] and fake.copied[0] is drawn
    assert torch.equal(drawn, torch.full((3, 4), 0.25, dtype=torch.float16))


def test_draw_fills_a_dtensor_where_it_is(monkeypatch):
    import torch.distributed.tensor as dt

    class FakeDTensor(_FakeDeviceTensor):
        pass

    monkeypatch.setattr(dt, "DTensor", FakeDTensor)
    fake = FakeDTensor((2, 2), torch.float32)
    assert c._is_dtensor(fake) and not c._is_dtensor(torch.zeros(1))
    spy = _Spy()
    assert c.draw_(fake, spy) is fake
    assert spy.calls[0][0] is fake and fake.copied == []


def test_without_distributed_nothing_is_a_dtensor(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.distributed.tensor", None)  # import raises ImportError
    fake = _FakeDeviceTensor((2,), torch.float32)
    assert c._is_dtensor(fake) is False
    spy = _Spy()
    c.draw_(fake, spy)
    assert spy.calls[0][0] is not fake and len(fake.copied) == 1


def test_kaiming_uniform_is_nn_linear_init_from_the_cpu_generator():
    lin_torch = nn.Linear(6, 4)
    torch.manual_seed(11)
    nn.init.kaiming_uniform_(lin_torch.weight, a=math.sqrt(5))
    t = torch.empty(4, 6)
    torch.manual_seed(11)
    assert c.kaiming_uniform_(t) is t
    assert torch.equal(t, lin_torch.weight.detach())
    bound = 1 / math.sqrt(6)  # gain sqrt(2/(1+5)) · sqrt(3/fan_in) = 1/sqrt(fan_in)
    assert t.abs().max() <= bound and t.abs().max() > 0.5 * bound
    # fan-in is prod(shape[1:]) on any shape
    t3 = torch.empty(2, 3, 4)
    c.kaiming_uniform_(t3)
    assert t3.abs().max() <= 1 / math.sqrt(12)


# --- finite checks and weight writes -------------------------------------------------------------------------


def test_check_finite_counts_and_names_the_dtype():
    c.check_finite(torch.tensor([1.0, -2.0]), "x")
    bad = torch.tensor([1.0, float("nan"), float("inf"), -float("inf")], dtype=torch.float16)
    with pytest.raises(MergeError) as err:
        c.check_finite(bad, "the thing")
    assert str(err.value) == (
        "the thing has 3 non-finite values (NaN or Inf) in float16; the base weights were left unchanged. Check "
        "the adapter tensors for NaN/Inf, or keep a half-precision base unmerged when the merged values overflow "
        "its range"
    )


def test_write_weight_casts_then_checks_in_the_weight_dtype():
    w = torch.zeros(2, dtype=torch.float16)
    new = torch.tensor([7e4, 1.0])  # finite in fp32, inf in fp16
    with pytest.raises(MergeError, match=r"^merged weight has 1 non-finite values \(NaN or Inf\) in float16"):
        c.write_weight_(w, new, safe=True)
    assert torch.equal(w, torch.zeros(2, dtype=torch.float16))
    c.write_weight_(w, new)  # unsafe: written as cast
    assert w.dtype == torch.float16 and w[0].item() == float("inf") and w[1].item() == 1.0
    w64 = torch.zeros(3, dtype=torch.float64)
    c.write_weight_(w64, torch.tensor([0.1, 0.2, 0.3]), safe=True)
    assert torch.equal(w64, torch.tensor([0.1, 0.2, 0.3]).double())


def test_compute_dtype():
    assert c.compute_dtype(torch.zeros(1, dtype=torch.float16)) == torch.float32
    assert c.compute_dtype(torch.zeros(1, dtype=torch.bfloat16)) == torch.float32
    assert c.compute_dtype(torch.zeros(1, dtype=torch.float32)) == torch.float32
    assert c.compute_dtype(torch.zeros(1, dtype=torch.float64)) == torch.float64
    assert c.compute_dtype(torch.zeros(1, dtype=torch.float16, device="meta")) == torch.float16
    assert c.compute_dtype(torch.zeros(1, dtype=torch.float64, device="meta")) == torch.float64


def test_add_delta_signs_scales_and_computes_in_fp32():
    w = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    d = torch.tensor([[0.5, -1.0], [2.0, 0.25]])
    c.add_delta_(w, d)
    assert torch.equal(w, torch.tensor([[1.5, 1.0], [5.0, 4.25]]))
    c.add_delta_(w, d, sign=-1.0)
    assert torch.equal(w, torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    c.add_delta_(w, d, sign=2.0)
    assert torch.equal(w, torch.tensor([[2.0, 0.0], [7.0, 4.5]]))
    c.add_delta_(w, d, sign=0.5)
    assert torch.equal(w, torch.tensor([[2.25, -0.5], [8.0, 4.625]]))
    # A leaf that requires grad is written in place without recording a graph.
    p = nn.Parameter(torch.zeros(2))
    c.add_delta_(p, torch.ones(2))
    assert torch.equal(p.detach(), torch.ones(2)) and p.grad_fn is None
    # fp16 base and fp16 delta: sign · delta = 1.2e5 overflows in fp16, not in the fp32 compute dtype.
    h = torch.tensor([-6e4], dtype=torch.float16)
    c.add_delta_(h, torch.tensor([6e4], dtype=torch.float16), sign=2.0)
    assert h.dtype == torch.float16 and h.item() == torch.tensor(6e4, dtype=torch.float16).item()


def test_add_delta_adds_a_broadcast_delta_in_fp32_too():
    # A 0-dim fp32 delta on an fp16 weight: without the fp32 cast of the weight, torch would add it in fp16,
    # where 1.2e5 is already inf.
    h = torch.tensor([-6e4, 1.0], dtype=torch.float16)
    c.add_delta_(h, torch.tensor(1.2e5))
    assert h.dtype == torch.float16 and h.tolist() == [torch.tensor(6e4, dtype=torch.float16).item(), float("inf")]
    h = torch.tensor([-6e4, -6e4], dtype=torch.float16)
    c.add_delta_(h, torch.tensor(6e4, dtype=torch.float16), sign=2.0)
    assert h.tolist() == [torch.tensor(6e4, dtype=torch.float16).item()] * 2


def test_add_delta_safe_leaves_the_weight_unchanged():
    h = torch.tensor([6e4, 1.0], dtype=torch.float16)
    before = h.clone()
    with pytest.raises(MergeError, match="merged weight has 1 non-finite"):
        c.add_delta_(h, torch.tensor([6e4, 0.0]), safe=True)
    assert torch.equal(h, before)
    c.add_delta_(h, torch.tensor([6e4, 0.0]))
    assert h[0].item() == float("inf")


# --- unscalable_rows ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype, judged_as",
    [
        (torch.float32, torch.float32),
        (torch.float64, torch.float64),
        (torch.float16, torch.float16),
        (torch.bfloat16, torch.bfloat16),
        (torch.uint8, torch.float32),  # quantized storage
    ],
)
def test_unscalable_rows_are_zero_overflowing_or_subnormal_scales(dtype, judged_as):
    tiny = torch.finfo(judged_as).tiny
    scale = torch.tensor(
        [1.0, 0.0, -0.0, tiny, -tiny, tiny * 0.5, -tiny * 0.75, float("nan"), 5e-324, 2.0**-1000, float("inf")],
        dtype=torch.float64,
    )
    got = c.unscalable_rows(scale.reshape(1, -1, 1), dtype)
    assert got.dtype == torch.bool and got.shape == (11,)
    below = 2.0**-1000 < tiny  # a normal float64, subnormal or 0 in every narrower dtype
    assert got.tolist() == [False, True, True, False, False, True, True, True, True, below, False]


def test_unscalable_rows_reads_a_float32_scale_without_changing_it():
    scale = torch.tensor([2.0, 1e-39, 3e-39, 1e-44, 0.0], requires_grad=True)  # 1e-39: 1/s overflows float32
    assert c.unscalable_rows(scale, torch.float32).tolist() == [False, True, True, True, True]
    # A float64 weight holds s·W of every non-zero float32 scale as a normal number: each divides back; 0 does not
    # (float64's smallest normal is 0 in float32: the comparison must be made in float64).
    assert c.unscalable_rows(scale, torch.float64).tolist() == [False, False, False, False, True]
    assert scale.dtype == torch.float32 and scale.grad is None


# --- stash_rows / restore_rows_ --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,dim", [("linear", 0), ("conv2d", 0), ("conv1d", 0), ("conv1d_t", 1), ("embedding", 1)])
def test_out_dim_and_stash_restore_round_trip(kind, dim):
    assert c._out_dim(kind) == dim
    w = torch.arange(4 * 5 * 2, dtype=torch.float32).reshape(4, 5, 2) if kind == "conv2d" else None
    if w is None:
        w = torch.arange(20, dtype=torch.float32).reshape(4, 5)
    n_out = w.shape[dim]
    which = torch.zeros(n_out, dtype=torch.bool)
    which[[1, 3]] = True
    original = w.clone()
    idx, rows = c.stash_rows(w, which, kind)
    assert idx.dtype == torch.long and idx.tolist() == [1, 3] and idx.shape == (2,)
    assert torch.equal(rows, original.index_select(dim, torch.tensor([1, 3])))
    w.mul_(0)  # the stash is a copy
    assert torch.equal(rows, original.index_select(dim, torch.tensor([1, 3])))
    c.restore_rows_(w, idx, rows, kind)
    expected = torch.zeros_like(original)
    expected.index_copy_(dim, torch.tensor([1, 3]), original.index_select(dim, torch.tensor([1, 3])))
    assert torch.equal(w, expected)


def test_stash_nothing_and_restore_casts():
    w = torch.ones(3, 2)
    assert c.stash_rows(w, torch.zeros(3, dtype=torch.bool), "linear") == (None, None)
    c.restore_rows_(w, None, None, "linear")  # no-op
    assert torch.equal(w, torch.ones(3, 2))
    h = torch.zeros(3, 2, dtype=torch.float16)
    c.restore_rows_(h, torch.tensor([2]), torch.tensor([[0.5, 0.25]], dtype=torch.float64), "linear")
    assert h.dtype == torch.float16 and h[2].tolist() == [0.5, 0.25] and h[:2].abs().sum() == 0
    # Every row stashed.
    idx, rows = c.stash_rows(torch.eye(2), torch.ones(2, dtype=torch.bool), "linear")
    assert idx.tolist() == [0, 1] and torch.equal(rows, torch.eye(2))


# --- check_rank -------------------------------------------------------------------------------------------------


def test_check_rank_limit_and_messages():
    assert c.RANK_LIMIT_FACTOR == 16
    c.check_rank(16 * 8, (3, 8), "layer", "lora")  # exactly at the limit: accepted
    c.check_rank(1, (3, 8), "layer", "lora")
    with pytest.raises(AdapterConfigError) as err:
        c.check_rank(16 * 8 + 1, (3, 8), "layers.0.q", "lora")
    assert str(err.value) == (
        "lora: r=129 on 'layers.0.q' is far above the layer's dimensions (3, 8) (at most 128 is accepted, nothing "
        "was allocated); more than 3 ranks add no expressiveness, so use r <= 3"
    )
    with pytest.raises(AdapterConfigError) as err:
        c.check_rank(10**6, (5,), "attn", "llama_adapter", "adapter_len", "a custom reason")
    assert str(err.value) == (
        "llama_adapter: adapter_len=1000000 on 'attn' is far above the layer's dimensions (5,) (at most 80 is "
        "accepted, nothing was allocated); a custom reason, so use adapter_len <= 5"
    )


# --- OFT/BOFT helpers -------------------------------------------------------------------------------------------


def test_divisors():
    assert c.divisors(1) == [1]
    assert c.divisors(2) == [1, 2]
    assert c.divisors(12) == [1, 2, 3, 4, 6, 12]
    assert c.divisors(16) == [1, 2, 4, 8, 16]
    assert c.divisors(17) == [1, 17]
    assert c.divisors(36) == [1, 2, 3, 4, 6, 9, 12, 18, 36]
    assert all(type(k) is int for k in c.divisors(36))


def test_rotated_size():
    assert c.rotated_size(nn.Linear(6, 2), "linear") == (6, "in_features=6")
    assert c.rotated_size(nn.Embedding(9, 5), "embedding") == (5, "embedding_dim=5")
    conv = nn.Conv2d(8, 4, (3, 2), groups=2)
    assert c.rotated_size(conv, "conv2d") == (24, "flattened kernel size 24 (in_channels/groups=4 × 3×2)")
    n, text = c.rotated_size(nn.Conv2d(3, 3, (2, 5)), "conv2d")
    assert type(n) is int and n == 30 and text == "flattened kernel size 30 (in_channels/groups=3 × 2×5)"


def test_block_dropout_mask():
    for n, p, k in [(10, 0.0, 0), (10, 0.5, 5), (7, 0.5, 3), (8, 0.99, 7), (4, 1.0, 4), (1, 0.3, 0)]:
        torch.manual_seed(5)
        mask = c.block_dropout_mask(n, p, torch.device("cpu"))
        assert mask.dtype == torch.bool and mask.shape == (n,) and mask.device.type == "cpu"
        assert int(mask.sum()) == k
        torch.manual_seed(5)
        assert torch.equal(mask, torch.randperm(n) < k)
    with torch.device("meta"):
        assert c.block_dropout_mask(6, 0.5, torch.device("cpu")).device.type == "cpu"


def test_stash_and_restore_move_indices_and_rows_to_the_weight_device():
    w = torch.empty(4, 3, device="meta")  # a device other than the mask's, indices' and rows' CPU
    idx, rows = c.stash_rows(w, torch.tensor([False, True, True, False]), "linear")
    assert idx.device.type == "meta" and rows.device.type == "meta" and rows.shape == (2, 3)
    c.restore_rows_(w, torch.tensor([1, 2]), torch.ones(2, 3, dtype=torch.float64), "linear")
    e = torch.empty(3, 4, device="meta")
    c.restore_rows_(e, torch.tensor([0]), torch.ones(3, 1), "embedding")
