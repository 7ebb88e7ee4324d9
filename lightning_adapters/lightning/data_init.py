"""Data-driven LoRA inits (CorDA, EVA) inside a Lightning fit: right after injection, before the optimizer exists.

``AdapterRuntime.after_configure_model`` calls ``initialize_in_fit`` once the adapters are injected. In a fit
whose config has a data-driven ``init_weights``, it reads the first ``init_batches`` batches of the train
dataloader (on DDP, rank ``k`` runs batches ``k, k + world, ...`` of them; CorDA sums its statistics over ranks, so
the init is the one a single process gets from those batches, and EVA gathers every layer's input rows from all
ranks, so it is the one a single process gets from batches concatenating the ranks' batches) and initialises the
layers before the strategy wraps the model and ``configure_optimizers`` runs. A module may define
``adapter_init_batch(batch)`` to turn a train batch into what the injected module is called with (a mapping is
passed as keyword arguments, and EVA then reads only the token positions its ``attention_mask`` and ``labels``
keep), or ``adapter_init_forward(batch)`` to run the model itself; otherwise the injected module gets the batch as
``lightning_adapters.methods.lora_data.default_forward`` passes it.

On a resumed fit the init runs again on the same first batches, then the checkpoint restores the trained
factors: the residual base is the same as long as the dataloader yields the same first batches.
"""

from __future__ import annotations

import itertools
from typing import Any

from torch import nn

from lightning_adapters.methods.lora_data import data_init_groups, default_forward, initialize_from_data


def initialize_in_fit(pl_module: nn.Module, target: nn.Module, config: Any) -> bool:
    """Run the data-driven init of ``target`` from the fit's first train batches, once; returns whether it ran."""
    trainer = getattr(pl_module, "_trainer", None)
    groups = data_init_groups(target)
    if trainer is None or not any(layer.needs_data for g in groups.values() for _, layer in g.values()):
        return False
    from lightning.pytorch.trainer.states import TrainerFn

    if trainer.state.fn != TrainerFn.FITTING:
        return False
    source = trainer.fit_loop._data_source
    if not source.is_defined():
        return False
    rank, world = trainer.global_rank, trainer.world_size
    first = itertools.islice(iter(source.dataloader()), config.init_batches)
    mine = [batch for i, batch in enumerate(first) if i % world == rank]
    convert = getattr(pl_module, "adapter_init_batch", None)
    if callable(convert):
        mine = [convert(batch) for batch in mine]
    custom = getattr(pl_module, "adapter_init_forward", None)
    forward = (lambda _model, batch: custom(batch)) if callable(custom) else default_forward
    initialize_from_data(target, mine, forward_fn=forward, all_reduce=world > 1)
    return True
