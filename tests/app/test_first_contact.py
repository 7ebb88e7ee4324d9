"""What a new user meets first: wrong trainer values, a failing sweep job, the block a run ends with, warnings."""

from __future__ import annotations

import csv
import json
import re
import time
import warnings
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException

from experiments.collect_sweep import main as collect_sweep_main
from experiments.collect_sweep import write_outputs
from lightning_adapters.errors import AdapterConfigError
from lightning_adapters.train import build
from tests.app.conftest import ROOT, compose_app, run_app
from tests.app.test_train import read_wandb_records

SHORT = [
    "model=tiny_bert",
    "trainer.accelerator=cpu",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=1",
    "trainer.log_every_n_steps=1",
    "callbacks.progress_bar.refresh_rate=0",
    "data.batch_size=16",
]


# --- trainer values are checked while composing ------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("trainer.max_epochs=one", ["trainer.max_epochs", "one", "Integer"]),
        ("trainer.accumulate_grad_batches=2.5", ["trainer.accumulate_grad_batches", "2.5"]),
        ("trainer.enable_checkpointing=maybe", ["trainer.enable_checkpointing", "maybe"]),
        ("trainer.max_epocs=3", ["max_epocs"]),
    ],
)
def test_wrong_trainer_value_fails_while_composing(override: str, words: list[str], tmp_path: Path) -> None:
    with pytest.raises(ConfigCompositionException) as err:
        compose_app([override], tmp_path)
    text = f"{err.value} {err.value.__cause__}"
    for w in words:
        assert w in text, text


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("trainer.limit_train_batches=abc", ["trainer.limit_train_batches='abc'", "int | float | None"]),
        ("trainer.devices=[a]", ["trainer.devices=['a']", "list[int] | str | int"]),
        ("trainer.precision=17", ["trainer.precision=17", "'bf16-mixed'"]),
        ("+trainer.foo=1", ["trainer.foo", "not an argument"]),
    ],
)
def test_union_typed_or_added_trainer_value_fails_before_anything_is_built(
    override: str, words: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = compose_app([*SHORT, override], tmp_path)
    built = []
    monkeypatch.setattr("hydra.utils.instantiate", lambda *a, **k: built.append(a))
    with pytest.raises(AdapterConfigError) as err:
        build(cfg)
    for w in words:
        assert w in str(err.value)
    assert not built  # refused before the model, the data or the trainer were built


def test_every_trainer_option_still_composes_and_passes_the_check(tmp_path: Path) -> None:
    from lightning_adapters.app.store import check_trainer

    for overrides in ([], ["trainer=cpu"], ["strategy=ddp"], ["precision=bf16-true"], ["trainer.max_time=00:00:05:00"]):
        check_trainer(compose_app(overrides, tmp_path).trainer)


def test_wrong_trainer_value_on_the_command_line_stops_with_one_message(tmp_path: Path) -> None:
    proc = run_app(["trainer.max_epochs=one"], cwd=tmp_path, timeout=120)
    assert proc.returncode != 0
    assert "Error merging override trainer.max_epochs=one" in proc.stderr
    assert "could not be converted to Integer" in proc.stderr and "full_key: trainer.max_epochs" in proc.stderr
    assert "TypeError" not in proc.stderr and "Epoch" not in proc.stdout + proc.stderr
    assert not (tmp_path / "logs").exists()


# --- a failing job in a multirun ---------------------------------------------------------------------------


def _records(run_file: Path) -> list:
    """The run's records once wandb's writer has flushed its exit record (it may lag ``finish()``)."""
    deadline = time.monotonic() + 60
    records = read_wandb_records(run_file)
    while not any(r.HasField("exit") for r in records) and time.monotonic() < deadline:
        time.sleep(0.5)
        records = read_wandb_records(run_file)
    return records


def _history_keys(records: list) -> set[str]:
    items = [i for r in records if r.HasField("history") for i in r.history.item]
    return {i.nested_key[0] if i.nested_key else i.key for i in items}


@pytest.mark.slow
def test_a_failed_sweep_job_finishes_its_wandb_run_and_is_listed_by_collect_sweep(tmp_path: Path) -> None:
    # Job 0 fails inside fit (AdamW refuses a negative learning rate) after its W&B run started; job 1 is fine.
    args = ["-m", *SHORT, "logger=wandb", "test=false", "model.optimizer.lr=-1,0.001"]
    proc = run_app(args, cwd=tmp_path, timeout=400)
    assert proc.returncode != 0  # the sweep reports the failure once every job ran
    (sweep,) = (tmp_path / "logs" / "train" / "multiruns").iterdir()  # the default sweep directory

    runs = {job: list((sweep / job / "wandb").glob("offline-run-*/run-*.wandb")) for job in ("0", "1")}
    assert len(runs["0"]) == 1 and len(runs["1"]) == 1, runs  # each job has its own run, in its own folder
    failed, ok = _records(runs["0"][0]), _records(runs["1"][0])
    assert [r.exit.exit_code for r in failed if r.HasField("exit")] == [1]
    assert [r.exit.exit_code for r in ok if r.HasField("exit")] == [0]
    assert "val/pearson" in _history_keys(ok) and "val/pearson" not in _history_keys(failed)
    assert {r.run.run_id for r in ok if r.HasField("run")}.isdisjoint(
        {r.run.run_id for r in failed if r.HasField("run")}
    )

    summary = json.loads((sweep / "0" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"].startswith("ValueError: Invalid learning rate: -1")
    paths = write_outputs(sweep)
    rows = {r["job"]: r for r in csv.DictReader(paths["csv"].open())}
    assert rows["0"]["status"] == "failed" and "Invalid learning rate" in rows["0"]["error"]
    assert rows["1"]["status"] == "ok" and float(rows["1"]["value"]) == pytest.approx(
        json.loads((sweep / "1" / "summary.json").read_text())["best_metric"]
    )
    table = paths["md"].read_text()
    assert "1 failed job" in table and "model.optimizer.lr=-1" in table and "Invalid learning rate: -1" in table


def test_collect_sweep_lists_a_job_that_died_without_a_summary(tmp_path: Path) -> None:
    done = tmp_path / "0"
    done.mkdir()
    summary = {"status": "ok", "method": "lora", "rank": 4, "params/trainable": 10, "best_metric": 0.5}
    (done / "summary.json").write_text(json.dumps({**summary, "metric": "val/pearson"}))
    (tmp_path / "1" / ".hydra").mkdir(parents=True)
    (tmp_path / "1" / ".hydra" / "overrides.yaml").write_text("- method=loha\n- method.r=4\n")
    paths = write_outputs(tmp_path)
    rows = {r["job"]: r for r in csv.DictReader(paths["csv"].open())}
    assert rows["1"]["status"] == "failed" and "killed" in rows["1"]["error"]
    assert rows["1"]["overrides"] == "method=loha method.r=4"
    assert "| lora | 4 |" in paths["md"].read_text()


# --- the block a run ends with -----------------------------------------------------------------------------


def _block(stdout: str) -> dict[str, str]:
    start = stdout.index("run directory")
    lines = stdout[start:].splitlines()
    rows = {}
    for line in lines:
        m = re.match(r"(run directory|best checkpoint|PEFT export|W&B run)\s{2,}(.*)", line)
        if m:
            rows[m.group(1)] = m.group(2)
    rows["load"] = "\n".join(line[4:] for line in lines if line.startswith("    "))
    return rows


@pytest.mark.slow
def test_the_run_ends_with_where_everything_is_and_lines_that_load_the_trained_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("peft")
    proc = run_app([*SHORT, "logger=wandb"], cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    block = _block(proc.stdout)
    run = tmp_path / block["run directory"]
    assert run.parent == tmp_path / "logs" / "train" / "runs"  # relative to where the app was started
    summary = json.loads((run / "summary.json").read_text())

    ckpt_text, ckpt_size = re.match(
        r"(\S+) \((\d+\.\d+) MB, val/pearson (-?\d\.\d+)\)", block["best checkpoint"]
    ).group(1, 2)
    ckpt = tmp_path / ckpt_text
    assert ckpt.is_file() and ckpt.parent == run / "checkpoints"
    assert float(ckpt_size) == pytest.approx(ckpt.stat().st_size / 1e6, abs=0.006)
    assert block["PEFT export"].startswith(f"{block['run directory']}/peft (")
    offline = re.search(r"wandb sync (\S+)", block["W&B run"]).group(1)
    assert (tmp_path / offline).is_dir() and (tmp_path / offline).parent == run / "wandb"

    # The printed lines, run as printed from the directory the app ran in, give back the trained model.
    monkeypatch.chdir(tmp_path)
    code = block["load"]
    assert code.count("model = ") == 3 and "PeftModel.from_pretrained" in code
    preamble = [ln for ln in code.splitlines() if "model = " not in ln]
    models = []
    for line in [ln for ln in code.splitlines() if "model = " in ln]:  # checkpoint, la.load_peft, PeftModel
        scope: dict = {}
        exec("\n".join([*preamble, line]), scope)
        models.append(scope["model"])
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from lightning_adapters.app import load_task

    cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
    bare = load_task(run)
    data = instantiate(cfg.data, tokenizer=bare.tokenizer)
    data.setup("test")
    ids, mask, y = next(iter(data.test_dataloader()))
    with torch.no_grad():
        outs = [m.eval()(ids, mask) for m in models]
        base_out = bare.eval()(ids, mask)
    # The checkpoint's model reproduces the test metric the run logged on the same batch.
    pearson = torch.corrcoef(torch.stack([outs[0], y.float()]))[0, 1]
    assert float(pearson) == pytest.approx(summary["test_metrics"]["test/pearson"], abs=1e-4)
    for out in outs[1:]:  # the best checkpoint is the last epoch here, so the PEFT export holds the same adapter
        torch.testing.assert_close(out, outs[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(base_out, outs[0], atol=1e-3)  # the untrained task predicts something else


# --- no avoidable warnings ---------------------------------------------------------------------------------


def test_package_metadata_has_no_deprecated_fields() -> None:
    pytest.importorskip("setuptools")
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. `project.license` as a TOML table
        dist = apply_configuration(Distribution(), ROOT / "pyproject.toml")
    assert dist.metadata.name == "lightning_adapters"


def test_pretrained_encoder_without_pooler_loads_quietly_and_reports_real_mismatches(
    capfd: pytest.CaptureFixture,
) -> None:
    from lightning_adapters.app.store import minilm_dir
    from lightning_adapters.app.task import pretrained_backbone

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = pretrained_backbone(minilm_dir(), add_pooling_layer=False)
    assert model.pooler is None and model.training
    assert "LOAD REPORT" not in "".join(capfd.readouterr()) and not caught
    with pytest.warns(UserWarning, match="unexpected weights.*encoder.layer.2"):
        pretrained_backbone(minilm_dir(), add_pooling_layer=False, num_hidden_layers=2)


def test_load_task_rebuilds_the_runs_initial_model_without_touching_the_global_rng(tmp_path: Path) -> None:
    # Llama-Adapter cannot save the head, so a reload depends on the head being rebuilt with its initial weights.
    from omegaconf import OmegaConf

    from lightning_adapters.app import load_task

    cfg = compose_app(["model=tiny_llama", "method=llama_adapter", "logger=none", "seed=7"], tmp_path)
    (tmp_path / ".hydra").mkdir()
    OmegaConf.save(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), tmp_path / ".hydra" / "config.yaml")
    built = build(cfg).task  # the app seeds, then builds the task
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    loaded = load_task(tmp_path)
    assert torch.equal(torch.rand(3), expected_next)  # the caller's random stream is untouched
    assert type(loaded) is type(built)
    for (name, a), (_, b) in zip(built.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    with pytest.raises(FileNotFoundError, match="training-app run"):
        load_task(tmp_path / "nowhere")


def test_load_task_of_a_qlora_run_quantizes_the_backbone_as_the_run_did(tmp_path: Path) -> None:
    # The adapter of a QLoRA run was trained (and its test metric measured) on the quantized backbone; the recipe
    # the run prints loads it onto load_task(run), which must be that backbone, not the full-precision one.
    from omegaconf import OmegaConf

    from lightning_adapters.app import load_task
    from lightning_adapters.core.quant import quant_scheme

    pytest.importorskip("bitsandbytes")
    cfg = compose_app(["model=tiny_bert", "quantization=nf4_double", "logger=none", "seed=3"], tmp_path)
    (tmp_path / ".hydra").mkdir()
    OmegaConf.save(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), tmp_path / ".hydra" / "config.yaml")
    built = build(cfg).task
    loaded = load_task(tmp_path)
    schemes = {n: quant_scheme(m) for n, m in loaded.named_modules()}
    assert schemes == {n: quant_scheme(m) for n, m in built.named_modules()}
    assert schemes["backbone.encoder.layer.0.attention.self.query"] == "nf4" and schemes["head"] is None
    assert built.state_dict().keys() == loaded.state_dict().keys()
    for (name, a), b in zip(built.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


def test_collect_sweep_on_a_path_that_is_not_a_sweep_says_so_in_one_line(tmp_path: Path, capsys) -> None:
    (tmp_path / "multirun.yaml").write_text("hydra: {}\n")
    for wrong in (tmp_path / "multirun.yaml", tmp_path / "missing"):
        with pytest.raises(SystemExit) as exit_info:
            collect_sweep_main([str(wrong)])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "no summary.json, .hydra/ or W&B offline run below" in err and str(wrong) in err
        assert "Traceback" not in err


def test_the_byte_tokenizer_of_the_tiny_models_calls_like_the_readme_calls_a_tokenizer() -> None:
    # README "Inference with what you trained": task.tokenizer(words, padding=True, return_tensors="pt").
    from lightning_adapters.app.data import ByteTokenizer

    batch = ByteTokenizer()(["ab", ":)!"], padding=True, return_tensors="pt")
    assert batch["input_ids"].tolist() == [[ord("a") + 1, ord("b") + 1, 0], [ord(":") + 1, ord(")") + 1, ord("!") + 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]
    assert ByteTokenizer()(["abc"], max_length=2)["input_ids"].tolist() == [[ord("a") + 1, ord("b") + 1]]
