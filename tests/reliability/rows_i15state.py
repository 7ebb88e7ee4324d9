"""Bad-input rows of issue 15 (in-memory state): adapter state values that are not what the model holds, models
that are not modules, absurd ranks, an inject that fails on a later target, and merges that would write
non-finite half-precision weights.

``rows(Row, snapshot_into)`` builds them with ``test_bad_inputs.Row`` and its snapshot function (passed in, so this
module never imports the test module and ``python -m tests.reliability.test_bad_inputs`` keeps working).
Rows that inject first call ``snapshot_into(model)`` right before the refused call: the injected model is what
must stay unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import lightning_adapters as la
from tests.helpers import tiny_llama


def _state_action(snapshot_into: Callable, mutate: Callable, cfg: Callable[[], Any] | None = None) -> Callable:
    """Inject, take a good adapter state, let ``mutate`` spoil its last key (sorted), load it: must be refused."""

    def action(m, tmp):
        la.inject(m, cfg() if cfg is not None else la.LoRAConfig(r=2, target_modules=["q_proj"]))
        sd = {k: v.clone() for k, v in la.adapter_state_dict(m).items()}
        snapshot_into(m)
        return la.load_adapter_state_dict(m, mutate(sd))

    return action


def _last(fn: Callable) -> Callable:
    def mutate(sd):
        key = sorted(sd)[-1]
        sd[key] = fn(sd[key])
        return sd

    return mutate


def _inf(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[-1] = float("inf")
    return t


def _half_mask(sd):
    key = next(k for k in sd if k.endswith("rank_mask"))
    sd[key] = torch.full(sd[key].shape, 0.5)
    return sd


def _int_key(sd):
    sd[0] = sd.pop(sorted(sd)[0])
    return sd


def _clash_on_second_target() -> nn.Module:
    model = tiny_llama()
    model.model.layers[1].self_attn.q_proj.adapter = "user data"
    return model


def _fp16_pair() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)).half()
    with torch.no_grad():
        model[1].weight.fill_(60000.0)  # fp16 max is 65504
    return model


def _overflow_merge(snapshot_into: Callable) -> Callable:
    def action(m, tmp):
        la.inject(m, la.LoRAConfig(r=2, target_modules=["0", "1"]))
        with torch.no_grad():
            for layer in (m[0].adapter.default, m[1].adapter.default):
                layer.lora_A.fill_(1.0)
                layer.lora_B.fill_(1250.0)  # ΔW = 4·2·1250 = 1e4: 7e4 is finite in fp32, inf in fp16
        snapshot_into(m)
        return la.merge(m, safe=True)

    return action


def _half_refusal(snapshot_into: Callable, eject: bool) -> Callable:
    """Earlier layers merge, the last one is refused: every layer must be restored bit-exactly (bf16 base)."""

    def action(m, tmp):
        m.to(torch.bfloat16)
        la.inject(m, la.LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]))
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for t in la.adapter_state_dict(m).values():
                t.add_(torch.randn(t.shape, generator=g) * 0.5)
            m.model.layers[1].self_attn.v_proj.adapter.default.lora_B[0, 0] = float("nan")
        snapshot_into(m)
        return la.eject(m, merge=True, safe=True) if eject else la.merge(m, safe=True)

    return action


def _spoiled_peft(spoil: Callable) -> Callable:
    """Save a good PEFT directory, replace its last tensor (sorted) by ``spoil(tensor)``, load it."""

    def action(m, tmp):
        from safetensors.torch import load_file, save_file

        src = tmp / "src"
        la.save_peft(la.inject(tiny_llama(), la.LoRAConfig(r=2, target_modules=["q_proj"])), src)
        tensors = load_file(str(src / "adapter_model.safetensors"))
        key = sorted(tensors)[-1]
        save_file({**tensors, key: spoil(tensors[key])}, str(src / "adapter_model.safetensors"))
        return la.load_peft(m, src)

    return action


def _allocator_flags(snapshot_into: Callable) -> Callable:
    def action(m, tmp):
        from lightning_adapters.methods.adalora import RankAllocator

        la.inject(m, la.AdaLoRAConfig(init_r=4, target_r=2, total_step=10, target_modules=["q_proj"]))
        state = RankAllocator(m, la.config_of(m)).state_dict()
        state["rank_mask"]["model.layers.1.self_attn.q_proj"] = [1, 0.5, 0, 1]
        snapshot_into(m)
        return RankAllocator(m, la.config_of(m)).load_state_dict(state)

    return action


def rows(Row: type, snapshot_into: Callable) -> list:  # noqa: N803 - the Row class of test_bad_inputs
    """The rows, as ``Row`` instances."""
    s = snapshot_into
    return [
        Row(
            "state-value-not-a-tensor",
            tiny_llama,
            _state_action(s, _last(lambda t: t.tolist())),
            la.AdapterStateError,
            r"bad values model.layers.1.self_attn.q_proj.adapter.default.lora_B: a list \(\[\[.*not a torch.Tensor",
        ),
        Row(
            "state-meta-tensor",
            tiny_llama,
            _state_action(s, _last(lambda t: torch.empty_like(t, device="meta"))),
            la.AdapterStateError,
            r"q_proj.adapter.default.lora_B: a meta tensor \(shape only, no values\)",
        ),
        Row(
            "state-integer-for-float",
            tiny_llama,
            _state_action(s, _last(lambda t: t.to(torch.int32))),
            la.AdapterStateError,
            r"lora_B: dtype int32 \(integer\) for a floating tensor \(float32\)",
        ),
        Row(
            "state-non-finite",
            tiny_llama,
            _state_action(s, _last(_inf)),
            la.AdapterStateError,
            r"lora_B: 1 non-finite values \(NaN/Inf\); pass check_finite=False",
        ),
        Row(
            "state-sparse-tensor",
            tiny_llama,
            _state_action(s, _last(lambda t: t.to_sparse())),
            la.AdapterStateError,
            r"lora_B: a sparse_coo tensor; pass a dense tensor \(.to_dense\(\)\)",
        ),
        Row(
            "state-mask-not-binary",
            tiny_llama,
            _state_action(
                s, _half_mask, lambda: la.AdaLoRAConfig(init_r=4, target_r=2, total_step=10, target_modules=["q_proj"])
            ),
            la.AdapterStateError,
            r"rank_mask: a float32 tensor with values other than 0/1 for a bool mask",
        ),
        Row(
            "state-not-a-mapping",
            tiny_llama,
            _state_action(s, lambda sd: list(sd.items())),
            la.AdapterTypeError,
            r"state_dict must be a mapping of names to tensors .*got list",
        ),
        Row(
            "state-key-not-a-string",
            tiny_llama,
            _state_action(s, _int_key),
            la.AdapterStateError,
            r"keys must be strings.*got \[0\]",
        ),
        Row(
            "inject-none-model",
            None,
            lambda m, p: la.inject(None, la.LoRAConfig(target_modules=["q_proj"])),
            la.AdapterTypeError,
            r"inject: model must be a torch.nn.Module instance, got NoneType None",
        ),
        Row(
            "inject-model-is-a-class",
            None,
            lambda m, p: la.merge(nn.Linear),
            la.AdapterTypeError,
            r"merge: model must be a torch.nn.Module instance, got type .*Linear.*instantiate it first",
        ),
        Row(
            "inject-fails-on-a-later-target",
            _clash_on_second_target,
            lambda m, p: la.inject(m, la.LoRAConfig(r=2, target_modules=["q_proj"])),
            la.AdapterConfigError,
            r"lora: \['model.layers.1.self_attn.q_proj'\] already have an attribute 'adapter'.*exclude_modules",
        ),
        Row(
            "rank-absurd",
            tiny_llama,
            lambda m, p: la.inject(m, la.LoRAConfig(r=10**12, target_modules=["q_proj"])),
            la.AdapterConfigError,
            r"lora: r=1000000000000 on 'model.layers.0.self_attn.q_proj' is far above the layer's dimensions "
            r"\(64, 64\).*use r <= 64",
        ),
        Row(
            "merge-overflows-half-base",
            _fp16_pair,
            _overflow_merge(s),
            la.MergeError,
            r"merge of '1' refused: merged weight has 64 non-finite values .* in float16",
        ),
        Row(
            "merge-refused-after-half-layers-merged",
            tiny_llama,
            _half_refusal(s, eject=False),
            la.MergeError,
            r"merge of 'model.layers.1.self_attn.v_proj' refused.*bfloat16",
        ),
        Row(
            "eject-merge-safe-refused",
            tiny_llama,
            _half_refusal(s, eject=True),
            la.MergeError,
            r"merge of 'model.layers.1.self_attn.v_proj' refused",
        ),
        Row(
            "peft-integer-tensor",
            tiny_llama,
            _spoiled_peft(lambda t: t.to(torch.int32)),
            la.AdapterStateError,
            r"holds values the model cannot take: model.layers.1.self_attn.q_proj.lora_B.weight: dtype int32 "
            r"\(integer\) for a floating tensor",
        ),
        Row(
            "peft-non-finite-tensor",
            tiny_llama,
            _spoiled_peft(lambda t: t.clone().fill_(float("nan"))),
            la.AdapterStateError,
            r"q_proj.lora_B.weight: 128 non-finite values \(NaN/Inf\)",
        ),
        Row(
            "adalora-allocator-state-flags",
            tiny_llama,
            _allocator_flags(s),
            la.AdapterStateError,
            r"rank_mask\['model.layers.1.self_attn.q_proj'\]=\[1, 0.5, 0, 1\] \(want 4 0/1 flags\)",
        ),
    ]
