"""Small pieces of the methods checked against hand-computed values, where the parity suites reach them only through
many training steps or not at all (each was a surviving mutant, docs/MUTATION.md).
"""

from __future__ import annotations

import pytest
import torch
from transformers.models.bart.modeling_bart import BartScaledWordEmbedding

import lightning_adapters as la
from lightning_adapters.methods.adalora import budget_schedule, update_importance
from tests.helpers import Wrap


def test_adalora_importance_step_is_the_two_ema_updates():
    """``Ī' = β1·Ī + (1-β1)·I`` and ``Ū' = β2·Ū + (1-β2)·|I - Ī'|`` (AdaLoRA, eq. 3-4; PEFT's ``update_ipt``), with
    β1 ≠ β2 and non-zero history so that no coefficient can be swapped or dropped unnoticed. By hand: I = 2, Ī = 1,
    Ū = 0.5, β1 = 0.8, β2 = 0.6 -> Ī' = 0.8 + 0.4 = 1.2, Ū' = 0.3 + 0.4·0.8 = 0.62."""
    sens = torch.tensor([2.0, -1.0])
    ema, unc = update_importance(sens, torch.tensor([1.0, 0.0]), torch.tensor([0.5, 1.0]), 0.8, 0.6)
    # Second element: Ī' = 0.2·(-1) = -0.2, Ū' = 0.6 + 0.4·|-1 + 0.2| = 0.92.
    assert torch.allclose(ema, torch.tensor([1.2, -0.2]), atol=1e-6)
    assert torch.allclose(unc, torch.tensor([0.62, 0.92]), atol=1e-6)


@pytest.mark.parametrize(
    "t, want",
    [
        (1, (12, False)),  # warm-up: t <= tinit
        (2, (12, False)),
        (3, (8, False)),  # cubic: frac = 1 - 1/5 = 0.8 -> int(8·0.512 + 4) = 8; 3 % deltaT != 0
        (4, (5, True)),  # frac = 0.6 -> int(8·0.216 + 4) = 5; masks every deltaT = 2 steps
        (7, (4, False)),  # frac = 0 -> the target
        (8, (4, True)),  # final phase: t > total - tfinal, masks every step
    ],
)
def test_adalora_budget_schedule_by_hand(t, want):
    """init budget 12, target 4, tinit 2, tfinal 3, total 10, deltaT 2 (PEFT's ``budget_schedule``)."""
    assert budget_schedule(t, 12, 4, 2, 3, 10, 2) == want


def test_residual_init_set_again_starts_from_the_original_weight():
    """A residual init (PiSSA) leaves ``W − s·B0·A0`` in the base; setting new factors (a data-driven re-init) first
    gives ``s·B0·A0`` back, so the base is ``W − s·B1·A1``, and ejecting without merging restores ``W``. ``s`` is
    alpha / r = 1.5, so a dropped or doubled scale shows."""
    torch.manual_seed(0)
    model = Wrap(torch.nn.Linear(6, 5))
    w0 = model.layer.weight.detach().clone().double()
    la.inject(model, la.LoRAConfig(r=2, alpha=3.0, init_weights="pissa", target_modules=["layer"]))
    layer = model.layer.adapter["default"]
    s = 1.5
    a0, b0 = layer.init_A.double(), layer.init_B.double()
    assert torch.allclose(model.layer.weight.double(), w0 - s * b0 @ a0, atol=1e-5)
    a1, b1 = torch.randn(2, 6), torch.randn(5, 2)
    layer.set_residual(model.layer, a1, b1)
    assert torch.allclose(model.layer.weight.double(), w0 - s * b1.double() @ a1.double(), atol=1e-5)
    la.eject(model)
    assert torch.allclose(model.layer.weight.double(), w0, atol=1e-5)


SCALED = {
    "lora-conv-mergeable": (
        lambda: torch.nn.Conv2d(8, 12, 3, padding=1, groups=4),
        lambda: la.LoRAConfig(r=4, alpha=6.0, target_modules=["layer"]),
        (2, 8, 5, 5),
    ),
    # PEFT's layout reads every input channel in A (the ungrouped branch of delta_output).
    "lora-conv-peft": (
        lambda: torch.nn.Conv2d(8, 12, 3, padding=1, groups=4),
        lambda: la.LoRAConfig(r=4, alpha=6.0, grouped_conv_layout="peft", target_modules=["layer"]),
        (2, 8, 5, 5),
    ),
    # The lookup branch of delta_output (integer input).
    "lora-embedding": (
        lambda: torch.nn.Embedding(11, 6, padding_idx=1),
        lambda: la.LoRAConfig(r=3, alpha=5.0, target_modules=["layer"]),
        (3, 4),
    ),
    # transformers' scaled word embedding (forward = lookup · embed_scale): the term is scaled by it too.
    "lora-embedding-scaled": (
        lambda: BartScaledWordEmbedding(11, 6, padding_idx=1, embed_scale=2.5),
        lambda: la.LoRAConfig(r=3, alpha=5.0, target_modules=["layer"]),
        (3, 4),
    ),
    "adalora-linear": (
        lambda: torch.nn.Linear(10, 7),
        lambda: la.AdaLoRAConfig(init_r=3, target_r=2, alpha=5.0, total_step=10, target_modules=["layer"]),
        (3, 4, 10),
    ),
    "loha-linear": (
        lambda: torch.nn.Linear(10, 7),
        lambda: la.LoHaConfig(r=3, alpha=5.0, target_modules=["layer"]),
        (3, 4, 10),
    ),
    "lokr-linear": (
        lambda: torch.nn.Linear(10, 8),
        lambda: la.LoKrConfig(r=2, alpha=5.0, target_modules=["layer"]),
        (3, 4, 10),
    ),
}


@pytest.mark.parametrize("case", sorted(SCALED))
def test_scaled_adapter_is_the_base_plus_the_scaled_term(case):
    """``set_scale(s)`` runs an additive adapter as ``base(x) + s·term(x)`` (its ``delta_output``), a path of its
    own beside the adapted forward. Truth: the unscaled adapted forward, linear in the term:
    ``y_s = base + s·(y_1 − base)``, and every adapter gradient of ``Σ y_s·g`` is ``s`` times the one at 1."""
    make, config, shape = SCALED[case]
    torch.manual_seed(0)
    model = Wrap(make())
    la.inject(model, config())
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape) * 0.3)  # every factor non-zero (B, E, w2 start at 0)
    x = torch.randint(0, 11, shape) if "embedding" in case else torch.randn(*shape)
    with la.disabled(model):
        base = model(x).detach()
    g = torch.randn(base.shape)

    def run():
        y = model(x)
        return y.detach(), torch.autograd.grad((y * g).sum(), params)

    y1, grads1 = run()
    assert not torch.allclose(y1, base)
    la.set_scale(model, "default", 0.25)
    ys, grads = run()
    assert torch.allclose(ys, base + 0.25 * (y1 - base), atol=1e-5)
    for got, full in zip(grads, grads1):
        assert torch.allclose(got, 0.25 * full, atol=1e-5)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_set_rank_gives_fresh_factors_of_the_new_rank_and_its_scale(use_rslora):
    """EVA's redistribution: ``set_rank(r, alpha)`` makes ``lora_A (r, in)`` and ``lora_B = 0 (out, r)`` in the old
    factors' dtype, and the scale ``alpha / r`` (rsLoRA: ``alpha / √r``); r = 3 and alpha = 5 so that neither
    ``√r`` nor ``alpha / r`` is a whole number, and the output is the base's (B = 0)."""
    torch.manual_seed(0)
    model = Wrap(torch.nn.Linear(6, 5))
    la.inject(model, la.LoRAConfig(r=2, alpha=4.0, use_rslora=use_rslora, target_modules=["layer"]))
    layer = model.layer.adapter["default"]
    layer.set_rank(3, 5.0)
    assert layer.r == 3 and layer.alpha == 5.0
    assert layer.lora_A.shape == (3, 6) and layer.lora_B.shape == (5, 3)
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32
    assert isinstance(layer.lora_A, torch.nn.Parameter) and isinstance(layer.lora_B, torch.nn.Parameter)
    assert torch.count_nonzero(layer.lora_B) == 0
    assert layer.scale == pytest.approx(5.0 / (3**0.5 if use_rslora else 3))
    with torch.no_grad():
        layer.lora_A.normal_()
        layer.lora_B.normal_()
    x = torch.randn(4, 6)
    want = model.layer.weight @ x.T
    want = want.T + model.layer.bias + layer.scale * x @ layer.lora_A.T @ layer.lora_B.T
    assert torch.allclose(model(x), want, atol=1e-5)


@pytest.mark.parametrize("init", [True, "gaussian"])
def test_mha_lora_init_draws_a_from_the_named_distribution(init):
    """LoRA on ``nn.MultiheadAttention`` (E = 64, r = 4): the default init draws ``A`` (in and out projections)
    from Kaiming-uniform, bounded by ``1/√E = 0.125``; ``"gaussian"`` from ``N(0, 1/r)`` (PEFT's), std 0.25, so
    most entries lie beyond that bound. ``B`` starts at 0 either way."""
    torch.manual_seed(0)
    model = Wrap(torch.nn.MultiheadAttention(64, 4, batch_first=True))
    la.inject(model, la.LoRAConfig(r=4, alpha=4.0, init_weights=init, target_modules=["layer"]))
    layer = model.layer.adapter["default"]
    for a, b in ((layer.lora_A, layer.lora_B), (layer.out_lora_A, layer.out_lora_B)):
        a = a.detach()
        assert torch.count_nonzero(b) == 0
        if init == "gaussian":
            assert 0.2 < float(a.std()) < 0.3 and float((a.abs() > 0.125).float().mean()) > 0.5
        else:
            assert float(a.abs().max()) <= 0.125 + 1e-6


def test_target_parameters_take_rank_and_alpha_patterns_by_parameter_name():
    """``rank_pattern`` / ``alpha_pattern`` reach a targeted parameter by ``<module>.<parameter>`` as in PEFT (whose
    ``ParamWrapper`` gets rank 3 on ``block.w`` from the same config; the module name alone selects nothing):
    ``A`` of the 3-D ``w`` (3 experts) is (3·3, 8), the 2-D ``proj`` keeps r = 2 and takes alpha 12 (scale 6)."""
    import copy

    import peft

    from tests.peft_parity.test_lora_target_parameters import StackedNet

    select = dict(target_modules=[], target_parameters=["block.w", "block.proj"])
    ranks, alphas = {"block.w": 3, "block": 5}, {"block.proj": 12}
    base = StackedNet()
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=8, rank_pattern=ranks, alpha_pattern=alphas, **select)
    )
    peft_shapes = sorted(tuple(p.shape) for n, p in theirs.named_parameters() if "lora_A" in n)
    ours = la.inject(
        copy.deepcopy(base), la.LoRAConfig(r=2, alpha=8.0, rank_pattern=ranks, alpha_pattern=alphas, **select)
    )
    layer = ours.block.adapter["default"]
    assert sorted(tuple(a.shape) for a in layer.lora_A.values()) == peft_shapes == [(2, 6), (9, 8)]
    assert tuple(layer.lora_A["w"].shape) == (9, 8)
    assert layer.scales == {"w": pytest.approx(8.0 / 3), "proj": pytest.approx(12.0 / 2)}


def test_oft_layer_says_how_it_builds_its_rotation():
    """The layer's repr names the rotation: the Neumann series with its number of terms, or the exact Cayley
    transform, and the options that change it."""
    for neumann, want in ((True, "neumann(5)"), (False, "cayley")):
        model = Wrap(torch.nn.Linear(8, 8))
        la.inject(model, la.OFTConfig(oft_block_size=4, use_cayley_neumann=neumann, target_modules=["layer"]))
        text = repr(model.layer.adapter["default"])
        assert f"block_size=4, {want}, merged=False" in text, text


def test_eva_input_digest_tells_equal_inputs_from_different_ones():
    """EVA finds layers that read the same inputs by a digest of shape, dtype and bytes: equal tensors (also
    non-contiguous views of equal values) agree; another shape of the same bytes, another dtype of the same values,
    or one changed value do not; an empty tensor has one."""
    from lightning_adapters.methods.lora_eva import _digest

    x = torch.arange(12.0).reshape(3, 4)
    assert _digest(x) == _digest(x.clone()) == _digest(x.t().contiguous().t())
    others = [x.reshape(4, 3), x.double(), x + torch.eye(3, 4) * 1e-3, x.reshape(2, 6)]
    digests = {_digest(x), *(_digest(o) for o in others)}
    assert len(digests) == 1 + len(others)
    assert _digest(torch.empty(0, 4)) != _digest(torch.empty(4, 0))


def test_trainable_tokens_as_a_list_go_to_the_input_embedding_whatever_its_name():
    """``trainable_token_indices=[...]`` targets the model's input embedding as ``get_input_embeddings`` names it
    (PEFT's rule): GPT-2's is ``transformer.wte``, not an ``embed_tokens`` module."""
    from lightning_adapters.core.inject import adapted_modules
    from tests.helpers import tiny_gpt2

    model = tiny_gpt2()
    la.inject(model, la.LoRAConfig(r=2, target_modules=["c_attn"], trainable_token_indices=[1, 2]))
    adapted = {name for name, _, _ in adapted_modules(model)}
    assert "transformer.wte" in adapted and model.get_input_embeddings() is model.transformer.wte


def test_adalora_merge_folds_the_forward_and_unmerge_restores_the_weight():
    """Merged, the base alone gives the adapted output (the unmerged forward is the truth, with one pruned rank so
    the mask takes part); unmerged, the weight is the original again."""
    torch.manual_seed(0)
    model = Wrap(torch.nn.Linear(10, 7))
    la.inject(model, la.AdaLoRAConfig(init_r=3, target_r=2, alpha=5.0, total_step=10, target_modules=["layer"]))
    layer = model.layer.adapter["default"]
    with torch.no_grad():
        for p in (layer.lora_A, layer.lora_B, layer.lora_E):
            p.normal_()
        layer.rank_mask[1] = False
    w0 = model.layer.weight.detach().clone()
    x = torch.randn(4, 10)
    want = model(x).detach()
    la.merge(model)
    assert not torch.allclose(model.layer.weight, w0)
    plain = torch.nn.functional.linear(x, model.layer.weight, model.layer.bias)  # the merged base alone
    assert torch.allclose(plain, want, atol=1e-5) and torch.allclose(model(x), want, atol=1e-5)
    la.unmerge(model)
    assert torch.allclose(model.layer.weight, w0, atol=1e-6)
    assert torch.allclose(model(x), want, atol=1e-5)
