"""CUDA checks: every method on the GPU equals the CPU and PEFT in fp32, and follows the fp32 model in bf16
(forward, backward, merge; fp32 or bf16 adapters on a bf16 base).

Skipped without CUDA (CI has none); run on a GPU machine with ``pytest tests/gpu``. ``LA_TEST_DEVICE=cpu``
runs the same checks on the CPU (a dry run of the test logic).
"""

from __future__ import annotations

import copy
import dataclasses
import os

import pytest
import torch

import lightning_adapters as la
from tests.helpers import randomize_adapter, tiny_llama, token_batch

DEV = os.environ.get("LA_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEV == "cuda" and not torch.cuda.is_available(), reason="needs CUDA")

CONFIGS = {
    "lora": lambda: la.LoRAConfig(r=4, alpha=8, target_modules="all-linear"),
    "dora": lambda: la.LoRAConfig(r=4, alpha=8, target_modules="all-linear", use_dora=True),
    "loha": lambda: la.LoHaConfig(r=4, alpha=8, target_modules="all-linear"),
    "lokr": lambda: la.LoKrConfig(r=4, alpha=8, target_modules="all-linear", decompose_both=True),
    "oft": lambda: la.OFTConfig(oft_block_size=8, target_modules="all-linear"),
    "boft-m1": lambda: la.BOFTConfig(boft_block_size=4, target_modules=["q_proj", "o_proj", "up_proj"]),
    "boft-m2": lambda: la.BOFTConfig(
        boft_block_size=4, boft_n_butterfly_factor=2, target_modules=["q_proj", "o_proj", "up_proj"]
    ),
    "adalora": lambda: la.AdaLoRAConfig(init_r=6, target_r=4, total_step=20, target_modules="all-linear"),
    "llama_adapter": lambda: la.LlamaAdapterConfig(adapter_len=4, adapter_layers=2),
}


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _grads(model):
    return {n: p.grad.detach().float().cpu() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cuda_fp32_equals_cpu_forward_backward_and_merge(name):
    torch.manual_seed(0)
    cpu = la.inject(tiny_llama(), CONFIGS[name]())
    randomize_adapter(cpu, std=0.05)
    gpu = copy.deepcopy(cpu).to(DEV)
    x = token_batch(128)
    cpu.train()
    gpu.train()
    out_c = cpu(x, labels=x)
    out_g = gpu(x.to(DEV), labels=x.to(DEV))
    assert torch.allclose(out_g.logits.cpu(), out_c.logits, atol=1e-4)
    out_c.loss.backward()
    out_g.loss.backward()
    gc, gg = _grads(cpu), _grads(gpu)
    assert gc.keys() == gg.keys()
    for k in gc:
        assert torch.allclose(gg[k], gc[k], atol=1e-4, rtol=1e-3), k
    if name != "llama_adapter":
        gpu.eval()
        with torch.no_grad():
            before = gpu(x.to(DEV)).logits
            la.merge(gpu)
            assert torch.allclose(gpu(x.to(DEV)).logits, before, atol=1e-4)
            la.unmerge(gpu)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_bf16_base_keeps_fp32_adapters_and_trains(name):
    torch.manual_seed(0)
    model = tiny_llama().to(DEV).to(torch.bfloat16)
    la.inject(model, CONFIGS[name]())
    assert all(v.dtype == torch.float32 for v in la.adapter_state_dict(model).values() if v.is_floating_point())
    randomize_adapter(model, std=0.02)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    x = token_batch(128).to(DEV)
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = model(x, labels=x).loss
        assert loss.dtype == torch.bfloat16 or loss.dtype == torch.float32
        loss.float().backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))


@pytest.mark.parametrize("name", ["lora", "dora", "loha", "lokr", "oft", "boft-m1", "llama_adapter"])
def test_cuda_matches_peft(name, tmp_path):
    from peft import PeftModel

    torch.manual_seed(0)
    base = tiny_llama()
    ours = la.inject(copy.deepcopy(base), CONFIGS[name]())
    randomize_adapter(ours, std=0.05)
    la.save_peft(ours, tmp_path)
    ours = ours.to(DEV).eval()
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).to(DEV).eval()
    x = token_batch(128).to(DEV)
    with torch.no_grad():
        assert torch.allclose(ours(x).logits, theirs(x).logits, atol=1e-4)


def test_boft_two_factors_equal_dense_formula_on_cuda():
    torch.manual_seed(0)
    model = la.inject(tiny_llama(), CONFIGS["boft-m2"]()).to(DEV).eval()
    randomize_adapter(model, std=0.05)
    x = token_batch(128).to(DEV)
    with torch.no_grad():
        out = model(x).logits
        la.merge(model)
        assert torch.allclose(model(x).logits, out, atol=1e-4)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


@pytest.mark.parametrize("adapter_dtype", [None, "bfloat16"], ids=["fp32-adapters", "bf16-adapters"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_bf16_forward_backward_merge_follow_the_fp32_model(name, adapter_dtype):
    """On a bf16 base (fp32 adapters, our default, or bf16 adapters): logits and adapter gradients follow the fp32
    model with the same weights to bf16 precision, merge keeps the outputs and unmerge restores the base weights.

    Tolerances are a quarter of what the adapter changes in the fp32 logits, so an adapter that bf16 drops (or a
    merge that adds nothing) fails; bf16 rounding measured 1-12% of that change on these models.
    """
    torch.manual_seed(0)
    ref = la.inject(tiny_llama(), CONFIGS[name]())
    randomize_adapter(ref, std=0.5 if name == "llama_adapter" else 0.05)  # its zero-init gate needs a push
    ref = ref.to(DEV).train()
    cfg = CONFIGS[name]()
    cfg.adapter_dtype = adapter_dtype
    torch.manual_seed(0)
    half = la.inject(tiny_llama().to(DEV).to(torch.bfloat16), cfg).train()  # the same base weights, in bf16
    la.load_adapter_state_dict(half, la.adapter_state_dict(ref))
    want = torch.bfloat16 if adapter_dtype else torch.float32
    assert {v.dtype for v in la.adapter_state_dict(half).values() if v.is_floating_point()} == {want}
    x = token_batch(128).to(DEV)
    out_ref, out_half = ref(x, labels=x), half(x, labels=x)
    with torch.no_grad(), la.disabled(ref):
        effect = (out_ref.logits - ref(x).logits).abs().max()
    tol = 0.25 * effect
    assert (out_half.logits.float() - out_ref.logits).abs().max() < tol
    out_ref.loss.backward()
    out_half.loss.float().backward()
    g_ref, g_half = _grads(ref), _grads(half)
    assert g_ref.keys() == g_half.keys() and g_ref
    for k in g_ref:
        assert torch.isfinite(g_half[k]).all(), k
        if g_ref[k].norm() > 1e-6:
            assert _cosine(g_half[k], g_ref[k]) > 0.98, k
    if name == "llama_adapter":
        return
    half.eval()
    weights = {n: p.detach().clone() for n, p in half.named_parameters() if not p.requires_grad}
    with torch.no_grad():
        want_logits = ref.eval()(x).logits
        la.merge(half)
        merged = half(x).logits.float()
        merged_w = {n: p.detach().float() for n, p in half.named_parameters() if n in weights}
        la.unmerge(half)
        after = half(x).logits.float()
    assert (merged - want_logits).abs().max() < tol
    assert (after - want_logits).abs().max() < tol
    deltas = {n: (w - weights[n].float()).abs().max() for n, w in merged_w.items()}
    assert max(deltas.values()) > 0  # merge changed the bf16 weights
    for n, p in half.named_parameters():
        if n in weights:  # unmerge takes back what merge added, up to one bf16 ulp of W + ΔW (two roundings)
            ulp = 2.0**-7 * merged_w[n].abs().max()
            assert (p.float() - weights[n].float()).abs().max() <= 0.1 * deltas[n] + ulp, n


@pytest.mark.parametrize("name", [n for n in CONFIGS if n != "llama_adapter"])
@pytest.mark.parametrize("init_weights", [True, False], ids=["default-init", "random-init"])
def test_a_seed_gives_the_same_adapter_on_the_cpu_and_the_gpu(name, init_weights):
    """Adapter weights are drawn from the CPU generator and copied (PEFT builds them on the CPU and moves them),
    so a seed gives the same adapter on either device, random inits (init_weights=False) included. Llama-Adapter's
    prompt is drawn on the device, as PEFT's is."""
    cfg = CONFIGS[name]()
    if not init_weights:
        cfg = dataclasses.replace(cfg, init_weights=False)
    base = tiny_llama()
    torch.manual_seed(1)
    cpu = la.adapter_state_dict(la.inject(copy.deepcopy(base), cfg))
    torch.manual_seed(1)
    gpu = la.adapter_state_dict(la.inject(copy.deepcopy(base).to(DEV), cfg))
    assert cpu.keys() == gpu.keys()
    for k in cpu:  # drawn values are equal; ones computed from the weights (DoRA's magnitude) to rounding
        torch.testing.assert_close(gpu[k].cpu(), cpu[k], rtol=1e-6, atol=1e-7, msg=k)
