"""LoHa against PEFT 0.21: adapters move both ways through the PEFT format with equal outputs and gradients."""

from __future__ import annotations

import copy

import peft.tuners.loha.layer as peft_loha
import pytest
import torch
from peft import LoHaConfig as PeftLoHaConfig
from peft import get_peft_model

import lightning_adapters as la
from tests.peft_parity.lycoris_parity import (
    assert_gradients_match,
    build,
    check_ours_to_peft,
    check_peft_to_ours,
    gradients,
    out_of,
    peft_name,
    randomize_peft,
)

# (model, LoHaConfig kwargs: PEFT's and ours have the same field names). On these sizes r=4 folds ΔW into the
# base weight and r<=2 takes the rank-r² path on Linear layers, so both are compared with PEFT.
CASES = {
    "llama-qv": ("llama", dict(r=4, alpha=8, target_modules=["q_proj", "v_proj"])),
    "llama-all-linear-r2": ("llama", dict(r=2, alpha=3, target_modules="all-linear")),
    "llama-patterns": (
        "llama",
        dict(
            r=4,
            alpha=8,
            target_modules=["q_proj", "v_proj", "down_proj"],
            rank_pattern={"v_proj": 2},
            alpha_pattern={"q_proj": 3},
        ),
    ),
    "bert-save": (
        "bert",
        dict(
            r=3,
            alpha=5,
            target_modules=["query", "value", "intermediate.dense", "output.dense"],
            modules_to_save=["classifier"],
        ),
    ),
    "cnn": ("cnn", dict(r=2, alpha=4, target_modules=["conv1", "conv2", "fc"])),
    "cnn-effconv": ("cnn", dict(r=2, alpha=4, target_modules=["conv1", "conv2"], use_effective_conv2d=True)),
    "conv1d": ("conv1d", dict(r=3, alpha=4, target_modules=["conv1", "conv2", "fc"])),
    "conv1d-effconv": ("conv1d", dict(r=2, alpha=4, target_modules=["conv1", "conv2"], use_effective_conv2d=True)),
}


def _true_cp(t1, w1a, w1b, t2, w2a, w2b, scale):
    """The CP-form ΔW of FedPara written with differentiable einsums (its autograd gradient is the truth)."""
    f1 = torch.einsum("ijkl,jq,ip->pqkl", t1, w1b, w1a)
    f2 = torch.einsum("ijkl,jq,ip->pqkl", t2, w2b, w2a)
    return f1 * f2 * scale


@pytest.mark.parametrize("case", list(CASES))
def test_peft_to_ours_and_gradients(case, tmp_path, monkeypatch):
    model_name, kw = CASES[case]
    # PEFT's hand-written backward of the CP form gives wrong w1_a/w2_a gradients; compare with the true ones.
    monkeypatch.setattr(peft_loha, "make_weight_cp", _true_cp)
    peft_model, ours, x = check_peft_to_ours(model_name, PeftLoHaConfig(**kw), tmp_path)
    assert_gradients_match(gradients(peft_model, x), gradients(ours, x))


@pytest.mark.parametrize("case", list(CASES))
def test_ours_to_peft(case, tmp_path):
    model_name, kw = CASES[case]
    saved = check_ours_to_peft(model_name, la.LoHaConfig(**kw), "LOHA", tmp_path)
    assert saved["alpha"] == kw["alpha"] and saved["r"] == kw["r"]
    assert saved["use_effective_conv2d"] == kw.get("use_effective_conv2d", False)


def test_peft_cp_gradients_of_w_a_are_wrong(tmp_path):
    """Pins the PEFT 0.21 defect the parity test works around: its CP backward disagrees with autograd."""
    base, x = build("cnn")
    kw = dict(r=2, alpha=4, target_modules=["conv2"], use_effective_conv2d=True)
    peft_model = get_peft_model(copy.deepcopy(base), PeftLoHaConfig(**kw)).eval()
    randomize_peft(peft_model)
    peft_model.save_pretrained(tmp_path)
    ours = la.load_peft(copy.deepcopy(base), tmp_path).eval()
    theirs, mine = gradients(peft_model, x), gradients(ours, x)
    assert_gradients_match(theirs, mine, skip=("hada_w1_a", "hada_w2_a"))
    for tensor in ("hada_w1_a", "hada_w2_a"):
        g, ref = mine[f"conv2.adapter.default.{tensor}"], theirs[peft_name(f"conv2.adapter.default.{tensor}")]
        assert (g - ref).norm() / ref.norm() > 0.1


@pytest.mark.parametrize("module_dropout", [0.3, 0.0])
def test_training_dropout_draws_match_peft(tmp_path, module_dropout):
    """Rank and module dropout draw from the same generator in the same order as PEFT: equal training outputs.
    At module_dropout=0 (PEFT's default) PEFT still draws the module-dropout number before the rank mask."""
    kw = dict(
        r=2, alpha=4, target_modules=["q_proj", "v_proj", "up_proj"], rank_dropout=0.4, module_dropout=module_dropout
    )
    peft_model, ours, x = check_peft_to_ours("llama", PeftLoHaConfig(**kw), tmp_path)
    peft_model.train()
    ours.train()
    for seed in range(4):
        torch.manual_seed(seed)
        expected = out_of(peft_model, x)
        torch.manual_seed(seed)
        got = out_of(ours, x)
        assert torch.allclose(got, expected, atol=2e-5), (seed, (got - expected).abs().max())
