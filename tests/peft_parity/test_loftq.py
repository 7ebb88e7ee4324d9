"""LoftQ (``init_weights="loftq"``) against PEFT 0.21's ``loftq_init``: quantised base, factors, files both ways.

PEFT 0.21.2 runs LoftQ only on CUDA/XPU: ``loftq_init`` moves the weight to a hard-coded ``"cuda"`` compute device
(bitsandbytes itself quantises on CPU since 0.45). The oracle here is PEFT's own ``loftq_init`` source with that one
assignment set to ``"cpu"``, compiled in PEFT's module namespace and installed where PEFT's LoRA layers call it; the
rest (bitsandbytes' ``Params4bit`` / ``Int8Params`` quantisers, the SVD, the iteration) is PEFT's code unchanged.
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from peft import LoftQConfig, LoraConfig, PeftModel, get_peft_model

import lightning_adapters as la
from tests.helpers import tiny_llama
from tests.peft_parity.test_inits import _assert_same_grads, _close, _our_state_from_peft, _peft_layers, _randomize_peft

pytest.importorskip("bitsandbytes")

TARGETS = ["q_proj", "down_proj"]


@pytest.fixture
def peft_loftq_on_cpu(monkeypatch):
    import peft.tuners.lora.layer as lora_layer
    import peft.utils.loftq_utils as loftq_utils

    line = 'compute_device = "xpu" if is_xpu_available() else "cuda"'
    source = inspect.getsource(loftq_utils.loftq_init)
    assert source.count(line) == 1, "PEFT's loftq_init changed: revisit this oracle"
    namespace = dict(vars(loftq_utils))
    exec(source.replace(line, 'compute_device = "cpu"'), namespace)  # noqa: S102 - PEFT's own source, see above
    monkeypatch.setattr(lora_layer, "loftq_init", namespace["loftq_init"])


def _logits(model, x):
    return model(x).logits


@pytest.mark.parametrize(
    ("bits", "iters", "extra"), [(4, 1, {}), (8, 2, {}), (4, 3, {"use_rslora": True}), (4, 1, {"use_dora": True})]
)
def test_loftq_equals_peft(peft_loftq_on_cpu, tmp_path, bits, iters, extra):
    """Same quantised base, A and B as PEFT; trained adapters move both ways with equal outputs and gradients."""
    base = tiny_llama()
    x = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    loftq = LoftQConfig(loftq_bits=bits, loftq_iter=iters)
    pm = get_peft_model(
        copy.deepcopy(base),
        LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="loftq", loftq_config=loftq, **extra),
    )
    cfg = la.LoRAConfig(
        r=4, alpha=8, target_modules=TARGETS, init_weights="loftq", loftq_bits=bits, loftq_iter=iters, **extra
    )
    ours = la.inject(copy.deepcopy(base), cfg)
    for name, p in _peft_layers(pm).items():
        module = ours.get_submodule(name)
        _close(module.weight, p.get_base_layer().weight)  # Q: bitsandbytes' dequantised values
        _close(module.adapter.default.lora_A, p.lora_A["default"].weight)
        _close(module.adapter.default.lora_B, p.lora_B["default"].weight)
        if extra.get("use_dora"):
            _close(module.adapter.default.magnitude, p.lora_magnitude_vector["default"].weight)
        error = (module.weight - base.get_submodule(name).weight).abs().max()
        assert error > 1e-3 if bits == 4 else error > 1e-5  # the base really is quantised
    with torch.no_grad():
        _close(_logits(ours, x), _logits(pm, x))
    _randomize_peft(pm)
    state = _our_state_from_peft(pm)
    if extra.get("use_dora"):
        state.update(
            {
                f"{n}.adapter.default.magnitude": p.lora_magnitude_vector["default"].weight.detach()
                for n, p in _peft_layers(pm).items()
            }
        )
    la.load_adapter_state_dict(ours, state)
    with torch.no_grad():
        expected = _logits(pm, x)
        _close(_logits(ours, x), expected)
    _assert_same_grads(ours, pm, x)
    # PEFT's file names init_lora_weights='loftq': both libraries recompute Q from the original base on load
    pm.save_pretrained(tmp_path / "peft")
    loaded = la.load_peft(copy.deepcopy(base), tmp_path / "peft")
    with torch.no_grad():
        _close(_logits(loaded, x), expected)
    la.save_peft(loaded, tmp_path / "ours")
    back = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    with torch.no_grad():
        _close(_logits(back, x), expected)
        if not extra.get("use_dora"):
            _close(_logits(la.merge(loaded), x), expected)


def test_loftq_eject_restores_the_original_weight_and_requantising_changes_nothing():
    from lightning_adapters.methods.lora_init import quantize_roundtrip

    base = tiny_llama()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = la.inject(base, la.LoRAConfig(r=4, target_modules=TARGETS, init_weights="loftq"))
    q = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    assert not torch.equal(q, before["model.layers.0.self_attn.q_proj.weight"])
    torch.testing.assert_close(quantize_roundtrip(q, 4), q, rtol=0, atol=0)  # Q sits on the NF4 grid
    adapter = model.model.layers[0].self_attn.q_proj.adapter.default
    w = before["model.layers.0.self_attn.q_proj.weight"]
    # the adapter holds what quantisation lost: ||W - Q - B·A|| < ||W - Q||
    assert (w - q - adapter.lora_B @ adapter.lora_A).norm() < 0.9 * (w - q).norm()
    plain = la.eject(model)
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in before.items())


def test_loftq_refusals(tmp_path):
    from tests.helpers import tiny_gpt2

    with pytest.raises(la.AdapterConfigError, match=r"loftq_bits must be one of \[4, 8\], got 3"):
        la.LoRAConfig(init_weights="loftq", loftq_bits=3)
    with pytest.raises(la.AdapterConfigError, match="loftq_iter"):
        la.LoRAConfig(init_weights="loftq", loftq_iter=0)
    for model, target in ((tiny_gpt2(), "c_attn"), (tiny_llama(), "embed_tokens")):
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(la.AdapterConfigError, match=f"loftq' works on nn.Linear layers.*'.*{target}'"):
            la.inject(model, la.LoRAConfig(r=2, target_modules=[target], init_weights="loftq"))
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    model = la.inject(tiny_llama(), la.LoRAConfig(r=2, target_modules=["q_proj"], init_weights="loftq"))
    with pytest.raises(la.AdapterConfigError, match="convert_to_lora.*LoftQ"):
        la.save_peft(model, tmp_path / "out", convert_to_lora=True)
    assert not (tmp_path / "out").exists()


def test_loftq_fit_checkpoint_restores_onto_a_fresh_model(tmp_path):
    """Q is a function of W: a fresh model recomputes it on restore and gets the trained model's outputs back."""
    from tests.lightning.models import BoringMLP, mlp_data, trainer

    cfg = la.LoRAConfig(r=4, target_modules=["encoder.0", "encoder.2"], init_weights="loftq", modules_to_save=["head"])
    model = BoringMLP()
    t = trainer(max_steps=2, callbacks=[la.AdapterCallback(cfg, verbose=False)])
    t.fit(model, mlp_data())
    t.save_checkpoint(tmp_path / "q.ckpt")
    x = torch.randn(5, 256)
    fresh = la.restore_from_checkpoint(BoringMLP(), tmp_path / "q.ckpt")
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=1e-5, atol=1e-6)
        plain = la.eject(fresh)
        torch.testing.assert_close(plain.encoder(x), BoringMLP().encoder(x), rtol=0, atol=0)  # W itself


def test_loftq_adapter_runs_on_the_quantized_base():
    """QLoRA with LoftQ: with loftq_iter=1, LoftQ's base is bitsandbytes' NF4 of W (blocks of 64), which is what
    ``la.quantize(model, "nf4")`` stores, so the trained adapter gives the same outputs on the 4-bit model. LoftQ
    itself needs the full-precision weights: refused on a quantized base (as in PEFT), before any change."""
    from lightning_adapters.core.quant import dequantized_weight, is_quantized

    base = tiny_llama()
    x = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    cfg = la.LoRAConfig(r=4, alpha=8, target_modules="all-linear", init_weights="loftq")
    lofted = la.inject(copy.deepcopy(base), cfg)
    g = torch.Generator().manual_seed(0)
    state = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in la.adapter_state_dict(lofted).items()}
    la.load_adapter_state_dict(lofted, state)
    quantized = la.quantize(copy.deepcopy(base), "nf4")
    four_bit = [n for n, m in quantized.named_modules() if is_quantized(m)]
    assert four_bit and {n for n, m in lofted.named_modules() if hasattr(m, "adapter")} == set(four_bit)
    for name in four_bit:
        torch.testing.assert_close(
            dequantized_weight(quantized.get_submodule(name), torch.float32),
            lofted.get_submodule(name).weight,
            rtol=0,
            atol=0,
        )
    with pytest.raises(la.UnsupportedLayerError, match=r"'model.layers.0.self_attn.q_proj' is a quantized base.*loftq"):
        la.inject(quantized, cfg)
    assert not any(hasattr(m, "adapter") for m in quantized.modules())
    la.inject(quantized, la.LoRAConfig(r=4, alpha=8, target_modules="all-linear"))
    la.load_adapter_state_dict(quantized, state)
    with torch.no_grad():
        _close(_logits(quantized, x), _logits(lofted, x), 1e-4)
