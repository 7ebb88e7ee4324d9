"""LoRA rows of the contract suite: every variant on every supported layer kind."""

from lightning_adapters.methods.lora import LoRAConfig
from tests.helpers import CONV_PADDING_LAYERS, ContractCase

_VARIANTS = {
    "plain": dict(r=4, alpha=8),
    "rslora": dict(r=4, alpha=8, use_rslora=True),
    "dora": dict(r=4, alpha=8, use_dora=True),
    "gaussian": dict(r=4, alpha=8, init_weights="gaussian"),
    "noinit": dict(r=4, alpha=8, init_weights=False),
    "dropout": dict(r=4, alpha=8, dropout=0.1),
}
_LAYERS = [
    "linear",
    "linear_odd",
    "conv1d_t",
    "embedding",
    "conv1d",
    "conv1d_dilated",
    "conv2d_1x1",
    "conv2d",
    "conv2d_strided",
    "conv2d_dilated",
    "conv2d_groups",
    "conv3d",
]


def _make(kw):
    return lambda targets: LoRAConfig(target_modules=targets, **kw)


CASES = [
    ContractCase(id=f"lora-{v}-{layer}", make_config=_make(kw), layer=layer, identity_at_init=v != "noinit")
    for v, kw in _VARIANTS.items()
    for layer in _LAYERS
]
# Padding modes, string padding, stride/dilation/groups together: the plain and DoRA forms.
CASES += [
    ContractCase(id=f"lora-{v}-{layer}", make_config=_make(_VARIANTS[v]), layer=layer)
    for v in ("plain", "dora")
    for layer in CONV_PADDING_LAYERS + ["conv3d_groups_reflect"]
]
# PEFT's grouped-conv layout (A ungrouped): forward, gradients and save/load, but never mergeable.
CASES += [
    ContractCase(
        id=f"lora-peftgroups-{layer}",
        make_config=_make(dict(r=4, alpha=8, grouped_conv_layout="peft")),
        layer=layer,
        mergeable=False,
    )
    for layer in ("conv2d_groups", "conv2d_replicate_groups", "conv3d_groups_reflect")
]
