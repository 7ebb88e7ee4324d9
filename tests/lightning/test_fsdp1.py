"""FSDP1 (``FSDPStrategy``) on CUDA with bf16: separate units for frozen and trainable parameters, adapter-only
checkpoints, resume, PEFT export. Skipped without CUDA; ``pytest tests/lightning -k fsdp1`` runs it on a GPU."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

import lightning_adapters as la
from lightning_adapters.core.layer import AdapterLayer
from tests.lightning.models import TinyLlamaLM, token_data, trainer

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="FSDPStrategy needs CUDA"),
    pytest.mark.xdist_group("procs"),
]

QV = ["q_proj", "v_proj"]


def fsdp1_trainer(**kw):
    from lightning.pytorch.strategies import FSDPStrategy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    policy = la.adapter_auto_wrap_policy({LlamaDecoderLayer})
    return trainer(accelerator="cuda", devices=1, strategy=FSDPStrategy(auto_wrap_policy=policy), **kw)


def unit_params(strategy_model):
    """For every FSDP unit: (requires_grad flags, dtypes) of the original parameters it flattens."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    out = []
    for unit in FSDP.fsdp_modules(strategy_model):
        handle = unit._handle
        if handle is None:
            continue
        params = handle.flat_param._params
        out.append(({p.requires_grad for p in params}, {p.dtype for p in params}, unit.module))
    return out


@pytest.mark.parametrize("precision", ["bf16-true", "bf16-mixed"])
def test_fsdp1_units_keep_frozen_and_trainable_apart(precision, tmp_path):
    model = TinyLlamaLM(lr=0.5)
    cfg = la.LoRAConfig(r=2, alpha=4.0, target_modules=QV)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    cb = la.AdapterCallback(cfg, module="model", export_peft_dir=tmp_path / "peft", verbose=False)
    t = fsdp1_trainer(max_epochs=1, precision=precision, callbacks=[cb, ckpt])
    t.fit(model, token_data())

    units = unit_params(t.strategy.model)
    adapter_units = [u for u in units if isinstance(u[2], AdapterLayer)]
    assert len(adapter_units) == 4
    for flags, dtypes, module in units:
        assert len(flags) == 1 and len(dtypes) == 1, type(module).__name__  # one requires_grad, one dtype per unit
    for flags, dtypes, _ in adapter_units:
        assert flags == {True} and dtypes == {torch.float32}  # fp32 adapters, even on a bf16-true base

    shapes = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["state_dict"]
    reference = TinyLlamaLM()
    la.inject(reference.model, cfg)
    want = {f"model.{k}": list(v.shape) for k, v in la.adapter_state_dict(reference.model).items()}
    assert {k: list(v.shape) for k, v in shapes.items()} == want  # adapter only, full shapes

    # The checkpoint restores on a plain CPU model and matches the PEFT export.
    from peft import PeftModel

    restored = la.restore_from_checkpoint(TinyLlamaLM().model, tmp_path / "ckpt" / "last.ckpt")
    peft_model = PeftModel.from_pretrained(TinyLlamaLM().model, tmp_path / "peft").eval()
    ids = token_data().dataset.tensors[0][:2]
    with torch.no_grad():
        torch.testing.assert_close(
            peft_model(input_ids=ids).logits, restored.eval()(input_ids=ids).logits, atol=1e-5, rtol=0
        )
    lora_b = [v for k, v in shapes.items() if k.endswith("lora_B")]
    assert all(v.abs().sum() > 0 for v in lora_b)

    resumed = TinyLlamaLM(lr=0.5)
    t2 = fsdp1_trainer(
        max_epochs=2, precision=precision, callbacks=[la.AdapterCallback(cfg, module="model", verbose=False)]
    )
    t2.fit(resumed, token_data(), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert t2.global_step == 2 * t.global_step
