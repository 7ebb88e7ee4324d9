"""Llama-Adapter: learnable adaption prompts in the top attention layers, behind a zero-initialised gate.

Maths (Zhang et al. 2023, "LLaMA-Adapter: Efficient Fine-tuning of Language Models with Zero-init
Attention"). Each of the top ``adapter_layers`` attention layers owns a prompt ``P (L, H)`` of
``L = adapter_len`` tokens and a scalar gate ``g``. The layer's own projections turn the prompt into keys and
values, and the queries of the real tokens attend to them with a softmax of their own::

    Q   = RoPE(x W_qᵀ + b_q)                          (b, n_h, T, d)    [GPT-2: no RoPE]
    K_p = P W_kᵀ + b_k,  V_p = P W_vᵀ + b_v           (n_kv, L, d)      no RoPE on the prompt keys
    A   = softmax(Q K_pᵀ / √d)                        (b, n_h, T, L)    over the L prompt tokens only, no mask
    out = o_proj(heads + g · A V_p)                   heads = the base attention before its output projection

Query head ``h`` reads prompt head ``h // (n_h / n_kv)`` (grouped-query attention). ``g = 0`` at init, so the
model starts exactly as the base, and at step 0 only ``g`` receives gradient (the prompt's is exactly 0).
There is no weight-space form, so the adapter cannot be merged.

Equivalence with PEFT 0.21 (``AdaptionPromptConfig``): PEFT computes ``o_proj(heads) + o_proj(g · A V_p)``,
which is the same for the bias-free ``o_proj`` of Llama, Mistral and Qwen2 (with a bias PEFT adds it twice;
here it is added once). For GPT-2 PEFT adds ``g · A V_p`` to the attention output *after* ``c_proj``; that
is kept, so PEFT adapters load with equal outputs. PEFT has no Qwen2 and breaks when
``head_dim · n_h ≠ hidden``; both work here.

Attachment: the attention module keeps its class and every base parameter its name. The prompt and gate of
the adapter named ``<name>`` live on ``<attention>.adapter.<name>`` (keys
``...self_attn.adapter.<name>.adaption_prompt``; PEFT's file names them ``...self_attn.adaption_prompt``).
Forward hooks do the work, switched off by flags (``enabled`` for ``disabled``, ``active`` for ``set_active``).
Several named instances each hook the same attentions; their terms add up when several are active:

- a pre-hook on the attention computes ``K_p``, ``V_p`` and takes ``(cos, sin)`` from the model's own
  ``position_embeddings`` argument (so rotary-embedding refactors in transformers do not matter);
- a hook on ``q_proj`` (GPT-2: ``c_attn``) keeps the query projection the attention computes anyway;
- a pre-hook on ``o_proj`` adds ``g · A V_p`` to its input (GPT-2: a hook on the attention's output).

Speed: PEFT recomputes ``q_proj(x)`` and applies ``o_proj`` a second time (two extra hidden×hidden matmuls
per adapted layer, forward and backward); reusing the attention's own queries and folding the term into the
single ``o_proj`` call leaves only the L-token attention. With the KV cache only the new tokens' queries are
used; the prompt term does not depend on cached keys.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_adapters.config import AdapterConfig, check_positive_int
from lightning_adapters.core.dtypes import adapter_dtype_for
from lightning_adapters.core.layer import AdapterSet
from lightning_adapters.core.quant import is_quantized
from lightning_adapters.core.targeting import Conv1D
from lightning_adapters.errors import AdapterConfigError, TargetError, UnsupportedLayerError
from lightning_adapters.methods._common import check_rank, keyed_cache, tensor_key
from lightning_adapters.registry import ModelAdapter, ModelMethod, register

METHOD = "llama_adapter"
HOLDER_ATTR = "adapter"

# model_type -> (attention flavour, attention attribute name PEFT targets by default)
SUPPORTED: dict[str, tuple[str, str]] = {
    "llama": ("rope", "self_attn"),
    "mistral": ("rope", "self_attn"),
    "qwen2": ("rope", "self_attn"),
    "gpt2": ("gpt2", "attn"),
}


@dataclass
class LlamaAdapterConfig(AdapterConfig):
    """Llama-Adapter hyper-parameters (PEFT's ``AdaptionPromptConfig``, same names).

    Attributes:
        adapter_len: Number of prompt tokens per adapted layer.
        adapter_layers: How many attention layers, counted from the top, get a prompt.
        target_modules: Attribute name of the attention modules (``"self_attn"``; ``"attn"`` for GPT-2), as a
            string or a one-element list; ``None`` uses the architecture's name.
        exclude_modules: Not supported (``adapter_layers`` chooses the layers, as in PEFT's format).
        modules_to_save: Not supported (PEFT's adaption-prompt format has no such field).
    """

    adapter_len: int = 10
    adapter_layers: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str):
            # PEFT's target_modules is one attribute name, not a regex: accept that form.
            self.target_modules = [self.target_modules]
        super().__post_init__()
        check_positive_int(self.adapter_len, "adapter_len", METHOD)
        check_positive_int(self.adapter_layers, "adapter_layers", METHOD)
        tm = self.target_modules
        if tm is not None and (len(tm) != 1 or not re.fullmatch(r"[A-Za-z_]\w*", tm[0])):
            raise AdapterConfigError(
                f"{METHOD}: target_modules must be the attribute name of the attention modules, e.g. 'self_attn' "
                f"(or None for the architecture's default), got {tm!r}"
            )
        if self.exclude_modules is not None:
            raise AdapterConfigError(
                f"{METHOD}: exclude_modules={self.exclude_modules!r} is not supported; the adapted layers are the "
                f"top adapter_layers attention modules, so lower adapter_layers instead"
            )
        if self.modules_to_save:
            raise AdapterConfigError(
                f"{METHOD}: modules_to_save={self.modules_to_save!r} is not supported (PEFT's adaption-prompt "
                f"format cannot store it); use a LoRA config with modules_to_save for that"
            )
        if self.layers_to_transform is not None:
            raise AdapterConfigError(
                f"{METHOD}: layers_to_transform={self.layers_to_transform!r} is not supported; the adapted layers "
                f"are the top adapter_layers attention modules, so set adapter_layers instead"
            )


# ------------------------------------------------------------------------------------------------------------
# Pure functions


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``(x1, x2) -> (-x2, x1)`` on the two halves of the last dimension (transformers' RoPE layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of queries ``q (b, T, n_h, d)`` with ``cos``/``sin`` ``(b, T, d)`` -> ``(b, T, n_h, d)``."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # (b, T, 1, d)
    return q * cos + rotate_half(q) * sin


def prompt_attention(q: torch.Tensor, k_p: torch.Tensor, v_p: torch.Tensor) -> torch.Tensor:
    """Queries attending to the prompt alone: ``softmax(q k_pᵀ) v_p`` with grouped heads.

    Args:
        q: Queries ``(b, T, n_h, d)`` (scaled by 1/√d through ``k_p``).
        k_p: Prompt keys ``(n_kv, L, d)``, already divided by √d.
        v_p: Prompt values ``(n_kv, L, d)``, already multiplied by the gate.

    Returns:
        ``(b, T, n_h·d)``: the per-head outputs, laid out as the input of the output projection.
    """
    b, t, nh, d = q.shape
    nkv = k_p.shape[0]
    g = nh // nkv
    # Query head h uses prompt head h // g: group the g heads of each kv head with the tokens.
    qg = q.reshape(b, t, nkv, g, d).permute(0, 2, 1, 3, 4).reshape(b, nkv, t * g, d)  # (b, n_kv, T·g, d)
    scores = torch.matmul(qg, k_p.transpose(1, 2))  # (b, n_kv, T·g, d) @ (n_kv, d, L) -> (b, n_kv, T·g, L)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v_p.dtype)  # softmax in fp32, as PEFT
    out = torch.matmul(probs, v_p)  # (b, n_kv, T·g, L) @ (n_kv, L, d) -> (b, n_kv, T·g, d)
    return out.reshape(b, nkv, t, g, d).permute(0, 2, 1, 3, 4).reshape(b, t, nh * d)


# ------------------------------------------------------------------------------------------------------------
# The prompt holder and its hooks


class AdaptionPrompt(nn.Module):
    """Prompt and gate of one attention layer, plus the hooks that apply them.

    Registered as ``<attention>.adapter.<name>``; its hooks are bound methods, so ``copy.deepcopy`` and pickling
    of the model carry them over consistently.

    Attributes:
        adaption_prompt: ``(1, L, hidden)`` ~ N(0, 1).
        adaption_gate: ``(1,)`` = 0.
        enabled: False inside ``lightning_adapters.disabled``.
        active: False while ``set_active`` has chosen other adapters.
    """

    def __init__(
        self, flavour: str, adapter_len: int, hidden: int, n_heads: int, n_kv: int, head_dim: int, device: Any
    ) -> None:
        super().__init__()
        self.flavour = flavour
        self.n_heads, self.n_kv, self.head_dim = n_heads, n_kv, head_dim
        self.adaption_prompt = nn.Parameter(torch.randn(1, adapter_len, hidden, device=device))
        self.adaption_gate = nn.Parameter(torch.zeros(1, device=device))
        self.enabled = True
        self.active = True
        self._prompt_kv: tuple[torch.Tensor, torch.Tensor] | None = None
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None
        self._query: torch.Tensor | None = None
        # Eval-mode prompt keys and values: (key of the tensors they were computed from, (K_p, V_p)); see
        # ``_cached_keys_values``.
        self._kv_cache: tuple[tuple, tuple[torch.Tensor, torch.Tensor]] | None = None

    def extra_repr(self) -> str:
        n = self.adaption_prompt.shape[1]
        return f"{self.flavour}, adapter_len={n}, heads={self.n_heads}/{self.n_kv} kv, head_dim={self.head_dim}"

    # --- prompt keys and values --------------------------------------------------------------------------

    def _prompt_keys_values(self, attn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """``K_p / √d`` and ``g · V_p``, each ``(n_kv, L, d)`` in the base weights' dtype."""
        if self.flavour == "gpt2":
            c = attn.c_attn
            p = self.adaption_prompt[0].to(c.weight.dtype)  # (L, H)
            kv = torch.addmm(c.bias, p, c.weight)  # (L, H) @ (H, 3E) -> (L, 3E): Conv1D's (in, out) layout
            _, k, v = kv.split(kv.shape[-1] // 3, dim=-1)  # (L, E) each
            proj_dtype = c.weight.dtype
        elif is_quantized(attn.k_proj) or is_quantized(attn.v_proj):
            # A quantized base projects the prompt with its own kernel (its output takes the prompt's dtype).
            p = self.adaption_prompt[0]  # (L, H)
            k, v = attn.k_proj(p), attn.v_proj(p)  # (L, n_kv·d) each
            proj_dtype = p.dtype
        else:
            p = self.adaption_prompt[0].to(attn.k_proj.weight.dtype)  # (L, H)
            k = nn.functional.linear(p, attn.k_proj.weight, attn.k_proj.bias)  # (L, n_kv·d)
            v = nn.functional.linear(p, attn.v_proj.weight, attn.v_proj.bias)  # (L, n_kv·d)
            proj_dtype = attn.k_proj.weight.dtype
        seq = k.shape[0]
        k = k.view(seq, self.n_kv, self.head_dim).transpose(0, 1) / math.sqrt(self.head_dim)  # (n_kv, L, d)
        v = v.view(seq, self.n_kv, self.head_dim).transpose(0, 1)  # (n_kv, L, d)
        v = (self.adaption_gate * v).to(proj_dtype)  # the gate scales the small tensor, not the output
        return k, v

    def _cached_keys_values(self, attn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """``_prompt_keys_values``, kept in eval mode while no gradient flows to the prompt or the gate.

        The key holds the storage, version counter, dtype, device and shape of the prompt, the gate and the
        projections' weights and biases, so an optimizer step, a state load, a dtype cast or any in-place write
        through autograd-visible ops recomputes them (as the DoRA norm cache). Not cached: training mode, inside
        ``torch.compile``, quantized projections (their dequantized weight is rebuilt per call), and a forward
        that records autograd for the prompt or gate.
        """
        prompt, gate = self.adaption_prompt, self.adaption_gate
        if (
            self.training
            or torch.compiler.is_compiling()
            or (torch.is_grad_enabled() and (prompt.requires_grad or gate.requires_grad))
        ):
            return self._prompt_keys_values(attn)
        if self.flavour == "gpt2":
            sources = (prompt, gate, attn.c_attn.weight, attn.c_attn.bias)
        elif is_quantized(attn.k_proj) or is_quantized(attn.v_proj):
            return self._prompt_keys_values(attn)
        else:
            k_proj, v_proj = attn.k_proj, attn.v_proj
            sources = (prompt, gate, k_proj.weight, k_proj.bias, v_proj.weight, v_proj.bias)
        key = tuple(None if t is None else tensor_key(t) for t in sources)
        return keyed_cache(self, "_kv_cache", key, lambda: self._prompt_keys_values(attn))

    def train(self, mode: bool = True) -> AdaptionPrompt:
        """``nn.Module.train``; also drops the eval-mode prompt keys and values."""
        self._kv_cache = None
        return super().train(mode)

    def _term(self) -> torch.Tensor:
        """``g · A V_p`` as ``(b, T, n_h·d)`` from the kept query projection ``(b, T, n_h·d)``; clears the state."""
        q = self._query
        if q is None:
            raise UnsupportedLayerError(
                f"{METHOD}: the attention produced its output without projecting queries first; its forward is "
                f"not one of the transformers {sorted(SUPPORTED)} attentions this method supports"
            )
        b, t, _ = q.shape
        q = q.view(b, t, self.n_heads, self.head_dim)  # (b, T, n_h, d)
        if self._rope is not None:
            q = apply_rope(q, *self._rope)
        k, v = self._prompt_kv
        self._prompt_kv = self._rope = self._query = None
        return prompt_attention(q, k.to(q.dtype), v.to(q.dtype))

    # --- hooks -------------------------------------------------------------------------------------------

    def before_attention(self, attn: nn.Module, args: tuple, kwargs: dict) -> None:
        """Pre-hook on the attention: prompt keys/values and, for RoPE models, the layer's ``(cos, sin)``."""
        self._prompt_kv = self._rope = self._query = None
        if not (self.enabled and self.active):
            return
        if self.flavour == "rope":
            pe = kwargs.get("position_embeddings", args[1] if len(args) > 1 else None)
            if pe is None:
                raise UnsupportedLayerError(
                    f"{METHOD}: {type(attn).__name__} was called without position_embeddings=(cos, sin), which "
                    f"this method reads the rotary embeddings from; use a transformers version whose decoder "
                    f"layers pass them to the attention"
                )
            self._rope = (pe[0], pe[1])
        self._prompt_kv = self._prompt_keys_values(attn) if self.training else self._cached_keys_values(attn)

    def after_query(self, proj: nn.Module, args: tuple, output: torch.Tensor) -> None:
        """Hook on ``q_proj`` (GPT-2: ``c_attn``): keep the queries the attention just computed."""
        if self._prompt_kv is not None:
            self._query = output if self.flavour == "rope" else output[..., : output.shape[-1] // 3]

    def before_output(self, proj: nn.Module, args: tuple) -> tuple | None:
        """Pre-hook on ``o_proj``: add ``g · A V_p`` to the heads, so ``o_proj`` runs once."""
        if self._prompt_kv is None:
            return None
        heads = args[0]  # (b, T, n_h·d)
        return (heads + self._term().to(heads.dtype), *args[1:])

    def after_attention(self, attn: nn.Module, args: tuple, output: tuple) -> tuple | None:
        """GPT-2 hook on the attention output: add ``g · A V_p`` after ``c_proj``, where PEFT adds it."""
        if self._prompt_kv is None:
            return None
        out = output[0]  # (b, T, E)
        return (out + self._term().to(out.dtype), *output[1:])


# ------------------------------------------------------------------------------------------------------------
# Whole-model injection


def _model_type(model: nn.Module) -> str | None:
    for mod in model.modules():
        mt = getattr(getattr(mod, "config", None), "model_type", None)
        if isinstance(mt, str):
            return mt
    return None


def _shape_of(name: str, attn: nn.Module, flavour: str) -> tuple[int, int, int, int]:
    """``(hidden, n_heads, n_kv, head_dim)`` of one attention module, or a clear error."""

    def bad(why: str) -> UnsupportedLayerError:
        return UnsupportedLayerError(
            f"{METHOD}: cannot adapt {name!r} ({type(attn).__name__}): {why}; supported attentions are the "
            f"transformers {sorted(SUPPORTED)} ones"
        )

    head_dim = getattr(attn, "head_dim", None)
    if not isinstance(head_dim, int) or head_dim <= 0:
        raise bad("it has no integer head_dim attribute")
    if flavour == "gpt2":
        c = getattr(attn, "c_attn", None)
        if Conv1D is None or not isinstance(c, Conv1D) or getattr(attn, "is_cross_attention", False):
            raise bad("it is not a GPT-2 self-attention with a Conv1D c_attn")
        hidden, out = c.weight.shape
        if out != 3 * hidden or hidden % head_dim:
            raise bad(f"c_attn maps {hidden} -> {out}, expected {hidden} -> {3 * hidden}")
        if not c.weight.is_floating_point():
            raise bad("its weights are not floating point (quantized layers are not supported)")
        return hidden, hidden // head_dim, hidden // head_dim, head_dim
    projs = {p: getattr(attn, p, None) for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    missing = [p for p, m in projs.items() if not isinstance(m, nn.Linear)]
    if missing:
        raise bad(f"it has no nn.Linear {missing}")
    if not all(m.weight.is_floating_point() or is_quantized(m) for m in projs.values()):
        raise bad("its weights are not floating point (quantized layers are not supported)")
    q, k, v, o = projs.values()
    if q.out_features % head_dim or k.out_features % head_dim or v.out_features != k.out_features:
        raise bad(f"q/k/v widths {q.out_features}/{k.out_features}/{v.out_features} do not fit head_dim {head_dim}")
    n_heads, n_kv = q.out_features // head_dim, k.out_features // head_dim
    if n_heads % n_kv or o.in_features != q.out_features or k.in_features != q.in_features:
        raise bad(f"{n_heads} query heads, {n_kv} key/value heads and o_proj input {o.in_features} do not fit")
    return q.in_features, n_heads, n_kv, head_dim


def _query_proj(attn: nn.Module, flavour: str) -> nn.Module:
    return attn.c_attn if flavour == "gpt2" else attn.q_proj


def _hooked_modules(attn: nn.Module, flavour: str) -> list[nn.Module]:
    return [attn, attn.c_attn] if flavour == "gpt2" else [attn, attn.q_proj, attn.o_proj]


def _inject(model: nn.Module, config: LlamaAdapterConfig, name: str) -> PromptAdapter:
    model_type = _model_type(model)
    if model_type not in SUPPORTED:
        raise UnsupportedLayerError(
            f"{METHOD}: model type {model_type!r} is not supported; supported model types: {sorted(SUPPORTED)}"
        )
    flavour, default_attr = SUPPORTED[model_type]
    attr = config.target_modules[0] if config.target_modules else default_attr
    names = [n for n, _ in model.named_modules() if n == attr or n.endswith("." + attr)]
    if not names:
        raise TargetError(f"{METHOD}: no module is named {attr!r} in this {model_type} model; use {default_attr!r}")
    if config.adapter_layers > len(names):
        raise AdapterConfigError(
            f"{METHOD}: adapter_layers={config.adapter_layers} but the model has only {len(names)} attention "
            f"modules named {attr!r}; use adapter_layers <= {len(names)}"
        )
    names = names[-config.adapter_layers :]
    attns = {n: model.get_submodule(n) for n in names}
    shapes = {n: _shape_of(n, a, flavour) for n, a in attns.items()}
    # Another named Llama-Adapter keeps its prompts in the same ``adapter`` set; anything else there is refused.
    taken = [
        n
        for n, a in attns.items()
        if hasattr(a, HOLDER_ATTR) and not isinstance(a._modules.get(HOLDER_ATTR), AdapterSet)
    ]
    if taken:
        raise AdapterConfigError(f"{METHOD}: {taken} already have an attribute {HOLDER_ATTR!r}; eject it first")
    for n in names:
        hidden = shapes[n][0]
        why = f"the prompt's keys and values span at most hidden={hidden} dimensions"
        check_rank(config.adapter_len, (hidden,), n, METHOD, "adapter_len", why)
    # Everything is checked; build every holder before touching the model.
    holders = {
        n: AdaptionPrompt(flavour, config.adapter_len, *shapes[n], device=_query_proj(attns[n], flavour).weight.device)
        for n in names
    }
    for n, holder in holders.items():
        attn = attns[n]
        if not isinstance(attn._modules.get(HOLDER_ATTR), AdapterSet):
            attn.add_module(HOLDER_ATTR, AdapterSet())
        attn._modules[HOLDER_ATTR].add_module(name, holder)
        holder.train(attn.training)
        attn.register_forward_pre_hook(holder.before_attention, with_kwargs=True)
        if flavour == "gpt2":
            attn.c_attn.register_forward_hook(holder.after_query)
            attn.register_forward_hook(holder.after_attention)
        else:
            attn.q_proj.register_forward_hook(holder.after_query)
            attn.o_proj.register_forward_pre_hook(holder.before_output)
    adapter = PromptAdapter(targets=names, holders=[f"{n}.{HOLDER_ATTR}.{name}" for n in names], attr=attr)
    adapter.apply_dtype(model, config)
    return adapter


def _remove_hooks(module: nn.Module, holder: AdaptionPrompt) -> None:
    for hooks in (module._forward_pre_hooks, module._forward_hooks):
        for hook_id in [k for k, fn in hooks.items() if getattr(fn, "__self__", None) is holder]:
            del hooks[hook_id]
            for flags in (
                module._forward_pre_hooks_with_kwargs,
                module._forward_hooks_with_kwargs,
                module._forward_hooks_always_called,
            ):
                flags.pop(hook_id, None)


@dataclass
class PromptAdapter(ModelAdapter):
    """One injected Llama-Adapter: the adapted attention modules and their prompt holders.

    Attributes:
        targets: The adapted attention modules.
        holders: Their ``AdaptionPrompt`` children (``<attention>.adapter.<name>``), in the same order.
        attr: The attention attribute name the adapter targets (PEFT's ``target_modules``).
    """

    targets: list[str]
    holders: list[str]
    attr: str

    def _each(self, root: nn.Module) -> list[tuple[str, nn.Module, AdaptionPrompt]]:
        """``(attention name, attention, holder)`` per adapted attention."""
        return [(t, root.get_submodule(t), root.get_submodule(h)) for t, h in zip(self.targets, self.holders)]

    def eject(self, root: nn.Module) -> None:
        """Remove this instance's hooks and prompt holders; the last instance removed takes the ``adapter`` set
        with it, so the attention modules are exactly as before ``inject``."""
        for holder_name, (_, attn, holder) in zip(self.holders, self._each(root)):
            for mod in _hooked_modules(attn, holder.flavour):
                _remove_hooks(mod, holder)
            holders = attn._modules[HOLDER_ATTR]
            del holders._modules[holder_name.rpartition(".")[2]]
            if not holders._modules:
                del attn._modules[HOLDER_ATTR]

    def apply_dtype(self, root: nn.Module, config: AdapterConfig) -> None:
        """Cast every prompt and gate to the adapter dtype policy (fp32 on a half-precision base by default)."""
        for _, attn, holder in self._each(root):
            dtype = adapter_dtype_for(_query_proj(attn, holder.flavour).weight.dtype, config)
            for p in holder.parameters():
                p.data = p.data.to(dtype)

    def summary_rows(self, root: nn.Module) -> list[tuple[str, str, str, int]]:
        """One row per prompt holder."""
        return [
            (h, type(attn).__name__, type(holder).__name__, sum(p.numel() for p in holder.parameters()))
            for h, (_, attn, holder) in zip(self.holders, self._each(root))
        ]

    def peft_config(self, fields: dict[str, Any]) -> dict[str, Any]:
        """PEFT's ``AdaptionPromptConfig`` has one attention name and no exclude/modules_to_save fields."""
        fields = {k: v for k, v in fields.items() if k not in ("exclude_modules", "modules_to_save")}
        fields["target_modules"] = self.attr
        return fields

    def peft_state(self, root: nn.Module) -> dict[str, torch.Tensor]:
        """Keys ``<attention>.adaption_prompt`` / ``<attention>.adaption_gate``."""
        out = {}
        for name, _, holder in self._each(root):
            out[f"{name}.adaption_prompt"] = holder.adaption_prompt.detach()
            out[f"{name}.adaption_gate"] = holder.adaption_gate.detach()
        return out

    def load_peft_state(self, root: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        """Inverse of ``peft_state``."""
        with torch.no_grad():
            for name, _, holder in self._each(root):
                for suffix in ("adaption_prompt", "adaption_gate"):
                    p = getattr(holder, suffix)
                    p.copy_(tensors[f"{name}.{suffix}"].to(dtype=p.dtype, device=p.device))


# ------------------------------------------------------------------------------------------------------------
# PEFT format: keys ``<attention>.adaption_prompt`` / ``<attention>.adaption_gate``


def _to_peft(cfg: LlamaAdapterConfig) -> dict[str, Any]:
    return {"peft_type": "ADAPTION_PROMPT", "adapter_len": cfg.adapter_len, "adapter_layers": cfg.adapter_layers}


def _from_peft(d: dict[str, Any]) -> LlamaAdapterConfig:
    return LlamaAdapterConfig(
        adapter_len=d.get("adapter_len"),
        adapter_layers=d.get("adapter_layers"),
        target_modules=d.get("target_modules"),
    )


class LlamaAdapterMethod(ModelMethod):
    """Llama-Adapter in the registry."""

    name = METHOD
    config_cls = LlamaAdapterConfig
    peft_type = "ADAPTION_PROMPT"
    config_to_peft = staticmethod(_to_peft)
    config_from_peft = staticmethod(_from_peft)

    def inject(self, model: nn.Module, config: AdapterConfig, name: str) -> PromptAdapter:
        """Prompts and hooks on the top ``adapter_layers`` attention modules (see the module docstring)."""
        return _inject(model, config, name)


register(LlamaAdapterMethod())
