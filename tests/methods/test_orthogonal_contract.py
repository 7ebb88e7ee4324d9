"""What OFT and BOFT share, pinned once for both: exact config and layer-size refusals, the PEFT config dicts
each writes and reads, and the quantized stand-in both method files run their own-kernel tests on."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightning_adapters as la
from lightning_adapters.core.quant import DequantizedLinear
from lightning_adapters.methods.boft import BOFTConfig, BOFTLayer, BOFTMethod
from lightning_adapters.methods.oft import OFTConfig, OFTLayer, OFTMethod
from tests.helpers import Wrap

# (method, config class, the fields PEFT and we both hold, our own extra fields, where config_to_peft targets,
# layers_to_transform read by config_from_peft)
_METHODS = [
    pytest.param(
        OFTMethod,
        OFTConfig,
        dict(
            r=3,
            oft_block_size=0,
            use_cayley_neumann=False,
            num_cayley_neumann_terms=7,
            block_share=True,
            coft=True,
            eps=1e-3,
            module_dropout=0.2,
            init_weights=False,
        ),
        dict(auto_adjust=True),
        dict(layers_to_transform=[2], layers_pattern="h"),
        [0, 1],
        id="oft",
    ),
    pytest.param(
        BOFTMethod,
        BOFTConfig,
        dict(boft_block_size=0, boft_block_num=4, boft_n_butterfly_factor=2, boft_dropout=0.1, init_weights=False),
        dict(),
        dict(layers_to_transform=[1], layers_pattern="layers"),
        [0, 2],
        id="boft",
    ),
]


@pytest.mark.parametrize("method, config, fields, own, where, read_layers", _METHODS)
def test_config_to_peft_writes_every_field(method, config, fields, own, where, read_layers):
    peft_type = config.__name__.removesuffix("Config")
    bias = f"{peft_type.lower()}_only"
    cfg = config(**fields, **own, bias=bias, target_modules=["q"], **where)
    assert method.config_to_peft(cfg) == {
        "peft_type": peft_type,
        **fields,
        "bias": bias,
        "fan_in_fan_out": False,
        **where,
    }


@pytest.mark.parametrize("method, config, fields, own, where, read_layers", _METHODS)
def test_config_from_peft_reads_every_field(method, config, fields, own, where, read_layers):
    peft_type = config.__name__.removesuffix("Config")
    targets = dict(
        layers_to_transform=read_layers,
        layers_pattern="layers",
        target_modules=["q", "v"],
        exclude_modules=["k"],
        modules_to_save=["head"],
    )
    d = {"peft_type": peft_type, **fields, "bias": "lora_only", **targets}
    assert method.config_from_peft(d) == config(**fields, **own, bias=f"{peft_type.lower()}_only", **targets)


_OFT_PAIR = "r (number of blocks) and oft_block_size (features per block)"
_BOFT_PAIR = "boft_block_size (features per block) and boft_block_num (blocks per factor)"


def _exactly_one(method: str, pair: str, got: str) -> str:
    """The refusal of a config that sets both or neither of the two ways to size the blocks."""
    return f"{method}: set exactly one of {pair}, the other to 0; got {got}"


@pytest.mark.parametrize(
    "config, kw, msg",
    [
        (OFTConfig, dict(bias="boft_only"), "oft: bias must be one of ['none', 'all', 'oft_only'], got 'boft_only'"),
        (OFTConfig, dict(r=-1), "oft: r must be an integer >= 0, got -1"),
        (OFTConfig, dict(r=2.0), "oft: r must be an integer >= 0, got 2.0"),
        (OFTConfig, dict(oft_block_size=-4), "oft: oft_block_size must be an integer >= 0, got -4"),
        (OFTConfig, dict(r=0, oft_block_size=0), _exactly_one("oft", _OFT_PAIR, "r=0, oft_block_size=0")),
        (OFTConfig, dict(r=4, oft_block_size=8), _exactly_one("oft", _OFT_PAIR, "r=4, oft_block_size=8")),
        (OFTConfig, dict(num_cayley_neumann_terms=0), "oft: num_cayley_neumann_terms must be an integer > 0, got 0"),
        (
            OFTConfig,
            dict(num_cayley_neumann_terms=3.0),
            "oft: num_cayley_neumann_terms must be an integer > 0, got 3.0",
        ),
        (
            OFTConfig,
            dict(num_cayley_neumann_terms=1),
            "oft: num_cayley_neumann_terms=1 makes every rotation the identity (the adapter could not learn); use 2 "
            "or more (PEFT's default is 5)",
        ),
        (OFTConfig, dict(eps=0.0), "oft: eps must be a finite number > 0, got 0.0"),
        (OFTConfig, dict(eps=float("inf")), "oft: eps must be a finite number > 0, got inf"),
        (OFTConfig, dict(module_dropout=1.0), "oft: module_dropout must be in [0, 1), got 1.0"),
        (OFTConfig, dict(module_dropout=-0.5), "oft: module_dropout must be in [0, 1), got -0.5"),
        (OFTConfig, dict(use_cayley_neumann=1), "oft: use_cayley_neumann must be True or False, got 1"),
        (OFTConfig, dict(block_share=None), "oft: block_share must be True or False, got None"),
        (OFTConfig, dict(coft="yes"), "oft: coft must be True or False, got 'yes'"),
        (OFTConfig, dict(init_weights=0), "oft: init_weights must be True or False, got 0"),
        (OFTConfig, dict(auto_adjust=1.0), "oft: auto_adjust must be True or False, got 1.0"),
        (BOFTConfig, dict(bias="lora_only"), "boft: bias must be one of ['none', 'all', 'boft_only'], got 'lora_only'"),
        (BOFTConfig, dict(boft_block_size=-1), "boft: boft_block_size must be an integer >= 0, got -1"),
        (
            BOFTConfig,
            dict(boft_block_size=0, boft_block_num=-2),
            "boft: boft_block_num must be an integer >= 0, got -2",
        ),
        (BOFTConfig, dict(boft_block_size=True), "boft: boft_block_size must be an integer >= 0, got True"),
        (BOFTConfig, dict(boft_block_size=0), _exactly_one("boft", _BOFT_PAIR, "boft_block_size=0, boft_block_num=0")),
        (
            BOFTConfig,
            dict(boft_block_size=4, boft_block_num=2),
            _exactly_one("boft", _BOFT_PAIR, "boft_block_size=4, boft_block_num=2"),
        ),
        (BOFTConfig, dict(boft_n_butterfly_factor=0), "boft: boft_n_butterfly_factor must be an integer > 0, got 0"),
        (
            BOFTConfig,
            dict(boft_n_butterfly_factor=2.0),
            "boft: boft_n_butterfly_factor must be an integer > 0, got 2.0",
        ),
        (BOFTConfig, dict(boft_dropout=1.0), "boft: boft_dropout must be in [0, 1), got 1.0"),
        (BOFTConfig, dict(boft_dropout=-0.1), "boft: boft_dropout must be in [0, 1), got -0.1"),
        (BOFTConfig, dict(init_weights=1), "boft: init_weights must be True or False, got 1"),
        (BOFTConfig, dict(init_weights=None), "boft: init_weights must be True or False, got None"),
        (BOFTConfig, dict(adapter_dtype="int8"), "adapter_dtype 'int8' is not one of"),
    ],
)
def test_config_refusals_name_the_field_and_value(config, kw, msg):
    with pytest.raises(la.AdapterConfigError) as exc:
        config(**kw)
    got = str(exc.value)
    assert got == msg or (msg.startswith("adapter_dtype") and got.startswith(msg))


# Divisors of the 24 features a layer-size refusal lists: block sizes (>1), block counts (<24).
_SIZES, _NUMS = "[2, 3, 4, 6, 8, 12, 24]", "[1, 2, 3, 4, 6, 8, 12]"
_AUTO = " (or set auto_adjust=True to take the nearest divisor, as PEFT does silently)"


def _refusal(method: str, field: str, value: int, valid: str, one_feature: bool = False, hint: str = "") -> str:
    """The refusal of ``field=value`` on a 24-feature ``blk.layer``: no divisor, or blocks of one feature."""
    why = (
        "gives blocks of 1 feature on 'blk.layer' (in_features=24), which cannot rotate"
        if one_feature
        else "does not divide in_features=24 of 'blk.layer'"
    )
    return f"{method}: {field}={value} {why}; valid {field} values for this layer: {valid}{hint}"


@pytest.mark.parametrize(
    "layer, config, kw, msg",
    [
        (OFTLayer, OFTConfig, dict(oft_block_size=5), _refusal("oft", "oft_block_size", 5, _SIZES, hint=_AUTO)),
        (OFTLayer, OFTConfig, dict(oft_block_size=48), _refusal("oft", "oft_block_size", 48, _SIZES, hint=_AUTO)),
        (OFTLayer, OFTConfig, dict(oft_block_size=0, r=5), _refusal("oft", "r", 5, _NUMS, hint=_AUTO)),
        (OFTLayer, OFTConfig, dict(oft_block_size=0, r=24), _refusal("oft", "r", 24, _NUMS, one_feature=True)),
        (OFTLayer, OFTConfig, dict(oft_block_size=1), _refusal("oft", "oft_block_size", 1, _SIZES, one_feature=True)),
        (BOFTLayer, BOFTConfig, dict(boft_block_size=5), _refusal("boft", "boft_block_size", 5, _SIZES)),
        (BOFTLayer, BOFTConfig, dict(boft_block_size=48), _refusal("boft", "boft_block_size", 48, _SIZES)),
        (
            BOFTLayer,
            BOFTConfig,
            dict(boft_block_size=0, boft_block_num=5),
            _refusal("boft", "boft_block_num", 5, _NUMS),
        ),
        (
            BOFTLayer,
            BOFTConfig,
            dict(boft_block_size=0, boft_block_num=48),
            _refusal("boft", "boft_block_num", 48, _NUMS),
        ),
        (
            BOFTLayer,
            BOFTConfig,
            dict(boft_block_size=0, boft_block_num=24),
            _refusal("boft", "boft_block_num", 24, _NUMS, one_feature=True),
        ),
        (
            BOFTLayer,
            BOFTConfig,
            dict(boft_block_size=1),
            _refusal("boft", "boft_block_size", 1, _SIZES, one_feature=True),
        ),
        (
            BOFTLayer,
            BOFTConfig,
            dict(boft_block_size=4, boft_n_butterfly_factor=3),
            "boft: boft_n_butterfly_factor=3 needs an even block size and a block count divisible by 2^2=4, but "
            "'blk.layer' (in_features=24) has block size 4 and 6 blocks; butterfly factors this layer can hold with "
            "block size 4: [1, 2]; block sizes that allow 3 factors here: [2, 6]",
        ),
    ],
)
def test_layer_size_refusals_list_the_values_that_fit(layer, config, kw, msg):
    with pytest.raises(la.AdapterConfigError) as exc:
        layer(nn.Linear(24, 8), config(**kw), "blk.layer")
    assert str(exc.value) == msg


class OwnKernelLinear(nn.Linear):
    """Plays a quantized layer: its weight is what dequantizing gives, its own forward counts its calls."""

    calls = 0

    def _la_base_forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return F.linear(x, self.weight, self.bias)


def quantized(in_f: int, out_f: int, dtype: torch.dtype, bias: bool = True) -> tuple[nn.Linear, nn.Module]:
    """``(real, stand_in)``: ``stand_in`` is what a method's ``base`` is on a quantized layer (see ``stand_in``)."""
    real = OwnKernelLinear(in_f, out_f, bias=bias).to(dtype).requires_grad_(False)
    view = DequantizedLinear.__new__(DequantizedLinear)
    view.__dict__.update(real.__dict__)
    view.__dict__.update(_la_real=real, _la_dtype=dtype, _la_w=real.weight.detach())
    return real, view


@pytest.mark.parametrize(
    "layer_cls, config, attr, base, x",
    [
        (OFTLayer, OFTConfig, "module_dropout", lambda: nn.Linear(8, 3), torch.linspace(-1, 1, 16).reshape(2, 8)),
        (
            OFTLayer,
            OFTConfig,
            "module_dropout",
            lambda: nn.Conv2d(2, 3, 2),
            torch.linspace(-1, 1, 36).reshape(2, 2, 3, 3),
        ),
        (OFTLayer, OFTConfig, "module_dropout", lambda: nn.Embedding(5, 8), torch.tensor([[1, 4, 0]])),
        (BOFTLayer, BOFTConfig, "dropout_p", lambda: nn.Linear(8, 3), torch.linspace(-1, 1, 16).reshape(2, 8)),
        (BOFTLayer, BOFTConfig, "dropout_p", lambda: nn.Conv2d(2, 3, 2), torch.linspace(-1, 1, 36).reshape(2, 2, 3, 3)),
    ],
    ids=["oft-linear", "oft-conv2d", "oft-embedding", "boft-linear", "boft-conv2d"],
)
@pytest.mark.parametrize("training, p", [(True, 0.0), (False, 0.5)])
def test_forward_draws_nothing_without_dropout_in_training(layer_cls, config, attr, base, x, training, p):
    # Dropout applies only in training with p > 0: any other forward leaves the global generator untouched and
    # equals the forward with p = 0.
    size = dict(oft_block_size=2) if layer_cls is OFTLayer else dict(boft_block_size=2, boft_n_butterfly_factor=2)
    model = la.inject(Wrap(base()), config(target_modules=["layer"], init_weights=False, **size))
    layer = model.layer.adapter.default
    with torch.no_grad():
        model.eval()
        want = model(x)
        setattr(layer, attr, p)
        model.train(training)
        state = torch.get_rng_state()
        got = model(x)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(got, want)
