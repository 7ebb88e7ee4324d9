"""LoRA+ (Hayou et al. 2024, "LoRA+: Efficient Low Rank Adaptation of Large Models"): a larger learning rate for B.

With ``η_B = λ·η_A`` (``loraplus_lr_ratio`` λ, typically 2 to 16) LoRA's two factors learn features at matched
speeds. The parameter groups are PEFT's ``peft.optimizers.create_loraplus_optimizer`` groups, in its order:

- A: every trainable tensor not in another group (``lora_A``, 2-D ``modules_to_save`` weights): ``lr``.
- embedding: ``lora_A`` and ``lora_B`` of adapted Embeddings: ``lr_embedding``.
- B: ``lora_B`` and 1-D tensors (DoRA magnitudes, ...): ``λ·lr``.
- B, no decay: the same, for biases and tensors inside a LayerNorm: ``λ·lr`` and weight decay 0.

The other groups have ``weight_decay``. As in PEFT, "1-D" counts every trainable vector (biases of
``modules_to_save`` too), and a conv's DoRA magnitude (shaped ``(1, out, 1, 1)``) falls in group A.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lightning_adapters.core.inject import adapted_modules
from lightning_adapters.errors import AdapterConfigError


def loraplus_param_groups(
    model: nn.Module,
    lr: float,
    loraplus_lr_ratio: float,
    *,
    weight_decay: float = 0.0,
    lr_embedding: float = 1e-6,
) -> list[dict[str, Any]]:
    """LoRA+ parameter groups of ``model``'s trainable parameters, for any ``torch.optim`` optimizer.

    Args:
        model: An injected model, or any module holding one (a LightningModule: call it in ``configure_optimizers``
            as ``torch.optim.AdamW(loraplus_param_groups(self, lr=2e-4, loraplus_lr_ratio=16))``).
        lr: Learning rate of A (and of every tensor not in another group).
        loraplus_lr_ratio: ``η_B / η_A``.
        weight_decay: Weight decay of every group but the no-decay one (PEFT's ``loraplus_weight_decay``).
        lr_embedding: Learning rate of adapted Embeddings' factors (PEFT's ``loraplus_lr_embedding``).

    Returns:
        Four groups (A, embedding, B, B without decay), each ``{"params", "lr", "weight_decay"}``; empty groups
        are kept, as PEFT keeps them.

    Raises:
        AdapterConfigError: A non-positive ``lr``, ratio or embedding lr, a negative weight decay, or no trainable
            parameter.
    """
    for value, name in ((lr, "lr"), (loraplus_lr_ratio, "loraplus_lr_ratio"), (lr_embedding, "lr_embedding")):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise AdapterConfigError(f"loraplus_param_groups: {name} must be a positive number, got {value!r}")
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or not weight_decay >= 0:
        raise AdapterConfigError(f"loraplus_param_groups: weight_decay must be >= 0, got {weight_decay!r}")
    b_ids: set[int] = set()
    embedding_ids: set[int] = set()
    for _, _, layer in adapted_modules(model):
        for b_name in ("lora_B", "out_lora_B"):  # out_lora_B: the out_proj factor of LoRA on MultiheadAttention
            b = getattr(layer, b_name, None)
            if isinstance(b, nn.Parameter):
                b_ids.add(id(b))
            elif isinstance(b, nn.ParameterDict):  # LoRA on target_parameters: one B per parameter
                b_ids.update(id(v) for v in b.values())
        if getattr(layer, "kind", None) == "embedding":
            embedding_ids.update({id(layer.lora_B), id(layer.lora_A)})
    no_decay = _no_decay_ids(model)
    groups: dict[str, list[nn.Parameter]] = {"A": [], "embedding": [], "B": [], "B_no_decay": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in embedding_ids:
            groups["embedding"].append(p)
        elif id(p) in b_ids or p.ndim == 1:
            groups["B_no_decay" if id(p) in no_decay or "bias" in name else "B"].append(p)
        else:
            groups["A"].append(p)
    if not any(groups.values()):
        raise AdapterConfigError("loraplus_param_groups: the model has no trainable parameter; inject an adapter first")
    return [
        {"params": groups["A"], "lr": lr, "weight_decay": weight_decay},
        {"params": groups["embedding"], "lr": lr_embedding, "weight_decay": weight_decay},
        {"params": groups["B"], "lr": lr * loraplus_lr_ratio, "weight_decay": weight_decay},
        {"params": groups["B_no_decay"], "lr": lr * loraplus_lr_ratio, "weight_decay": 0.0},
    ]


def _no_decay_ids(model: nn.Module) -> set[int]:
    """Parameters held (at any depth) by an ``nn.LayerNorm`` (transformers' ``ALL_LAYERNORM_LAYERS``)."""
    return {id(p) for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()}
