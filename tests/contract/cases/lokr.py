"""LoKr rows of the contract suite: every variant on every supported layer kind.

The variants cover full and low-rank ``w1``/``w2``, a forced ``decompose_factor``, the Tucker form on Conv1d
and Conv2d, the three inits and rank dropout.
"""

from lightning_adapters.methods.lokr import LoKrConfig
from tests.helpers import CONV_PADDING_LAYERS, ContractCase

_LINEAR = ["linear", "linear_odd", "conv1d_t"]
_CONV = ["conv1d", "conv1d_dilated", "conv2d_1x1", "conv2d", "conv2d_strided", "conv2d_dilated", "conv2d_groups"]

# variant -> (config fields, layer kinds it runs on)
_VARIANTS = {
    "full": (dict(r=4, alpha=8), _LINEAR + _CONV + CONV_PADDING_LAYERS),
    "lowrank": (dict(r=1, alpha=2), _LINEAR + _CONV),
    "both": (dict(r=1, alpha=2, decompose_both=True), ["linear", "conv1d_t", "conv1d", "conv2d"]),
    "factor2": (dict(r=2, alpha=3, decompose_factor=2), ["linear", "conv2d", "conv2d_groups"]),
    "effconv": (dict(r=1, alpha=2, use_effective_conv2d=True), _CONV + CONV_PADDING_LAYERS),
    "lycoris": (dict(r=1, alpha=2, init_weights="lycoris"), ["linear", "conv2d"]),
    "noinit": (dict(r=2, alpha=4, init_weights=False), ["linear", "conv1d"]),
    "rankdrop": (
        dict(r=1, alpha=2, rank_dropout=0.3, rank_dropout_scale=True),
        ["linear", "conv1d_t", "conv1d", "conv2d"],
    ),
}


def _make(kw):
    return lambda targets: LoKrConfig(target_modules=targets, **kw)


CASES = [
    ContractCase(id=f"lokr-{v}-{layer}", make_config=_make(kw), layer=layer, identity_at_init=v != "noinit")
    for v, (kw, layers) in _VARIANTS.items()
    for layer in layers
]
