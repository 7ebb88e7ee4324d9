"""Every method compiles into one graph: ``torch.compile(fullgraph=True)`` traces a training step of an adapted
Llama without a break, and the compiled step gives eager's loss and adapter gradients (the eval forward of each
layer kind is compiled whole in ``tests/contract``).

A graph break inside an adapted layer splits the model at every layer, recompiles per layer and, past dynamo's
recompile limit, runs the rest eagerly: LoHa/LoKr broke on reading their module-dropout draw, Llama-Adapter on
the quantized-weight check of its prompt projection.
"""

from __future__ import annotations

import pytest
import torch

import lightning_adapters as la
from tests.helpers import randomize_adapter, tiny_llama, token_batch

CONFIGS = {
    "lora": lambda: la.LoRAConfig(r=4, target_modules="all-linear"),
    "dora": lambda: la.LoRAConfig(r=4, target_modules="all-linear", use_dora=True),
    "loha": lambda: la.LoHaConfig(r=4, target_modules="all-linear"),
    "lokr": lambda: la.LoKrConfig(r=4, target_modules="all-linear"),
    "oft": lambda: la.OFTConfig(r=0, oft_block_size=8, target_modules="all-linear"),
    "boft": lambda: la.BOFTConfig(boft_block_size=4, target_modules="all-linear"),
    "adalora": lambda: la.AdaLoRAConfig(init_r=4, target_r=2, total_step=10, target_modules="all-linear"),
    "llama_adapter": lambda: la.LlamaAdapterConfig(adapter_len=4, adapter_layers=1),
}


def _step(
    model: torch.nn.Module, call: torch.nn.Module, ids: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = call(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_adapted_llama_trains_compiled_without_a_graph_break(method: str) -> None:
    torch.manual_seed(0)
    model = tiny_llama(num_hidden_layers=1)
    la.inject(model, CONFIGS[method]())
    randomize_adapter(model)  # away from the zero init, so every adapter term counts
    model.train()
    ids = token_batch()
    torch.manual_seed(1)
    loss, grads = _step(model, model, ids)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)  # raises at the first graph break
    torch.manual_seed(1)
    c_loss, c_grads = _step(model, compiled, ids)
    torch.testing.assert_close(c_loss, loss, rtol=1e-5, atol=1e-6)
    assert set(c_grads) == set(grads) and grads
    for n, g in grads.items():
        torch.testing.assert_close(c_grads[n], g, rtol=1e-4, atol=1e-6, msg=n)
