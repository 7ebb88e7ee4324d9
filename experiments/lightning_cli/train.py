"""LightningCLI with lightning_adapters: the whole run, adapter included, in YAML files.

The task is the training app's (a sentence encoder, mean pooling and a new linear head that predicts the VADER
valence rating of a word); the adapter is one ``AdapterCallback`` entry under ``trainer.callbacks``, so switching
methods is switching YAML files. Run from the repository root::

    python experiments/lightning_cli/train.py fit --config experiments/lightning_cli/config.yaml \\
        --config experiments/lightning_cli/lora.yaml

``lora.yaml`` names the config class (``class_path: lightning_adapters.LoRAConfig``), ``loha.yaml`` uses the
shorthand ``config: {method: loha, r: 8, ...}``; neither needs any setup in this script. The callback adapts
``self.backbone`` (``module: backbone``); the head beside it trains in full and is saved in every checkpoint with
the adapter, and nothing of the frozen encoder is.
"""

from __future__ import annotations

from functools import partial

import torch
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightning_adapters.app.data import ByteTokenizer, RatedTextDataModule
from lightning_adapters.app.store import minilm_dir, vader_lexicon_path
from lightning_adapters.app.task import TextRegressor, backbone_from_config, pretrained_backbone, pretrained_tokenizer

# A 2-layer Bert with random weights reading UTF-8 bytes: the same run in seconds (``--model.tiny=true``).
TINY_BERT = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    vocab_size=257,
    max_position_embeddings=64,
)


def tokenizer_for(encoder: str | None, tiny: bool):
    """The tokenizer of ``encoder`` (``None``: the all-MiniLM-L6-v2 the app ships), or bytes for the tiny model."""
    return ByteTokenizer() if tiny else pretrained_tokenizer(encoder or minilm_dir())


class WordValence(TextRegressor):
    """The app's ``TextRegressor`` with arguments a YAML file can hold.

    Args:
        encoder: Hugging Face hub id or local directory of the encoder; ``None``: the shipped all-MiniLM-L6-v2.
        tiny: Use a 2-layer random Bert on bytes instead (smoke runs and tests).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
    """

    def __init__(self, encoder: str | None = None, tiny: bool = False, lr: float = 2e-3, weight_decay: float = 0.01):
        if tiny:
            backbone = backbone_from_config("bert", {"add_pooling_layer": False}, **TINY_BERT)
        else:
            backbone = pretrained_backbone(encoder or minilm_dir(), add_pooling_layer=False)
        super().__init__(
            backbone=backbone,
            tokenizer=tokenizer_for(encoder, tiny),
            optimizer=partial(torch.optim.AdamW, lr=lr, weight_decay=weight_decay),
        )


class VaderWords(RatedTextDataModule):
    """The VADER lexicon shipped by ``vaderSentiment``, tokenised for the model's encoder.

    Args:
        encoder: Linked to ``model.encoder`` (the tokenizer must match the encoder).
        tiny: Linked to ``model.tiny``.
        batch_size: Training batch size (evaluation uses twice as many).
        max_length: Tokens kept per text.
    """

    def __init__(self, encoder: str | None = None, tiny: bool = False, batch_size: int = 64, max_length: int = 16):
        super().__init__(
            path=vader_lexicon_path(),
            tokenizer=tokenizer_for(encoder, tiny),
            batch_size=batch_size,
            max_length=max_length,
        )


class CLI(LightningCLI):
    """Links the data's tokenizer to the model's encoder."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model.encoder", "data.encoder")
        parser.link_arguments("model.tiny", "data.tiny")


def main(args: list[str] | None = None) -> LightningCLI:
    """Run the CLI (``args``: the command line, for tests); returns it, with ``.model`` and ``.trainer``."""
    return CLI(WordValence, VaderWords, args=args, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
