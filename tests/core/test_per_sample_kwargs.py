"""``per_sample`` hands a module's keyword arguments to the adapters, routed by row like positional ones.

The built-in layers take their input positionally; a method's ``adapted_forward`` may take ``*args, **kwargs``
(the ``AdapterLayer`` signature), so the engine must pass a keyword input on. The toy method of
``tests/core/toy_method.py`` (``(1 + g) ⊙ base(x)``), given such a forward, on a Linear called as
``layer(input=x)``. Truth: each row alone with its adapter active.
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
from lightning_adapters import registry

TOY = Path(__file__).with_name("toy_method.py")


@pytest.fixture
def toy_method(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """The toy module imported from a temporary copy into a copy of the registry, both dropped after the test.

    Importing ``tests/core/toy_method.py`` itself (at collection) would register ``toy_scale`` for the whole
    session and break the discovery tests of ``test_new_method.py``, which expect to register it themselves."""
    registry.available_methods()
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    shutil.copy(TOY, tmp_path / "toy_scale_kwargs.py")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield importlib.import_module("toy_scale_kwargs")
    sys.modules.pop("toy_scale_kwargs", None)


class KeywordCall(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(8, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(input=x)


def _adapted_forward(self, base: nn.Module, *args, **kwargs) -> torch.Tensor:
    return base._la_base_forward(*args, **kwargs) * (1 + self.g)


def test_per_sample_routes_rows_given_by_keyword(monkeypatch, toy_method):
    monkeypatch.setattr(toy_method.ToyScaleLayer, "adapted_forward", _adapted_forward)
    torch.manual_seed(0)
    model = KeywordCall()
    for name in ("a", "b"):
        la.inject(model, toy_method.ToyScaleConfig(target_modules=["layer"]), name=name)
    with torch.no_grad():
        model.layer.adapter["a"].g.normal_()
        model.layer.adapter["b"].g.normal_()
    x = torch.randn(3, 8)
    names = ["a", "b", "a"]
    want = []
    for row, name in zip(x, names):
        la.set_active(model, name)
        want.append(model(row[None]))
    with la.per_sample(model, names):
        got = model(x)
    assert torch.allclose(got, torch.cat(want), atol=1e-6)
