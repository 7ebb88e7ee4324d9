"""PEFT's on-disk format against PEFT 0.21.2 itself: the bytes of the files ``save_peft`` writes, the JSON kinds the
config check accepts and names, configs written by a PEFT that left fields out, the hint of a directory holding only
sub-folders, a save of some adapters leaving the others' files alone, and every accepted form of the targeting
fields on modules whose names are prefixes of their siblings' (``fc``/``fc2``, ``layers.1``/``layers.10``),
asserting exact key sets both ways. Found by mutation testing (docs/MUTATION.md, interop sample seed 23).
"""

from __future__ import annotations

import copy
import json
import re

import peft
import pytest
import torch
from safetensors import safe_open
from torch import nn

import lightning_adapters as la
from lightning_adapters.errors import AdapterConfigError, AdapterStateError
from tests.peft_parity.test_options import _edit_config, _write_peft, inputs

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


def _fields_of(directory) -> dict:
    return json.loads((directory / CONFIG).read_text())


def _keys_of(directory) -> set[str]:
    with safe_open(str(directory / WEIGHTS), "pt") as f:
        return set(f.keys())


def _metadata_of(directory) -> dict | None:
    with safe_open(str(directory / WEIGHTS), "pt") as f:
        return f.metadata()


def test_files_are_laid_out_as_peft_writes_them(tmp_path):
    """PEFT -> ours -> disk gives PEFT's own files: the config as PEFT's ``save_pretrained`` formats it (two-space
    indent, sorted keys; ours adds a final newline), every field ours writes present in PEFT's file with PEFT's
    value, every field ours leaves out (but ``auto_mapping``) at PEFT's default, the same tensor keys, and the
    safetensors header PEFT writes (``{"format": "pt"}``)."""
    base, pm = _write_peft("LORA", tmp_path / "peft", modules_to_save=["lm_head"])
    model = la.load_peft(copy.deepcopy(base), tmp_path / "peft")
    la.save_peft(model, tmp_path / "ours")

    theirs_text = (tmp_path / "peft" / CONFIG).read_text()
    ours_text = (tmp_path / "ours" / CONFIG).read_text()
    assert theirs_text == json.dumps(json.loads(theirs_text), indent=2, sort_keys=True)
    assert ours_text == json.dumps(json.loads(ours_text), indent=2, sort_keys=True) + "\n"

    theirs, ours = json.loads(theirs_text), json.loads(ours_text)
    assert set(ours) <= set(theirs)
    assert {k: ours[k] for k in ours} == {k: theirs[k] for k in ours}
    defaults = peft.LoraConfig().to_dict()
    # auto_mapping names the class PEFT's AutoPeftModel rebuilds a custom base from; ignored on load (peft_fields).
    omitted = {k: theirs[k] for k in set(theirs) - set(ours) - {"auto_mapping"}}
    assert omitted == {k: defaults[k] for k in omitted}

    assert _keys_of(tmp_path / "ours") == _keys_of(tmp_path / "peft")
    assert _metadata_of(tmp_path / "ours") == _metadata_of(tmp_path / "peft") == {"format": "pt"}


@pytest.mark.parametrize(
    "value, kind",
    [
        (True, "a boolean"),
        (2.5, "a number"),
        ("4", "a string"),
        ({"q": 4}, "an object"),
        ([4], "a list"),
        (None, "null"),
    ],
)
def test_a_field_of_the_wrong_json_type_is_refused_naming_the_kind_json_read(value, kind, tmp_path):
    """Every JSON kind a wrong ``r`` can hold is named as ``json.loads`` reads it (an array is a Python list)."""
    base, _ = _write_peft("LORA", tmp_path)
    _edit_config(tmp_path, r=value)
    model = copy.deepcopy(base)
    with pytest.raises(AdapterConfigError, match=rf"field 'r' must be an integer, got {re.escape(kind)} \("):
        la.load_peft(model, tmp_path)
    assert not list(la.core.inject.find_records(model))


def test_a_config_written_without_optional_fields_loads_with_pefts_defaults(tmp_path):
    """A file holding only the fields an older PEFT wrote (every other field missing) loads, and equals what PEFT's
    own loader builds from the same file (PEFT fills the missing fields with its defaults)."""
    base, _ = _write_peft("LORA", tmp_path)
    kept = {k: v for k, v in _fields_of(tmp_path).items() if k in ("peft_type", "r", "lora_alpha", "target_modules")}
    (tmp_path / CONFIG).write_text(json.dumps(kept))
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    ours = la.load_peft(copy.deepcopy(base), tmp_path)
    x = inputs()
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-12, atol=1e-12)


def test_a_directory_holding_only_sub_folders_names_them(tmp_path):
    """Adapters not named ``default`` go to sub-folders (PEFT's layout), so the directory itself holds no config:
    loading it without a name is refused, naming the sub-folders to choose from."""
    model = nn.Sequential(nn.Linear(4, 4))
    for name in ("first", "second"):
        la.inject(model, la.LoRAConfig(r=2, target_modules=["0"]), name=name)
    la.save_peft(model, tmp_path)
    assert not (tmp_path / CONFIG).exists()
    with pytest.raises(AdapterStateError, match=r"holds the adapters \['first', 'second'\] in sub-folders"):
        la.load_peft(nn.Sequential(nn.Linear(4, 4)), tmp_path)


class _Siblings(nn.Module):
    """``fc`` beside ``fc2`` and ``model.layers.1`` beside ``model.layers.10``: names that prefix a sibling's."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.fc2 = nn.Linear(8, 8)
        self.model = nn.Module()  # PEFT's layer-index rule wants a name before the layer list's
        self.model.layers = nn.ModuleList(nn.ModuleDict({"proj": nn.Linear(8, 8)}) for _ in range(11))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc2(torch.tanh(self.fc(x)))
        for block in self.model.layers:
            x = x + 0.5 * torch.tanh(block["proj"](x))
        return x


_UP_TO_9 = {f"model.layers.{i}.proj" for i in range(10)}

# PEFT's field values -> the modules PEFT adapts (and saves in full, for modules_to_save), written out by hand.
FORMS = {
    "list": (dict(target_modules=["fc", "model.layers.1.proj"]), {"fc", "model.layers.1.proj"}, set()),
    "regex": (dict(target_modules=r"fc|model\.layers\.1\.proj"), {"fc", "model.layers.1.proj"}, set()),
    "layers_to_transform": (dict(target_modules=["proj"], layers_to_transform=[1]), {"model.layers.1.proj"}, set()),
    "exclude-list": (
        dict(target_modules=["fc", "fc2", "proj"], exclude_modules=["fc2", "model.layers.10.proj"]),
        {"fc"} | _UP_TO_9,
        set(),
    ),
    "exclude-regex": (
        dict(target_modules=r"fc\d?|model\.layers\.\d+\.proj", exclude_modules=r"fc2|model\.layers\.10\.proj"),
        {"fc"} | _UP_TO_9,
        set(),
    ),
    "modules_to_save": (
        dict(target_modules=["fc"], modules_to_save=["fc2", "model.layers.1.proj"]),
        {"fc"},
        {"fc2", "model.layers.1.proj"},
    ),
    # PEFT matches modules_to_save entries as plain string suffixes, not at a dot as target_modules: "c2" saves fc2,
    # "0.proj" saves layers 0 and 10.
    "modules_to_save-string-suffix": (
        dict(target_modules=["fc"], modules_to_save=["c2", "0.proj"]),
        {"fc"},
        {"fc2", "model.layers.0.proj", "model.layers.10.proj"},
    ),
}


def _siblings() -> _Siblings:
    torch.manual_seed(0)
    return _Siblings().double().eval()


def _out_and_grads(model: nn.Module) -> list[torch.Tensor]:
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64, requires_grad=True)
    y = model(x)
    y.square().sum().backward()
    return [y.detach(), x.grad]


@pytest.mark.parametrize("form", list(FORMS))
def test_targeting_fields_in_every_form_select_exactly_pefts_modules_both_ways(form, tmp_path):
    """Each accepted form of ``target_modules`` / ``exclude_modules`` / ``modules_to_save`` / ``layers_to_transform``
    on sibling names that are prefixes of one another: PEFT's file loads onto exactly the modules PEFT adapted (the
    same output and input gradient), ours writes back exactly PEFT's tensor keys and field values, and PEFT loads
    ours with the same output; an adapter injected from our own config with the same fields writes the same keys."""
    fields, adapted, saved = FORMS[form]
    base = _siblings()
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=4, **fields)).eval()
    from tests.peft_parity.test_options import _randomize

    _randomize(pm)
    pm.save_pretrained(tmp_path / "peft")
    prefix = "base_model.model."
    theirs_adapted = {n[len(prefix) :] for n, m in pm.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert theirs_adapted == adapted  # the hand-written truth is PEFT's
    keys = _keys_of(tmp_path / "peft")
    assert {k[len(prefix) :].rsplit(".", 2)[0] for k in keys if ".lora_" in k} == adapted
    assert {k[len(prefix) :].rsplit(".", 1)[0] for k in keys if ".lora_" not in k} == saved  # weight and bias

    ours = la.load_peft(copy.deepcopy(base), tmp_path / "peft")
    assert {n for n, _, _ in la.core.inject.adapted_modules(ours)} == adapted
    for got, want in zip(_out_and_grads(ours), _out_and_grads(pm)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)

    la.save_peft(ours, tmp_path / "ours")
    assert _keys_of(tmp_path / "ours") == keys
    written = _fields_of(tmp_path / "ours")
    for field, value in fields.items():  # a list in any order (PEFT writes its set of names unordered)
        assert sorted(written[field]) == sorted(value) if isinstance(value, list) else written[field] == value, field
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    torch.testing.assert_close(_out_and_grads(back)[0], _out_and_grads(pm)[0], rtol=1e-12, atol=1e-12)

    direct = la.inject(copy.deepcopy(base), la.LoRAConfig(r=2, alpha=4, **fields))
    la.save_peft(direct, tmp_path / "direct")
    assert _keys_of(tmp_path / "direct") == keys


def test_saving_some_adapters_again_rewrites_only_their_folders(tmp_path):
    """``save_peft(names=...)`` rewrites the named adapters' sub-folders only: the ``default`` adapter's files at
    the root and the other sub-folders stay byte for byte those of the earlier save (PEFT's layout keeps every
    adapter in its own place), and the root adapter still loads with its outputs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    for name, target in (("default", "0"), ("b", "1"), ("c", "0")):
        la.inject(model, la.LoRAConfig(r=2, target_modules=[target]), name=name)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_()
    la.save_peft(model, tmp_path)

    def files() -> dict:
        return {str(p.relative_to(tmp_path)): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}

    before = files()
    assert set(before) == {CONFIG, WEIGHTS} | {f"{n}/{f}" for n in ("b", "c") for f in (CONFIG, WEIGHTS)}
    with torch.no_grad():
        model[1].adapter.b.lora_B.add_(1.0)
    la.save_peft(model, tmp_path, names="b")
    after = files()
    assert set(after) == set(before)
    assert {k for k in before if after[k] != before[k]} == {f"b/{WEIGHTS}"}

    fresh = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if ".adapter." not in k})
    la.load_peft(fresh, tmp_path)
    la.set_active(model, "default")
    x = torch.randn(3, 4)
    torch.testing.assert_close(fresh(x), model(x))


def _rewrite_weights(directory, edit) -> None:
    """Rewrite ``adapter_model.safetensors`` as ``edit(tensors)`` with PEFT's header."""
    from safetensors.torch import load_file, save_file

    path = str(directory / WEIGHTS)
    save_file(edit(load_file(path)), path, metadata={"format": "pt"})


def test_a_file_keyed_without_pefts_prefix_loads_as_the_prefixed_one(tmp_path):
    """Keys with or without ``base_model.model.`` are read alike: PEFT's file with the prefix cut from every key
    loads with the outputs and input gradient of the PEFT model that wrote it."""
    base, pm = _write_peft("LORA", tmp_path)
    prefix = "base_model.model."
    _rewrite_weights(tmp_path, lambda t: {k.removeprefix(prefix): v for k, v in t.items()})
    assert not any(k.startswith(prefix) for k in _keys_of(tmp_path))
    ours = la.load_peft(copy.deepcopy(base), tmp_path)
    for got, want in zip(_out_and_grads_tiny(ours), _out_and_grads_tiny(pm)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def _out_and_grads_tiny(model: nn.Module) -> list[torch.Tensor]:
    x = inputs().requires_grad_(True)
    y = model(x)
    y.square().sum().backward()
    return [y.detach(), x.grad]


def test_a_base_weight_for_a_module_only_another_adapter_adapts_is_refused(tmp_path):
    """PEFT writes ``<module>.base_layer.weight`` only for the model's input and output embeddings (those an adapter
    of the saved model wraps). A file carrying one for another module that only an adapter already in the model adapts
    does not fit the adapter being loaded: refused as an unexpected key, the model's weight and adapters left as they
    were."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    la.save_peft(la.inject(copy.deepcopy(base), la.LoRAConfig(r=2, target_modules=["0"])), tmp_path)
    model = la.inject(base, la.LoRAConfig(r=2, target_modules=["1"]), name="a")
    _rewrite_weights(tmp_path, lambda t: {**t, "base_model.model.1.base_layer.weight": torch.zeros(4, 4)})
    weight = model[1].weight.detach().clone()
    with pytest.raises(AdapterStateError, match=r"unexpected keys \['1\.base_layer\.weight'\]"):
        la.load_peft(model, tmp_path, name="b")
    assert torch.equal(model[1].weight, weight)
    assert [r[2].name for r in la.core.inject.find_records(model)] == ["a"]


def test_an_unreadable_pickle_without_a_reason_is_named_by_its_error_class(tmp_path, monkeypatch):
    """When torch's error carries no text, the refusal names its class (here ``EOFError``), not nothing."""
    base, _ = _write_peft("LORA", tmp_path)
    (tmp_path / WEIGHTS).unlink()
    (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x02")

    def load(*args, **kwargs):
        raise EOFError()

    monkeypatch.setattr(torch, "load", load)
    with pytest.raises(AdapterStateError, match=r"is not a readable PyTorch state dict \(EOFError\)"):
        la.load_peft(copy.deepcopy(base), tmp_path)


# Survivors of the held-out interop mutants 121-180 (seed 23), written after they were measured.


def test_a_field_that_loads_as_nothing_is_marked_ignored() -> None:
    from lightning_adapters.interop.peft_fields import IGNORED, LORA_FIELDS, markdown

    assert LORA_FIELDS["task_type"].status == IGNORED and LORA_FIELDS["inference_mode"].status == IGNORED
    assert re.search(r"\| `task_type` \| ignored \|", markdown())


@pytest.mark.parametrize("value", ["mica", "MiCA"])
def test_a_refused_value_of_a_supported_field_is_refused_by_name(value: str) -> None:
    from lightning_adapters.interop.peft_fields import check_peft_fields

    with pytest.raises(
        AdapterConfigError, match=f"^d/adapter_config.json: PEFT LORA option init_lora_weights='{value}'"
    ):
        check_peft_fields("d/adapter_config.json", {"peft_type": "LORA", "init_lora_weights": value})
    check_peft_fields("d/adapter_config.json", {"peft_type": "LORA", "init_lora_weights": "gaussian"})


def test_the_config_file_lists_its_fields_in_sorted_order(tmp_path) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    la.inject(model, la.LoRAConfig(r=2, target_modules=["0", "2"]))
    la.save_peft(model, tmp_path / "a")
    keys = list(json.loads((tmp_path / "a" / "adapter_config.json").read_text()))
    assert keys == sorted(keys) and len(keys) > 10


def test_loading_a_larger_model_s_file_onto_its_sub_module_names_the_directory(tmp_path) -> None:
    torch.manual_seed(0)
    outer = nn.Module()
    outer.backbone = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    la.inject(outer, la.LoRAConfig(r=2, target_modules=["0", "2"]))
    la.save_peft(outer, tmp_path / "a")
    inner = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(AdapterStateError, match=f"^{re.escape(str(tmp_path / 'a'))} was saved from a model that holds"):
        la.load_peft(inner, tmp_path / "a")


def test_the_bias_of_a_module_only_another_adapter_adapts_keeps_its_own_key() -> None:
    from lightning_adapters.interop.peft import peft_tensors

    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    la.inject(model, la.LoRAConfig(r=2, target_modules=["0"], bias="all"), name="a")
    la.inject(model, la.LoRAConfig(r=2, target_modules=["1"]), name="b")
    biases = {k for k in peft_tensors(model, "a") if k.endswith("bias")}
    assert biases == {"base_model.model.0.base_layer.bias", "base_model.model.1.bias"}


@pytest.mark.parametrize("compile_first", [False, True])
def test_a_compiled_model_saves_and_loads_peft_files_as_the_plain_model_does(compile_first, tmp_path):
    from tests.helpers import tiny_llama

    cfg = la.LoRAConfig(r=2, target_modules=["q_proj", "v_proj"], init_weights=False)
    torch.manual_seed(0)
    model = tiny_llama()
    if compile_first:  # injected through the wrapper: the adapters still go into the model it runs
        trained = torch.compile(model, backend="eager")
        la.inject(trained, cfg)
    else:
        trained = torch.compile(la.inject(model, cfg), backend="eager")
    la.save_peft(trained, tmp_path)
    ids = torch.randint(0, 128, (2, 6))
    with torch.no_grad():
        want = trained(input_ids=ids).logits
        torch.manual_seed(0)
        from_peft = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)(input_ids=ids).logits
        torch.manual_seed(0)
        loaded = la.load_peft(torch.compile(tiny_llama(), backend="eager"), tmp_path)
        got = loaded(input_ids=ids).logits
    assert torch.equal(from_peft, want) and torch.equal(got, want)
    la.load_peft(loaded, tmp_path, name="b")  # a second adapter joins the first, in the wrapped model
    assert la.adapter_names(loaded) == ["default", "b"] and la.adapter_names(loaded._orig_mod) == ["default", "b"]
