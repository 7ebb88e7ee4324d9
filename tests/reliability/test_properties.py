"""Property-based tests: any config × any layer shape either raises the library's clear error or works.

"Works" means: identity at init (default init), merged output equals the adapter path, unmerge restores the
weights, and one training step keeps everything finite. A torch shape error or a NaN from inside the library
is a failure. Each method contributes a strategy of config kwargs in ``METHOD_STRATEGIES``.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import lightning_adapters as la

SMALL = st.integers(min_value=1, max_value=19)
PRIMEISH = st.sampled_from([1, 2, 3, 4, 5, 6, 7, 8, 11, 12, 13, 16, 17, 24, 31, 32])


DTYPES = st.sampled_from([torch.float32, torch.float32, torch.bfloat16, torch.float16])
PADDING_MODES = st.sampled_from(["zeros", "zeros", "reflect", "replicate", "circular"])


KINDS = ["linear", "conv1d_t", "embedding", "conv1d", "conv2d", "conv3d"]


@st.composite
def layers(draw, kinds: list[str] = KINDS):
    """A base layer of one of ``kinds`` (mostly; any kind one time in four, to test refusals) with odd, prime
    or round sizes, any conv attributes, a dtype, and a matching input."""
    kind = draw(st.sampled_from(KINDS if draw(st.integers(0, 3)) == 0 else kinds))
    dtype = draw(DTYPES)
    seed = draw(st.integers(0, 2**16))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # layer inits draw from the global generator: same example, same weights
        return _layer(draw, kind, dtype, torch.Generator().manual_seed(seed))


def _layer(draw, kind: str, dtype: torch.dtype, g: torch.Generator):
    if kind == "linear":
        i, o = draw(PRIMEISH), draw(PRIMEISH)
        layer, x = nn.Linear(i, o, bias=draw(st.booleans())), torch.randn(2, 3, i, generator=g)
    elif kind == "conv1d_t":
        from transformers.pytorch_utils import Conv1D

        i, o = draw(PRIMEISH), draw(PRIMEISH)
        layer = Conv1D(o, i)
        nn.init.normal_(layer.weight, std=0.2)
        x = torch.randn(2, 3, i, generator=g)
    elif kind == "embedding":
        v, d = draw(st.integers(2, 40)), draw(PRIMEISH)
        attrs = {
            "padding_idx": draw(st.sampled_from([None, 0])),
            "max_norm": draw(st.sampled_from([None, None, None, 1.0])),  # renormalises in place: refused
            "scale_grad_by_freq": draw(st.booleans()),
            "sparse": draw(st.booleans()),
        }
        return kind, nn.Embedding(v, d, **attrs).to(dtype), torch.randint(0, v, (2, 5), generator=g)
    else:
        groups = draw(st.sampled_from([1, 1, 1, 2, 3]))
        i = groups * draw(st.integers(1, 6))
        o = groups * draw(st.integers(1, 6))
        k = draw(st.sampled_from([1, 2, 3]))
        padding = draw(st.sampled_from([0, 1, 2, "same", "valid"]))
        stride = 1 if padding == "same" else draw(st.sampled_from([1, 2]))  # torch refuses "same" with stride > 1
        dilation = draw(st.sampled_from([1, 1, 2]))
        mode = draw(PADDING_MODES)
        conv, shape = {
            "conv1d": (nn.Conv1d, (2, i, 9)),
            "conv2d": (nn.Conv2d, (2, i, 9, 9)),
            "conv3d": (nn.Conv3d, (2, i, 5, 5, 5)),
        }[kind]
        bias = draw(st.booleans())
        layer = conv(i, o, k, stride, padding, dilation, groups, bias=bias, padding_mode=mode)
        x = torch.randn(*shape, generator=g)
    return kind, layer.to(dtype), x.to(dtype)


# How the model around the layer is odd. "alias": the layer is registered twice and both names are targeted,
# which must work; the others must be refused: "tied" (a second layer shares the weight Parameter),
# "alias-one-name" (registered twice, one name targeted), "custom-forward" (a subclass with its own forward),
# "computed-weight" (a weight_norm parametrization).
SHARING = st.sampled_from(
    ["none", "none", "none", "none", "tied", "alias", "alias-one-name", "custom-forward", "computed-weight"]
)
REFUSED = ("tied", "alias-one-name", "custom-forward", "computed-weight")


def _doubled_forward(cls: type) -> type:
    """A subclass of ``cls`` whose forward doubles the output (a stand-in for a scaled embedding and the like)."""
    return type(f"Doubled{cls.__name__}", (cls,), {"forward": lambda self, x: cls.forward(self, x) * 2})


class Shared(nn.Module):
    """``layer`` and ``twin`` summed: ``twin`` is absent, shares ``layer``'s weight Parameter (``tied``), or is
    ``layer`` itself under a second name (``alias``); ``layer`` may have its own forward or a computed weight."""

    def __init__(self, layer: nn.Module, sharing: str) -> None:
        super().__init__()
        if sharing == "custom-forward":
            layer.__class__ = _doubled_forward(type(layer))
        elif sharing == "computed-weight":
            layer = torch.nn.utils.parametrizations.weight_norm(layer)
        self.layer = layer
        self.head = nn.Identity()
        if sharing == "tied":
            self.twin = copy.deepcopy(layer)
            self.twin.weight = layer.weight
        elif sharing.startswith("alias"):
            self.twin = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer(x)
        return out if "twin" not in self._modules else out + self.twin(x)


def _rows_l1(kind: str, weight: torch.Tensor) -> torch.Tensor:
    """Largest L1 norm over the inputs of one output (over the features of one row, for Embedding)."""
    w = weight.detach().float()
    w = w.t() if kind == "conv1d_t" else w
    return w.reshape(w.shape[0], -1).abs().sum(1).max()


def _lora_kwargs():
    return st.fixed_dictionaries(
        {
            "r": st.integers(-1, 9),
            "alpha": st.sampled_from([0.5, 1, 8, 16, 0, -1]),
            "dropout": st.sampled_from([0.0, 0.1, 0.5]),
            "use_rslora": st.booleans(),
            "use_dora": st.booleans(),
            "init_weights": st.sampled_from([True, "gaussian"]),
        }
    )


def _loha_kwargs():
    return st.fixed_dictionaries(
        {
            "r": st.integers(-1, 9),
            "alpha": st.sampled_from([1, 8, 0]),
            "rank_dropout": st.sampled_from([0.0, 0.2]),
            "module_dropout": st.sampled_from([0.0, 0.3]),
            "use_effective_conv2d": st.booleans(),
        }
    )


def _lokr_kwargs():
    return st.fixed_dictionaries(
        {
            "r": st.integers(-1, 9),
            "alpha": st.sampled_from([1, 8, -2]),
            "rank_dropout": st.sampled_from([0.0, 0.2]),
            "module_dropout": st.sampled_from([0.0, 0.3]),
            "use_effective_conv2d": st.booleans(),
            "decompose_both": st.booleans(),
            "decompose_factor": st.sampled_from([-1, 0, 1, 2, 3, 4, 8]),
            "rank_dropout_scale": st.booleans(),
            "init_weights": st.sampled_from([True, "lycoris"]),
        }
    )


def _oft_kwargs():
    return st.fixed_dictionaries(
        {
            "r": st.sampled_from([0, 0, 1, 2, 3, 4, -1]),
            "oft_block_size": st.sampled_from([0, 1, 2, 3, 4, 8, 16, 32]),
            "use_cayley_neumann": st.booleans(),
            "num_cayley_neumann_terms": st.integers(1, 6),
            "block_share": st.booleans(),
            "coft": st.booleans(),
            "module_dropout": st.sampled_from([0.0, 0.3]),
        }
    )


def _boft_kwargs():
    return st.fixed_dictionaries(
        {
            "boft_block_size": st.sampled_from([0, 1, 2, 3, 4, 8]),
            "boft_block_num": st.sampled_from([0, 0, 1, 2, 4, 8]),
            "boft_n_butterfly_factor": st.integers(0, 3),
            "boft_dropout": st.sampled_from([0.0, 0.2]),
        }
    )


def _adalora_kwargs():
    return st.fixed_dictionaries(
        {
            "init_r": st.integers(0, 12),
            "target_r": st.integers(0, 12),
            "total_step": st.sampled_from([None, 10, 50]),
            "tinit": st.integers(0, 4),
            "tfinal": st.integers(0, 4),
            "deltaT": st.integers(0, 3),
            "alpha": st.sampled_from([1, 8, 0]),
            "dropout": st.sampled_from([0.0, 0.1]),
            "beta1": st.sampled_from([0.85, 0.0, 1.0]),
        }
    )


def _valid_lora():
    return st.fixed_dictionaries(
        {
            "r": st.integers(1, 8),
            "alpha": st.sampled_from([0.5, 1, 8, 16]),
            "dropout": st.sampled_from([0.0, 0.1]),
            "use_rslora": st.booleans(),
            "use_dora": st.booleans(),
            "init_weights": st.sampled_from([True, "gaussian"]),
        }
    )


def _valid_loha():
    return st.fixed_dictionaries(
        {
            "r": st.integers(1, 6),
            "alpha": st.sampled_from([1, 8]),
            "rank_dropout": st.sampled_from([0.0, 0.2]),
            "module_dropout": st.sampled_from([0.0, 0.3]),
            "use_effective_conv2d": st.booleans(),
        }
    )


def _valid_lokr():
    return st.fixed_dictionaries(
        {
            "r": st.integers(1, 6),
            "alpha": st.sampled_from([1, 8]),
            "rank_dropout": st.sampled_from([0.0, 0.2]),
            "use_effective_conv2d": st.booleans(),
            "decompose_both": st.booleans(),
            "decompose_factor": st.sampled_from([-1, 1, 2, 3, 4]),
            "rank_dropout_scale": st.booleans(),
            "init_weights": st.sampled_from([True, "lycoris"]),
        }
    )


def _valid_oft():
    # auto_adjust takes the nearest divisor of the layer's size, so odd sizes are adapted rather than refused.
    sizes = st.one_of(
        st.fixed_dictionaries({"r": st.just(0), "oft_block_size": st.sampled_from([2, 3, 4, 8])}),
        st.fixed_dictionaries({"r": st.sampled_from([1, 2, 3]), "oft_block_size": st.just(0)}),
    )
    rest = st.fixed_dictionaries(
        {
            "use_cayley_neumann": st.booleans(),
            "block_share": st.booleans(),
            "coft": st.booleans(),
            "auto_adjust": st.just(True),
        }
    )
    return st.tuples(sizes, rest).map(lambda t: {**t[0], **t[1]})


def _valid_boft():
    sizes = st.one_of(
        st.fixed_dictionaries({"boft_block_size": st.sampled_from([2, 4]), "boft_block_num": st.just(0)}),
        st.fixed_dictionaries({"boft_block_size": st.just(0), "boft_block_num": st.sampled_from([1, 2, 4])}),
    )
    rest = st.fixed_dictionaries(
        {"boft_n_butterfly_factor": st.integers(1, 2), "boft_dropout": st.sampled_from([0.0, 0.2])}
    )
    return st.tuples(sizes, rest).map(lambda t: {**t[0], **t[1]})


def _valid_adalora():
    return st.integers(1, 8).flatmap(
        lambda init_r: st.fixed_dictionaries(
            {
                "init_r": st.just(init_r),
                "target_r": st.integers(1, init_r),
                "total_step": st.sampled_from([None, 20, 50]),
                "tinit": st.integers(0, 3),
                "tfinal": st.integers(0, 3),
                "alpha": st.sampled_from([1, 8]),
                "dropout": st.sampled_from([0.0, 0.1]),
            }
        )
    )


VALID_STRATEGIES = {
    "lora": _valid_lora,
    "loha": _valid_loha,
    "lokr": _valid_lokr,
    "oft": _valid_oft,
    "boft": _valid_boft,
    "adalora": _valid_adalora,
}


def config_kwargs(method: str):
    """Valid values three times in four (so most cases reach merge), any values of the fields otherwise."""
    full, valid = METHOD_STRATEGIES[method][1](), VALID_STRATEGIES[method]()
    return st.integers(0, 3).flatmap(lambda i: full if i == 0 else valid)


def supported_kinds(method: str) -> list[str]:
    """The layer kinds of ``KINDS`` the method's registry entry adapts."""
    from transformers.pytorch_utils import Conv1D

    classes = {"linear": nn.Linear, "conv1d_t": Conv1D, "embedding": nn.Embedding, "conv1d": nn.Conv1d}
    classes.update(conv2d=nn.Conv2d, conv3d=nn.Conv3d)
    types = la.get_method(method).supported_types
    return [k for k, c in classes.items() if issubclass(c, types)]


METHOD_STRATEGIES = {
    "lora": ("LoRAConfig", _lora_kwargs),
    "loha": ("LoHaConfig", _loha_kwargs),
    "lokr": ("LoKrConfig", _lokr_kwargs),
    "oft": ("OFTConfig", _oft_kwargs),
    "boft": ("BOFTConfig", _boft_kwargs),
    "adalora": ("AdaLoRAConfig", _adalora_kwargs),
}


def _check_case(method: str, kwargs: dict, layer_case, sharing: str = "none") -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the adapter noise and dropout masks: a failing example replays exactly
        _check_case_seeded(method, kwargs, layer_case, sharing)


def _check_case_seeded(method: str, kwargs: dict, layer_case, sharing: str) -> None:
    kind, layer, x = layer_case
    cls = getattr(la, METHOD_STRATEGIES[method][0])
    targets = ["layer", "twin"] if sharing in ("tied", "alias") else ["layer"]
    try:
        cfg = cls(target_modules=targets, **kwargs)
    except la.AdapterError as err:
        assert str(err)
        return
    model = Shared(layer, sharing).eval()
    base_out = model(x)  # first: an Embedding's max_norm renormalises its weight in this call
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        la.inject(model, cfg)
    except la.AdapterError as err:
        assert str(err)
        assert set(model.state_dict()) == set(before)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
        return
    assert sharing not in REFUSED, f"inject accepted a {sharing} model"
    assert getattr(layer, "max_norm", None) is None, "inject accepted an Embedding with max_norm"
    half = x.dtype in (torch.float16, torch.bfloat16) or layer.weight.dtype in (torch.float16, torch.bfloat16)
    w0 = layer.weight.detach().clone()
    out = model(x)
    # Half precision: a rotation (OFT/BOFT) runs in fp32 and its output is rounded once, the base's own product
    # differently; both are within the rounding bound used for merging below.
    init_tol = _half_tol(kind, x, layer, w0, w0, sharing) if half else 1e-6
    assert torch.allclose(out.float(), base_out.float(), atol=init_tol), ("not identity at init", init_tol)
    with torch.no_grad():
        for t in la.adapter_state_dict(model).values():
            if t.is_floating_point():
                t.add_(torch.randn_like(t) * 0.05)
    out = model(x)
    assert torch.isfinite(out).all()
    adapter_layer = model.layer.adapter.default
    if adapter_layer.mergeable:
        la.merge(model)
        merged = model(x)
        w_scale = max(1.0, merged_max(layer.weight.detach()), merged_max(w0))
        tol = _half_tol(kind, x, layer, w0, layer.weight, sharing) if half else 1e-4 * max(1.0, out.abs().max().item())
        assert torch.allclose(merged.float(), out.float(), atol=tol), ((merged - out).abs().max(), tol)
        la.unmerge(model)
        for k, v in before.items():
            # Unmerging half weights subtracts ΔW in fp32 and rounds again: within an ulp of |W + ΔW|.
            atol = 2 * torch.finfo(v.dtype).eps * w_scale if half and v.is_floating_point() else 1e-5
            assert torch.allclose(model.state_dict()[k].float(), v.float(), atol=atol), k
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss = model(x).float().pow(2).mean()
    # module_dropout may skip the whole adapter for this forward, leaving nothing to differentiate.
    if loss.requires_grad:
        loss.backward()
    opt.step()
    assert torch.isfinite(model(x)).all()
    assert all(torch.isfinite(t).all() for t in la.adapter_state_dict(model).values())


def _half_tol(kind: str, x: torch.Tensor, layer: nn.Module, w0: torch.Tensor, w1: torch.Tensor, sharing: str) -> float:
    """Tolerance between two half-precision computations of one layer output.

    Merging rounds ``W + ΔW`` to the base dtype (``|error| <= u·|W'|`` per entry, ``u = eps/2``) and each path
    rounds its output (``|y| <= Σ_i |x_i|·|W'_i| + |b|``) once more, so an output is off by a few
    ``u · (max|x| · largest L1 row of W' + max|b|)``. Four ``eps`` (eight ``u``) per layer call; a twin doubles it.
    """
    eps = torch.finfo(w0.dtype).eps
    x_max = x.abs().max().float().item() if x.is_floating_point() else 1.0
    bias = getattr(layer, "bias", None)
    b_max = bias.detach().abs().max().float().item() if isinstance(bias, torch.Tensor) and bias.numel() else 0.0
    bound = x_max * max(_rows_l1(kind, w0).item(), _rows_l1(kind, w1).item()) + b_max
    return 4 * eps * bound * (2 if sharing == "alias" else 1) + 1e-6


def merged_max(t: torch.Tensor) -> float:
    """Largest magnitude of a tensor (the scale an ulp-level error is relative to)."""
    return t.abs().max().item() if t.numel() and t.is_floating_point() else 0.0


@pytest.mark.parametrize("method", sorted(METHOD_STRATEGIES))
def test_config_space_times_layer_shapes(method):
    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(kwargs=config_kwargs(method), layer_case=layers(supported_kinds(method)), sharing=SHARING)
    def run(kwargs, layer_case, sharing):
        _check_case(method, kwargs, layer_case, sharing)

    run()


@functools.cache
def _decoder(family: str, heads: int, kv: int, head_dim: int, hidden: int, layers: int) -> nn.Module:
    """Built once per shape (transformers model construction dominates the cost); tests use deep copies."""
    import transformers

    torch.manual_seed(0)
    if family == "gpt2":
        cfg = transformers.GPT2Config(n_embd=8 * heads, n_layer=layers, n_head=heads, vocab_size=50, n_positions=32)
        return transformers.GPT2LMHeadModel(cfg).eval()
    names = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}[family]
    cfg = getattr(transformers, f"{names}Config")(
        hidden_size=hidden,
        intermediate_size=16,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=head_dim,
        vocab_size=50,
        max_position_embeddings=32,
    )
    return getattr(transformers, f"{names}ForCausalLM")(cfg).eval()


@st.composite
def decoder_cases(draw):
    """A tiny decoder of a supported family with GQA / wide heads, and a Llama-Adapter config (maybe invalid)."""
    family = draw(st.sampled_from(["llama", "mistral", "qwen2", "gpt2"]))
    heads = draw(st.sampled_from([1, 2, 4]))
    kv = draw(st.sampled_from([h for h in (1, 2, 4) if heads % h == 0]))
    shape = (
        family,
        heads,
        kv,
        draw(st.sampled_from([4, 8, 6])),
        draw(st.sampled_from([8, 16, 12])),
        draw(st.integers(1, 3)),
    )
    kwargs = {"adapter_len": draw(st.integers(-1, 6)), "adapter_layers": draw(st.integers(-1, 4))}
    return shape, kwargs


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(case=decoder_cases())
def test_llama_adapter_config_space(case):
    shape, kwargs = case
    model = copy.deepcopy(_decoder(*shape))
    x = torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(0))
    try:
        cfg = la.LlamaAdapterConfig(**kwargs)
    except la.AdapterError as err:
        assert str(err)
        return
    before = {k: v.clone() for k, v in model.state_dict().items()}
    base = model(x).logits
    try:
        la.inject(model, cfg)
    except la.AdapterError as err:
        assert str(err)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
        assert set(model.state_dict()) == set(before)
        return
    assert torch.equal(model(x).logits, base)
    with torch.no_grad():
        for t in la.adapter_state_dict(model).values():
            t.add_(torch.randn_like(t) * 0.1)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(x, labels=x).loss.backward()
    opt.step()
    assert torch.isfinite(model(x).logits).all()
    la.eject(model)
    assert set(model.state_dict()) == set(before)
