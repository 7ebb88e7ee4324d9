"""Contract of ``lightning_adapters.methods.lora_eva`` function by function, against independent truths: PEFT 0.21's
``IncrementalPCA`` and ``initialize_lora_eva_weights``, closed-form moments and rank counts written here, exact
hashes, and a fake two-rank ``torch.distributed``.
"""

from __future__ import annotations

import copy
import hashlib
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.config import EvaConfig
from peft.tuners.lora.eva import initialize_lora_eva_weights
from peft.utils.incremental_pca import IncrementalPCA as PeftIncrementalPCA
from torch import nn

import lightning_adapters as la
from lightning_adapters.errors import AdapterConfigError, AdapterStateError
from lightning_adapters.interop.peft import peft_config_dict
from lightning_adapters.methods import lora_eva


@pytest.fixture(autouse=True)
def one_thread():
    """Hundreds of SVDs of matrices a dozen wide: extra threads only add contention on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-5) -> None:
    assert a.shape == b.shape, (a.shape, b.shape)
    scale = b.abs().max().clamp_min(1e-12)
    assert ((a - b).abs().max() / scale).item() <= rtol, ((a - b).abs().max() / scale).item()


# ------------------------------------------------------------------------------------------------------------
# Config


def _options(**kw):
    base = dict(
        eva_rho=2.0,
        eva_tau=0.99,
        eva_use_label_mask=True,
        eva_whiten=False,
        eva_adjust_scaling_factors=True,
        eva_label_mask_value=-100,
    )
    base.update(kw)
    return SimpleNamespace(**base)


@pytest.mark.parametrize(
    "kw",
    [
        dict(eva_rho=1.0),
        dict(eva_rho=1),
        dict(eva_rho=1e6),
        dict(eva_tau=0.0),
        dict(eva_tau=1.0),
        dict(eva_tau=1),
        dict(eva_use_label_mask=False, eva_whiten=True, eva_adjust_scaling_factors=False),
        dict(eva_label_mask_value=0),
    ],
)
def test_check_options_accepts_the_boundaries(kw):
    assert lora_eva.check_options(_options(**kw)) is None


@pytest.mark.parametrize(
    "kw, needle",
    [
        (dict(eva_rho=0.999), r"^lora: eva_rho must be a finite number >= 1 .*got 0.999;"),
        (dict(eva_rho=float("inf")), "eva_rho"),
        (dict(eva_rho=float("nan")), "eva_rho"),
        (dict(eva_rho=True), "eva_rho"),
        (dict(eva_rho="2"), "eva_rho"),
        (dict(eva_tau=-0.01), "eva_tau must be a cosine similarity in"),
        (dict(eva_tau=1.01), "eva_tau"),
        (dict(eva_tau=float("nan")), "eva_tau"),
        (dict(eva_tau=True), "eva_tau"),
        (dict(eva_tau=None), "eva_tau"),
        (dict(eva_use_label_mask=1), r"^lora: eva_use_label_mask must be one of \[False, True\], got 1$"),
        (dict(eva_whiten="yes"), r"^lora: eva_whiten must be one of \[False, True\], got 'yes'$"),
        (dict(eva_adjust_scaling_factors=None), r"^lora: eva_adjust_scaling_factors must be one of"),
        (dict(eva_label_mask_value=True), "eva_label_mask_value"),
        (dict(eva_label_mask_value=-100.0), "eva_label_mask_value"),
    ],
)
def test_check_options_refuses_by_name(kw, needle):
    with pytest.raises(AdapterConfigError, match=needle):
        lora_eva.check_options(_options(**kw))


def test_lora_config_runs_check_options():
    with pytest.raises(AdapterConfigError, match="eva_rho"):
        la.LoRAConfig(init_weights="eva", eva_rho=0.5)
    assert la.LoRAConfig(init_weights="eva", eva_rho=1, eva_tau=0).eva_rho == 1


def test_peft_eva_config_is_peft_s_dict():
    opts = _options(eva_rho=3, eva_tau=1, eva_use_label_mask=False, eva_label_mask_value=-1, eva_whiten=True)
    got = lora_eva.peft_eva_config(opts)
    assert got == {
        "rho": 3.0,
        "tau": 1.0,
        "use_label_mask": False,
        "label_mask_value": -1,
        "whiten": True,
        "adjust_scaling_factors": True,
    }
    assert type(got["rho"]) is float and type(got["tau"]) is float
    peft = EvaConfig(**got)
    assert {k: getattr(peft, k) for k in got} == got


# ------------------------------------------------------------------------------------------------------------
# Incremental PCA and running moments


def _stream(sizes=(10, 7, 9), width=12, seed=0) -> list[torch.Tensor]:
    """Rows with a slowly decaying spectrum and an offset mean: the randomised SVD's iterations matter."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.linspace(2.0, 0.6, width)
    mix = torch.linalg.qr(torch.randn(width, width, generator=g))[0]
    offset = torch.randn(width, generator=g) * 3
    return [(torch.randn(n, width, generator=g) * scales) @ mix + offset for n in sizes]


def test_incremental_pca_starts_empty():
    pca = lora_eva.IncrementalPCA(3)
    assert pca.k == 3
    for attr in ("n_seen", "mean", "var", "components", "singular_values", "explained_variance_ratio"):
        assert getattr(pca, attr) is None, attr


def test_incremental_pca_equals_peft_s_seeded_lowrank_pca():
    """Every attribute after each batch (batches of different sizes), the global RNG untouched."""
    ours, theirs = (
        lora_eva.IncrementalPCA(3),
        PeftIncrementalPCA(n_components=3, copy=True, lowrank=True, lowrank_seed=42),
    )
    torch.manual_seed(123)
    state = torch.get_rng_state()
    for x in _stream():
        ours.update(x)
        assert torch.equal(torch.get_rng_state(), state)
        theirs.partial_fit(x.clone())
        _close(ours.components, theirs.components_)
        _close(ours.singular_values, theirs.singular_values_)
        _close(ours.explained_variance_ratio, theirs.explained_variance_ratio_)
        _close(ours.mean, theirs.mean_, 1e-12)
        _close(ours.var, theirs.var_, 1e-12)
        assert torch.equal(ours.n_seen, theirs.n_samples_seen_)
        assert ours.components.shape == (3, 12) and ours.singular_values.shape == (3,)
        assert ours.explained_variance_ratio.shape == (3,)
    assert ours.n_seen.tolist() == [26]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_incremental_pca_on_cuda_leaves_the_cuda_rng_alone():
    """The seeded SVD forks the CUDA generator of a CUDA input: its state is the same after ``update``."""
    pca = lora_eva.IncrementalPCA(3)
    torch.cuda.manual_seed(7)
    state = torch.cuda.get_rng_state()
    for x in _stream():
        pca.update(x.cuda())
    assert torch.equal(torch.cuda.get_rng_state(), state)
    assert pca.components.is_cuda and pca.components.shape == (3, 12)


def test_incremental_pca_first_batch_is_the_exact_pca():
    """One batch, ``in <= q``: the randomised SVD is exact, so ``A`` is the top right singular vectors of the
    centred rows, signed so each row's largest entry is positive, and the ratios are ``S² / Σ (x - mean)²``."""
    x = _stream(sizes=(20,), width=6)[0]
    pca = lora_eva.IncrementalPCA(3)
    pca.update(x)
    centred = x.double() - x.double().mean(0)
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)
    vh = vh[:3]
    vh = vh * torch.sign(vh[torch.arange(3), vh.abs().argmax(1)]).view(-1, 1)
    _close(pca.components.double(), vh, 1e-4)
    _close(pca.singular_values.double(), s[:3], 1e-5)
    _close(pca.explained_variance_ratio.double(), s[:3] ** 2 / centred.square().sum(), 1e-5)
    peaks = pca.components[torch.arange(3), pca.components.abs().argmax(1)]
    assert (peaks > 0).all()


def test_running_moments_equal_the_closed_form():
    """Mean and biased variance of all rows so far, in float64, batches of different sizes."""
    xs = _stream(sizes=(5, 3, 8, 1))
    mean = var = None
    n = torch.tensor([0])
    for i, x in enumerate(xs):
        mean, var, n = lora_eva.running_moments(x, mean, var, n)
        seen = torch.cat(xs[: i + 1]).double()
        assert mean.dtype == var.dtype == torch.float64
        assert n.tolist() == [seen.shape[0]]
        _close(mean, seen.mean(0), 1e-12)
        _close(var, seen.var(0, unbiased=False), 1e-12)


def test_running_moments_keep_a_constant_column_at_exactly_zero():
    """A constant column's variance is 0.0 exactly (never a negative rounding), whatever the other columns hold:
    each column's rounding correction is its own."""
    x = torch.tensor([[5.0, 0.0], [5.0, 0.0], [5.0, 1.0]])
    mean, var, n = lora_eva.running_moments(x, None, None, torch.tensor([0]))
    assert var[0].item() == 0.0 and mean[0].item() == 5.0
    assert abs(var[1].item() - 2 / 9) < 1e-15
    mean, var, n = lora_eva.running_moments(x, mean, var, n)
    assert var[0].item() == 0.0 and n.tolist() == [6]
    assert abs(var[1].item() - 2 / 9) < 1e-15


def test_running_moments_remove_the_rounding_of_a_large_mean():
    """Rows ``1e8 + 8·k`` (exact in float32 and float64): ``sum / N`` rounds, and the centred sum of squares
    subtracts that rounding's square over ``N``; the variance is ``64·var(k)`` to 1e-14."""
    k = torch.randint(0, 11, (3000, 1), generator=torch.Generator().manual_seed(0)).double()
    x = (1e8 + 8 * k).float()
    _, var, _ = lora_eva.running_moments(x, None, None, torch.tensor([0]))
    expected = 64 * k.var(0, unbiased=False)
    assert abs((var - expected) / expected).item() < 1e-14


def test_running_moments_and_pca_make_every_tensor_on_the_rows_device():
    """Counts, sums, index and seed all follow ``x``'s device (an accelerator's rows next to a CPU tensor raise):
    seen with meta rows, where a tensor made on the CPU by default fails the first operation mixing the two."""
    x = torch.zeros(10, 6, device="meta")
    mean, var, n = lora_eva.running_moments(x, None, None, torch.tensor([0], device="meta"))
    mean, var, n = lora_eva.running_moments(x, mean, var, n)
    assert [(t.device.type, t.dtype, tuple(t.shape)) for t in (mean, var, n)] == [
        ("meta", torch.float64, (6,)),
        ("meta", torch.float64, (6,)),
        ("meta", torch.int64, (1,)),
    ]
    pca = lora_eva.IncrementalPCA(2)
    for _ in range(2):  # the first batch and the incremental step
        pca.update(x)
        got = (pca.n_seen, pca.mean, pca.var, pca.components, pca.singular_values, pca.explained_variance_ratio)
        assert [(t.device.type, tuple(t.shape)) for t in got] == [
            ("meta", (1,)),
            ("meta", (6,)),
            ("meta", (6,)),
            ("meta", (2, 6)),
            ("meta", (2,)),
            ("meta", (2,)),
        ]


# ------------------------------------------------------------------------------------------------------------
# Layer inputs


def test_token_mask_every_branch():
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    att = torch.tensor([[1, 1, 0], [1, 1, 1]])
    labels = torch.tensor([[-100, 7, 7], [7, -1, -100]])
    assert lora_eva.token_mask(ids, True, -100) is None
    assert lora_eva.token_mask((ids, att), True, -100) is None
    assert lora_eva.token_mask({"x": ids, "labels": labels}, True, -100) is None
    only_ids = lora_eva.token_mask({"input_ids": ids}, True, -100)
    assert only_ids.dtype == torch.bool and only_ids.all() and only_ids.shape == (2, 3)
    only_mask = lora_eva.token_mask({"attention_mask": att}, False, -100)
    assert only_mask.dtype == torch.bool and only_mask.tolist() == [[True, True, False], [True, True, True]]
    both = lora_eva.token_mask({"input_ids": ids, "attention_mask": att, "labels": labels}, True, -100)
    assert both.tolist() == [[False, True, False], [True, True, False]]
    other_value = lora_eva.token_mask({"input_ids": ids, "attention_mask": att, "labels": labels}, True, -1)
    assert other_value.tolist() == [[True, True, False], [True, False, True]]
    ignored = lora_eva.token_mask({"input_ids": ids, "attention_mask": att, "labels": labels}, False, -100)
    assert ignored.tolist() == [[True, True, False], [True, True, True]]
    no_labels = lora_eva.token_mask({"input_ids": ids, "labels": None}, True, -100)
    assert no_labels.dtype == torch.bool and no_labels.all()
    label_only = lora_eva.token_mask({"input_ids": ids, "labels": labels}, True, -100)
    assert label_only.tolist() == [[False, True, True], [True, True, False]]


def test_layer_rows_masked_or_flattened():
    x = torch.arange(2 * 3 * 4, dtype=torch.float32).view(2, 3, 4)
    mask = torch.tensor([[True, False, True], [False, True, False]])
    assert torch.equal(lora_eva.layer_rows(x, mask), torch.stack([x[0, 0], x[0, 2], x[1, 1]]))
    assert torch.equal(lora_eva.layer_rows(x, None), x.reshape(6, 4))
    assert torch.equal(lora_eva.layer_rows(x, mask[:, :2]), x.reshape(6, 4))  # does not fit: every row
    assert torch.equal(lora_eva.layer_rows(x[0], mask[0]), x[0, [0, 2]])


class FakeWorld:
    """``torch.distributed`` of two ranks seen from rank 0: the other rank holds ``other``."""

    def __init__(self, other: torch.Tensor) -> None:
        self.other, self.calls = other, []

    def get_world_size(self) -> int:
        return 2

    def all_gather(self, out: list, tensor: torch.Tensor) -> None:
        assert len(out) == 2 and all(o.shape == tensor.shape for o in out)
        self.calls.append(tuple(tensor.shape))
        if tensor.dim() == 1 and tensor.dtype == torch.int64:  # the row counts
            out[0].copy_(tensor)
            out[1].copy_(torch.tensor([self.other.shape[0]]))
            return
        out[0].copy_(tensor)
        out[1].zero_()
        out[1][: self.other.shape[0]] = self.other


@pytest.fixture
def fake_world(monkeypatch):
    import torch.distributed as dist

    def make(other):
        world = FakeWorld(other)
        monkeypatch.setattr(dist, "get_world_size", world.get_world_size)
        monkeypatch.setattr(dist, "all_gather", world.all_gather)
        return world

    return make


@pytest.mark.parametrize("mine, theirs", [(5, 2), (2, 5), (3, 3), (0, 4)])
def test_gather_rows_concatenates_ranks_in_order(fake_world, mine, theirs):
    """Row counts differing between ranks (padded for the gather, the padding removed), rank 0 first."""
    rows = torch.arange(mine * 3, dtype=torch.float32).view(mine, 3) + 1
    other = -torch.arange(theirs * 3, dtype=torch.float32).view(theirs, 3) - 1
    world = fake_world(other)
    got = lora_eva.gather_rows(rows)
    assert torch.equal(got, torch.cat([rows, other]))
    assert world.calls == [(1,), (max(mine, theirs), 3)]


def test_gather_rows_gathers_counts_on_the_rows_device(monkeypatch):
    """The row count travels on the rows' device (NCCL gathers device tensors only): seen here with meta rows."""
    import torch.distributed as dist

    devices = []

    def all_gather(out, tensor):
        devices.append(tensor.device.type)
        if tensor.dtype == torch.int64:
            out[:] = [torch.tensor([2]), torch.tensor([1])]
        else:
            out[:] = [tensor, tensor]

    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_gather", all_gather)
    got = lora_eva.gather_rows(torch.zeros(2, 3, device="meta"))
    assert devices == ["meta", "meta"] and got.shape == (3, 3) and got.device.type == "meta"


def test_digest_is_sha1_of_shape_dtype_and_bytes():
    x = torch.arange(6, dtype=torch.float32).view(2, 3)
    expected = hashlib.sha1(str(((2, 3), torch.float32)).encode())
    expected.update(x.numpy().tobytes())
    assert lora_eva._digest(x) == expected.hexdigest()
    assert lora_eva._digest(x.t().contiguous().t()) == expected.hexdigest()
    assert lora_eva._digest(x.t()) != lora_eva._digest(x.t().contiguous().view(2, 3))
    assert lora_eva._digest(x.view(3, 2)) != lora_eva._digest(x)
    assert lora_eva._digest(x.double()) != lora_eva._digest(x)
    empty = torch.zeros(0, 3)
    assert lora_eva._digest(empty) == hashlib.sha1(str(((0, 3), torch.float32)).encode()).hexdigest()


# ------------------------------------------------------------------------------------------------------------
# Rank distribution


def test_distribute_ranks_takes_the_largest_ratios_over_all_layers():
    ratios = {"a": torch.tensor([0.5, 0.3, 0.1]), "b": torch.tensor([0.4, 0.05]), "c": torch.tensor([0.01])}
    site_of = {"a": "a", "b": "b", "c": "c"}
    assert lora_eva.distribute_ranks(ratios, site_of, {}, 3) == {"a": 2, "b": 1, "c": 0}
    assert lora_eva.distribute_ranks(ratios, site_of, {}, 1) == {"a": 1, "b": 0, "c": 0}
    assert lora_eva.distribute_ranks(ratios, site_of, {}, 0) == {"a": 0, "b": 0, "c": 0}
    assert lora_eva.distribute_ranks(ratios, site_of, {}, 5) == {"a": 3, "b": 2, "c": 0}
    assert lora_eva.distribute_ranks(ratios, site_of, {}, 99) == {"a": 3, "b": 2, "c": 1}


def test_distribute_ranks_shared_layers_give_ties_to_the_pca_s_own_layer():
    """``q`` owns the PCA, ``k`` and ``v`` read the same inputs (same ratios): when the budget splits a tie the
    larger share goes to ``q`` (swapped back if the argsort gave it to a sharer)."""
    ratios = {"q": torch.tensor([0.4, 0.2]), "d": torch.tensor([0.3])}
    site_of = {"q": "q", "d": "d", "k": "q", "v": "q"}
    shared = {"k": "q", "v": "q"}
    got = lora_eva.distribute_ranks(ratios, site_of, shared, 4)
    assert sum(got.values()) == 4 and got["d"] == 1
    assert got["q"] >= got["k"] and got["q"] >= got["v"]
    got = lora_eva.distribute_ranks(ratios, site_of, shared, 2)
    assert sum(got.values()) == 2 and got["q"] == 1 and got["d"] == 0
    assert sorted([got["k"], got["v"]]) == [0, 1]
    # a tie split 2 / 1 between owner and sharer (whatever order argsort gives equal values): the owner gets 2
    ratios = {"q": torch.tensor([0.5, 0.1])}
    assert lora_eva.distribute_ranks(ratios, {"q": "q", "k": "q"}, {"k": "q"}, 3) == {"q": 2, "k": 1}
    assert lora_eva.distribute_ranks(ratios, {"q": "q", "k": "q"}, {"k": "q"}, 1) == {"q": 1, "k": 0}
    # the sharer listed first (it wins the tie in the argsort's order): swapped back to the owner
    assert lora_eva.distribute_ranks(ratios, {"k": "q", "q": "q"}, {"k": "q"}, 1) == {"k": 0, "q": 1}
    assert lora_eva.distribute_ranks(ratios, {"k": "q", "q": "q"}, {"k": "q"}, 3) == {"k": 1, "q": 2}


# ------------------------------------------------------------------------------------------------------------
# One PCA site


def test_site_skips_short_batches_and_flags_components_reaching_tau():
    """Fewer rows than components: the batch is skipped. From the second batch on, component ``i`` has converged
    when its cosine similarity with the previous step's reaches ``tau`` (``>=``)."""
    xs = _stream(sizes=(10, 9, 2), width=6)
    site = lora_eva._Site(3, 0.5)
    assert site.converged.tolist() == [False] * 3 and site.converged.dtype == torch.bool and site.active is True
    assert site.tau == 0.5 and site.pca.k == 3 and site.pca.components is None
    site.update(xs[2][:2])
    assert site.pca.components is None
    site.update(xs[0].double())  # read as float32
    assert site.pca.components.dtype == torch.float32 and site.converged.tolist() == [False] * 3
    first = site.pca.components.clone()
    reference = lora_eva.IncrementalPCA(3)
    reference.update(xs[0])
    reference.update(xs[1])
    sim = F.cosine_similarity(reference.components, first)
    site.tau = float(sim[1])
    site.update(xs[1])
    assert torch.equal(site.pca.components, reference.components)
    assert site.converged.tolist() == (sim >= sim[1]).tolist()
    assert site.converged[1].item() and site.converged.dtype == torch.bool
    site.update(xs[2])  # 2 rows < 3: skipped, nothing moves
    assert torch.equal(site.pca.components, reference.components) and site.pca.n_seen.tolist() == [19]


# ------------------------------------------------------------------------------------------------------------
# The EVA pass against PEFT


class TinyLM(nn.Module):
    """``q`` and ``k`` read the same embeddings (one shared PCA), ``down`` their sum's tanh."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(32, 8)
        self.q, self.k, self.down, self.head = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 6), nn.Linear(6, 32)

    def forward(self, input_ids, attention_mask=None, labels=None):
        h = self.emb(input_ids)
        return self.head(self.down(torch.tanh(self.q(h) + self.k(h))))


def lm_batches(n: int = 3, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 32, (2, 10), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 7:] = 0
        labels = ids.clone()
        labels[0, :3] = -7
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


class TwoBranch(nn.Module):
    """``a`` reads 4 strong directions of its 8 inputs, ``b`` 16 isotropic ones: ``a`` takes the whole budget."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.head = nn.Linear(8, 8), nn.Linear(16, 4), nn.Linear(12, 3)

    def forward(self, x):
        return self.head(torch.cat([self.a(x[:, :8].contiguous()), self.b(x[:, 8:].contiguous())], dim=-1))


def branch_batches(n: int = 3, rows: int = 16, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(8, 4, generator=g))[0].t()  # (4, 8)
    scales = torch.linspace(3.0, 2.0, 4).view(1, -1)
    out = []
    for _ in range(n):
        strong = (torch.randn(rows, 4, generator=g) * scales) @ basis + 0.01 * torch.randn(rows, 8, generator=g)
        out.append(torch.cat([strong, torch.randn(rows, 16, generator=g)], dim=1))
    return out


def _peft_layers(pm) -> dict:
    from peft.tuners.lora import LoraLayer

    return {n.removeprefix("base_model.model."): m for n, m in pm.named_modules() if isinstance(m, LoraLayer)}


def _same_as_peft(pm, ours) -> None:
    peft_layers = _peft_layers(pm)
    ours_layers = {n: m.adapter.default for n, m in ours.named_modules() if hasattr(m, "adapter")}
    assert set(ours_layers) == set(peft_layers)
    for name, p in peft_layers.items():
        layer = ours_layers[name]
        assert layer.r == p.r["default"] and layer.scale == p.scaling["default"], name
        _close(layer.lora_A.detach(), p.lora_A["default"].weight.detach())
        assert not layer.lora_B.any() and layer.needs_data is False
    theirs, mine = pm.peft_config["default"], peft_config_dict(ours)
    assert mine["rank_pattern"] == theirs.rank_pattern
    assert mine["alpha_pattern"] == theirs.alpha_pattern
    assert sorted(mine["target_modules"]) == sorted(theirs.target_modules)


@pytest.mark.parametrize("use_label_mask", [True, False])
def test_eva_equals_peft_with_shared_inputs_and_masks(use_label_mask):
    """q/k share one PCA, the attention mask and (optionally) the label mask choose the rows, the budget of
    ``r + r + 2`` moves between layers and the alphas follow (``alpha·k'/r``)."""
    base, batches = TinyLM(), lm_batches()
    kw = dict(r=2, target_modules=["q", "k", "down"], rank_pattern={"down": 1})
    eva = dict(rho=3.0, tau=0.9, use_label_mask=use_label_mask, label_mask_value=-7)
    pm = get_peft_model(
        copy.deepcopy(base), LoraConfig(**kw, lora_alpha=4, init_lora_weights="eva", eva_config=EvaConfig(**eva))
    )
    initialize_lora_eva_weights(pm, batches, show_progress_bar=False)
    cfg = la.LoRAConfig(
        **kw,
        alpha=4,
        init_weights="eva",
        eva_rho=3.0,
        eva_tau=0.9,
        eva_use_label_mask=use_label_mask,
        eva_label_mask_value=-7,
    )
    ours = la.inject(copy.deepcopy(base), cfg)
    la.initialize_from_data(ours, batches)
    _same_as_peft(pm, ours)
    with torch.no_grad():
        _close(ours(**batches[0]), base(**batches[0]), 1e-6)


def test_eva_equals_peft_whitened_with_a_removed_layer():
    """Whitening (``A = V_kᵀ / sqrt(S)``), alphas kept, ``b`` gets rank 0: its adapter and target go, as in PEFT."""
    base, batches = TwoBranch(), branch_batches()
    eva = dict(rho=2.0, tau=0.9, whiten=True, adjust_scaling_factors=False)
    peft_cfg = LoraConfig(
        r=2, lora_alpha=4, target_modules=["a", "b"], init_lora_weights="eva", eva_config=EvaConfig(**eva)
    )
    pm = get_peft_model(copy.deepcopy(base), peft_cfg)
    initialize_lora_eva_weights(
        pm,
        batches,
        forward_fn=lambda m, b: m(b),
        prepare_model_inputs_fn=None,
        prepare_layer_inputs_fn=None,
        show_progress_bar=False,
    )
    cfg = la.LoRAConfig(
        r=2,
        alpha=4,
        target_modules=["a", "b"],
        init_weights="eva",
        eva_tau=0.9,
        eva_whiten=True,
        eva_adjust_scaling_factors=False,
    )
    ours = la.inject(copy.deepcopy(base), cfg)
    la.initialize_from_data(ours, batches)
    _same_as_peft(pm, ours)
    assert not hasattr(ours.b, "adapter") and ours.a.adapter.default.r == 4
    assert ours.a.adapter.default.alpha == 4.0 and ours.a.adapter.default.scale == 1.0
    assert peft_config_dict(ours)["target_modules"] == ["a"]
    assert peft_config_dict(ours)["rank_pattern"] == {"a": 4} and peft_config_dict(ours)["alpha_pattern"] == {}
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {
        "a.adapter.default.lora_A",
        "a.adapter.default.lora_B",
    }


def _layers(model, adapter="default"):
    from lightning_adapters.methods.lora_data import data_init_groups

    return data_init_groups(model)[adapter]


def _run(model, batch):
    return model(batch)


def _eva(model, batches, opts, run=_run, gather=False):
    """``eva_components`` on the base model's inputs (the adapters switched off, as ``initialize_from_data``)."""
    from lightning_adapters.core.inject import disabled

    with disabled(model):
        return lora_eva.eva_components(model, _layers(model), batches, run, opts, gather=gather, prepare=lambda b: b)


def _cfg(targets=("a", "b"), **kw):
    return la.LoRAConfig(r=2, target_modules=list(targets), init_weights="eva", **kw)


def test_eva_components_refusals():
    model = la.inject(TwoBranch(), _cfg())
    with pytest.raises(AdapterStateError, match="got no batches"):
        _eva(model, [], _cfg())
    with pytest.raises(AdapterConfigError, match=r"round\(r \* eva_rho\) = 9 components of inputs only 8 wide"):
        _eva(model, branch_batches(1), _cfg(eva_rho=4.5))
    out = _eva(model, branch_batches(2), _cfg(eva_rho=4.0, eva_tau=0.0))  # 8 components of 8 inputs: allowed
    assert sum(u.shape[0] for u in out.values()) == 4
    with pytest.raises(AdapterStateError, match=r"\['b'\] never ran on the first batch"):
        _eva(model, branch_batches(1), _cfg(), run=lambda m, b: m.a(b[:, :8]))
    assert not model.a._forward_hooks and not model.b._forward_hooks


def _counting():
    calls = []

    def run(m, b):
        calls.append(1)
        return m(b)

    return calls, run


def test_eva_components_gives_up_after_max_steps(monkeypatch):
    """``tau = 1`` on batches that keep moving the components: one fingerprint pass, then ``EVA_MAX_STEPS`` collecting
    passes (steps 0..MAX-1; step MAX refuses), naming the layers still moving (not ``b``: its rank 0 has nothing to
    converge); the hooks are removed."""
    monkeypatch.setattr(lora_eva, "EVA_MAX_STEPS", 3)
    model = la.inject(TwoBranch(), _cfg())
    calls, run = _counting()
    with pytest.raises(AdapterStateError, match=r"components of \['a'\] did not reach eva_tau=1.0 in 3"):
        _eva(model, branch_batches(5), _cfg(eva_tau=1.0), run=run)
    assert len(calls) == 1 + 3
    assert not model.a._forward_hooks and not model.b._forward_hooks


def test_eva_components_converged_layers_stop_reading():
    """``tau = -1`` (every similarity reaches it): every component converges on the second batch, so EVA stops
    after the fingerprint pass and two collecting passes; the result is the PCA of the first two batches, ranks
    given by ``distribute_ranks``."""
    model = la.inject(TwoBranch(), _cfg())
    calls, run = _counting()
    batches = branch_batches(4)
    opts = _cfg()
    opts.eva_tau = -1.0
    out = _eva(model, batches, opts, run=run)
    assert len(calls) == 3
    pca_a, pca_b = lora_eva.IncrementalPCA(4), lora_eva.IncrementalPCA(4)
    for x in batches[:2]:
        pca_a.update(x[:, :8])
        pca_b.update(x[:, 8:])
    ranks = lora_eva.distribute_ranks(
        {"a": pca_a.explained_variance_ratio, "b": pca_b.explained_variance_ratio}, {"a": "a", "b": "b"}, {}, 4
    )
    assert ranks == {"a": 3, "b": 1}
    assert list(out) == ["a", "b"] and out["a"].dtype == torch.float32
    assert torch.equal(out["a"], pca_a.components[:3].float()) and torch.equal(out["b"], pca_b.components[:1].float())
    opts.eva_whiten = True
    white = _eva(model, batches, opts)
    _close(white["a"], pca_a.components[:3] / pca_a.singular_values[:3].sqrt().view(-1, 1), 1e-6)
    _close(white["b"], pca_b.components[:1] / pca_b.singular_values[:1].sqrt().view(-1, 1), 1e-6)


def test_eva_components_caps_a_huge_rho_at_the_largest_dimension():
    """``rho > 1000``: ``min(rho, largest parameter dimension // r)`` (here 16 // 2 = 8: 16 components, refused on
    ``a``'s 8 inputs, allowed on ``b``'s 16); ``rho = 1000`` is not capped (2000 components)."""
    model = la.inject(TwoBranch(), _cfg(["a"]))
    with pytest.raises(AdapterConfigError, match="= 16 components of inputs only 8 wide"):
        _eva(model, branch_batches(2), _cfg(["a"], eva_rho=1001.0, eva_tau=0.0))
    with pytest.raises(AdapterConfigError, match="= 2000 components"):
        _eva(model, branch_batches(2), _cfg(["a"], eva_rho=1000.0))
    wide = la.inject(TwoBranch(), _cfg(["b"]))
    out = _eva(wide, branch_batches(2), _cfg(["b"], eva_rho=1e9, eva_tau=0.0))  # 16 components of 16 inputs
    assert out["b"].shape == (2, 16)
    with pytest.raises(AdapterConfigError, match="= 2000 components of inputs only 16 wide"):
        _eva(wide, branch_batches(2), _cfg(["b"], eva_rho=1000.0))


def test_eva_components_gathers_every_rank_s_rows(monkeypatch):
    """``gather``: each layer's PCA reads the rows of both ranks, here the other rank holding the same rows, so
    the result is the one of batches that repeat each batch's rows twice."""
    import torch.distributed as dist

    def all_gather(out, tensor):
        for o in out:
            o.copy_(tensor)

    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_gather", all_gather)
    model = la.inject(TwoBranch(), _cfg())
    batches = branch_batches(3)
    got = _eva(model, batches, _cfg(eva_tau=0.9), gather=True)
    expected = _eva(model, [torch.cat([b, b]) for b in batches], _cfg(eva_tau=0.9))
    assert list(got) == list(expected) == ["a", "b"]
    for name in got:
        assert torch.equal(got[name], expected[name]), name


# ------------------------------------------------------------------------------------------------------------
# Writing the components into the model


class Three(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return self.c(self.b(self.a(x)))


class Outer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner, self.head = Three(), nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.inner(x))


def _three_cfg():
    return la.LoRAConfig(
        r=2, alpha=4, target_modules=["a", "b", "c"], rank_pattern={"c": 1}, alpha_pattern={"c": 3}, init_weights="eva"
    )


def _comps(prefix=""):
    g = torch.Generator().manual_seed(3)
    return {
        f"{prefix}a": torch.randn(3, 8, generator=g, dtype=torch.float64),
        f"{prefix}b": torch.zeros(0, 8),
        f"{prefix}c": torch.randn(1, 8, generator=g),
    }


@pytest.mark.parametrize("adjust", [True, False])
def test_apply_components_sets_ranks_alphas_patterns_and_removes_rank_zero(adjust):
    model = la.inject(Three(), _three_cfg())
    la.inject(model, la.LoRAConfig(r=2, target_modules=["b"]), name="other")
    before = copy.deepcopy(peft_config_dict(model, "other"))
    comps = _comps()
    with torch.no_grad():
        for _, layer in _layers(model).values():
            layer.lora_B.fill_(1.0)  # B = 0 comes from apply_components, also where the rank stays
    kept = (model.c.adapter.default.lora_A, model.c.adapter.default.lora_B)
    lora_eva.apply_components(model, _layers(model), comps, adjust, "default")
    a, c = model.a.adapter.default, model.c.adapter.default
    assert c.lora_A is kept[0] and c.lora_B is kept[1]  # rank and alpha unchanged: written in place
    assert (a.r, a.alpha, a.scale) == ((3, 6.0, 2.0) if adjust else (3, 4.0, 4 / 3))
    assert (c.r, c.alpha, c.scale) == (1, 3.0, 3.0)
    assert torch.equal(a.lora_A, comps["a"].float()) and torch.equal(c.lora_A, comps["c"])
    assert a.lora_B.shape == (8, 3) and not a.lora_B.any() and not c.lora_B.any()
    assert a.needs_data is False and c.needs_data is False
    assert list(model.b.adapter._modules) == ["other"]  # only this adapter's layer left b
    saved = peft_config_dict(model, "default")
    assert saved["rank_pattern"] == {"a": 3, "c": 1}
    assert saved["alpha_pattern"] == ({"a": 6.0, "c": 3.0} if adjust else {"c": 3.0})
    assert saved["target_modules"] == ["a", "c"]
    assert peft_config_dict(model, "other") == before
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "a.adapter.default.lora_A",
        "a.adapter.default.lora_B",
        "c.adapter.default.lora_A",
        "c.adapter.default.lora_B",
    }
    x = torch.randn(4, 8)
    with torch.no_grad():
        with la.disabled(model):
            plain = model(x)
        assert torch.equal(model(x), plain)  # B = 0: the base at init


def test_apply_components_skips_other_injections_listed_first():
    """Another adapter's injection record comes first: skipped, and the EVA adapter's record is still rewritten."""
    model = la.inject(Three(), la.LoRAConfig(r=2, target_modules=["b"]), name="first")
    la.inject(model, _three_cfg(), name="e")
    lora_eva.apply_components(model, _layers(model, "e"), _comps(), True, "e")
    saved = peft_config_dict(model, "e")
    assert saved["rank_pattern"] == {"a": 3, "c": 1} and saved["target_modules"] == ["a", "c"]
    assert list(model.b.adapter._modules) == ["first"]


def test_apply_components_in_a_sub_module_injection():
    """An injection into ``outer.inner``: layer names carry the ``inner.`` prefix, the record's targets and patterns
    do not; nothing dropped keeps the config's target_modules."""
    from lightning_adapters.core.inject import find_records

    outer = Outer()
    la.inject(outer.inner, _three_cfg())
    targets_before = list(find_records(outer)[0][2].targets)
    comps = _comps("inner.")
    comps["inner.b"] = torch.ones(2, 8)
    layers = _layers(outer)
    assert list(layers) == ["inner.a", "inner.b", "inner.c"]
    lora_eva.apply_components(outer, layers, comps, True, "default")
    ((prefix, root, rec),) = find_records(outer)
    assert prefix == "inner" and root is outer.inner
    assert rec.targets == targets_before
    assert rec.resolved_peft_fields["rank_pattern"] == {"a": 3, "c": 1}
    assert rec.resolved_peft_fields["alpha_pattern"] == {"a": 6.0, "c": 3.0}
    assert "target_modules" not in rec.resolved_peft_fields or rec.resolved_peft_fields["target_modules"] != ["a", "c"]
    assert torch.equal(outer.inner.b.adapter.default.lora_A, torch.ones(2, 8))
    comps = _comps("inner.")
    outer2 = Outer()
    la.inject(outer2.inner, _three_cfg())
    lora_eva.apply_components(outer2, _layers(outer2), comps, True, "default")
    ((_, _, rec2),) = find_records(outer2)
    assert sorted(rec2.targets) == ["a", "c"] and rec2.resolved_peft_fields["target_modules"] == ["a", "c"]
    assert not hasattr(outer2.inner.b, "adapter")
    assert {n for n, p in outer2.inner.named_parameters(prefix="inner") if p.requires_grad} == {
        "inner.a.adapter.default.lora_A",
        "inner.a.adapter.default.lora_B",
        "inner.c.adapter.default.lora_A",
        "inner.c.adapter.default.lora_B",
    }


def test_inside_and_relative():
    assert lora_eva._inside("x.a", "") and lora_eva._inside("inner", "inner") and lora_eva._inside("inner.a", "inner")
    assert not lora_eva._inside("inner2.a", "inner") and not lora_eva._inside("inne", "inner")
    assert lora_eva._relative("inner.a.b", "inner") == "a.b" and lora_eva._relative("a.b", "") == "a.b"


def test_running_moments_remove_the_rounding_of_a_float64_batch_mean():
    """Float64 rows ``1 + k·2⁻⁵²`` (k in 0..3, exact): their sum rounds and so does ``sum / N``, by up to a third of
    the spread; subtracting ``(Σ(x − m))² / N`` from the centred sum of squares leaves the exact variance
    ``2⁻¹⁰⁴·var(k)`` to 1e-12 in every column."""
    eps = 2.0**-52
    k = torch.randint(0, 4, (7, 5), generator=torch.Generator().manual_seed(0)).double()
    x = 1 + k * eps
    assert torch.equal((x - 1) / eps, k)
    mean, var, n = lora_eva.running_moments(x, None, None, torch.tensor([0]))
    expected = eps**2 * k.var(0, unbiased=False)
    assert n.tolist() == [7] and (expected > 0).all()
    assert ((var - expected) / expected).abs().max().item() < 1e-12
    assert (mean - (1 + eps * k.mean(0))).abs().max().item() <= eps
