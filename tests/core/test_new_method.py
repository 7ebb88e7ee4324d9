"""Adding a method touches only its own file: a toy method (``toy_method.py``) outside the library is discovered,
injects, trains, saves and loads, and keeps the contract suite's rules, with no library file edited.

The toy is copied into a temporary folder and imported from there; each test works on a copy of the registry, so
the library's registry (and the other tests' ``available_methods()``) never sees it.
"""

from __future__ import annotations

import importlib
import shutil
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import lightning_adapters as la
import lightning_adapters.methods
from lightning_adapters import registry
from tests.helpers import ContractCase

TOY = Path(__file__).with_name("toy_method.py")


@pytest.fixture
def own_registry(monkeypatch: pytest.MonkeyPatch):
    """A copy of the registry with the built-in methods, put back (with ``sys.modules``) after the test."""
    registry.available_methods()
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    before = set(sys.modules)
    yield registry
    for name in set(sys.modules) - before:
        if "toy" in name:
            del sys.modules[name]


def _plugin_dir(root: Path, module: str, entry: str | None = None) -> Path:
    """``root`` holding ``<module>.py`` (the toy) and, with ``entry``, an installed distribution whose
    ``lightning_adapters.methods`` entry point ``toy`` names ``entry``."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(TOY, root / f"{module}.py")
    if entry is not None:
        info = root / "toy_plugin-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-plugin\nVersion: 0.1\n")
        (info / "entry_points.txt").write_text(f"[{registry.ENTRY_POINT_GROUP}]\ntoy = {entry}\n")
    return root


def _toy(own_registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The toy module, imported from a temporary folder on ``sys.path``."""
    monkeypatch.syspath_prepend(str(_plugin_dir(tmp_path / "plugin", "toy_scale_plugin")))
    return importlib.import_module("toy_scale_plugin")


# --- discovery -------------------------------------------------------------------------------------------------


def test_a_method_file_in_the_methods_folder_is_discovered(own_registry, tmp_path, monkeypatch) -> None:
    folder = _plugin_dir(tmp_path / "more_methods", "toy_folder")
    monkeypatch.setattr(lightning_adapters.methods, "__path__", [*lightning_adapters.methods.__path__, str(folder)])
    monkeypatch.setattr(registry, "_BUILTIN_LOADED", False)
    assert "lightning_adapters.methods.toy_folder" in registry.method_modules()
    assert "toy_scale" in la.available_methods()
    cls = la.get_method("toy_scale").config_cls
    assert cls.__module__ == "lightning_adapters.methods.toy_folder"
    assert registry.builtin_configs()["ToyScaleConfig"] is cls


@pytest.mark.parametrize("entry", ["toy_ep_module", "toy_ep_module:METHOD"], ids=["module", "object"])
def test_a_method_in_another_package_is_discovered_through_its_entry_point(
    own_registry, tmp_path, monkeypatch, entry
) -> None:
    site = _plugin_dir(tmp_path / "site", "toy_ep_module", entry)
    if entry.endswith(":METHOD"):  # a module that only defines the method object: the registry registers it
        source = (site / "toy_ep_module.py").read_text()
        (site / "toy_ep_module.py").write_text(
            source.replace("register(ToyScaleMethod())", "METHOD = ToyScaleMethod()")
        )
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(registry, "_PLUGINS_LOADED", False)
    names = la.available_methods()
    assert names[-1] == "toy_scale" and names.count("toy_scale") == 1
    assert la.get_method("toy_scale").config_cls.__module__ == "toy_ep_module"
    assert "ToyScaleConfig" not in registry.builtin_configs()  # plugins keep their configs in their own package


def test_an_entry_point_that_fails_to_import_is_named(own_registry, tmp_path, monkeypatch) -> None:
    site = _plugin_dir(tmp_path / "site", "toy_broken", "toy_broken")
    (site / "toy_broken.py").write_text("raise ImportError('needs a package that is not installed')\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(registry, "_PLUGINS_LOADED", False)
    with pytest.raises(la.AdapterConfigError, match=r"entry point 'toy' = 'toy_broken' of toy-plugin failed.*not"):
        la.available_methods()


def test_register_refuses_what_is_not_a_method(own_registry) -> None:
    with pytest.raises(la.AdapterConfigError, match="neither a LayerMethod nor a ModelMethod"):
        registry.register(object())

    class NoTypes(registry.LayerMethod):
        name, config_cls, peft_type = "toy_incomplete", la.LoRAConfig, "TOY"

        def create_layer(self, base, config, module_name):  # noqa: ANN001, ANN201 - a deliberately broken method
            raise AssertionError

        config_to_peft = config_from_peft = create_layer

    with pytest.raises(la.AdapterConfigError, match=r"NoTypes does not set \['supported_types'\]"):
        registry.register(NoTypes())
    with pytest.raises(la.AdapterConfigError, match="'lora' is already registered"):
        registry.register(type(la.get_method("lora"))())


# --- the toy in use, through the public API and the contract suite --------------------------------------------


class TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def _pair(seed: int = 0) -> tuple[TwoLayers, torch.Tensor]:
    torch.manual_seed(seed)
    return TwoLayers(), torch.randn(5, 6)


def test_the_toy_injects_trains_saves_and_loads(own_registry, tmp_path, monkeypatch) -> None:
    toy = _toy(own_registry, tmp_path, monkeypatch)
    model, x = _pair()
    base_out = model(x)
    la.inject(model, toy.ToyScaleConfig(target_modules=["fc1", "fc2"], lr_scale=0.5))
    assert torch.equal(model(x), base_out)  # g = 0: the base model
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "fc1.adapter.default.g",
        "fc2.adapter.default.g",
    }
    assert "ToyScaleLayer" in la.summary(model)

    # One SGD step: the closed form of fc2's gradient (y = (1 + g) ⊙ h) is Σ_rows dL/dy ⊙ h.
    target = torch.randn(5, 3)
    out = model(x)
    loss = (out - target).pow(2).mean()
    loss.backward()
    h = model.fc2._la_base_forward(torch.relu(model.fc1(x))).detach()
    torch.testing.assert_close(model.fc2.adapter.default.g.grad, (2 * (out - target) / out.numel() * h).sum(0).detach())
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.5 * p.grad
    trained = model(x).detach()
    assert (trained - target).pow(2).mean() < loss

    sd = {k: v.clone() for k, v in la.adapter_state_dict(model).items()}
    assert set(sd) == {"fc1.adapter.default.g", "fc2.adapter.default.g"}
    fresh, _ = _pair()
    la.load_adapter_state_dict(la.inject(fresh, toy.ToyScaleConfig(target_modules=["fc1", "fc2"])), sd)
    assert torch.equal(fresh(x), trained)

    la.save_peft(model, tmp_path / "peft")
    loaded, _ = _pair()
    la.load_peft(loaded, tmp_path / "peft")
    assert la.config_of(loaded) == la.config_of(model)  # lr_scale and the targets came back
    assert torch.equal(loaded(x), trained)

    plain = la.eject(loaded, merge=True)
    assert type(plain.fc1) is nn.Linear
    torch.testing.assert_close(plain(x), trained)


CONTRACT = [
    "test_identity_keys_and_trainability",
    "test_merge_unmerge_eject",
    "test_eject_without_merge_is_exact_and_eject_merge_keeps_output",
    "test_state_round_trip",
    "test_gradients_reach_only_adapters",
    "test_merged_forward_runs_exactly_the_base_operators",
]


def test_the_toy_keeps_the_contract_suite(own_registry, tmp_path, monkeypatch) -> None:
    from tests.contract import test_contract

    toy = _toy(own_registry, tmp_path, monkeypatch)
    for layer in ("linear", "linear_odd"):
        case = ContractCase(id=f"toy-{layer}", make_config=lambda t: toy.ToyScaleConfig(target_modules=t), layer=layer)
        for check in CONTRACT:
            getattr(test_contract, check)(case)


def test_the_app_stores_the_toy_schema(own_registry, tmp_path, monkeypatch) -> None:
    from hydra.core.config_store import ConfigStore

    from lightning_adapters.app.store import register_configs

    _toy(own_registry, tmp_path, monkeypatch)
    register_configs()
    stored = ConfigStore.instance().repo["method"]
    try:
        assert "toy_scale_schema.yaml" in stored
    finally:
        stored.pop("toy_scale_schema.yaml", None)
