"""Data integrity under hostile input (issue 15): validate first, mutate second, and nothing silently wrong.

Every test states the truth it checks against: the model as it was before the call (a full structural snapshot
of modules, classes, parameters, flags and hooks), bit-exact weights, or the rounding bound of the base dtype.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch
from torch import nn

import lightning_adapters as la
from lightning_adapters.core import inject as inject_mod
from lightning_adapters.core.layer import AdapterLayer
from lightning_adapters.registry import spec_for_config
from tests.helpers import Wrap, randomize_adapter, tiny_gpt2, tiny_llama, token_batch


def _tree(model: nn.Module) -> dict[str, Any]:
    """Everything ``inject`` could change: module identities, classes, flags, attributes, hooks and parameters."""
    modules = {}
    for name, m in model.named_modules():
        hooks = {
            k: list(v.keys()) for k, v in m.__dict__.items() if isinstance(v, dict) and ("hook" in k or "_pre" in k)
        }
        modules[name] = (id(m), type(m), m.training, sorted(m.__dict__), hooks)
    params = {
        n: (id(p), p.requires_grad, p.dtype, p.data_ptr(), p.detach().clone())
        for n, p in model.named_parameters(remove_duplicate=False)
    }
    buffers = {n: (id(b), b.detach().clone()) for n, b in model.named_buffers(remove_duplicate=False)}
    records = [(prefix, id(rec)) for prefix, _, rec in inject_mod.find_records(model)]
    return {"modules": modules, "params": params, "buffers": buffers, "records": records}


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equal values (NaN equal to NaN)."""
    return a.dtype == b.dtype and a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())


def _assert_same_tree(model: nn.Module, before: dict[str, Any]) -> None:
    now = _tree(model)
    assert now["modules"] == before["modules"]
    assert set(now["params"]) == set(before["params"])
    for n, (pid, rg, dt, ptr, value) in before["params"].items():
        npid, nrg, ndt, nptr, nvalue = now["params"][n]
        assert (npid, nrg, ndt, nptr) == (pid, rg, dt, ptr), n
        assert _same(nvalue, value), n
    assert set(now["buffers"]) == set(before["buffers"])
    for n, (bid, value) in before["buffers"].items():
        assert now["buffers"][n][0] == bid and _same(now["buffers"][n][1], value), n
    assert now["records"] == before["records"]


def _mixed_flags_llama() -> nn.Module:
    model = tiny_llama().train()
    model.model.layers[0].eval()
    model.model.embed_tokens.weight.requires_grad_(False)
    model.model.layers[1].mlp.register_forward_hook(lambda *a: None)
    return model


# ------------------------------------------------------------------------------------------------------------
# inject rolls back on any exception

LAYER_CONFIGS = {
    "lora": lambda: la.LoRAConfig(r=2, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]),
    "dora": lambda: la.LoRAConfig(r=2, use_dora=True, target_modules=["q_proj", "v_proj"]),
    "loha": lambda: la.LoHaConfig(r=2, target_modules=["q_proj", "v_proj"]),
    "lokr": lambda: la.LoKrConfig(r=2, target_modules=["q_proj", "v_proj"]),
    "oft": lambda: la.OFTConfig(oft_block_size=8, target_modules=["q_proj", "v_proj"]),
    "boft": lambda: la.BOFTConfig(boft_block_size=4, target_modules=["q_proj", "v_proj"]),
    "adalora": lambda: la.AdaLoRAConfig(init_r=4, target_r=2, total_step=10, target_modules=["q_proj", "v_proj"]),
}


class Boom(RuntimeError):
    pass


def _fail_on_call(n: int, fn, exc: BaseException):
    calls = itertools.count(1)

    def wrapper(*args, **kwargs):
        if next(calls) == n:
            raise exc
        return fn(*args, **kwargs)

    return wrapper


@pytest.mark.parametrize("method", sorted(LAYER_CONFIGS))
def test_inject_rolls_back_when_any_layer_step_fails(method, monkeypatch):
    """Fail the N-th layer construction, the N-th attach and the N-th dtype cast, for every N; and the freeze."""
    cfg = LAYER_CONFIGS[method]()
    spec = spec_for_config(cfg)
    n_layers = 4
    cases = [("create", n, Boom("layer constructor")) for n in range(1, n_layers + 1)]
    cases += [("attach", n, Boom("attach")) for n in range(1, n_layers + 1)]
    cases += [("attach", 3, KeyboardInterrupt())]
    cases += [("dtype", n, Boom("dtype")) for n in range(1, n_layers + 1)]
    cases += [("freeze", 1, KeyboardInterrupt())]
    for step, n, exc in cases:
        model = _mixed_flags_llama()
        before = _tree(model)
        with monkeypatch.context() as mp:
            if step == "create":
                mp.setattr(spec, "create_layer", _fail_on_call(n, spec.create_layer, exc))
            elif step == "attach":
                mp.setattr(inject_mod, "attach", _fail_on_call(n, inject_mod.attach, exc))
            elif step == "dtype":
                mp.setattr(AdapterLayer, "apply_dtype", _fail_on_call(n, AdapterLayer.apply_dtype, exc))
            else:
                mp.setattr(inject_mod, "apply_trainability", _fail_on_call(n, inject_mod.apply_trainability, exc))
            with pytest.raises(type(exc)):
                la.inject(model, cfg)
        _assert_same_tree(model, before)
    # The model still takes the same injection afterwards, and ejects back to the original.
    model = _mixed_flags_llama()
    before = _tree(model)
    la.eject(la.inject(model, cfg))
    _assert_same_tree(model, before)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_inject_with_a_residual_init_rolls_back_the_base_values_bit_exactly(init, monkeypatch):
    """PiSSA/OLoRA write ``W − s·B0·A0`` into each base on attach; a later failure must give back ``W`` exactly."""
    cfg = la.LoRAConfig(r=2, init_weights=init, target_modules=["q_proj", "v_proj"])
    for n in (2, 3, 4):
        model = _mixed_flags_llama()
        before = _tree(model)
        with monkeypatch.context() as mp:
            mp.setattr(inject_mod, "attach", _fail_on_call(n, inject_mod.attach, Boom("attach")))
            with pytest.raises(Boom):
                la.inject(model, cfg)
        _assert_same_tree(model, before)
    model = _mixed_flags_llama()
    before = _tree(model)
    with monkeypatch.context() as mp:
        mp.setattr(inject_mod, "apply_trainability", _fail_on_call(1, inject_mod.apply_trainability, Boom("x")))
        with pytest.raises(Boom):
            la.inject(model, cfg)
    _assert_same_tree(model, before)


@pytest.mark.parametrize("hook", ["register_forward_hook", "register_forward_pre_hook"])
def test_llama_adapter_inject_rolls_back_a_failing_hook_registration(hook, monkeypatch):
    cfg = la.LlamaAdapterConfig(adapter_len=4, adapter_layers=2)
    for n in (1, 2):  # two layers: at least two registrations of each kind
        model = _mixed_flags_llama()
        before = _tree(model)
        with monkeypatch.context() as mp:
            mp.setattr(nn.Module, hook, _fail_on_call(n, getattr(nn.Module, hook), Boom("hook")))
            with pytest.raises(Boom):
                la.inject(model, cfg)
        _assert_same_tree(model, before)
        ids = token_batch()
        model.eval()
        with torch.no_grad():
            ref = tiny_llama()
            ref.load_state_dict(model.state_dict())
            assert torch.equal(model(ids).logits, ref(ids).logits)


def test_attribute_clash_on_a_later_target_leaves_no_adapter():
    """A real bad input: the second target already has an ``adapter`` attribute (refused before any change)."""
    model = tiny_llama()
    model.model.layers[1].self_attn.q_proj.adapter = "user data"
    before = _tree(model)
    with pytest.raises(la.AdapterConfigError, match=r"\['model.layers.1.self_attn.q_proj'\] already have an attr"):
        la.inject(model, la.LoRAConfig(r=2, target_modules=["q_proj"]))
    _assert_same_tree(model, before)


# ------------------------------------------------------------------------------------------------------------
# load_adapter_state_dict checks every value before copying any


def _bad_value(kind: str, sd: dict[str, torch.Tensor], key: str) -> dict[str, Any]:
    t = sd[key]
    if kind == "not-a-tensor":
        sd[key] = t.tolist()
    elif kind == "numpy":
        sd[key] = t.numpy()
    elif kind == "meta":
        sd[key] = torch.empty_like(t, device="meta")
    elif kind == "int-for-float":
        sd[key] = torch.ones_like(t, dtype=torch.int64)
    elif kind == "bool-for-float":
        sd[key] = torch.ones_like(t, dtype=torch.bool)
    elif kind == "complex-for-float":
        sd[key] = t.to(torch.complex64)
    elif kind == "nan":
        sd[key] = t.clone().fill_(float("nan"))
    elif kind == "inf":
        sd[key] = t.clone()
        sd[key].view(-1)[0] = float("inf")
    elif kind == "sparse":
        sd[key] = t.to_sparse()
    elif kind == "shape":
        sd[key] = t.reshape(-1)
    return sd


BAD_VALUES = ["not-a-tensor", "numpy", "meta", "int-for-float", "bool-for-float", "complex-for-float", "nan", "inf"]
BAD_VALUES += ["sparse", "shape"]


@pytest.mark.parametrize("kind", BAD_VALUES)
def test_load_refuses_a_bad_value_in_the_last_key_before_copying_the_first(kind):
    model = la.inject(tiny_llama(), la.LoRAConfig(r=2, target_modules=["q_proj", "v_proj"]))
    good = {k: torch.randn_like(v) for k, v in la.adapter_state_dict(model).items()}
    last = sorted(good)[-1]
    before = _tree(model)
    with pytest.raises(la.AdapterStateError, match=last.replace(".", r"\.")):
        la.load_adapter_state_dict(model, _bad_value(kind, dict(good), last))
    _assert_same_tree(model, before)


def test_non_finite_values_load_when_asked_for():
    model = la.inject(tiny_llama(), la.LoRAConfig(r=2, target_modules=["q_proj"]))
    sd = {k: torch.full_like(v, float("nan")) for k, v in la.adapter_state_dict(model).items()}
    la.load_adapter_state_dict(model, sd, check_finite=False)
    assert all(v.isnan().all() for v in la.adapter_state_dict(model).values())


def test_load_accepts_other_devices_and_float_dtypes_and_copies_values_not_references():
    model = la.inject(tiny_llama(), la.LoRAConfig(r=2, target_modules=["q_proj"]))
    live = la.adapter_state_dict(model)
    # Swapped references to the live tensors: a load that copied one by one would overwrite the second source.
    a, b = sorted(k for k in live if k.endswith("lora_A"))
    want = {k: v.clone() for k, v in live.items()}
    sd = dict(live)
    sd[a], sd[b] = live[b], live[a]
    la.load_adapter_state_dict(model, sd)
    assert torch.equal(live[a], want[b]) and torch.equal(live[b], want[a])
    half = {k: v.to(torch.float64) for k, v in want.items()}
    la.load_adapter_state_dict(model, half)
    assert all(torch.equal(live[k], v) for k, v in want.items())


def test_load_rejects_a_mask_that_is_not_zero_one_and_takes_one_that_is():
    model = la.inject(tiny_llama(), la.AdaLoRAConfig(init_r=4, target_r=2, target_modules=["q_proj"]))
    sd = {k: v.clone() for k, v in la.adapter_state_dict(model).items()}
    key = next(k for k in sd if k.endswith("rank_mask"))
    before = _tree(model)
    with pytest.raises(la.AdapterStateError, match="other than 0/1 for a bool mask"):
        la.load_adapter_state_dict(model, {**sd, key: torch.tensor([1.0, 0.5, 0.0, 1.0])})
    _assert_same_tree(model, before)
    la.load_adapter_state_dict(model, {**sd, key: torch.tensor([1, 0, 0, 1], dtype=torch.uint8)})
    assert la.adapter_state_dict(model)[key].tolist() == [True, False, False, True]


@pytest.mark.parametrize("state", [None, [("a", torch.zeros(1))], "adapter.safetensors"])
def test_load_refuses_a_state_that_is_not_a_mapping(state):
    model = la.inject(tiny_llama(), la.LoRAConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(la.AdapterTypeError, match="must be a mapping"):
        la.load_adapter_state_dict(model, state)


def test_load_into_a_meta_model_is_refused():
    with torch.device("meta"):
        model = tiny_llama()
    la.inject(model, la.LoRAConfig(r=2, target_modules=["q_proj"]))
    sd = {k: torch.zeros(v.shape) for k, v in la.adapter_state_dict(model).items()}
    with pytest.raises(la.AdapterStateError, match="meta device.*to_empty"):
        la.load_adapter_state_dict(model, sd)


# ------------------------------------------------------------------------------------------------------------
# merge(safe=True): checked in the base dtype, and a refusal restores every layer bit-exactly


def _two_layer(dtype: torch.dtype, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16)).to(dtype)
    return model


def test_safe_merge_refuses_a_weight_that_overflows_fp16():
    model = _two_layer(torch.float16)
    with torch.no_grad():
        model[1].weight.fill_(60000.0)  # fp16 max is 65504
    la.inject(model, la.LoRAConfig(r=2, target_modules=["0", "1"]))
    with torch.no_grad():
        for layer in (model[0].adapter.default, model[1].adapter.default):
            layer.lora_A.fill_(1.0)
            layer.lora_B.fill_(1250.0)  # ΔW = s·B·A = 4·2·1250 = 1e4 per element: 7e4 overflows fp16, not fp32
    before = _tree(model)
    with pytest.raises(la.MergeError, match=r"'1' refused.*non-finite.*float16"):
        la.merge(model, safe=True)
    _assert_same_tree(model, before)
    assert not any(layer.merged for _, _, layer in inject_mod.adapted_modules(model))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_refused_safe_merge_restores_earlier_layers_bit_exactly(dtype):
    model = tiny_llama().to(dtype)
    la.inject(model, la.LoRAConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    randomize_adapter(model, std=0.5)
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.adapter.default.lora_B[0, 0] = float("nan")  # the last layer merged
    before = _tree(model)
    with pytest.raises(la.MergeError, match=r"layers\.1\.self_attn\.o_proj"):
        la.merge(model, safe=True)
    _assert_same_tree(model, before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_unmerge_by_subtraction_is_not_bit_exact_on_half_bases_which_is_why_refusals_restore_copies(dtype):
    """The premise of the test above: the old rollback (unmerge) changes half-precision weights."""
    model = tiny_llama().to(dtype)
    la.inject(model, la.LoRAConfig(r=4, target_modules=["q_proj"]))
    randomize_adapter(model, std=0.5)
    w = model.model.layers[0].self_attn.q_proj.weight
    original = w.detach().clone()
    la.merge(model)
    la.unmerge(model)
    assert not torch.equal(w, original)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("method", ["lora", "loha", "adalora"])
def test_unmerge_meets_the_documented_rounding_bound(dtype, method):
    """``|unmerge(merge(W)) − W| ≤ u·(|W + ΔW| + |W|)`` (u: unit roundoff of the base dtype), and exact where ΔW=0."""
    cfgs = {
        "lora": la.LoRAConfig(r=4, target_modules=["q_proj"]),
        "loha": la.LoHaConfig(r=4, target_modules=["q_proj"]),
        "adalora": la.AdaLoRAConfig(init_r=4, target_r=2, target_modules=["q_proj"]),
    }
    model = tiny_llama().to(dtype)
    la.inject(model, cfgs[method])
    randomize_adapter(model, std=0.5)
    base = model.model.layers[0].self_attn.q_proj
    layer = base.adapter.default
    w0 = base.weight.detach().clone()
    with torch.no_grad():
        dw = layer.delta_weight(base) if method == "adalora" else layer.delta_weight()
    la.merge(model)
    la.unmerge(model)
    u = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24}[dtype]
    tiny = torch.finfo(dtype).smallest_normal
    w0f, dwf = w0.float(), dw.float()
    bound = u * ((w0f + dwf).abs() + w0f.abs()) * (1 + 4 * u) + tiny
    err = (base.weight.float() - w0f).abs()
    assert (err <= bound).all(), (err - bound).max()
    la.merge(model)
    with torch.no_grad():
        for p in la.adapter_state_dict(model).values():
            if p.is_floating_point():
                p.zero_()
    la.unmerge(model)  # ΔW is now 0: unmerge subtracts nothing from the merged weights
    merged = base.weight.detach().clone()
    la.merge(model)
    la.unmerge(model)
    assert torch.equal(base.weight, merged)


def test_eject_merge_safe_refuses_and_leaves_the_model_injected():
    model = _two_layer(torch.bfloat16)
    la.inject(model, la.LoRAConfig(r=2, target_modules=["0", "1"]))
    randomize_adapter(model, std=0.5)
    with torch.no_grad():
        model[1].adapter.default.lora_A[0, 0] = float("inf")
    before = _tree(model)
    with pytest.raises(la.MergeError, match="'1' refused"):
        la.eject(model, merge=True, safe=True)
    assert inject_mod.find_records(model)
    now = _tree(model)
    assert now["params"].keys() == before["params"].keys()
    assert all(_same(now["params"][k][4], v[4]) for k, v in before["params"].items())
    # A good adapter ejects merged, with the safe check on.
    with torch.no_grad():
        model[1].adapter.default.lora_A[0, 0] = 0.0
    with torch.no_grad():
        expected = [(m.weight.float() + m.adapter.default.delta_weight().float()).to(torch.bfloat16) for m in model]
    la.eject(model, merge=True, safe=True)
    assert not inject_mod.find_records(model) and type(model[1]) is nn.Linear
    assert all(torch.equal(m.weight, w) for m, w in zip(model, expected))


def test_merge_of_a_meta_model_is_refused():
    with torch.device("meta"):
        model = tiny_llama()
    la.inject(model, la.LoRAConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(la.AdapterStateError, match=r"q_proj\.weight is on the meta device"):
        la.merge(model)
    assert not any(layer.merged for _, _, layer in inject_mod.adapted_modules(model))


def test_merge_errors_are_library_errors():
    model = la.inject(tiny_gpt2(), la.LoRAConfig(r=2, target_modules=["c_attn"]))
    with torch.no_grad():
        model.transformer.h[0].attn.c_attn.adapter.default.lora_B.fill_(float("nan"))
    with pytest.raises(la.AdapterError) as info:
        la.merge(model, safe=True)
    assert isinstance(info.value, ValueError) and "transformer.h.0.attn.c_attn" in str(info.value)


# ------------------------------------------------------------------------------------------------------------
# One library error naming the value


@pytest.mark.parametrize("model", [None, {"weight": torch.zeros(2)}, "gpt2", nn.Linear])
def test_public_functions_refuse_a_model_that_is_not_a_module(model):
    calls = [
        lambda: la.inject(model, la.LoRAConfig()),
        lambda: la.merge(model),
        lambda: la.unmerge(model),
        lambda: la.eject(model),
        lambda: la.adapter_state_dict(model),
        lambda: la.load_adapter_state_dict(model, {}),
        lambda: la.summary(model),
        lambda: la.config_of(model),
    ]
    expected = f"must be a torch.nn.Module instance, got {type(model).__name__}"
    for call in calls:
        with pytest.raises(la.AdapterTypeError, match=expected):
            call()


def test_config_that_is_not_a_config_is_a_library_type_error():
    with pytest.raises(la.AdapterTypeError, match="got dict"):
        la.inject(tiny_llama(), {"r": 8})


@pytest.mark.parametrize(
    "cfg, field",
    [
        (lambda: la.LoRAConfig(r=10**12, target_modules=["q_proj"]), "r"),
        (lambda: la.LoRAConfig(r=2, rank_pattern={"v_proj": 10**9}, target_modules=["q_proj", "v_proj"]), "r"),
        (lambda: la.LoHaConfig(r=10**12, target_modules=["q_proj"]), "r"),
        (lambda: la.LoKrConfig(r=10**12, target_modules=["q_proj"]), "r"),
        (lambda: la.AdaLoRAConfig(init_r=10**12, target_r=2, target_modules=["q_proj"]), "init_r"),
        (lambda: la.LlamaAdapterConfig(adapter_len=10**9, adapter_layers=1), "adapter_len"),
    ],
    ids=["lora", "lora-rank-pattern", "loha", "lokr", "adalora", "llama-adapter"],
)
def test_absurd_rank_is_refused_before_anything_is_allocated(cfg, field, monkeypatch):
    model = tiny_llama()
    before = _tree(model)
    allocated = []
    real_empty = torch.empty

    def tracking_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        allocated.append(t.numel())
        return t

    monkeypatch.setattr(torch, "empty", tracking_empty)
    with pytest.raises(la.AdapterConfigError, match=rf"{field}=10{{9,12}}|{field}=1000000000"):
        la.inject(model, cfg())
    assert max(allocated, default=0) < 10**6
    _assert_same_tree(model, before)


def test_rank_above_the_layer_size_is_still_allowed_up_to_the_limit():
    """PEFT allows any rank; a rank a little above the layer's size (saved by PEFT, say) must still load."""
    model = la.inject(Wrap(nn.Linear(4, 4)), la.LoRAConfig(r=64, target_modules=["layer"]))
    assert model.layer.adapter.default.lora_A.shape == (64, 4)
    with pytest.raises(la.AdapterConfigError, match="r=65 on 'layer'.*at most 64"):
        la.inject(Wrap(nn.Linear(4, 4)), la.LoRAConfig(r=65, target_modules=["layer"]))


def test_layer_kind_of_an_unsupported_module_is_a_library_error():
    from lightning_adapters.methods._common import layer_kind

    with pytest.raises(la.UnsupportedLayerError, match="ReLU"):
        layer_kind(nn.ReLU())


@pytest.mark.parametrize(
    "spoil, match",
    [
        (lambda t: t.to(torch.int32), r"dtype int32 \(integer\) for a floating tensor"),
        (lambda t: t.clone().fill_(float("nan")), r"128 non-finite values"),
    ],
    ids=["integer", "nan"],
)
def test_load_peft_refuses_values_a_copy_would_convert_or_poison(spoil, match, tmp_path):
    from safetensors.torch import load_file, save_file

    la.save_peft(la.inject(tiny_llama(), la.LoRAConfig(r=2, target_modules=["q_proj"])), tmp_path / "a")
    path = tmp_path / "a" / "adapter_model.safetensors"
    tensors = load_file(str(path))
    key = sorted(tensors)[-1]
    save_file({**tensors, key: spoil(tensors[key])}, str(path))
    model = tiny_llama()
    before = _tree(model)
    with pytest.raises(la.AdapterStateError, match=rf"q_proj.lora_B.weight: {match}"):
        la.load_peft(model, tmp_path / "a")
    _assert_same_tree(model, before)


# value_problem, the check behind every state load, against values whose verdict is known by construction: the
# number of non-finite values counted by hand, and overflow decided by each dtype's largest finite value
# (fp16 65504, bf16 and fp32 about 3.4e38).
VALUE_CASES = [
    # (value, target, check_finite, expected message or None)
    (torch.tensor([1.0, float("nan"), float("inf"), -float("inf")]), torch.zeros(4), True, "k: 3 non-finite values"),
    (torch.tensor([7e4, -7e4, 6e4]), torch.zeros(3).half(), True, "k: 2 values overflow to inf as float16"),
    (torch.tensor([1e300, 1.0], dtype=torch.float64), torch.zeros(2), True, "k: 1 values overflow to inf as float32"),
    (torch.tensor([1e39, 3e38], dtype=torch.float64), torch.zeros(2).bfloat16(), True, "k: 1 values overflow"),
    (torch.tensor([7e4, float("nan")]), torch.zeros(2, dtype=torch.float16), False, None),
    (torch.tensor([65504.0, -65504.0]), torch.zeros(2, dtype=torch.float16), True, None),
    (torch.tensor([True, False]), torch.zeros(2, dtype=torch.bool), True, None),
    (torch.tensor([1, 0], dtype=torch.uint8), torch.zeros(2, dtype=torch.bool), True, None),
    (torch.tensor([2, 0]), torch.zeros(2, dtype=torch.bool), True, "k: a int64 tensor with values other than 0/1"),
    (torch.tensor([3, 4]), torch.zeros(2, dtype=torch.int32), True, None),
    (torch.tensor([3.0, 4.0]), torch.zeros(2, dtype=torch.int32), True, "k: dtype float32 (floating) for a integer"),
    (torch.tensor([True, False]), torch.zeros(2), True, "k: dtype bool (bool) for a floating tensor (float32)"),
]


@pytest.mark.parametrize("value, target, check_finite, expected", VALUE_CASES, ids=[str(i) for i in range(12)])
def test_value_problem_counts_non_finite_and_overflowing_values_by_target_dtype(value, target, check_finite, expected):
    from lightning_adapters.core.state import value_problem

    got = value_problem("k", value, target, check_finite, "; HINT")
    if expected is None:
        assert got is None, got
    else:
        assert got is not None and got.startswith(expected), got
        assert got.endswith("; HINT") == ("non-finite" in expected or "overflow" in expected), got


def test_a_value_that_is_not_a_tensor_is_shown_whole_when_short_and_cut_when_long():
    from lightning_adapters.core.state import value_problem

    assert value_problem("k", 3, torch.zeros(2)) == "k: a int (3), not a torch.Tensor"
    long = list(range(40))
    assert value_problem("k", long, torch.zeros(2)) == f"k: a list ({repr(long)[:37]}...), not a torch.Tensor"


def test_a_value_whose_repr_is_exactly_the_limit_is_shown_whole():
    from lightning_adapters.core.state import value_problem

    value = "x" * 38
    assert len(repr(value)) == 40
    assert value_problem("k", value, torch.zeros(2)) == f"k: a str ({value!r}), not a torch.Tensor"
