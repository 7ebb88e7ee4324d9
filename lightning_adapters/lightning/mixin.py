"""``AdapterMixin``: the module-side integration, for LightningModules written with adapters in mind.

Example::

    class Model(la.AdapterMixin, L.LightningModule):
        def __init__(self):
            super().__init__()
            self.adapter_config = la.LoRAConfig(r=8, target_modules=["q_proj", "v_proj"])
            self.adapter_module = "model"          # inject into self.model (default: the whole module)

        def configure_model(self):
            if self.model is None:                 # configure_model runs for every stage: keep it idempotent
                self.model = build_model()         # adapters are injected right after this method returns

        def configure_optimizers(self):
            return torch.optim.AdamW(self.trainable_parameters(), lr=1e-3)

Everything ``AdapterCallback`` does happens with the mixin alone (it adds the callback through
``configure_callbacks`` when the trainer has none); the mixin adds methods for the module's own code.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from lightning_adapters.config import AdapterConfig
from lightning_adapters.core.inject import DEFAULT_NAME, disabled, merge, unmerge
from lightning_adapters.core.state import adapter_state_dict
from lightning_adapters.lightning.callback import swap_class
from lightning_adapters.lightning.runtime import get_runtime
from lightning_adapters.optim import loraplus_param_groups


class AdapterMixin:
    """Adapter support for a LightningModule: list it before ``LightningModule`` in the bases.

    Attributes:
        adapter_config: The adapter config to inject (set it in ``__init__``): a config such as
            ``LoRAConfig(r=8)``, or a mapping such as ``{"method": "lora", "r": 8}``.
        adapter_module: Dotted name of the sub-module to inject into; ``None`` injects into the whole module. With a
            sub-module, every parameter beside it that requires grad (e.g. a new ``self.head``) trains in full and is
            saved in every checkpoint; ``modules_to_save`` may name such modules too.
        adapter_name: Name of the adapter the module trains (``AdapterCallback``'s ``name``).
        adapter_init_from: Adapters loaded before it, ``{name: PEFT directory or adapter checkpoint}``, frozen; a
            bare path (or an entry for ``adapter_name``) starts the trained adapter from it (``init_from``).
        adapter_active: The adapters acting during training (``None``: every one).
        adapter_save: The adapters checkpoints hold (``None``: every one).
    """

    adapter_config: AdapterConfig | None = None
    adapter_module: str | None = None
    adapter_name: str = DEFAULT_NAME
    adapter_init_from: str | dict[str, str] | None = None
    adapter_active: str | list[str] | None = None
    adapter_save: str | list[str] | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Put the integration's configure_model / checkpoint / training_step wrappers in front of the subclass.
        swap_class(self)
        # Lightning loads adapter-only state dicts non-strictly; the integration checks the adapter keys itself.
        self.strict_loading = False

    def inject_adapters(self) -> nn.Module:
        """Inject now (idempotent); call it in ``configure_model`` before sharding the model yourself.

        Returns:
            The injected (sub-)module.
        """
        runtime = get_runtime(self)
        runtime.inject(self)
        return runtime.injected_target(self)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters that train (adapters and ``modules_to_save``), for ``configure_optimizers``."""
        return [p for p in self.parameters() if p.requires_grad]

    def loraplus_param_groups(self, lr: float, loraplus_lr_ratio: float, **kwargs: Any) -> list[dict[str, Any]]:
        """LoRA+ parameter groups of the trainable parameters (``lightning_adapters.loraplus_param_groups``).

        Example: ``torch.optim.AdamW(self.loraplus_param_groups(lr=2e-4, loraplus_lr_ratio=16))``.
        """
        return loraplus_param_groups(self, lr, loraplus_lr_ratio, **kwargs)

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter tensors, keyed relative to the injected module (as ``lightning_adapters.adapter_state_dict``)."""
        return adapter_state_dict(get_runtime(self).injected_target(self))

    def merge_adapters(self) -> None:
        """Fold the adapters into the base weights (e.g. for faster inference); ``unmerge_adapters`` undoes it."""
        merge(get_runtime(self).injected_target(self))

    def unmerge_adapters(self) -> None:
        """Undo ``merge_adapters``."""
        unmerge(get_runtime(self).injected_target(self))

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Run the base model inside the block (adapters switched off, untouched)."""
        with disabled(get_runtime(self).injected_target(self)):
            yield

    def adapter_regularization(self) -> torch.Tensor:
        """The method's regularisation term for this batch (AdaLoRA's orthogonality penalty; 0 for most methods).

        Adding it to your loss yourself switches off the automatic addition to ``training_step``'s loss, so the
        term is never counted twice.
        """
        runtime = get_runtime(self)
        runtime.manual_regularization = True
        term = runtime.loss_term()
        if term is None:
            param = next(iter(self.parameters()), None)
            return torch.zeros((), device=param.device if param is not None else None)
        return term
