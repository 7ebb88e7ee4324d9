"""lightning_adapters: parameter-efficient fine-tuning as a PyTorch Lightning plugin.

Public API::

    import lightning_adapters as la
    cfg = la.LoRAConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"])
    la.inject(model, cfg)
    la.adapter_state_dict(model); la.load_adapter_state_dict(model, sd)
    la.inject(model, other_cfg, name="b"); la.set_active(model, ["default", "b"]); la.set_trainable(model, "b")
    la.merge(model); la.unmerge(model); la.eject(model, merge=False)
    with la.disabled(model): ...
    la.combine(model, {"default": 0.7, "b": 0.3}, name="ab", how="cat"); la.to_lora(model, "b", r=8)
    la.save_peft(model, "dir"); la.load_peft(model, "dir"); la.load_peft(model, "dir", name="b")
    print(la.summary(model))
    la.quantize(model, "nf4")          # before inject: a 4-bit base (QLoRA); every method runs on it
"""

from __future__ import annotations

from importlib import import_module as _import_module
from typing import TYPE_CHECKING

from lightning_adapters.config import AdapterConfig
from lightning_adapters.core.inject import (
    apply_dtype_policy,
    apply_trainability,
    config_of,
    disabled,
    eject,
    inject,
    merge,
    summary,
    unmerge,
)
from lightning_adapters.core.named import (
    active,
    adapter_names,
    delete,
    set_active,
    set_scale,
    set_trainable,
)
from lightning_adapters.core.routing import per_sample
from lightning_adapters.core.state import adapter_state_dict, base_fingerprint, load_adapter_state_dict
from lightning_adapters.errors import (
    AdapterConfigError,
    AdapterError,
    AdapterStateError,
    AdapterTypeError,
    MergeError,
    NotMergeableError,
    TargetError,
    UnsupportedLayerError,
)
from lightning_adapters.interop.peft import load_peft, save_peft
from lightning_adapters.registry import available_methods, builtin_configs, get_method

__version__ = "0.1.0"

# Every method's config class (LoRAConfig, ...), as the registry discovers the method files.
_CONFIGS = builtin_configs()
globals().update(_CONFIGS)

# Lightning integrations are resolved lazily so ``import lightning_adapters`` does not import Lightning.
_LAZY = {
    "AdapterCallback": "lightning_adapters.lightning.callback",
    "AdapterMixin": "lightning_adapters.lightning.mixin",
    "restore_from_checkpoint": "lightning_adapters.lightning.checkpoint",
    "adapter_auto_wrap_policy": "lightning_adapters.lightning.strategies",
    "adapter_parallelize_fn": "lightning_adapters.lightning.strategies",
    "export_merged": "lightning_adapters.lightning.export",
    "loraplus_param_groups": "lightning_adapters.optim",
    "initialize_from_data": "lightning_adapters.methods.lora_data",
    "quantize": "lightning_adapters.quant",
    "combine": "lightning_adapters.combination",
    "to_lora": "lightning_adapters.combination",
    "LoRAConversion": "lightning_adapters.combination",
    "merge_errors": "lightning_adapters.core.quant_ops",
}


if TYPE_CHECKING:
    from typing import Any


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(_import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lightning_adapters' has no attribute {name!r}")


def __dir__() -> list[str]:
    # The public API, lazy names included (the default would list helpers such as _import_module, not the configs).
    return sorted({*__all__, "__version__"})


__all__ = [
    "AdapterConfig",
    "AdapterConfigError",
    "AdapterError",
    "AdapterStateError",
    "AdapterTypeError",
    "MergeError",
    "NotMergeableError",
    "TargetError",
    "UnsupportedLayerError",
    "active",
    "adapter_names",
    "adapter_state_dict",
    "apply_dtype_policy",
    "apply_trainability",
    "available_methods",
    "base_fingerprint",
    "config_of",
    "delete",
    "disabled",
    "eject",
    "get_method",
    "inject",
    "load_adapter_state_dict",
    "load_peft",
    "merge",
    "per_sample",
    "save_peft",
    "set_active",
    "set_scale",
    "set_trainable",
    "summary",
    "unmerge",
    *_CONFIGS,
    *_LAZY,
]
