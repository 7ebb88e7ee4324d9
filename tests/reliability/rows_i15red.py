"""Bad-input rows of the adversarial re-run of issue 15: values that only turn bad in the model's dtype (a state
dict or a PEFT file), configs edited after inject, and layers that rewrite their own weight.

``rows(Row, snapshot_into)`` builds them with ``test_bad_inputs.Row`` and its snapshot function (passed in, so this
module never imports the test module). Rows that inject first call ``snapshot_into(model)`` right before the
refused call: the injected model is what must stay unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

import lightning_adapters as la
from tests.helpers import tiny_llama


def _fp16_adapter_overflow(snapshot_into: Callable) -> Callable:
    """1e6 is finite in the float64 state dict, inf once cast into the fp16 adapter."""

    def action(m, tmp):
        la.inject(m, la.LoRAConfig(r=2, target_modules=["q_proj"], adapter_dtype="float16"))
        sd = {k: v.double() for k, v in la.adapter_state_dict(m).items()}
        sd[sorted(sd)[-1]][0, 0] = 1e6
        snapshot_into(m)
        return la.load_adapter_state_dict(m, sd)

    return action


def _edited_config(snapshot_into: Callable) -> Callable:
    """The same config object, edited after inject, is a different config, not a no-op."""

    def action(m, tmp):
        cfg = la.LoRAConfig(r=2, target_modules=["q_proj"])
        la.inject(m, cfg)
        cfg.target_modules = ["v_proj"]
        snapshot_into(m)
        return la.inject(m, cfg)

    return action


def _peft_file(edit: Callable[[torch.Tensor], torch.Tensor], cfg: Callable[[], la.AdapterConfig]) -> Callable:
    """Save a good adapter of another tiny llama into ``tmp/src``, let ``edit`` change its first tensor, load it."""

    def action(m, tmp):
        src = tmp / "src"
        la.save_peft(la.inject(tiny_llama(), cfg()), src)
        path = src / "adapter_model.safetensors"
        tensors = load_file(path)
        key = sorted(tensors)[0]
        tensors[key] = edit(tensors[key])
        save_file(tensors, path)
        return la.load_peft(m, src)

    return action


def _lora_dir(tmp, edit: Callable | None = None):
    """A good LoRA adapter of ``nn.Sequential(nn.Linear(4, 4))`` in ``tmp/a``, then ``edit(dir)``."""
    src = tmp / "a"
    la.save_peft(la.inject(_linear(), la.LoRAConfig(r=2, target_modules=["0"])), src)
    if edit is not None:
        edit(src)
    return src


def _linear() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 4))


def _weights_replaced(by: Callable) -> Callable:
    def edit(src):
        os.remove(src / "adapter_model.safetensors")
        by(src / "adapter_model.safetensors")

    return edit


def _config_loop(src) -> None:
    os.remove(src / "adapter_config.json")
    os.symlink(src / "adapter_config.json", src / "adapter_config.json")


def _lock_is_directory(m, tmp):
    (tmp / ".a.lock").mkdir()
    return la.save_peft(la.inject(_linear(), la.LoRAConfig(r=2, target_modules=["0"])), tmp / "a")


def _long_name(snapshot_into: Callable) -> Callable:
    def action(m, tmp):
        la.inject(m, la.LoRAConfig(r=2, target_modules=["0"]))
        snapshot_into(m)
        return la.save_peft(m, tmp / ("x" * 250))

    return action


def _load_while_merged(snapshot_into: Callable) -> Callable:
    """New values loaded into a merged adapter: the base would keep the old ΔW and unmerge subtract the new."""

    def action(m, tmp):
        la.inject(m, la.OFTConfig(r=0, oft_block_size=4, target_modules=["q_proj"]))
        sd = {k: v + 0.1 for k, v in la.adapter_state_dict(m).items()}
        la.merge(m)
        snapshot_into(m)
        return la.load_adapter_state_dict(m, sd)

    return action


def _set_after(**fields) -> Callable:
    """A config whose fields are set after construction, past ``__post_init__``'s checks."""

    def action(m, tmp):
        cfg = la.LoRAConfig(r=2, target_modules=["q_proj"])
        for k, v in fields.items():
            setattr(cfg, k, v)
        return la.inject(m, cfg)

    return action


def _inference_pair() -> nn.Module:
    with torch.inference_mode():
        return nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))


def _merge_inference(snapshot_into: Callable) -> Callable:
    def action(m, tmp):
        la.inject(m, la.LoRAConfig(r=2, target_modules=["0", "1"], init_weights=False))
        snapshot_into(m)
        return la.merge(m)

    return action


def _eject_inference(snapshot_into: Callable) -> Callable:
    def action(m, tmp):
        la.inject(m, la.LoRAConfig(r=2, target_modules=["0", "1"]))
        snapshot_into(m)
        return la.eject(m)

    return action


def rows(Row: type, snapshot_into: Callable) -> list:  # noqa: N803 - the Row class of test_bad_inputs
    """The rows, as ``Row`` instances."""
    s = snapshot_into
    return [
        Row(
            "state-overflows-adapter-dtype",
            tiny_llama,
            _fp16_adapter_overflow(s),
            la.AdapterStateError,
            r"q_proj.adapter.default.lora_B: 1 values overflow to inf as float16; pass check_finite=False",
        ),
        Row(
            "inject-same-config-object-edited",
            tiny_llama,
            _edited_config(s),
            la.AdapterConfigError,
            r"already has an adapter named 'default' \(lora\) with a different config.*eject\(model\)",
        ),
        Row(
            "embedding-max-norm",
            lambda: nn.Sequential(nn.Embedding(10, 8, max_norm=1.0)),
            lambda m, p: la.inject(m, la.LoRAConfig(r=2, target_modules=["0"])),
            la.UnsupportedLayerError,
            r"'0' is an nn.Embedding with max_norm=1.0.*rescales rows of its weight in place.*max_norm = None",
        ),
        Row(
            "peft-file-float64-beyond-float32",
            tiny_llama,
            _peft_file(
                lambda t: t.double() + 1e300, lambda: la.OFTConfig(r=0, oft_block_size=4, target_modules=["q_proj"])
            ),
            la.AdapterStateError,
            r"oft_R.weight: \d+ values overflow to inf as float32.*check_finite=False",
        ),
        Row(
            "peft-weights-file-missing",
            _linear,
            lambda m, tmp: la.load_peft(m, _lora_dir(tmp, _weights_replaced(lambda p: None))),
            la.AdapterStateError,
            r"a/adapter_model.safetensors does not exist as a file \(nor adapter_model.bin\)",
        ),
        Row(
            "peft-weights-path-is-a-directory",
            _linear,
            lambda m, tmp: la.load_peft(m, _lora_dir(tmp, _weights_replaced(os.mkdir))),
            la.AdapterStateError,
            r"a/adapter_model.safetensors does not exist as a file",
        ),
        Row(
            "peft-config-symlink-loop",
            _linear,
            lambda m, tmp: la.load_peft(m, _lora_dir(tmp, _config_loop)),
            la.AdapterStateError,
            r"a/adapter_config.json cannot be opened \(Too many levels of symbolic links\)",
        ),
        Row(
            "load-peft-directory-none",
            _linear,
            lambda m, tmp: la.load_peft(m, None),
            la.AdapterConfigError,
            r"load_peft: directory must be the path of a PEFT adapter directory .*got None",
        ),
        Row(
            "load-peft-model-none",
            None,
            lambda m, tmp: la.load_peft(None, _lora_dir(tmp)),
            la.AdapterTypeError,
            r"load_peft: model must be a torch.nn.Module instance, got NoneType",
        ),
        Row(
            "save-peft-lock-path-is-a-directory",
            None,
            _lock_is_directory,
            la.AdapterConfigError,
            r"\.a\.lock' is a directory, where writers of .*a' keep their lock file",
        ),
        Row(
            "save-peft-name-too-long-to-stage",
            _linear,
            _long_name(s),
            la.AdapterConfigError,
            r"is 250 bytes long; the directory is staged beside it .*at most 241 bytes",
        ),
        Row(
            "load-state-while-merged",
            tiny_llama,
            _load_while_merged(s),
            la.AdapterStateError,
            r"the adapters of \['model.layers.0.self_attn.q_proj', .*are merged into the base weights.*"
            r"lightning_adapters.unmerge\(model\) first",
        ),
        Row(
            "config-rank-zero-set-after-construction",
            tiny_llama,
            _set_after(r=0),
            la.AdapterConfigError,
            r"lora: r must be an integer > 0, got 0",
        ),
        Row(
            "config-dropout-set-after-construction",
            tiny_llama,
            _set_after(dropout=2.0),
            la.AdapterConfigError,
            r"lora: dropout must be in \[0, 1\), got 2.0",
        ),
        Row(
            "callback-config-not-a-config",
            None,
            lambda m, tmp: la.AdapterCallback(8),
            la.AdapterTypeError,
            r"config must be an adapter config such as LoRAConfig\(...\) or a mapping .*got int",
        ),
        Row(
            "restore-ckpt-path-none",
            _linear,
            lambda m, tmp: la.restore_from_checkpoint(m, None),
            la.AdapterConfigError,
            r"restore_from_checkpoint: ckpt_path must be the path of a .ckpt file .*got None",
        ),
        Row(
            "restore-model-none",
            None,
            lambda m, tmp: la.restore_from_checkpoint(None, tmp / "run.ckpt"),
            la.AdapterTypeError,
            r"restore_from_checkpoint: model must be a torch.nn.Module instance, got NoneType",
        ),
        Row(
            "merge-inference-tensors",
            _inference_pair,
            _merge_inference(s),
            la.AdapterStateError,
            r"merge: 0.weight is an inference tensor .*inside `with torch.inference_mode\(\):`",
        ),
        Row(
            "eject-inference-tensors",
            _inference_pair,
            _eject_inference(s),
            la.AdapterStateError,
            r"eject: '0.weight' is an inference tensor .*inside `with torch.inference_mode\(\):`",
        ),
    ]
