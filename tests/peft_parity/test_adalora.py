"""AdaLoRA against PEFT 0.21: the whole rank-allocation schedule step by step, and the format both ways."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import AdaLoraConfig, PeftModel, get_peft_model

import lightning_adapters as la
from lightning_adapters.methods.adalora import (
    AdaLoRASchedule,
    RankAllocator,
    adalora_layers,
    orthogonal_regularizer,
    rank_pattern,
)
from tests.helpers import SmallCNN, tiny_gpt2, tiny_llama, token_batch

# One worker runs the whole module, so the shared schedule run below is computed once under xdist.
pytestmark = pytest.mark.xdist_group("adalora_peft")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
SCHEDULE = dict(init_r=6, target_r=2, tinit=2, tfinal=4, deltaT=2, total_step=14, beta1=0.85, beta2=0.85)


def _peft_cfg(**kw):
    return AdaLoraConfig(lora_alpha=8, target_modules=TARGETS, orth_reg_weight=0.5, **{**SCHEDULE, **kw})


def _our_cfg(**kw):
    return la.AdaLoRAConfig(alpha=8.0, target_modules=TARGETS, orth_reg_weight=0.5, **{**SCHEDULE, **kw})


def _peft_pattern(pm) -> dict[str, list[bool]] | None:
    """PEFT's live rank_pattern with keys turned into module names."""
    pattern = pm.peft_config["default"].rank_pattern
    if pattern is None:
        return None
    return {k.replace(".lora_E.default", "").replace(".lora_E", ""): list(v) for k, v in pattern.items()}


def _copy_peft_weights(pm, ours) -> None:
    inner = pm.base_model.model
    with torch.no_grad():
        for name, layer in adalora_layers(ours).items():
            src = inner.get_submodule(name)
            for p in ("lora_A", "lora_B", "lora_E"):
                getattr(layer, p).copy_(getattr(src, p)["default"])


def _max_weight_diff(pm, ours) -> float:
    inner = pm.base_model.model
    worst = 0.0
    for name, layer in adalora_layers(ours).items():
        src = inner.get_submodule(name)
        for p in ("lora_A", "lora_B", "lora_E"):
            worst = max(worst, (getattr(layer, p) - getattr(src, p)["default"]).abs().max().item())
    return worst


def _train_pair(steps: int):
    """Drive PEFT's update_and_allocate, our RankAllocator and our AdaLoRASchedule side by side; yield every step.

    ``ours`` runs the hand-written-loop API (``RankAllocator.step``); ``twin`` the schedule the Lightning
    integration drives (its own loss term, ``after_optimizer_step``); both must follow PEFT.
    """
    torch.manual_seed(0)
    base = tiny_llama()
    ours = la.inject(copy.deepcopy(base), _our_cfg())
    pm = get_peft_model(base, _peft_cfg())
    _copy_peft_weights(pm, ours)
    twin = copy.deepcopy(ours)
    alloc = RankAllocator(ours, la.config_of(ours))
    schedule = AdaLoRASchedule(twin, la.config_of(twin))
    assert schedule.length_unit is None and schedule.start(None) is None  # total_step is in the config
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=0.02) for m in (pm, ours, twin)]
    layers = list(adalora_layers(ours).values())
    for t in range(steps):
        ids = token_batch(128, (4, 12), seed=t)
        # AdaLoraModel.forward adds orth_reg_weight · R_orth to the model's loss itself.
        loss_p = pm.base_model(input_ids=ids, labels=ids).loss
        loss_o = ours(input_ids=ids, labels=ids).loss + 0.5 * orthogonal_regularizer(layers)
        loss_t = twin(input_ids=ids, labels=ids).loss + schedule.loss_term()
        for loss in (loss_p, loss_o, loss_t):
            loss.backward()
        for opt in opts:
            opt.step()
        pm.base_model.update_and_allocate(t)
        budget, _ = alloc.step(t)
        event = schedule.after_optimizer_step(t)
        yield t, pm, ours, alloc, budget, twin, event
        for opt in opts:
            opt.zero_grad()


@pytest.fixture(scope="module")
def schedule_run():
    """One side-by-side run over the whole schedule (17 steps: past the final mask at t = 10)."""
    records = []
    for t, pm, ours, alloc, budget, twin, event in _train_pair(17):
        records.append(
            dict(
                t=t,
                budget=budget,
                event=event,
                twin_pattern=rank_pattern(twin),
                twin_same=all(
                    torch.equal(v, la.adapter_state_dict(twin)[k]) for k, v in la.adapter_state_dict(ours).items()
                ),
                peft_schedule=pm.base_model.rankallocator.budget_schedule(t),
                our_schedule=alloc.budget(t),
                peft=_peft_pattern(pm),
                mine=rank_pattern(ours),
                weight_diff=_max_weight_diff(pm, ours),
                zero_e=[(layer.lora_E == 0).view(-1).tolist() for layer in adalora_layers(ours).values()],
            )
        )
    return dict(records=records, pm=pm, ours=ours, alloc=alloc)


def test_whole_schedule_matches_update_and_allocate(schedule_run) -> None:
    records = schedule_run["records"]
    changes = []
    previous = None
    for r in records:
        t = r["t"]
        assert r["our_schedule"] == r["peft_schedule"], t
        assert r["budget"] == r["peft_schedule"][0], t
        if r["peft"] is None:
            assert all(all(v) for v in r["mine"].values()), t
        else:
            assert r["mine"] == r["peft"], t
        if r["peft"] != previous:
            changes.append(t)
        previous = r["peft"]
        assert r["weight_diff"] < 1e-5, t
    # PEFT's pattern is rewritten at the cubic-phase masks (t = 4, 6, 8) and at the final mask (t = 10).
    assert set(changes) <= {4, 6, 8, 10} and 4 in changes
    final = records[-1]["peft"]
    # The final mask keeps exactly target_r × #matrices triplets (8 matrices) and is re-applied after t = 10.
    assert sum(sum(v) for v in final.values()) == 2 * 8
    assert all(r["mine"] == final for r in records if r["t"] >= 10)
    for r in records[11:]:
        for flags, zero in zip(final.values(), r["zero_e"]):
            assert all(z for keep, z in zip(flags, zero) if not keep)
    assert schedule_run["alloc"].final_pattern is not None


def test_the_schedule_the_integration_drives_follows_update_and_allocate(schedule_run) -> None:
    """``AdaLoRASchedule`` (what AdapterCallback calls) masks as PEFT does and reports each allocation it makes."""
    records = schedule_run["records"]
    for r in records:
        t = r["t"]
        assert r["twin_same"], t  # the same tensors, bit for bit, as the hand-written RankAllocator loop
        assert r["twin_pattern"] == r["mine"], t
        if r["event"] is not None:
            assert r["event"]["adalora/budget"] == r["peft_schedule"][0], t
            assert r["event"]["adalora/kept"] == sum(sum(v) for v in r["twin_pattern"].values()), t
    # Allocation events at the cubic-phase masks and the final mask; none while the final mask is re-applied.
    assert [r["t"] for r in records if r["event"] is not None] == [4, 6, 8, 10]


def test_peft_trained_adapter_loads_through_load_peft(schedule_run, tmp_path) -> None:
    pm = copy.deepcopy(schedule_run["pm"])
    # Prune one matrix entirely, as a tiny budget can: PEFT saves (0, in) tensors for it.
    pattern = pm.peft_config["default"].rank_pattern
    zero_key = next(k for k in pattern if "layers.1.self_attn.k_proj" in k)
    pattern[zero_key] = [False] * SCHEDULE["init_r"]
    pm.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["rank_pattern"]["model.layers.1.self_attn.k_proj.lora_E"] == [False] * 6

    torch.manual_seed(0)
    base = tiny_llama()
    ref = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    ours = la.load_peft(copy.deepcopy(base), tmp_path).eval()
    kept = {n: layer.kept_rank for n, layer in adalora_layers(ours).items()}
    assert kept == {k.replace(".lora_E", ""): sum(v) for k, v in saved["rank_pattern"].items()}
    assert kept["model.layers.1.self_attn.k_proj"] == 0
    ids = token_batch(128, (2, 10), seed=99)
    with torch.no_grad():
        assert torch.allclose(ours(ids).logits, ref(ids).logits, atol=2e-5)


def test_our_export_loads_in_peft(schedule_run, tmp_path) -> None:
    ours = copy.deepcopy(schedule_run["ours"])
    # One matrix pruned to rank 0 on top of the learned final pattern.
    ours.model.layers[0].self_attn.o_proj.adapter.default.apply_mask(torch.zeros(6, dtype=torch.bool))
    la.save_peft(ours, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "ADALORA"
    assert saved["rank_pattern"] == {f"{k}.lora_E": v for k, v in rank_pattern(ours).items()}
    assert saved["rank_pattern"]["model.layers.0.self_attn.o_proj.lora_E"] == [False] * 6
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert tensors["base_model.model.model.layers.0.self_attn.o_proj.lora_A"].shape == (0, 64)
    assert not any("ranknum" in k or "rank_mask" in k for k in tensors)

    torch.manual_seed(0)
    peft_model = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    ours.eval()
    ids = token_batch(128, (2, 10), seed=5)
    with torch.no_grad():
        assert torch.allclose(peft_model(ids).logits, ours(ids).logits, atol=2e-5)


def _images():
    return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "make, targets, make_input",
    [
        (tiny_gpt2, ["c_attn", "c_proj"], lambda: token_batch(128)),
        (SmallCNN, ["conv1", "conv2", "fc"], _images),
    ],
    ids=["gpt2-conv1d", "cnn-conv2d"],
)
def test_conv_layouts_round_trip_with_peft(make, targets, make_input, tmp_path) -> None:
    torch.manual_seed(0)
    base = make().eval()
    ours = la.inject(copy.deepcopy(base), la.AdaLoRAConfig(init_r=4, target_r=2, alpha=6.0, target_modules=targets))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in adalora_layers(ours).values():
            for p in (layer.lora_A, layer.lora_B, layer.lora_E):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            layer.apply_mask(torch.rand(4, generator=g) > 0.4)
    x = make_input()
    out = ours(x)
    out = out.logits if hasattr(out, "logits") else out
    la.save_peft(ours, tmp_path / "ours")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    ref = peft_model(x)
    ref = ref.logits if hasattr(ref, "logits") else ref
    assert torch.allclose(ref, out, atol=2e-5)
    # And back: PEFT's save of that model loads into ours with the same outputs.
    peft_model.save_pretrained(tmp_path / "peft")
    again = la.load_peft(copy.deepcopy(base), tmp_path / "peft")
    out2 = again(x)
    out2 = out2.logits if hasattr(out2, "logits") else out2
    assert torch.allclose(out2, out, atol=2e-5)
