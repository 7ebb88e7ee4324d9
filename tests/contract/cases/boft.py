"""BOFT rows of the contract suite: one and several butterfly factors, block size or block count, dropout and
random init on every layer kind BOFT supports (Linear, Conv2d of any kernel, stride, dilation and groups)."""

from lightning_adapters.methods.boft import BOFTConfig
from tests.helpers import ContractCase

# Per layer: (block size for m = 1, block size and the largest m it allows); the rotated size is
# in_features or C/groups·kh·kw.
_SIZES = {
    "linear": (4, 2, 3),  # 24 = 12 blocks of 2: m up to 3 (12 divisible by 4)
    "linear_odd": (17, None, None),  # 17 is prime: a single block, m = 1 only
    "conv2d_1x1": (4, 2, 3),  # 8
    "conv2d": (8, 4, 2),  # 72 = 18 blocks of 4
    "conv2d_strided": (6, 6, 2),  # 72 = 12 blocks of 6
    "conv2d_dilated": (9, 2, 3),  # 72 = 36 blocks of 2
    "conv2d_groups": (4, 6, 2),  # 4·3·3 = 36
    "conv2d_reflect": (8, 4, 2),  # 72
    "conv2d_circular_strided": (6, None, None),  # 72
    "conv2d_replicate_groups": (4, None, None),  # 36
    "conv2d_same": (8, 4, 2),  # 8·2·3 = 48 = 12 blocks of 4
}


def _make(kw):
    return lambda targets: BOFTConfig(target_modules=targets, **kw)


def _rows():
    rows = []
    for layer, (b1, bm, m) in _SIZES.items():
        rows.append(ContractCase(id=f"boft-m1-{layer}", make_config=_make(dict(boft_block_size=b1)), layer=layer))
        if m is not None:
            kw = dict(boft_block_size=bm, boft_n_butterfly_factor=2)
            rows.append(ContractCase(id=f"boft-m2-{layer}", make_config=_make(kw), layer=layer))
        if layer not in ("linear", "conv2d"):
            continue  # the extras run on two layer kinds
        rows.append(
            ContractCase(
                id=f"boft-noinit-{layer}",
                make_config=_make(dict(boft_block_size=b1, init_weights=False)),
                layer=layer,
                identity_at_init=False,
            )
        )
        if m > 2:
            kw = dict(boft_block_size=bm, boft_n_butterfly_factor=m)
            rows.append(ContractCase(id=f"boft-m{m}-{layer}", make_config=_make(kw), layer=layer))
        kw = dict(boft_block_size=0, boft_block_num=2 ** (m - 1), boft_n_butterfly_factor=m, boft_dropout=0.5)
        rows.append(ContractCase(id=f"boft-blocknum-dropout-{layer}", make_config=_make(kw), layer=layer))
    return rows


CASES = _rows()
