"""Method states that used to go silently wrong (issue 15): DoRA zero rows, BOFT zero scales, pruned AdaLoRA."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lightning_adapters as la
from tests.helpers import Wrap, randomize_adapter, tiny_llama, token_batch

# ------------------------------------------------------------------------------------------------------------
# DoRA on a weight with an all-zero row


def _zero_row_linear() -> nn.Module:
    torch.manual_seed(0)
    lin = nn.Linear(12, 6)
    with torch.no_grad():
        lin.weight[2].zero_()
    return Wrap(lin)


def _zero_row_conv() -> nn.Module:
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    with torch.no_grad():
        conv.weight[2].zero_()
    return Wrap(conv)


def _zero_row_embedding() -> nn.Module:
    torch.manual_seed(0)
    emb = nn.Embedding(10, 6)
    with torch.no_grad():
        emb.weight[:, 2].zero_()  # output feature 2 of every token: DoRA's "row" of an embedding
    return Wrap(emb)


CASES = {
    "linear": (_zero_row_linear, lambda: torch.randn(5, 12), 1),
    "conv2d": (_zero_row_conv, lambda: torch.randn(2, 4, 5, 5), 1),
    "embedding": (_zero_row_embedding, lambda: torch.randint(0, 10, (3, 4)), -1),
}


@pytest.mark.parametrize("kind", sorted(CASES))
def test_dora_is_the_base_at_init_with_an_all_zero_row_and_gradients_are_finite(kind):
    make, make_x, _ = CASES[kind]
    model = make()
    x = make_x()
    ref = model(x)
    la.inject(model, la.LoRAConfig(r=2, use_dora=True, target_modules=["layer"]))
    out = model(x)
    assert torch.equal(out, ref)
    model.train()
    model(x).pow(2).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads.values())


def test_dora_zero_row_against_peft_and_the_formula():
    """PEFT divides 0 by 0 there (NaN in that output); every other output equals PEFT's, and ours follows the
    formula ``m / ||W + ΔW||`` with the factor of the direction-less zero row taken as 0 (the output is the bias)."""
    from peft import LoraConfig, get_peft_model

    model = _zero_row_linear()
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, use_dora=True, target_modules=["layer"]))
    la.inject(model, la.LoRAConfig(r=2, use_dora=True, target_modules=["layer"]))
    randomize_adapter(model, std=0.3)
    with torch.no_grad():
        model.layer.adapter.default.lora_B[2].zero_()  # keep W + ΔW zero in row 2
        inner = peft_model.base_model.model.layer
        inner.lora_A["default"].weight.copy_(model.layer.adapter.default.lora_A)
        inner.lora_B["default"].weight.copy_(model.layer.adapter.default.lora_B)
        inner.lora_magnitude_vector["default"].weight.copy_(model.layer.adapter.default.magnitude)
    x = torch.randn(5, 12)
    ours, theirs = model(x), peft_model(x)
    assert torch.isnan(theirs[:, 2]).all()
    keep = [i for i in range(6) if i != 2]
    assert torch.allclose(ours[:, keep], theirs[:, keep], atol=1e-6)
    # The formula, row by row: y = (m / ||W + ΔW||) ⊙ ((W + ΔW) x) + b, with 0 for the zero row.
    lin, layer = model.layer, model.layer.adapter.default
    w = lin.weight + layer.delta_weight()
    norm = w.norm(dim=1)
    factor = torch.where(norm == 0, torch.zeros_like(norm), layer.magnitude / norm.clamp_min(1e-30))
    assert torch.allclose(ours, (x @ w.t()) * factor + lin.bias, atol=1e-6)
    assert torch.equal(ours[:, 2], lin.bias[2].expand(5))


@pytest.mark.parametrize("kind", sorted(CASES))
def test_dora_merge_with_a_zero_factor_unmerges_to_a_finite_exact_base(kind):
    """A learned magnitude of 0 scales a non-zero row to 0: merging keeps the row, unmerge puts it back."""
    make, make_x, _ = CASES[kind]
    model = make()
    base = model.layer
    la.inject(model, la.LoRAConfig(r=2, use_dora=True, target_modules=["layer"]))
    randomize_adapter(model, std=0.3)
    with torch.no_grad():
        model.layer.adapter.default.magnitude.view(-1)[1] = 0.0
    original = base.weight.detach().clone()
    x = make_x()
    unmerged = model(x)
    for safe in (False, True):
        la.merge(model, safe=safe)
        assert torch.allclose(model(x), unmerged, atol=1e-5)
        la.unmerge(model)
        assert torch.isfinite(base.weight).all()
        assert torch.allclose(base.weight, original, atol=1e-5)
        row = (lambda w: w[:, 1]) if kind == "embedding" else (lambda w: w[1])
        assert torch.equal(row(base.weight), row(original))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kind", sorted(CASES))
def test_dora_merge_keeps_rows_whose_factor_is_below_the_weight_dtype_s_smallest_normal(kind, dtype):
    """A factor under the weight dtype's smallest normal leaves the merged row subnormal (a few bits, or 0):
    merge keeps it and unmerge puts it back bit for bit; a factor above that bound is divided back."""
    make, _, _ = CASES[kind]
    model = make().to(dtype)
    base = model.layer
    la.inject(model, la.LoRAConfig(r=2, use_dora=True, target_modules=["layer"]))
    randomize_adapter(model, std=0.3)
    layer = model.layer.adapter.default
    tiny = torch.finfo(dtype).tiny
    norm = layer._dora_norm(base).reshape(-1).double()
    with torch.no_grad():
        m = layer.magnitude.view(-1)
        m[1] = tiny / 2 * float(norm[1])  # factor tiny/2: subnormal, with a finite reciprocal: stashed
        m[2] = tiny * 2**8 * float(norm[2])  # factor 256·tiny: normal, divided back
    original = base.weight.detach().clone()
    la.merge(model)
    assert layer.merge_rows_idx.tolist() == [1]
    la.unmerge(model)
    row = (lambda w, i: w[:, i]) if kind == "embedding" else (lambda w, i: w[i])
    assert torch.equal(row(base.weight, 1), row(original, 1))
    tol = 1e-5 if dtype == torch.float32 else 4e-3
    assert torch.allclose(row(base.weight, 2).float(), row(original, 2).float(), atol=tol, rtol=tol)


# ------------------------------------------------------------------------------------------------------------
# Pruned AdaLoRA: the export equals the model in memory


def _base() -> nn.Module:
    torch.manual_seed(0)
    return tiny_llama()


def _pruned_adalora_state() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """An AdaLoRA model whose masks prune ranks that still hold singular values (soft masking between masks)."""
    model = la.inject(_base(), la.AdaLoRAConfig(init_r=4, target_r=2, target_modules=["q_proj", "v_proj"]))
    randomize_adapter(model, std=0.3)
    sd = {k: v.clone() for k, v in la.adapter_state_dict(model).items()}
    for k in sd:
        if k.endswith("rank_mask"):
            sd[k] = torch.tensor([True, False, True, False])
    sd["model.layers.1.self_attn.v_proj.adapter.default.rank_mask"] = torch.zeros(4, dtype=torch.bool)
    la.load_adapter_state_dict(model, sd)
    return model, sd


def test_pruned_adalora_with_live_singular_values_exports_what_is_in_memory(tmp_path):
    from peft import PeftModel

    model, sd = _pruned_adalora_state()
    assert all(v.abs().sum() > 0 for k, v in sd.items() if k.endswith("lora_E"))
    ids = token_batch(128, (2, 9), seed=3)
    model.eval()
    with torch.no_grad():
        expected = model(ids).logits
    la.save_peft(model, tmp_path)
    with torch.no_grad():
        peft_model = PeftModel.from_pretrained(_base(), tmp_path).eval()
        ours = la.load_peft(_base(), tmp_path).eval()
        assert torch.allclose(peft_model(ids).logits, expected, atol=1e-5)
        assert torch.allclose(ours(ids).logits, expected, atol=1e-5)


def test_pruned_adalora_with_zeroed_singular_values_keeps_the_learned_pattern(tmp_path):
    import json

    model, sd = _pruned_adalora_state()
    for layer in la.methods.adalora.adalora_layers(model).values():
        layer.apply_mask(layer.rank_mask.clone())  # what the allocator does: zero the pruned singular values
    la.save_peft(model, tmp_path)
    pattern = json.loads((tmp_path / "adapter_config.json").read_text())["rank_pattern"]
    assert pattern["model.layers.0.self_attn.q_proj.lora_E"] == [True, False, True, False]
    assert pattern["model.layers.1.self_attn.v_proj.lora_E"] == [False] * 4


@pytest.mark.parametrize(
    "spoil, match",
    [
        (lambda st: st["rank_mask"].update({next(iter(st["rank_mask"])): [1, 0.5, 0, 1]}), r"rank_mask\[.*0/1 flags"),
        (lambda st: st["rank_mask"].update({next(iter(st["rank_mask"])): [True, False]}), r"want 4 0/1 flags"),
        (lambda st: st["ema"][next(iter(st["ema"]))].update(lora_A=torch.zeros(3)), r"ema\[.*'lora_A'\] does not fit"),
        (lambda st: st.pop("updates"), r"lacks \['updates'\]"),
    ],
    ids=["half-flag", "short-flags", "ema-shape", "missing-entry"],
)
def test_allocator_state_is_checked_before_anything_changes(spoil, match):
    from lightning_adapters.methods.adalora import RankAllocator

    model = la.inject(tiny_llama(), la.AdaLoRAConfig(init_r=4, target_r=2, total_step=10, target_modules=["q_proj"]))
    randomize_adapter(model, std=0.3)
    source = RankAllocator(model, la.config_of(model))
    source.update_importance()
    source.allocate(5)
    state = copy.deepcopy(source.state_dict())
    spoil(state)
    target = RankAllocator(model, la.config_of(model))
    masks = {n: layer.rank_mask.clone() for n, layer in target.layers.items()}
    with pytest.raises(la.AdapterStateError, match=match):
        target.load_state_dict(state)
    assert all(torch.equal(layer.rank_mask, masks[n]) for n, layer in target.layers.items())
    assert target.ema == {} and target.updates == 0
