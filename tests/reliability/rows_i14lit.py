"""Bad-input rows of the Lightning integration (issues 14 and 15): edited checkpoints, ``module`` names that hold
no adapter, refused restores onto a model that already has an adapter, a fit that fails before injection, and
adapter configs given as mappings (LightningCLI YAML).

``rows(bad_inputs)`` takes the ``test_bad_inputs`` module, whose ``Row`` and helpers it uses (no import cycle).
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

import torch

import lightning_adapters as la


def _edited_checkpoint(bi: ModuleType, tmp: Path, edit) -> Path:
    """The good adapter-only checkpoint of ``test_bad_inputs``, edited by ``edit(checkpoint_dict)``."""
    path = bi._write_checkpoint(tmp)
    path.chmod(0o644)
    checkpoint = torch.load(path, weights_only=True)
    edit(checkpoint)
    torch.save(checkpoint, path)
    bi._freeze_files(tmp)
    return path


def _drop_meta(key: str):
    return lambda c: c["lightning_adapters"].pop(key)


def _drop(key: str):
    return lambda c: c.pop(key)


def _non_tensor(c: dict) -> None:
    c["state_dict"][next(iter(c["state_dict"]))] = [0.0, 1.0]


def _unknown_field(c: dict) -> None:
    c["lightning_adapters"]["config"]["rr"] = 3


def _restore_edited(bi: ModuleType, edit, **kw: Any):
    return lambda m, tmp: la.restore_from_checkpoint(m, _edited_checkpoint(bi, tmp, edit), **kw)


def _resume_edited(bi: ModuleType, edit):
    """``fit(ckpt_path=...)`` from an edited checkpoint; the model is snapshot right after injection."""

    def action(m, tmp):
        import lightning as L

        from tests.lightning.models import token_data, trainer

        class SnapshotAfterInjection(L.Callback):
            def setup(self, trainer, pl_module, stage):
                bi._snapshot_into(pl_module)

        path = _edited_checkpoint(bi, tmp, edit)
        cb = la.AdapterCallback(la.LoRAConfig(**bi._CKPT_CONFIG), module="model", verbose=False)
        return trainer(max_steps=2, callbacks=[cb, SnapshotAfterInjection()]).fit(m, token_data(), ckpt_path=path)

    return action


def _fit(config: Any, module: str | None = "model"):
    """A fit that must fail at setup or right after ``configure_model``, before anything is injected."""

    def action(m, tmp):
        from tests.lightning.models import token_data, trainer

        return trainer(max_steps=1, callbacks=[la.AdapterCallback(config, module=module, verbose=False)]).fit(
            m, token_data()
        )

    return action


def _with_adapter(bi: ModuleType):
    """A seed-1 model that already holds a trained-looking adapter with the checkpoint's config."""

    def make():
        m = bi._llm(seed=1)
        la.inject(m.model, la.LoRAConfig(**bi._CKPT_CONFIG))
        with torch.no_grad():
            for v in la.adapter_state_dict(m.model).values():
                v.copy_(torch.full_like(v, 0.25))
        return m

    return make


def rows(bi: ModuleType) -> list:
    """The rows, built with ``test_bad_inputs``' ``Row`` and helpers."""
    Row = bi.Row
    return [
        Row(
            "restore-ckpt-without-method",
            bi._llm,
            _restore_edited(bi, _drop_meta("method")),
            la.AdapterStateError,
            r"run.ckpt: the 'lightning_adapters' entry has no 'method' key.*edited or damaged",
        ),
        Row(
            "restore-ckpt-without-state-dict",
            bi._llm,
            _restore_edited(bi, _drop("state_dict")),
            la.AdapterStateError,
            r"run.ckpt has no 'state_dict' key.*edited or damaged",
        ),
        Row(
            "restore-ckpt-non-tensor-value",
            bi._llm,
            _restore_edited(bi, _non_tensor),
            la.AdapterStateError,
            r"run.ckpt: 'state_dict' values must be tensors; got model\.\S+lora_A \(list\)",
        ),
        Row(
            "restore-ckpt-unknown-config-field",
            bi._llm,
            _restore_edited(bi, _unknown_field),
            la.AdapterStateError,
            r"run.ckpt: the lora config in the checkpoint has unknown fields \['rr'\]",
        ),
        Row(
            "restore-module-not-in-checkpoint",
            bi._llm,
            lambda m, tmp: la.restore_from_checkpoint(m, bi._write_checkpoint(tmp), module="nope"),
            la.AdapterStateError,
            r"module='nope' does not hold the adapter of .*run.ckpt, which was injected into 'model'; pass "
            r"module='model'",
        ),
        Row(
            "restore-module-not-a-string",
            bi._llm,
            lambda m, tmp: la.restore_from_checkpoint(m, bi._write_checkpoint(tmp), module=["model"]),
            la.AdapterConfigError,
            r"module must be a dotted sub-module name such as 'model' or None, got \['model'\]",
        ),
        Row(
            "restore-refused-keeps-own-adapter",
            _with_adapter(bi),
            lambda m, tmp: la.restore_from_checkpoint(m, bi._write_checkpoint(tmp)),
            la.AdapterStateError,
            r"different base model \(fingerprint [0-9a-f]+, this model [0-9a-f]+\)",
        ),
        Row(
            "resume-ckpt-without-method",
            bi._llm,
            _resume_edited(bi, _drop_meta("method")),
            la.AdapterStateError,
            r"the checkpoint: the 'lightning_adapters' entry has no 'method' key",
        ),
        Row(
            "resume-ckpt-without-state-dict",
            bi._llm,
            _resume_edited(bi, _drop("state_dict")),
            la.AdapterStateError,
            r"the checkpoint has no 'state_dict' key",
        ),
        Row(
            "fit-module-name-not-found",
            bi._llm,
            _fit(la.LoRAConfig(**bi._CKPT_CONFIG), module="nope"),
            la.AdapterConfigError,
            r"AdapterCallback\(module='nope'\): the LightningModule has no sub-module of that name",
        ),
        Row(
            "callback-config-mapping-unknown-method",
            bi._llm,
            _fit({"method": "lorra", "r": 2}),
            la.AdapterConfigError,
            r"unknown adapter method 'lorra'; choose one of",
        ),
        Row(
            "callback-config-mapping-unknown-field",
            bi._llm,
            _fit({"method": "lora", "rr": 2}),
            la.AdapterConfigError,
            r"LoRAConfig has no field \['rr'\]; its fields are \[.*'r'",
        ),
        Row(
            "callback-config-mapping-without-method",
            bi._llm,
            _fit({"r": 2}),
            la.AdapterConfigError,
            r"needs 'method' \(e.g. \{method: lora, r: 8\}\) or 'class_path'",
        ),
        Row(
            "callback-config-class-path-not-a-config",
            bi._llm,
            _fit({"class_path": "torch.nn.Linear", "init_args": {"in_features": 2}}),
            la.AdapterConfigError,
            r"class_path 'torch.nn.Linear' is not an adapter config class",
        ),
    ]
