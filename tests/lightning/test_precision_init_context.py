"""A precision plugin that refuses Lightning's init context around ``configure_model`` (``BitsandbytesPrecision``
with ``ignore_modules``) must not be met because of the callback: its class swap adds no ``configure_model`` to a
module that has none, and runs the post-``configure_model`` step at the end of ``setup`` instead.

Lightning's own plugin runs only on CUDA (``tests/gpu/test_qlora_cuda.py`` trains with it); here a CPU plugin of the
same name refuses the context the same way.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins import Precision
from lightning.pytorch.utilities.model_helpers import is_overridden

import lightning_adapters as la
from lightning_adapters.lightning.callback import AdapterModuleHooks, AdapterSetupHooks, init_context_refused
from tests.lightning.models import TinyLlamaLM, token_data, trainer


class BitsandbytesPrecision(Precision):
    """Stands in for Lightning's plugin of this name: refuses ``module_init_context`` when ignoring modules."""

    def __init__(self, ignore_modules: set[str]) -> None:
        self.ignore_modules = ignore_modules

    def module_init_context(self):  # noqa: ANN201
        if self.ignore_modules:
            raise RuntimeError("init_module is not supported with ignore_modules")
        return super().module_init_context()


class EagerLlamaLM(TinyLlamaLM):
    configure_model = L.LightningModule.configure_model  # built in __init__, no configure_model of its own


def _fit(module: L.LightningModule, plugin: Precision) -> None:
    config = la.LoRAConfig(r=4, target_modules=["q_proj", "v_proj"])
    trainer(max_steps=3, plugins=[plugin], callbacks=[la.AdapterCallback(config, verbose=False)]).fit(
        module, token_data()
    )


def test_a_refusing_plugin_trains_a_module_without_configure_model() -> None:
    module = EagerLlamaLM(lr=0.05)
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    _fit(module, BitsandbytesPrecision({"model.lm_head"}))
    assert isinstance(module, AdapterSetupHooks) and not is_overridden("configure_model", module)
    q = module.model.model.layers[0].self_attn.q_proj
    assert float(q.adapter.default.lora_B.detach().abs().max()) > 0  # injected and trained
    after = module.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # the base stayed frozen
    new = {f"model.{k}" for k in after if k not in before}
    assert new and set(la.adapter_state_dict(module)) == new  # the adapter is all that is new


@pytest.mark.parametrize("ignore", [set(), {"model.lm_head"}], ids=["no-ignore", "ignore"])
def test_the_swap_keeps_configure_model_unless_the_plugin_refuses_it(ignore: set[str]) -> None:
    module = EagerLlamaLM(lr=0.05)
    _fit(module, BitsandbytesPrecision(ignore))
    hooks = AdapterSetupHooks if ignore else AdapterModuleHooks
    assert isinstance(module, hooks) and not isinstance(
        module, {AdapterSetupHooks, AdapterModuleHooks}.difference({hooks}).pop()
    )
    assert float(module.model.model.layers[0].self_attn.q_proj.adapter.default.lora_B.detach().abs().max()) > 0


def test_only_the_named_plugin_with_ignored_modules_refuses() -> None:
    from lightning.pytorch.plugins import BitsandbytesPrecision as Real

    class Holder:
        def __init__(self, plugin: object) -> None:
            self.precision_plugin = plugin

    eager, built_later = EagerLlamaLM(), TinyLlamaLM()
    assert init_context_refused(eager, Holder(Real(mode="nf4", dtype=torch.bfloat16, ignore_modules={"x"})))
    assert not init_context_refused(eager, Holder(Real(mode="nf4", dtype=torch.bfloat16)))
    assert not init_context_refused(built_later, Holder(Real(mode="nf4", dtype=torch.bfloat16, ignore_modules={"x"})))
    assert not init_context_refused(eager, Holder(Precision())) and not init_context_refused(eager, None)


def test_a_module_with_its_own_configure_model_meets_lightnings_refusal_not_ours() -> None:
    with pytest.raises(RuntimeError, match="ignore_modules"):
        _fit(TinyLlamaLM(lr=0.05), BitsandbytesPrecision({"model.lm_head"}))
