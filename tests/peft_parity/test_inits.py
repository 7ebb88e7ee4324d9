"""LoRA initialisations against PEFT 0.21 (``init_lora_weights``): factors, residual base, files both ways."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict

import lightning_adapters as la
from lightning_adapters.core.inject import adapted_modules
from lightning_adapters.interop.peft import peft_tensors
from tests.helpers import SmallCNN, randomize_adapter, tiny_gpt2, tiny_llama, token_batch

RTOL = 1e-5


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = RTOL) -> None:
    scale = b.abs().max().clamp_min(1e-12)
    assert ((a - b).abs().max() / scale).item() <= rtol, ((a - b).abs().max() / scale).item()


def _logits(model, x):
    with torch.no_grad():
        return model(x).logits


def _peft_layers(pm):
    from peft.tuners.lora import LoraLayer

    return {n.removeprefix("base_model.model."): m for n, m in pm.named_modules() if isinstance(m, LoraLayer)}


def _randomize_peft(model, seed=0, std=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * std)


TARGETS = ["q_proj", "v_proj", "down_proj"]
WEIGHT_CASES = {
    "pissa": ("llama", dict(r=4, lora_alpha=8, init_lora_weights="pissa", target_modules=TARGETS)),
    "pissa-rslora-dora": (
        "llama",
        dict(r=4, lora_alpha=8, init_lora_weights="pissa", target_modules=TARGETS, use_rslora=True, use_dora=True),
    ),
    "pissa-gpt2-conv1d": (
        "gpt2",
        dict(r=4, lora_alpha=8, init_lora_weights="pissa", target_modules=["c_attn", "c_fc"], fan_in_fan_out=True),
    ),
    "pissa-embedding": ("llama", dict(r=4, lora_alpha=8, init_lora_weights="pissa", target_modules=["embed_tokens"])),
    "olora": ("llama", dict(r=4, lora_alpha=16, init_lora_weights="olora", target_modules=TARGETS)),
    "olora-patterns": (
        "llama",
        dict(
            r=4,
            lora_alpha=8,
            init_lora_weights="olora",
            target_modules=TARGETS,
            rank_pattern={"v_proj": 2},
            alpha_pattern={"q_proj": 3},
        ),
    ),
}


def _assert_same_grads(ours, pm, x):
    """Gradients of every adapter factor equal PEFT's on the same loss."""
    ours(x).logits.square().mean().backward()
    pm(x).logits.square().mean().backward()
    for name, p in _peft_layers(pm).items():
        layer = ours.get_submodule(name).adapter.default
        if "default" in p.lora_A:
            theirs = (p.lora_A["default"].weight.grad, p.lora_B["default"].weight.grad)
        else:
            theirs = (p.lora_embedding_A["default"].grad, p.lora_embedding_B["default"].grad)
        _close(layer.lora_A.grad, theirs[0], 1e-4)
        _close(layer.lora_B.grad, theirs[1], 1e-4)
    ours.zero_grad()


def _build(kind):
    torch.manual_seed(0)
    return tiny_llama() if kind == "llama" else tiny_gpt2()


@pytest.mark.parametrize("case", list(WEIGHT_CASES))
def test_weight_init_equals_peft(case):
    """Same A, B and residual base weight as PEFT; the model starts as the base; merge and eject stay exact."""
    kind, kw = WEIGHT_CASES[case]
    base = _build(kind)
    x = token_batch(128)
    ref = _logits(base, x)
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(**kw))
    ours = la.inject(copy.deepcopy(base), la.get_method("lora").config_from_peft(pm.peft_config["default"].to_dict()))
    _close(_logits(ours, x), ref)  # identity at init (W_res + s·B0·A0 = W)
    peft_layers = _peft_layers(pm)
    our_layers = {n: layer for n, _, layer in adapted_modules(ours)}
    assert set(our_layers) == set(peft_layers)
    for name, layer in our_layers.items():
        p = peft_layers[name]
        state = layer.peft_state()
        a_key = "lora_A.weight" if "lora_A.weight" in state else "lora_embedding_A"
        pa = p.lora_A["default"].weight if a_key == "lora_A.weight" else p.lora_embedding_A["default"]
        if a_key == "lora_A.weight":  # embeddings fall back to PEFT's random default: compare the rest only
            _close(state[a_key], pa)
            _close(state["lora_B.weight"], p.lora_B["default"].weight)
        _close(ours.get_submodule(name).weight, p.get_base_layer().weight)
    # trained adapters: same outputs, merged too, and eject gives back the original base
    randomize_adapter(ours)
    set_peft_model_state_dict(pm, peft_tensors(ours))
    _close(_logits(ours, x), _logits(pm, x))
    _assert_same_grads(ours, pm, x)
    expected = _logits(ours, x)
    la.merge(ours)
    _close(_logits(ours, x), expected)
    la.unmerge(ours)
    plain = la.eject(ours)
    for p, q in zip(plain.parameters(), base.parameters()):
        _close(p, q)
    _close(_logits(plain, x), ref)


def _single_layer(init, r=4, alpha=8, seed=None):
    """PEFT and ours on one q_proj, PEFT's init re-run by hand from ``seed`` on the original weight."""
    base = _build("llama")
    name = "model.layers.0.self_attn.q_proj"
    w = base.get_submodule(name).weight.detach().clone()
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=alpha, target_modules=[name]))
    p = _peft_layers(pm)[name]
    with torch.no_grad():
        p.get_base_layer().weight.copy_(w)
    if seed is not None:
        torch.manual_seed(seed)
    if init == "orthogonal":
        p.orthogonal_init("default")
    else:
        p.pissa_init("default", init)
    if seed is not None:
        torch.manual_seed(seed)
    ours = la.inject(copy.deepcopy(base), la.LoRAConfig(r=r, alpha=alpha, target_modules=[name], init_weights=init))
    layer = ours.get_submodule(name).adapter.default
    return p, layer, ours.get_submodule(name).weight, base, ours


@pytest.mark.parametrize("init", ["pissa_niter_2", "orthogonal"])
def test_random_inits_equal_peft_on_the_same_seed(init):
    """pissa_niter_K draws from a fixed seed (0), orthogonal from the global RNG in PEFT's order."""
    p, layer, w, base, ours = _single_layer(init, seed=0)
    _close(layer.lora_A, p.lora_A["default"].weight)
    _close(layer.lora_B, p.lora_B["default"].weight)
    _close(w, p.get_base_layer().weight)
    if init == "orthogonal":
        assert layer.lora_B.abs().min() > 0 and layer.lora_A.abs().min() > 0
        assert (layer.lora_B @ layer.lora_A).abs().max() < 1e-6  # B·A = 0 though neither factor is
    x = token_batch(128)
    _close(_logits(ours, x), _logits(base, x))


def test_pissa_niter_is_repeatable_and_close_to_the_exact_svd():
    """The residual is rebuilt identically on every injection (resume, load), and approaches exact PiSSA."""
    from lightning_adapters.methods.lora_init import pissa_factors

    _, a, w1, _, _ = _single_layer("pissa_niter_2")
    torch.manual_seed(123)  # the global RNG does not matter
    _, b, w2, _, _ = _single_layer("pissa_niter_2")
    assert torch.equal(a.lora_A, b.lora_A) and torch.equal(w1, w2)
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(48, 32, generator=g))
    v, _ = torch.linalg.qr(torch.randn(40, 32, generator=g))
    w = u @ torch.diag(0.2 ** torch.arange(32.0)) @ v.t()  # (48, 40), a decaying spectrum
    A, B = pissa_factors(w, 4, 2.0)
    An, Bn = pissa_factors(w, 4, 2.0, niter=4)
    _close(Bn @ An, B @ A, 1e-4)
    _close(2.0 * B @ A, u[:, :4] @ torch.diag(0.2 ** torch.arange(4.0)) @ v[:, :4].t(), 1e-5)


@pytest.mark.parametrize("init", ["pissa", "OLoRA"])
def test_files_both_ways(tmp_path, init):
    """PEFT -> ours -> PEFT on the unmodified base: the residual is rebuilt on load; outputs and merge equal."""
    base = _build("llama")
    x = token_batch(128)
    pm = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, init_lora_weights=init, target_modules=TARGETS)
    )
    _randomize_peft(pm)
    pm.save_pretrained(tmp_path / "peft")
    expected = _logits(pm, x)
    ours = la.load_peft(copy.deepcopy(base), tmp_path / "peft")
    assert la.config_of(ours).init_weights == init.lower()
    _close(_logits(ours, x), expected)
    la.save_peft(ours, tmp_path / "ours")
    back = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    _close(_logits(back, x), expected)
    la.merge(ours)
    _close(_logits(ours, x), expected)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_convert_to_lora_equals_peft_conversion(tmp_path, init):
    """save_peft(convert_to_lora=True) writes PEFT's converted tensors; they load on the unmodified base."""
    base = _build("llama")
    x = token_batch(128)
    kw = dict(r=4, lora_alpha=8, init_lora_weights=init, target_modules=TARGETS, alpha_pattern={"v_proj": 4})
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(**kw))
    pm.peft_config["default"].init_lora_weights = True
    pm.save_pretrained(tmp_path / "init")  # the initial adapter, PEFT's recipe for the conversion
    pm.peft_config["default"].init_lora_weights = init
    ours = la.inject(copy.deepcopy(base), la.get_method("lora").config_from_peft(LoraConfig(**kw).to_dict()))
    _randomize_peft(pm)
    la.load_adapter_state_dict(ours, _our_state_from_peft(pm))
    expected = _logits(pm, x)
    _close(_logits(ours, x), expected)
    pm.save_pretrained(tmp_path / "peft", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    la.save_peft(ours, tmp_path / "ours", convert_to_lora=True)
    from safetensors.torch import load_file

    theirs = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    mine = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert set(theirs) == set(mine)
    for k in theirs:
        _close(mine[k], theirs[k])
    for d in ("ours", "peft"):
        plain_peft = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / d)
        assert plain_peft.peft_config["default"].init_lora_weights is True
        assert plain_peft.peft_config["default"].r == 8
        assert plain_peft.peft_config["default"].lora_alpha == 16
        assert plain_peft.peft_config["default"].alpha_pattern == {"v_proj": 8}
    _close(_logits(PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours"), x), expected)
    _close(_logits(la.load_peft(copy.deepcopy(base), tmp_path / "ours"), x), expected)


def _our_state_from_peft(pm):
    out = {}
    for name, p in _peft_layers(pm).items():
        out[f"{name}.adapter.default.lora_A"] = p.lora_A["default"].weight.detach()
        out[f"{name}.adapter.default.lora_B"] = p.lora_B["default"].weight.detach()
    return out


@pytest.mark.parametrize(
    ("init", "needle"),
    [("lora_ga", "LoRA-GA"), ("mica", "MiCA"), ("pissa_niter_x", "pissa_niter_<K>")],
)
def test_unimplemented_inits_are_refused_by_name(init, needle):
    with pytest.raises(la.AdapterConfigError, match=needle) as err:
        la.LoRAConfig(init_weights=init)
    assert repr(init) in str(err.value)


def test_refusals_before_any_change():
    model = SmallCNN()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(la.AdapterConfigError, match="convolution 'conv1'"):
        la.inject(model, la.LoRAConfig(r=4, target_modules=["fc", "conv1"], init_weights="pissa"))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not any(hasattr(m, "adapter") for m in model.modules())
    with pytest.raises(la.AdapterConfigError, match="even"):
        la.LoRAConfig(r=3, init_weights="orthogonal")
    with pytest.raises(la.AdapterConfigError, match="transformers Conv1D"):
        la.inject(tiny_gpt2(), la.LoRAConfig(r=4, target_modules=["c_attn"], init_weights="olora"))
    with pytest.raises(la.AdapterConfigError, match="corda"):
        la.get_method("lora").config_from_peft(LoraConfig(r=4, init_lora_weights="corda").to_dict())


# ------------------------------------------------------------------------------------------------------------
# LoRA+


def _peft_name(name: str) -> str:
    """Our parameter name -> PEFT's (``x.adapter.default.lora_A`` -> ``base_model.model.x.lora_A.default.weight``)."""
    suffix = {
        "adapter.default.lora_A": ("lora_A.default.weight", "lora_embedding_A.default"),
        "adapter.default.lora_B": ("lora_B.default.weight", "lora_embedding_B.default"),
        "adapter.default.magnitude": ("lora_magnitude_vector.default.weight",) * 2,
    }
    for ours, (linear, emb) in suffix.items():
        if name.endswith(ours):
            module = name[: -len(ours) - 1]
            return f"base_model.model.{module}.{emb if module.endswith('embed_tokens') else linear}"
    module, _, leaf = name.rpartition(".")
    return f"base_model.model.{module}.modules_to_save.default.{leaf}"


LORAPLUS_CASES = {
    "embed-dora-norm": dict(
        r=4,
        lora_alpha=8,
        target_modules=["embed_tokens", "q_proj", "v_proj"],
        use_dora=True,
        modules_to_save=["model.norm", "lm_head"],
    ),
    "bert-layernorm-head": dict(
        r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier", "LayerNorm"]
    ),
}


@pytest.mark.parametrize("case", list(LORAPLUS_CASES))
def test_loraplus_groups_equal_peft(case):
    """Same members, learning rates and weight decay per group as peft.optimizers.create_loraplus_optimizer."""
    from peft.optimizers import create_loraplus_optimizer

    from tests.helpers import tiny_bert

    kw = LORAPLUS_CASES[case]
    torch.manual_seed(0)
    base = tiny_bert() if case.startswith("bert") else tiny_llama(tie_word_embeddings=False)
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(**kw))
    opt = create_loraplus_optimizer(
        pm, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16, loraplus_weight_decay=0.1, loraplus_lr_embedding=3e-6
    )
    ours = la.inject(copy.deepcopy(base), la.get_method("lora").config_from_peft(pm.peft_config["default"].to_dict()))
    groups = la.loraplus_param_groups(ours, lr=1e-3, loraplus_lr_ratio=16, weight_decay=0.1, lr_embedding=3e-6)
    peft_names = {id(p): n for n, p in pm.named_parameters()}
    our_names = {id(p): n for n, p in ours.named_parameters()}
    assert len(groups) == len(opt.param_groups) == 4
    for g, pg in zip(groups, opt.param_groups):
        assert (g["lr"], g["weight_decay"]) == (pg["lr"], pg["weight_decay"])
        assert sorted(_peft_name(our_names[id(p)]) for p in g["params"]) == sorted(
            peft_names[id(p)] for p in pg["params"]
        )
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in ours.parameters())
    assert all(g["params"] for g in groups[:3]) if case.startswith("embed") else groups[1]["params"] == []
    torch.optim.AdamW(groups).step()  # usable as is


def test_loraplus_bad_arguments():
    model = la.inject(tiny_llama(), la.LoRAConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(la.AdapterConfigError, match="loraplus_lr_ratio must be a positive number, got 0"):
        la.loraplus_param_groups(model, lr=1e-3, loraplus_lr_ratio=0)
    with pytest.raises(la.AdapterConfigError, match="no trainable parameter"):
        la.loraplus_param_groups(tiny_llama().requires_grad_(False), lr=1e-3, loraplus_lr_ratio=4)


# ------------------------------------------------------------------------------------------------------------
# CorDA (data-driven)


def _corda_batches(n=3):
    return [token_batch(128, shape=(1, 9), seed=s) for s in range(n)]  # batch size 1: PEFT's hook squeezes it


@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_corda_equals_peft(tmp_path, method):
    """initialize_from_data on the same batches gives PEFT's preprocess_corda init; converted files load in PEFT."""
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    base = _build("llama")
    x = token_batch(128)
    batches = _corda_batches()
    kw = dict(r=4, lora_alpha=8, target_modules=TARGETS, rank_pattern={"v_proj": 2})
    peft_cfg = LoraConfig(**kw, init_lora_weights="corda", corda_config=CordaConfig(corda_method=method))
    hooked = copy.deepcopy(base)
    preprocess_corda(hooked, peft_cfg, run_model=lambda: [hooked(b) for b in batches])
    pm = get_peft_model(hooked, peft_cfg)
    cfg = la.LoRAConfig(r=4, alpha=8, target_modules=TARGETS, rank_pattern={"v_proj": 2}, init_weights="corda")
    cfg.corda_method = method
    ours = la.inject(copy.deepcopy(base), cfg)
    la.initialize_from_data(ours, batches)
    _close(_logits(ours, x), _logits(base, x))
    for name, p in _peft_layers(pm).items():
        layer = ours.get_submodule(name).adapter.default
        _close(layer.lora_A, p.lora_A["default"].weight, 1e-4)
        _close(layer.lora_B, p.lora_B["default"].weight, 1e-4)
        _close(ours.get_submodule(name).weight, p.get_base_layer().weight)
    # trained: same outputs; as plain LoRA (PEFT's conversion) on the unmodified base, in PEFT and here
    _randomize_peft(pm)
    la.load_adapter_state_dict(ours, _our_state_from_peft(pm))
    expected = _logits(pm, x)
    _close(_logits(ours, x), expected)
    _assert_same_grads(ours, pm, x)
    la.save_peft(ours, tmp_path / "ours", convert_to_lora=True)
    _close(_logits(PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours"), x), expected)
    _close(_logits(la.load_peft(copy.deepcopy(base), tmp_path / "ours"), x), expected)
    # a second call starts again from the original weight; eject gives it back
    la.initialize_from_data(ours, batches)
    _close(_logits(ours, x), _logits(base, x))
    plain = la.eject(ours)
    for p, q in zip(plain.parameters(), base.parameters()):
        _close(p, q)


def peft_tensors_plain(model):
    from lightning_adapters.interop.peft import _as_plain_lora, peft_config_dict

    return _as_plain_lora(model, peft_tensors(model), peft_config_dict(model))


def test_corda_bad_uses():
    with pytest.raises(la.AdapterConfigError, match="no LoRA layer with a data-driven init"):
        la.initialize_from_data(la.inject(tiny_llama(), la.LoRAConfig(r=2, target_modules=["q_proj"])), [])
    model = la.inject(tiny_llama(), la.LoRAConfig(r=2, target_modules=["q_proj"], init_weights="corda"))
    with pytest.raises(la.AdapterStateError, match="never ran on the batches"):
        la.initialize_from_data(model, [])
    # until the data init ran, the layer refuses to run, merge or convert (its residual base is not there)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for action in (lambda: model(token_batch(128)), lambda: la.merge(model), lambda: peft_tensors_plain(model)):
        with pytest.raises(la.AdapterStateError, match="'model.layers.0.self_attn.q_proj'.*initialize_from_data"):
            action()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    with la.disabled(model):
        model(token_batch(128))  # the base itself runs
    la.initialize_from_data(model, _corda_batches(1))
    model(token_batch(128))
    with pytest.raises(la.AdapterConfigError, match="corda_method must be one of"):
        la.LoRAConfig(init_weights="corda", corda_method="pca")
