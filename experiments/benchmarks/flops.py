"""Analytic multiply-accumulate counts of one training step: the arithmetic floor each implementation is held to.

Only matrix products are counted (norms, activations, softmax and the optimizer are memory-bound extras that
every configuration shares). ``N`` is the number of tokens in the batch.

- A frozen linear layer ``(in → out)`` costs ``N·in·out`` forward and the same again for the input gradient;
  a trained one adds ``N·in·out`` for the weight gradient.
- Attention costs ``2·N·S·hidden`` forward (scores and values over the full sequence ``S``) and twice that
  backward (both operands are activations).
- The frozen base step = every product forward + every input gradient; full fine-tuning adds every weight
  gradient (the head's included).
- An adapter adds the cheapest known formulation of its own products: forward, input gradient and parameter
  gradients, roughly three times its forward cost (``3·fwd``), taken per layer as the minimum over the
  formulations listed in each function below.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from experiments.benchmarks.workloads import Workload


@dataclass
class LayerInfo:
    """One adapted module as the FLOP formulas see it.

    Attributes:
        name: Module name.
        in_f, out_f: Input and output features of a linear layer.
        shapes: The adapter tensors' shapes in PEFT's layout (``layer.peft_shapes()``).
    """

    name: str
    in_f: int
    out_f: int
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)


def block_linears(w: Workload) -> list[tuple[str, int, int]]:
    """``(suffix, in, out)`` of every linear layer in one transformer block of ``w``."""
    h, f = w.hidden, w.ffn
    if w.kind == "bert":
        return [
            ("query", h, h),
            ("key", h, h),
            ("value", h, h),
            ("attention.output.dense", h, h),
            ("intermediate.dense", h, f),
            ("output.dense", f, h),
        ]
    hd = h // w.heads
    kv = w.kv_heads * hd
    return [
        ("q_proj", h, w.heads * hd),
        ("k_proj", h, kv),
        ("v_proj", h, kv),
        ("o_proj", w.heads * hd, h),
        ("gate_proj", h, f),
        ("up_proj", h, f),
        ("down_proj", f, h),
    ]


def _head_macs(w: Workload) -> int:
    """Forward MACs of the output head: the decoder's LM head over every token; the encoder's pooler and
    classifier over one token per sequence."""
    if w.kind == "bert":
        return w.batch * (w.hidden * w.hidden + w.hidden * w.num_labels)
    return w.tokens * w.hidden * w.vocab


def base_train_macs(w: Workload) -> int:
    """Frozen base: every product forward and every input gradient, no weight gradient."""
    n = w.tokens
    lin = n * sum(i * o for _, i, o in block_linears(w)) * w.layers
    attn = 2 * n * w.seq * w.hidden * w.layers
    return 2 * lin + 3 * attn + 2 * _head_macs(w)


def full_train_macs(w: Workload) -> int:
    """Full fine-tuning: the frozen base plus the weight gradient of every linear layer and the head."""
    n = w.tokens
    lin = n * sum(i * o for _, i, o in block_linears(w)) * w.layers
    return base_train_macs(w) + lin + _head_macs(w)


# ------------------------------------------------------------------------------------------------------------
# Adapters: extra MACs of one training step over the frozen base


def _dense_delta(n: int, layer: LayerInfo, factor_macs: int) -> int:
    """Fold ``ΔW`` into ``W`` (no extra forward product) and pay a full weight gradient plus building ``ΔW``."""
    return n * layer.in_f * layer.out_f + 3 * factor_macs


def lora_macs(n: int, layers: list[LayerInfo], r: int) -> int:
    """LoRA ``B A x``: ``N·r·(in+out)`` forward and twice that for the input, ``A`` and ``B`` gradients; or, folded
    (``x (W + s·B·A)ᵀ`` forward, ``g (W + s·B·A)`` backward), only ``h = A x`` forward and ``∂h``, ``∂A``, ``∂B``
    backward, plus building ``B·A`` twice (``out·in·r`` each), whichever is cheaper per layer."""
    total = 0
    for li in layers:
        plain = 3 * n * r * (li.in_f + li.out_f)
        folded = 2 * n * r * (li.in_f + li.out_f) + 2 * r * li.in_f * li.out_f
        total += min(plain, folded)
    return total


def dora_macs(n: int, layers: list[LayerInfo], r: int) -> int:
    """DoRA: the folded LoRA form (``h = A x`` forward; ``∂h``, ``∂A``, ``∂B`` backward) with ``B·A`` built once
    (``out·in·r``): ``W + s·B·A`` serves the weight norm, the forward and the ``[W + s·B·A | s·B]`` backward."""
    return sum(2 * n * r * (li.in_f + li.out_f) + r * li.in_f * li.out_f for li in layers)


def loha_macs(n: int, layers: list[LayerInfo], r: int) -> int:
    """LoHa ``ΔW = (B₁A₁) ⊙ (B₂A₂)``: the cheaper of the rank-r² factorisation (row-wise products of the factors,
    then LoRA at rank r²) and the folded dense ``ΔW`` (one weight-sized gradient)."""
    total = 0
    for li in layers:
        low_rank = 3 * n * r * r * (li.in_f + li.out_f)
        total += min(low_rank, _dense_delta(n, li, 2 * r * li.in_f * li.out_f))
    return total


def _chain_cost(mats: list[tuple[int, int]], other: int) -> int:
    """MACs of applying ``mats`` (each ``(rows, cols)``, applied right to left) along one axis of a tensor whose
    other axis has ``other`` entries."""
    return sum(rows * cols * other for rows, cols in mats)


def _kron_factor(shapes: dict[str, tuple[int, ...]], which: str) -> tuple[list[tuple[int, int]], int, int]:
    """One Kronecker factor as a chain of matrices ``[(rows, cols), ...]`` (low-rank = two), and its full shape."""
    if f"lokr_{which}" in shapes:
        rows, cols = shapes[f"lokr_{which}"][:2]
        return [(rows, cols)], rows, cols
    a, b = shapes[f"lokr_{which}_a"], shapes[f"lokr_{which}_b"]
    return [(a[0], a[1]), (b[0], b[1])], a[0], b[1]


def lokr_macs(n: int, layers: list[LayerInfo]) -> int:
    """LoKr ``ΔW = W₁ ⊗ W₂`` (each factor full or low-rank): ``ΔW x`` as ``W₁ X W₂ᵀ`` on ``x`` reshaped to
    ``(a₂, b₂)``, in the cheaper order, 3× forward; or the folded dense ``ΔW``, whichever is cheaper per layer."""
    total = 0
    for li in layers:
        left, a1, a2 = _kron_factor(li.shapes, "w1")
        right, b1, b2 = _kron_factor(li.shapes, "w2")
        right_first = _chain_cost(right, a2) + _chain_cost(left, b1)
        left_first = _chain_cost(left, b2) + _chain_cost(right, a1)
        kron = 3 * n * min(right_first, left_first)
        total += min(kron, _dense_delta(n, li, li.in_f * li.out_f))
    return total


def oft_macs(n: int, layers: list[LayerInfo], block: int, factors: int = 1) -> int:
    """OFT/BOFT: ``factors`` block-diagonal rotations (blocks ``block × block``, any permutation is an index
    gather) applied to the input, 3× forward; or a rotated weight with a full weight gradient, if cheaper."""
    total = 0
    for li in layers:
        rotate_input = 3 * n * li.in_f * block * factors
        total += min(rotate_input, _dense_delta(n, li, li.out_f * li.in_f * block * factors))
    return total


def llama_adapter_macs(w: Workload, adapter_len: int, adapter_layers: int) -> int:
    """Llama-Adapter: every query also attends to ``adapter_len`` prompt tokens (scores and values: ``2·N·L·hidden``)
    in each adapted layer, 3× forward; projecting the prompt itself is independent of the batch."""
    return 3 * 2 * w.tokens * adapter_len * w.hidden * adapter_layers


FlopFn = Callable[[Workload, list[LayerInfo], dict[str, Any]], int]
