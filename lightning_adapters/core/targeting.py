"""Which modules a config targets: suffix lists, full-match regexes and ``"all-linear"``."""

from __future__ import annotations

import difflib
import re
from typing import Any

import torch
from torch import nn

from lightning_adapters.core.quant import quant_scheme
from lightning_adapters.errors import TargetError, UnsupportedLayerError

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # transformers is a hard dependency; this keeps the engine importable without it
    Conv1D = None

LINEAR_TYPES: tuple[type, ...] = (nn.Linear,) + ((Conv1D,) if Conv1D is not None else ())

# PEFT's per-architecture defaults for LoRA-like methods when target_modules is None.
DEFAULT_TARGETS: dict[str, list[str] | str] = {
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "bloom": ["query_key_value"],
    "blip-2": ["q", "v", "q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "gpt_neo": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"],
    "deberta": ["in_proj"],
    "layoutlm": ["query", "value"],
    "llama": ["q_proj", "v_proj"],
    "llama4": ["q_proj", "v_proj"],
    "chatglm": ["query_key_value"],
    "gpt_bigcode": ["c_attn"],
    "mpt": ["Wqkv"],
    "RefinedWebModel": ["query_key_value"],
    "RefinedWeb": ["query_key_value"],
    "falcon": ["query_key_value"],
    "btlm": ["c_proj", "c_attn"],
    "codegen": ["qkv_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "stablelm": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "gemma4": ".*language_model\\..*\\.(q_proj|v_proj)",
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "rwkv": ["key", "value", "receptance", "output"],
    "rwkv7": ["r_proj", "k_proj", "v_proj", "o_proj", "key", "value"],
}


def name_matches(name: str, selector: Any) -> bool:
    """Whether module ``name`` is selected by a suffix list or full-match regex ``selector``."""
    if selector is None:
        return False
    if isinstance(selector, str):
        return re.fullmatch(selector, name) is not None
    return any(name == s or name.endswith("." + s) for s in selector)


def saves_module(name: str, entries: list[str]) -> bool:
    """Whether module ``name`` is selected by the ``modules_to_save`` entries, by PEFT's rule for that field: the
    name ends with an entry as a string (``"c2"`` selects ``"fc2"`` too; ``"0.proj"`` selects
    ``"layers.10.proj"``), not at a dot as ``target_modules`` entries do. One config selects the same modules here
    and in PEFT, and PEFT's files of such a config load."""
    return any(name.endswith(e) for e in entries)


def layer_index_selected(name: str, layers_to_transform: Any, layers_pattern: Any) -> bool:
    """PEFT's layer filter: whether module ``name``'s layer index is one of ``layers_to_transform``.

    The index is the first number that follows a ``layers_pattern`` segment (``(^|.*.)<pattern>.<idx>.``), or
    without a pattern the first number that is the third name segment or later (``model.layers.3.q_proj`` -> 3,
    ``model.layers.1.experts.0.w1`` -> 1). A name without such an index is not selected.
    """
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern or [])
    match = None
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    for pattern in patterns:
        match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
        if match is not None:
            break
    if match is None:
        return False
    index = int(match.group("idx"))
    return index == layers_to_transform if isinstance(layers_to_transform, int) else index in layers_to_transform


def output_head_names(model: nn.Module) -> set[str]:
    """Names of a transformers model's output embedding (``lm_head``), excluded by ``"all-linear"``."""
    get_out = getattr(model, "get_output_embeddings", None)
    if get_out is None:
        return set()
    try:
        head = get_out()
    except (AttributeError, NotImplementedError):
        return set()
    if head is None:
        return set()
    return {n for n, m in model.named_modules() if m is head}


def module_aliases(model: nn.Module) -> list[tuple[list[str], nn.Module]]:
    """Every sub-module with all the names it is reachable under, in ``named_modules`` order.

    A module registered twice (``nn.ModuleList([block] * 2)``, ``self.b = self.a``) is one entry with several
    names; its first name is the one ``named_modules()`` reports.
    """
    by_id: dict[int, tuple[list[str], nn.Module]] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        by_id.setdefault(id(m), ([], m))[0].append(n)
    return list(by_id.values())


def resolve_targets(
    model: nn.Module,
    target_modules: Any,
    exclude_modules: Any,
    *,
    method: str,
    default_targets: dict[str, list[str]] | None = None,
    skip: set[str] | None = None,
    layers_to_transform: Any = None,
    layers_pattern: Any = None,
    none_selects_nothing: bool = False,
) -> list[str]:
    """Names of the modules ``target_modules`` selects, minus ``exclude_modules`` and ``skip``.

    ``target_modules=None`` takes the model type's default targets; without one it is an error, or, with
    ``none_selects_nothing`` (a config that adapts something else, such as LoRA's ``target_parameters``), no module
    (PEFT's rule: it looks up the defaults first, and adapts only the parameters when there are none).

    With ``layers_to_transform`` (list ``target_modules`` only) a module matched by a suffix is kept only if its
    layer index is selected (``layer_index_selected``); one named in full is kept as it is (PEFT's rule).

    Raises:
        TargetError: Nothing matched; the message shows the closest module names.
    """
    skip = skip or set()
    if isinstance(target_modules, list) and not target_modules:
        return []  # a config that adapts only what its method adds itself (LoRA's target_parameters)
    if target_modules is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        table = default_targets if default_targets is not None else DEFAULT_TARGETS
        if model_type not in table and none_selects_nothing:
            return []
        if model_type not in table:
            raise TargetError(
                f"{method}: target_modules is None and there is no default for model type {model_type!r}; "
                f"set target_modules (known defaults: {sorted(table)})"
            )
        target_modules = table[model_type]
    if target_modules == "all-linear":
        heads = output_head_names(model)

        def selected(n: str, m: nn.Module) -> bool:
            return isinstance(m, LINEAR_TYPES) and n not in heads and not name_matches(n, exclude_modules)

    else:
        by_index = layers_to_transform is not None and not (
            isinstance(layers_to_transform, list) and not layers_to_transform
        )

        def selected(n: str, m: nn.Module) -> bool:
            if not n or not name_matches(n, target_modules) or name_matches(n, exclude_modules):
                return False
            if not by_index or isinstance(target_modules, str) or n in target_modules:
                return True
            return layer_index_selected(n, layers_to_transform, layers_pattern)

    names: list[str] = []
    for all_names, module in module_aliases(model):
        chosen = [n for n in all_names if selected(n, module) and n not in skip]
        if not chosen:
            continue
        left_out = [n for n in all_names if n not in chosen]
        if left_out:
            raise TargetError(
                f"{method}: module {chosen[0]!r} is also registered as {left_out[0]!r} (one module object under "
                f"{len(all_names)} names); an adapter on it acts under every name, but {left_out[0]!r} is not "
                f"selected (not in target_modules, excluded, or in modules_to_save). Select all of {all_names} "
                f"or none, or give one name its own copy (copy.deepcopy) before inject"
            )
        names.append(all_names[0])
    if not names:
        all_names = [n for n, _ in model.named_modules() if n]
        wanted = [target_modules] if isinstance(target_modules, str) else list(target_modules)
        close: list[str] = []
        for w in wanted:
            leaf_names = sorted({n.rsplit(".", 1)[-1] for n in all_names})
            close += difflib.get_close_matches(w, leaf_names, n=3, cutoff=0.4)
        hint = f"closest module names: {sorted(set(close))}" if close else f"some module names: {all_names[:8]}"
        raise TargetError(
            f"{method}: target_modules={target_modules!r} matched no module "
            f"(exclude_modules={exclude_modules!r}); {hint}"
        )
    return names


def _storage_span(t: torch.Tensor) -> tuple[int, int, int] | None:
    """``(storage address, first byte, last byte + 1)`` of the memory ``t`` can touch, or None without storage."""
    if t.device.type == "meta" or t.numel() == 0:
        return None
    try:
        base = t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError, TypeError):  # tensor subclasses without a plain storage
        return None
    start = t.storage_offset() * t.element_size()
    extent = sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride())) + 1
    return base, start, start + extent * t.element_size()


def check_untied(model: nn.Module, targets: list[str], method: str) -> None:
    """Refuse a target whose ``weight`` shares memory with a tensor of another module (or another name).

    ``merge`` writes ``W + ΔW`` into the target's weight. If that memory is also another module's weight (tied
    input/output embeddings, ``tie_word_embeddings=True``) or another tensor of the model, the merge changes that
    module too, so the merged model would no longer compute what the unmerged one does. Untying is the fix.

    Raises:
        TargetError: Naming the target and the tensor it shares memory with, with the fix.
    """
    spans: dict[int, list[tuple[int, int, str, int]]] = {}
    for mod_name, module in model.named_modules():
        tensors = list(module._parameters.items()) + list(module._buffers.items())
        for t_name, t in tensors:
            span = None if t is None else _storage_span(t)
            if span is not None:
                full = f"{mod_name}.{t_name}" if mod_name else t_name
                spans.setdefault(span[0], []).append((span[1], span[2], full, id(module)))
    for target in targets:
        module = model.get_submodule(target)
        weight = module._parameters.get("weight")
        span = None if weight is None else _storage_span(weight)
        if span is None:
            continue
        own = f"{target}.weight" if target else "weight"
        for start, end, full, owner in spans.get(span[0], []):
            if (owner == id(module) and full.rsplit(".", 1)[-1] == "weight") or end <= span[1] or start >= span[2]:
                continue
            untie = f"model.{own} = torch.nn.Parameter(model.{own}.detach().clone())"
            raise TargetError(
                f"{method}: {own!r} shares its memory with {full!r} (tied weights, e.g. tie_word_embeddings=True); "
                f"merging the adapter into {target!r} would change {full!r} too, so merged and unmerged outputs "
                f"would differ. Leave {target!r} out (exclude_modules=[{target!r}]) or untie it before inject: "
                f"{untie} (for a transformers model also set config.tie_word_embeddings=False so it is not re-tied)"
            )


def check_called(model: nn.Module, targets: list[str], method: str) -> None:
    """Refuse a target whose parent reads its weight directly instead of calling it.

    Such an adapter would be skipped by the unmerged forward (and its parameters get no gradient) but take
    effect once merged. Known readers: ``nn.MultiheadAttention`` (``out_proj.weight`` goes straight to
    ``F.multi_head_attention_forward``) and ``nn.TransformerEncoderLayer``, whose inference fast path reads
    ``linear1``/``linear2``/``self_attn`` weights while PyTorch's MHA fast path is enabled.

    Raises:
        UnsupportedLayerError: Naming the target, the reader and the fix.
    """
    for target in targets:
        parent_name, _, leaf = target.rpartition(".")
        parent = model.get_submodule(parent_name) if target else None
        where = f" {parent_name!r}" if parent_name else ""
        if isinstance(parent, nn.MultiheadAttention):
            raise UnsupportedLayerError(
                f"{method}: {target!r} is the {leaf} of nn.MultiheadAttention{where}, which reads {leaf}.weight "
                f"directly instead of calling it, so an adapter there would be ignored until merged; leave it out "
                f"(exclude_modules=[{target!r}])"
                + (
                    f", and target the nn.MultiheadAttention {parent_name!r} itself: LoRA adapts its in_proj and "
                    "out_proj together, as PEFT does"
                    if method == "lora"
                    else ""
                )
            )
        if isinstance(parent, nn.TransformerEncoderLayer) and leaf in ("linear1", "linear2", "self_attn"):
            if torch.backends.mha.get_fastpath_enabled():
                raise UnsupportedLayerError(
                    f"{method}: {target!r} belongs to nn.TransformerEncoderLayer{where}, whose inference fast path "
                    f"reads {leaf}.weight directly, so an adapter there would be ignored in eval under no_grad; "
                    f"switch PyTorch's fast path off before inject (torch.backends.mha.set_fastpath_enabled(False)) "
                    f"or leave it out (exclude_modules=[{target!r}])"
                )


def _scalar_embed_scale(module: nn.Module) -> bool:
    scale = getattr(module, "embed_scale", None)
    if isinstance(scale, torch.Tensor):
        return scale.numel() == 1
    return isinstance(scale, (int, float)) and not isinstance(scale, bool)


def check_plain_layers(model: nn.Module, targets: list[str], method: str, supported: tuple[type, ...]) -> None:
    """Refuse a target whose product is not the plain one of the supported type it derives from.

    The methods compute the adapted layer from ``weight``/``bias`` with the supported type's own product (or call
    ``_conv_forward``), and merge by writing ``weight``. A subclass with its own ``forward`` (a scaled embedding,
    a conv that pads in ``forward``) would lose what that forward adds, and a computed weight (a parametrization,
    ``weight_norm``, ``spectral_norm``) would not keep a merge. An ``nn.Embedding`` with ``max_norm`` rewrites its
    own weight in every forward. Quantized bases (``core.quant``: bitsandbytes layers, torchao weights) pass: the
    methods compute with their dequantized weight, and a merge re-quantizes.

    Raises:
        UnsupportedLayerError: Naming the target, what is special about it and the fix.
    """
    from torch.nn.utils import parametrize

    for target in targets:
        module = model.get_submodule(target)
        kinds = [t for t in supported if isinstance(module, t)]
        if not kinds:
            continue  # inject reports unsupported types itself
        try:
            scheme = quant_scheme(module)
        except UnsupportedLayerError as err:
            raise UnsupportedLayerError(f"{method}: cannot adapt {target!r}: {err}") from err
        if scheme is not None:
            continue  # a quantized base: the methods compute with its dequantized weight (core/quant.py)
        ref = next(t for t in kinds if all(issubclass(t, o) for o in kinds))  # the most derived supported type
        # A module that already holds another named adapter is judged by its own class, not the adapted subclass.
        own = type(module).__mro__[1] if getattr(type(module), "_la_adapted", False) else type(module)
        overridden = [f for f in ("forward", "_conv_forward") if getattr(own, f, None) is not getattr(ref, f, None)]
        if overridden == ["forward"] and method == "lora" and ref is nn.Embedding and _scalar_embed_scale(module):
            # transformers' *ScaledWordEmbedding: forward = lookup · embed_scale, which LoRA applies to its term too.
            overridden = []
        if overridden:
            raise UnsupportedLayerError(
                f"{method}: {target!r} is a {type(module).__name__}, a subclass of {ref.__name__} with its own "
                f"{overridden[0]}; the adapter computes {ref.__name__}'s product from the weights, so what that "
                f"{overridden[0]} adds would be lost. Leave it out (exclude_modules=[{target!r}]) or use a plain "
                f"{ref.__name__}"
            )
        if isinstance(module, nn.Embedding) and module.max_norm is not None:
            # F.embedding renormalises the looked-up rows of the weight in place: the base weight changes on every
            # forward, and the merged weight is renormalised as a whole where the unmerged path adds ΔW after.
            raise UnsupportedLayerError(
                f"{method}: {target!r} is an nn.Embedding with max_norm={module.max_norm}, whose forward rescales "
                f"rows of its weight in place, so merged and unmerged outputs would differ and the base weight would "
                f"drift; set max_norm=None on it (module.max_norm = None) or leave it out "
                f"(exclude_modules=[{target!r}])"
            )
        weight_name = "in_proj_weight" if isinstance(module, nn.MultiheadAttention) else "weight"
        if parametrize.is_parametrized(module) or not isinstance(module._parameters.get(weight_name), nn.Parameter):
            raise UnsupportedLayerError(
                f"{method}: the weight of {target!r} is computed (a parametrization, weight_norm or spectral_norm), "
                f"not a plain Parameter, so a merge into it would be lost; make it plain first "
                f"(torch.nn.utils.parametrize.remove_parametrizations(module, 'weight') or "
                f"torch.nn.utils.remove_weight_norm(module)) or leave it out (exclude_modules=[{target!r}])"
            )


def check_adaptable(model: nn.Module, targets: list[str], method: str, supported: tuple[type, ...]) -> None:
    """Checks that a per-layer adapter on each target really acts where it is and merges consistently."""
    check_called(model, targets, method)
    check_plain_layers(model, targets, method, supported)
    check_untied(model, targets, method)
