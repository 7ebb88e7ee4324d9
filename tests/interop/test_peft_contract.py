"""The contract of ``save_peft`` / ``load_peft`` / ``read_peft_dir`` on small models: a whole-model method
(Llama-Adapter) both ways against PEFT's own files, a second adapter loaded next to a first one, the JSON layout of
nested config objects, what ``safe`` and ``save_dtype`` leave alone, and the refusals (each naming the bad value).
Found by mutation testing (docs/MUTATION.md, the full interop sweep).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import AdaptionPromptConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from safetensors import safe_open
from torch import nn

import lightning_adapters as la
from lightning_adapters.errors import AdapterConfigError, AdapterStateError
from lightning_adapters.interop.peft import peft_config_dict, peft_tensors
from tests.helpers import tiny_llama
from tests.peft_parity.test_options import _edit_config, _write_peft

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


def _file_tensors(directory) -> dict[str, torch.Tensor]:
    with safe_open(str(directory / WEIGHTS), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _lora(**kw) -> la.LoRAConfig:
    return la.LoRAConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"], **kw)


def _randomized(model: nn.Module, seed: int = 3) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


# --- a whole-model method: Llama-Adapter -------------------------------------------------------------------------


def test_llama_adapter_loads_peft_files_and_saves_them_back_unchanged(tmp_path):
    """PEFT's adaption-prompt files load (same logits as PEFT's model) and ``save_peft`` writes back the same tensors
    under the same keys and the same config fields PEFT wrote."""
    torch.manual_seed(0)
    base = tiny_llama()
    pm = get_peft_model(copy.deepcopy(base), AdaptionPromptConfig(adapter_len=3, adapter_layers=1))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in pm.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g))
    pm.save_pretrained(tmp_path / "peft")

    model = la.load_peft(copy.deepcopy(base), tmp_path / "peft")
    x = torch.arange(6).reshape(1, 6)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, pm(x).logits)

    la.save_peft(model, tmp_path / "ours")
    theirs, ours = _file_tensors(tmp_path / "peft"), _file_tensors(tmp_path / "ours")
    assert set(ours) == set(theirs)
    for k in theirs:
        assert torch.equal(ours[k], theirs[k]), k
    peft_cfg = json.loads((tmp_path / "peft" / CONFIG).read_text())
    our_cfg = json.loads((tmp_path / "ours" / CONFIG).read_text())
    for field in ("peft_type", "adapter_len", "adapter_layers", "target_modules"):
        assert our_cfg[field] == peft_cfg[field], field

    # And PEFT loads ours back to the same outputs.
    back = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, pm(x).logits)


# --- several adapters ----------------------------------------------------------------------------------------------


def test_loading_a_second_adapter_leaves_the_first_ones_values(tmp_path):
    base, _ = _write_peft("LORA", tmp_path / "b", r=2, lora_alpha=4)
    model = la.inject(copy.deepcopy(base), la.LoRAConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"]))
    _randomized(model, seed=5)
    before = peft_tensors(model, "default")
    la.load_peft(model, tmp_path / "b", name="second")
    after = peft_tensors(model, "default")
    assert set(after) == set(before)
    for k in before:
        assert torch.equal(after[k], before[k]), k
    # And the second holds the file's values.
    file = _file_tensors(tmp_path / "b")
    second = peft_tensors(model, "second")
    assert set(second) == set(file)
    for k in file:
        assert torch.equal(second[k], file[k]), k


def test_without_a_name_several_adapters_are_refused_by_name(tmp_path):
    base, _ = _write_peft("LORA", tmp_path / "a", r=2, lora_alpha=4)
    model = la.load_peft(copy.deepcopy(base), tmp_path / "a")
    la.load_peft(model, tmp_path / "a", name="other")
    with pytest.raises(AdapterConfigError, match=r"several adapters \['default', 'other'\].*name="):
        peft_tensors(model)
    with pytest.raises(AdapterConfigError, match=r"several adapters"):
        peft_config_dict(model)


def test_an_unknown_adapter_name_is_refused_naming_save_peft(tmp_path):
    base, _ = _write_peft("LORA", tmp_path / "a", r=2, lora_alpha=4)
    model = la.load_peft(copy.deepcopy(base), tmp_path / "a")
    with pytest.raises(AdapterConfigError, match=r"^save_peft\b.*'missing'"):
        peft_tensors(model, "missing")


def test_adapters_on_two_sub_modules_are_refused(tmp_path):
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Sequential(nn.Linear(4, 4))
            self.b = nn.Sequential(nn.Linear(4, 4))

    model = Two()
    la.inject(model.a, la.LoRAConfig(r=2, target_modules=["0"]))
    la.inject(model.b, la.LoRAConfig(r=2, target_modules=["0"]))
    with pytest.raises(AdapterConfigError, match=r"several sub-modules \['a', 'b'\]"):
        la.save_peft(model, tmp_path / "x")


# --- the written files ---------------------------------------------------------------------------------------------


def test_nested_config_objects_are_written_with_sorted_keys(tmp_path):
    """PEFT's ``save_pretrained`` sorts keys at every depth; a rank pattern given out of order is written sorted."""
    base, _ = _write_peft("LORA", tmp_path / "p", r=2, lora_alpha=4)
    cfg = _lora(rank_pattern={"v_proj": 3, "q_proj": 1})
    model = la.inject(copy.deepcopy(base), cfg)
    la.save_peft(model, tmp_path / "ours")
    text = (tmp_path / "ours" / CONFIG).read_text()
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"
    assert list(json.loads(text)["rank_pattern"]) == sorted(json.loads(text)["rank_pattern"])


def test_save_writes_non_finite_values_unless_safe(tmp_path):
    base, _ = _write_peft("LORA", tmp_path / "p", r=2, lora_alpha=4)
    model = la.load_peft(copy.deepcopy(base), tmp_path / "p")
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if p.requires_grad).fill_(float("nan"))
    la.save_peft(model, tmp_path / "written")  # safe defaults to False: written as it is
    assert any(torch.isnan(t).any() for t in _file_tensors(tmp_path / "written").values())
    with pytest.raises(AdapterStateError, match="non-finite"):
        la.save_peft(model, tmp_path / "refused", safe=True)


def test_save_dtype_casts_floats_only(tmp_path):
    """An integer buffer of a ``modules_to_save`` module (BatchNorm's step count) keeps its integer dtype."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q_proj = nn.Linear(4, 4)
            self.norm = nn.BatchNorm1d(4)

    torch.manual_seed(0)
    model = la.inject(Net(), la.LoRAConfig(r=2, target_modules=["q_proj"], modules_to_save=["norm"]))
    la.save_peft(model, tmp_path / "h", save_dtype=torch.float16)
    tensors = _file_tensors(tmp_path / "h")
    assert tensors["base_model.model.norm.num_batches_tracked"].dtype == torch.int64
    assert tensors["base_model.model.norm.weight"].dtype == torch.float16


# --- load_peft refusals and folders --------------------------------------------------------------------------------


@pytest.mark.parametrize("directory", ["", "   "])
def test_a_blank_directory_is_refused_as_a_config_error(directory):
    with pytest.raises(AdapterConfigError, match="directory must be the path"):
        la.load_peft(nn.Sequential(nn.Linear(2, 2)), directory)


def test_a_directory_that_is_not_a_path_is_refused_for_a_named_adapter_too():
    with pytest.raises(AdapterConfigError, match=r"directory must be the path.*got 5"):
        la.load_peft(nn.Sequential(nn.Linear(2, 2)), 5, name="other")


def test_an_empty_directory_names_the_config_file_and_no_sub_folders(tmp_path):
    with pytest.raises(AdapterStateError) as err:
        la.load_peft(nn.Sequential(nn.Linear(2, 2)), tmp_path)
    assert str(err.value).endswith(f"a PEFT adapter directory holds {CONFIG}")


def test_non_finite_values_load_with_check_finite_off(tmp_path):
    base, _ = _write_peft("LORA", tmp_path / "p", r=2, lora_alpha=4)
    t = _file_tensors(tmp_path / "p")
    key = sorted(t)[0]
    t[key] = torch.full_like(t[key], float("nan"))
    from safetensors.torch import save_file

    save_file(t, str(tmp_path / "p" / WEIGHTS), metadata={"format": "pt"})
    with pytest.raises(AdapterStateError, match="non-finite|NaN"):
        la.load_peft(copy.deepcopy(base), tmp_path / "p")
    model = la.load_peft(copy.deepcopy(base), tmp_path / "p", check_finite=False)
    assert torch.isnan(peft_tensors(model)[key]).all()


def test_nested_modules_of_the_same_name_load(tmp_path):
    """Keys that fit the model are not mistaken for a file saved from a larger model, even where dropping the first
    name of a key also gives a module of the model (``0.0`` inside ``0``)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Sequential(nn.Linear(4, 4)))
    model = la.inject(copy.deepcopy(net), la.LoRAConfig(r=2, target_modules=["0.0"]))
    _randomized(model)
    la.save_peft(model, tmp_path / "n")
    back = la.load_peft(copy.deepcopy(net), tmp_path / "n")
    x = torch.randn(2, 4)
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x))


def test_a_file_from_a_larger_model_names_the_sub_module_and_what_lies_beside_it(tmp_path):
    """Keys under ``backbone.`` fit the bare model; ``aaa.proj.weight`` beside them fits nothing: the refusal names
    ``backbone`` (not the first name in order) and ``aaa`` (the first name of the key beside it)."""
    torch.manual_seed(0)
    outer = nn.Module()
    outer.backbone = nn.Sequential(nn.Linear(4, 4))
    la.inject(outer, la.LoRAConfig(r=2, target_modules=["backbone.0"]))
    la.save_peft(outer, tmp_path / "big")
    t = _file_tensors(tmp_path / "big")
    t["base_model.model.aaa.proj.weight"] = torch.zeros(2, 2)
    from safetensors.torch import save_file

    save_file(t, str(tmp_path / "big" / WEIGHTS), metadata={"format": "pt"})
    _edit_config(tmp_path / "big", target_modules=["0"])
    with pytest.raises(AdapterStateError, match=r"sub-module 'backbone'.*holds \['aaa'\] beside it"):
        la.load_peft(nn.Sequential(nn.Linear(4, 4)), tmp_path / "big")


def test_a_pickled_adapter_saved_on_a_gpu_loads_onto_the_cpu(tmp_path, monkeypatch):
    """PEFT's ``save_pretrained(safe_serialization=False)`` of a model on a GPU pickles storages tagged ``cuda:0``.
    ``read_peft_dir`` maps them to the CPU (on a machine without CUDA too) and the adapter holds PEFT's values."""
    import torch.serialization as serialization

    from lightning_adapters.interop.peft import read_peft_dir
    from tests.peft_parity.test_options import _peft_config, _randomize, tiny

    base = tiny()
    pm = get_peft_model(copy.deepcopy(base), _peft_config("LORA", r=2, lora_alpha=4)).eval()
    _randomize(pm)
    with monkeypatch.context() as m:
        m.setattr(serialization, "location_tag", lambda storage: "cuda:0")  # torch.save's tag of a CUDA storage
        pm.save_pretrained(tmp_path, safe_serialization=False)
    assert b"cuda:0" in (tmp_path / "adapter_model.bin").read_bytes()
    _, tensors = read_peft_dir(tmp_path)
    assert {t.device.type for t in tensors.values()} == {"cpu"}
    model = la.load_peft(copy.deepcopy(base), tmp_path)
    theirs, ours = get_peft_model_state_dict(pm), peft_tensors(model)
    assert set(ours) == set(theirs)
    for k in theirs:
        assert torch.equal(ours[k], theirs[k]), k


def test_bias_keys_of_a_modules_to_save_wrapper_are_refused_when_no_bias_is_trained(tmp_path):
    """PEFT writes ``<m>.modules_to_save.bias`` and ``<m>.original_module.bias`` only with ``bias="all"``. The same
    file under a config that trains no bias holds two keys the adapter does not have: refused, naming both."""
    import peft

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 3))
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0"], modules_to_save=["1"], bias="all")
    get_peft_model(copy.deepcopy(net), cfg).save_pretrained(tmp_path)
    assert {"base_model.model.1.modules_to_save.bias", "base_model.model.1.original_module.bias"} <= set(
        _file_tensors(tmp_path)
    )
    _edit_config(tmp_path, bias="none")
    model = copy.deepcopy(net)
    with pytest.raises(
        AdapterStateError,
        match=r"does not fit the model: unexpected keys \['1.modules_to_save.bias', '1.original_module.bias'\]\.",
    ):
        la.load_peft(model, tmp_path)
    assert set(model.state_dict()) == set(net.state_dict())  # the adapter injected for the load is removed


def test_a_base_weight_in_the_file_that_overflows_the_model_s_fp16_weight_is_refused(tmp_path):
    """A ``<module>.base_layer.weight`` (PEFT's ``save_embedding_layers``) is checked against the model's own fp16
    weight: 1e5 fits the file's float32 but overflows float16, so the load is refused and the weight kept."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    net = nn.Sequential(nn.Embedding(8, 4)).half()
    la.save_peft(la.inject(copy.deepcopy(net), la.LoRAConfig(r=2, target_modules=["0"])), tmp_path)
    t = _file_tensors(tmp_path)
    big = torch.zeros(8, 4)
    big[3, 1] = 1e5
    t["base_model.model.0.base_layer.weight"] = big
    save_file(t, str(tmp_path / WEIGHTS), metadata={"format": "pt"})
    model = copy.deepcopy(net)
    with pytest.raises(AdapterStateError, match=r"0\.base_layer\.weight: 1 values overflow to inf as float16"):
        la.load_peft(model, tmp_path)
    assert torch.equal(model[0].weight, net[0].weight)


def test_a_refused_peft_field_names_the_config_file(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4))
    la.save_peft(la.inject(copy.deepcopy(net), la.LoRAConfig(r=2, target_modules=["0"])), tmp_path)
    _edit_config(tmp_path, use_qalora=True)
    with pytest.raises(AdapterConfigError) as err:
        la.load_peft(copy.deepcopy(net), tmp_path)
    assert str(err.value).startswith(f"{tmp_path / CONFIG}: ") and "use_qalora=True" in str(err.value)


def test_a_method_s_load_hook_gets_the_file_s_config_fields(tmp_path, monkeypatch):
    """``prepare_peft_load(config, fields, tensors)`` (the hook a method, e.g. one from a plugin package, adjusts its
    config with) receives the fields of ``adapter_config.json`` as read from the file."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4))
    la.save_peft(la.inject(copy.deepcopy(net), la.LoRAConfig(r=2, target_modules=["0"])), tmp_path)
    method = la.get_method("lora")
    seen = []

    def hook(config, fields, tensors):
        seen.append(fields)
        return type(method).prepare_peft_load(config, fields, tensors)

    monkeypatch.setattr(method, "prepare_peft_load", hook)
    la.load_peft(copy.deepcopy(net), tmp_path)
    assert seen == [json.loads((tmp_path / CONFIG).read_text())]
