"""Bad-input rows of issue 15 (files on disk): wrongly typed PEFT config fields, unusable output directories and
save dtypes, meta-device models, non-finite exports, grouped-conv LoRA without a PEFT form.

``rows(Row)`` builds them with ``test_bad_inputs.Row`` (passed in, so this module never imports the test module).
Every action that writes first puts a good adapter or export on disk, and checks itself that the failing call
left every file exactly as it was (bytes and names) before letting the error through.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import lightning_adapters as la
from tests.helpers import SmallCNN, tiny_llama


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _leaves_files_alone(tmp: Path, call: Callable[[], Any]) -> Any:
    """Run ``call`` (which must raise) and check nothing under ``tmp`` changed, not even a new file."""
    before = _files(tmp)
    try:
        return call()
    finally:
        assert _files(tmp) == before, "the failing call changed files on disk"


def _lora_llama() -> nn.Module:
    torch.manual_seed(0)
    return la.inject(tiny_llama(), la.LoRAConfig(r=2, target_modules=["q_proj"]))


def _save_then(save_kw: dict[str, Any] | None = None, directory: Callable[[Path], Any] | None = None):
    """Save a good adapter to ``tmp/out``, then save the row's model with ``save_kw`` into ``directory(tmp)``."""

    def action(m, tmp):
        la.save_peft(_lora_llama(), tmp / "out")
        target = directory(tmp) if directory is not None else tmp / "out"
        return _leaves_files_alone(tmp, lambda: la.save_peft(m, target, **(save_kw or {})))

    return action


def _in_cwd(sub: str, target: Callable[[Path], Any]):
    """Save from inside ``tmp/<sub>`` into ``target(tmp)`` (the cwd or one of its parents)."""

    def action(m, tmp):
        (tmp / sub).mkdir(parents=True)
        la.save_peft(m, tmp / sub / "adapter")
        here = os.getcwd()
        os.chdir(tmp / sub)
        try:
            return _leaves_files_alone(tmp, lambda: la.save_peft(m, target(tmp)))
        finally:
            os.chdir(here)

    return action


def _load_edited(edit: Callable[[Path], None], make: Callable[[], nn.Module] = _lora_llama):
    """Save a good adapter, corrupt its config with ``edit``, then load it into the row's model."""

    def action(m, tmp):
        src = tmp / "src"
        la.save_peft(make(), src)
        edit(src)
        return _leaves_files_alone(tmp, lambda: la.load_peft(m, src))

    return action


def _set_fields(**changes: Any):
    def edit(d: Path) -> None:
        cfg = json.loads((d / "adapter_config.json").read_text())
        cfg.update(changes)
        (d / "adapter_config.json").write_text(json.dumps(cfg))

    return edit


def _write_config(data: bytes):
    def edit(d: Path) -> None:
        (d / "adapter_config.json").write_bytes(data)

    return edit


def _adalora_llama() -> nn.Module:
    torch.manual_seed(0)
    return la.inject(tiny_llama(), la.AdaLoRAConfig(init_r=4, target_r=2, total_step=10, target_modules=["q_proj"]))


def _meta_lora() -> nn.Module:
    with torch.device("meta"):
        model = tiny_llama()
    return la.inject(model, la.LoRAConfig(r=2, target_modules=["q_proj"]))


def _with_first_adapter_value(make: Callable[[], nn.Module], value: float) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        m = make()
        with torch.no_grad():
            next(iter(la.adapter_state_dict(m).values()))[0, 0] = value
        return m

    return build


def _lora_cnn() -> nn.Module:
    torch.manual_seed(0)
    return la.inject(SmallCNN(), la.LoRAConfig(r=2, target_modules=["conv1", "fc"]))


def _export_then(directory: Callable[[Path], Any] | None = None, **kw: Any):
    """Export a good merged model to ``tmp/out``, then export the row's model into ``directory(tmp)``."""

    def action(m, tmp):
        la.export_merged(_lora_cnn(), tmp / "out")
        target = directory(tmp) if directory is not None else tmp / "out"
        return _leaves_files_alone(tmp, lambda: la.export_merged(m, target, **kw))

    return action


def _meta_action(write: Callable[[nn.Module, Path], Any]):
    """Build an injected meta-device model (the row's model is None: meta tensors cannot be compared) and write it
    over a previous export."""

    def action(m, tmp):
        (tmp / "out").mkdir()
        (tmp / "out" / "adapter_model.safetensors").write_bytes(b"a previous export")
        meta = _meta_lora()
        return _leaves_files_alone(tmp, lambda: write(meta, tmp / "out"))

    return action


class _GroupedConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1, groups=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def _grouped() -> nn.Module:
    torch.manual_seed(0)
    return _GroupedConv()


def _cross_group_file(m, tmp):
    """A PEFT-style grouped-conv file whose ungrouped lora_A has weights across groups: it loads (PEFT's layout,
    ``grouped_conv_layout='peft'``), and merging it is refused before anything changes."""
    from safetensors.torch import load_file, save_file

    src = tmp / "src"
    la.save_peft(la.inject(_grouped(), la.LoRAConfig(r=4, target_modules=["conv"])), src)
    t = load_file(src / "adapter_model.safetensors")
    t["base_model.model.conv.lora_A.weight"].fill_(0.5)  # (4, 8, 3, 3): every row reads every group
    save_file(t, src / "adapter_model.safetensors")
    loaded = la.load_peft(_grouped(), src)
    before = {k: v.clone() for k, v in loaded.state_dict().items()}
    try:
        return _leaves_files_alone(tmp, lambda: la.merge(loaded))
    finally:
        assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in before.items())


def _grouped_dora_save(m, tmp):
    model = la.inject(_grouped(), la.LoRAConfig(r=4, target_modules=["conv"], use_dora=True))
    return _leaves_files_alone(tmp, lambda: la.save_peft(model, tmp / "out"))


def rows(Row: type) -> list:  # noqa: N803 - the Row class of test_bad_inputs
    """The rows, built with ``test_bad_inputs.Row``."""
    cfg = r"src/adapter_config\.json"
    return [
        Row(
            "peft-json-number-as-string",
            tiny_llama,
            _load_edited(_set_fields(lora_alpha="8")),
            la.AdapterConfigError,
            cfg + r": field 'lora_alpha' must be a number, got a string \('8'\)",
        ),
        Row(
            "peft-json-null-integer",
            tiny_llama,
            _load_edited(_set_fields(init_r=None), make=_adalora_llama),
            la.AdapterConfigError,
            cfg + r": field 'init_r' must be an integer, got null",
        ),
        Row(
            "peft-json-boolean-as-integer",
            tiny_llama,
            _load_edited(_set_fields(use_rslora=1)),
            la.AdapterConfigError,
            cfg + r": field 'use_rslora' must be a boolean, got an integer \(1\)",
        ),
        Row(
            "peft-json-target-modules-type",
            tiny_llama,
            _load_edited(_set_fields(target_modules={"q_proj": True})),
            la.AdapterConfigError,
            cfg + r": field 'target_modules' must be a list of module names or a regex string, got an object",
        ),
        Row(
            "peft-json-pattern-value-type",
            tiny_llama,
            _load_edited(_set_fields(rank_pattern={"q_proj": "4"})),
            la.AdapterConfigError,
            cfg + r": field \"rank_pattern\['q_proj'\]\" must be one of integers, got a string",
        ),
        Row(
            "peft-json-peft-type-not-string",
            tiny_llama,
            _load_edited(_set_fields(peft_type=["LORA"])),
            la.AdapterConfigError,
            cfg + r": field 'peft_type' must be a string, got \['LORA'\]",
        ),
        Row(
            "peft-json-not-utf8",
            tiny_llama,
            _load_edited(_write_config(b'{"peft_type": "LORA", "r": 2, "x": "\xff"}')),
            la.AdapterStateError,
            cfg + r" is not UTF-8 text",
        ),
        Row(
            "peft-json-not-an-object",
            tiny_llama,
            _load_edited(_write_config(b'["LORA", 2]')),
            la.AdapterStateError,
            cfg + r" holds a JSON list, not an object",
        ),
        Row(
            "save-peft-empty-directory",
            _lora_llama,
            _save_then(directory=lambda tmp: ""),
            la.AdapterConfigError,
            r"save_peft: directory '' is empty; pass the adapter's output directory",
        ),
        Row(
            "save-peft-directory-not-a-path",
            _lora_llama,
            _save_then(directory=lambda tmp: 5),
            la.AdapterConfigError,
            r"save_peft: directory must be a str or os.PathLike, got int",
        ),
        Row(
            "save-peft-directory-is-a-file",
            _lora_llama,
            _save_then(directory=lambda tmp: tmp / "out" / "adapter_config.json"),
            la.AdapterConfigError,
            r"adapter_config.json' exists and is not a directory",
        ),
        Row(
            "save-peft-into-cwd",
            _lora_llama,
            _in_cwd("work", lambda tmp: "."),
            la.AdapterConfigError,
            r"save_peft: directory '\.' is the current working directory or contains it.*pass a sub-directory",
        ),
        Row(
            "save-peft-into-parent-of-cwd",
            _lora_llama,
            _in_cwd("a/b", lambda tmp: tmp / "a"),
            la.AdapterConfigError,
            r"is the current working directory or contains it",
        ),
        Row(
            "save-peft-integer-dtype",
            _lora_llama,
            _save_then({"save_dtype": torch.int8}),
            la.AdapterConfigError,
            r"save_dtype=torch.int8 is not a floating dtype the file can hold; use one of torch.float16, "
            r"torch.bfloat16",
        ),
        Row(
            "save-peft-unknown-dtype-name",
            _lora_llama,
            _save_then({"save_dtype": "fp8"}),
            la.AdapterConfigError,
            r"save_dtype='fp8' is not a floating dtype",
        ),
        Row(
            "save-peft-dtype-not-a-dtype",
            _lora_llama,
            _save_then({"save_dtype": 16}),
            la.AdapterConfigError,
            r"save_dtype=16 is not a floating dtype",
        ),
        Row(
            "save-peft-dtype-overflow",
            _with_first_adapter_value(_lora_llama, 1e6),
            _save_then({"save_dtype": "float16"}),
            la.AdapterStateError,
            r"tensor 'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight' overflows torch.float16 "
            r"\(largest magnitude 1e\+06\)",
        ),
        Row(
            "save-peft-safe-non-finite",
            _with_first_adapter_value(_lora_llama, float("nan")),
            _save_then({"safe": True}),
            la.AdapterStateError,
            r"save_peft: tensor '.*lora_A.weight' holds 1 non-finite values.*nothing was written",
        ),
        Row(
            "save-peft-meta-model",
            None,
            _meta_action(la.save_peft),
            la.AdapterStateError,
            r"save_peft: tensor '.*q_proj.lora_A.weight' is on the meta device.*materialize",
        ),
        Row(
            "export-merged-meta-model",
            None,
            _meta_action(la.export_merged),
            la.AdapterStateError,
            r"export_merged: 'model.embed_tokens.weight' is on the meta device",
        ),
        Row(
            "export-merged-non-finite",
            _with_first_adapter_value(_lora_cnn, float("nan")),
            _export_then(),
            la.AdapterStateError,
            r"export_merged: merged tensor 'conv1.weight' holds \d+ non-finite values.*nothing was written to",
        ),
        Row(
            "export-merged-empty-directory",
            _lora_cnn,
            _export_then(directory=lambda tmp: "  "),
            la.AdapterConfigError,
            r"export_merged: directory '  ' is empty",
        ),
        Row(
            "peft-grouped-conv-cross-group",
            _grouped,
            _cross_group_file,
            la.NotMergeableError,
            r"on 'conv' is not mergeable: its LoRA uses PEFT's grouped-conv layout \(grouped_conv_layout='peft'",
        ),
        Row(
            "save-peft-grouped-conv-dora",
            None,
            _grouped_dora_save,
            la.AdapterConfigError,
            r"cannot save 'conv' in PEFT's format: DoRA on a conv with groups=4 has no PEFT equivalent",
        ),
    ]
