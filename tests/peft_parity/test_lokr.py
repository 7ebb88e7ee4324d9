"""LoKr against PEFT 0.21: adapters move both ways through the PEFT format with equal outputs and gradients."""

from __future__ import annotations

import pytest
import torch
from peft import LoKrConfig as PeftLoKrConfig
from peft.tuners.lokr.layer import factorization as peft_factorization

import lightning_adapters as la
from lightning_adapters.methods.lokr import factorization
from tests.helpers import tiny_llama
from tests.peft_parity.lycoris_parity import (
    assert_gradients_match,
    check_ours_to_peft,
    check_peft_to_ours,
    gradients,
    out_of,
)

# (model, LoKrConfig kwargs: PEFT's and ours have the same field names). Tiny Llama's 64-wide layers split as
# (8, 8); r >= 4 keeps w2 full, smaller r makes it low-rank, decompose_both also splits w1.
CASES = {
    "llama-qv-full": ("llama", dict(r=4, alpha=8, target_modules=["q_proj", "v_proj"])),
    "llama-all-linear-lowrank": ("llama", dict(r=1, alpha=3, target_modules="all-linear")),
    "llama-both": ("llama", dict(r=2, alpha=4, decompose_both=True, target_modules=["q_proj", "v_proj", "up_proj"])),
    "llama-factor4": ("llama", dict(r=2, alpha=4, decompose_factor=4, target_modules=["k_proj", "down_proj"])),
    "llama-patterns": (
        "llama",
        dict(
            r=4, alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 1}, alpha_pattern={"q_proj": 3}
        ),
    ),
    "bert-save": (
        "bert",
        dict(r=2, alpha=5, target_modules=["query", "value", "intermediate.dense"], modules_to_save=["classifier"]),
    ),
    "cnn-full": ("cnn", dict(r=4, alpha=4, target_modules=["conv1", "conv2", "fc"])),
    "cnn-lowrank": ("cnn", dict(r=1, alpha=2, target_modules=["conv1", "conv2", "fc"])),
    "cnn-effconv": ("cnn", dict(r=1, alpha=2, target_modules=["conv2"], use_effective_conv2d=True)),
    "cnn-both-factor": ("cnn", dict(r=1, alpha=2, decompose_both=True, decompose_factor=2, target_modules=["conv2"])),
    "conv1d-full": ("conv1d", dict(r=4, alpha=3, target_modules=["conv1", "conv2", "fc"])),
    "conv1d-lowrank": ("conv1d", dict(r=1, alpha=3, target_modules=["conv1", "conv2"])),
}


@pytest.mark.parametrize("case", list(CASES))
def test_peft_to_ours_and_gradients(case, tmp_path):
    model_name, kw = CASES[case]
    peft_model, ours, x = check_peft_to_ours(model_name, PeftLoKrConfig(**kw), tmp_path)
    assert_gradients_match(gradients(peft_model, x), gradients(ours, x))


@pytest.mark.parametrize("case", list(CASES))
def test_ours_to_peft(case, tmp_path):
    model_name, kw = CASES[case]
    saved = check_ours_to_peft(model_name, la.LoKrConfig(**kw), "LOKR", tmp_path)
    assert saved["alpha"] == kw["alpha"] and saved["r"] == kw["r"]
    assert saved["decompose_both"] == kw.get("decompose_both", False)
    assert saved["decompose_factor"] == kw.get("decompose_factor", -1)


def test_lycoris_init_round_trip(tmp_path):
    kw = dict(r=1, alpha=2, init_weights="lycoris", rank_dropout_scale=True, target_modules=["q_proj"])
    saved = check_ours_to_peft("llama", la.LoKrConfig(**kw), "LOKR", tmp_path)
    assert saved["init_weights"] == "lycoris" and saved["rank_dropout_scale"] is True
    ours = la.load_peft(tiny_llama(), tmp_path)
    assert la.config_of(ours).init_weights == "lycoris"


@pytest.mark.parametrize("scale, module_dropout", [(False, 0.3), (True, 0.3), (True, 0.0)])
def test_training_dropout_draws_match_peft(tmp_path, scale, module_dropout):
    """Rank and module dropout draw from the same generator in the same order as PEFT: equal training outputs.
    At module_dropout=0 (PEFT's default) PEFT still draws the module-dropout number before the rank mask."""
    kw = dict(
        r=1,
        alpha=2,
        target_modules=["q_proj", "v_proj", "up_proj"],
        rank_dropout=0.4,
        module_dropout=module_dropout,
        rank_dropout_scale=scale,
    )
    peft_model, ours, x = check_peft_to_ours("llama", PeftLoKrConfig(**kw), tmp_path)
    peft_model.train()
    ours.train()
    for seed in range(4):
        torch.manual_seed(seed)
        expected = out_of(peft_model, x)
        torch.manual_seed(seed)
        got = out_of(ours, x)
        assert torch.allclose(got, expected, atol=2e-5), (seed, (got - expected).abs().max())


def test_factorization_equals_peft():
    for dim in range(1, 400):
        for factor in (-1, 1, 2, 3, 4, 5, 7, 8, 16):
            assert factorization(dim, factor) == peft_factorization(dim, factor), (dim, factor)
