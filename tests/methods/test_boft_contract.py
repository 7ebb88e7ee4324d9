"""BOFT pinned function by function against truths written here: the paper's dense butterfly product (PEFT's
permutations built by loops), the exact Cayley map by a matrix inverse, autograd through that dense formula for
gradients, exact error messages, exact PEFT config dicts and seeded draws."""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightning_adapters as la
from lightning_adapters.methods.boft import (
    BOFTConfig,
    BOFTLayer,
    BOFTMethod,
    butterfly_layouts,
    butterfly_matrix,
    butterfly_permutation,
    check_butterfly,
)
from tests.methods.test_orthogonal_contract import quantized

F64 = torch.float64


# --- independent references ----------------------------------------------------------------------------------


def _perm(d: int, b: int, i: int) -> list[int]:
    """PEFT's permutation by loops: inside groups of b·2^i features, even half-blocks (b/2) first, then odd."""
    if i == 0:
        return list(range(d))
    out, group, half = [], b * 2**i, b // 2
    for start in range(0, d, group):
        halves = [list(range(start + k * half, start + (k + 1) * half)) for k in range(group // half)]
        for k in list(range(0, len(halves), 2)) + list(range(1, len(halves), 2)):
            out += halves[k]
    return out


def _cayley(raw: torch.Tensor) -> torch.Tensor:
    """(I − S)(I + S)⁻¹ with S = ½(A − Aᵀ), for a stack (..., b, b); differentiable."""
    s = 0.5 * (raw - raw.transpose(-1, -2))
    eye = torch.eye(raw.shape[-1], dtype=raw.dtype).expand_as(s)
    return (eye - s) @ torch.linalg.inv(eye + s)


def _dense(blocks: list[torch.Tensor]) -> torch.Tensor:
    """R = B_{m−1} ⋯ B_0 with B_i = P_i blockdiag(blocks[i]) P_iᵀ, P_i[j, perm_i[j]] = 1; differentiable."""
    n, b, _ = blocks[0].shape
    d = n * b
    out = torch.eye(d, dtype=blocks[0].dtype)
    for i, blk in enumerate(blocks):
        p = torch.zeros(d, d, dtype=blk.dtype)
        p[torch.arange(d), torch.tensor(_perm(d, b, i))] = 1.0
        out = p @ torch.block_diag(*blk.unbind(0)) @ p.T @ out
    return out


def _layer(base: nn.Module, name: str = "blk.layer", **kw) -> BOFTLayer:
    return BOFTLayer(base, BOFTConfig(**kw), name)


def _randomize(layer: BOFTLayer, seed: int = 0, std: float = 0.4) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.boft_R.copy_(torch.randn(layer.boft_R.shape, generator=g, dtype=F64) * std)
        layer.boft_s.copy_(1.0 + torch.randn(layer.boft_s.shape, generator=g, dtype=F64) * 0.3)


def _message(exc: pytest.ExceptionInfo) -> str:
    return str(exc.value)


# --- config --------------------------------------------------------------------------------------------------


def test_config_accepts_every_edge_and_runs_the_shared_checks():
    cfg = BOFTConfig(
        boft_block_size=0,
        boft_block_num=3,
        boft_n_butterfly_factor=1,
        boft_dropout=0.0,
        init_weights=False,
        bias="boft_only",
        target_modules=("q", "v"),
    )
    assert cfg.target_modules == ["q", "v"]  # the shared __post_init__ ran
    for bias in ("none", "all"):
        assert BOFTConfig(bias=bias, boft_dropout=0.999).bias == bias


# --- pure functions ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("d, b, i", [(8, 2, 0), (8, 2, 1), (8, 2, 2), (16, 4, 1), (16, 2, 3), (24, 6, 1), (32, 4, 2)])
def test_butterfly_permutation_is_pefts(d, b, i):
    perm = butterfly_permutation(d, b, i)
    assert perm.dtype == torch.long
    assert perm.tolist() == _perm(d, b, i)


def test_butterfly_permutation_small_cases_written_out():
    assert butterfly_permutation(8, 2, 1).tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    assert butterfly_permutation(8, 2, 2).tolist() == [0, 2, 4, 6, 1, 3, 5, 7]
    assert butterfly_permutation(8, 4, 1).tolist() == [0, 1, 4, 5, 2, 3, 6, 7]
    assert butterfly_permutation(6, 6, 0).tolist() == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("m, n, b", [(1, 3, 3), (2, 2, 4), (3, 4, 2), (3, 8, 6)])
def test_butterfly_matrix_is_the_dense_product(m, n, b):
    g = torch.Generator().manual_seed(m * 100 + n)
    blocks = [torch.randn(n, b, b, generator=g, dtype=F64) for _ in range(m)]  # any blocks, not only rotations
    r = butterfly_matrix(blocks, b)
    assert r.dtype == F64 and r.shape == (n * b, n * b)
    assert torch.allclose(r, _dense(blocks), atol=1e-12, rtol=0)


def test_butterfly_matrix_stays_on_the_blocks_device():
    r = butterfly_matrix([torch.empty(2, 2, 2, device="meta", dtype=F64)] * 2, 2)
    assert r.device.type == "meta" and r.dtype == F64 and r.shape == (4, 4)
    r1 = butterfly_matrix([torch.empty(3, 2, 2, device="meta", dtype=torch.float16)], 2)
    assert r1.device.type == "meta" and r1.dtype == torch.float16


def test_butterfly_layouts_written_out():
    assert butterfly_layouts(1, 5, 3) == ((5, 3), [((0, 1), 1)])
    assert butterfly_layouts(2, 6, 4) == ((3, 2, 2, 2), [((0, 1, 2, 3), 2), ((0, 2, 1, 3), 2)])
    assert butterfly_layouts(3, 8, 6) == (
        (2, 2, 2, 2, 3),
        [((0, 1, 2, 3, 4), 3), ((0, 1, 3, 2, 4), 3), ((0, 2, 3, 1, 4), 3)],
    )
    axis, layouts = butterfly_layouts(4, 16, 2)
    assert axis == (2, 2, 2, 2, 2, 1)
    assert layouts == [
        ((0, 1, 2, 3, 4, 5), 4),
        ((0, 1, 2, 4, 3, 5), 4),
        ((0, 1, 3, 4, 2, 5), 4),
        ((0, 2, 3, 4, 1, 5), 4),
    ]


def _fits(d: int, b: int, m: int) -> str:
    n = d // b
    fits = [k for k in range(1, n + 2) if k == 1 or (b % 2 == 0 and n % 2 ** (k - 1) == 0)]
    sizes = [s for s in range(1, d + 1) if d % s == 0 and s % 2 == 0 and (d // s) % 2 ** (m - 1) == 0]
    return (
        f"boft: boft_n_butterfly_factor={m} needs an even block size and a block count divisible by "
        f"2^{m - 1}={2 ** (m - 1)}, but 'blk.layer' (the space) has block size {b} and {n} blocks; "
        f"butterfly factors this layer can hold with block size {b}: {fits}; block sizes that allow "
        f"{m} factors here: {sizes}"
    )


@pytest.mark.parametrize("d, b, m", [(24, 4, 3), (24, 3, 2), (4, 4, 2), (48, 6, 5), (40, 2, 4), (36, 4, 2)])
def test_check_butterfly_explains_what_fits(d, b, m):
    with pytest.raises(la.AdapterConfigError) as exc:
        check_butterfly(d, b, m, "blk.layer", "the space")
    assert _message(exc) == _fits(d, b, m)


def test_check_butterfly_written_out():
    with pytest.raises(la.AdapterConfigError) as exc:
        check_butterfly(24, 4, 3, "x", "w")
    assert _message(exc) == (
        "boft: boft_n_butterfly_factor=3 needs an even block size and a block count divisible by 2^2=4, but 'x' (w) "
        "has block size 4 and 6 blocks; butterfly factors this layer can hold with block size 4: [1, 2]; block "
        "sizes that allow 3 factors here: [2, 6]"
    )


@pytest.mark.parametrize("d, b, m", [(9, 3, 1), (7, 7, 1), (8, 4, 2), (16, 2, 4), (32, 4, 4), (24, 6, 3), (12, 6, 2)])
def test_check_butterfly_accepts_what_fits(d, b, m):
    assert check_butterfly(d, b, m, "x", "w") is None


# --- layer construction --------------------------------------------------------------------------------------


def test_conv_size_refusal_names_the_flattened_kernel():
    with pytest.raises(la.AdapterConfigError) as exc:
        _layer(nn.Conv2d(4, 4, 3, groups=2), boft_block_size=4)
    assert _message(exc) == (
        "boft: boft_block_size=4 does not divide flattened kernel size 18 (in_channels/groups=2 × 3×3) of "
        "'blk.layer'; valid boft_block_size values for this layer: [2, 3, 6, 9, 18]"
    )


@pytest.mark.parametrize(
    "kw, b, n",
    [
        (dict(boft_block_size=24), 24, 1),
        (dict(boft_block_size=0, boft_block_num=1), 24, 1),
        (dict(boft_block_size=0, boft_block_num=12), 2, 12),
        (dict(boft_block_size=2), 2, 12),
    ],
)
def test_layer_sizes_at_the_edges_are_accepted(kw, b, n):
    layer = _layer(nn.Linear(24, 8), **kw)
    assert (layer.block_size, layer.block_num, layer.d, layer.m) == (b, n, 24, 1)
    assert layer.boft_R.shape == (1, n, b, b)


def test_linear_layer_attributes_and_identity_init():
    base = nn.Linear(32, 5).double()
    layer = _layer(base, boft_block_size=0, boft_block_num=4, boft_n_butterfly_factor=3, boft_dropout=0.25)
    assert (layer.kind, layer.d, layer.block_size, layer.block_num, layer.m) == ("linear", 32, 8, 4, 3)
    assert (layer.axis, layer.layouts) == butterfly_layouts(3, 4, 8)
    assert layer.dropout_p == 0.25 and type(layer.dropout_p) is float
    assert layer.boft_R.dtype == F64 and layer.boft_s.dtype == F64
    assert torch.equal(layer.boft_R, torch.zeros(3, 4, 8, 8, dtype=F64))
    assert torch.equal(layer.boft_s, torch.ones(5, 1, dtype=F64))
    assert layer.boft_R.requires_grad and layer.boft_s.requires_grad
    assert layer.merge_rows_idx is None and layer.merge_rows is None and layer.merged is False
    assert layer.extra_repr() == "linear, block_size=8, block_num=4, m=3, merged=False"
    assert type(_layer(nn.Linear(8, 2), boft_dropout=0).dropout_p) is float


def test_conv_layer_scale_is_a_row_and_half_bases_get_fp32():
    layer = _layer(nn.Conv2d(4, 6, 2).to(torch.bfloat16), boft_block_size=8, boft_n_butterfly_factor=2)
    assert (layer.kind, layer.d, layer.block_size, layer.block_num) == ("conv2d", 16, 8, 2)
    assert layer.boft_s.shape == (1, 6) and layer.boft_R.shape == (2, 2, 8, 8)
    assert layer.boft_R.dtype == torch.float32 and layer.boft_s.dtype == torch.float32
    assert layer.extra_repr() == "conv2d, block_size=8, block_num=2, m=2, merged=False"


def test_meta_base_builds_meta_parameters():
    for init in (True, False):
        layer = _layer(nn.Linear(8, 4, device="meta"), boft_block_size=4, init_weights=init)
        assert layer.boft_R.device.type == "meta" and layer.boft_s.device.type == "meta"


def test_init_weights_false_draws_r_then_s_from_the_seeded_cpu_generator():
    base = nn.Linear(16, 6).double()
    torch.manual_seed(7)
    layer = _layer(base, boft_block_size=4, boft_n_butterfly_factor=2, init_weights=False)
    torch.manual_seed(7)
    r = torch.empty(2, 4, 4, 4, dtype=F64).normal_(0.0, 0.1)
    s = torch.empty(6, 1, dtype=F64).normal_(1.0, 0.1)
    assert torch.equal(layer.boft_R.detach(), r)
    assert torch.equal(layer.boft_s.detach(), s)


# --- rotation ------------------------------------------------------------------------------------------------


def test_factor_blocks_are_exact_cayley_blocks_in_the_asked_dtype():
    layer = _layer(nn.Linear(16, 3), boft_block_size=4, boft_n_butterfly_factor=2)
    _randomize(layer)
    raw = layer.boft_R.detach().double()
    q64 = layer.factor_blocks(dtype=F64)
    assert len(q64) == 2 and all(q.dtype == F64 and q.shape == (4, 4, 4) for q in q64)
    for i in range(2):
        assert torch.allclose(q64[i], _cayley(raw[i]), atol=1e-12, rtol=0)
    q32 = layer.factor_blocks()
    assert all(q.dtype == torch.float32 for q in q32)
    for i in range(2):
        assert torch.allclose(q32[i].double(), _cayley(raw[i]), atol=1e-5, rtol=0)
    assert not torch.allclose(q64[0], torch.eye(4, dtype=F64).expand(4, 4, 4), atol=0.05)


@pytest.mark.parametrize("p, k", [(0.5, 2), (0.25, 1), (0.74, 2)])
def test_factor_blocks_dropout_replaces_k_blocks_of_exactly_one_factor(p, k):
    layer = _layer(nn.Linear(16, 3).double(), boft_block_size=4, boft_n_butterfly_factor=3, boft_dropout=p)
    _randomize(layer)
    full = layer.factor_blocks()
    eye = torch.eye(4, dtype=F64)
    chosen = set()
    torch.manual_seed(0)
    for _ in range(40):
        q = layer.factor_blocks(dropout=True)
        changed = [i for i in range(3) if not torch.equal(q[i], full[i])]
        assert len(changed) == 1
        i = changed[0]
        chosen.add(i)
        dropped = [j for j in range(4) if torch.equal(q[i][j], eye)]
        kept = [j for j in range(4) if torch.equal(q[i][j], full[i][j])]
        assert len(dropped) == k and sorted(dropped + kept) == [0, 1, 2, 3]
    assert chosen == {0, 1, 2}


@pytest.mark.parametrize("m, n, b", [(1, 3, 4), (2, 4, 2), (3, 4, 6), (4, 8, 2)])
def test_rotate_is_x_times_r_and_its_transpose(m, n, b):
    layer = _layer(nn.Linear(n * b, 3).double(), boft_block_size=b, boft_n_butterfly_factor=m)
    _randomize(layer, seed=m)
    blocks = layer.factor_blocks()
    r = _dense([_cayley(layer.boft_R.detach()[i]) for i in range(m)])
    x = torch.randn(5, n * b, dtype=F64, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(layer.rotate(x, blocks), x @ r, atol=1e-12, rtol=0)
    assert torch.allclose(layer.rotate(x, blocks, transpose=True), x @ r.T, atol=1e-12, rtol=0)
    assert torch.allclose(butterfly_matrix(blocks, b), r, atol=1e-12, rtol=0)


# --- forward and gradients -----------------------------------------------------------------------------------


def _reference_linear(layer: BOFTLayer, base: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    r = _dense([_cayley(layer.boft_R[i]) for i in range(layer.m)])
    y = (x @ r @ base.weight.T) * layer.boft_s.reshape(-1)
    return y if base.bias is None else y + base.bias


def _grads(out: torch.Tensor, tensors: list[torch.Tensor], seed: int = 3) -> list[torch.Tensor]:
    gy = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(seed))
    return list(torch.autograd.grad(out, tensors, gy))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("m, tokens", [(1, 3), (2, 3), (2, 40), (3, 40)])
def test_linear_forward_and_gradients_match_the_dense_formula(m, tokens, bias):
    base = nn.Linear(16, 6, bias=bias).double()
    base.weight.requires_grad_(False)
    layer = _layer(base, boft_block_size=2 if m == 3 else 4, boft_n_butterfly_factor=m)
    _randomize(layer, seed=m + tokens)
    x = torch.randn(tokens, 16, dtype=F64, generator=torch.Generator().manual_seed(2), requires_grad=True)
    params = [layer.boft_R, layer.boft_s, x] + ([base.bias] if bias else [])
    out = layer.adapted_forward(base, x)
    ref = _reference_linear(layer, base, x)
    assert out.shape == (tokens, 6) and out.dtype == F64
    assert torch.allclose(out, ref, atol=1e-12, rtol=0)
    for got, want in zip(_grads(out, params), _grads(ref, params)):
        assert torch.allclose(got, want, atol=1e-10, rtol=0)


def test_linear_forward_on_a_bf16_base_returns_bf16():
    base = nn.Linear(16, 6).to(torch.bfloat16)
    layer = _layer(base, boft_block_size=4, boft_n_butterfly_factor=2)
    _randomize(layer, std=0.2)
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    out = layer.adapted_forward(base, x)
    assert out.dtype == torch.bfloat16
    with torch.no_grad():
        r = _dense([_cayley(layer.boft_R[i].double()) for i in range(2)])
        ref = (x.double() @ r @ base.weight.double().T) * layer.boft_s.double().reshape(-1) + base.bias.double()
    assert torch.allclose(out.double(), ref, atol=0.1, rtol=0.02)


@pytest.mark.parametrize("bias", [True, False])
def test_conv_forward_and_gradients_match_the_dense_formula(bias):
    conv = nn.Conv2d(8, 6, 2, stride=2, padding=1, dilation=2, groups=2, bias=bias).double()
    conv.weight.requires_grad_(False)
    layer = _layer(conv, boft_block_size=4, boft_n_butterfly_factor=2)  # d = 4·2·2 = 16: 4 blocks of 4
    _randomize(layer)
    x = torch.randn(2, 8, 7, 7, dtype=F64, generator=torch.Generator().manual_seed(4), requires_grad=True)
    out = layer.adapted_forward(conv, x)
    r = _dense([_cayley(layer.boft_R[i]) for i in range(2)])
    w = ((conv.weight.reshape(6, -1) @ r.T) * layer.boft_s.reshape(-1, 1)).reshape(conv.weight.shape)
    ref = F.conv2d(x, w, conv.bias, stride=2, padding=1, dilation=2, groups=2)
    assert torch.allclose(out, ref, atol=1e-12, rtol=0)
    params = [layer.boft_R, layer.boft_s, x]
    for got, want in zip(_grads(out, params), _grads(ref, params)):
        assert torch.allclose(got, want, atol=1e-10, rtol=0)


def test_conv_forward_on_a_bf16_base_returns_bf16():
    conv = nn.Conv2d(2, 3, 2).to(torch.bfloat16)
    layer = _layer(conv, boft_block_size=4)
    _randomize(layer, std=0.2)
    x = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    out = layer.adapted_forward(conv, x)
    assert out.dtype == torch.bfloat16
    with torch.no_grad():
        r = _dense([_cayley(layer.boft_R[0].double())])
        w = (conv.weight.double().reshape(3, -1) @ r.T * layer.boft_s.double().reshape(-1, 1)).reshape(3, 2, 2, 2)
        ref = F.conv2d(x.double(), w, conv.bias.double())
    assert torch.allclose(out.double(), ref, atol=0.1, rtol=0.02)


def _dropout_candidates(layer: BOFTLayer, base: nn.Linear, x: torch.Tensor, k: int) -> list[torch.Tensor]:
    raw = layer.boft_R.detach()
    outs = []
    for i in range(layer.m):
        for drop in itertools.combinations(range(layer.block_num), k):
            qs = [_cayley(raw[j]).clone() for j in range(layer.m)]
            for j in drop:
                qs[i][j] = torch.eye(layer.block_size, dtype=F64)
            outs.append((x @ _dense(qs) @ base.weight.T) * layer.boft_s.detach().reshape(-1) + base.bias)
    return outs


def test_forward_dropout_only_in_training_and_only_as_a_dropped_block():
    base = nn.Linear(8, 3).double().requires_grad_(False)
    layer = _layer(base, boft_block_size=2, boft_n_butterfly_factor=3, boft_dropout=0.5)  # N = 4: 2 dropped
    _randomize(layer)
    x = torch.randn(2, 8, dtype=F64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = _reference_linear(layer, base, x)
        layer.eval()
        assert torch.allclose(layer.adapted_forward(base, x), ref, atol=1e-12, rtol=0)
        layer.train()
        candidates = _dropout_candidates(layer, base, x, 2)
        torch.manual_seed(0)
        for _ in range(8):
            out = layer.adapted_forward(base, x)
            assert not torch.allclose(out, ref, atol=1e-6)
            assert any(torch.allclose(out, c, atol=1e-12, rtol=0) for c in candidates)
        layer.dropout_p = 0.0
        assert torch.allclose(layer.adapted_forward(base, x), ref, atol=1e-12, rtol=0)


def test_conv_forward_dropout_in_training():
    conv = nn.Conv2d(2, 3, 1).double().requires_grad_(False)  # d = 2, one block: p = 0.5 drops none
    layer = _layer(conv, boft_block_size=0, boft_block_num=1, boft_dropout=0.5)
    _randomize(layer)
    x = torch.randn(1, 2, 3, 3, dtype=F64)
    layer.train()
    with torch.no_grad():
        r = _cayley(layer.boft_R[0, 0])
        w = (conv.weight.reshape(3, 2) @ r.T * layer.boft_s.reshape(-1, 1)).reshape(3, 2, 1, 1)
        assert torch.allclose(layer.adapted_forward(conv, x), F.conv2d(x, w, conv.bias), atol=1e-12, rtol=0)
    conv4 = nn.Conv2d(4, 3, 1).double().requires_grad_(False)
    layer4 = _layer(conv4, boft_block_size=2, boft_dropout=0.5)  # one of two blocks dropped each time
    _randomize(layer4)
    x4 = torch.randn(1, 4, 3, 3, dtype=F64)
    layer4.train()
    with torch.no_grad():
        q = _cayley(layer4.boft_R[0])
        outs = []
        for j in range(2):
            qq = q.clone()
            qq[j] = torch.eye(2, dtype=F64)
            w = (conv4.weight.reshape(3, 4) @ torch.block_diag(*qq).T * layer4.boft_s.reshape(-1, 1)).reshape(
                3, 4, 1, 1
            )
            outs.append(F.conv2d(x4, w, conv4.bias))
        for _ in range(4):
            out = layer4.adapted_forward(conv4, x4)
            assert any(torch.allclose(out, o, atol=1e-12, rtol=0) for o in outs)


# --- merge ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("safe", [False, True])
def test_linear_merge_is_diag_s_w_rt_and_unmerge_restores(safe):
    base = nn.Linear(16, 5)
    w0, b0 = base.weight.detach().clone(), base.bias.detach().clone()
    layer = _layer(base, boft_block_size=4, boft_n_butterfly_factor=2)
    _randomize(layer)
    with torch.no_grad():
        r = _dense([_cayley(layer.boft_R[i].double()) for i in range(2)])
        want = (layer.boft_s.double().reshape(-1, 1) * (w0.double() @ r.T)).float()
    layer.merge(base, safe=safe)
    assert layer.merged is True
    assert torch.equal(base.weight.detach(), want)
    assert torch.equal(base.bias.detach(), b0)
    assert layer.merge_rows_idx is None and layer.merge_rows is None
    layer.unmerge(base)
    assert layer.merged is False
    assert torch.allclose(base.weight.detach(), w0, atol=1e-6, rtol=0)


def test_conv_merge_scales_output_channels_and_unmerge_restores():
    conv = nn.Conv2d(2, 3, 2).double()
    w0 = conv.weight.detach().clone()
    layer = _layer(conv, boft_block_size=4, boft_n_butterfly_factor=2)
    _randomize(layer)
    with torch.no_grad():
        r = _dense([_cayley(layer.boft_R[i]) for i in range(2)])
        want = (layer.boft_s.reshape(-1, 1) * (w0.reshape(3, -1) @ r.T)).reshape(w0.shape)
    layer.merge(conv)
    assert torch.allclose(conv.weight.detach(), want, atol=1e-13, rtol=0)
    layer.unmerge(conv)
    assert torch.allclose(conv.weight.detach(), w0, atol=1e-13, rtol=0)


def test_unmerge_divides_by_the_scale_in_float64_for_lower_precision_parameters():
    # A float64 base with float32 adapter parameters: unmerge is diag(1/s)·W'·R with 1/s taken in float64, so it
    # is exact to float64 rounding (1/s taken in float32 would be off by ~1e-8).
    base = nn.Linear(8, 6).double()
    layer = _layer(base, boft_block_size=2, boft_n_butterfly_factor=2).float()
    _randomize(layer)
    layer.merge(base)
    w1 = base.weight.detach().clone()
    with torch.no_grad():
        r = _dense([_cayley(layer.boft_R[i].double()) for i in range(2)])
        want = (w1 / layer.boft_s.double().reshape(-1, 1)) @ r
    layer.unmerge(base)
    assert base.weight.dtype == F64
    assert torch.allclose(base.weight.detach(), want, atol=1e-14, rtol=0)


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_zero_scales_are_stashed_at_merge_and_put_back_at_unmerge(kind):
    base = nn.Linear(8, 4).double() if kind == "linear" else nn.Conv2d(2, 4, 2).double()
    w0 = base.weight.detach().clone()
    layer = _layer(base, boft_block_size=4)
    _randomize(layer)
    with torch.no_grad():
        layer.boft_s.view(-1)[1] = 0.0
        layer.boft_s.view(-1)[3] = 0.0
        layer.boft_s.view(-1)[2] = 1e-300  # tiny but invertible: not stashed
    layer.merge(base)
    assert layer.merge_rows_idx.tolist() == [1, 3]
    assert torch.equal(layer.merge_rows, w0[[1, 3]])
    assert torch.equal(base.weight[1], torch.zeros_like(w0[1])) and torch.equal(base.weight[3], torch.zeros_like(w0[3]))
    layer.unmerge(base)
    assert torch.equal(base.weight[[1, 3]], w0[[1, 3]])
    assert torch.allclose(base.weight[0], w0[0], atol=1e-13, rtol=0)
    assert torch.isfinite(base.weight).all()
    assert layer.merge_rows_idx is None and layer.merge_rows is None
    layer.merge(base)
    layer.forget_merge()
    assert layer.merge_rows_idx is None and layer.merge_rows is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_scales_below_the_weight_dtype_s_smallest_normal_are_stashed_too(dtype):
    """A subnormal scale leaves the merged row with a few bits (or none): it is kept like a zero scale. The
    smallest normal scale itself is divided back, to the dtype's rounding."""
    tiny = torch.finfo(dtype).tiny
    base = nn.Linear(8, 4).to(dtype)
    w0 = base.weight.detach().clone()
    layer = _layer(base, boft_block_size=4)
    _randomize(layer)
    layer.to(dtype)
    with torch.no_grad():
        layer.boft_s.view(-1)[1] = tiny / 4  # subnormal: stashed
        layer.boft_s.view(-1)[2] = -tiny / 2  # subnormal, negative: stashed
        layer.boft_s.view(-1)[3] = tiny * 2**20  # normal: divided back
    layer.merge(base)
    assert layer.merge_rows_idx.tolist() == [1, 2]
    assert torch.equal(layer.merge_rows, w0[[1, 2]])
    layer.unmerge(base)
    assert torch.equal(base.weight[[1, 2]], w0[[1, 2]])
    eps = torch.finfo(dtype).eps
    assert torch.allclose(base.weight[[0, 3]], w0[[0, 3]], atol=64 * eps, rtol=0)


def test_merge_safe_refuses_non_finite_and_leaves_the_weight():
    base = nn.Linear(8, 2)
    w0 = base.weight.detach().clone()
    layer = _layer(base, boft_block_size=4)
    with torch.no_grad():
        layer.boft_s[0] = float("inf")
    with pytest.raises(la.MergeError):
        layer.merge(base, safe=True)
    assert torch.equal(base.weight, w0) and layer.merged is False


# --- PEFT layout ---------------------------------------------------------------------------------------------


def test_peft_state_and_load_round_trip_with_cast():
    layer = _layer(nn.Linear(8, 3), boft_block_size=4, boft_n_butterfly_factor=2)
    _randomize(layer)
    state = layer.peft_state()
    assert set(state) == {"boft_R", "boft_s"}
    assert torch.equal(state["boft_R"], layer.boft_R.detach()) and torch.equal(state["boft_s"], layer.boft_s.detach())
    assert not state["boft_R"].requires_grad and not state["boft_s"].requires_grad
    other = _layer(nn.Linear(8, 3), boft_block_size=4, boft_n_butterfly_factor=2)
    new = {k: (v.double() * 2.0 + 0.1) for k, v in state.items()}
    other.load_peft_state(new)
    assert other.boft_R.dtype == torch.float32 and other.boft_s.dtype == torch.float32
    assert torch.equal(other.boft_R.detach(), new["boft_R"].float())
    assert torch.equal(other.boft_s.detach(), new["boft_s"].float())
    meta = _layer(nn.Linear(8, 3, device="meta"), boft_block_size=4, boft_n_butterfly_factor=2)
    meta.load_peft_state(state)
    assert meta.boft_R.device.type == "meta"
    with pytest.raises(KeyError):
        other.load_peft_state({"boft_R": state["boft_R"]})


def test_config_from_peft_defaults_and_nulls():
    assert BOFTMethod.config_from_peft({}) == BOFTConfig()
    assert BOFTConfig() == BOFTConfig(boft_block_size=4, boft_block_num=0, boft_n_butterfly_factor=1, boft_dropout=0.0)
    nulls = {
        "boft_block_size": None,
        "boft_block_num": 8,
        "boft_dropout": None,
        "bias": "all",
        "layers_to_transform": [],
        "layers_pattern": "",
    }
    assert BOFTMethod.config_from_peft(nulls) == BOFTConfig(boft_block_size=0, boft_block_num=8, bias="all")
    got = BOFTMethod.config_from_peft({"boft_block_size": 2, "boft_block_num": None, "target_modules": "q|v"})
    assert got == BOFTConfig(boft_block_size=2, target_modules="q|v")
    assert got.boft_dropout == 0.0 and got.init_weights is True and got.bias == "none"


def _tensors(*shapes: tuple[int, ...]) -> dict[str, torch.Tensor]:
    return {f"m{i}.boft_R": torch.zeros(s) for i, s in enumerate(shapes)}


def test_prepare_peft_load_takes_the_factor_count_of_the_tensors():
    cfg = BOFTConfig(boft_n_butterfly_factor=3)
    tensors = {
        **_tensors((1, 2, 4, 4), (1, 4, 4, 4)),
        "m0.boft_s": torch.zeros(2, 2, 2, 2),
        "x.boft_R": torch.zeros(5, 2),
    }
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got_cfg, got_tensors = BOFTMethod.prepare_peft_load(cfg, {}, tensors)
    assert got_cfg is cfg and got_tensors is tensors and cfg.boft_n_butterfly_factor == 1
    assert [str(w.message) for w in caught] == [
        "boft: the adapter config says boft_n_butterfly_factor=3 but its tensors hold 1 factor(s) (PEFT falls back "
        "to 1 without its CUDA extension); loading m=1"
    ]
    assert caught[0].category is UserWarning


@pytest.mark.parametrize(
    "m, shapes",
    [
        (2, [(2, 2, 4, 4), (2, 4, 2, 2)]),  # agrees: nothing to do
        (2, [(1, 2, 4, 4), (2, 2, 4, 4)]),  # disagreeing tensors: left to the shape check
        (2, []),  # no BOFT tensors
    ],
)
def test_prepare_peft_load_leaves_the_config_otherwise(m, shapes):
    cfg = BOFTConfig(boft_n_butterfly_factor=m)
    tensors = {**_tensors(*shapes), "a.boft_Rx": torch.zeros(1, 1, 1, 1), "a.boft_R.w": torch.zeros(3, 1, 1, 1)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got_cfg, got_tensors = BOFTMethod.prepare_peft_load(cfg, {}, tensors)
    assert got_cfg is cfg and got_tensors is tensors and cfg.boft_n_butterfly_factor == m
    assert caught == []


def test_scale_is_the_flat_per_output_vector():
    layer = _layer(nn.Conv2d(2, 3, 2), boft_block_size=4)
    _randomize(layer)
    assert torch.equal(layer._scale(), layer.boft_s.reshape(-1)) and layer._scale().shape == (3,)
    assert math.isclose(layer._scale()[2].item(), layer.boft_s[0, 2].item())


# --- a quantized base (the library's stand-in over a layer with its own kernel) ------------------------------


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("grad", [False, True])  # False: the layer's own kernel; True: F.linear on the weight
def test_quantized_linear_rotates_the_input_and_scales_the_unbiased_output(bias, grad):
    real, view = quantized(16, 6, F64, bias=bias)
    layer = _layer(real, boft_block_size=4, boft_n_butterfly_factor=2)
    _randomize(layer)
    x = torch.randn(3, 16, dtype=F64, generator=torch.Generator().manual_seed(6)).requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        out = layer.adapted_forward(view, x)
    assert real.calls == (0 if grad else 1)
    ref = _reference_linear(layer, real, x)
    assert out.dtype == F64 and torch.allclose(out, ref, atol=1e-12, rtol=0)
    if not grad:
        return
    params = [layer.boft_R, layer.boft_s, x]
    for got, want in zip(_grads(out, params), _grads(ref, params)):
        assert torch.allclose(got, want, atol=1e-10, rtol=0)


def test_quantized_bf16_linear_runs_in_its_own_dtype():
    real, view = quantized(16, 6, torch.bfloat16)
    layer = _layer(real, boft_block_size=4, boft_n_butterfly_factor=2)
    _randomize(layer, std=0.2)
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    with torch.no_grad():
        out = layer.adapted_forward(view, x)
    assert out.dtype == torch.bfloat16 and real.calls == 1
    with torch.no_grad():
        r = _dense([_cayley(layer.boft_R[i].double()) for i in range(2)])
        ref = (x.double() @ r @ real.weight.double().T) * layer.boft_s.double().reshape(-1) + real.bias.double()
    assert torch.allclose(out.double(), ref, atol=0.1, rtol=0.02)


# --- meta device: every tensor a forward builds lives on the layer's device ----------------------------------


@pytest.mark.parametrize("m", [1, 2])
def test_meta_training_forward_with_dropout_stays_on_meta(m):
    base = nn.Linear(16, 4, device="meta")
    layer = _layer(base, boft_block_size=4, boft_n_butterfly_factor=m, boft_dropout=0.5).train()
    q = layer.factor_blocks(dropout=True)
    assert len(q) == m and all(t.device.type == "meta" and t.shape == (4, 4, 4) for t in q)
    for tokens in (2, 40):
        out = layer.adapted_forward(base, torch.empty(tokens, 16, device="meta"))
        assert out.device.type == "meta" and out.shape == (tokens, 4)
    conv = nn.Conv2d(4, 3, 2, device="meta")
    layer_c = _layer(conv, boft_block_size=4, boft_n_butterfly_factor=m, boft_dropout=0.5).train()
    out = layer_c.adapted_forward(conv, torch.empty(1, 4, 5, 5, device="meta"))
    assert out.device.type == "meta" and out.shape == (1, 3, 4, 4)


def test_merge_without_safe_writes_whatever_it_computes():
    base = nn.Linear(8, 2)
    layer = _layer(base, boft_block_size=4)
    with torch.no_grad():
        layer.boft_s[0] = float("inf")
    layer.merge(base)  # safe defaults to False: no check before the write
    assert layer.merged is True and not torch.isfinite(base.weight[0]).all() and torch.isfinite(base.weight[1]).all()


@pytest.mark.parametrize("kind", ["linear", "conv", "conv_fp32_base"])
def test_bf16_parameters_rotate_with_blocks_rounded_to_bf16(kind):
    """BOFT parameters in bfloat16 (``adapter_dtype``): each Cayley block is computed in float32 and rounded to
    bfloat16, the parameters' dtype, before it rotates anything; the rotation rounds once per product. Linear
    (2 tokens: the input is rotated) and Conv2d (the weight is rotated), bit for bit."""
    base = (nn.Linear(16, 6) if kind == "linear" else nn.Conv2d(4, 3, 2)).to(
        torch.float32 if kind == "conv_fp32_base" else torch.bfloat16
    )
    layer = _layer(base, boft_block_size=4)
    _randomize(layer, std=0.3)
    layer.to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, generator=g) if kind == "linear" else torch.randn(2, 4, 3, 3, generator=g)
    x = x.to(base.weight.dtype)
    with torch.no_grad():
        y = layer.adapted_forward(base, x)
        blocks = _cayley(layer.boft_R[0].to(F64)).to(torch.bfloat16)  # (N, b, b)
        r = torch.block_diag(*blocks.unbind(0)).to(F64)
        s = layer.boft_s.reshape(-1)
        if kind == "linear":
            z = F.linear((x.to(F64) @ r).to(torch.bfloat16), base.weight)
            want = torch.addcmul(base.bias, z, s)
        else:
            w = base.weight
            w_rot = (w.reshape(3, -1).to(torch.bfloat16).to(F64) @ r.T).to(torch.bfloat16)
            want = F.conv2d(x, (w_rot * s[:, None]).reshape(w.shape).to(w.dtype), base.bias)
    assert y.dtype == base.weight.dtype and torch.equal(y, want)


def test_unmerge_without_the_kept_rows_leaves_rows_with_no_finite_inverse_scale_at_zero():
    """Once ``forget_merge`` dropped the rows a merge kept, unmerge leaves a row whose 1/s overflows (s = 1e-310, a
    float64 subnormal: its merged row holds the subnormal remains s·W·Rᵀ) at exactly 0, and divides the others
    back."""
    base = nn.Linear(8, 4).double()
    w0 = base.weight.detach().clone()
    layer = _layer(base, boft_block_size=4).double()
    _randomize(layer)
    with torch.no_grad():
        layer.boft_s.view(-1)[2] = 1e-310
    layer.merge(base)
    assert layer.merge_rows_idx.tolist() == [2]
    assert base.weight[2].abs().max() > 0  # the remains are not all flushed to 0
    layer.forget_merge()
    layer.unmerge(base)
    assert torch.equal(base.weight[2], torch.zeros(8, dtype=F64))
    assert torch.allclose(base.weight[[0, 1, 3]], w0[[0, 1, 3]], atol=1e-13, rtol=0)
