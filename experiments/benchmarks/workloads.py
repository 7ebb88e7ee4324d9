"""The two reference workloads (random init, fp32, CPU): models, batches and the training loss.

- ``encoder``: BERT-style, 6 layers, hidden 384, 12 heads, ffn 1536, sequence classification, batch 16×128.
- ``decoder``: Llama-style, 4 layers, hidden 512, 8 heads / 4 KV heads (GQA), ffn 1376, vocab 32000,
  causal LM, batch 4×256.

Every linear layer of the transformer blocks is the adapter target. ``--quick`` shrinks both to toy sizes
so a smoke run of every method takes seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

ENCODER_TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
DECODER_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class Workload:
    """One model shape and batch.

    Attributes:
        name: ``encoder`` or ``decoder``.
        kind: ``bert`` or ``llama``.
        layers, hidden, heads, kv_heads, ffn, vocab: Model shape.
        batch, seq: Batch shape in tokens.
        targets: Adapter target suffixes (every linear of the blocks).
        num_labels: Classes of the encoder's classification head.
    """

    name: str
    kind: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    batch: int
    seq: int
    targets: list[str] = field(default_factory=list)
    num_labels: int = 2

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    def describe(self) -> str:
        gqa = f"/{self.kv_heads} KV" if self.kv_heads != self.heads else ""
        return (
            f"{self.kind}, {self.layers} layers, hidden {self.hidden}, {self.heads}{gqa} heads, ffn {self.ffn}, "
            f"vocab {self.vocab}, batch {self.batch}×{self.seq}"
        )


FULL = {
    "encoder": Workload("encoder", "bert", 6, 384, 12, 12, 1536, 30522, 16, 128, ENCODER_TARGETS),
    "decoder": Workload("decoder", "llama", 4, 512, 8, 4, 1376, 32000, 4, 256, DECODER_TARGETS),
}
QUICK = {
    "encoder": Workload("encoder", "bert", 2, 64, 4, 4, 128, 512, 2, 16, ENCODER_TARGETS),
    "decoder": Workload("decoder", "llama", 2, 64, 4, 2, 96, 512, 2, 16, DECODER_TARGETS),
}


def get_workload(name: str, quick: bool) -> Workload:
    """The workload called ``name`` at full or quick size."""
    return (QUICK if quick else FULL)[name]


def build_model(w: Workload, seed: int = 0) -> nn.Module:
    """A randomly initialised transformers model of ``w``'s shape, in train mode, dropout off."""
    torch.manual_seed(seed)
    if w.kind == "bert":
        from transformers import BertConfig, BertForSequenceClassification

        cfg = BertConfig(
            vocab_size=w.vocab,
            hidden_size=w.hidden,
            num_hidden_layers=w.layers,
            num_attention_heads=w.heads,
            intermediate_size=w.ffn,
            max_position_embeddings=max(512, w.seq),
            num_labels=w.num_labels,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        model = BertForSequenceClassification(cfg)
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(
            vocab_size=w.vocab,
            hidden_size=w.hidden,
            num_hidden_layers=w.layers,
            num_attention_heads=w.heads,
            num_key_value_heads=w.kv_heads,
            intermediate_size=w.ffn,
            max_position_embeddings=max(512, w.seq),
            tie_word_embeddings=False,
        )
        model = LlamaForCausalLM(cfg)
    return model.train()


def make_batch(w: Workload, seed: int = 1) -> dict[str, torch.Tensor]:
    """A fixed batch of token ids and labels for ``w``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, w.vocab, (w.batch, w.seq), generator=g)
    if w.kind == "bert":
        labels = torch.randint(0, w.num_labels, (w.batch,), generator=g)
    else:
        labels = ids.clone()
    return {"input_ids": ids, "labels": labels}


def loss_of(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The training loss transformers computes from ``labels`` (cross-entropy; shifted for the decoder)."""
    return model(**batch).loss


def input_embeddings(model: nn.Module) -> nn.Module:
    """The token-embedding module of a transformers model (or of the model a PEFT wrapper holds)."""
    inner: Any = model
    while not hasattr(inner, "get_input_embeddings") and hasattr(inner, "model"):
        inner = inner.model
    return inner.get_input_embeddings()
