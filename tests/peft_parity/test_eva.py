"""EVA (``init_weights="eva"``) against PEFT 0.21's ``initialize_lora_eva_weights``: components, redistributed ranks
and alphas, removed layers, saved files both ways, trained outputs and gradients.

PEFT's incremental PCA takes a randomised SVD (``torch.svd_lowrank``) seeded with 42 and fixes each component's sign
(largest entry positive), so it is deterministic: ours runs the same seeded SVD on the same rows and gets the same
``A`` (bit for bit here, asserted within 1e-5 relative, no sign freedom left).
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.config import EvaConfig
from peft.tuners.lora.eva import initialize_lora_eva_weights
from torch import nn

import lightning_adapters as la
from lightning_adapters.interop.peft import peft_config_dict
from lightning_adapters.methods import lora_eva
from tests.helpers import tiny_llama
from tests.peft_parity.test_inits import _assert_same_grads, _close, _our_state_from_peft, _peft_layers, _randomize_peft

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "down_proj"]


@pytest.fixture(autouse=True)
def one_thread():
    """EVA runs hundreds of SVDs of matrices a few dozen wide: extra threads only add contention on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def lm_batches(n: int = 4, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Token batches with padding and ignored labels, so both of EVA's masks remove rows."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 128, (2, 12), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 9:] = 0
        labels = ids.clone()
        labels[0, :3] = -100
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


class TwoBranch(nn.Module):
    """``a`` reads 8 strong directions of its 16 inputs, ``b`` 128 isotropic inputs: EVA gives ``a`` the whole
    budget (each of its 8 components explains over 7% of its variance, none of ``b``'s 5%)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.head = nn.Linear(16, 16), nn.Linear(128, 16), nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # contiguous inputs: PEFT's input hash views them flat
        return self.head(torch.cat([self.a(x[:, :16].contiguous()), self.b(x[:, 16:].contiguous())], dim=-1))


def branch_batches(n: int = 4, rows: int = 24, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(16, 8, generator=g))[0].t()  # (8, 16) orthonormal directions
    scales = torch.linspace(1.3, 1.0, 8).view(1, -1)  # distinct variances: identifiable components
    out = []
    for _ in range(n):
        strong = (torch.randn(rows, 8, generator=g) * scales) @ basis + 0.01 * torch.randn(rows, 16, generator=g)
        out.append(torch.cat([strong, torch.randn(rows, 128, generator=g)], dim=1))
    return out


def _peft_eva(base, peft_cfg, batches, **kw):
    pm = get_peft_model(copy.deepcopy(base), peft_cfg)
    initialize_lora_eva_weights(pm, batches, show_progress_bar=False, **kw)
    return pm


def _check_against_peft(pm, ours, base_out, ours_out) -> None:
    """Same adapted layers, ranks, A (B = 0), alphas, saved patterns; the model is the base at init."""
    _close(ours_out, base_out, 1e-6)
    peft_layers = _peft_layers(pm)
    ours_layers = {n: m.adapter.default for n, m in ours.named_modules() if hasattr(m, "adapter")}
    assert set(ours_layers) == set(peft_layers)
    for name, p in peft_layers.items():
        layer = ours_layers[name]
        assert layer.lora_A.shape == p.lora_A["default"].weight.shape, name
        _close(layer.lora_A, p.lora_A["default"].weight)
        assert not layer.lora_B.any() and not p.lora_B["default"].weight.any()
        assert layer.scale == p.scaling["default"], name
    theirs, mine = pm.peft_config["default"], peft_config_dict(ours)
    assert mine["rank_pattern"] == theirs.rank_pattern
    assert mine["alpha_pattern"] == theirs.alpha_pattern
    assert mine["eva_config"] == {k: getattr(theirs.eva_config, k) for k in mine["eva_config"]}


def _round_trips(pm, ours, base, x, run, tmp_path) -> None:
    """Trained: PEFT → ours and ours → PEFT give the same outputs, gradients and merged weights."""
    _randomize_peft(pm)
    la.load_adapter_state_dict(ours, _our_state_from_peft(pm))
    with torch.no_grad():
        expected = run(pm, x)
        _close(run(ours, x), expected)
    pm.save_pretrained(tmp_path / "peft")
    from_peft = la.load_peft(copy.deepcopy(base), tmp_path / "peft")
    with torch.no_grad():
        _close(run(from_peft, x), expected)
    la.save_peft(from_peft, tmp_path / "ours")
    back = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    with torch.no_grad():
        _close(run(back, x), expected)
        _close(run(la.merge(from_peft), x), expected)


def test_eva_equals_peft_on_a_language_model(tmp_path):
    """Llama: q/k/v share one PCA, masks drop padded and ignored positions, ranks and alphas are redistributed."""
    base = tiny_llama()
    batches = lm_batches()
    kw = dict(r=4, target_modules=LLAMA_TARGETS, rank_pattern={"down_proj": 2})
    eva = dict(rho=2.0, tau=0.9)
    pm = _peft_eva(base, LoraConfig(**kw, lora_alpha=8, init_lora_weights="eva", eva_config=EvaConfig(**eva)), batches)
    cfg = la.LoRAConfig(**kw, alpha=8, init_weights="eva", eva_rho=2.0, eva_tau=0.9)
    ours = la.inject(copy.deepcopy(base), cfg)
    la.initialize_from_data(ours, batches)
    x = batches[0]["input_ids"]

    def logits(model, ids):
        return model(ids).logits

    with torch.no_grad():
        _check_against_peft(pm, ours, logits(base, x), logits(ours, x))
    _round_trips(pm, ours, base, x, logits, tmp_path)
    _assert_same_grads(ours, pm, x)


def test_eva_equals_peft_with_whitening_and_a_removed_layer(tmp_path):
    """Plain tensor batches (every row read), whiten, unadjusted alphas; layer ``b`` gets rank 0 and loses its
    adapter, which the saved target_modules reflect, as in PEFT."""
    base = TwoBranch()
    batches = branch_batches()
    eva = dict(rho=2.0, tau=0.95, whiten=True, adjust_scaling_factors=False)
    peft_cfg = LoraConfig(
        r=4, lora_alpha=8, target_modules=["a", "b"], init_lora_weights="eva", eva_config=EvaConfig(**eva)
    )
    pm = _peft_eva(
        base,
        peft_cfg,
        batches,
        forward_fn=lambda m, b: m(b),
        prepare_model_inputs_fn=None,
        prepare_layer_inputs_fn=None,
    )
    cfg = la.LoRAConfig(
        r=4,
        alpha=8,
        target_modules=["a", "b"],
        init_weights="eva",
        eva_tau=0.95,
        eva_whiten=True,
        eva_adjust_scaling_factors=False,
    )
    ours = la.inject(copy.deepcopy(base), cfg)
    la.initialize_from_data(ours, batches)
    x = batches[1]

    def run(model, t):
        return model(t)

    with torch.no_grad():
        _check_against_peft(pm, ours, base(x), ours(x))
    assert not hasattr(ours.b, "adapter") and ours.a.adapter.default.r == 8  # the whole budget went to a
    assert peft_config_dict(ours)["target_modules"] == ["a"] == pm.peft_config["default"].target_modules
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {
        "a.adapter.default.lora_A",
        "a.adapter.default.lora_B",
    }
    _round_trips(pm, ours, base, x, run, tmp_path)
    assert la.eject(ours) is ours and not any(hasattr(m, "adapter") for m in ours.modules())


def test_whitening_divides_each_layer_once():
    """The one difference from PEFT: it whitens a shared PCA in place, once per layer reading it, so q_proj and
    k_proj (same inputs) both end with ``V_kᵀ / S`` there instead of ``V_kᵀ / sqrt(S)``. Here both get
    ``V_kᵀ / sqrt(S)``: rows parallel to PEFT's, longer by ``sqrt(S_i)``; q_proj's and k_proj's leading rows equal."""
    base = tiny_llama()
    batches = lm_batches(2)
    peft_cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "k_proj"],
        init_lora_weights="eva",
        eva_config=EvaConfig(tau=0.8, whiten=True),
    )
    pm = _peft_eva(base, peft_cfg, batches)
    cfg = la.LoRAConfig(r=4, target_modules=["q_proj", "k_proj"], init_weights="eva", eva_tau=0.8, eva_whiten=True)
    ours = la.inject(copy.deepcopy(base), cfg)
    la.initialize_from_data(ours, batches)
    attn = "model.layers.0.self_attn"
    q, k = (ours.get_submodule(f"{attn}.{n}").adapter.default.lora_A.detach() for n in ("q_proj", "k_proj"))
    pq = pm.base_model.model.get_submodule(f"{attn}.q_proj").lora_A["default"].weight.detach()
    n = min(q.shape[0], k.shape[0])
    assert n > 0 and q.shape == pq.shape
    torch.testing.assert_close(k[:n], q[:n], rtol=0, atol=0)
    cos = torch.nn.functional.cosine_similarity(q, pq)  # (rank,)
    torch.testing.assert_close(cos, torch.ones_like(cos), rtol=0, atol=1e-5)
    assert (q.norm(dim=1) > 2 * pq.norm(dim=1)).all()  # PEFT divided twice more by sqrt(S_i) (S_i >> 4 here)


def test_incremental_pca_matches_a_full_pca_of_all_rows():
    """Independent truth: after several updates the components span the top principal directions of every row seen
    (centred on their overall mean), the running variance is the columns' variance."""
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(12, 3, generator=g))[0].t()
    rows = [(torch.randn(20, 3, generator=g) * torch.tensor([5.0, 3.0, 2.0])) @ basis + 1.0 for _ in range(5)]
    pca = lora_eva.IncrementalPCA(3)
    for r in rows:
        pca.update(r)
    allx = torch.cat(rows).double()
    torch.testing.assert_close(pca.var, allx.var(dim=0, unbiased=False), rtol=1e-9, atol=1e-9)
    centred = allx - allx.mean(dim=0)
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)
    torch.testing.assert_close(pca.singular_values.double(), s[:3], rtol=1e-6, atol=1e-6)
    overlap = pca.components.double() @ vh[:3].t()  # (3, 3): ± identity up to the SVD's sign choice
    torch.testing.assert_close(overlap.abs(), torch.eye(3, dtype=torch.float64), rtol=0, atol=1e-6)
    assert (pca.components.abs().argmax(dim=1) == pca.components.argmax(dim=1)).all()  # largest entry positive


def test_distribute_ranks_takes_the_largest_ratios_and_favours_the_pca_layer():
    ratios = {"x": torch.tensor([0.5, 0.2, 0.1]), "y": torch.tensor([0.4, 0.3, 0.05])}
    site_of = {"x": "x", "y": "y", "z": "y"}  # z reads y's inputs
    ranks = lora_eva.distribute_ranks(ratios, site_of, {"z": "y"}, budget=6)
    # sorted: x .5, y .4, z .4, y .3, z .3, x .2 -> x 2, y 2, z 2
    assert ranks == {"x": 2, "y": 2, "z": 2}
    ranks = lora_eva.distribute_ranks(ratios, site_of, {"z": "y"}, budget=3)
    assert ranks["x"] == 1 and ranks["y"] == 1 and ranks["z"] == 1
    assert sum(lora_eva.distribute_ranks(ratios, site_of, {"z": "y"}, budget=100).values()) == 9


def test_eva_bad_uses():
    model = la.inject(tiny_llama(), la.LoRAConfig(r=2, target_modules=["q_proj"], init_weights="eva", eva_tau=0.8))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(la.AdapterStateError, match="'model.layers.0.self_attn.q_proj'.*initialize_from_data"):
        model(lm_batches(1)[0]["input_ids"])  # EVA pending: the layer refuses to run
    with pytest.raises(la.AdapterStateError, match="EVA got no batches"):
        la.initialize_from_data(model, [])
    wide = la.inject(tiny_llama(), la.LoRAConfig(r=40, target_modules=["q_proj"], init_weights="eva"))
    with pytest.raises(la.AdapterConfigError, match=r"round\(r \* eva_rho\) = 80 .* 64 wide; use eva_rho <= 1.6"):
        la.initialize_from_data(wide, lm_batches(1))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    la.initialize_from_data(model, lm_batches(2))
    model(lm_batches(1)[0]["input_ids"])
    with pytest.raises(la.AdapterConfigError, match="EVA already initialised"):
        la.initialize_from_data(model, lm_batches(2))


def test_eva_gives_up_when_tau_is_never_reached(monkeypatch):
    monkeypatch.setattr(lora_eva, "EVA_MAX_STEPS", 3)
    model = la.inject(TwoBranch(), la.LoRAConfig(r=2, target_modules=["b"], init_weights="eva", eva_tau=1.0))
    with pytest.raises(la.AdapterStateError, match=r"\['b'\] did not reach eva_tau=1.0 in 3 forward passes"):
        la.initialize_from_data(model, branch_batches(2))
    assert model.b.adapter.default.needs_data and model.b.adapter.default.r == 2  # nothing changed


def test_eva_next_to_another_adapter_removes_only_its_own_layers():
    """A second, named EVA adapter on modules that already hold adapter ``first``: the layer EVA gives rank 0 loses
    only the EVA adapter; ``first`` keeps both of its layers and its outputs, and EVA's components equal those of
    EVA alone on the base model."""
    base = TwoBranch()
    batches = branch_batches()
    kw = dict(r=4, alpha=8, target_modules=["a", "b"], eva_tau=0.95, eva_whiten=True)
    alone = la.inject(copy.deepcopy(base), la.LoRAConfig(init_weights="eva", **kw))
    la.initialize_from_data(alone, batches)
    model = la.inject(copy.deepcopy(base), la.LoRAConfig(r=2, target_modules=["a", "b"], init_weights=False))
    first = model(batches[1]).detach()
    la.inject(model, la.LoRAConfig(init_weights="eva", **kw), name="eva")
    la.initialize_from_data(model, batches)
    assert la.adapter_names(model) == ["default", "eva"]
    assert list(model.a.adapter.keys()) == ["default", "eva"] and list(model.b.adapter.keys()) == ["default"]
    torch.testing.assert_close(model.a.adapter.eva.lora_A, alone.a.adapter.default.lora_A)
    la.set_active(model, "default")
    torch.testing.assert_close(model(batches[1]), first)
