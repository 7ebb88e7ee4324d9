"""Several named adapters of different methods on one model: stacking across methods, strength, trainability,
``torch.compile`` across switches, the key layouts and state written before adapters had names."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

import lightning_adapters as la
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


CONFIGS = {
    "lora": lambda t: la.LoRAConfig(r=2, alpha=4, target_modules=t),
    "loha": lambda t: la.LoHaConfig(r=2, alpha=4, target_modules=t),
    "lokr": lambda t: la.LoKrConfig(r=2, alpha=4, target_modules=t),
    "adalora": lambda t: la.AdaLoRAConfig(init_r=3, target_r=2, total_step=10, target_modules=t),
}


def _randomize(model: nn.Module, name: str, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in la.adapter_state_dict(model, name=name).values():
            if t.is_floating_point():
                t.add_(torch.randn(t.shape, generator=g) * 0.3)


def _x() -> torch.Tensor:
    return torch.randn(5, 16, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("first, second", [("lora", "loha"), ("lokr", "lora"), ("adalora", "loha")])
def test_two_methods_on_one_linear_stack_as_the_sum_of_their_terms(first: str, second: str) -> None:
    model = Net()
    la.inject(model, CONFIGS[first](["body"]), name="a")
    la.inject(model, CONFIGS[second](["body", "other"]), name="b")
    _randomize(model, "a", 1)
    _randomize(model, "b", 2)
    x = _x()
    with la.disabled(model):
        base_body = model.body(x)
    la.set_active(model, "a")
    d_a = model.body(x) - base_body
    la.set_active(model, "b")
    d_b = model.body(x) - base_body
    la.set_active(model, ["a", "b"])
    assert la.active(model) == ["a", "b"]
    assert torch.allclose(model.body(x), base_body + d_a + d_b, atol=1e-5)
    # Gradient of a loss linear in the output: each adapter gets exactly its own-alone gradient.
    la.set_trainable(model, ["a", "b"])
    g = torch.linspace(-1, 1, 80).reshape(5, 16)
    (model.body(x) * g).sum().backward()
    stacked = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    for name in ("a", "b"):
        model.zero_grad(set_to_none=True)
        la.set_active(model, name)
        (model.body(x) * g).sum().backward()
        for n, p in model.named_parameters():
            if f"body.adapter.{name}." in n:
                assert torch.allclose(p.grad, stacked[n], atol=1e-5), n
    la.set_active(model, ["a", "b"])
    out = model(x)
    la.merge(model, names=["a", "b"])
    assert torch.allclose(model(x), out, atol=1e-5)
    la.unmerge(model)
    assert torch.allclose(model(x), out, atol=1e-5)


def test_set_scale_multiplies_the_term_and_one_restores_the_fast_path() -> None:
    model = Net()
    la.inject(model, CONFIGS["lora"](["body"]))
    _randomize(model, "default", 3)
    x = _x()
    with la.disabled(model):
        base = model.body(x)
    full = model.body(x)
    la.set_scale(model, "default", 0.5)
    assert torch.allclose(model.body(x), base + 0.5 * (full - base), atol=1e-6)
    la.set_scale(model, "default", 0.0)
    assert torch.allclose(model.body(x), base, atol=1e-6)
    la.set_scale(model, "default", 1.0)
    assert torch.equal(model.body(x), full)


def test_set_trainable_moves_gradients_and_modules_to_save_to_that_adapter() -> None:
    model = Net()
    la.inject(model, la.LoRAConfig(r=2, target_modules=["body"], modules_to_save=["head"]), name="a")
    la.inject(model, la.LoHaConfig(r=2, target_modules=["body", "other"]), name="b")
    assert la.active(model) == ["a"]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "body.adapter.a.lora_A",
        "body.adapter.a.lora_B",
        "head.weight",
        "head.bias",
    }
    la.set_trainable(model, "b")
    la.set_active(model, "b")
    model(_x()).sum().backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None}
    assert got == {n for n, p in model.named_parameters() if p.requires_grad}
    assert got and all(n.startswith(("body.adapter.b.", "other.adapter.b.")) for n in got)
    assert "a" in la.summary(model) and "adapters: a (lora), b (loha; active, trainable)" in la.summary(model)


@pytest.mark.slow
def test_compiled_model_follows_switches_without_rebuilding() -> None:
    model = Net()
    la.inject(model, CONFIGS["lora"](["body", "other"]), name="a")
    la.inject(model, CONFIGS["loha"](["body"]), name="b")
    _randomize(model, "a", 4)
    _randomize(model, "b", 5)
    x = _x()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    for active in ("a", "b", ["a", "b"], "a"):
        la.set_active(model, active)
        assert torch.allclose(compiled(x), model(x), atol=1e-6), active
    la.set_scale(model, "b", 0.25)
    la.set_active(model, ["a", "b"])
    assert torch.allclose(compiled(x), model(x), atol=1e-6)
    with la.disabled(model):
        assert torch.allclose(compiled(x), model(x), atol=1e-6)


def test_state_without_names_from_before_names_still_loads() -> None:
    """A hand-built state dict in the layout single-adapter models had before names (``<mod>.adapter.<t>``)."""
    base = tiny_llama()
    model = la.inject(copy.deepcopy(base), la.LoRAConfig(r=2, target_modules=["q_proj", "v_proj"]))
    _randomize(model, "default", 6)
    x = token_batch()
    out = model(x).logits
    old = {}
    for k, v in model.state_dict().items():
        if ".adapter.default." in k:
            old[k.replace(".adapter.default.", ".adapter.")] = v.clone()
    assert all(".adapter.lora_" in k for k in old) and len(old) == 8
    fresh = la.inject(base, la.LoRAConfig(r=2, target_modules=["q_proj", "v_proj"]))
    la.load_adapter_state_dict(fresh, old)
    assert torch.equal(fresh(x).logits, out)
    assert la.adapter_state_dict(model, name="default").keys() == old.keys()


def test_old_lightning_checkpoint_without_names_restores(tmp_path) -> None:
    """A checkpoint laid out as the integration wrote it before names (keys ``model.<mod>.adapter.<t>``)."""
    cfg = la.LoRAConfig(r=2, target_modules=["q_proj"])
    base = tiny_llama()
    model = la.inject(copy.deepcopy(base), cfg)
    _randomize(model, "default", 7)
    x = token_batch()
    out = model(x).logits
    state = {f"model.{k}": v.clone() for k, v in la.adapter_state_dict(model, name="default").items()}
    meta = {
        "format": 1,
        "library_version": "0.1.0",
        "method": "lora",
        "config": cfg.to_dict(),
        "module": "model",
        "base_fingerprint": la.base_fingerprint(model),
        "adapter_shapes": {k: list(v.shape) for k, v in state.items()},
    }
    torch.save({"state_dict": state, "lightning_adapters": meta}, tmp_path / "old.ckpt")
    restored = la.restore_from_checkpoint(base, tmp_path / "old.ckpt")
    assert torch.equal(restored(x).logits, out)


def test_readme_several_adapters_code_runs_as_written() -> None:
    """The README's "Several adapters" block, executed as written (its prints are its own checks)."""
    import contextlib
    import io
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    body = text.split("## Several adapters", 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]
    (block,) = re.findall(r"```python\n(.*?)```", body, flags=re.S)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(block, "README.md", "exec"), {})  # noqa: S102 - the README's own code
    assert out.getvalue().splitlines() == ["['a', 'b'] ['a']", "adapters: a (lora; active)"]


def test_a_second_adapter_that_fails_midway_leaves_the_first_as_it_was() -> None:
    model = Net()
    la.inject(model, CONFIGS["lora"](["body"]), name="a")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []

    def fail(*args, **kwargs):
        calls.append(1)
        raise KeyboardInterrupt

    from lightning_adapters.methods.loha import LoHaLayer

    original = LoHaLayer.on_attach
    LoHaLayer.on_attach = fail  # the second target's attach is interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            la.inject(model, CONFIGS["loha"](["body", "other"]), name="b")
    finally:
        LoHaLayer.on_attach = original
    assert calls and la.adapter_names(model) == ["a"] and la.active(model) == ["a"]
    assert model.state_dict().keys() == before.keys()
    assert type(model.other) is nn.Linear and list(model.body.adapter) == ["a"]


def test_the_adapter_set_shows_which_adapters_act() -> None:
    """``print(model)`` shows each adapted module's adapters and, on the set, the active ones in order."""
    model = nn.Sequential(nn.Linear(4, 4))
    la.inject(model, la.LoRAConfig(r=1, target_modules=["0"]), name="a")
    la.inject(model, la.LoRAConfig(r=1, target_modules=["0"]), name="b")
    la.set_active(model, ["b", "a"])
    assert "(adapter): AdapterSet(\n      active=['b', 'a']\n      (a): LoRALayer(" in repr(model), repr(model)


def test_set_trainable_with_no_names_freezes_every_adapter() -> None:
    model = Net()
    for name in ("a", "b"):
        la.inject(model, CONFIGS["lora"](["body"]), name=name)
    from lightning_adapters.core.named import trainable

    la.set_trainable(model, [])
    assert trainable(model) == []
    adapter = [p for n, p in model.named_parameters() if ".adapter." in n]
    assert len(adapter) == 4 and not any(p.requires_grad for p in adapter)
    assert la.active(model) == ["a"]


def test_a_second_adapter_that_fails_after_its_record_is_written_leaves_no_record(monkeypatch) -> None:
    """The last steps of ``inject`` (active set, trainability) run after the new adapter is recorded beside the
    first one; if they fail, the record goes with the rest of the new adapter."""
    from lightning_adapters.core import inject as inject_module

    model = Net()
    la.inject(model, CONFIGS["lora"](["body"]), name="a")
    original = inject_module.apply_trainability

    def fail(model):
        raise KeyboardInterrupt

    monkeypatch.setattr(inject_module, "apply_trainability", fail)
    with pytest.raises(KeyboardInterrupt):
        la.inject(model, CONFIGS["lora"](["other"]), name="b")
    monkeypatch.setattr(inject_module, "apply_trainability", original)
    assert la.adapter_names(model) == ["a"] and la.active(model) == ["a"]
    assert type(model.other) is nn.Linear and list(model.body.adapter) == ["a"]


def test_the_state_of_one_adapter_holds_only_its_own_tensors_among_several() -> None:
    """``adapter_state_dict(model, "a")`` with ``b`` on the same modules: name-free keys, ``a``'s values only; and
    ``load_adapter_state_dict(..., name="a")`` of it writes ``a``'s tensors only."""
    model = Net()
    for name in ("a", "b"):
        la.inject(model, CONFIGS["lora"](["body", "other"]), name=name)
    _randomize(model, "a", 1)
    _randomize(model, "b", 2)
    for name in ("a", "b"):
        state = la.adapter_state_dict(model, name)
        assert sorted(state) == [f"{m}.adapter.{p}" for m in ("body", "other") for p in ("lora_A", "lora_B")]
        for key, value in state.items():
            module, _, tensor = key.partition(".adapter.")
            assert torch.equal(value, model.get_submodule(module).adapter[name].get_parameter(tensor)), key
    # Loaded back by name into a twin, each state reaches its own adapter and leaves the other as it was.
    twin = Net()
    for name in ("a", "b"):
        la.inject(twin, CONFIGS["lora"](["body", "other"]), name=name)
    untouched = {k: v.clone() for k, v in la.adapter_state_dict(twin, "b").items()}
    la.load_adapter_state_dict(twin, la.adapter_state_dict(model, "a"), name="a")
    for key, value in la.adapter_state_dict(twin, "a").items():
        assert torch.equal(value, la.adapter_state_dict(model, "a")[key]), key
    for key, value in la.adapter_state_dict(twin, "b").items():
        assert torch.equal(value, untouched[key]), key


def test_per_sample_rows_after_a_base_row_still_get_their_adapter() -> None:
    """Routed rows: ``"__base__"`` first, then two adapters; each row computes what the model computes with only
    that row's adapter active (or none)."""
    model = Net()
    for name in ("a", "b"):
        la.inject(model, CONFIGS["lora"](["body", "other"]), name=name)
    _randomize(model, "a", 1)
    _randomize(model, "b", 2)
    x = torch.randn(3, 16)
    want = []
    with torch.no_grad():
        with la.disabled(model):
            want.append(model(x[:1]))
        for i, name in ((1, "a"), (2, "b")):
            la.set_active(model, name)
            want.append(model(x[i : i + 1]))
        with la.per_sample(model, ["__base__", "a", "b"]):
            got = model(x)
    torch.testing.assert_close(got, torch.cat(want))


@pytest.mark.parametrize("scale", [0.5, 1.0])
def test_an_adapter_beside_a_merged_one_keeps_its_output(scale: float) -> None:
    """Two active adapters, ``a`` at ``scale``: merging ``b`` leaves ``a`` the only layer acting (at half strength
    through the scaled path, at full strength through its own forward on the module), so the output is what it was
    before the merge (up to fp32 rounding)."""
    model = Net()
    for name in ("a", "b"):
        la.inject(model, CONFIGS["lora"](["body", "other"]), name=name)
    _randomize(model, "a", 1)
    _randomize(model, "b", 2)
    la.set_active(model, ["a", "b"])
    if scale != 1.0:
        la.set_scale(model, "a", scale)
    x = torch.randn(3, 16)
    with torch.no_grad():
        before = model(x)
        la.merge(model, "b")
        torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)


def test_biases_trained_in_place_belong_to_one_adapter_each(tmp_path) -> None:
    # A bias option trains the base bias itself (as PEFT's): two adapters may train biases of different modules, never
    # the same one, which would reach both adapters' saved files with whichever values were trained last.
    model = Net()
    la.inject(model, la.LoRAConfig(r=2, target_modules=["body"], bias="lora_only"), name="a")
    la.inject(model, la.LoRAConfig(r=2, target_modules=["other"], bias="lora_only"), name="b")
    before = {n: t.clone() for n, t in model.state_dict().items()}
    for second, shared in [
        (la.LoRAConfig(r=2, target_modules=["head", "body"], bias="lora_only"), "['body.bias']"),
        (la.LoRAConfig(r=2, target_modules=["head"], bias="all"), "['body.bias']"),
        (la.LoRAConfig(r=2, target_modules=["head"], modules_to_save=["body"]), "['body.bias']"),
    ]:
        refusal = rf"would train {re.escape(shared)} in place, which adapter 'a'"
        with pytest.raises(la.AdapterConfigError, match=refusal):
            la.inject(model, second, name="c")
        assert la.adapter_names(model) == ["a", "b"] and model.state_dict().keys() == before.keys()
    la.inject(model, la.LoRAConfig(r=2, target_modules=["head", "body"]), name="c")  # no bias option: no conflict
    la.set_trainable(model, ["a", "b"])
    assert {n for n, p in model.named_parameters() if p.requires_grad and ".adapter." not in n} == {
        "body.bias",
        "other.bias",
    }
    with torch.no_grad():
        model.body.bias.add_(1.0)
        model.other.bias.add_(2.0)
    la.save_peft(model, tmp_path, names=["a", "b"])
    from safetensors.torch import load_file

    saved_a = load_file(tmp_path / "a" / "adapter_model.safetensors")
    saved_b = load_file(tmp_path / "b" / "adapter_model.safetensors")
    assert [k for k in saved_a if k.endswith("bias")] == ["base_model.model.body.base_layer.bias"]
    assert [k for k in saved_b if k.endswith("bias")] == ["base_model.model.other.base_layer.bias"]
    torch.testing.assert_close(saved_b["base_model.model.other.base_layer.bias"], model.other.bias.detach())
