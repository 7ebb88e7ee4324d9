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


def llama_ffn(hidden: int) -> int:
    """Llama's SwiGLU width for ``hidden``: ⌈8/3 · hidden⌉ rounded up to a multiple of 32 (512 -> 1376)."""
    return -(-(8 * hidden) // (3 * 32)) * 32


def scaled_decoder(hidden: int, seq: int, layers: int, batch: int = 1, vocab: int = 32000) -> Workload:
    """The decoder workload grown to ``hidden`` and ``seq``: heads of 64 up to hidden 1024 and of 128 above
    (as Llama 1B-7B), half as many KV heads (GQA), Llama's SwiGLU width."""
    heads = hidden // (64 if hidden <= 1024 else 128)
    name = f"h{hidden}-s{seq}-L{layers}" + (f"-b{batch}" if batch != 1 else "")
    return Workload(
        name, "llama", layers, hidden, heads, max(1, heads // 2), llama_ffn(hidden), vocab, batch, seq, DECODER_TARGETS
    )


def build_model(w: Workload, seed: int = 0, device: str | torch.device | None = None) -> nn.Module:
    """A randomly initialised transformers model of ``w``'s shape, in train mode, dropout off.

    ``device``: where the weights are created and initialised (a 1B-parameter model initialises in seconds on a
    GPU and in minutes on two CPU cores); the CPU when None.
    """
    torch.manual_seed(seed)
    if device is not None and torch.device(device).type != "cpu":
        with torch.device(device):
            return build_model(w, seed)
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


def make_batch(w: Workload, seed: int = 1, device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
    """A fixed batch of token ids and labels for ``w`` (on ``device``, the CPU when None)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, w.vocab, (w.batch, w.seq), generator=g)
    if w.kind == "bert":
        labels = torch.randint(0, w.num_labels, (w.batch,), generator=g)
    else:
        labels = ids.clone()
    return {"input_ids": ids.to(device), "labels": labels.to(device)}


def loss_of(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The training loss transformers computes from ``labels`` (cross-entropy; shifted for the decoder)."""
    return model(**batch).loss


def input_embeddings(model: nn.Module) -> nn.Module:
    """The token-embedding module of a transformers model (or of the model a PEFT wrapper holds)."""
    inner: Any = model
    while not hasattr(inner, "get_input_embeddings") and hasattr(inner, "model"):
        inner = inner.model
    return inner.get_input_embeddings()
