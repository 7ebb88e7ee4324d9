"""The table of bad inputs: each row raises one clear exception that names the offending value and the fix,
and leaves the model (and any file on disk) exactly as it was.

The rows are summarised in docs/BAD_INPUTS.md; ``test_table_is_documented`` keeps the two in sync.
"""

from __future__ import annotations

import functools
import json
import re
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import lightning_adapters as la
from tests.helpers import SmallCNN, Wrap, tiny_bert, tiny_gpt2, tiny_llama
from tests.reliability import (
    rows_combine,
    rows_eva,
    rows_i14lit,
    rows_i15files,
    rows_i15models,
    rows_i15red,
    rows_i15state,
    rows_i18init,
    rows_i18io,
    rows_lightning,
    rows_multi,
    rows_quant,
    rows_routing,
    rows_scaleout,
)

DOC = Path(__file__).resolve().parents[2] / "docs" / "BAD_INPUTS.md"


@dataclass
class Row:
    """One bad input.

    Attributes:
        id: Stable name, listed in docs/BAD_INPUTS.md.
        make_model: Builds the model the action gets (``None``: the action only builds a config).
        action: ``(model, tmp_path) -> Any``; must raise.
        exc: The exception type expected.
        match: Regex the message must contain (the offending value and/or the fix).
    """

    id: str
    make_model: Callable[[], nn.Module] | None
    action: Callable[[Any, Path], Any]
    exc: type
    match: str


def _cfg(name: str, **kw: Any):
    return lambda m, p: getattr(la, name)(**kw)


def _inject(name: str, **kw: Any):
    return lambda m, p: la.inject(m, getattr(la, name)(**kw))


def _peft_dir(model_fn, cfg_name, edit=None, **kw):
    """Write a good PEFT dir for ``model_fn`` + config into ``tmp/src``, then let ``edit`` corrupt it."""

    def action(m, tmp):
        src = tmp / "src"
        la.save_peft(la.inject(model_fn(), getattr(la, cfg_name)(**kw)), src)
        if edit is not None:
            edit(src)
        _freeze_files(tmp)
        return la.load_peft(m, src)

    return action


def _edit_json(**changes):
    def edit(d: Path):
        cfg = json.loads((d / "adapter_config.json").read_text())
        cfg.update(changes)
        (d / "adapter_config.json").write_text(json.dumps(cfg))

    return edit


def _edit_tensors(fn):
    def edit(d: Path):
        from safetensors.torch import load_file, save_file

        t = load_file(str(d / "adapter_model.safetensors"))
        save_file(fn(t), str(d / "adapter_model.safetensors"))

    return edit


def _truncate(d: Path):
    data = (d / "adapter_model.safetensors").read_bytes()
    (d / "adapter_model.safetensors").write_bytes(data[: len(data) // 3])


def _not_safetensors(d: Path):
    torch.save({"x": torch.zeros(1)}, d / "adapter_model.safetensors")


_FILES: dict[str, bytes] = {}


def _freeze_files(tmp: Path) -> None:
    _FILES.clear()
    _FILES.update({str(p): p.read_bytes() for p in tmp.rglob("*") if p.is_file()})


def _state_dict_action(mutate):
    def action(m, tmp):
        la.inject(m, la.LoRAConfig(r=2, target_modules=["q_proj"]))
        sd = {k: v.clone() for k, v in la.adapter_state_dict(m).items()}
        _snapshot_into(m)
        return la.load_adapter_state_dict(m, mutate(sd))

    return action


_SNAP: dict[str, Any] = {}


def _snapshot_into(m: nn.Module) -> None:
    _SNAP["model"] = _snapshot(m)


def _snapshot(m: nn.Module):
    return (
        {k: v.clone() for k, v in m.state_dict().items()},
        {n: p.requires_grad for n, p in m.named_parameters()},
        {n: type(x) for n, x in m.named_modules()},
    )


def _drop_first(sd):
    sd.pop(sorted(sd)[0])
    return sd


def _add_extra(sd):
    sd["model.layers.0.self_attn.k_proj.adapter.default.lora_A"] = torch.zeros(2, 64)
    return sd


def _reshape_first(sd):
    k = sorted(sd)[0]
    sd[k] = torch.zeros(sd[k].shape[0] + 1, *sd[k].shape[1:])
    return sd


def _twice(m, tmp):
    la.inject(m, la.LoRAConfig(r=2, target_modules=["q_proj"]))
    _snapshot_into(m)
    return la.inject(m, la.LoRAConfig(r=4, target_modules=["q_proj"]))


ENGINE_ROWS = [
    Row("unknown-method", None, lambda m, p: la.get_method("lorra"), la.AdapterConfigError, r"'lorra'.*choose one of"),
    Row("config-not-a-config", tiny_llama, lambda m, p: la.inject(m, {"r": 8}), TypeError, r"LoRAConfig"),
    Row(
        "targets-match-nothing",
        tiny_llama,
        _inject("LoRAConfig", target_modules=["qproj"]),
        la.TargetError,
        r"'qproj'.*closest module names.*q_proj",
    ),
    Row(
        "regex-matches-nothing",
        tiny_llama,
        _inject("LoRAConfig", target_modules=r"layers\.9\..*"),
        la.TargetError,
        r"layers\\\\.9",
    ),
    Row(
        "exclude-removes-everything",
        tiny_llama,
        _inject("LoRAConfig", target_modules=["q_proj"], exclude_modules=["q_proj"]),
        la.TargetError,
        r"exclude_modules=\['q_proj'\]",
    ),
    Row(
        "unsupported-layer",
        tiny_llama,
        _inject("LoRAConfig", target_modules=["q_proj", "post_attention_layernorm"]),
        la.UnsupportedLayerError,
        r"LlamaRMSNorm.*exclude_modules",
    ),
    Row("no-default-targets", SmallCNN, _inject("LoRAConfig"), la.TargetError, r"no default for model type None"),
    Row(
        "modules-to-save-nothing",
        tiny_bert,
        _inject("LoRAConfig", target_modules=["query"], modules_to_save=["clasifier"]),
        la.TargetError,
        r"clasifier",
    ),
    Row("inject-twice-different", tiny_llama, _twice, la.AdapterConfigError, r"different config.*eject"),
    Row("state-missing-key", tiny_llama, _state_dict_action(_drop_first), la.AdapterStateError, r"missing keys"),
    Row(
        "state-extra-key", tiny_llama, _state_dict_action(_add_extra), la.AdapterStateError, r"unexpected keys.*k_proj"
    ),
    Row(
        "state-misshaped",
        tiny_llama,
        _state_dict_action(_reshape_first),
        la.AdapterStateError,
        r"shape mismatches.*got \(3, 64\)",
    ),
    Row(
        "peft-unknown-type",
        tiny_llama,
        _peft_dir(tiny_llama, "LoRAConfig", _edit_json(peft_type="IA3"), target_modules=["q_proj"]),
        la.AdapterConfigError,
        r"'IA3'",
    ),
    Row(
        "peft-unsupported-option",
        tiny_llama,
        _peft_dir(tiny_llama, "LoRAConfig", _edit_json(layer_replication=[[0, 2]]), target_modules=["q_proj"]),
        la.AdapterConfigError,
        r"option layer_replication=\[\[0, 2\]\] is not supported",
    ),
    Row(
        "peft-missing-tensor",
        tiny_llama,
        _peft_dir(
            tiny_llama,
            "LoRAConfig",
            _edit_tensors(lambda t: {k: v for k, v in list(t.items())[1:]}),
            target_modules=["q_proj"],
        ),
        la.AdapterStateError,
        r"missing",
    ),
    Row(
        "peft-extra-tensor",
        tiny_llama,
        _peft_dir(
            tiny_llama,
            "LoRAConfig",
            _edit_tensors(lambda t: {**t, "base_model.model.foo.lora_A.weight": torch.zeros(1)}),
            target_modules=["q_proj"],
        ),
        la.AdapterStateError,
        r"unexpected keys \['foo.lora_A.weight'\]",
    ),
    Row(
        "peft-misshaped-tensor",
        tiny_llama,
        _peft_dir(
            lambda: tiny_llama(hidden_size=32, intermediate_size=64), "LoRAConfig", None, target_modules=["q_proj"]
        ),
        la.AdapterStateError,
        r"mis-shaped.*file \(8, 32\), model \(8, 64\)",
    ),
    Row(
        "peft-truncated",
        tiny_llama,
        _peft_dir(tiny_llama, "LoRAConfig", _truncate, target_modules=["q_proj"]),
        la.AdapterStateError,
        r"not a readable safetensors.*truncated",
    ),
    Row(
        "peft-not-safetensors",
        tiny_llama,
        _peft_dir(tiny_llama, "LoRAConfig", _not_safetensors, target_modules=["q_proj"]),
        la.AdapterStateError,
        r"not a readable safetensors",
    ),
    Row(
        "peft-no-config",
        tiny_llama,
        lambda m, p: la.load_peft(m, p / "nowhere"),
        la.AdapterStateError,
        r"adapter_config.json does not exist",
    ),
    Row("merge-non-finite", tiny_llama, lambda m, p: _nan_merge(m), ValueError, r"v_proj.*non-finite"),
    Row("lora-r-zero", None, _cfg("LoRAConfig", r=0), la.AdapterConfigError, r"lora: r must be an integer > 0, got 0"),
    Row("lora-r-negative", None, _cfg("LoRAConfig", r=-4), la.AdapterConfigError, r"got -4"),
    Row("lora-alpha-zero", None, _cfg("LoRAConfig", alpha=0), la.AdapterConfigError, r"alpha.*> 0, got 0"),
    Row("lora-dropout-one", None, _cfg("LoRAConfig", dropout=1.0), la.AdapterConfigError, r"\[0, 1\), got 1.0"),
    Row("lora-dropout-negative", None, _cfg("LoRAConfig", dropout=-0.1), la.AdapterConfigError, r"got -0.1"),
    Row("lora-init-unknown", None, _cfg("LoRAConfig", init_weights="pisa"), la.AdapterConfigError, r"'pisa'"),
    # A string "false" (YAML / a CLI) was taken as true: rsLoRA on, silently.
    Row(
        "lora-use-rslora-string",
        None,
        _cfg("LoRAConfig", use_rslora="false"),
        la.AdapterConfigError,
        r"use_rslora must be one of \[False, True\], got 'false'",
    ),
    Row("lora-use-dora-int", None, _cfg("LoRAConfig", use_dora=1), la.AdapterConfigError, r"use_dora .*got 1$"),
    Row(
        "lora-conv-groups",
        lambda: Wrap(nn.Conv2d(8, 8, 3, groups=4)),
        _inject("LoRAConfig", r=2, target_modules=["layer"]),
        la.AdapterConfigError,
        r"groups=4; use r in \[4, 8",
    ),
    Row("adapter-dtype-unknown", None, _cfg("LoRAConfig", adapter_dtype="fp8"), la.AdapterConfigError, r"'fp8'"),
    Row(
        "gpt2-bad-target-type",
        tiny_gpt2,
        _inject("LoRAConfig", target_modules=["ln_1"]),
        la.UnsupportedLayerError,
        r"LayerNorm",
    ),
]


def _adalora_schedule(m, tmp):
    """A step schedule is refused when the trainer cannot say how many optimizer steps the run has."""
    from lightning_adapters.methods.adalora import AdaLoRASchedule

    la.inject(m, la.AdaLoRAConfig(init_r=4, target_r=2, tinit=6, tfinal=4, target_modules=["q_proj"]))
    _snapshot_into(m)
    return AdaLoRASchedule(m, la.config_of(m)).start(float("inf"))


METHOD_ROWS = [
    Row("loha-r-zero", None, _cfg("LoHaConfig", r=0), la.AdapterConfigError, r"loha: r .*got 0"),
    Row("loha-alpha-negative", None, _cfg("LoHaConfig", alpha=-1), la.AdapterConfigError, r"alpha.*-1"),
    Row("loha-rank-dropout", None, _cfg("LoHaConfig", rank_dropout=1.5), la.AdapterConfigError, r"rank_dropout.*1.5"),
    Row(
        "loha-module-dropout",
        None,
        _cfg("LoHaConfig", module_dropout=-0.5),
        la.AdapterConfigError,
        r"module_dropout.*-0.5",
    ),
    Row(
        "loha-embedding",
        tiny_llama,
        _inject("LoHaConfig", target_modules=["embed_tokens"]),
        la.UnsupportedLayerError,
        r"Embedding",
    ),
    Row("lokr-r-negative", None, _cfg("LoKrConfig", r=-2), la.AdapterConfigError, r"lokr: r .*-2"),
    Row(
        "lokr-decompose-factor",
        None,
        _cfg("LoKrConfig", decompose_factor=-7),
        la.AdapterConfigError,
        r"decompose_factor.*-7",
    ),
    Row("lokr-init-unknown", None, _cfg("LoKrConfig", init_weights="pissa"), la.AdapterConfigError, r"'pissa'"),
    Row(
        "lokr-embedding",
        tiny_llama,
        _inject("LoKrConfig", target_modules=["embed_tokens"]),
        la.UnsupportedLayerError,
        r"Embedding",
    ),
    Row(
        "oft-both-sizes",
        None,
        _cfg("OFTConfig", r=4, oft_block_size=16),
        la.AdapterConfigError,
        r"r=4.*oft_block_size=16",
    ),
    Row("oft-no-size", None, _cfg("OFTConfig", r=0, oft_block_size=0), la.AdapterConfigError, r"oft_block_size"),
    Row(
        "oft-block-not-dividing",
        tiny_llama,
        _inject("OFTConfig", oft_block_size=24, target_modules=["q_proj"]),
        la.AdapterConfigError,
        r"24.*q_proj.*(8|16|32)",
    ),
    Row(
        "oft-neumann-terms",
        None,
        _cfg("OFTConfig", num_cayley_neumann_terms=0),
        la.AdapterConfigError,
        r"num_cayley_neumann_terms.*0",
    ),
    Row("oft-eps", None, _cfg("OFTConfig", coft=True, eps=-1.0), la.AdapterConfigError, r"eps.*-1.0"),
    Row(
        "oft-gpt2-conv1d",
        tiny_gpt2,
        _inject("OFTConfig", oft_block_size=8, target_modules=["c_attn"]),
        la.UnsupportedLayerError,
        r"Conv1D",
    ),
    Row(
        "boft-no-size",
        None,
        _cfg("BOFTConfig", boft_block_size=0, boft_block_num=0),
        la.AdapterConfigError,
        r"exactly one of boft_block_size.*boft_block_num",
    ),
    Row(
        "boft-both-sizes",
        None,
        _cfg("BOFTConfig", boft_block_size=4, boft_block_num=4),
        la.AdapterConfigError,
        r"boft_block_size=4, boft_block_num=4",
    ),
    Row(
        "boft-factor-zero",
        None,
        _cfg("BOFTConfig", boft_n_butterfly_factor=0),
        la.AdapterConfigError,
        r"boft_n_butterfly_factor.*got 0",
    ),
    Row("boft-dropout", None, _cfg("BOFTConfig", boft_dropout=1.0), la.AdapterConfigError, r"boft_dropout.*1.0"),
    Row(
        "boft-block-not-dividing",
        tiny_llama,
        _inject("BOFTConfig", boft_block_size=3, target_modules=["q_proj"]),
        la.AdapterConfigError,
        r"boft_block_size=3.*q_proj.*\[2, 4, 8",
    ),
    Row(
        "boft-too-many-factors",
        tiny_llama,
        _inject("BOFTConfig", boft_block_size=4, boft_n_butterfly_factor=6, target_modules=["q_proj"]),
        la.AdapterConfigError,
        r"boft_n_butterfly_factor.*6",
    ),
    Row(
        "boft-embedding",
        tiny_llama,
        _inject("BOFTConfig", target_modules=["embed_tokens"]),
        la.UnsupportedLayerError,
        r"Embedding",
    ),
    Row(
        "adalora-target-above-init",
        None,
        _cfg("AdaLoRAConfig", init_r=4, target_r=8),
        la.AdapterConfigError,
        r"target_r.*8.*init_r.*4",
    ),
    Row("adalora-init-r-zero", None, _cfg("AdaLoRAConfig", init_r=0, target_r=0), la.AdapterConfigError, r"init_r.*0"),
    Row("adalora-beta", None, _cfg("AdaLoRAConfig", beta1=1.0), la.AdapterConfigError, r"beta1.*1.0"),
    Row("adalora-schedule-name", None, _cfg("AdaLoRAConfig", schedule="weekly"), la.AdapterConfigError, r"weekly"),
    Row(
        "adalora-impossible-schedule",
        None,
        _cfg("AdaLoRAConfig", total_step=10, tinit=6, tfinal=4),
        la.AdapterConfigError,
        r"tinit.*tfinal.*total_step",
    ),
    Row("adalora-schedule-from-trainer", tiny_llama, _adalora_schedule, la.AdapterConfigError, r"unbounded"),
    Row(
        "adalora-embedding",
        tiny_llama,
        _inject("AdaLoRAConfig", target_modules=["embed_tokens"]),
        la.UnsupportedLayerError,
        r"Embedding",
    ),
    Row(
        "llama-adapter-unsupported-model",
        tiny_bert,
        _inject("LlamaAdapterConfig", adapter_len=4, adapter_layers=1),
        la.UnsupportedLayerError,
        r"bert.*supported model types",
    ),
    Row(
        "llama-adapter-too-many-layers",
        tiny_llama,
        _inject("LlamaAdapterConfig", adapter_len=4, adapter_layers=5),
        la.AdapterConfigError,
        r"adapter_layers.*5.*2",
    ),
    Row(
        "llama-adapter-len-zero",
        None,
        _cfg("LlamaAdapterConfig", adapter_len=0),
        la.AdapterConfigError,
        r"adapter_len.*0",
    ),
    Row("llama-adapter-merge", tiny_llama, lambda m, p: _merge_prompt(m), la.NotMergeableError, r"not mergeable"),
]


def _merge_prompt(m):
    la.inject(m, la.LlamaAdapterConfig(adapter_len=4, adapter_layers=1))
    _snapshot_into(m)
    return la.merge(m)


def _nan_merge(m):
    la.inject(m, la.LoRAConfig(r=2, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        m.model.layers[1].self_attn.v_proj.adapter.default.lora_B.fill_(float("inf"))
    _snapshot_into(m)
    return la.merge(m, safe=True)


def _llm(seed: int = 0) -> nn.Module:
    from tests.lightning.models import TinyLlamaLM

    return TinyLlamaLM(seed=seed)


_CKPT_CONFIG = {"r": 2, "target_modules": ["q_proj"]}


@functools.cache
def _checkpoint_bytes(adapter_only: bool) -> bytes:
    """One training step of ``_llm()`` saved by the trainer: adapter-only (``AdapterCallback``, LoRA r=2) or full."""
    from tests.lightning.models import token_data, trainer

    model = _llm()
    callbacks = (
        [la.AdapterCallback(la.LoRAConfig(**_CKPT_CONFIG), module="model", verbose=False)] if adapter_only else []
    )
    t = trainer(max_steps=1, callbacks=callbacks)
    t.fit(model, token_data())
    with tempfile.TemporaryDirectory() as tmp:
        t.save_checkpoint(Path(tmp) / "c.ckpt")
        return (Path(tmp) / "c.ckpt").read_bytes()


def _write_checkpoint(tmp: Path, adapter_only: bool = True, truncate: bool = False) -> Path:
    data = _checkpoint_bytes(adapter_only)
    path = tmp / "run.ckpt"
    path.write_bytes(data[: len(data) // 2] if truncate else data)
    _freeze_files(tmp)
    return path


def _resume(cfg_name: str, adapter_only: bool = True, **kw: Any):
    """``trainer.fit(model, ckpt_path=...)`` with ``AdapterCallback(config)``; must fail in the restore.

    The callback injects at setup (that is its job); what must stay unchanged is the injected model as it was
    before the restore, so it is snapshot by a callback that runs right after ``AdapterCallback.setup``.
    """

    def action(m, tmp):
        import lightning as L

        from tests.lightning.models import token_data, trainer

        class SnapshotAfterInjection(L.Callback):
            def setup(self, trainer, pl_module, stage):
                _snapshot_into(pl_module)

        path = _write_checkpoint(tmp, adapter_only)
        cfg = getattr(la, cfg_name)(**kw)
        callbacks = [la.AdapterCallback(cfg, module="model", verbose=False), SnapshotAfterInjection()]
        return trainer(max_steps=2, callbacks=callbacks).fit(m, token_data(), ckpt_path=path)

    return action


def _restore(adapter_only: bool = True, truncate: bool = False):
    return lambda m, tmp: la.restore_from_checkpoint(m, _write_checkpoint(tmp, adapter_only, truncate))


LIGHTNING_ROWS = [
    Row(
        "resume-different-base",
        lambda: _llm(seed=1),
        _resume("LoRAConfig", **_CKPT_CONFIG),
        la.AdapterStateError,
        r"different base model \(fingerprint [0-9a-f]+, this model [0-9a-f]+\).*Load the same base weights",
    ),
    Row(
        "resume-different-config",
        _llm,
        _resume("LoRAConfig", r=4, target_modules=["q_proj"]),
        la.AdapterStateError,
        r"different lora config \(r: checkpoint 2, now 4\); resume with the same config",
    ),
    Row(
        "resume-different-method",
        _llm,
        _resume("LoHaConfig", **_CKPT_CONFIG),
        la.AdapterStateError,
        r"holds a 'lora' adapter but this model uses 'loha'; resume with the config",
    ),
    Row(
        "resume-not-adapter-checkpoint",
        _llm,
        _resume("LoRAConfig", adapter_only=False, **_CKPT_CONFIG),
        la.AdapterStateError,
        r"not written by lightning_adapters.*missing keys \['model.model.layers.0.self_attn.q_proj.*new run",
    ),
    Row(
        "restore-different-base",
        lambda: _llm(seed=1),
        _restore(),
        la.AdapterStateError,
        r"different base model \(fingerprint [0-9a-f]+, this model [0-9a-f]+\)",
    ),
    Row(
        "restore-not-adapter-checkpoint",
        _llm,
        _restore(adapter_only=False),
        la.AdapterStateError,
        r"run.ckpt has no 'lightning_adapters' entry.*AdapterCallback",
    ),
    Row(
        "restore-truncated",
        _llm,
        _restore(truncate=True),
        la.AdapterStateError,
        r"run.ckpt is not a readable checkpoint.*truncated",
    ),
]

ROWS: list[Row] = ENGINE_ROWS + METHOD_ROWS + LIGHTNING_ROWS
ROWS += rows_i15models.rows(Row)
ROWS += rows_i15files.rows(Row)
ROWS += rows_i15state.rows(Row, _snapshot_into)
ROWS += rows_i14lit.rows(sys.modules[__name__])
ROWS += rows_i18init.rows(Row)
ROWS += rows_i15red.rows(Row, _snapshot_into)
ROWS += rows_i18io.rows(Row)
ROWS += rows_eva.rows(Row)
ROWS += rows_quant.rows(Row)
ROWS += rows_scaleout.rows(Row)
ROWS += rows_multi.rows(Row, _snapshot_into)
ROWS += rows_combine.rows(Row, _snapshot_into)
ROWS += rows_routing.rows(Row, _snapshot_into)
ROWS += rows_lightning.rows(Row, _snapshot_into)


@pytest.mark.parametrize("row", [pytest.param(r, id=r.id) for r in ROWS])
def test_bad_input(row: Row, tmp_path: Path) -> None:
    _SNAP.clear()
    _FILES.clear()
    model = row.make_model() if row.make_model is not None else None
    before = _snapshot(model) if model is not None else None
    with pytest.raises(row.exc) as info:
        row.action(model, tmp_path)
    assert re.search(row.match, str(info.value), flags=re.S), str(info.value)
    if model is not None:
        sd, rg, types = _SNAP.get("model", before)
        now = model.state_dict()
        assert set(now) == set(sd)
        for k, v in sd.items():
            assert torch.equal(now[k], v) or (torch.isnan(v).any() and torch.equal(now[k].isnan(), v.isnan())), k
        assert {n: p.requires_grad for n, p in model.named_parameters()} == rg
        assert {n: type(x) for n, x in model.named_modules()} == types
    for path, data in _FILES.items():
        assert Path(path).read_bytes() == data, f"{path} changed"


def test_table_is_documented() -> None:
    text = DOC.read_text()
    missing = [r.id for r in ROWS if f"`{r.id}`" not in text]
    assert not missing, f"add these rows to {DOC}: {missing}"
    assert len(ROWS) >= 40


def render_table() -> str:
    """The markdown table of docs/BAD_INPUTS.md, with the message each row really produces."""
    lines = ["| case | exception | message |", "|---|---|---|"]
    for row in ROWS:
        model = row.make_model() if row.make_model is not None else None
        with tempfile.TemporaryDirectory() as tmp:
            try:
                row.action(model, Path(tmp))
                message = "(no error raised)"
            except Exception as err:  # noqa: BLE001 - we record whatever the row raises
                message = str(err).replace("|", "\\|").replace("\n", " ")
        lines.append(f"| `{row.id}` | `{row.exc.__name__}` | {message} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(render_table())
