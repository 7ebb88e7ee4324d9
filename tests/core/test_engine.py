"""Engine behaviour: targeting, freezing, adapter state, disabled(), summary, and bad input that changes nothing."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import lightning_adapters as la
from lightning_adapters.core.targeting import resolve_targets
from tests.helpers import SmallCNN, randomize_adapter, tiny_bert, tiny_gpt2, tiny_llama, token_batch


def _snapshot(model: nn.Module):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        {n: p.requires_grad for n, p in model.named_parameters()},
        {n: type(m) for n, m in model.named_modules()},
    )


def _assert_unchanged(model: nn.Module, snap) -> None:
    sd, rg, types = snap
    now = model.state_dict()
    assert set(now) == set(sd)
    assert all(torch.equal(now[k], v) for k, v in sd.items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == rg
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert not la.core.inject.find_records(model)


def test_suffix_regex_and_all_linear_targeting():
    model = tiny_llama()
    suffix = resolve_targets(model, ["q_proj"], None, method="lora")
    assert suffix == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    regex = resolve_targets(model, r"model\.layers\.1\.self_attn\.(q|k)_proj", None, method="lora")
    assert regex == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj"]
    # A regex must match the whole name, not a part of it.
    with pytest.raises(la.TargetError):
        resolve_targets(model, r"q_proj", None, method="lora")
    all_linear = resolve_targets(model, "all-linear", None, method="lora")
    assert len(all_linear) == 14 and "lm_head" not in all_linear
    excluded = resolve_targets(model, "all-linear", ["mlp.down_proj"], method="lora")
    assert len(excluded) == 12 and not any(n.endswith("down_proj") for n in excluded)
    gpt2 = resolve_targets(tiny_gpt2(), "all-linear", None, method="lora")
    assert "transformer.h.0.attn.c_attn" in gpt2 and "lm_head" not in gpt2


def test_default_targets_per_architecture():
    bert = la.inject(tiny_bert(), la.LoRAConfig(r=2))
    assert la.core.inject.find_records(bert)[0][2].targets[0].endswith("attention.self.query")
    with pytest.raises(la.TargetError, match="no default for model type"):
        la.inject(SmallCNN(), la.LoRAConfig(r=2))


def test_inject_freezes_everything_but_adapters_and_modules_to_save():
    model = tiny_bert()
    la.inject(model, la.LoRAConfig(r=2, target_modules=["query", "value"], modules_to_save=["classifier"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(la.adapter_state_dict(model))
    assert {"classifier.weight", "classifier.bias"} <= trainable
    assert all(".adapter.default." in n or n.startswith("classifier.") for n in trainable)


def test_same_config_twice_is_a_noop_and_a_different_one_is_refused():
    model = tiny_llama()
    cfg = la.LoRAConfig(r=2, target_modules=["q_proj"])
    la.inject(model, cfg)
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    la.inject(model, la.LoRAConfig(r=2, target_modules=["q_proj"]))
    assert set(model.state_dict()) == set(snap)
    with pytest.raises(la.AdapterConfigError, match="different config"):
        la.inject(model, la.LoRAConfig(r=4, target_modules=["q_proj"]))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in snap.items())


def test_injecting_into_a_compiled_injected_model_acts_on_the_model_it_wraps():
    model = tiny_llama()
    cfg = la.LoRAConfig(r=2, target_modules=["q_proj"])
    la.inject(model, cfg)
    compiled = torch.compile(model, backend="eager")
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    assert la.inject(compiled, la.LoRAConfig(r=2, target_modules=["q_proj"])) is compiled  # the same: a no-op
    assert set(model.state_dict()) == set(snap)
    with pytest.raises(la.AdapterConfigError, match="different config"):
        la.inject(compiled, la.LoRAConfig(r=4, target_modules=["q_proj"]))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in snap.items())
    la.inject(compiled, la.LoRAConfig(r=2, target_modules=["v_proj"]), name="b")
    assert la.adapter_names(model) == ["default", "b"] and la.active(compiled) == ["default"]
    assert la.base_fingerprint(compiled) == la.base_fingerprint(model)  # the same base, compiled or not


def test_modules_named_like_adapters_are_not_adapter_state():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lora_head = nn.Linear(8, 8)
            self.body = nn.Linear(8, 8)

    model = la.inject(Net(), la.LoRAConfig(r=2, target_modules=["body"]))
    assert set(la.adapter_state_dict(model)) == {"body.adapter.default.lora_A", "body.adapter.default.lora_B"}
    assert not model.lora_head.weight.requires_grad


def test_disabled_gives_base_output_even_when_merged():
    torch.manual_seed(0)
    model = tiny_llama()
    x = token_batch()
    base = model(x).logits
    la.inject(model, la.LoRAConfig(r=4, target_modules="all-linear"))
    randomize_adapter(model)
    adapted = model(x).logits
    with la.disabled(model):
        assert torch.equal(model(x).logits, base)
    la.merge(model)
    with la.disabled(model):
        assert torch.allclose(model(x).logits, base, atol=1e-5)
    assert torch.allclose(model(x).logits, adapted, atol=1e-5)


def test_merge_safe_refuses_non_finite_and_changes_nothing():
    model = tiny_llama()
    la.inject(model, la.LoRAConfig(r=2, target_modules=["q_proj", "v_proj"]))
    randomize_adapter(model)
    with torch.no_grad():
        model.model.layers[1].self_attn.v_proj.adapter.default.lora_B[0, 0] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="v_proj"):
        la.merge(model, safe=True)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) or (v.isnan() == after[k].isnan()).all() for k, v in before.items())
    assert not any(layer.merged for _, _, layer in la.core.inject.adapted_modules(model))


def test_summary_counts_trainable_parameters():
    model = la.inject(tiny_llama(), la.LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]))
    text = la.summary(model)
    # q_proj 64->64: 4*64 + 64*4; v_proj 64->32: 4*64 + 32*4; two layers.
    expected = 2 * ((4 * 64 + 64 * 4) + (4 * 64 + 32 * 4))
    assert f"trainable params: {expected:,}" in text
    assert "model.layers.1.self_attn.v_proj" in text


def test_pickle_and_deepcopy_of_injected_model(tmp_path):
    model = la.inject(tiny_llama(), la.LoRAConfig(r=2, target_modules=["q_proj"]))
    randomize_adapter(model)
    x = token_batch()
    torch.save(model, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    assert torch.equal(loaded(x).logits, model(x).logits)
    assert torch.equal(copy.deepcopy(model)(x).logits, model(x).logits)


# --- bad input: a clear error naming the offender, and the model unchanged ---------------------------------


def test_targets_matching_nothing_show_closest_names():
    model = tiny_llama()
    snap = _snapshot(model)
    with pytest.raises(la.TargetError, match=r"q_prj.*closest module names.*q_proj"):
        la.inject(model, la.LoRAConfig(r=2, target_modules=["q_prj"]))
    _assert_unchanged(model, snap)


def test_unsupported_layer_type_is_named():
    model = tiny_llama()
    snap = _snapshot(model)
    with pytest.raises(la.UnsupportedLayerError, match=r"LlamaRMSNorm.*supported layer types"):
        la.inject(model, la.LoRAConfig(r=2, target_modules=["q_proj", "input_layernorm"]))
    _assert_unchanged(model, snap)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(r=0), "r must be an integer > 0, got 0"),
        (dict(r=-3), "got -3"),
        (dict(r=2.5), "got 2.5"),
        (dict(alpha=0), "alpha must be a finite number > 0"),
        (dict(dropout=1.0), r"dropout must be in \[0, 1\), got 1.0"),
        (dict(init_weights="pisa"), "init_weights must be True, False, one of .*got .pisa."),
        (dict(rank_pattern={"q_proj": 0}), r"rank_pattern\['q_proj'\]"),
        (dict(target_modules=[]), "non-empty list"),
        (dict(target_modules=["q_proj"], adapter_dtype="float8"), "adapter_dtype 'float8'"),
        (dict(modules_to_save="classifier"), "modules_to_save must be a list"),
    ],
)
def test_bad_lora_config_values(kwargs, match):
    with pytest.raises(la.AdapterConfigError, match=match):
        la.LoRAConfig(**kwargs)


def test_conv_rank_not_divisible_by_groups_changes_nothing():
    model = nn.Sequential(nn.Conv2d(8, 8, 3, groups=4), nn.Conv2d(8, 8, 1))
    snap = _snapshot(model)
    with pytest.raises(la.AdapterConfigError, match=r"r=2 on '0' must be divisible by the conv's groups=4"):
        la.inject(model, la.LoRAConfig(r=2, target_modules=["1", "0"]))
    _assert_unchanged(model, snap)


def test_modules_to_save_that_match_nothing():
    model = tiny_bert()
    snap = _snapshot(model)
    with pytest.raises(la.TargetError, match="classifer"):
        la.inject(model, la.LoRAConfig(r=2, target_modules=["query"], modules_to_save=["classifer"]))
    _assert_unchanged(model, snap)


@pytest.mark.parametrize("problem", ["missing", "unexpected", "shape"])
def test_bad_adapter_state_dict_is_refused_before_loading(problem):
    model = la.inject(tiny_llama(), la.LoRAConfig(r=2, target_modules=["q_proj"]))
    sd = {k: torch.randn_like(v) for k, v in la.adapter_state_dict(model).items()}
    key = next(iter(sd))
    if problem == "missing":
        del sd[key]
    elif problem == "unexpected":
        sd["model.layers.0.self_attn.k_proj.adapter.default.lora_A"] = torch.zeros(2, 64)
    else:
        sd[key] = torch.zeros(3, 3)
    before = {k: v.clone() for k, v in la.adapter_state_dict(model).items()}
    with pytest.raises(
        la.AdapterStateError,
        match={"missing": "missing keys", "unexpected": "unexpected keys", "shape": "shape mismatches"}[problem],
    ):
        la.load_adapter_state_dict(model, sd)
    assert all(torch.equal(la.adapter_state_dict(model)[k], v) for k, v in before.items())


def test_non_strict_load_takes_the_matching_keys():
    model = la.inject(tiny_llama(), la.LoRAConfig(r=2, target_modules=["q_proj"]))
    sd = {k: torch.ones_like(v) for k, v in la.adapter_state_dict(model).items()}
    key = sorted(sd)[0]
    partial = {key: sd[key]}
    la.load_adapter_state_dict(model, partial, strict=False)
    assert torch.equal(la.adapter_state_dict(model)[key], sd[key])


def test_peft_dir_with_unknown_type_or_bad_files(tmp_path):
    model = la.inject(tiny_llama(), la.LoRAConfig(r=2, target_modules=["q_proj"]))
    la.save_peft(model, tmp_path / "good")
    fresh = tiny_llama()
    snap = _snapshot(fresh)
    bad_type = tmp_path / "bad_type"
    bad_type.mkdir()
    cfg = json.loads((tmp_path / "good" / "adapter_config.json").read_text())
    cfg["peft_type"] = "PREFIX_TUNING"
    (bad_type / "adapter_config.json").write_text(json.dumps(cfg))
    (bad_type / "adapter_model.safetensors").write_bytes((tmp_path / "good" / "adapter_model.safetensors").read_bytes())
    with pytest.raises(la.AdapterConfigError, match="PREFIX_TUNING"):
        la.load_peft(fresh, bad_type)
    _assert_unchanged(fresh, snap)
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / "adapter_config.json").write_text((tmp_path / "good" / "adapter_config.json").read_text())
    data = (tmp_path / "good" / "adapter_model.safetensors").read_bytes()
    (truncated / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(la.AdapterStateError, match="not a readable safetensors"):
        la.load_peft(fresh, truncated)
    _assert_unchanged(fresh, snap)
    other_base = tiny_llama(hidden_size=32, intermediate_size=64)
    snap2 = _snapshot(other_base)
    with pytest.raises(la.AdapterStateError, match="mis-shaped"):
        la.load_peft(other_base, tmp_path / "good")
    _assert_unchanged(other_base, snap2)


def test_save_peft_is_atomic_when_tensors_cannot_be_computed(tmp_path, monkeypatch):
    model = la.inject(tiny_llama(), la.LoRAConfig(r=2, target_modules=["q_proj"]))
    la.save_peft(model, tmp_path)
    good = (tmp_path / "adapter_model.safetensors").read_bytes()
    import lightning_adapters.interop.peft as interop

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("safetensors.torch.save", boom)
    randomize_adapter(model)
    with pytest.raises(RuntimeError, match="disk full"):
        interop.save_peft(model, tmp_path)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_bf16_base_gets_fp32_adapters_and_output_dtype_is_kept():
    model = tiny_llama().to(torch.bfloat16)
    la.inject(model, la.LoRAConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert all(v.dtype == torch.float32 for v in la.adapter_state_dict(model).values())
    randomize_adapter(model)
    assert model(token_batch()).logits.dtype == torch.bfloat16
    model.to(torch.bfloat16)
    la.apply_dtype_policy(model)
    assert all(v.dtype == torch.float32 for v in la.adapter_state_dict(model).values())
