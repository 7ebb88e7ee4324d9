"""AdaLoRA rows of the contract suite: Linear, transformers Conv1D and Conv2d (plain, 1×1, strided, dilated)."""

from lightning_adapters.methods.adalora import AdaLoRAConfig
from tests.helpers import ContractCase

_LAYERS = ["linear", "linear_odd", "conv1d_t", "conv2d", "conv2d_1x1", "conv2d_strided", "conv2d_dilated"]
# AdaLoRA adapts Conv2d with groups=1 only (grouped convs and Conv1d are refused at inject).
_PADDING = ["conv2d_reflect", "conv2d_circular_strided", "conv2d_same"]
# (variant, config, layers): the plain form everywhere, the other inits on one layer of each family.
_ROWS = [
    ("plain", dict(init_r=4, target_r=2, alpha=8.0), _LAYERS + _PADDING),
    ("noinit", dict(init_r=4, target_r=2, alpha=8.0, init_weights=False), ["linear", "conv1d_t", "conv2d"]),
    ("dropout", dict(init_r=3, target_r=1, alpha=4.0, dropout=0.1), ["linear", "conv2d"]),
]


def _make(kw):
    return lambda targets: AdaLoRAConfig(target_modules=targets, **kw)


CASES = [
    ContractCase(id=f"adalora-{v}-{layer}", make_config=_make(kw), layer=layer, identity_at_init=v != "noinit")
    for v, kw, layers in _ROWS
    for layer in layers
]
