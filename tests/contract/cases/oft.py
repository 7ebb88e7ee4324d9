"""OFT rows of the contract suite: exact Cayley, Neumann, block_share, COFT, dropout and random init on every
layer kind OFT supports (Linear, Embedding, Conv2d of any kernel, stride, dilation and groups)."""

from lightning_adapters.methods.oft import OFTConfig
from tests.helpers import ContractCase

# A block size that divides each layer's rotated size: in_features, embedding_dim or C/groups·kh·kw.
_BLOCK = {
    "linear": 6,  # 24
    "linear_odd": 17,  # 17 is prime: one block of 17 (r = 1)
    "embedding": 4,  # 16
    "conv2d_1x1": 4,  # 8
    "conv2d": 8,  # 8·3·3 = 72
    "conv2d_strided": 9,  # 72
    "conv2d_dilated": 12,  # 72
    "conv2d_groups": 6,  # 4·3·3 = 36
}
_VARIANTS = {
    "neumann": dict(),
    "exact": dict(use_cayley_neumann=False),
    "share": dict(block_share=True),
    "coft": dict(coft=True, eps=0.05),
    "dropout": dict(module_dropout=0.5),
    "noinit": dict(init_weights=False, use_cayley_neumann=False),
}


def _make(kw):
    return lambda targets: OFTConfig(target_modules=targets, **kw)


# Every variant the issue names runs on every layer kind; the extras (dropout, random init) on two kinds.
_EXTRAS = {"dropout", "noinit"}

CASES = [
    ContractCase(
        id=f"oft-{v}-{layer}",
        make_config=_make({"oft_block_size": b, **kw}),
        layer=layer,
        identity_at_init=v != "noinit",
    )
    for v, kw in _VARIANTS.items()
    for layer, b in _BLOCK.items()
    if v not in _EXTRAS or layer in ("linear", "conv2d")
] + [
    ContractCase(id=f"oft-r-{layer}", make_config=_make({"r": r, "oft_block_size": 0}), layer=layer)
    for layer, r in {"linear": 3, "conv2d": 9}.items()
]
# Padding modes and string padding (the rotation acts on the kernel, the base conv call does the rest).
_PADDING_BLOCK = {
    "conv2d_reflect": 8,  # 8·3·3 = 72
    "conv2d_circular_strided": 9,  # 72
    "conv2d_replicate_groups": 6,  # 4·3·3 = 36
    "conv2d_same": 8,  # 8·2·3 = 48
}
CASES += [
    ContractCase(id=f"oft-{v}-{layer}", make_config=_make({"oft_block_size": b, **_VARIANTS[v]}), layer=layer)
    for v in ("neumann", "exact")
    for layer, b in _PADDING_BLOCK.items()
]
