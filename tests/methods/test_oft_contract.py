"""OFT pinned function by function against truths written here: the skew matrix built by loops, the exact
Cayley map by a matrix inverse, PEFT's Neumann loop, the COFT ball, dense block-diagonal products (with autograd
through them for gradients), exact error and warning messages, exact PEFT config dicts and seeded draws."""

from __future__ import annotations

import contextlib
import math
import signal
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightning_adapters as la
from lightning_adapters.methods.oft import (
    OFTConfig,
    OFTLayer,
    OFTMethod,
    cayley_neumann,
    coft_project,
    neumann_coefficients,
    peft_nearest_divisor,
    resolve_blocks,
    skew_gather,
    skew_symmetric,
)
from tests.helpers import Wrap
from tests.methods.test_orthogonal_contract import quantized

F64 = torch.float64


# --- independent references ----------------------------------------------------------------------------------


def _skew(u: torch.Tensor, b: int) -> torch.Tensor:
    """Q (n, b, b) with the strictly-upper entries u (n, b(b−1)/2) in row-major order above, −u below."""
    rows = []
    for vec in u:
        q = [[torch.zeros((), dtype=u.dtype) for _ in range(b)] for _ in range(b)]
        k = 0
        for i in range(b):
            for j in range(i + 1, b):
                q[i][j], q[j][i] = vec[k], -vec[k]
                k += 1
        rows.append(torch.stack([torch.stack(r) for r in q]))
    return torch.stack(rows)


def _exact(q: torch.Tensor) -> torch.Tensor:
    eye = torch.eye(q.shape[-1], dtype=q.dtype).expand_as(q)
    return (eye - q) @ torch.linalg.inv(eye + q)


def _neumann(q: torch.Tensor, terms: int) -> torch.Tensor:
    """PEFT 0.21's loop: I + 2Q (+ 2Q² + 2Q³ … + 2Q^{n−2} + Q^{n−1} when terms > 2)."""
    r = torch.eye(q.shape[-1], dtype=q.dtype).expand_as(q).clone()
    if terms > 1:
        r = r + 2.0 * q
        if terms > 2:
            power = q @ q
            r = r + 2.0 * power
            for _ in range(3, terms - 1):
                power = power @ q
                r = r + 2.0 * power
            r = r + power @ q
    return r


def _rot(u: torch.Tensor, b: int, neumann: bool = True, terms: int = 5) -> torch.Tensor:
    q = _skew(u, b)
    return _neumann(q, terms) if neumann else _exact(q)


def _layer(base: nn.Module, name: str = "blk.layer", **kw) -> OFTLayer:
    return OFTLayer(base, OFTConfig(**kw), name)


def _randomize(layer: OFTLayer, seed: int = 0, std: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.oft_R.copy_(torch.randn(layer.oft_R.shape, generator=g, dtype=F64) * std)


def _blocks(layer: OFTLayer) -> torch.Tensor:
    rot = _rot(layer.oft_R.double(), layer.block_size, layer.use_cayley_neumann, layer.num_terms)
    return rot.expand(layer.r, -1, -1) if layer.block_share else rot


def _grads(out: torch.Tensor, tensors: list[torch.Tensor], seed: int = 3) -> list[torch.Tensor]:
    gy = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(seed))
    return list(torch.autograd.grad(out, tensors, gy))


# --- config --------------------------------------------------------------------------------------------------


def test_config_accepts_every_edge_and_runs_the_shared_checks():
    cfg = OFTConfig(
        r=4,
        oft_block_size=0,
        num_cayley_neumann_terms=2,
        eps=1e-9,
        module_dropout=0.0,
        use_cayley_neumann=False,
        block_share=True,
        coft=True,
        init_weights=False,
        auto_adjust=True,
        bias="oft_only",
        target_modules=("q",),
    )
    assert cfg.target_modules == ["q"]  # the shared __post_init__ ran
    assert OFTConfig(bias="all", module_dropout=0.99, eps=5).bias == "all"
    with pytest.raises(la.AdapterConfigError, match="adapter_dtype 'int4' is not one of"):
        OFTConfig(adapter_dtype="int4")


# --- pure functions ------------------------------------------------------------------------------------------


def _nearest(d: int, value: int) -> int:
    if value >= d:
        return d
    divs = [k for k in range(1, d + 1) if d % k == 0]
    return min(divs, key=lambda k: (abs(k - value), k))


@contextlib.contextmanager
def _deadline(seconds: float):
    """Fail (instead of hanging) if the block runs longer than ``seconds`` of wall time."""

    def _raise(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_peft_nearest_divisor_against_brute_force():
    with _deadline(5.0):
        for d in range(1, 41):
            for value in range(1, 2 * d + 2):
                assert peft_nearest_divisor(d, value) == _nearest(d, value), (d, value)


def test_peft_nearest_divisor_written_out():
    with _deadline(2.0):
        assert [peft_nearest_divisor(24, v) for v in (5, 7, 10, 11, 23, 24, 30)] == [4, 6, 8, 12, 24, 24, 24]
        assert [peft_nearest_divisor(7, v) for v in (1, 2, 3, 4, 5, 6)] == [1, 1, 1, 1, 7, 7]


def test_skew_gather_written_out():
    index, sign = skew_gather(3)
    assert index.dtype == torch.long and sign.dtype == torch.float32
    assert index.tolist() == [0, 0, 1, 0, 0, 2, 1, 2, 0]
    assert sign.tolist() == [0.0, 1.0, 1.0, -1.0, 0.0, 1.0, -1.0, -1.0, 0.0]
    index2, sign2 = skew_gather(2)
    assert index2.tolist() == [0, 0, 0, 0] and sign2.tolist() == [0.0, 1.0, -1.0, 0.0]
    index1, sign1 = skew_gather(1)
    assert index1.tolist() == [0] and sign1.tolist() == [0.0]


def test_skew_gather_on_the_asked_device():
    index, sign = skew_gather(4, torch.device("meta"))
    assert index.device.type == "meta" and sign.device.type == "meta" and index.shape == sign.shape == (16,)


@pytest.mark.parametrize("b", [2, 3, 5])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_skew_symmetric_is_u_minus_ut_with_its_gradient(b, dtype):
    u = torch.randn(3, b * (b - 1) // 2, dtype=dtype, generator=torch.Generator().manual_seed(b), requires_grad=True)
    index, sign = skew_gather(b)
    q = skew_symmetric(u, index, sign, b)
    ref = _skew(u, b)
    assert q.shape == (3, b, b) and q.dtype == dtype
    assert torch.equal(q, ref)
    got, want = _grads(q, [u])[0], _grads(ref, [u])[0]
    assert torch.allclose(got, want, atol=1e-6, rtol=0)


def test_skew_symmetric_of_one_feature_blocks_is_zero_on_the_graph():
    u = torch.zeros(4, 0, requires_grad=True)
    index, sign = skew_gather(1)
    q = skew_symmetric(u, index, sign, 1)
    assert q.shape == (4, 1, 1) and torch.equal(q, torch.zeros(4, 1, 1)) and q.requires_grad
    q.sum().backward()
    assert u.grad.shape == (4, 0)


def test_neumann_coefficients_are_pefts():
    assert neumann_coefficients(0) == [] and neumann_coefficients(1) == []
    assert neumann_coefficients(2) == [2.0]
    assert neumann_coefficients(3) == [2.0, 2.0, 1.0]
    assert neumann_coefficients(4) == [2.0, 2.0, 1.0]
    assert neumann_coefficients(5) == [2.0, 2.0, 2.0, 1.0]
    assert neumann_coefficients(7) == [2.0, 2.0, 2.0, 2.0, 2.0, 1.0]


@pytest.mark.parametrize("terms", [2, 3, 4, 5, 6, 8])
def test_cayley_neumann_is_pefts_loop_with_its_gradient(terms):
    u = (torch.randn(2, 6, dtype=F64, generator=torch.Generator().manual_seed(terms)) * 0.3).requires_grad_()
    q = _skew(u, 4)
    r = cayley_neumann(q, terms)
    ref = _neumann(q, terms)
    assert r.shape == (2, 4, 4) and r.dtype == F64
    assert torch.allclose(r, ref, atol=1e-13, rtol=0)
    got, want = _grads(r, [u])[0], _grads(ref, [u])[0]
    assert torch.allclose(got, want, atol=1e-12, rtol=0)


def test_coft_project_scales_only_blocks_outside_the_ball():
    eps = 0.5
    radius = eps / math.sqrt(5)
    u = torch.tensor(
        [[3.0, 4.0, 0.0], [0.01, 0.02, 0.0], [0.0, 0.0, 0.0], [radius / math.sqrt(2.0), 0.0, 0.0], [0.0, 0.3, 0.0]],
        dtype=F64,
    )
    out = coft_project(u, eps)
    for row, norm in ((0, 5.0 * math.sqrt(2.0)), (4, 0.3 * math.sqrt(2.0))):  # ||U − Uᵀ||_F = √2 ||u||
        assert torch.allclose(out[row], u[row] * (radius / norm), atol=1e-15, rtol=0)
        assert math.isclose(float(_skew(out[row : row + 1], 3).norm()), radius, rel_tol=1e-12)
    assert torch.equal(out[1:4], u[1:4])
    one = coft_project(torch.tensor([[1.0, 0.0, 0.0]], dtype=F64), 0.1)  # radius 0.1 for a single block
    assert torch.allclose(one, torch.tensor([[0.1 / math.sqrt(2.0), 0.0, 0.0]], dtype=F64), atol=1e-15, rtol=0)


# --- block sizes ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, rb",
    [
        (dict(oft_block_size=6), (4, 6)),
        (dict(oft_block_size=24), (1, 24)),
        (dict(oft_block_size=0, r=3), (3, 8)),
        (dict(oft_block_size=0, r=12), (12, 2)),
        (dict(oft_block_size=0, r=1), (1, 24)),
    ],
)
def test_resolve_blocks_exact_fits(kw, rb):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_blocks(OFTConfig(**kw), 24, "in_features=24", "x") == rb


@pytest.mark.parametrize(
    "kw, rb, msg",
    [
        (dict(oft_block_size=5), (6, 4), "oft: oft_block_size=5 does not divide in_features=24 of 'x'; using 4"),
        (dict(oft_block_size=50), (1, 24), "oft: oft_block_size=50 does not divide in_features=24 of 'x'; using 24"),
        (dict(oft_block_size=0, r=11), (12, 2), "oft: r=11 does not divide in_features=24 of 'x'; using 12"),
        (dict(oft_block_size=0, r=7), (6, 4), "oft: r=7 does not divide in_features=24 of 'x'; using 6"),
        (dict(oft_block_size=0, r=40), (24, 1), "oft: r=40 does not divide in_features=24 of 'x'; using 24"),
    ],
)
def test_auto_adjust_takes_pefts_nearest_divisor_with_a_warning(kw, rb, msg):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert resolve_blocks(OFTConfig(auto_adjust=True, **kw), 24, "in_features=24", "x") == rb
    assert [str(w.message) for w in caught] == [msg + " (PEFT's nearest divisor)"]
    assert caught[0].category is UserWarning


def test_auto_adjust_keeps_blocks_of_one_feature_as_peft_does():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_blocks(OFTConfig(auto_adjust=True, oft_block_size=1), 6, "w", "x") == (6, 1)
        assert resolve_blocks(OFTConfig(auto_adjust=True, oft_block_size=0, r=6), 6, "w", "x") == (6, 1)
    layer = _layer(nn.Linear(3, 2).double(), oft_block_size=1, auto_adjust=True)
    assert layer.oft_R.shape == (3, 0)
    x = torch.randn(2, 3, dtype=F64)
    base = nn.Linear(3, 2).double()
    assert torch.allclose(layer.adapted_forward(base, x), base(x), atol=1e-14, rtol=0)


def test_conv_size_refusal_names_the_flattened_kernel():
    with pytest.raises(la.AdapterConfigError) as exc:
        _layer(nn.Conv2d(4, 4, 3, groups=2), oft_block_size=4)
    assert str(exc.value) == (
        "oft: oft_block_size=4 does not divide flattened kernel size 18 (in_channels/groups=2 × 3×3) of "
        "'blk.layer'; valid oft_block_size values for this layer: [2, 3, 6, 9, 18] (or set auto_adjust=True to "
        "take the nearest divisor, as PEFT does silently)"
    )


# --- layer construction --------------------------------------------------------------------------------------


def test_layer_attributes_and_identity_init():
    base = nn.Linear(12, 5).double()
    layer = _layer(base, oft_block_size=0, r=3, num_cayley_neumann_terms=7, coft=True, eps=1, module_dropout=0.5)
    assert (layer.kind, layer.d, layer.r, layer.block_size) == ("linear", 12, 3, 4)
    assert (layer.block_share, layer.use_cayley_neumann, layer.num_terms, layer.coft) == (False, True, 7, True)
    assert layer.eps == 1.0 and type(layer.eps) is float
    assert layer.module_dropout == 0.5 and type(layer.module_dropout) is float
    assert type(_layer(nn.Linear(4, 2), oft_block_size=2, module_dropout=0).module_dropout) is float
    assert layer.oft_R.dtype == F64 and layer.oft_R.requires_grad
    assert torch.equal(layer.oft_R, torch.zeros(3, 6, dtype=F64))
    index, sign = skew_gather(4)
    assert torch.equal(layer.skew_index, index) and torch.equal(layer.skew_sign, sign)
    assert dict(layer.named_buffers()).keys() == {"skew_index", "skew_sign"}
    assert set(layer.state_dict()) == {"oft_R"}  # the gather tables are not saved
    assert layer.merged is False


def test_block_share_and_half_bases():
    layer = _layer(nn.Linear(12, 5).to(torch.bfloat16), oft_block_size=3, block_share=True)
    assert (layer.r, layer.block_size, layer.block_share) == (4, 3, True)
    assert layer.oft_R.shape == (1, 3) and layer.oft_R.dtype == torch.float32
    emb = _layer(nn.Embedding(7, 6).half(), oft_block_size=2)
    assert (emb.kind, emb.d, emb.r) == ("embedding", 6, 3) and emb.oft_R.dtype == torch.float32


def test_meta_base_builds_meta_tensors():
    for init in (True, False):
        layer = _layer(nn.Linear(8, 4, device="meta"), oft_block_size=4, init_weights=init)
        assert layer.oft_R.device.type == "meta"
        assert layer.skew_index.device.type == "meta" and layer.skew_sign.device.type == "meta"


def test_init_weights_false_draws_from_the_seeded_cpu_generator():
    base = nn.Linear(12, 3).double()
    torch.manual_seed(11)
    layer = _layer(base, oft_block_size=4, init_weights=False)
    torch.manual_seed(11)
    assert torch.equal(layer.oft_R.detach(), torch.empty(3, 6, dtype=F64).normal_(0.0, 0.1))


@pytest.mark.parametrize(
    "kw, text",
    [
        (dict(oft_block_size=4), "linear, r=3, block_size=4, neumann(5), merged=False"),
        (
            dict(oft_block_size=0, r=2, use_cayley_neumann=False, block_share=True),
            "linear, r=2, block_size=6, cayley, block_share, merged=False",
        ),
        (
            dict(oft_block_size=6, coft=True, eps=2.5e-4, num_cayley_neumann_terms=3),
            "linear, r=2, block_size=6, neumann(3), coft(eps=0.00025), merged=False",
        ),
    ],
)
def test_extra_repr(kw, text):
    assert _layer(nn.Linear(12, 2), **kw).extra_repr() == text


# --- rotation ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("neumann, terms", [(True, 5), (True, 3), (True, 2), (False, 5)])
@pytest.mark.parametrize("share", [False, True])
def test_rotation_blocks_are_the_maps_of_the_stored_entries(neumann, terms, share):
    layer = _layer(
        nn.Linear(12, 2),
        oft_block_size=4,
        use_cayley_neumann=neumann,
        num_cayley_neumann_terms=terms,
        block_share=share,
    )
    _randomize(layer)
    want = _blocks(layer)
    got64 = layer.rotation_blocks(dtype=F64)
    assert got64.dtype == F64 and got64.shape == (3, 4, 4)
    assert torch.allclose(got64, want, atol=1e-13, rtol=0)
    got32 = layer.rotation_blocks()
    assert got32.dtype == torch.float32 and torch.allclose(got32.double(), want, atol=1e-5, rtol=0)


def test_rotation_blocks_dropout_replaces_exactly_floor_p_r_blocks():
    layer = _layer(nn.Linear(16, 2).double(), oft_block_size=2, module_dropout=0.4)  # r = 8: 3 dropped
    _randomize(layer)
    full = layer.rotation_blocks()
    eye = torch.eye(2, dtype=F64)
    seen = set()
    torch.manual_seed(0)
    for _ in range(20):
        rot = layer.rotation_blocks(dropout=True)
        dropped = [j for j in range(8) if torch.equal(rot[j], eye)]
        kept = [j for j in range(8) if torch.equal(rot[j], full[j])]
        assert len(dropped) == 3 and sorted(dropped + kept) == list(range(8))
        seen.update(dropped)
    assert seen == set(range(8))
    assert torch.equal(layer.rotation_blocks(dropout=False), full)


def test_coft_uses_the_projected_entries_with_a_straight_through_gradient():
    layer = _layer(nn.Linear(8, 2).double(), oft_block_size=4, coft=True, eps=0.05)
    _randomize(layer, std=1.0)
    stored = layer.oft_R.detach().clone()
    eff = layer.effective_params()
    projected = coft_project(stored, 0.05)
    assert torch.allclose(eff, projected, atol=1e-15, rtol=0)
    assert not torch.allclose(projected, stored)
    gy = torch.randn(eff.shape, dtype=F64)
    (g,) = torch.autograd.grad(eff, [layer.oft_R], gy)
    assert torch.equal(g, gy)
    assert torch.equal(layer.oft_R.detach(), stored)  # never rewritten
    assert torch.allclose(layer.rotation_blocks(), _rot(projected, 4), atol=1e-13, rtol=0)
    state = layer.peft_state()
    assert set(state) == {"oft_R.weight"} and torch.allclose(state["oft_R.weight"], projected, atol=1e-15, rtol=0)
    assert not state["oft_R.weight"].requires_grad
    plain = _layer(nn.Linear(8, 2), oft_block_size=4)
    assert plain.effective_params() is plain.oft_R


def test_rotate_is_x_times_the_block_diagonal_and_its_transpose():
    layer = _layer(nn.Linear(12, 2).double(), oft_block_size=4)
    _randomize(layer)
    blocks = layer.rotation_blocks()
    dense = torch.block_diag(*blocks.unbind(0))
    x = torch.randn(5, 12, dtype=F64)
    assert torch.allclose(layer.rotate(x, blocks), x @ dense, atol=1e-14, rtol=0)
    assert torch.allclose(layer.rotate(x, blocks, transpose=True), x @ dense.T, atol=1e-14, rtol=0)


# --- forward and gradients -----------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("tokens", [2, 30])  # fewer tokens than outputs: rotate x; more: rotate W
@pytest.mark.parametrize("neumann", [True, False])
def test_linear_forward_and_gradients_match_the_dense_formula(tokens, bias, neumann):
    base = nn.Linear(12, 6, bias=bias).double()
    base.weight.requires_grad_(False)
    layer = _layer(base, oft_block_size=4, use_cayley_neumann=neumann)
    _randomize(layer, seed=tokens)
    x = torch.randn(tokens, 12, dtype=F64, generator=torch.Generator().manual_seed(2), requires_grad=True)
    out = layer.adapted_forward(base, x)
    r = torch.block_diag(*_rot(layer.oft_R, 4, neumann).unbind(0))
    ref = x @ r @ base.weight.T + (base.bias if bias else 0.0)
    assert out.shape == (tokens, 6) and out.dtype == F64
    assert torch.allclose(out, ref, atol=1e-12, rtol=0)
    params = [layer.oft_R, x] + ([base.bias] if bias else [])
    for got, want in zip(_grads(out, params), _grads(ref, params)):
        assert torch.allclose(got, want, atol=1e-10, rtol=0)


def test_block_share_forward_and_gradient():
    base = nn.Linear(6, 4).double().requires_grad_(False)
    layer = _layer(base, oft_block_size=2, block_share=True)
    _randomize(layer)
    x = torch.randn(3, 6, dtype=F64)
    out = layer.adapted_forward(base, x)
    blk = _rot(layer.oft_R, 2)[0]
    ref = x @ torch.block_diag(blk, blk, blk) @ base.weight.T + base.bias
    assert torch.allclose(out, ref, atol=1e-13, rtol=0)
    assert torch.allclose(*[g for g in (_grads(out, [layer.oft_R])[0], _grads(ref, [layer.oft_R])[0])], atol=1e-12)


def test_linear_forward_on_a_bf16_base_returns_bf16():
    base = nn.Linear(8, 4).to(torch.bfloat16)
    layer = _layer(base, oft_block_size=4)
    _randomize(layer)
    x = torch.randn(3, 8).to(torch.bfloat16)
    out = layer.adapted_forward(base, x)
    assert out.dtype == torch.bfloat16
    with torch.no_grad():
        r = torch.block_diag(*_rot(layer.oft_R.double(), 4).unbind(0))
        ref = x.double() @ r @ base.weight.double().T + base.bias.double()
    assert torch.allclose(out.double(), ref, atol=0.1, rtol=0.02)


@pytest.mark.parametrize("bias", [True, False])
def test_conv_forward_and_gradients_match_the_dense_formula(bias):
    conv = nn.Conv2d(4, 6, 2, stride=2, padding=1, dilation=2, groups=2, bias=bias).double()
    conv.weight.requires_grad_(False)
    layer = _layer(conv, oft_block_size=4)  # d = 2·2·2 = 8
    _randomize(layer)
    x = torch.randn(2, 4, 6, 6, dtype=F64, generator=torch.Generator().manual_seed(4), requires_grad=True)
    out = layer.adapted_forward(conv, x)
    r = torch.block_diag(*_rot(layer.oft_R, 4).unbind(0))
    w = (conv.weight.reshape(6, -1) @ r.T).reshape(conv.weight.shape)
    ref = F.conv2d(x, w, conv.bias, stride=2, padding=1, dilation=2, groups=2)
    assert torch.allclose(out, ref, atol=1e-12, rtol=0)
    for got, want in zip(_grads(out, [layer.oft_R, x]), _grads(ref, [layer.oft_R, x])):
        assert torch.allclose(got, want, atol=1e-10, rtol=0)


def test_conv_forward_on_a_bf16_base_returns_bf16():
    conv = nn.Conv2d(2, 3, 2).to(torch.bfloat16)
    layer = _layer(conv, oft_block_size=4)
    _randomize(layer)
    x = torch.randn(1, 2, 4, 4).to(torch.bfloat16)
    out = layer.adapted_forward(conv, x)
    assert out.dtype == torch.bfloat16
    with torch.no_grad():
        r = torch.block_diag(*_rot(layer.oft_R.double(), 4).unbind(0))
        w = (conv.weight.double().reshape(3, -1) @ r.T).reshape(3, 2, 2, 2)
        ref = F.conv2d(x.double(), w, conv.bias.double())
    assert torch.allclose(out.double(), ref, atol=0.1, rtol=0.02)


def _embedding_model(dtype=F64, **kw):
    emb = nn.Embedding(10, 6).to(dtype)
    model = la.inject(Wrap(emb), OFTConfig(target_modules=["layer"], **kw))
    layer = model.layer.adapter.default
    _randomize(layer)
    return model, emb, layer


def test_embedding_output_is_rotated_and_merges():
    model, emb, layer = _embedding_model(oft_block_size=3)
    e0 = emb.weight.detach().clone()
    ids = torch.tensor([[1, 4, 9], [0, 0, 3]])
    r = torch.block_diag(*_rot(layer.oft_R, 3).unbind(0))
    out = model(ids)
    ref = e0[ids] @ r
    assert out.dtype == F64 and torch.allclose(out, ref, atol=1e-13, rtol=0)
    (g,) = _grads(out, [layer.oft_R])
    (g_ref,) = _grads(ref, [layer.oft_R])
    assert torch.allclose(g, g_ref, atol=1e-12, rtol=0)
    assert set(layer.peft_state()) == {"oft_embedding_R.weight"}
    assert layer.peft_shapes() == {"oft_embedding_R.weight": (2, 3)}
    with torch.no_grad():
        layer.merge(emb)
        assert torch.allclose(emb.weight, e0 @ r, atol=1e-13, rtol=0)
        layer.unmerge(emb)
        assert torch.allclose(emb.weight, e0, atol=1e-13, rtol=0)


def test_embedding_on_a_half_base_returns_half():
    model, emb, layer = _embedding_model(dtype=torch.float16, oft_block_size=2)
    ids = torch.tensor([2, 5])
    out = model(ids)
    assert out.dtype == torch.float16
    with torch.no_grad():
        r = torch.block_diag(*_rot(layer.oft_R.double(), 2).unbind(0))
        ref = emb.weight.double()[ids] @ r
    assert torch.allclose(out.double(), ref, atol=5e-3, rtol=0)


def test_embedding_rotates_in_the_parameters_dtype():
    # A float32 table with bfloat16 adapter parameters: the rotation runs in bfloat16 (the blocks are cast to the
    # parameters' dtype), so every output value is a bfloat16 number; the rotation itself is still R_bd.
    model, emb, layer = _embedding_model(dtype=torch.float32, oft_block_size=2)
    layer.to(torch.bfloat16)
    _randomize(layer)
    ids = torch.tensor([1, 3, 9])
    out = model(ids)
    assert out.dtype == torch.float32
    assert torch.equal(out, out.to(torch.bfloat16).float())
    with torch.no_grad():
        ref = emb.weight.double()[ids] @ torch.block_diag(*_rot(layer.oft_R.double(), 2).unbind(0))
    assert torch.allclose(out.double(), ref, atol=0.05, rtol=0)


def test_forward_dropout_only_in_training():
    base = nn.Linear(8, 3).double().requires_grad_(False)
    layer = _layer(base, oft_block_size=2, module_dropout=0.5)  # r = 4: 2 dropped
    _randomize(layer)
    x = torch.randn(2, 8, dtype=F64)
    full = _rot(layer.oft_R.detach(), 2)
    ref = x @ torch.block_diag(*full.unbind(0)) @ base.weight.T + base.bias
    with torch.no_grad():
        layer.eval()
        assert torch.allclose(layer.adapted_forward(base, x), ref, atol=1e-13, rtol=0)
        layer.train()
        torch.manual_seed(0)
        for _ in range(6):
            out = layer.adapted_forward(base, x)
            matched = False
            for mask in range(16):
                if bin(mask).count("1") != 2:
                    continue
                blks = [torch.eye(2, dtype=F64) if mask >> j & 1 else full[j] for j in range(4)]
                cand = x @ torch.block_diag(*blks) @ base.weight.T + base.bias
                matched |= torch.allclose(out, cand, atol=1e-13, rtol=0)
            assert matched and not torch.allclose(out, ref, atol=1e-6)
        layer.module_dropout = 0.0
        assert torch.allclose(layer.adapted_forward(base, x), ref, atol=1e-13, rtol=0)


# --- merge ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("safe", [False, True])
def test_linear_merge_is_w_rt_in_float64_and_unmerge_inverts(safe):
    base = nn.Linear(12, 5)
    w0, b0 = base.weight.detach().clone(), base.bias.detach().clone()
    layer = _layer(base, oft_block_size=4)  # Neumann: not exactly orthogonal, unmerge must invert
    _randomize(layer, std=0.5)
    with torch.no_grad():
        r = torch.block_diag(*_rot(layer.oft_R.double(), 4).unbind(0))
        want = (w0.double() @ r.T).float()
    layer.merge(base, safe=safe)
    assert layer.merged is True
    assert torch.equal(base.weight.detach(), want) and torch.equal(base.bias.detach(), b0)
    layer.unmerge(base)
    assert layer.merged is False
    with torch.no_grad():
        back = (want.double() @ torch.linalg.inv(r.T)).float()
    assert torch.equal(base.weight.detach(), back)
    assert torch.allclose(base.weight.detach(), w0, atol=1e-6, rtol=0)


def test_conv_merge_rotates_the_flattened_kernel_and_unmerge_inverts():
    conv = nn.Conv2d(2, 3, 2).double()
    w0 = conv.weight.detach().clone()
    layer = _layer(conv, oft_block_size=4, num_cayley_neumann_terms=2)
    _randomize(layer, std=0.5)
    with torch.no_grad():
        r = torch.block_diag(*_rot(layer.oft_R, 4, terms=2).unbind(0))
    layer.merge(conv)
    assert torch.allclose(conv.weight.detach(), (w0.reshape(3, -1) @ r.T).reshape(w0.shape), atol=1e-13, rtol=0)
    layer.unmerge(conv)
    assert torch.allclose(conv.weight.detach(), w0, atol=1e-13, rtol=0)


def test_merge_safe_refuses_non_finite_and_leaves_the_weight():
    base = nn.Linear(4, 2)
    w0 = base.weight.detach().clone()
    layer = _layer(base, oft_block_size=2)
    with torch.no_grad():
        layer.oft_R[0, 0] = float("inf")
    with pytest.raises(la.MergeError):
        layer.merge(base, safe=True)
    assert torch.equal(base.weight, w0) and layer.merged is False


# --- PEFT layout ---------------------------------------------------------------------------------------------


def test_peft_state_shapes_and_load_with_cast():
    layer = _layer(nn.Linear(12, 3), oft_block_size=4)
    _randomize(layer)
    state = layer.peft_state()
    assert set(state) == {"oft_R.weight"} and torch.equal(state["oft_R.weight"], layer.oft_R.detach())
    assert not state["oft_R.weight"].requires_grad
    assert layer.peft_shapes() == {"oft_R.weight": (3, 6)}
    new = {"oft_R.weight": torch.randn(3, 6, dtype=F64)}
    layer.load_peft_state(new)
    assert layer.oft_R.dtype == torch.float32 and torch.equal(layer.oft_R.detach(), new["oft_R.weight"].float())
    with pytest.raises(KeyError):
        layer.load_peft_state({"oft_embedding_R.weight": new["oft_R.weight"]})
    emb = _layer(nn.Embedding(5, 4), oft_block_size=2)
    emb.load_peft_state({"oft_embedding_R.weight": torch.ones(2, 1, dtype=F64)})
    assert torch.equal(emb.oft_R.detach(), torch.ones(2, 1))
    assert _layer(nn.Conv2d(1, 2, 2), oft_block_size=2)._peft_key() == "oft_R.weight"


def test_config_from_peft_defaults_and_nulls():
    assert OFTMethod.config_from_peft({"oft_block_size": 16}) == OFTConfig(oft_block_size=16, auto_adjust=True)
    assert OFTConfig(oft_block_size=16, auto_adjust=True) == OFTConfig(
        r=0,
        oft_block_size=16,
        use_cayley_neumann=True,
        num_cayley_neumann_terms=5,
        block_share=False,
        coft=False,
        eps=6e-5,
        module_dropout=0.0,
        init_weights=True,
        auto_adjust=True,
        bias="none",
    )
    nulls = {"r": None, "oft_block_size": 8, "module_dropout": None, "layers_to_transform": [], "layers_pattern": ""}
    assert OFTMethod.config_from_peft(nulls) == OFTConfig(oft_block_size=8, auto_adjust=True)
    got = OFTMethod.config_from_peft({"r": 4, "oft_block_size": None, "bias": "all", "target_modules": "q|v"})
    assert got == OFTConfig(r=4, oft_block_size=0, auto_adjust=True, bias="all", target_modules="q|v")


def test_config_from_peft_refuses_the_pre_0_14_format():
    with pytest.raises(la.AdapterConfigError) as exc:
        OFTMethod.config_from_peft({"r": 8})
    assert str(exc.value) == (
        "oft: the adapter config has no 'oft_block_size', so it was saved by PEFT < 0.14, whose OFT format PEFT "
        "itself no longer reads; retrain the adapter with a recent PEFT or with lightning_adapters"
    )


# --- a quantized base (the library's stand-in over a layer with its own kernel) ------------------------------


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("grad", [False, True])  # False: the layer's own kernel; True: F.linear on the weight
def test_quantized_linear_rotates_the_input(bias, grad):
    real, view = quantized(12, 5, F64, bias=bias)
    layer = _layer(real, oft_block_size=4)
    _randomize(layer)
    x = torch.randn(3, 12, dtype=F64, generator=torch.Generator().manual_seed(6)).requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        out = layer.adapted_forward(view, x)
    assert real.calls == (0 if grad else 1)
    ref = x @ torch.block_diag(*_rot(layer.oft_R, 4).unbind(0)) @ real.weight.T + (real.bias if bias else 0.0)
    assert out.dtype == F64 and torch.allclose(out, ref, atol=1e-12, rtol=0)
    if not grad:
        return
    params = [layer.oft_R, x]
    for got, want in zip(_grads(out, params), _grads(ref, params)):
        assert torch.allclose(got, want, atol=1e-10, rtol=0)


def test_quantized_bf16_linear_runs_in_its_own_dtype():
    real, view = quantized(8, 4, torch.bfloat16)
    layer = _layer(real, oft_block_size=4)
    _randomize(layer)
    x = torch.randn(3, 8).to(torch.bfloat16)
    with torch.no_grad():
        out = layer.adapted_forward(view, x)
    assert out.dtype == torch.bfloat16 and real.calls == 1
    with torch.no_grad():
        r = torch.block_diag(*_rot(layer.oft_R.double(), 4).unbind(0))
        ref = x.double() @ r @ real.weight.double().T + real.bias.double()
    assert torch.allclose(out.double(), ref, atol=0.1, rtol=0.02)


# --- meta device: every tensor a forward or merge builds lives on the layer's device -------------------------


@pytest.mark.parametrize(
    "kw", [dict(), dict(use_cayley_neumann=False), dict(block_share=True, coft=True, num_cayley_neumann_terms=2)]
)
def test_meta_training_forward_with_dropout_and_merge_stay_on_meta(kw):
    base = nn.Linear(16, 4, device="meta")
    layer = _layer(base, oft_block_size=4, module_dropout=0.5, **kw).train()
    rot = layer.rotation_blocks(dropout=True)
    assert rot.device.type == "meta" and rot.shape == (4, 4, 4)
    for tokens in (2, 40):
        out = layer.adapted_forward(base, torch.empty(tokens, 16, device="meta"))
        assert out.device.type == "meta" and out.shape == (tokens, 4)
    conv = nn.Conv2d(4, 3, 2, device="meta")
    layer_c = _layer(conv, oft_block_size=4, module_dropout=0.5, **kw).train()
    out = layer_c.adapted_forward(conv, torch.empty(1, 4, 5, 5, device="meta"))
    assert out.device.type == "meta" and out.shape == (1, 3, 4, 4)
    layer.merge(base)
    layer.unmerge(base)
    assert base.weight.device.type == "meta" and layer.merged is False
