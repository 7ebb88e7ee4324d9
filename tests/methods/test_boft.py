"""BOFT-specific maths and errors: the butterfly product against a dense evaluation, orthogonality, dropout,
the output scale and clear errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightning_adapters as la
from lightning_adapters.methods.boft import BOFTConfig, butterfly_matrix
from tests.helpers import Wrap


def _random(model: nn.Module, std: float, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in la.adapter_state_dict(model).values():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


def _dense_rotation(boft_r: torch.Tensor) -> torch.Tensor:
    """R = B_{m−1} ⋯ B_0 written out densely from the paper's definition, independently of the library.

    B_i = P_i · blockdiag(Cayley(½(A − Aᵀ))) · P_iᵀ with P_i[j, perm_i[j]] = 1, where perm_i lists, inside
    groups of b·2^i features, the even-numbered half-blocks (b/2 features) first and the odd-numbered after.
    """
    m, n, b, _ = boft_r.shape
    d = n * b
    out = torch.eye(d, dtype=boft_r.dtype)
    for i in range(m):
        perm = []
        group, half = b * 2**i, b // 2
        for start in range(0, d, group):
            halves = [list(range(start + k * half, start + (k + 1) * half)) for k in range(group // half)]
            for k in list(range(0, len(halves), 2)) + list(range(1, len(halves), 2)):
                perm += halves[k]
        p = torch.zeros(d, d, dtype=boft_r.dtype)
        p[torch.arange(d), torch.tensor(perm)] = 1.0
        blocks = []
        for a in boft_r[i]:
            s = 0.5 * (a - a.T)
            eye = torch.eye(b, dtype=a.dtype)
            blocks.append((eye - s) @ torch.linalg.inv(eye + s))
        out = p @ torch.block_diag(*blocks) @ p.T @ out
    return out


# --- errors --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [dict(boft_block_size=0, boft_block_num=0), dict(boft_block_size=4, boft_block_num=2)])
def test_exactly_one_of_block_size_and_block_num(kw):
    with pytest.raises(la.AdapterConfigError, match="exactly one of boft_block_size"):
        BOFTConfig(**kw)


@pytest.mark.parametrize("kw", [dict(boft_n_butterfly_factor=0), dict(boft_dropout=1.5), dict(init_weights=None)])
def test_bad_values_are_refused(kw):
    with pytest.raises(la.AdapterConfigError):
        BOFTConfig(**kw)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(boft_block_size=5), r"boft_block_size=5 does not divide in_features=24 .*\[2, 3, 4, 6, 8, 12, 24\]"),
        (dict(boft_block_size=0, boft_block_num=5), r"valid boft_block_num values for this layer: \[1, 2, 3, 4"),
        (dict(boft_block_size=0, boft_block_num=24), "blocks of 1 feature"),
        (
            dict(boft_block_size=4, boft_n_butterfly_factor=3),
            r"boft_n_butterfly_factor=3 .* block size 4 and 6 blocks; butterfly factors this layer can hold with "
            r"block size 4: \[1, 2\]; block sizes that allow 3 factors here: \[2, 6\]",
        ),
        (dict(boft_block_size=3, boft_n_butterfly_factor=2), r"even block size .* block size 3 and 8 blocks"),
    ],
)
def test_sizes_that_do_not_fit_the_layer_are_explained(kw, match):
    model = Wrap(nn.Linear(24, 8))
    with pytest.raises(la.AdapterConfigError, match=match):
        la.inject(model, BOFTConfig(target_modules=["layer"], **kw))
    assert type(model.layer) is nn.Linear


def test_embedding_is_not_supported():
    with pytest.raises(la.UnsupportedLayerError, match="boft: cannot adapt"):
        la.inject(Wrap(nn.Embedding(10, 8)), BOFTConfig(target_modules=["layer"]))


# --- maths ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("m, b", [(1, 4), (2, 4), (3, 2), (4, 2)])
def test_linear_equals_dense_butterfly_formula(m, b):
    torch.manual_seed(0)
    lin = nn.Linear(32, 12).double()
    model = la.inject(Wrap(lin), BOFTConfig(boft_block_size=b, boft_n_butterfly_factor=m, target_modules=["layer"]))
    _random(model, std=0.4)
    layer = model.layer.adapter.default
    r = _dense_rotation(layer.boft_R.detach())
    s = layer.boft_s.detach().reshape(-1)
    for tokens in (5, 40):  # the token path and the weight path
        x = torch.randn(tokens, 32, dtype=torch.float64)
        assert torch.allclose(model(x), (x @ r @ lin.weight.T) * s + lin.bias, atol=1e-12)


def test_conv_equals_dense_butterfly_formula():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=2, dilation=2).double()
    model = la.inject(Wrap(conv), BOFTConfig(boft_block_size=6, boft_n_butterfly_factor=2, target_modules=["layer"]))
    _random(model, std=0.4)
    layer = model.layer.adapter.default
    r = _dense_rotation(layer.boft_R.detach())
    w = (conv.weight.reshape(6, -1) @ r.T * layer.boft_s.detach().reshape(-1, 1)).reshape(conv.weight.shape)
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    assert torch.allclose(model(x), F.conv2d(x, w, conv.bias, padding=2, dilation=2), atol=1e-12)


def test_rotation_is_orthogonal():
    model = la.inject(
        Wrap(nn.Linear(64, 8)), BOFTConfig(boft_block_size=8, boft_n_butterfly_factor=3, target_modules=["layer"])
    )
    _random(model, std=0.5)
    layer = model.layer.adapter.default
    r = butterfly_matrix(layer.factor_blocks(), 8)
    assert (r @ r.T - torch.eye(64)).abs().max() < 1e-5
    assert (r - torch.eye(64)).abs().max() > 0.1


def test_dropout_replaces_blocks_of_one_factor_in_training():
    model = la.inject(
        Wrap(nn.Linear(32, 8)),
        BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2, boft_dropout=0.5, target_modules=["layer"]),
    )
    _random(model, std=0.3)
    x = torch.randn(6, 32)
    model.eval()
    ref = model(x)
    model.train()
    assert any(not torch.allclose(model(x), ref) for _ in range(6))
    layer = model.layer.adapter.default
    layer.boft_R.grad = None
    model(x).pow(2).sum().backward()
    zero = (layer.boft_R.grad.abs().sum((-1, -2)) == 0).sum(1)  # (m,) blocks without gradient per factor
    assert sorted(zero.tolist()) == [0, 4]  # ⌊0.5 · 8⌋ blocks of exactly one factor


@pytest.mark.parametrize("safe", [False, True])
def test_zero_scale_leaves_the_bias_alone_and_merges_reversibly(safe):
    """``s_i = 0`` zeroes output i (bias kept); merging cannot divide it back out, so the row is kept and restored."""
    lin = nn.Linear(8, 3)
    original = lin.weight.detach().clone()
    model = la.inject(Wrap(lin), BOFTConfig(boft_block_size=4, target_modules=["layer"]))
    _random(model, std=0.3)
    with torch.no_grad():
        model.layer.adapter.default.boft_s[1] = 0.0
    x = torch.randn(2, 8)
    unmerged = model(x)
    assert torch.equal(unmerged[:, 1], lin.bias[1].expand(2))
    la.merge(model, safe=safe)
    assert torch.equal(lin.weight[1], torch.zeros(8))
    assert torch.allclose(model(x), unmerged, atol=1e-6)
    la.unmerge(model)
    assert torch.isfinite(lin.weight).all()
    assert torch.equal(lin.weight[1], original[1])  # the kept row: bit-exact
    assert torch.allclose(lin.weight, original, atol=1e-6)
    assert not model.layer.adapter.default.merged and model.layer.adapter.default.merge_rows is None


def test_rotation_saves_only_the_input_and_the_unscaled_output():
    model = la.inject(
        Wrap(nn.Linear(64, 48)), BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2, target_modules=["layer"])
    )
    x = torch.randn(100, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        model(x)
    params = {p.data_ptr() for p in model.parameters()}
    big = [tuple(t.shape) for t in saved if t.numel() >= 100 * 48 // 2 and t.data_ptr() not in params]
    assert sorted(big, reverse=True) == [(100, 64), (100, 48)]


def _boft_eval_model(kind: str, m: int) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if kind == "linear":
        base, x = nn.Linear(8, 6), torch.randn(3, 8)
    elif kind == "linear_bf16":
        base, x = nn.Linear(8, 6).to(torch.bfloat16), torch.randn(3, 8).to(torch.bfloat16)
    else:
        base, x = nn.Conv2d(2, 4, 2), torch.randn(2, 2, 5, 5)
    cfg = BOFTConfig(boft_block_size=2, boft_n_butterfly_factor=m, target_modules=["layer"])
    model = la.inject(Wrap(base), cfg)
    _random(model, 0.3)
    return model, x


def _uncached_boft(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.layer.adapter.default._blocks_cache = None
    return model(x)


@pytest.mark.parametrize("kind", ["linear", "linear_bf16", "conv"])
@pytest.mark.parametrize("m", [1, 2])
def test_eval_factor_blocks_are_cached_until_boft_r_changes(kind, m):
    """Eval without a gradient to ``boft_R``: the second forward reuses the factor blocks (the same tensors) and
    gives the uncached output bit for bit; an in-place write to ``boft_R`` rebuilds them, one to ``boft_s`` (not
    part of them) is read directly; ``train()`` drops them."""
    model, x = _boft_eval_model(kind, m)
    layer = model.layer.adapter.default
    model.eval()
    with torch.no_grad():
        first = model(x)
        blocks = layer._blocks_cache[1]
        assert torch.equal(model(x), first) and layer._blocks_cache[1] is blocks
        assert torch.equal(_uncached_boft(model, x), first)
        model(x)
        layer.boft_R.mul_(1.5)
        y = model(x)
        assert not torch.equal(layer._blocks_cache[1][0], blocks[0]) and torch.equal(_uncached_boft(model, x), y)
        layer.boft_s.mul_(2.0)
        assert torch.equal(model(x), _uncached_boft(model, x))
    model.train()
    assert layer._blocks_cache is None


def test_factor_blocks_are_not_cached_in_training_or_while_boft_r_gets_a_gradient():
    """The other side of the cache's condition: training mode and eval with autograd on ``boft_R`` rebuild the
    blocks in the graph (``∂boft_R`` flows, equal across two calls); an entry cached under ``inference_mode`` is not
    used by such a forward."""
    model, x = _boft_eval_model("linear", 2)
    layer = model.layer.adapter.default
    for mode in ("train", "eval"):
        model.train(mode == "train")
        if mode == "eval":
            with torch.inference_mode():
                inferred = model(x)
        grads = []
        for _ in range(2):
            y = model(x)
            (g,) = torch.autograd.grad(y.sum(), [layer.boft_R])
            grads.append(g)
            assert g.abs().sum() > 0
            assert layer._blocks_cache is None if mode == "train" else layer._blocks_cache[1][0].is_inference()
        assert torch.equal(grads[0], grads[1])
        if mode == "eval":
            assert torch.equal(y, inferred)
