"""BOFT against PEFT 0.21: adapters move both ways through the PEFT format with equal outputs.

PEFT runs more than one butterfly factor only through its CUDA extension. For m > 1 the tests install a
pure-PyTorch stand-in for that extension's block-diagonal kernel (``_fbd_stand_in``), so PEFT's own
permutation and product code runs on CPU; without it PEFT silently falls back to m = 1, which is tested too.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from peft import BOFTConfig as PeftBOFTConfig
from peft import PeftModel, get_peft_model
from peft.tuners.boft import layer as peft_boft_layer

import lightning_adapters as la
from lightning_adapters.methods.boft import butterfly_permutation
from tests.helpers import SmallCNN, randomize_adapter, tiny_bert, tiny_llama, token_batch


def _images():
    return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


MODELS = {
    "llama": (tiny_llama, lambda: token_batch(128)),
    "bert": (tiny_bert, lambda: token_batch(128)),
    "cnn": (SmallCNN, _images),
}

# (model, PEFT BOFTConfig kwargs): block size / block num, m = 1 everywhere and m > 1 through the stand-in.
CASES = {
    "llama-b4": ("llama", dict(boft_block_size=4, target_modules=["q_proj", "v_proj"])),
    "llama-n8": ("llama", dict(boft_block_size=0, boft_block_num=8, target_modules=["q_proj", "down_proj"])),
    "bert-b4-all": ("bert", dict(boft_block_size=4, target_modules=["query", "key", "value", "dense"])),
    "bert-n4": ("bert", dict(boft_block_size=0, boft_block_num=4, target_modules=["value", "intermediate.dense"])),
    "cnn-b3": ("cnn", dict(boft_block_size=3, target_modules=["conv1", "conv2"])),
    "llama-b4-m2": ("llama", dict(boft_block_size=4, boft_n_butterfly_factor=2, target_modules=["q_proj", "o_proj"])),
    "bert-n8-m3": (
        "bert",
        dict(boft_block_size=0, boft_block_num=8, boft_n_butterfly_factor=3, target_modules=["query", "output.dense"]),
    ),
}


class _FbdStandIn:
    """PEFT's ``fbd_cuda`` interface in plain PyTorch: (N, D, b, b) blocks <-> (N, D·b, D·b) block diagonals."""

    @staticmethod
    def forward(blocks):
        return [torch.stack([torch.block_diag(*factor.unbind(0)) for factor in blocks])]

    @staticmethod
    def backward(grad, blocks):
        n, d, b, _ = blocks.shape
        idx = torch.arange(d)
        g = grad.reshape(n, d, b, d, b)[:, idx, :, idx, :]  # (D, N, b, b): the diagonal blocks
        return [g.permute(1, 0, 2, 3).contiguous()]


@pytest.fixture
def fbd_stand_in(monkeypatch):
    monkeypatch.setattr(peft_boft_layer, "_FBD_CUDA", _FbdStandIn())


def _randomize_peft(model, seed=0, std=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * std)


def _out(model, x):
    if x.dim() == 4:
        return model(x)
    # The last hidden state: Bert's classification logits are too small to tell adapters apart.
    return model(x, output_hidden_states=True).hidden_states[-1]


def _ours_config(kw):
    fields = ("boft_block_size", "boft_block_num", "boft_n_butterfly_factor")
    return la.BOFTConfig(target_modules=kw["target_modules"], **{k: kw[k] for k in fields if k in kw})


@pytest.mark.parametrize("case", list(CASES))
def test_peft_to_ours(case, tmp_path, fbd_stand_in):
    model_name, kw = CASES[case]
    make, make_x = MODELS[model_name]
    torch.manual_seed(0)
    base, x = make().eval(), make_x()
    peft_model = get_peft_model(copy.deepcopy(base), PeftBOFTConfig(**kw)).eval()
    _randomize_peft(peft_model)
    expected = _out(peft_model, x)
    peft_model.save_pretrained(tmp_path)
    ours = la.load_peft(copy.deepcopy(base), tmp_path).eval()
    layer = next(m.adapter.default for m in ours.modules() if hasattr(m, "adapter"))
    assert layer.m == kw.get("boft_n_butterfly_factor", 1)
    got = _out(ours, x)
    assert torch.allclose(got, expected, atol=2e-5), (got - expected).abs().max()
    assert not torch.allclose(_out(base, x), expected, atol=1e-3)


@pytest.mark.parametrize("case", list(CASES))
def test_ours_to_peft(case, tmp_path, fbd_stand_in):
    model_name, kw = CASES[case]
    make, make_x = MODELS[model_name]
    torch.manual_seed(0)
    base, x = make().eval(), make_x()
    ours = la.inject(copy.deepcopy(base), _ours_config(kw))
    randomize_adapter(ours, seed=1)
    expected = _out(ours, x)
    la.save_peft(ours, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "BOFT"
    assert saved["boft_n_butterfly_factor"] == kw.get("boft_n_butterfly_factor", 1)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    got = _out(peft_model, x)
    assert torch.allclose(got, expected, atol=2e-5), (got - expected).abs().max()


def test_peft_cpu_fallback_to_one_factor_loads_what_was_trained(tmp_path):
    """Without the extension PEFT trains m = 1 but writes m = 2; load_peft follows the tensors, with a warning."""
    torch.manual_seed(0)
    base, x = tiny_llama(), token_batch(128)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(
            copy.deepcopy(base), PeftBOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2, target_modules=["q_proj"])
        ).eval()
    _randomize_peft(peft_model)
    expected = _out(peft_model, x)
    peft_model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["boft_n_butterfly_factor"] == 2
    with pytest.warns(UserWarning, match="boft_n_butterfly_factor=2 but its tensors hold 1"):
        ours = la.load_peft(copy.deepcopy(base), tmp_path).eval()
    assert la.config_of(ours).boft_n_butterfly_factor == 1
    assert torch.allclose(_out(ours, x), expected, atol=2e-5)


def test_permutations_are_peft_s():
    helper = peft_boft_layer.BOFTLayer.__new__(peft_boft_layer.BOFTLayer)
    for d, b, m in [(32, 4, 3), (48, 6, 2), (64, 2, 5)]:
        n = d // b
        for i in range(m):
            theirs = helper.block_butterfly_perm(d, n // 2**i, b // 2, m - 1)
            assert torch.equal(butterfly_permutation(d, b, i), theirs), (d, b, m, i)


def test_gradients_match_peft(tmp_path, fbd_stand_in):
    torch.manual_seed(0)
    base, x = tiny_llama(), token_batch(128)
    kw = dict(boft_block_size=4, boft_n_butterfly_factor=2, target_modules=["q_proj", "v_proj", "down_proj"])
    peft_model = get_peft_model(copy.deepcopy(base), PeftBOFTConfig(**kw))
    _randomize_peft(peft_model)
    peft_model.save_pretrained(tmp_path)
    ours = la.load_peft(copy.deepcopy(base), tmp_path)
    peft_model.train()
    ours.train()
    peft_model(x, labels=x).loss.backward()
    ours(x, labels=x).loss.backward()
    theirs = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    for name, g in ((n, p.grad) for n, p in ours.named_parameters() if p.requires_grad):
        module, _, param = name.rpartition(".adapter.default.")
        ref = theirs[f"base_model.model.{module}.{param}.default"]
        assert (g - ref).norm() / ref.norm() < 1e-4, name


def test_merge_matches_peft_merge_and_unload(tmp_path):
    torch.manual_seed(0)
    base, x = SmallCNN().eval(), _images()
    kw = dict(boft_block_size=3, target_modules=["conv1", "conv2"])
    peft_model = get_peft_model(copy.deepcopy(base), PeftBOFTConfig(**kw))
    _randomize_peft(peft_model)
    peft_model.save_pretrained(tmp_path)
    merged = peft_model.merge_and_unload().eval()
    plain = la.eject(la.load_peft(copy.deepcopy(base), tmp_path), merge=True)
    for k, v in merged.state_dict().items():
        assert torch.allclose(plain.state_dict()[k], v, atol=1e-6), k
    assert torch.allclose(plain(x), merged(x), atol=2e-5)
