"""Edges of reading and writing PEFT directories that the parity suites do not reach (found by mutation testing,
docs/MUTATION.md): pickled weights read without running code whatever torch's default, and the reason of an
unreadable pickle carried into the refusal.
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

import lightning_adapters as la
from lightning_adapters.errors import AdapterStateError
from tests.peft_parity.test_options import _edit_config, _write_peft

RAN: list[str] = []


def _record_call(tag: str) -> dict:
    """What a malicious pickle would run; records that it ran."""
    RAN.append(tag)
    return {}


class _RunsCodeWhenUnpickled:
    def __reduce__(self):
        return (_record_call, ("unpickled",))


def test_pickled_weights_never_run_code_even_when_torch_defaults_to_full_unpickling(tmp_path, monkeypatch):
    """``adapter_model.bin`` is read with ``weights_only=True`` explicitly: torch < 2.6 (allowed by the dependency
    range) and ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` make full unpickling the default, which would run the file's
    code."""
    base, _ = _write_peft("LORA", tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()
    (tmp_path / "adapter_model.bin").write_bytes(pickle.dumps({"x": _RunsCodeWhenUnpickled()}))
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    RAN.clear()
    model = copy.deepcopy(base)
    with pytest.raises(AdapterStateError, match=r"adapter_model\.bin is not a readable PyTorch state dict"):
        la.load_peft(model, tmp_path)
    assert RAN == []
    assert not list(la.core.inject.find_records(model))


def test_unreadable_pickle_refusal_carries_torchs_reason(tmp_path):
    """The refusal quotes the first line of torch's own error (the independent truth: the same bytes through
    ``torch.load``), not just the exception's class."""
    base, _ = _write_peft("LORA", tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()
    payload = b"\x80\x02not a pickle at all"
    (tmp_path / "adapter_model.bin").write_bytes(payload)
    with pytest.raises(Exception) as torch_err:
        torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    reason = str(torch_err.value).strip().splitlines()[0]
    assert reason and reason != type(torch_err.value).__name__
    with pytest.raises(AdapterStateError) as err:
        la.load_peft(copy.deepcopy(base), tmp_path)
    assert f"({reason})" in str(err.value)


SHARDED_CONFIGS = {
    "lora": lambda: la.LoRAConfig(r=2, alpha=4, target_modules=["0", "2"]),
    # AdaLoRA slices its export to the kept ranks (``export_mask``): the gather must come before the slicing.
    "adalora": lambda: la.AdaLoRAConfig(init_r=3, target_r=2, alpha=4.0, total_step=10, target_modules=["0", "2"]),
}


@pytest.mark.parametrize("method", sorted(SHARDED_CONFIGS))
def test_sharded_dtensor_adapters_are_written_as_plain_full_tensors(tmp_path, method):
    """Under FSDP2 the adapter parameters are DTensor shards; ``save_peft`` gathers each into a plain tensor. Here a
    one-process group shards every trainable parameter (``Shard(0)``): the tensors written and read back equal those
    of the unsharded model, and are plain tensors. For AdaLoRA one rank of the first layer is pruned (its ``E`` is
    0), so the export holds 2 of its 3 ranks."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from lightning_adapters.interop.peft import peft_tensors

    if dist.is_initialized():
        pytest.skip("a process group is already set up in this process")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    la.inject(model, SHARDED_CONFIGS[method]())
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
        if method == "adalora":
            layer = model[0].adapter["default"]
            layer.rank_mask[1] = False
            layer.lora_E[1] = 0.0
    want = peft_tensors(model)
    if method == "adalora":
        assert want["base_model.model.0.lora_E"].shape == (2, 1)
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        for module in model.modules():
            for name, p in list(module.named_parameters(recurse=False)):
                if p.requires_grad:
                    setattr(module, name, torch.nn.Parameter(distribute_tensor(p.detach(), mesh, [Shard(0)])))
        got = peft_tensors(model)
        la.save_peft(model, tmp_path / "out")
    finally:
        dist.destroy_process_group()
    assert got.keys() == want.keys()
    for key, value in got.items():
        assert type(value) is torch.Tensor, key
        assert torch.equal(value, want[key]), key
    _, read = la.interop.peft.read_peft_dir(tmp_path / "out")
    assert {"base_model.model." + k for k in read} == want.keys()
    for key, value in read.items():
        assert torch.equal(value, want["base_model.model." + key]), key


def test_convert_to_lora_of_one_named_adapter_among_several(tmp_path):
    """``save_peft(convert_to_lora=True, names="b")`` on a model holding a plain LoRA ``default`` and a PiSSA ``b``:
    the folder ``b`` holds a plain LoRA that reproduces ``b`` on the *unmodified* base."""
    from tests.helpers import randomize_adapter

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 5)).double()
    model = copy.deepcopy(base)
    la.inject(model, la.LoRAConfig(r=2, alpha=4, target_modules=["0"]))
    la.inject(model, la.LoRAConfig(r=2, alpha=4, target_modules=["2"], init_weights="pissa"), name="b")
    randomize_adapter(model)
    la.set_active(model, "b")
    x = torch.randn(3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    want = model(x)
    la.save_peft(model, tmp_path, convert_to_lora=True, names="b")
    back = la.load_peft(copy.deepcopy(base), tmp_path, name="b")
    assert la.config_of(back, "b").init_weights is True and la.config_of(back, "b").r == 4
    torch.testing.assert_close(back(x), want, rtol=1e-6, atol=1e-6)


def test_all_linear_is_written_as_the_modules_peft_resolves_and_the_base_is_named(tmp_path):
    """``target_modules="all-linear"`` is saved as the resolved module names (the set PEFT itself resolves and
    saves), so any loader adapts the same modules; ``base_model_name_or_path`` is the base config's name."""
    import json

    import peft

    from tests.helpers import tiny_gpt2

    base = tiny_gpt2()
    base.config._name_or_path = "org/tiny-gpt2"
    ours = la.inject(copy.deepcopy(base), la.LoRAConfig(r=2, alpha=4, target_modules="all-linear"))
    la.save_peft(ours, tmp_path / "ours")
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=4, target_modules="all-linear"))
    pm.save_pretrained(tmp_path / "peft")
    mine = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    theirs = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert isinstance(mine["target_modules"], list)
    assert set(mine["target_modules"]) == set(theirs["target_modules"])
    assert mine["base_model_name_or_path"] == "org/tiny-gpt2"


def test_safe_save_writes_finite_adapters_and_refuses_only_non_finite_ones(tmp_path):
    """``safe=True`` refuses NaN/inf (the bad-input table), and writes a finite adapter unchanged."""
    from tests.helpers import randomize_adapter

    torch.manual_seed(0)
    model = la.inject(torch.nn.Sequential(torch.nn.Linear(6, 8)), la.LoRAConfig(r=2, alpha=4, target_modules=["0"]))
    randomize_adapter(model)
    want = la.interop.peft.peft_tensors(model)
    la.save_peft(model, tmp_path / "ok", safe=True)
    _, read = la.interop.peft.read_peft_dir(tmp_path / "ok")
    assert {"base_model.model." + k: v for k, v in read.items()}.keys() == want.keys()
    for key, value in read.items():
        assert torch.equal(value, want["base_model.model." + key])
    with torch.no_grad():
        model[0].adapter.default.lora_B.view(-1)[0] = float("nan")
    with pytest.raises(AdapterStateError, match="non-finite"):
        la.save_peft(model, tmp_path / "bad", safe=True)
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("value", ["lm_head", [1]])
def test_modules_to_save_of_the_wrong_json_type_is_refused_naming_the_file(value, tmp_path):
    """``modules_to_save`` must be a list of names (no regex form, unlike ``target_modules``); the file check names
    the file and the field before anything is built."""
    base, _ = _write_peft("LORA", tmp_path, modules_to_save=["lm_head"])
    _edit_config(tmp_path, modules_to_save=value)
    model = copy.deepcopy(base)
    with pytest.raises(la.AdapterConfigError, match=r"adapter_config\.json: field 'modules_to_save' must be a list"):
        la.load_peft(model, tmp_path)
    assert not list(la.core.inject.find_records(model))


def test_integer_buffers_of_modules_to_save_round_trip(tmp_path):
    """A saved module holding an integer buffer (BatchNorm's ``num_batches_tracked``) loads back: each value is
    checked against the kind of the model tensor it goes into, not against an adapter tensor's float."""
    torch.manual_seed(0)

    def build():
        return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3))

    model = la.inject(build(), la.LoRAConfig(r=2, alpha=4, target_modules=["0"], modules_to_save=["1"]))
    model.train()
    for _ in range(3):
        model(torch.randn(4, 6))
    assert model[1].num_batches_tracked.dtype == torch.int64
    la.save_peft(model, tmp_path)
    back = la.load_peft(build(), tmp_path)
    want, got = model.state_dict(), back.state_dict()
    for key in ("1.num_batches_tracked", "1.running_mean", "1.running_var", "1.weight"):
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key


class _EmbedThenLinear(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(12, 8)
        self.out = torch.nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.emb(ids))


def test_convert_to_lora_of_a_pissa_embedding_applies_to_the_unmodified_base(tmp_path):
    """The conversion pairs each ``A`` with its ``B`` for embeddings too (PEFT's ``lora_embedding_A/B`` keys): the
    written plain LoRA on the unmodified base gives the PiSSA model's outputs."""
    from tests.helpers import randomize_adapter

    torch.manual_seed(0)
    base = _EmbedThenLinear().double()
    config = la.LoRAConfig(r=2, alpha=4, target_modules=["emb", "out"], init_weights="pissa")
    model = la.inject(copy.deepcopy(base), config)
    randomize_adapter(model)
    ids = torch.tensor([[1, 5, 7, 11]])
    want = model(ids)
    la.save_peft(model, tmp_path, convert_to_lora=True)
    back = la.load_peft(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(back(ids), want, rtol=1e-6, atol=1e-6)


def test_a_root_adapter_loads_under_another_name(tmp_path):
    """``load_peft(model, directory, name="b")`` reads ``directory/b`` only when that folder holds an adapter; a
    directory with one adapter at its root loads that one under the new name (documented in ``load_peft``)."""
    from tests.helpers import randomize_adapter

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(6, 8))
    model = la.inject(copy.deepcopy(base), la.LoRAConfig(r=2, alpha=4, target_modules=["0"]))
    randomize_adapter(model)
    la.save_peft(model, tmp_path)
    back = la.load_peft(copy.deepcopy(base), tmp_path, name="b")
    assert la.adapter_names(back) == ["b"]
    x = torch.randn(3, 6)
    torch.testing.assert_close(back(x), model(x))


class _Task(torch.nn.Module):
    """A task model around an encoder, as the training app's export is keyed: ``backbone.*`` and ``head.*``."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8))
        self.head = torch.nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def test_a_file_of_a_larger_model_is_refused_on_its_sub_module_naming_what_is_beside(tmp_path):
    """Saved from the task model (``backbone.*`` adapters, ``head`` in ``modules_to_save``), read onto the bare
    encoder: refused naming the sub-module the keys fit and the module beside it, and nothing is injected."""
    torch.manual_seed(0)
    task = _Task()
    la.inject(task, la.LoRAConfig(r=2, target_modules=["backbone.0", "backbone.2"], modules_to_save=["head"]))
    la.save_peft(task, tmp_path)
    encoder = copy.deepcopy(_Task().backbone)
    with pytest.raises(AdapterStateError) as err:
        la.load_peft(encoder, tmp_path)
    message = str(err.value)
    assert "as its sub-module 'backbone'" in message, message
    assert "it also holds ['head'] beside it" in message, message
    assert "module='backbone'" in message, message
    assert not list(la.core.inject.find_records(encoder))


def _bert(cls_name: str) -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, num_labels=3
    )
    return getattr(transformers, cls_name)(cfg).eval()


@pytest.mark.parametrize(
    ("task", "cls_name"), [("SEQ_CLS", "BertForSequenceClassification"), ("TOKEN_CLS", "BertForTokenClassification")]
)
def test_peft_task_head_names_the_model_lacks_are_skipped_on_load(tmp_path, task, cls_name):
    """PEFT's classification wrappers add ``["classifier", "score"]`` to modules_to_save and write both; BERT has no
    ``score``, which PEFT skips. The file of PEFT's own BERT classification example was refused here."""
    from peft import LoraConfig, PeftModel, get_peft_model

    base = _bert(cls_name)
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["query", "value"], task_type=task)).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)  # the adapter and PEFT's copy of the classifier
    pm.save_pretrained(tmp_path / "peft")
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    want = pm(input_ids=ids).logits
    ours = la.load_peft(copy.deepcopy(base), tmp_path / "peft").eval()
    assert la.config_of(ours).modules_to_save == ["classifier"]
    torch.testing.assert_close(ours(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)
    la.save_peft(ours, tmp_path / "ours")
    back = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    torch.testing.assert_close(back(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(la.TargetError, match=r"modules_to_save entries \['score'\] match no module"):
        la.inject(copy.deepcopy(base), la.LoRAConfig(target_modules=["query"], modules_to_save=["classifier", "score"]))
