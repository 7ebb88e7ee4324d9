"""The app exposes LoRA's inits (``method.init_weights``) and LoRA+ (``model.optimizer.loraplus_lr_ratio``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

import lightning_adapters as la
from lightning_adapters.train import method_config
from tests.app.conftest import compose_app


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_3", "olora", "orthogonal", "corda", "eva", "loftq", "false"])
def test_init_weights_composes(init: str, tmp_path: Path) -> None:
    cfg = compose_app([f"method.init_weights={init}"], tmp_path)
    config = method_config(cfg.method, head="head")
    assert config.init_weights == (False if init == "false" else init)


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
