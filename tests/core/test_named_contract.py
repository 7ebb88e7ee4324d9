"""The contract of the multi-adapter functions (``lightning_adapters.core.named``), one function at a time.

Truths: the docstrings and /work/shared/ARCHITECTURE.md. Each refusal names the function the user called, the bad
value and the way out; ``delete`` leaves what injecting only the other adapters would have made (module tree,
state dict, outputs, base weights); ``scale_of`` is 1.0 unless ``set_scale`` changed it; adapters on different
modules always combine, whatever their method.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lightning_adapters as la
from lightning_adapters.core.named import scale_of, trainable
from tests.helpers import tiny_llama, token_batch


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(16, 16)
        self.other = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.other(torch.tanh(self.body(x)))))


def _x() -> torch.Tensor:
    return torch.randn(5, 16, generator=torch.Generator().manual_seed(1))


def _randomize(model: nn.Module, name: str, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in la.adapter_state_dict(model, name=name).values():
            if t.is_floating_point():
                t.add_(torch.randn(t.shape, generator=g) * 0.3)


def _lora(targets: list[str], **kw) -> la.LoRAConfig:
    return la.LoRAConfig(r=2, alpha=4, target_modules=targets, **kw)


# --- delete --------------------------------------------------------------------------------------------------------


def test_delete_of_the_only_adapter_while_it_is_active_points_to_eject() -> None:
    model = Net()
    la.inject(model, _lora(["body"]), name="a")
    with pytest.raises(
        la.AdapterConfigError,
        match=r"^delete: adapter 'a' is active; call lightning_adapters\.eject\(model\) to remove the only adapter$",
    ):
        la.delete(model, "a")
    assert la.adapter_names(model) == ["a"]


def test_delete_of_an_active_adapter_beside_others_points_to_set_active_on_another() -> None:
    model = Net()
    la.inject(model, _lora(["body"]), name="a")
    la.inject(model, _lora(["other"]), name="b")
    with pytest.raises(
        la.AdapterConfigError,
        match=r"^delete: adapter 'a' is active; call lightning_adapters\.set_active\(model, 'b'\) first$",
    ):
        la.delete(model, "a")
    assert la.adapter_names(model) == ["a", "b"]


def test_delete_of_a_residual_init_adapter_gives_the_base_its_weights_back() -> None:
    """PiSSA writes ``W - s·B0·A0`` into the base when it is injected; deleting the adapter adds ``s·B0·A0`` back,
    so the model is what injecting only ``a`` into the plain model makes: same tensors, same outputs."""
    plain = Net()
    only_a = la.inject(copy.deepcopy(plain), _lora(["body"]), name="a")
    _randomize(only_a, "a", 1)
    model = copy.deepcopy(only_a)
    la.inject(model, _lora(["other", "head"], init_weights="pissa"), name="b")
    assert not torch.allclose(model.other.weight, plain.other.weight, atol=1e-3)  # the residual init acted
    assert not torch.allclose(model.head.weight, plain.head.weight, atol=1e-3)
    la.delete(model, "b")
    assert la.adapter_names(model) == ["a"] and trainable(model) == ["a"]
    assert model.state_dict().keys() == only_a.state_dict().keys()
    for key, value in only_a.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, atol=1e-6, rtol=1e-5, msg=key)
    assert type(model.other) is nn.Linear and type(model.head) is nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(model(_x()), only_a(_x()), atol=1e-5, rtol=1e-5)


def test_delete_of_a_whole_model_adapter_removes_its_prompts_and_hooks() -> None:
    """Llama-Adapter adds prompt holders and forward hooks to the attention modules, not adapter layers; deleting
    it leaves what injecting only the LoRA makes."""
    base = tiny_llama()
    only_a = la.inject(copy.deepcopy(base), _lora(["q_proj"]), name="a")
    _randomize(only_a, "a", 2)
    model = copy.deepcopy(only_a)
    la.inject(model, la.LlamaAdapterConfig(adapter_len=2, adapter_layers=1), name="b")
    _randomize(model, "b", 3)
    x = token_batch()
    with torch.no_grad():
        la.set_active(model, ["a", "b"])
        assert not torch.allclose(model(x).logits, only_a(x).logits, atol=1e-4)  # the prompts acted
        la.set_active(model, "a")
    la.delete(model, "b")
    assert la.adapter_names(model) == ["a"]
    assert [n for n, _ in model.named_modules()] == [n for n, _ in only_a.named_modules()]
    assert model.state_dict().keys() == only_a.state_dict().keys()
    hooks = [m for m in model.modules() if m._forward_hooks or m._forward_pre_hooks]
    assert hooks == [m for m in only_a.modules() if m._forward_hooks or m._forward_pre_hooks]
    with torch.no_grad():
        assert torch.equal(model(x).logits, only_a(x).logits)


def test_delete_refuses_a_name_that_is_not_a_string_or_not_an_adapter() -> None:
    model = Net()
    la.inject(model, _lora(["body"]), name="a")
    la.inject(model, _lora(["other"]), name="b")
    with pytest.raises(la.AdapterTypeError, match=r"^delete: name must be one adapter name \(a string\), got \['b'\]"):
        la.delete(model, ["b"])
    with pytest.raises(la.AdapterConfigError, match=r"^delete: unknown adapter name 'c'; the model has \['a', 'b'\]"):
        la.delete(model, "c")
    assert la.adapter_names(model) == ["a", "b"]


# --- set_scale / scale_of ------------------------------------------------------------------------------------------


def test_a_whole_model_adapter_cannot_be_scaled_and_reads_as_scale_one() -> None:
    """Llama-Adapter has no adapter layers: ``set_scale`` refuses it naming the adapter and its method, and
    ``scale_of`` gives the documented default 1.0."""
    model = tiny_llama()
    la.inject(model, _lora(["q_proj"]), name="a")
    la.inject(model, la.LlamaAdapterConfig(adapter_len=2, adapter_layers=1), name="b")
    with pytest.raises(
        la.AdapterConfigError,
        match=r"^set_scale: adapter 'b' \(llama_adapter\) adapts the whole model, not single layers; only additive",
    ):
        la.set_scale(model, "b", 0.5)
    assert scale_of(model, "b") == 1.0 and type(scale_of(model, "b")) is float
    la.set_scale(model, "a", 0.25)
    assert scale_of(model, "a") == 0.25 and scale_of(model, "b") == 1.0


def test_scale_of_names_itself_when_it_refuses_a_name() -> None:
    model = Net()
    la.inject(model, _lora(["body"]), name="a")
    with pytest.raises(la.AdapterConfigError, match=r"^scale_of: unknown adapter name 'z'; the model has \['a'\]$"):
        scale_of(model, "z")
    with pytest.raises(la.AdapterTypeError, match=r"^scale_of: adapter names must be a string or a list of strings"):
        scale_of(model, 3)
    with pytest.raises(la.AdapterTypeError, match=r"^scale_of: model must be a torch.nn.Module instance"):
        scale_of(None, "a")


@pytest.mark.parametrize("scale", [float("inf"), float("-inf"), float("nan")])
def test_set_scale_refuses_a_non_finite_factor_and_keeps_the_old_one(scale: float) -> None:
    model = Net()
    la.inject(model, _lora(["body"]), name="a")
    la.set_scale(model, "a", 0.5)
    with pytest.raises(la.AdapterConfigError, match=r"^set_scale: scale must be finite, got (inf|-inf|nan)$"):
        la.set_scale(model, "a", scale)
    assert scale_of(model, "a") == 0.5


@pytest.mark.parametrize("scale", ["0.5", True, None, torch.tensor(0.5)], ids=["str", "bool", "none", "tensor"])
def test_set_scale_refuses_a_factor_that_is_not_a_real_number(scale) -> None:
    model = Net()
    la.inject(model, _lora(["body"]), name="a")
    with pytest.raises(la.AdapterTypeError, match=r"^set_scale: scale must be a real number such as 0\.5, got "):
        la.set_scale(model, "a", scale)
    assert scale_of(model, "a") == 1.0
    la.set_scale(model, "a", 2)  # an int is a real number
    assert scale_of(model, "a") == 2.0 and type(scale_of(model, "a")) is float


# --- trainable / set_trainable -------------------------------------------------------------------------------------


def test_trainable_names_itself_when_given_something_that_is_not_a_model() -> None:
    with pytest.raises(la.AdapterTypeError, match=r"^trainable: model must be a torch.nn.Module instance, got dict"):
        trainable({})
    model = Net()
    la.inject(model, _lora(["body"]), name="a")
    la.inject(model, _lora(["other"]), name="b")
    assert trainable(model) == ["a"]
    la.set_trainable(model, ["b", "a"])
    assert trainable(model) == ["b", "a"]


def test_set_trainable_names_itself_when_the_model_has_no_adapters() -> None:
    with pytest.raises(la.AdapterConfigError, match=r"^set_trainable: model has no adapters; call lightning_adapters"):
        la.set_trainable(Net(), [])


# --- set_active ----------------------------------------------------------------------------------------------------


def test_a_rotation_adapter_and_a_lora_on_different_modules_act_together() -> None:
    """Stacking is refused only where two adapters share a module; OFT on ``body`` and LoRA on ``other`` each act on
    their own module, so the stacked output is ``body`` as OFT makes it feeding ``other`` as LoRA makes it."""
    model = Net()
    la.inject(model, la.OFTConfig(oft_block_size=4, target_modules=["body"]), name="rot")
    la.inject(model, _lora(["other"]), name="add")
    _randomize(model, "rot", 4)
    _randomize(model, "add", 5)
    x = _x()
    with torch.no_grad():
        la.set_active(model, "rot")
        h = torch.tanh(model.body(x))
        la.set_active(model, "add")
        want = model.head(torch.tanh(model.other(h)))
        la.set_active(model, ["rot", "add"])
        assert la.active(model) == ["rot", "add"]
        torch.testing.assert_close(model(x), want, atol=1e-6, rtol=1e-5)
    # On a shared module the same pair is refused, naming the module.
    la.inject(model, _lora(["body"]), name="add2")
    refused = r"^set_active: adapters \['rot', 'add2'\] would act together on 'body'"
    with pytest.raises(la.AdapterConfigError, match=refused):
        la.set_active(model, ["rot", "add2"])
    assert la.active(model) == ["rot", "add"]
