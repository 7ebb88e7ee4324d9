"""LoHa rows of the contract suite: every variant on every supported layer kind.

``r=4`` folds ``ΔW`` into the base weight on these small layers; ``r=1`` takes the rank-r² path on the
Linear/Conv1D layers (and folds on convolutions).
"""

from lightning_adapters.methods.loha import LoHaConfig
from tests.helpers import CONV_PADDING_LAYERS, ContractCase

_LINEAR = ["linear", "linear_odd", "conv1d_t"]
_CONV = ["conv1d", "conv1d_dilated", "conv2d_1x1", "conv2d", "conv2d_strided", "conv2d_dilated", "conv2d_groups"]

# variant -> (config fields, layer kinds it runs on)
_VARIANTS = {
    "plain": (dict(r=4, alpha=8), _LINEAR + _CONV + CONV_PADDING_LAYERS),
    "rank1": (dict(r=1, alpha=2), _LINEAR + ["conv2d"]),
    "effconv": (dict(r=3, alpha=6, use_effective_conv2d=True), _CONV + CONV_PADDING_LAYERS),
    "noinit": (dict(r=4, alpha=8, init_weights=False), ["linear", "conv1d_t", "conv2d"]),
    "rankdrop": (dict(r=2, alpha=4, rank_dropout=0.3), ["linear", "conv1d_t", "conv1d", "conv2d"]),
}


def _make(kw):
    return lambda targets: LoHaConfig(target_modules=targets, **kw)


CASES = [
    ContractCase(id=f"loha-{v}-{layer}", make_config=_make(kw), layer=layer, identity_at_init=v != "noinit")
    for v, (kw, layers) in _VARIANTS.items()
    for layer in layers
]
