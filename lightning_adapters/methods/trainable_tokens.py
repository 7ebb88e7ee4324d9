"""Trainable tokens: train only some rows of an embedding (new special tokens), as PEFT's ``trainable_token_indices``.

For the indices ``I`` of an embedding ``E (V, d)`` the layer holds ``delta (|I|, d)``, initialised to ``E[I]``, and
looks tokens up in ``E'`` = ``E`` with rows ``I`` replaced by ``delta``. The base stays frozen, so only those rows
learn. An output head whose weight *is* the embedding's (``tie_word_embeddings=True``) computes ``x E'ᵀ`` with the
same ``delta`` parameter, so input and output stay tied. Merging writes ``delta`` into ``E[I]`` (keeping the old
rows for an exact unmerge).

PEFT's file layout: ``<embedding>.token_adapter.trainable_tokens_delta`` (the tied head has no key of its own), and
``trainable_token_indices`` in ``adapter_config.json`` as given (a list for the model's input embedding, or
``{module name: indices}``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_adapters.core.layer import AdapterLayer
from lightning_adapters.core.targeting import check_plain_layers, name_matches, saves_module
from lightning_adapters.errors import AdapterConfigError, TargetError, UnsupportedLayerError
from lightning_adapters.methods._common import write_weight_

PEFT_SUFFIX = "token_adapter.trainable_tokens_delta"


def check_indices(value: Any, method: str) -> None:
    """Validate ``trainable_token_indices``: None, a list of token ids, or ``{module name: list of ids}``."""
    if value is None:
        return

    def ids_ok(v: Any) -> bool:
        return (
            isinstance(v, (list, tuple))
            and len(v) > 0
            and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in v)
            and len(set(v)) == len(v)
        )

    if isinstance(value, dict):
        bad = {k: v for k, v in value.items() if not (isinstance(k, str) and k and ids_ok(v))}
    else:
        bad = None if ids_ok(value) else value
    if bad or not value:
        raise AdapterConfigError(
            f"{method}: trainable_token_indices={value!r} must be a non-empty list of distinct token ids >= 0 (rows "
            "of the model's input embedding) or {module name: such a list}, e.g. [32000, 32001] or "
            "{'embed_tokens': [32000]}"
        )


class TrainableTokensLayer(AdapterLayer):
    """Rows ``indices`` of an ``nn.Embedding`` (or of the ``nn.Linear`` head tied to it) made trainable.

    Attributes:
        indices: The token ids (a long buffer, not saved: the config holds them).
        delta: ``(len(indices), d)`` replacement rows; shared with the tied head's layer.
        tied: Whether this layer is the head tied to another layer's embedding (it has no tensors in the file).
    """

    not_additive_reason = "it replaces embedding rows rather than adding to them"

    def __init__(self, base: nn.Module, indices: list[int], name: str, delta: nn.Parameter | None = None) -> None:
        super().__init__()
        rows = base.weight.shape[0]
        too_big = [i for i in indices if i >= rows]
        if too_big:
            raise AdapterConfigError(
                f"lora: trainable_token_indices {too_big} are out of range for {name!r}, which has {rows} rows; "
                "resize the embedding first (model.resize_token_embeddings) or use ids below the vocabulary size"
            )
        self.name = name
        self.register_buffer("indices", torch.tensor(indices, dtype=torch.long, device=base.weight.device), False)
        self.tied = delta is not None
        if delta is None:
            delta = nn.Parameter(base.weight.detach()[self.indices].clone())
        self.delta = delta
        self.merge_rows: torch.Tensor | None = None

    def _weight(self, base: nn.Module) -> torch.Tensor:
        """``E`` with rows ``indices`` replaced by ``delta`` (differentiable in ``delta`` only)."""
        w = base.weight
        return w.index_copy(0, self.indices, self.delta.to(w.dtype))

    def adapted_forward(self, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
        w = self._weight(base)
        if isinstance(base, nn.Embedding):
            # Dense lookup even for a sparse=True base: only ``delta`` takes a gradient, through ``index_copy``,
            # which cannot carry a sparse one (backward would fail), and the frozen base needs none.
            return F.embedding(x, w, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, False)
        return F.linear(x, w, base.bias)

    def merge(self, base: nn.Module, *, safe: bool = False) -> None:
        if self.tied:  # the embedding's layer writes the shared rows
            self.merged = True
            return
        w = base.weight
        with torch.no_grad():
            self.merge_rows = w.detach()[self.indices].clone()
            write_weight_(w, self._weight(base).detach(), safe=safe)
        self.merged = True

    def unmerge(self, base: nn.Module) -> None:
        if not self.tied and self.merge_rows is not None:
            with torch.no_grad():
                base.weight.index_copy_(0, self.indices, self.merge_rows.to(base.weight))
        self.forget_merge()
        self.merged = False

    def forget_merge(self) -> None:
        self.merge_rows = None

    def peft_state(self) -> dict[str, torch.Tensor]:
        return {} if self.tied else {PEFT_SUFFIX: self.delta.detach()}

    def load_peft_state(self, state: dict[str, torch.Tensor]) -> None:
        if PEFT_SUFFIX in state:
            with torch.no_grad():
                self.delta.copy_(state[PEFT_SUFFIX].to(dtype=self.delta.dtype, device=self.delta.device))

    def apply_dtype(self, dtype: torch.dtype) -> None:
        # The rows replace base rows: they keep the base dtype, as PEFT's copies do.
        return

    def extra_repr(self) -> str:
        tied = ", tied to the input embedding" if self.tied else ""
        return f"tokens={self.indices.tolist()}{tied}, merged={self.merged}"


def _input_embedding_name(model: nn.Module) -> str:
    get_in = getattr(model, "get_input_embeddings", None)
    emb = None
    if get_in is not None:
        try:
            emb = get_in()
        except (AttributeError, NotImplementedError):
            emb = None
    names = [n for n, m in model.named_modules() if n and (m is emb if emb is not None else n.endswith("embed_tokens"))]
    if len(names) != 1:
        raise TargetError(
            "lora: trainable_token_indices is a list, which targets the model's input embedding, but "
            f"{'none' if not names else names} was found; give {{embedding module name: indices}} instead"
        )
    return names[0]


def token_layers(model: nn.Module, config: Any, targets: list[str]) -> dict[str, TrainableTokensLayer]:
    """The trainable-token layers ``config.trainable_token_indices`` asks for, built but not attached.

    Raises:
        TargetError: A name matches no module, or an embedding that is also a LoRA target / in ``modules_to_save``.
        UnsupportedLayerError: A matched module is not a plain ``nn.Embedding``.
    """
    spec = config.trainable_token_indices
    if spec is None:
        return {}
    wanted = spec if isinstance(spec, dict) else {_input_embedding_name(model): list(spec)}
    chosen: dict[str, list[int]] = {}
    for key, ids in wanted.items():
        names = [n for n, _ in model.named_modules() if n and name_matches(n, [key])]
        if len(names) != 1:
            raise TargetError(
                f"lora: trainable_token_indices key {key!r} matches {len(names)} modules {names[:4]}; name exactly "
                "one embedding module"
            )
        chosen[names[0]] = list(ids)
    for n in chosen:
        module = model.get_submodule(n)
        if type(module) is not nn.Embedding and not isinstance(module, nn.Embedding):
            raise UnsupportedLayerError(
                f"lora: trainable_token_indices names {n!r}, a {type(module).__name__}; only nn.Embedding rows can "
                "be trained this way (name the input embedding, e.g. 'embed_tokens')"
            )
        clash = [t for t in targets if t == n]
        if clash or saves_module(n, config.modules_to_save or []):
            raise TargetError(
                f"lora: {n!r} is in trainable_token_indices and also in "
                f"{'target_modules' if clash else 'modules_to_save'}; choose one way to train it"
            )
    check_plain_layers(model, list(chosen), "lora", (nn.Embedding,))
    layers: dict[str, TrainableTokensLayer] = {}
    for n, ids in chosen.items():
        layers[n] = TrainableTokensLayer(model.get_submodule(n), ids, n)
    # Heads whose weight is an embedding's own Parameter (tied) read the same rows.
    for n, layer in list(layers.items()):
        weight = model.get_submodule(n).weight
        for head_name, head in model.named_modules():
            if head_name and head_name != n and isinstance(head, nn.Linear) and head.weight is weight:
                if head_name in layers or head_name in targets:
                    raise TargetError(
                        f"lora: {head_name!r} shares its weight with {n!r} (tied embeddings); it cannot also be a "
                        "LoRA target or carry its own trainable_token_indices"
                    )
                layers[head_name] = TrainableTokensLayer(head, layer.indices.tolist(), head_name, delta=layer.delta)
    return layers
