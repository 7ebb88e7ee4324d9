"""``trainable_token_indices`` (PEFT's TrainableTokens inside LoRA) against PEFT 0.21.

Only the named embedding rows train (the embedding itself stays frozen); a head tied to the embedding reads the
same rows. Files move both ways with equal logits and gradients; merge writes the rows and unmerge restores the
embedding bit for bit.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

import lightning_adapters as la
from tests.helpers import tiny_llama, token_batch

TOKENS = [3, 7, 100]


def _base(tied: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    return tiny_llama(tie_word_embeddings=tied)


def _ids() -> torch.Tensor:
    ids = token_batch(128)
    ids[:, :3] = torch.tensor(TOKENS)  # the trained tokens occur in the batch
    return ids


def _logits_and_grads(model, peft: bool):
    model.zero_grad()
    out = model(input_ids=_ids()).logits
    out.pow(2).mean().backward()
    grads = {}
    for n, p in model.named_parameters():
        if p.grad is not None:
            key = n.replace("base_model.model.", "").replace(".default", "")
            key = key.replace("token_adapter.trainable_tokens_delta", "adapter.delta").replace(".weight", "")
            key = key.replace("adapter.lora_", "lora_")
            grads[key] = p.grad
    return out.detach(), grads


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("form", ["list", "dict"])
def test_peft_to_ours_to_peft(tmp_path, tied, form):
    base = _base(tied)
    tti = TOKENS if form == "list" else {"embed_tokens": TOKENS}
    theirs = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=tti)
    )
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    theirs.save_pretrained(tmp_path / "peft")
    ours = la.load_peft(copy.deepcopy(base), tmp_path / "peft")
    emb = ours.model.embed_tokens
    assert emb.adapter.default.delta.requires_grad and not emb.weight.requires_grad
    assert (getattr(ours.lm_head, "adapter", None) is not None) == tied
    if tied:
        assert ours.lm_head.adapter.default.delta is emb.adapter.default.delta
    y_peft, g_peft = _logits_and_grads(theirs, True)
    y_ours, g_ours = _logits_and_grads(ours, False)
    assert not torch.allclose(y_ours, base(input_ids=_ids()).logits, atol=1e-3)
    torch.testing.assert_close(y_ours, y_peft, atol=1e-5, rtol=1e-5)
    assert g_ours.keys() == g_peft.keys()
    assert "model.embed_tokens.adapter.delta" in g_ours
    for k in g_ours:
        torch.testing.assert_close(g_ours[k], g_peft[k], atol=1e-5, rtol=1e-5)
    # Written back in PEFT's layout and config.
    la.save_peft(ours, tmp_path / "ours")
    a, b = (
        load_file(tmp_path / "peft/adapter_model.safetensors"),
        load_file(tmp_path / "ours/adapter_model.safetensors"),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    cfg = json.loads((tmp_path / "ours/adapter_config.json").read_text())
    assert cfg["trainable_token_indices"] == tti
    again = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    torch.testing.assert_close(again(input_ids=_ids()).logits, y_peft, atol=1e-5, rtol=1e-5)
    # Merge: the rows go into the embedding (and so into the tied head); unmerge restores it exactly.
    before = emb.weight.detach().clone()
    la.merge(ours)
    torch.testing.assert_close(ours(input_ids=_ids()).logits, y_peft, atol=1e-5, rtol=1e-5)
    assert torch.equal(emb.weight[TOKENS], emb.adapter.default.delta.detach())
    la.unmerge(ours)
    assert torch.equal(emb.weight, before)
    merged = la.eject(copy.deepcopy(ours), merge=True)
    torch.testing.assert_close(merged(input_ids=_ids()).logits, y_peft, atol=1e-5, rtol=1e-5)


def test_only_the_listed_rows_change_in_training():
    model = la.inject(_base(False), la.LoRAConfig(r=2, target_modules=["q_proj"], trainable_token_indices=TOKENS))
    emb = model.model.embed_tokens
    start = emb.weight.detach().clone()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    for _ in range(2):
        opt.zero_grad()
        model(input_ids=_ids()).logits.pow(2).mean().backward()
        opt.step()
    assert emb.adapter.default.delta.grad.abs().sum(1).gt(0).all()  # every listed row got a gradient
    la.merge(model)
    changed = (emb.weight != start).any(1).nonzero().reshape(-1).tolist()
    assert changed == TOKENS  # the merged embedding differs from the base on exactly those rows


def test_bad_trainable_token_indices_are_refused():
    with pytest.raises(la.AdapterConfigError, match=r"trainable_token_indices=\[1, 1\] must be a non-empty list"):
        la.LoRAConfig(trainable_token_indices=[1, 1])
    model = _base(False)
    with pytest.raises(la.AdapterConfigError, match=r"trainable_token_indices \[500\] are out of range"):
        la.inject(model, la.LoRAConfig(target_modules=["q_proj"], trainable_token_indices=[3, 500]))
    with pytest.raises(la.TargetError, match=r"'model.embed_tokens' is in trainable_token_indices and also in"):
        la.inject(model, la.LoRAConfig(target_modules=["q_proj", "embed_tokens"], trainable_token_indices=[3]))
    with pytest.raises(la.UnsupportedLayerError, match=r"names 'model.layers.0.self_attn.q_proj', a Linear"):
        la.inject(
            model, la.LoRAConfig(target_modules=["v_proj"], trainable_token_indices={"layers.0.self_attn.q_proj": [3]})
        )
    assert not any(n.endswith("adapter") for n, _ in model.named_modules())
