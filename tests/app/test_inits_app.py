"""The app exposes LoRA's inits (``method.init_weights``) and LoRA+ (``model.optimizer.loraplus_lr_ratio``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

import lightning_adapters as la
from lightning_adapters.train import method_config, train
from tests.app.conftest import compose_app, tiny


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_3", "olora", "orthogonal", "corda", "eva", "loftq", "false"])
def test_init_weights_composes(init: str, tmp_path: Path) -> None:
    cfg = compose_app([f"method.init_weights={init}"], tmp_path)
    config = method_config(cfg.method, head="head")
    assert config.init_weights == (False if init == "false" else init)


@pytest.mark.parametrize("init", ["corda", "eva"])
def test_data_driven_init_trains_in_the_app(init: str, tmp_path: Path) -> None:
    """The app's module hands its (ids, mask, y) batches to the data init as keyword arguments
    (``adapter_init_batch``), so CorDA and EVA run inside its fit; the exported adapter names the init."""
    cfg = compose_app([*tiny(), "trainer.fast_dev_run=true", f"method.init_weights={init}"], tmp_path)
    summary = train(cfg)
    assert 0 < summary["params/trainable"] < summary["params/total"]
    written = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert written["init_lora_weights"] == init


def test_adapter_init_batch_gives_eva_the_attention_mask(tmp_path: Path) -> None:
    """EVA reads only the positions the mask keeps: padding the batches with garbage tokens changes nothing."""
    from lightning_adapters.app.task import TextRegressor

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 100, (8, 6), generator=g)
    mask = torch.ones_like(ids)
    padded = torch.cat([ids, torch.randint(0, 100, (8, 3), generator=g)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(8, 3, dtype=torch.long)], dim=1)
    y = torch.zeros(8)
    cfg = la.LoRAConfig(r=2, target_modules=["query", "value"], init_weights="eva", eva_tau=0.8)
    factors = []
    for batch in ((ids, mask, y), (padded, padded_mask, y)):
        torch.manual_seed(0)
        module = instantiate(compose_app(["model=tiny_bert"], tmp_path).model)
        assert isinstance(module, TextRegressor)
        la.inject(module.backbone, cfg)
        la.initialize_from_data(module.backbone, [module.adapter_init_batch(batch)])
        factors.append({k: v for k, v in la.adapter_state_dict(module.backbone).items() if k.endswith("lora_A")})
    assert factors[0].keys() == factors[1].keys()
    for k in factors[0]:
        torch.testing.assert_close(factors[1][k], factors[0][k], rtol=1e-5, atol=1e-6)


def test_loftq_options_compose(tmp_path: Path) -> None:
    overrides = ["method.init_weights=loftq", "method.loftq_bits=8", "method.loftq_iter=2"]
    config = method_config(compose_app(overrides, tmp_path).method, head="head")
    assert (config.init_weights, config.loftq_bits, config.loftq_iter) == ("loftq", 8, 2)
    with pytest.raises(la.AdapterConfigError, match=r"loftq_bits must be one of \[4, 8\], got 2"):
        method_config(compose_app(["method.init_weights=loftq", "method.loftq_bits=2"], tmp_path).method, head="head")


def test_eva_options_compose(tmp_path: Path) -> None:
    overrides = ["method.init_weights=eva", "method.eva_rho=1.5", "method.eva_tau=0.9", "method.eva_whiten=true"]
    config = method_config(compose_app(overrides, tmp_path).method, head="head")
    assert (config.init_weights, config.eva_rho, config.eva_tau, config.eva_whiten) == ("eva", 1.5, 0.9, True)
    assert config.eva_use_label_mask and config.eva_adjust_scaling_factors and config.eva_label_mask_value == -100
    with pytest.raises(la.AdapterConfigError, match="eva_rho must be a finite number >= 1.*got 0.5"):
        method_config(compose_app(["method.init_weights=eva", "method.eva_rho=0.5"], tmp_path).method, head="head")


def test_loraplus_option_builds_peft_groups(tmp_path: Path) -> None:
    overrides = ["model=tiny_bert", "+model.optimizer.loraplus_lr_ratio=16", "method.target_modules=[query,value]"]
    cfg = compose_app(overrides, tmp_path)
    module = instantiate(cfg.model)
    la.inject(module, method_config(cfg.method, head="head"))
    lr, wd = cfg.model.optimizer.lr, cfg.model.optimizer.weight_decay
    opt = module._optimizer([p for p in module.parameters() if p.requires_grad])
    assert isinstance(opt, torch.optim.AdamW)
    expected = la.loraplus_param_groups(module, lr, 16, weight_decay=wd)
    assert [(g["lr"], g["weight_decay"], [id(p) for p in g["params"]]) for g in opt.param_groups] == [
        (g["lr"], g["weight_decay"], [id(p) for p in g["params"]]) for g in expected
    ]
    assert opt.param_groups[2]["lr"] == 16 * lr and opt.param_groups[2]["params"]  # every lora_B
    plain = instantiate(compose_app(["model=tiny_bert"], tmp_path).model)
    assert len(plain._optimizer(list(plain.parameters())).param_groups) == 1  # without the option: unchanged
