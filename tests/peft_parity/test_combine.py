"""``la.combine`` against PEFT's ``add_weighted_adapter``, ``la.to_lora`` against PEFT's ``convert_to_lora`` and
against the SVD's own error, on the same weights."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import lightning_adapters as la
from tests.helpers import tiny_llama, token_batch

peft = pytest.importorskip("peft")


def _randomize_peft(peft_model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if any(k in n for k in ("lora_", "hada_", "lokr_")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _copy_lora(peft_model: nn.Module, model: nn.Module, names: list[str]) -> None:
    """Our LoRA layers get the factors of PEFT's adapters of the same names."""
    with torch.no_grad():
        for mod_name, mod in peft_model.base_model.model.named_modules():
            if not hasattr(mod, "lora_A"):
                continue
            for n in names:
                if n in mod.lora_A:
                    layer = model.get_submodule(mod_name).adapter[n]
                    layer.lora_A.copy_(mod.lora_A[n].weight)
                    layer.lora_B.copy_(mod.lora_B[n].weight)
                elif n in mod.lora_embedding_A:
                    layer = model.get_submodule(mod_name).adapter[n]
                    layer.lora_A.copy_(mod.lora_embedding_A[n])
                    layer.lora_B.copy_(mod.lora_embedding_B[n])


def _pair(rank_b: int = 4, targets_b: tuple[str, ...] = ("q_proj", "k_proj")):
    """A PEFT model and ours with LoRA adapters ``t1`` (q, v; r=4, alpha 8) and ``t2`` (r=rank_b, alpha 16)."""
    base = tiny_llama(num_hidden_layers=1)
    cfg_a = dict(r=4, target_modules=["q_proj", "v_proj"])
    cfg_b = dict(r=rank_b, target_modules=list(targets_b))
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(lora_alpha=8, **cfg_a), adapter_name="t1")
    pm.add_adapter("t2", peft.LoraConfig(lora_alpha=16, **cfg_b))
    _randomize_peft(pm, 0)
    ours = copy.deepcopy(base)
    la.inject(ours, la.LoRAConfig(alpha=8, **cfg_a), name="t1")
    la.inject(ours, la.LoRAConfig(alpha=16, **cfg_b), name="t2")
    _copy_lora(pm, ours, ["t1", "t2"])
    return pm, ours


def _peft_factors(pm: nn.Module, name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {
        m: (mod.lora_A[name].weight.detach(), mod.lora_B[name].weight.detach())
        for m, mod in pm.base_model.model.named_modules()
        if hasattr(mod, "lora_A") and name in mod.lora_A
    }


def _our_factors(model: nn.Module, name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    out = {}
    for m, mod in model.named_modules():
        adapters = getattr(mod, "adapter", None)
        if isinstance(adapters, nn.ModuleDict) and name in adapters:
            out[m] = (adapters[name].lora_A.detach(), adapters[name].lora_B.detach())
    return out


def _outputs_after(pm: nn.Module, ours: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    x = token_batch()
    pm.set_adapter(name)
    la.set_active(ours, name)
    with torch.no_grad():
        return pm(input_ids=x).logits, ours(x).logits


PRUNED = {"density": 0.5}


def _seed_peft_pruning(monkeypatch, seed: int) -> None:
    """Seed torch's global generator right before PEFT's first pruning of a call (after it initialised the new
    adapter's layers, which draws from that generator too): ``combine(seed=...)`` starts its drops there."""
    from peft.tuners.lora.model import LoraModel

    seeded = []
    for attr in ("_generalized_task_arithmetic_weighted_adapter", "_svd_generalized_task_arithmetic_weighted_adapter"):
        original = getattr(LoraModel, attr)

        def first_seeds(self, *args, _original=original, **kwargs):
            if not seeded:
                seeded.append(True)
                torch.manual_seed(seed)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(LoraModel, attr, first_seeds)


@pytest.mark.parametrize(
    "how, kwargs",
    [
        ("linear", {}),
        ("cat", {}),
        ("svd", {}),
        ("svd", {"rank": 3, "svd_clamp": 0.9, "svd_full_matrices": False}),
        ("ties", {"density": 0.3, "majority_sign_method": "frequency"}),
        ("ties_svd", PRUNED),
        ("dare_linear", PRUNED),
        ("dare_linear_svd", PRUNED),
        ("dare_ties", PRUNED),
        ("dare_ties_svd", PRUNED),
        ("magnitude_prune", PRUNED),
        ("magnitude_prune_svd", PRUNED),
    ],
)
def test_combine_equals_peft_add_weighted_adapter(how: str, kwargs: dict, monkeypatch) -> None:
    pm, ours = _pair()
    weights = {"t1": 0.7, "t2": -0.4}
    peft_kwargs = {"svd_rank": kwargs.get("rank"), "svd_clamp": kwargs.get("svd_clamp")}
    peft_kwargs.update({k: v for k, v in kwargs.items() if k not in ("rank", "svd_clamp")})
    if how.startswith("dare"):
        _seed_peft_pruning(monkeypatch, 11)
    pm.add_weighted_adapter(list(weights), list(weights.values()), "ab", combination_type=how, **peft_kwargs)
    la.combine(ours, weights, name="ab", how=how, seed=11, **kwargs)
    theirs, mine = _peft_factors(pm, "ab"), _our_factors(ours, "ab")
    assert sorted(theirs) == sorted(mine)
    for m in theirs:
        (a0, b0), (a1, b1) = theirs[m], mine[m]
        assert a0.shape == a1.shape and b0.shape == b1.shape, m
        # Factors of an SVD are unique up to signs: compare their product there.
        if how.endswith("svd"):
            torch.testing.assert_close(b1 @ a1, b0 @ a0, atol=1e-5, rtol=1e-4)
        else:
            torch.testing.assert_close(a1, a0, atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(b1, b0, atol=1e-6, rtol=1e-5)
    theirs_out, mine_out = _outputs_after(pm, ours, "ab")
    torch.testing.assert_close(mine_out, theirs_out, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("how", ["cat", "svd"])
def test_combine_of_other_ranks_and_targets_equals_peft(how: str) -> None:
    pm, ours = _pair(rank_b=2, targets_b=("q_proj", "o_proj", "embed_tokens"))
    weights = {"t2": 1.5, "t1": 0.5}
    pm.add_weighted_adapter(list(weights), list(weights.values()), "ab", combination_type=how)
    la.combine(ours, weights, name="ab", how=how)
    theirs_out, mine_out = _outputs_after(pm, ours, "ab")
    torch.testing.assert_close(mine_out, theirs_out, atol=1e-4, rtol=1e-4)


def _peft_set_scale(pm: nn.Module, name: str, scale: float) -> None:
    for mod in pm.modules():
        if hasattr(mod, "set_scale") and name in getattr(mod, "scaling", {}):
            mod.set_scale(name, scale)


@pytest.mark.parametrize("how", ["linear", "cat", "svd"])
def test_combine_of_an_adapter_scaled_by_set_scale_equals_peft(how: str) -> None:
    # PEFT's set_scale rewrites the scaling add_weighted_adapter reads: the combination takes the adapter as it acts.
    pm, ours = _pair()
    _peft_set_scale(pm, "t2", 0.5)
    la.set_scale(ours, "t2", 0.5)
    weights = {"t1": 0.7, "t2": -0.4}
    pm.add_weighted_adapter(list(weights), list(weights.values()), "ab", combination_type=how)
    la.combine(ours, weights, name="ab", how=how)
    theirs, mine = _peft_factors(pm, "ab"), _our_factors(ours, "ab")
    for m in theirs:
        (a0, b0), (a1, b1) = theirs[m], mine[m]
        torch.testing.assert_close(b1 @ a1, b0 @ a0, atol=1e-5, rtol=1e-4)
    theirs_out, mine_out = _outputs_after(pm, ours, "ab")
    torch.testing.assert_close(mine_out, theirs_out, atol=1e-4, rtol=1e-4)


def test_cat_is_exactly_the_weighted_sum_of_the_deltas_and_trains_saves_merges(tmp_path) -> None:
    _, ours = _pair()
    la.combine(ours, {"t1": 0.7, "t2": 0.3}, name="ab", how="cat")
    assert la.adapter_names(ours) == ["t1", "t2", "ab"] and la.active(ours) == ["t1"]
    x = token_batch()
    with torch.no_grad():
        la.set_active(ours, "ab")
        combined = ours(x).logits
        la.set_scale(ours, "t1", 0.7)
        la.set_scale(ours, "t2", 0.3)
        la.set_active(ours, ["t1", "t2"])
        stacked = ours(x).logits
    torch.testing.assert_close(combined, stacked, atol=1e-5, rtol=1e-5)
    la.set_scale(ours, "t1", 1.0)
    la.set_scale(ours, "t2", 1.0)
    # The combination is an ordinary LoRA: it trains, merges and saves.
    la.set_active(ours, "ab")
    la.set_trainable(ours, "ab")
    ours(x).logits.sum().backward()
    grads = [n for n, p in ours.named_parameters() if p.grad is not None]
    assert grads and all(".adapter.ab." in n for n in grads)
    la.merge(ours, names=["ab"])
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, combined, atol=1e-4, rtol=1e-4)
    la.unmerge(ours)


def test_conv_adapters_combine_and_convert_exactly() -> None:
    from tests.helpers import SmallCNN

    torch.manual_seed(0)
    model = SmallCNN().eval()
    la.inject(model, la.LoRAConfig(r=2, alpha=4, target_modules=["conv1", "conv2"]), name="p")
    la.inject(model, la.LoRAConfig(r=4, alpha=4, target_modules=["conv2", "fc"]), name="q")
    la.inject(model, la.LoHaConfig(r=2, alpha=4, target_modules=["conv1", "conv2"], init_weights=False), name="h")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".adapter.p." in n or ".adapter.q." in n:
                p.normal_(0, 0.2)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        la.set_scale(model, "p", 0.5)
        la.set_scale(model, "q", -2.0)
        la.set_active(model, ["p", "q"])
        stacked = model(x)
        la.set_scale(model, "p", 1.0)
        la.set_scale(model, "q", 1.0)
        la.combine(model, {"p": 0.5, "q": -2.0}, name="pq", how="cat")
        la.set_active(model, "pq")
        torch.testing.assert_close(model(x), stacked, atol=1e-5, rtol=1e-5)
        la.set_active(model, "h")
        source = model(x)
        # conv1 ΔW is (8, 3·3·3 = 27), conv2 (16, 8·3·3 = 72): rank 16 holds both.
        report = la.to_lora(model, "h", r=16)
        la.set_active(model, report.name)
        torch.testing.assert_close(model(x), source, atol=1e-5, rtol=1e-5)
    assert report.error < 1e-5


def _loha_pair(decompose: str = "loha"):
    base = tiny_llama(num_hidden_layers=1)
    if decompose == "loha":
        cfg = peft.LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "k_proj", "down_proj"])
    else:
        cfg = peft.LoKrConfig(r=4, alpha=8, target_modules=["q_proj", "k_proj", "down_proj"])
    pm = peft.get_peft_model(copy.deepcopy(base), cfg)
    _randomize_peft(pm, 1)
    return base, pm


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_to_lora_equals_peft_convert_to_lora(method: str, tmp_path) -> None:
    base, pm = _loha_pair(method)
    pm.save_pretrained(tmp_path)
    ours = la.load_peft(copy.deepcopy(base), tmp_path)
    _, state = peft.convert_to_lora(pm, rank=3)
    report = la.to_lora(ours, "default", r=3, name="lora")
    factors = _our_factors(ours, "lora")
    assert sorted(factors) == sorted(report.errors)
    for m, (a, b) in factors.items():
        a0 = state[f"base_model.model.{m}.lora_A.weight"]
        b0 = state[f"base_model.model.{m}.lora_B.weight"]
        torch.testing.assert_close(b @ a, b0 @ a0, atol=1e-5, rtol=1e-4)


def test_to_lora_of_an_adapter_scaled_by_set_scale_equals_peft_convert_to_lora(tmp_path) -> None:
    base, pm = _loha_pair("loha")
    pm.save_pretrained(tmp_path)
    ours = la.load_peft(copy.deepcopy(base), tmp_path)
    _peft_set_scale(pm, "default", 0.25)
    la.set_scale(ours, "default", 0.25)
    _, state = peft.convert_to_lora(pm, rank=3)
    la.to_lora(ours, "default", r=3, name="lora")
    for m, (a, b) in _our_factors(ours, "lora").items():
        a0 = state[f"base_model.model.{m}.lora_A.weight"]
        b0 = state[f"base_model.model.{m}.lora_B.weight"]
        torch.testing.assert_close(b @ a, b0 @ a0, atol=1e-5, rtol=1e-4)
    # At full rank the LoRA (strength 1) acts as the scaled source did.
    report = la.to_lora(ours, "default", r=64, name="full")
    x = token_batch()
    with torch.no_grad():
        scaled = ours(x).logits
        la.set_active(ours, "full")
        torch.testing.assert_close(ours(x).logits, scaled, atol=1e-5, rtol=1e-4)
    assert report.error < 1e-5


def _source_delta(model: nn.Module, module: str, name: str) -> torch.Tensor:
    mod = model.get_submodule(module)
    return mod.adapter[name].delta_weight().reshape(mod.weight.shape[0], -1)


@pytest.mark.parametrize("method", ["loha", "lokr", "adalora"])
def test_to_lora_at_full_rank_equals_the_source_and_reports_the_measured_error(method: str) -> None:
    model = tiny_llama(num_hidden_layers=1)
    cfgs = {
        "loha": la.LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "k_proj"], init_weights=False),
        "lokr": la.LoKrConfig(r=4, alpha=8, target_modules=["q_proj", "k_proj"], init_weights=False),
        "adalora": la.AdaLoRAConfig(init_r=6, target_r=4, total_step=10, target_modules=["q_proj", "k_proj"]),
    }
    la.inject(model, cfgs[method], name="src")
    if method == "adalora":
        with torch.no_grad():
            for n, p in model.named_parameters():
                if ".adapter.src.lora_" in n:
                    p.normal_(0, 0.3)
    x = token_batch()
    with torch.no_grad():
        reference = model(x).logits
    # q_proj is 64x64, k_proj 32x64: rank 64 reproduces both exactly.
    exact = la.to_lora(model, "src", r=64, name="full")
    la.set_active(model, "full")
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, reference, atol=1e-4, rtol=1e-4)
    assert exact.error < 1e-5 and max(exact.errors.values()) < 1e-5
    small = la.to_lora(model, "src", r=2, name="small")
    num = den = 0.0
    for module in small.errors:
        mod = model.get_submodule(module)
        if method == "adalora":
            dw = mod.adapter["src"].delta_weight(mod)
        else:
            dw = mod.adapter["src"].delta_weight()
        layer = mod.adapter["small"]
        approx = layer.lora_B @ layer.lora_A * layer.scale  # (out, in)
        err = (dw - approx).norm().item()
        assert small.errors[module] == pytest.approx(err / dw.norm().item(), rel=1e-4)
        assert small.ranks[module] == 2
        num, den = num + err**2, den + dw.norm().item() ** 2
    assert small.error == pytest.approx(math.sqrt(num / den), rel=1e-4)
    assert 0.01 < small.error < 1


def test_to_lora_energy_threshold_keeps_that_fraction_per_layer() -> None:
    model = tiny_llama(num_hidden_layers=1)
    la.inject(model, la.LoHaConfig(r=4, alpha=8, target_modules=["q_proj"], init_weights=False), name="src")
    report = la.to_lora(model, "src", r=0.9)
    for module, k in report.ranks.items():
        dw = model.get_submodule(module).adapter["src"].delta_weight()
        energy = torch.linalg.svdvals(dw) ** 2
        kept = energy[:k].sum() / energy.sum()
        assert kept >= 0.9 and (k == 1 or energy[: k - 1].sum() / energy.sum() < 0.9)
        assert model.get_submodule(module).adapter[report.name].r == k
        assert report.errors[module] == pytest.approx(math.sqrt(1 - kept.item()), rel=1e-3)


def test_readme_combining_block_runs_as_written() -> None:
    """The README's "Combining, converting, and PEFT directories" block, executed as written."""
    import contextlib
    import io
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    body = text.split("### Combining, converting", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```python\n(.*?)```", body, flags=re.S)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(block, "README.md", "exec"), {})  # noqa: S102 - the README's own code
    assert out.getvalue().splitlines() == [
        "4 True",
        "['adapter_config.json', 'adapter_model.safetensors', 'b', 'c', 'c_lora', 'mix']",
        "['default', 'mix'] ['mix']",
    ]
