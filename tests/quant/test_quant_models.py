"""Quantized bases in real models and in Lightning: transformers' BitsAndBytesConfig, Llama-Adapter on a 4-bit
Llama, k-bit preparation by the callback, adapter-only checkpoints and a Hydra QLoRA run."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

import lightning_adapters as la
from lightning_adapters.core.quant import is_quantized, quant_scheme
from tests.helpers import randomize_adapter, tiny_llama
from tests.lightning.models import TinyLlamaLM, token_data

pytest.importorskip("bitsandbytes")


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("load", ["4bit", "8bit", "torchao_int8"])
def test_model_loaded_by_transformers_with_a_quantization_config(load: str, tmp_path) -> None:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    torch.manual_seed(0)
    tiny_llama().save_pretrained(tmp_path)
    if load == "torchao_int8":
        from torchao.quantization import Int8WeightOnlyConfig
        from transformers import TorchAoConfig

        qc = TorchAoConfig(Int8WeightOnlyConfig())
    elif load == "4bit":
        qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    else:
        qc = BitsAndBytesConfig(load_in_8bit=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=qc, device_map="cpu")
    expected = {"4bit": "nf4", "8bit": "int8", "torchao_int8": "torchao_int8"}[load]
    assert quant_scheme(model.model.layers[0].self_attn.q_proj) == expected
    model.train()  # bitsandbytes' training kernels (its eval kernels differ by their own rounding)
    ids = _ids()
    base = model(ids).logits
    la.inject(model, la.LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert torch.allclose(model(ids).logits, base, atol=1e-4)
    randomize_adapter(model)
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    # A dequantized merged export loads as a plain transformers model with the adapted outputs.
    with torch.no_grad():
        adapted = model(ids).logits
    la.export_merged(model, tmp_path / "merged", dtype=torch.float32)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").train()
    assert getattr(plain.config, "quantization_config", None) is None
    assert type(plain.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, adapted, atol=1e-4)
    assert is_quantized(model.model.layers[0].self_attn.q_proj)  # the model itself is untouched


def test_llama_adapter_on_a_4bit_llama_is_unchanged() -> None:
    torch.manual_seed(0)
    model = la.quantize(tiny_llama(), "nf4").train()
    assert is_quantized(model.model.layers[1].self_attn.q_proj) and not is_quantized(model.lm_head)
    ids = _ids()
    base = model(ids).logits
    la.inject(model, la.LlamaAdapterConfig(adapter_len=4, adapter_layers=1))
    assert torch.allclose(model(ids).logits, base, atol=1e-5)  # the gate starts at zero
    randomize_adapter(model)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None and torch.isfinite(p.grad).all() for _, p in trainable)


class QLlamaLM(TinyLlamaLM):
    """A bf16 tiny Llama quantized to NF4 (the user's module; it knows nothing about adapters)."""

    def _build(self) -> torch.nn.Module:
        torch.manual_seed(self.seed)
        return la.quantize(tiny_llama(torch_dtype=torch.bfloat16).to(torch.bfloat16), "nf4", compute_dtype="bfloat16")


def test_callback_prepares_kbit_training_and_checkpoints_only_the_adapter(tmp_path) -> None:
    module = QLlamaLM(lr=0.05)
    assert module.model.model.norm.weight.dtype == torch.bfloat16
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_train_steps=2)
    weights = ModelCheckpoint(dirpath=tmp_path / "w", save_weights_only=True, every_n_train_steps=4, save_top_k=-1)
    trainer = L.Trainer(
        max_steps=4,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[
            la.AdapterCallback(la.LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]), verbose=False),
            ckpt,
            weights,
        ],
    )
    trainer.fit(module, token_data())
    trainer.save_checkpoint(tmp_path / "w" / "manual.ckpt", weights_only=True)
    model = module.model
    # k-bit preparation, without a call by the user: norms, embeddings, head and adapters in fp32.
    assert model.model.norm.weight.dtype == torch.float32
    assert model.model.layers[0].input_layernorm.weight.dtype == torch.float32
    assert model.lm_head.weight.dtype == torch.float32
    assert model.model.layers[0].self_attn.q_proj.adapter.default.lora_A.dtype == torch.float32
    assert is_quantized(model.model.layers[0].self_attn.q_proj)
    adapter = set(la.adapter_state_dict(module))
    files = sorted(tmp_path.glob("*.ckpt")) + sorted((tmp_path / "w").glob("*.ckpt"))
    assert len(files) == 4
    for path in files:
        sd = torch.load(path, weights_only=True)["state_dict"]
        assert set(sd) == adapter, path.name
        assert all(v.is_floating_point() for v in sd.values())
        assert not any(k.rsplit(".", 1)[-1] in ("absmax", "quant_map", "SCB", "weight_format") for k in sd)


@pytest.mark.parametrize("option", ["nf4", "nf4_double", "fp4", "int8"])
def test_hydra_quantization_option_quantizes_the_backbone_only(option: str, tmp_path) -> None:
    from lightning_adapters.train import build
    from tests.app.conftest import compose_app, tiny

    # (torchao_nf4 needs bigger layers than tiny_bert's: tests/app/test_train.py builds it on the default encoder)
    cfg = compose_app([*tiny(), f"quantization={option}"], tmp_path)
    job = build(cfg)
    layer = job.task.backbone.encoder.layer[0]
    assert quant_scheme(layer.attention.self.query) == cfg.quantization.scheme
    assert quant_scheme(layer.output.dense) == cfg.quantization.scheme
    assert not is_quantized(job.task.head)
    if option == "nf4_double":
        assert layer.attention.self.query.weight.quant_state.nested


def test_fsdp2_keeps_whole_what_it_cannot_shard() -> None:
    pytest.importorskip("torchao")
    from torch import nn

    from lightning_adapters.core.quant import fsdp2_kept_whole

    # torchao NF4 in blocks of 64 with 256 scales per scale-of-scales block: 16384 weights per such block.
    model = nn.ModuleDict(
        {
            "one_block": nn.Linear(128, 128),  # 1 scale-of-scales block: splits over no mesh > 1
            "four_blocks": nn.Linear(256, 256),  # 4: splits over 2 and 4 ranks, not 8
            "bnb": nn.Linear(64, 64),
            "int8": nn.Linear(64, 64),
            "plain": nn.Linear(64, 64),
        }
    )
    la.quantize(model, "torchao_nf4", skip=["bnb", "int8", "plain"])
    la.quantize(model, "nf4", skip=["int8", "plain"])
    la.quantize(model, "torchao_int8", skip=["plain"])
    assert model["four_blocks"].weight.quantization_factor.numel() == 4
    always = {model["bnb"].weight, model["int8"].weight}
    one, four = model["one_block"].weight, model["four_blocks"].weight
    assert fsdp2_kept_whole(model, 1) == always | {one, four}  # torch's world-size-1 path cannot gather NF4
    assert fsdp2_kept_whole(model, 2) == always | {one}
    assert fsdp2_kept_whole(model, 4) == always | {one}
    assert fsdp2_kept_whole(model, 8) == always | {one, four}


@pytest.mark.parametrize("scheme", ["int8", "nf4"])
def test_export_merged_keeping_layers_quantized_by_quantize_is_refused_naming_the_fix(scheme: str, tmp_path) -> None:
    """transformers rebuilds quantized layers only from a quantization_config, which ``la.quantize`` does not write:
    an int8 export would reload silently as its integer codes. Refused before anything is written; dequantized
    (``dtype=``) it reloads with the adapted outputs."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = la.quantize(tiny_llama(), scheme).train()
    la.inject(model, la.LoRAConfig(r=2, target_modules=["q_proj"]))
    randomize_adapter(model)
    with pytest.raises(
        la.AdapterConfigError, match=rf"'model.layers.0.self_attn.q_proj' and 13 more .*\({scheme}\).*dtype="
    ):
        la.export_merged(model, tmp_path / "kept")
    assert not (tmp_path / "kept").exists() or not any((tmp_path / "kept").iterdir())
    la.export_merged(model, tmp_path / "plain", dtype=torch.float32)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "plain").train()
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, model(ids).logits, atol=1e-4, rtol=0)


def test_export_merged_of_a_transformers_torchao_int8_model_keeps_it_quantized_and_reloads(tmp_path) -> None:
    """The finiteness check reads a torchao weight dequantized (its tensor has no ``abs``)."""
    pytest.importorskip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import AutoModelForCausalLM, TorchAoConfig

    torch.manual_seed(0)
    tiny_llama().save_pretrained(tmp_path / "base")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(
            tmp_path / "base", quantization_config=TorchAoConfig(Int8WeightOnlyConfig()), device_map="cpu"
        )
    la.inject(model, la.LoRAConfig(r=2, target_modules=["q_proj"]))
    randomize_adapter(model)
    la.export_merged(model, tmp_path / "merged")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", device_map="cpu")
    assert quant_scheme(back.model.layers[0].self_attn.q_proj) == "torchao_int8"
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits, atol=1e-3, rtol=0)
