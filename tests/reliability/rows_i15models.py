"""Bad-input rows of issue 15 (odd models and targeting): tied or aliased weights, modules whose parent reads
their weight without calling them, and invalid regexes in targeting and pattern fields.

``rows(Row)`` builds them with ``test_bad_inputs.Row`` (passed in, so this module never imports the test module
and ``python -m tests.reliability.test_bad_inputs`` keeps working).
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

import lightning_adapters as la
from tests.helpers import tiny_gpt2, tiny_llama


def _cfg(name: str, **kw: Any):
    return lambda m, p: getattr(la, name)(**kw)


def _inject(name: str, **kw: Any):
    return lambda m, p: la.inject(m, getattr(la, name)(**kw))


def _tied_llama() -> nn.Module:
    return tiny_llama(tie_word_embeddings=True)


class _ViewTied(nn.Module):
    """Two Linear layers whose weights are views of one tensor (tied by memory, not by Parameter identity)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 6)
        self.b.weight = nn.Parameter(self.a.weight.data)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


class _Aliased(nn.Module):
    """One Linear registered twice, as ``first`` and ``second``."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(6, 6)
        self.second = self.first
        self.out = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.second(self.first(x)))


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.attn(x, x, x)[0])


def _encoder() -> nn.Module:
    return nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), 2).eval()


def _ragged_list() -> nn.Module:
    block = nn.Linear(6, 6)
    return nn.Sequential(copy.deepcopy(block), block, block)


class _ScaledEmbedding(nn.Embedding):
    """An embedding that scales its output in forward (as BART's and Gemma's word embeddings do)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 8.0


def _scaled_embedding() -> nn.Module:
    return nn.Sequential(_ScaledEmbedding(20, 8), nn.Linear(8, 4))


def _weight_norm() -> nn.Module:
    return nn.Sequential(OrderedDict(net=torch.nn.utils.parametrizations.weight_norm(nn.Linear(8, 8))))


def _spectral_norm() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 8), torch.nn.utils.spectral_norm(nn.Conv2d(8, 8, 3)))


def rows(Row: type) -> list:  # noqa: N803 - the Row class of test_bad_inputs
    """The rows, as ``Row`` instances."""
    return [
        Row(
            "target-modules-invalid-regex",
            None,
            _cfg("LoRAConfig", target_modules=r"layers\.(0|1\.q_proj"),
            la.AdapterConfigError,
            r"target_modules: 'layers.*' is not a valid regular expression \(missing \).*re\.escape",
        ),
        Row(
            "exclude-modules-invalid-regex",
            None,
            _cfg("LoHaConfig", target_modules=["q_proj"], exclude_modules="[0-9"),
            la.AdapterConfigError,
            r"exclude_modules: '\[0-9' is not a valid regular expression \(unterminated character set",
        ),
        Row(
            "rank-pattern-invalid-regex",
            None,
            _cfg("LoKrConfig", rank_pattern={"*_proj": 4}),
            la.AdapterConfigError,
            r"lokr: rank_pattern key: '\*_proj' is not a valid regular expression \(nothing to repeat",
        ),
        Row(
            "alpha-pattern-invalid-regex",
            None,
            _cfg("LoRAConfig", alpha_pattern={"q_proj)": 4.0}),
            la.AdapterConfigError,
            r"lora: alpha_pattern key: 'q_proj\)' is not a valid regular expression \(unbalanced parenthesis",
        ),
        Row(
            "rank-pattern-key-not-string",
            None,
            _cfg("LoHaConfig", rank_pattern={3: 4}),
            la.AdapterConfigError,
            r"loha: rank_pattern keys must be non-empty module name patterns \(strings\), got 3",
        ),
        Row(
            "tied-lm-head",
            _tied_llama,
            _inject("LoRAConfig", r=4, target_modules=["lm_head"]),
            la.TargetError,
            r"'lm_head.weight' shares its memory with 'model.embed_tokens.weight' \(tied weights.*"
            r"exclude_modules=\['lm_head'\].*untie it.*tie_word_embeddings=False",
        ),
        Row(
            "tied-input-embedding",
            tiny_gpt2,
            _inject("OFTConfig", oft_block_size=8, target_modules=["wte"]),
            la.TargetError,
            r"oft: 'transformer.wte.weight' shares its memory with 'lm_head.weight'",
        ),
        Row(
            "tied-by-memory-view",
            _ViewTied,
            _inject("LoKrConfig", r=2, target_modules=["a"]),
            la.TargetError,
            r"lokr: 'a.weight' shares its memory with 'b.weight'.*exclude_modules=\['a'\]",
        ),
        Row(
            "aliased-module-partly-selected",
            _Aliased,
            _inject("LoHaConfig", r=2, target_modules=["first", "out"], exclude_modules=["second"]),
            la.TargetError,
            r"module 'first' is also registered as 'second' \(one module object under 2 names\).*"
            r"Select all of \['first', 'second'\] or none.*copy.deepcopy",
        ),
        Row(
            "aliased-module-in-list",
            _ragged_list,
            _inject("AdaLoRAConfig", init_r=2, target_r=1, total_step=10, target_modules=r"1"),
            la.TargetError,
            r"adalora: module '1' is also registered as '2'",
        ),
        Row(
            "mha-out-proj",
            _Attention,
            _inject("LoRAConfig", r=2, target_modules=["out_proj", "proj"]),
            la.UnsupportedLayerError,
            r"'attn.out_proj' is the out_proj of nn.MultiheadAttention 'attn', which reads out_proj.weight directly.*"
            r"exclude_modules=\['attn.out_proj'\]",
        ),
        Row(
            "mha-out-proj-all-linear",
            _Attention,
            _inject("BOFTConfig", boft_block_size=4, target_modules="all-linear"),
            la.UnsupportedLayerError,
            r"boft: 'attn.out_proj' is the out_proj of nn.MultiheadAttention",
        ),
        Row(
            "mha-itself",
            _Attention,
            _inject("OFTConfig", oft_block_size=4, target_modules=["attn"]),
            la.UnsupportedLayerError,
            r"oft: cannot adapt \{'attn': 'MultiheadAttention'\}",
        ),
        Row(
            "subclass-with-own-forward",
            _scaled_embedding,
            _inject("LoRAConfig", r=2, target_modules=["0"]),
            la.UnsupportedLayerError,
            r"lora: '0' is a _ScaledEmbedding, a subclass of Embedding with its own forward.*exclude_modules=\['0'\]",
        ),
        Row(
            "parametrized-weight",
            _weight_norm,
            _inject("LoKrConfig", r=2, target_modules=["net"]),
            la.UnsupportedLayerError,
            r"lokr: the weight of 'net' is computed \(a parametrization.*remove_parametrizations",
        ),
        Row(
            "spectral-norm-hook-weight",
            _spectral_norm,
            _inject("OFTConfig", oft_block_size=8, target_modules=["1"]),
            la.UnsupportedLayerError,
            r"oft: the weight of '1' is computed .*not a plain Parameter",
        ),
        Row(
            "encoder-layer-fast-path",
            _encoder,
            _inject("LoHaConfig", r=2, target_modules=["linear2"]),
            la.UnsupportedLayerError,
            r"'layers.0.linear2' belongs to nn.TransformerEncoderLayer 'layers.0', whose inference fast path.*"
            r"set_fastpath_enabled\(False\)",
        ),
    ]
