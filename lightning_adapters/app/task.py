"""The task the training app fine-tunes: a text encoder, a pooling step and a one-output linear head.

``TextRegressor`` is an ordinary LightningModule that knows nothing about adapters; the app adds
``AdapterCallback`` to the trainer, which injects the adapters into it and freezes the backbone. The head is a
new layer, so the app lists it in the method's ``modules_to_save``: it is trained in full and saved with the
adapter. With no method (``experiment=frozen_baseline``) the same head is trained on the frozen backbone, the
baseline a fine-tuned adapter has to beat.

Backbones: a pretrained Hugging Face model (hub id or local directory), a Hugging Face architecture built
from a config with random weights (tiny test models), or ``TextCNN``, a small character CNN whose convolutions
are what the ``target=conv`` preset adapts.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanAbsoluteError, MetricCollection, PearsonCorrCoef, SpearmanCorrCoef
from torchmetrics.classification import BinaryAccuracy, BinaryAUROC, BinaryF1Score

from lightning_adapters.app.data import OBJECTIVES
from lightning_adapters.optim import loraplus_param_groups

POOLINGS = ("mean", "cls", "last")
LR_SCHEDULES = ("linear", "cosine", "constant")


def pretrained_backbone(name_or_path: str, dtype: str | None = None, **model_kwargs: Any) -> nn.Module:
    """A pretrained Hugging Face encoder or decoder without its task head (``AutoModel``).

    Args:
        name_or_path: Hub id (read from the local cache: the app runs with ``HF_HUB_OFFLINE=1`` unless the
            environment says otherwise) or a local model directory.
        dtype: Optional weight dtype name, e.g. ``"bfloat16"``.
        **model_kwargs: Passed to the model class, e.g. ``add_pooling_layer=False`` for Bert (the task pools
            itself, and an unused pooler would hold adapters that never get a gradient).
    """
    from transformers import AutoModel

    if dtype:
        model_kwargs["dtype"] = getattr(torch, dtype)
    # transformers prints a table of every checkpoint key the model does not use. Without a pooler that table
    # only lists the pooler's weights, which are left out on purpose: the keys are checked here instead, and
    # only the unexpected ones are reported.
    hf_logger = logging.getLogger("transformers.modeling_utils")
    quiet = _DropLoadReport()
    hf_logger.addFilter(quiet)
    try:
        model, info = AutoModel.from_pretrained(name_or_path, output_loading_info=True, **model_kwargs)
    finally:
        hf_logger.removeFilter(quiet)
    skipped = () if model_kwargs.get("add_pooling_layer", True) else ("pooler.",)
    problems = {
        "missing": sorted(info.get("missing_keys", [])),
        "unexpected": sorted(k for k in info.get("unexpected_keys", []) if not k.startswith(skipped)),
        "mismatched": sorted(str(k) for k in info.get("mismatched_keys", [])),
    }
    for kind, keys in problems.items():
        if keys:
            warnings.warn(f"{name_or_path}: {len(keys)} {kind} weights, e.g. {keys[:4]}", stacklevel=2)
    # from_pretrained returns eval mode; train like a freshly built module (Lightning switches modes around eval).
    return model.train()


class _DropLoadReport(logging.Filter):
    """Drops transformers' key-by-key load report (``pretrained_backbone`` checks the keys itself)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in record.getMessage()


def backbone_from_config(model_type: str, model_kwargs: dict[str, Any] | None = None, **config: Any) -> nn.Module:
    """A Hugging Face architecture with random weights, e.g. ``backbone_from_config("llama", hidden_size=64)``.

    Args:
        model_type: A transformers ``model_type`` (``"bert"``, ``"llama"``, ``"qwen2"``, ...).
        model_kwargs: Passed to the model class (e.g. ``{"add_pooling_layer": False}`` for Bert).
        **config: Fields of the architecture's config.
    """
    from transformers import AutoConfig, AutoModel

    return AutoModel.from_config(AutoConfig.for_model(model_type, **config), **(model_kwargs or {}))


def pretrained_tokenizer(name_or_path: str) -> Any:
    """The tokenizer stored with a pretrained model (hub id or local directory)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name_or_path)


class TextCNN(nn.Module):
    """Character CNN: byte embedding, then ``num_layers`` residual Conv1d blocks over the sequence.

    Args:
        vocab_size: Embedding rows (257 for ``ByteTokenizer``).
        hidden_size: Embedding and channel width.
        kernel_size: Odd convolution width (padding keeps the length).
        num_layers: Convolution blocks, named ``blocks.<i>.conv``.
    """

    def __init__(self, vocab_size: int = 257, hidden_size: int = 64, kernel_size: int = 3, num_layers: int = 2):
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"TextCNN kernel_size must be odd to keep the sequence length, got {kernel_size}")
        self.hidden_size = hidden_size
        self.embed = nn.Embedding(vocab_size, hidden_size, padding_idx=0)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"conv": nn.Conv1d(hidden_size, hidden_size, kernel_size, padding=kernel_size // 2)})
            for _ in range(num_layers)
        )

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.embed(input_ids).transpose(1, 2)  # (B, T) -> (B, H, T)
        for block in self.blocks:
            h = h + F.gelu(block["conv"](h))  # (B, H, T)
        return h.transpose(1, 2)  # (B, T, H)


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """(B, T, H) hidden states and (B, T) mask -> (B, H): masked mean, first token, or last real token."""
    if how == "cls":
        return hidden[:, 0]
    if how == "last":
        last = mask.long().sum(1).clamp(min=1) - 1  # (B,) index of the last real token (right padding)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    m = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)


class TextRegressor(L.LightningModule):
    """Backbone -> pooling -> dropout -> ``head`` (Linear hidden -> 1), for a rating or its sign.

    Args:
        backbone: Module called as ``backbone(input_ids=..., attention_mask=...)`` returning hidden states
            ``(B, T, H)`` or an object with ``last_hidden_state``.
        tokenizer: The backbone's tokenizer; the app hands it to the data module.
        optimizer: Partial optimizer, called with the trainable parameters.
        objective: ``"regression"`` (MSE; Pearson, Spearman, MAE) or ``"sign"`` (BCE; accuracy, F1, AUROC).
        pooling: ``"mean"`` over real tokens, ``"cls"`` (first token) or ``"last"`` (last real token, decoders).
        head_dropout: Dropout before the head.
        lr_schedule: ``"linear"`` or ``"cosine"`` decay after warm-up, or ``"constant"``.
        warmup_ratio: Share of the optimizer steps spent warming the learning rate up from 0.
        freeze_backbone: Freeze every backbone parameter here (the frozen baseline); with an adapter method the
            callback does the freezing instead.
    """

    head_name = "head"

    def __init__(
        self,
        backbone: nn.Module,
        tokenizer: Any,
        optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer],
        objective: str = "regression",
        pooling: str = "mean",
        head_dropout: float = 0.1,
        lr_schedule: str = "linear",
        warmup_ratio: float = 0.06,
        freeze_backbone: bool = False,
    ) -> None:
        super().__init__()
        for value, name, choices in (
            (objective, "objective", OBJECTIVES),
            (pooling, "pooling", POOLINGS),
            (lr_schedule, "lr_schedule", LR_SCHEDULES),
        ):
            if value not in choices:
                raise ValueError(f"model.{name}={value!r} is not one of {choices}")
        if not 0.0 <= warmup_ratio < 1.0:
            raise ValueError(f"model.warmup_ratio={warmup_ratio} must be in [0, 1)")
        hidden = getattr(getattr(backbone, "config", None), "hidden_size", None) or backbone.hidden_size
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.optimizer_factory = optimizer
        self.objective = objective
        self.pooling = pooling
        self.lr_schedule = lr_schedule
        self.warmup_ratio = warmup_ratio
        self.dropout = nn.Dropout(head_dropout)
        self.head = nn.Linear(hidden, 1)
        if freeze_backbone:
            self.backbone.requires_grad_(False)
        if objective == "regression":
            with warnings.catch_warnings():
                # Spearman keeps every prediction until compute(); the validation split is small, so that is fine.
                warnings.filterwarnings("ignore", message=".*SpearmanCorrcoef.*buffer", category=UserWarning)
                spearman = SpearmanCorrCoef()
            metrics = {"pearson": PearsonCorrCoef(), "spearman": spearman, "mae": MeanAbsoluteError()}
        else:
            metrics = {"acc": BinaryAccuracy(), "f1": BinaryF1Score(), "auroc": BinaryAUROC()}
        collection = MetricCollection(metrics)
        self.val_metrics = collection.clone(prefix="val/")
        self.test_metrics = collection.clone(prefix="test/")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Token ids and mask (B, T) -> one raw output per text (B,): the rating, or the logit of its sign."""
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask)
        hidden = out if isinstance(out, torch.Tensor) else out.last_hidden_state  # (B, T, H)
        pooled = pool(hidden, attention_mask, self.pooling)  # (B, H)
        return self.head(self.dropout(pooled.to(self.head.weight.dtype))).squeeze(-1)  # (B,)

    def adapter_init_batch(self, batch: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        """A train batch as this module's (or its backbone's) keyword arguments, for the data-driven LoRA inits
        (CorDA, EVA; EVA then skips the padded positions)."""
        ids, mask, _ = batch
        return {"input_ids": ids, "attention_mask": mask}

    def _loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out, y = out.float(), y.float()
        if self.objective == "regression":
            return F.mse_loss(out, y)
        return F.binary_cross_entropy_with_logits(out, y)

    def _prediction(self, out: torch.Tensor) -> torch.Tensor:
        return out.float() if self.objective == "regression" else torch.sigmoid(out.float())

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        ids, mask, y = batch
        loss = self._loss(self(ids, mask), y)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(y))
        return loss

    def _eval_step(self, batch: tuple[torch.Tensor, ...], metrics: MetricCollection, stage: str) -> None:
        ids, mask, y = batch
        out = self(ids, mask)
        self.log(f"{stage}/loss", self._loss(out, y), prog_bar=True, sync_dist=True, batch_size=len(y))
        target = y.float() if self.objective == "regression" else y.long()
        metrics.update(self._prediction(out), target)
        self.log_dict(metrics, prog_bar=True, batch_size=len(y))

    def validation_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics, "val")

    def test_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics, "test")

    def _optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        """The optimizer; with ``loraplus_lr_ratio`` in its arguments, over LoRA+ parameter groups.

        ``+model.optimizer.loraplus_lr_ratio=16`` (optionally ``+model.optimizer.loraplus_lr_embedding=...``) gives B
        16 times the learning rate (``lightning_adapters.loraplus_param_groups``, PEFT's groups); the optimizer's
        ``weight_decay`` applies to every group but biases and norms.
        """
        factory = self.optimizer_factory
        keywords = dict(getattr(factory, "keywords", {}))
        ratio = keywords.pop("loraplus_lr_ratio", None)
        lr_embedding = keywords.pop("loraplus_lr_embedding", 1e-6)
        if ratio is None:
            return factory(params)
        if "lr" not in keywords:
            raise ValueError("model.optimizer.loraplus_lr_ratio needs model.optimizer.lr (the learning rate of A)")
        groups = loraplus_param_groups(
            self, keywords["lr"], ratio, weight_decay=keywords.get("weight_decay", 0.0), lr_embedding=lr_embedding
        )
        return factory.func(groups, *factory.args, **keywords)

    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise RuntimeError("TextRegressor has no trainable parameter: nothing to optimise")
        opt = self._optimizer(params)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(self.warmup_ratio * total)
        schedule = self.lr_schedule

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            if schedule == "constant":
                return 1.0
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
