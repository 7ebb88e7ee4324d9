"""QLoRA on CUDA: Lightning's BitsandbytesPrecision plugin with AdapterCallback, and FSDP2 + QLoRA (torchao and
bitsandbytes NF4).

Skipped without CUDA (CI has none); run on a GPU machine with ``pytest tests/gpu``. ``LA_TEST_DEVICE=cpu`` runs
the FSDP2 check on the CPU (gloo), a dry run of its logic; the BitsandbytesPrecision plugin itself needs CUDA.
"""

from __future__ import annotations

import copy
import os

import lightning as L
import pytest
import torch
from lightning.pytorch.strategies import ModelParallelStrategy

import lightning_adapters as la
from lightning_adapters.core.quant import is_quantized, quant_scheme
from tests.helpers import tiny_llama
from tests.lightning.models import TinyLlamaLM, token_data

pytest.importorskip("bitsandbytes")
DEV = os.environ.get("LA_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEV == "cuda" and not torch.cuda.is_available(), reason="needs CUDA")


def _adapter(module: L.LightningModule) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in la.adapter_state_dict(module).items():
        out[k] = (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().float().cpu().clone()
    return out


# Lightning's modes and the compute dtype each accepts (its int8 modes insist on float16). "int8-training" trains
# the int8 layer's own fp16 weights: not a frozen base, refused at injection (tests/reliability/rows_quant.py).
PLUGIN_MODES = {"nf4": torch.bfloat16, "nf4-dq": torch.bfloat16, "int8": torch.float16}


class EagerLlamaLM(TinyLlamaLM):
    """TinyLlamaLM without ``configure_model``: Lightning runs that hook inside the precision plugin's init context,
    which BitsandbytesPrecision refuses when ``ignore_modules`` is set (it would build the layers on the device)."""

    configure_model = L.LightningModule.configure_model


@pytest.mark.skipif(not torch.cuda.is_available(), reason="BitsandbytesPrecision needs CUDA")
@pytest.mark.parametrize("mode", list(PLUGIN_MODES))
def test_qlora_with_bitsandbytes_precision(mode: str) -> None:
    from lightning.pytorch.plugins import BitsandbytesPrecision

    dtype = PLUGIN_MODES[mode]
    module = EagerLlamaLM(lr=0.05)  # a plain fp32 model built in __init__: the plugin converts its Linear layers
    trainer = L.Trainer(
        accelerator="cuda",
        devices=1,
        max_steps=4,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        plugins=BitsandbytesPrecision(mode=mode, dtype=dtype, ignore_modules={"model.lm_head"}),
        callbacks=[la.AdapterCallback(la.LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]), verbose=False)],
    )
    trainer.fit(module, token_data())
    q = module.model.model.layers[0].self_attn.q_proj
    assert is_quantized(q) and q.weight.device.type == "cuda"
    assert quant_scheme(q) == ("int8" if mode == "int8" else "nf4")
    assert q.adapter.default.lora_A.dtype == torch.float32 and q.adapter.default.lora_A.device.type == "cuda"
    assert float(q.adapter.default.lora_B.abs().max()) > 0  # the adapter trained (B starts at zero)
    ids = next(iter(token_data()))[0].cuda()
    with torch.no_grad():
        start = module.model(ids).logits.float()
    assert torch.isfinite(start).all()
    # eject(dtype=...) makes the quantized layers plain ones in that dtype; the rest of the model follows for serving.
    plain = la.eject(copy.deepcopy(module.model), merge=True, dtype=dtype).to(dtype)
    assert not any(is_quantized(m) for m in plain.modules())
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits.float(), start, atol=0.1)


class QuantLlamaLM(TinyLlamaLM):
    """A tiny Llama whose block Linears are quantized when it is built (in ``configure_model`` under FSDP2)."""

    def __init__(self, scheme: str, **kwargs: object) -> None:
        self.scheme = scheme  # before TinyLlamaLM.__init__, which may build the model
        super().__init__(**kwargs)

    def _build(self) -> torch.nn.Module:
        torch.manual_seed(self.seed)
        with torch.device("cpu"):  # Lightning's single-device init context would draw the weights on the GPU
            model = tiny_llama(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=4)
        return la.quantize(model.to(DEV), self.scheme)


# One rank: torchao NF4 weights stay whole (torch's world-size-1 fully_shard path cannot gather them, see
# core.quant.fsdp2_kept_whole), as bitsandbytes weights always do; tests/lightning/test_processes.py covers two ranks.
@pytest.mark.parametrize("scheme", ["torchao_nf4", "nf4"])
def test_fsdp2_qlora_equals_single_device(scheme: str) -> None:
    if scheme.startswith("torchao"):
        pytest.importorskip("torchao")
    config = la.LoRAConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"])

    def fit(strategy: object) -> dict[str, torch.Tensor]:
        module = QuantLlamaLM(scheme, lr=0.05, build_in_configure_model=True)
        trainer = L.Trainer(
            accelerator="cuda" if DEV == "cuda" else "cpu",
            devices=1,
            strategy=strategy,
            max_steps=3,
            use_distributed_sampler=False,  # Lightning's sampler would shuffle under FSDP2: other batches
            logger=False,
            enable_progress_bar=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            callbacks=[la.AdapterCallback(config, module="model", verbose=False)],
        )
        trainer.fit(module, token_data())
        assert is_quantized(module.model.model.layers[0].self_attn.q_proj)
        return _adapter(module)

    single = fit("auto")
    sharded = fit(
        ModelParallelStrategy(
            data_parallel_size=1, tensor_parallel_size=1, **({} if DEV == "cuda" else {"process_group_backend": "gloo"})
        )
    )
    assert single.keys() == sharded.keys()
    for k in single:
        assert torch.allclose(sharded[k], single[k], atol=1e-4), k
