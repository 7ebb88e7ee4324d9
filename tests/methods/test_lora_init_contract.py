"""``methods/lora_init.py`` pinned function by function against closed-form maths and PEFT's own recipes.

PiSSA's factors are checked through what they must be (``s·B·A`` the rank-``r`` truncation of ``W``, each side
carrying ``sqrt(S/s)``), OLoRA's through ``W = Q R``, the orthogonal init through PEFT's draw order replayed from
the seed, LoftQ through its alternation written out here, and the conversion to a plain LoRA through
``W + s'·B'·A' = W_res + s·B·A`` on small tensors and an exact rewrite of the config.
"""

from __future__ import annotations

import math
import re
import sys
from types import SimpleNamespace

import pytest
import torch

from lightning_adapters.errors import AdapterConfigError
from lightning_adapters.methods import lora_init as li


def _w(out_f: int = 6, in_f: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed))


# --- names ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        True,
        False,
        "gaussian",
        "pissa",
        "olora",
        "orthogonal",
        "corda",
        "eva",
        "loftq",
        "pissa_niter_0",
        "pissa_niter_16",
    ],
)
def test_check_init_weights_accepts(value):
    assert li.check_init_weights(value) is None


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ("lora_ga", r"init_weights='lora_ga' \(PEFT's init_lora_weights\) is refused: LoRA-GA"),
        ("mica", r"init_weights='mica' \(PEFT's init_lora_weights\) is refused: MiCA"),
        ("pissa_niter_", "init_weights must be True, False, one of"),
        ("pissa_niter_2x", "init_weights must be True, False, one of"),
        ("xpissa_niter_2", "init_weights must be True, False, one of"),
        ("Gaussian", "init_weights must be True, False, one of"),
        (1, "got 1$"),
        (0, "got 0$"),
        (None, "got None$"),
        (["pissa"], "got \\['pissa'\\]$"),
    ],
)
def test_check_init_weights_refuses(value, needle):
    with pytest.raises(AdapterConfigError, match=needle):
        li.check_init_weights(value)


def test_base_mode_and_is_residual():
    modes = {
        True: "True",
        False: "False",
        "pissa": "pissa",
        "pissa_niter_3": "pissa",
        "olora": "olora",
        "corda": "corda",
        "eva": "eva",
        "gaussian": "gaussian",
        "loftq": "loftq",
        None: "None",
    }
    assert {v: li.base_mode(v) for v in modes} == modes
    residual = {v: li.is_residual(v) for v in modes}
    assert residual == {v: v in ("pissa", "pissa_niter_3", "olora", "corda") for v in modes}
    assert li.RESIDUAL_INITS == ("pissa", "olora", "corda") and li.DATA_INITS == ("corda", "eva")


@pytest.mark.parametrize(
    ("value", "want"),
    [
        (True, True),
        (False, False),
        ("gaussian", "gaussian"),
        ("GAUSSIAN", "gaussian"),
        ("pissa", "pissa"),
        ("olora", "olora"),
        ("OLoRA", "olora"),
        ("loftq", "loftq"),
        ("pissa_niter_4", "pissa_niter_4"),
        ("eva", True),
        ("orthogonal", True),
        ("lora_ga", True),
        (None, True),
        ("", True),
    ],
)
def test_init_from_peft(value, want):
    got = li.init_from_peft(value)
    assert got == want and type(got) is type(want)


@pytest.mark.parametrize("value", ["PiSSA", "pissa_niter_x", "pissa_niter_", "Eva", "foo"])
def test_init_from_peft_refuses_a_string_peft_does_not_know(value):
    """PEFT raises on these when it builds the layer ("Unknown initialization", or int('x') for pissa_niter_x);
    loading them as the default init would silently drop a residual init such as PiSSA."""
    with pytest.raises(AdapterConfigError, match=re.escape(f"init_lora_weights={value!r} is not an initialisation")):
        li.init_from_peft(value)


def test_init_from_peft_keeps_a_non_bool_one_so_the_config_refuses_it():
    got = li.init_from_peft(1)  # JSON 1 is not PEFT's true: it must not silently become the default init
    assert got == 1 and type(got) is int
    with pytest.raises(AdapterConfigError, match="got 1$"):
        li.check_init_weights(got)


def test_init_from_peft_refuses_corda():
    with pytest.raises(AdapterConfigError, match=r"init_lora_weights='corda'"):
        li.init_from_peft("corda")


# --- factors ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("shape", "r", "scale"), [((6, 5), 2, 2.0), ((4, 7), 3, 0.5), ((5, 5), 5, 1.0)])
def test_pissa_factors_are_the_scaled_truncated_svd(shape, r, scale):
    w = _w(*shape).double()
    A, B = li.pissa_factors(w, r, scale)
    assert A.shape == (r, shape[1]) and B.shape == (shape[0], r)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    root = (s[:r] / scale).sqrt()
    torch.testing.assert_close(A, root[:, None] * vh[:r], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(B, u[:, :r] * root, rtol=1e-12, atol=1e-12)
    trunc = u[:, :r] @ torch.diag(s[:r]) @ vh[:r]
    torch.testing.assert_close(scale * B @ A, trunc, rtol=1e-10, atol=1e-10)
    # each side carries sqrt(S/s): row norms of A equal column norms of B
    torch.testing.assert_close(A.norm(dim=1), root, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(B.norm(dim=0), root, rtol=1e-12, atol=1e-12)


def test_pissa_niter_is_seeded_and_leaves_the_global_rng_alone():
    w = _w(8, 6).double()
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    A, B = li.pissa_factors(w, 2, 4.0, niter=2)
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.manual_seed(li.PISSA_NITER_SEED)
    u, s, v = torch.svd_lowrank(w, 2, niter=2)
    root = (s / 4.0).sqrt()
    torch.testing.assert_close(A, root[:, None] * v.t(), rtol=0, atol=0)
    torch.testing.assert_close(B, u * root, rtol=0, atol=0)
    assert li.PISSA_NITER_SEED == 0
    A1, B1 = li.pissa_factors(w, 2, 4.0, niter=1)  # a different iteration count is a different result
    assert A1.shape == A.shape and not torch.equal(A1, A)


def test_weight_factors_dispatch_on_the_mode():
    w = _w(6, 5).to(torch.bfloat16).requires_grad_()
    wf = w.detach().float()
    for mode, want in [
        ("pissa", li.pissa_factors(wf, 2, 3.0)),
        ("pissa_niter_3", li.pissa_factors(wf, 2, 3.0, 3)),
        ("pissa_niter_12", li.pissa_factors(wf, 2, 3.0, 12)),
        ("olora", li.olora_factors(wf, 2)),
    ]:
        got = li.weight_factors(mode, w, 2, 3.0)
        assert len(got) == 2
        for g, t in zip(got, want):
            assert g.dtype == torch.float32 and not g.requires_grad
            assert torch.equal(g, t), mode


@pytest.mark.parametrize(("shape", "r"), [((6, 5), 2), ((4, 7), 3)])
def test_olora_factors_are_the_leading_qr_parts(shape, r):
    w = _w(*shape).double()
    A, B = li.olora_factors(w, r)
    q, rr = torch.linalg.qr(w)
    assert A.shape == (r, shape[1]) and B.shape == (shape[0], r)
    assert A.is_contiguous() and B.is_contiguous()
    assert torch.equal(A, rr[:r]) and torch.equal(B, q[:, :r])
    torch.testing.assert_close(B.t() @ B, torch.eye(r, dtype=torch.float64), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("r", "in_f", "out_f"), [(4, 5, 3), (2, 3, 6)])
def test_orthogonal_factors_replay_peft_s_draws(r, in_f, out_f):
    torch.manual_seed(3)
    A, B = li.orthogonal_factors(r, in_f, out_f)
    after = torch.random.get_rng_state()
    torch.manual_seed(3)  # PEFT's LoraLayer.orthogonal_init, step by step
    q, _ = torch.linalg.qr(torch.randn(r, r))
    want_A = torch.randn(in_f, r // 2).mm(q[0::2, :]).T / 10.0
    want_B = torch.randn(r // 2, out_f).T.mm(q[1::2, :]) / 10.0
    assert torch.equal(torch.random.get_rng_state(), after)
    assert A.shape == (r, in_f) and B.shape == (out_f, r) and A.is_contiguous() and B.is_contiguous()
    assert torch.equal(A, want_A) and torch.equal(B, want_B)
    torch.testing.assert_close(B @ A, torch.zeros(out_f, in_f), rtol=0, atol=1e-6)
    assert A.abs().sum() > 0 and B.abs().sum() > 0


def test_lora_delta_scales_on_the_b_side_in_float32():
    A = _w(2, 5, 1).double()
    B = _w(6, 2, 2).to(torch.bfloat16)
    d = li.lora_delta(A, B, 0.3)
    assert d.dtype == torch.float32
    assert torch.equal(d, (0.3 * B.float()) @ A.float())


def test_as_plain_lora_stacks_and_negates():
    A, B = _w(2, 5, 1), _w(6, 2, 2)
    A0, B0 = _w(2, 5, 3).double(), _w(6, 2, 4).double()
    A2, B2 = li.as_plain_lora(A, B, A0, B0)
    assert A2.dtype == B2.dtype == torch.float32 and A2.shape == (4, 5) and B2.shape == (6, 4)
    assert torch.equal(A2[:2], A) and torch.equal(A2[2:], A0.float())
    assert torch.equal(B2[:, :2], B) and torch.equal(B2[:, 2:], -B0.float())
    torch.testing.assert_close(B2 @ A2, B @ A - B0.float() @ A0.float(), rtol=1e-5, atol=1e-6)


# --- LoftQ -----------------------------------------------------------------------------------------------------------


def _nf4(w: torch.Tensor) -> torch.Tensor:
    import bitsandbytes.functional as bnbf

    packed, state = bnbf.quantize_4bit(w.float(), blocksize=64, compress_statistics=False, quant_type="nf4")
    return bnbf.dequantize_4bit(packed, state).float()


def test_quantize_roundtrip_nf4_is_bitsandbytes_with_blocks_of_64_and_idempotent():
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as bnbf

    w = _w(4, 64, 5) * torch.linspace(0.1, 3.0, 64)  # blocks of very different ranges
    q = li.quantize_roundtrip(w.double(), 4)
    assert q.dtype == torch.float32 and q.shape == w.shape
    assert torch.equal(q, _nf4(w))
    for other in (32, 128):  # the block size is visible in the values
        p, s = bnbf.quantize_4bit(w, blocksize=other, compress_statistics=False, quant_type="nf4")
        assert not torch.equal(q, bnbf.dequantize_4bit(p, s).float())
    p, s = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="fp4")
    assert not torch.equal(q, bnbf.dequantize_4bit(p, s).float())
    assert torch.equal(li.quantize_roundtrip(q, 4), q)
    assert li.LOFTQ_NF4_BLOCKSIZE == 64 and li.LOFTQ_BITS == (4, 8)


def test_quantize_roundtrip_asks_bitsandbytes_for_blocks_of_64_whatever_its_default(monkeypatch):
    """The block size is passed, not left to bitsandbytes, whose default is 128 on ROCm builds of some releases
    (PEFT's LoftQ quantises in blocks of 64 everywhere)."""
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as bnbf

    calls = []
    real = bnbf.quantize_4bit

    def recording(a, *args, **kwargs):
        calls.append(kwargs)
        return real(a, *args, **{**kwargs, "blocksize": kwargs.get("blocksize") or 128})  # a ROCm-like default

    monkeypatch.setattr(bnbf, "quantize_4bit", recording)
    w = _w(4, 64, 5)
    assert torch.equal(li.quantize_roundtrip(w, 4), _nf4_real(real, w))
    assert [(c.get("blocksize"), c.get("quant_type")) for c in calls] == [(64, "nf4")]


def _nf4_real(quantize, w: torch.Tensor) -> torch.Tensor:
    import bitsandbytes.functional as bnbf

    packed, state = quantize(w.float(), blocksize=64, compress_statistics=False, quant_type="nf4")
    return bnbf.dequantize_4bit(packed, state).float()


def test_quantize_roundtrip_int8_is_per_row_absmax_of_the_float16_weight():
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as bnbf

    w = _w(3, 8, 6).double() * torch.tensor([[0.5], [2.0], [9.0]], dtype=torch.float64)
    q = li.quantize_roundtrip(w, 8)
    codes, scales, _ = bnbf.int8_vectorwise_quant(w.to(torch.float16))
    assert q.dtype == torch.float32 and q.shape == w.shape
    assert torch.equal(q, bnbf.int8_vectorwise_dequant(codes, scales).float())
    codes32, scales32, _ = bnbf.int8_vectorwise_quant(w.float())  # without the float16 rounding: other values
    assert not torch.equal(q, bnbf.int8_vectorwise_dequant(codes32, scales32).float())
    w16 = w.to(torch.float16).float()
    absmax = w16.abs().amax(dim=1, keepdim=True)
    torch.testing.assert_close(q, torch.round(w16 * 127 / absmax) * absmax / 127, rtol=1e-6, atol=1e-7)
    assert torch.equal(li.quantize_roundtrip(q, 8), q)


def test_quantize_roundtrip_without_bitsandbytes_names_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(AdapterConfigError, match=r"init_weights='loftq' quantises with bitsandbytes"):
        li.quantize_roundtrip(_w(), 4)


@pytest.mark.parametrize("iters", [1, 2, 3])
def test_loftq_factors_alternate_quantisation_and_svd(iters):
    pytest.importorskip("bitsandbytes")
    w = _w(8, 64, 7)
    r = 2
    target = w
    for _ in range(iters):  # the recipe written out
        q = _nf4(target)
        u, s, vh = torch.linalg.svd(w - q, full_matrices=False)
        B, A = u[:, :r] * s[:r].sqrt(), s[:r].sqrt()[:, None] * vh[:r]
        target = w - B @ A
    got = li.loftq_factors(w.double().requires_grad_(), r, 4, iters)  # float32 values, held as float64
    assert len(got) == 3
    gq, gA, gB = got
    assert gq.shape == w.shape and gA.shape == (r, 64) and gB.shape == (8, r)
    assert gA.is_contiguous() and gB.is_contiguous()
    assert torch.equal(gq, q)
    torch.testing.assert_close(gA, A, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gB, B, rtol=1e-5, atol=1e-6)
    # the adapter holds the best rank-r part of the quantisation error
    assert (w - gq - gB @ gA).norm() < (w - gq).norm()


@pytest.mark.parametrize("shape", [(8, 64), (24, 16)])
def test_loftq_factors_are_bitwise_the_thin_svd_recipe(shape):
    """One LoftQ step is exactly ``Q = nf4(W)``, ``U S Vh = svd(W − Q)`` (the thin SVD, as PEFT's
    ``_low_rank_decomposition``), ``B = U[:, :r] ⊙ √S[:r]``, ``A = √S[:r] ⊙ Vh[:r]``: bit for bit, on a wide and a
    tall weight (the full SVD's leading vectors differ in the last bits)."""
    pytest.importorskip("bitsandbytes")
    w = _w(*shape, 11)
    q = _nf4(w)
    u, s, vh = torch.linalg.svd(w - q, full_matrices=False)
    root = s[:3].sqrt()
    gq, gA, gB = li.loftq_factors(w, 3, 4, 1)
    assert torch.equal(gq, q)
    assert torch.equal(gA, root[:, None] * vh[:3]) and torch.equal(gB, u[:, :3] * root)


def test_loftq_more_iterations_change_the_base():
    pytest.importorskip("bitsandbytes")
    w = _w(8, 64, 7)
    q1 = li.loftq_factors(w, 2, 4, 1)[0]
    q2 = li.loftq_factors(w, 2, 4, 2)[0]
    assert torch.equal(q1, _nf4(w)) and not torch.equal(q1, q2)


# --- conversion to a plain LoRA ----------------------------------------------------------------------------------


def _layer(init_A=None, init_B=None, mode=None):
    ns = SimpleNamespace(init_A=init_A, init_B=init_B, checked=0)
    if mode is not None:
        ns.init_mode = mode

    def check_initialized():
        ns.checked += 1

    ns.check_initialized = check_initialized
    return ns


def test_convert_to_plain_lora_rewrites_tensors_and_config():
    P = "base_model.model."
    A, B = _w(2, 5, 1), _w(6, 2, 2)
    A0, B0 = _w(2, 5, 3).double().requires_grad_(), _w(6, 2, 4).double().requires_grad_()
    E, F = _w(3, 7, 5), _w(4, 3, 6)  # embedding layout: lora_embedding_A (r, V), lora_embedding_B (d, r)
    C, D = _w(2, 4, 7), _w(3, 2, 8)
    layers = {"q": _layer(A0, B0, "pissa"), "emb": _layer(), "k": _layer(mode="olora")}
    tensors = {
        f"{P}q.lora_A.weight": A,
        f"{P}q.lora_B.weight": B,
        f"{P}emb.lora_embedding_A": E,
        f"{P}emb.lora_embedding_B": F,
        f"{P}k.lora_A.weight": C,
        f"{P}k.lora_B.weight": D,
        f"{P}head.weight": _w(3, 3, 9),
    }
    original = dict(tensors)
    config = {
        "r": 2,
        "lora_alpha": 6.0,
        "init_lora_weights": "pissa",
        "rank_pattern": {"emb": 3},
        "alpha_pattern": {"k": 5.0},
        "corda_config": {"x": 1},
        "use_rslora": False,
        "other": "kept",
    }
    config_before = dict(config)
    out, cfg = li.convert_to_plain_lora(layers, tensors, config, P)
    assert tensors == original and config == config_before  # inputs untouched
    assert all(layer.checked == 1 for layer in layers.values())
    assert set(out) == set(tensors)
    assert torch.equal(out[f"{P}head.weight"], tensors[f"{P}head.weight"])
    assert torch.equal(out[f"{P}q.lora_A.weight"], torch.cat([A, A0.detach().float()]))
    assert torch.equal(out[f"{P}q.lora_B.weight"], torch.cat([B, -B0.detach().float()], dim=1))
    assert not out[f"{P}q.lora_A.weight"].requires_grad and out[f"{P}q.lora_A.weight"].dtype == torch.float32
    assert torch.equal(out[f"{P}emb.lora_embedding_A"], torch.cat([E, torch.zeros(3, 7)]))
    assert torch.equal(out[f"{P}emb.lora_embedding_B"], torch.cat([F, torch.zeros(4, 3)], dim=1))
    assert torch.equal(out[f"{P}k.lora_A.weight"], torch.cat([C, torch.zeros(2, 4)]))
    assert torch.equal(out[f"{P}k.lora_B.weight"], torch.cat([D, torch.zeros(3, 2)], dim=1))
    assert cfg == {
        "r": 4,
        "lora_alpha": 12.0,
        "init_lora_weights": True,
        "rank_pattern": {"emb": 6},
        "alpha_pattern": {"k": 10.0},
        "use_rslora": False,
        "other": "kept",
    }


def test_convert_to_plain_lora_with_rslora_grows_alpha_by_sqrt_two_and_handles_missing_patterns():
    P = "p."
    A, B = _w(2, 5, 1).to(torch.bfloat16), _w(6, 2, 2).to(torch.bfloat16)
    A0, B0 = _w(2, 5, 3), _w(6, 2, 4)
    layers = {"a.b": _layer(A0, B0)}
    tensors = {f"{P}a.b.lora_A.weight": A, f"{P}a.b.lora_B.weight": B}
    out, cfg = li.convert_to_plain_lora(
        layers, tensors, {"r": 2, "lora_alpha": 4.0, "use_rslora": True, "rank_pattern": None}, P
    )
    assert out[f"{P}a.b.lora_A.weight"].dtype == torch.bfloat16
    assert torch.equal(out[f"{P}a.b.lora_A.weight"], torch.cat([A, A0.to(torch.bfloat16)]))
    assert torch.equal(out[f"{P}a.b.lora_B.weight"], torch.cat([B, -B0.to(torch.bfloat16)], dim=1))
    assert cfg == {
        "r": 4,
        "lora_alpha": 4.0 * math.sqrt(2),
        "use_rslora": True,
        "init_lora_weights": True,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    _, cfg = li.convert_to_plain_lora({}, {}, {"r": 1, "lora_alpha": 1.0}, P)
    assert cfg == {"r": 2, "lora_alpha": 2.0, "init_lora_weights": True, "rank_pattern": {}, "alpha_pattern": {}}


def test_convert_to_plain_lora_refuses_loftq_and_layers_without_residual_bookkeeping():
    ok = _layer()
    with pytest.raises(AdapterConfigError, match=r"\['b', 'c', 'd'\] hold LoftQ adapters"):
        li.convert_to_plain_lora(
            {
                "a": ok,
                "b": _layer(mode="loftq"),
                "c": _layer(mode="loftq"),
                "d": _layer(mode="loftq"),
                "e": _layer(mode="loftq"),
            },
            {},
            {"r": 1, "lora_alpha": 1.0},
            "",
        )
    assert ok.checked == 0
    with pytest.raises(AdapterConfigError, match=r"\['m', 'n', 'o'\] hold LoRA on nn.MultiheadAttention"):
        li.convert_to_plain_lora(
            {
                "a": ok,
                "m": SimpleNamespace(),
                "n": SimpleNamespace(check_initialized=1),
                "o": SimpleNamespace(),
                "p": SimpleNamespace(),
            },
            {},
            {"r": 1, "lora_alpha": 1.0},
            "",
        )
    assert ok.checked == 0
