"""LoRA, DoRA, AdaLoRA, OFT and BOFT on bitsandbytes 4-bit and 8-bit bases against PEFT 0.21, both ways.

PEFT's layers run the bitsandbytes layer's own forward for the base term (on CPU too), so an adapter trained
with PEFT on a quantized base loads here with equal outputs on the same quantized base, and ours loads in PEFT.
Outputs are compared in train mode (no dropout configured): in eval mode on x86 CPUs with AVX512-BF16, bitsandbytes
repacks a 4-bit weight for its inference kernel, and PEFT's DoRA then reads the repacked weight as if it were in
the storage layout (its weight norm is wrong there); we unpack it first.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import lightning_adapters as la

peft = pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(64, 64)
        self.v = nn.Linear(64, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.v(torch.relu(self.q(x)))


TARGETS = ["q", "v"]
# (PEFT config, our config): the same adapter described both ways.
METHODS = {
    "lora": (
        lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS),
        lambda: la.LoRAConfig(r=4, alpha=8, target_modules=TARGETS),
    ),
    "dora": (
        lambda: peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=TARGETS),
        lambda: la.LoRAConfig(r=4, alpha=8, use_dora=True, target_modules=TARGETS),
    ),
    "adalora": (
        lambda: peft.AdaLoraConfig(init_r=4, target_r=2, lora_alpha=8, total_step=10, target_modules=TARGETS),
        lambda: la.AdaLoRAConfig(init_r=4, target_r=2, alpha=8.0, total_step=10, target_modules=TARGETS),
    ),
    "oft": (
        lambda: peft.OFTConfig(r=0, oft_block_size=8, target_modules=TARGETS),
        lambda: la.OFTConfig(oft_block_size=8, target_modules=TARGETS),
    ),
    "boft": (
        lambda: peft.BOFTConfig(boft_block_size=8, boft_n_butterfly_factor=1, target_modules=TARGETS),
        lambda: la.BOFTConfig(boft_block_size=8, boft_n_butterfly_factor=1, target_modules=TARGETS),
    ),
}
CASES = [pytest.param(m, s, id=f"{m}-{s}") for m in METHODS for s in ("nf4", "int8")]


def _base(scheme: str) -> nn.Module:
    torch.manual_seed(0)
    return la.quantize(Net(), scheme, skip=[])


def _peft_base(model: nn.Module, scheme: str) -> nn.Module:
    # PEFT picks its bitsandbytes layers from these flags (transformers sets them when it loads a quantized model).
    model.is_loaded_in_4bit = scheme != "int8"
    model.is_loaded_in_8bit = scheme == "int8"
    return model


def _randomize(params: list[nn.Parameter], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            if p.is_floating_point():  # AdaLoRA's state holds a boolean rank mask too
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _x() -> torch.Tensor:
    return torch.randn(4, 6, 64, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("method,scheme", CASES)
def test_peft_adapter_loads_with_equal_outputs(method: str, scheme: str, tmp_path) -> None:
    make_peft, _ = METHODS[method]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(_peft_base(_base(scheme), scheme), make_peft())
    _randomize([p for p in theirs.parameters() if p.requires_grad], seed=2)
    theirs.train()
    x = _x()
    with torch.no_grad():
        expected = theirs(x)
    theirs.save_pretrained(tmp_path)
    ours = la.load_peft(_base(scheme).train(), tmp_path)
    with torch.no_grad():
        got = ours(x)
    assert torch.allclose(got, expected, atol=1e-5, rtol=0), (got - expected).abs().max()


@pytest.mark.parametrize("method,scheme", CASES)
def test_our_adapter_loads_in_peft_with_equal_outputs(method: str, scheme: str, tmp_path) -> None:
    _, make_ours = METHODS[method]
    ours = la.inject(_base(scheme), make_ours())
    _randomize(list(la.adapter_state_dict(ours).values()), seed=3)
    ours.train()
    x = _x()
    with torch.no_grad():
        expected = ours(x)
    la.save_peft(ours, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(_peft_base(_base(scheme), scheme), tmp_path).train()
    with torch.no_grad():
        got = theirs(x)
    assert torch.allclose(got, expected, atol=1e-5, rtol=0), (got - expected).abs().max()


def _outputs_and_gradients_equal_peft(method: str, base, scheme: str, training: bool, tmp_path) -> None:
    """Outputs, the input's gradient and every adapter gradient of PEFT's adapter and of ours loaded from it."""
    make_peft, _ = METHODS[method]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(_peft_base(base(), scheme), make_peft())
    _randomize([p for n, p in theirs.named_parameters() if p.requires_grad and "ranknum" not in n], seed=2)
    theirs.save_pretrained(tmp_path)
    ours = la.load_peft(base(), tmp_path)
    g = torch.randn(4, 6, 32, generator=torch.Generator().manual_seed(5))
    results = []
    for model in (theirs.train(training), ours.train(training)):
        x = _x().requires_grad_(True)
        params = sorted((p for n, p in model.named_parameters() if p.requires_grad and "ranknum" not in n), key=_key)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            y = model(x)
            grads = torch.autograd.grad((y * g).sum(), [x, *params])
        results.append((y.detach(), grads))
    (y_p, g_p), (y_o, g_o) = results
    torch.testing.assert_close(y_o, y_p, rtol=0, atol=1e-5)
    assert len(g_o) == len(g_p)
    for a, b in zip(g_o, g_p):
        torch.testing.assert_close(a.reshape(b.shape), b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["lora", "dora", "adalora", "oft"])
def test_int8_in_eval_mode_under_autograd_equals_peft(method: str, tmp_path) -> None:
    """bitsandbytes' int8 inference product also quantizes the input. In eval mode with autograd on (an input that
    needs its gradient reaches ``v``), the base term is still the layer's own product, as PEFT and the plain
    quantized model compute it."""
    _outputs_and_gradients_equal_peft(method, lambda: _base("int8"), "int8", False, tmp_path)


# (weight dtype quantized, compute_dtype), fed float32 activations.
_OTHER_DTYPE = {
    "bf16-compute": (torch.float32, torch.bfloat16),
    "fp16-compute": (torch.float32, torch.float16),
    "bf16-weights-fp32-compute": (torch.bfloat16, torch.float32),  # transformers' default compute dtype
    "fp16-weights-fp32-compute": (torch.float16, torch.float32),
}


# OFT is left out: it computes the same, but its rotated input differs from PEFT's by float32 rounding, which the
# half-precision product turns into one-ulp flips.
@pytest.mark.parametrize("method", ["lora", "dora", "adalora"])
@pytest.mark.parametrize("case", list(_OTHER_DTYPE))
def test_a_4bit_base_computing_in_another_dtype_than_its_input_equals_peft(method, case, tmp_path) -> None:
    """A 4-bit layer that computes in a half dtype, or that quantized half weights and computes in float32, fed
    float32 activations (k-bit training's float32 norms): its own product casts them to its compute dtype (and its
    kernel dequantizes straight into it), which is not the dequantized product in float32. In training, with the
    input needing its gradient, the base term is that product, as PEFT and the plain quantized model compute it."""
    weight_dtype, compute_dtype = _OTHER_DTYPE[case]

    def base() -> nn.Module:
        torch.manual_seed(0)
        return la.quantize(Net().to(weight_dtype), "nf4", skip=[], compute_dtype=compute_dtype)

    _outputs_and_gradients_equal_peft(method, base, "nf4", True, tmp_path)


def _key(p: torch.Tensor) -> tuple:
    """Orders one library's adapter tensors as the other's: by shape, then by value (the same random weights)."""
    return (tuple(p.shape), float(p.detach().double().sum()))
