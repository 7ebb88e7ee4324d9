"""Tiny models and layers used across the test suite (random init, built from configs: nothing downloaded)."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def tiny_llama(**overrides: Any) -> nn.Module:
    """Llama, hidden 64, 2 layers, 4 heads, 2 KV heads (GQA), vocab 128."""
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=128,
    )
    kw.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**kw)).eval()


def tiny_bert(num_labels: int = 3, **overrides: Any) -> nn.Module:
    """Bert for sequence classification, hidden 64, 2 layers, 4 heads, vocab 128."""
    from transformers import BertConfig, BertForSequenceClassification

    kw = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=128,
        max_position_embeddings=64,
        num_labels=num_labels,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    kw.update(overrides)
    return BertForSequenceClassification(BertConfig(**kw)).eval()


def tiny_gpt2(**overrides: Any) -> nn.Module:
    """GPT-2, n_embd 64, 2 layers, 4 heads, vocab 128 (attention uses transformers Conv1D)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    kw = dict(
        n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    )
    kw.update(overrides)
    return GPT2LMHeadModel(GPT2Config(**kw)).eval()


class SmallCNN(nn.Module):
    """Two convs and a linear head on 3×16×16 images."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.fc(self.pool(x).flatten(1))


def token_batch(vocab: int = 128, shape: tuple[int, int] = (2, 9), seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, shape, generator=g)


class Wrap(nn.Module):
    """A model holding one layer called ``layer`` (so every contract case targets ``["layer"]``)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer
        self.head = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


@dataclass
class LayerKind:
    """A base layer to adapt and a matching input."""

    name: str
    make: Callable[[], nn.Module]
    make_input: Callable[[], torch.Tensor]


def _conv1d_t(in_f: int, out_f: int) -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    m = Conv1D(out_f, in_f)
    nn.init.normal_(m.weight, std=0.2)
    nn.init.normal_(m.bias, std=0.2)
    return m


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


LAYERS: dict[str, LayerKind] = {
    "linear": LayerKind("linear", lambda: nn.Linear(24, 20), lambda: torch.randn(3, 5, 24, generator=_g(1))),
    "linear_odd": LayerKind("linear_odd", lambda: nn.Linear(17, 13), lambda: torch.randn(4, 17, generator=_g(2))),
    "conv1d_t": LayerKind("conv1d_t", lambda: _conv1d_t(24, 36), lambda: torch.randn(2, 5, 24, generator=_g(3))),
    "embedding": LayerKind(
        "embedding", lambda: nn.Embedding(50, 16, padding_idx=0), lambda: torch.randint(0, 50, (3, 7), generator=_g(4))
    ),
    "conv1d": LayerKind(
        "conv1d", lambda: nn.Conv1d(8, 12, 3, padding=1), lambda: torch.randn(2, 8, 15, generator=_g(5))
    ),
    "conv1d_dilated": LayerKind(
        "conv1d_dilated",
        lambda: nn.Conv1d(8, 12, 3, padding=2, dilation=2),
        lambda: torch.randn(2, 8, 15, generator=_g(6)),
    ),
    "conv2d_1x1": LayerKind(
        "conv2d_1x1", lambda: nn.Conv2d(8, 16, 1), lambda: torch.randn(2, 8, 6, 6, generator=_g(7))
    ),
    "conv2d": LayerKind(
        "conv2d", lambda: nn.Conv2d(8, 16, 3, padding=1), lambda: torch.randn(2, 8, 9, 9, generator=_g(8))
    ),
    "conv2d_strided": LayerKind(
        "conv2d_strided",
        lambda: nn.Conv2d(8, 16, 3, stride=2, padding=0),
        lambda: torch.randn(2, 8, 9, 9, generator=_g(9)),
    ),
    "conv2d_dilated": LayerKind(
        "conv2d_dilated",
        lambda: nn.Conv2d(8, 16, 3, padding=2, dilation=2),
        lambda: torch.randn(2, 8, 9, 9, generator=_g(10)),
    ),
    "conv2d_groups": LayerKind(
        "conv2d_groups",
        lambda: nn.Conv2d(8, 16, 3, padding=1, groups=2),
        lambda: torch.randn(2, 8, 7, 7, generator=_g(11)),
    ),
    "conv3d": LayerKind(
        "conv3d",
        lambda: nn.Conv3d(4, 6, 3, stride=(1, 2, 1), padding=1),
        lambda: torch.randn(2, 4, 3, 5, 4, generator=_g(17)),
    ),
    "conv3d_groups_reflect": LayerKind(
        "conv3d_groups_reflect",
        lambda: nn.Conv3d(4, 6, (1, 3, 3), padding=(0, 1, 1), groups=2, padding_mode="reflect"),
        lambda: torch.randn(2, 4, 3, 5, 4, generator=_g(18)),
    ),
    # Padding other than zeros, and string padding (an even kernel makes "same" pad asymmetrically).
    "conv2d_reflect": LayerKind(
        "conv2d_reflect",
        lambda: nn.Conv2d(8, 16, 3, padding=1, padding_mode="reflect"),
        lambda: torch.randn(2, 8, 7, 7, generator=_g(12)),
    ),
    "conv2d_circular_strided": LayerKind(
        "conv2d_circular_strided",
        lambda: nn.Conv2d(8, 16, 3, stride=2, padding=2, dilation=2, padding_mode="circular"),
        lambda: torch.randn(2, 8, 9, 9, generator=_g(13)),
    ),
    "conv2d_replicate_groups": LayerKind(
        "conv2d_replicate_groups",
        lambda: nn.Conv2d(8, 16, 3, padding=(1, 2), groups=2, padding_mode="replicate"),
        lambda: torch.randn(2, 8, 7, 7, generator=_g(14)),
    ),
    "conv2d_same": LayerKind(
        "conv2d_same",
        lambda: nn.Conv2d(8, 16, (2, 3), padding="same", dilation=(2, 1)),
        lambda: torch.randn(2, 8, 7, 7, generator=_g(15)),
    ),
    "conv1d_replicate_same": LayerKind(
        "conv1d_replicate_same",
        lambda: nn.Conv1d(8, 12, 4, padding="same", padding_mode="replicate"),
        lambda: torch.randn(2, 8, 15, generator=_g(16)),
    ),
}

# The layers above whose conv attributes go beyond zeros padding given as numbers.
CONV_PADDING_LAYERS = [
    "conv2d_reflect",
    "conv2d_circular_strided",
    "conv2d_replicate_groups",
    "conv2d_same",
    "conv1d_replicate_same",
]


@dataclass
class ContractCase:
    """One (method config × layer kind) row of the contract suite.

    Attributes:
        id: Test id.
        make_config: ``(target_modules) -> config``.
        layer: A key of ``LAYERS``.
        identity_at_init: Whether the default init must give exactly the base output.
        mergeable: Whether merge/unmerge are part of the contract.
        atol_merge: Tolerance of merged vs unmerged outputs.
    """

    id: str
    make_config: Callable[[list[str]], Any]
    layer: str
    identity_at_init: bool = True
    mergeable: bool = True
    atol_merge: float = 1e-5
    tags: set[str] = field(default_factory=set)


def randomize_adapter(model: nn.Module, std: float = 0.1, seed: int = 0) -> None:
    """Give every trainable adapter tensor random values, so the adapter is not the identity."""
    import lightning_adapters as la

    g = torch.Generator().manual_seed(seed)
    sd = la.adapter_state_dict(model)
    with torch.no_grad():
        for _, t in sd.items():
            if t.is_floating_point():
                t.add_(torch.randn(t.shape, generator=g, dtype=torch.float32).to(t.device, t.dtype) * std)


class _Held:
    """A tensor autograd saved, held by the graph node that saved it (garbage once that node is freed)."""

    __slots__ = ("t", "__weakref__")

    def __init__(self, t: torch.Tensor) -> None:
        self.t = t


def autograd_kept_bytes(model: nn.Module, x: torch.Tensor, min_numel: int = 0) -> int:
    """Bytes of the tensors of at least ``min_numel`` values that the graph of ``model(x)`` keeps for backward, each
    storage once; parameters and ``x`` itself are not counted. Deterministic: it counts what autograd holds after the
    forward, not an allocator's high-water mark."""
    alive: weakref.WeakSet = weakref.WeakSet()

    def pack(t: torch.Tensor) -> _Held:
        held = _Held(t)
        alive.add(held)
        return held

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda held: held.t):
        y = model(x)
    gc.collect()  # a temporary graph (PEFT DoRA's detached lora_B(lora_A(eye))) frees what it saved
    skip = {p.untyped_storage().data_ptr() for p in model.parameters()} | {x.untyped_storage().data_ptr()}
    kept = {
        h.t.untyped_storage().data_ptr(): h.t.untyped_storage().nbytes()
        for h in alive
        if h.t.numel() >= min_numel and h.t.untyped_storage().data_ptr() not in skip
    }
    assert y.grad_fn is not None
    return sum(kept.values())


def layer_op(base: nn.Module, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """What ``base`` computes on ``x`` with weight ``w`` and ``bias`` in its own layout (Linear, Conv1D, Conv1d/2d)."""
    if isinstance(base, nn.Conv2d):
        return F.conv2d(x, w, bias, base.stride, base.padding, base.dilation, base.groups)
    if isinstance(base, nn.Conv1d):
        return F.conv1d(x, w, bias, base.stride, base.padding, base.dilation, base.groups)
    from transformers.pytorch_utils import Conv1D

    if isinstance(base, Conv1D):  # transformers' (in, out) layout
        return x @ w + (0 if bias is None else bias)
    return F.linear(x, w, bias)
