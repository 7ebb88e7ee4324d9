"""What a user discovers interactively: ``dir(lightning_adapters)`` and ``help()`` of every config class."""

from __future__ import annotations

import dataclasses
import pydoc

import pytest

import lightning_adapters as la

SHARED = [f.name for f in dataclasses.fields(la.AdapterConfig)]


def test_dir_lists_the_public_api_with_its_lazy_names():
    names = dir(la)
    assert names == sorted(set(la.__all__) | {"__version__"})
    for lazy in ("LoRAConfig", "AdaLoRAConfig", "AdapterCallback", "AdapterMixin", "restore_from_checkpoint"):
        assert lazy in names
    assert "Any" not in names and "import_module" not in names
    assert not hasattr(la, "Any") and not hasattr(la, "import_module")  # no helper leaks as an attribute
    for name in names:
        getattr(la, name)  # every listed name resolves


@pytest.mark.parametrize("method", la.available_methods())
def test_help_of_every_config_documents_the_shared_fields(method):
    cls = la.get_method(method).config_cls
    text = pydoc.render_doc(cls, renderer=pydoc.plaintext)
    assert SHARED[:4] == ["target_modules", "exclude_modules", "modules_to_save", "adapter_dtype"]
    for field in SHARED + [f.name for f in dataclasses.fields(cls) if f.name not in SHARED and f.init][:1]:
        assert text.count(f"    {field}: ") == 1, (cls.__name__, field)  # documented once, own or shared
    assert "fp32 when the base layer is half precision" in text
