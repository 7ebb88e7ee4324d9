"""OFT-specific maths and errors: Cayley maps, COFT, module dropout, the rotation paths and clear errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lightning_adapters as la
from lightning_adapters.kernels import rotation
from lightning_adapters.kernels.rotation import (
    TOKEN_MAJOR_MIN_BLOCK,
    block_layout,
    cayley,
    rotate_features,
    rotated_linear,
)
from lightning_adapters.methods.oft import (
    OFTConfig,
    cayley_neumann,
    neumann_coefficients,
    skew_gather,
    skew_symmetric,
)
from tests.helpers import SmallCNN, Wrap, autograd_kept_bytes


def _layer(model: nn.Module):
    return model.layer.adapter.default


def _random(model: nn.Module, std: float, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in la.adapter_state_dict(model).values():
            p.copy_(torch.randn(p.shape, generator=g) * std)


# --- config and layer errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [dict(r=0, oft_block_size=0), dict(r=4, oft_block_size=8)])
def test_exactly_one_of_r_and_block_size(kw):
    with pytest.raises(la.AdapterConfigError, match="exactly one of r .* and oft_block_size"):
        OFTConfig(**kw)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(num_cayley_neumann_terms=1), "num_cayley_neumann_terms=1"),
        (dict(eps=0.0), "eps"),
        (dict(module_dropout=1.0), "module_dropout"),
        (dict(coft="yes"), "coft must be True or False"),
    ],
)
def test_bad_values_are_refused(kw, match):
    with pytest.raises(la.AdapterConfigError, match=match):
        OFTConfig(**kw)


def test_block_size_that_does_not_divide_lists_valid_sizes_and_changes_nothing():
    model = nn.Sequential()
    model.add_module("ok", nn.Linear(24, 8))
    model.add_module("odd", nn.Linear(17, 8))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        la.AdapterConfigError, match=r"oft_block_size=4 does not divide in_features=17 of 'odd'.*\[17\]"
    ):
        la.inject(model, OFTConfig(oft_block_size=4, target_modules=["ok", "odd"]))
    assert type(model.ok) is nn.Linear and not hasattr(model.ok, "adapter")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_r_that_does_not_divide_lists_valid_r():
    with pytest.raises(la.AdapterConfigError, match=r"valid r values for this layer: \[1, 2, 3, 4, 6, 8, 12\]"):
        la.inject(Wrap(nn.Linear(24, 8)), OFTConfig(r=5, oft_block_size=0, target_modules=["layer"]))


def test_conv_error_names_the_flattened_kernel():
    with pytest.raises(la.AdapterConfigError, match=r"flattened kernel size 27 .*\[3, 9, 27\]"):
        la.inject(SmallCNN(), OFTConfig(oft_block_size=4, target_modules=["conv1"]))


def test_blocks_of_one_feature_are_refused():
    with pytest.raises(la.AdapterConfigError, match="blocks of 1 feature"):
        la.inject(Wrap(nn.Linear(8, 4)), OFTConfig(oft_block_size=1, target_modules=["layer"]))


def test_auto_adjust_takes_peft_s_nearest_divisor_with_a_warning():
    model = Wrap(nn.Linear(48, 4))
    with pytest.warns(UserWarning, match="oft_block_size=32 does not divide in_features=48 .* using 24"):
        la.inject(model, OFTConfig(oft_block_size=32, auto_adjust=True, target_modules=["layer"]))
    assert (_layer(model).r, _layer(model).block_size) == (2, 24)


def _conv1d_t() -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    return Conv1D(4, 4)


@pytest.mark.parametrize("make", [lambda: nn.Conv1d(4, 4, 3), _conv1d_t], ids=["conv1d", "transformers_conv1d"])
def test_unsupported_layer_types(make):
    with pytest.raises(la.UnsupportedLayerError, match="oft: cannot adapt"):
        la.inject(Wrap(make()), OFTConfig(oft_block_size=2, target_modules=["layer"]))


# --- maths ---------------------------------------------------------------------------------------------------


def test_exact_cayley_is_orthogonal():
    model = la.inject(
        Wrap(nn.Linear(64, 8)), OFTConfig(oft_block_size=16, use_cayley_neumann=False, target_modules=["layer"])
    )
    _random(model, std=0.5)
    r = _layer(model).rotation_blocks()  # (4, 16, 16)
    eye = torch.eye(16).expand_as(r)
    assert (r @ r.transpose(1, 2) - eye).abs().max() < 1e-5
    assert (r - eye).abs().max() > 0.1


def test_neumann_is_the_transpose_of_exact_cayley():
    """The series truncates (I + Q)(I − Q)⁻¹ = R_exactᵀ; it converges to it as terms are added."""
    model = la.inject(Wrap(nn.Linear(32, 8)), OFTConfig(oft_block_size=8, target_modules=["layer"]))
    _random(model, std=0.05)
    layer = _layer(model)
    q = skew_symmetric(layer.oft_R.double(), layer.skew_index, layer.skew_sign, 8)
    eye = torch.eye(8, dtype=torch.float64).expand_as(q)
    truth_t = torch.linalg.inv(eye - q) @ (eye + q)  # (I − Q)⁻¹(I + Q) = (I + Q)(I − Q)⁻¹
    exact = (eye - q) @ torch.linalg.inv(eye + q)
    assert (cayley(q) - exact).abs().max() < 1e-12
    layer.num_terms = 40
    assert (layer.rotation_blocks(dtype=torch.float64) - truth_t).abs().max() < 1e-12
    layer.num_terms = 5
    r5 = layer.rotation_blocks(dtype=torch.float64)
    assert (r5 - truth_t).abs().max() < 0.01 < (r5 - exact).abs().max()


def test_the_series_recomputes_its_steps_on_the_cpu_only():
    assert rotation.recomputes_series(torch.device("cpu"))
    assert not rotation.recomputes_series(torch.device("cuda"))
    assert not rotation.recomputes_series(torch.device("meta"))


@pytest.mark.parametrize("recompute", [True, False], ids=["NeumannSeries", "autograd"])
@pytest.mark.parametrize("terms", [2, 3, 5, 7, 8])
@pytest.mark.parametrize("b", [1, 2, 7])
def test_skew_gather_and_horner_series_equal_the_scatter_and_the_power_sum(
    terms: int, b: int, recompute: bool, monkeypatch: pytest.MonkeyPatch
):
    """``skew_symmetric`` (one gather) is ``U − Uᵀ`` scattered from the upper entries, and ``cayley_neumann``
    (Horner's rule in ``Q²``, odd and even numbers of coefficients) is ``I + Σ c_k Q^k`` from explicit powers:
    outputs and gradients, with the recomputing node (the CPU's policy) and with plain autograd (a GPU's)."""
    monkeypatch.setattr(rotation, "recomputes_series", lambda device: recompute)
    applied = []
    monkeypatch.setattr(rotation.NeumannSeries, "apply", lambda *a: applied.append(1) or _real_apply(*a))
    g = torch.Generator().manual_seed(terms * 10 + b)
    upper = (torch.randn(3, b * (b - 1) // 2, generator=g, dtype=torch.float64) * 0.3).requires_grad_()
    weights = torch.randn(3, b, b, generator=g, dtype=torch.float64)
    rows, cols = torch.triu_indices(b, b, 1)

    def truth() -> torch.Tensor:
        u = upper.new_zeros(3, b, b)
        u[:, rows, cols] = upper
        q = u - u.transpose(1, 2)
        out, power = torch.eye(b, dtype=torch.float64).expand(3, b, b), None
        for c in neumann_coefficients(terms):
            power = q if power is None else power @ q
            out = out + c * power
        return out

    index, sign = skew_gather(b)
    got = cayley_neumann(skew_symmetric(upper, index, sign, b), terms)
    want = truth()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    (g_got,) = torch.autograd.grad((got * weights).sum(), upper)
    (g_want,) = torch.autograd.grad((want * weights).sum(), upper)
    torch.testing.assert_close(g_got, g_want, rtol=1e-12, atol=1e-12)
    assert bool(applied) == (recompute and len(neumann_coefficients(terms)) >= 2)


_real_apply = rotation.NeumannSeries.apply


def test_forward_equals_dense_block_diagonal_formula():
    """Both the token path (T < out) and the weight path (T ≥ out) give x·R_bd·Wᵀ + b."""
    torch.manual_seed(0)
    lin = nn.Linear(24, 16).double()
    model = la.inject(Wrap(lin), OFTConfig(oft_block_size=6, use_cayley_neumann=False, target_modules=["layer"]))
    _random(model, std=0.3)
    r_bd = torch.block_diag(*_layer(model).rotation_blocks().unbind(0))
    for tokens in (5, 40):
        x = torch.randn(tokens, 24, dtype=torch.float64)
        assert torch.allclose(model(x), x @ r_bd @ lin.weight.T + lin.bias, atol=1e-12)


def test_rotation_gradients_on_both_paths():
    torch.manual_seed(0)
    w, bias = torch.randn(6, 8, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    blocks = torch.randn(2, 4, 4, dtype=torch.float64, requires_grad=True)
    layout = block_layout([0], [1])  # 2 blocks of 4 consecutive features
    # The token path (fewer tokens than outputs), the weight path, and the weight path with a batch dimension.
    for shape in ((3, 8), (8, 8), (2, 5, 8)):
        x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda x, b: rotated_linear(x, w, bias, [(layout, b)], (2, 4)), (x, blocks))
    assert torch.autograd.gradcheck(lambda x, b: rotate_features(x, [(layout, b)], (2, 4)), (x, blocks))


def test_rotation_saves_no_activation_but_the_input():
    """The block rotation keeps only x for backward (PEFT's einsum keeps a permuted copy)."""
    model = la.inject(Wrap(nn.Linear(64, 48)), OFTConfig(oft_block_size=8, target_modules=["layer"]))
    x = torch.randn(100, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        model(x)
    big = [t for t in saved if t.numel() >= x.numel() // 2]
    assert len(big) == 1 and big[0].data_ptr() == x.data_ptr()


def test_module_dropout_replaces_whole_blocks_by_identity_in_training():
    model = la.inject(Wrap(nn.Linear(32, 8)), OFTConfig(oft_block_size=8, module_dropout=0.5, target_modules=["layer"]))
    _random(model, std=0.2)
    x = torch.randn(6, 32)
    model.eval()
    ref = model(x)
    assert torch.equal(model(x), ref)
    model.train()
    outs = [model(x) for _ in range(6)]
    assert any(not torch.allclose(o, ref) for o in outs)
    _layer(model).oft_R.grad = None
    model(x).pow(2).sum().backward()
    zero_rows = (_layer(model).oft_R.grad.abs().sum(1) == 0).sum().item()
    assert zero_rows == 2  # ⌊0.5 · 4⌋ of the 4 blocks were the identity


def test_coft_projects_without_mutating_and_passes_gradients_straight_through():
    cfg = dict(oft_block_size=8, target_modules=["layer"], use_cayley_neumann=False)
    torch.manual_seed(0)
    base = nn.Linear(32, 8)
    model = la.inject(Wrap(base), OFTConfig(coft=True, eps=0.2, **cfg))
    _random(model, std=0.2)
    layer = _layer(model)
    raw = layer.oft_R.detach().clone()
    x = torch.randn(5, 32)
    model(x).pow(2).sum().backward()
    assert torch.equal(layer.oft_R.detach(), raw)  # the parameter is not rewritten inside forward
    projected = layer.peft_state()["oft_R.weight"]
    radius = 0.2 / 4**0.5
    norms = projected.norm(dim=1) * 2**0.5  # ||U − Uᵀ||_F
    assert (norms <= radius * (1 + 1e-6)).all() and (raw.norm(dim=1) * 2**0.5 > radius).any()
    twin = la.inject(Wrap(nn.Linear(32, 8)), OFTConfig(**cfg))
    twin.layer.load_state_dict(base.state_dict(), strict=False)
    with torch.no_grad():
        twin.layer.adapter.default.oft_R.copy_(projected)
    assert torch.allclose(twin(x), model(x), atol=1e-6)
    twin(x).pow(2).sum().backward()
    assert torch.allclose(twin.layer.adapter.default.oft_R.grad, layer.oft_R.grad, atol=1e-6)


def test_embedding_rotates_the_output_and_merges():
    emb = nn.Embedding(20, 16)
    model = la.inject(Wrap(emb), OFTConfig(oft_block_size=4, target_modules=["layer"]))
    _random(model, std=0.2)
    ids = torch.tensor([[1, 5, 19]])
    r_bd = torch.block_diag(*_layer(model).rotation_blocks().unbind(0))
    assert torch.allclose(model(ids), emb.weight[ids] @ r_bd, atol=1e-6)


def test_token_major_backward_gradients():
    """Blocks of at least TOKEN_MAJOR_MIN_BLOCK features take the token-major backward on the weight path."""
    torch.manual_seed(0)
    b = TOKEN_MAJOR_MIN_BLOCK
    w, bias = torch.randn(5, 2 * b, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    blocks = torch.randn(2, b, b, dtype=torch.float64, requires_grad=True)
    layout = block_layout([0], [1])
    x = torch.randn(2, 3, 2 * b, dtype=torch.float64, requires_grad=True)  # 6 tokens > 5 outputs: weight path
    assert torch.autograd.gradcheck(lambda x, q: rotated_linear(x, w, bias, [(layout, q)], (2, b)), (x, blocks))


@pytest.mark.parametrize("tokens", [5, 40], ids=["rotate-tokens", "rotate-weight"])
def test_training_forward_keeps_no_more_for_backward_than_peft(tokens: int) -> None:
    """What autograd keeps from an OFT Linear's training forward (rotation blocks and activations) is at most what
    PEFT's keeps, on both paths of ``rotated_linear``.

    Regression: autograd through the Neumann series' Horner products kept every step ``H_k`` (five (n, b, b)
    tensors a layer against PEFT's four: 1% more step memory than PEFT at hidden 512); ``NeumannSeries`` keeps ``Q``.
    """
    from peft import OFTConfig as PeftOFTConfig
    from peft import get_peft_model

    torch.manual_seed(0)
    base = Wrap(nn.Linear(64, 24))
    ours = la.inject(copy.deepcopy(base), OFTConfig(oft_block_size=16, target_modules=["layer"])).train()
    peft_cfg = PeftOFTConfig(r=0, oft_block_size=16, target_modules=["layer"])
    peft = get_peft_model(copy.deepcopy(base), peft_cfg).train()
    x = torch.randn(tokens, 64)
    assert _layer(ours).use_cayley_neumann and peft_cfg.use_cayley_neumann  # both defaults: the series
    assert autograd_kept_bytes(ours, x) <= autograd_kept_bytes(peft, x)


def _oft_eval_model(kind: str, **cfg) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if kind == "linear":
        base, x = nn.Linear(8, 6), torch.randn(3, 8)
    elif kind == "linear_bf16":
        base, x = nn.Linear(8, 6).to(torch.bfloat16), torch.randn(3, 8).to(torch.bfloat16)
    elif kind == "conv":
        base, x = nn.Conv2d(2, 4, 2), torch.randn(2, 2, 5, 5)
    else:
        base, x = nn.Embedding(10, 8), torch.tensor([[1, 9, 3]])
    model = la.inject(Wrap(base), la.OFTConfig(oft_block_size=4, r=0, target_modules=["layer"], **cfg))
    _random(model, 0.3)
    return model, x


def _uncached_oft(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    _layer(model)._blocks_cache = None
    return model(x)


@pytest.mark.parametrize("kind", ["linear", "linear_bf16", "conv", "embedding"])
@pytest.mark.parametrize("cfg", [{}, {"use_cayley_neumann": False}, {"block_share": True}, {"coft": True}])
def test_eval_rotation_blocks_are_cached_until_oft_r_changes(kind, cfg):
    """Eval without a gradient to ``oft_R``: the second forward reuses the rotation blocks (the same tensor) and
    gives the uncached output bit for bit (exact Cayley, Neumann series, shared blocks, COFT); an in-place write to
    ``oft_R`` or a dtype cast rebuilds them; ``train()`` drops them."""
    model, x = _oft_eval_model(kind, **cfg)
    layer = _layer(model)
    model.eval()
    with torch.no_grad():
        first = model(x)
        blocks = layer._blocks_cache[1]
        assert torch.equal(model(x), first) and layer._blocks_cache[1] is blocks
        assert torch.equal(_uncached_oft(model, x), first)
        model(x)
        layer.oft_R.mul_(1.5)
        y = model(x)
        assert not torch.equal(layer._blocks_cache[1], blocks)
        assert torch.equal(_uncached_oft(model, x), y)
        if kind != "linear_bf16":
            model.double()
            y = model(x.double() if x.is_floating_point() else x)
            assert layer._blocks_cache[1].dtype == torch.float64
    model.train()
    assert layer._blocks_cache is None


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_rotation_blocks_are_not_cached_in_training_or_while_oft_r_gets_a_gradient(kind):
    """The other side of the cache's condition: training mode (module dropout draws new blocks each call) and eval
    with autograd on ``oft_R`` rebuild the blocks in the graph, so ``∂oft_R`` flows, equal across two calls; an
    entry cached under ``inference_mode`` is not used by such a forward."""
    model, x = _oft_eval_model(kind)
    layer = _layer(model)
    for mode in ("train", "eval"):
        model.train(mode == "train")
        if mode == "eval":
            with torch.inference_mode():
                inferred = model(x)
        grads = []
        for _ in range(2):
            y = model(x)
            (g,) = torch.autograd.grad(y.sum(), [layer.oft_R])
            grads.append(g)
            assert g.abs().sum() > 0
            assert layer._blocks_cache is None if mode == "train" else layer._blocks_cache[1].is_inference()
        assert torch.equal(grads[0], grads[1])
        if mode == "eval":
            assert torch.equal(y, inferred)
