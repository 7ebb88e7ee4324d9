"""The evaluation app reproduces a trained run's test metrics, from its checkpoint and from its PEFT export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lightning_adapters.errors import AdapterConfigError
from lightning_adapters.eval import evaluate, find_run_dir
from tests.app.conftest import compose_app, run_app

# A tiny run whose best checkpoint is also its last state (one validation), so the PEFT export written at fit end
# holds the same adapter as the best checkpoint the run tested.
TRAIN = [
    "model=tiny_bert",
    "logger=none",
    "trainer.accelerator=cpu",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=4",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=3",
    "callbacks.progress_bar.refresh_rate=0",
    "data.batch_size=16",
]
# The eval app's own trainer must test the same batches.
EVAL = ["trainer.accelerator=cpu", "trainer.limit_test_batches=3", "callbacks.progress_bar.refresh_rate=0"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("run")
    proc = run_app([*TRAIN, f"hydra.run.dir={run}"], cwd=run)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def _test_metrics(run: Path) -> dict[str, float]:
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["test_metrics"]) >= {"test/pearson", "test/mae", "test/loss"}
    return summary["test_metrics"]


@pytest.mark.slow
def test_eval_command_reproduces_the_run_test_metrics_from_its_checkpoint(trained_run: Path, tmp_path: Path) -> None:
    best = next((trained_run / "checkpoints").glob("epoch*.ckpt"))
    proc = run_app([f"ckpt_path={best}", *EVAL, f"hydra.run.dir={tmp_path}"], cwd=tmp_path, app="eval")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["run_dir"] == str(trained_run.resolve())
    expected = _test_metrics(trained_run)
    assert result["test_metrics"] == pytest.approx(expected, rel=1e-6, abs=1e-7)


@pytest.mark.slow
def test_eval_reproduces_the_run_test_metrics_from_its_peft_export(trained_run: Path, tmp_path: Path) -> None:
    cfg = compose_app([f"ckpt_path={trained_run / 'peft'}", *EVAL], tmp_path, config_name="eval")
    result = evaluate(cfg)
    assert result["test_metrics"] == pytest.approx(_test_metrics(trained_run), rel=1e-6, abs=1e-7)
    assert find_run_dir(trained_run / "peft" / "adapter_config.json") == trained_run.resolve()


@pytest.mark.slow
def test_eval_applies_data_overrides_on_top_of_the_run_config(trained_run: Path, tmp_path: Path) -> None:
    best = next((trained_run / "checkpoints").glob("epoch*.ckpt"))
    # One evaluation batch of 96 rows (2 x 48) holds the 3 batches of 32 rows the run tested: the same metrics,
    # but only if data.batch_size=48 reached the run's data config (else one batch of 32 rows is tested).
    overrides = [f"ckpt_path={best}", "trainer.accelerator=cpu", "trainer.limit_test_batches=1", "data.batch_size=48"]
    result = evaluate(compose_app(overrides, tmp_path, config_name="eval"))
    assert result["test_metrics"] == pytest.approx(_test_metrics(trained_run), rel=1e-5, abs=1e-6)


def test_eval_refuses_a_missing_path_and_a_model_group_with_a_run(tmp_path: Path) -> None:
    cfg = compose_app([f"ckpt_path={tmp_path / 'nope.ckpt'}"], tmp_path, config_name="eval")
    with pytest.raises(AdapterConfigError, match="nope.ckpt.*does not exist"):
        evaluate(cfg)
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("seed: 1\n")
    (run / "x.ckpt").write_bytes(b"")
    cfg = compose_app([f"ckpt_path={run / 'x.ckpt'}", "model=tiny_bert"], tmp_path, config_name="eval")
    with pytest.raises(AdapterConfigError, match=r"model=tiny_bert replaces the model or data.*run_dir=null"):
        evaluate(cfg)
    cfg = compose_app([f"ckpt_path={run / 'x.ckpt'}", f"run_dir={tmp_path}"], tmp_path, config_name="eval")
    with pytest.raises(AdapterConfigError, match="has no .hydra/config.yaml"):
        evaluate(cfg)


def test_load_adapter_reads_a_peft_directory_of_several_adapters(tmp_path: Path) -> None:
    # What a run with adapter.name=b and adapter.init_from={a: ...} exports: no root adapter, a/ and b/ sub-folders.
    import lightning_adapters as la
    from lightning_adapters.eval import load_adapter

    def base() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))

    trained = base()
    la.inject(trained, la.LoRAConfig(r=2, target_modules=["0"], init_weights=False), name="a")
    la.inject(trained, la.LoHaConfig(r=2, target_modules=["0", "2"], init_weights=False), name="b")
    la.set_active(trained, ["a", "b"])
    la.save_peft(trained, tmp_path / "peft")
    assert not (tmp_path / "peft" / "adapter_config.json").exists()
    x = torch.randn(3, 6)
    loaded = load_adapter(base(), tmp_path / "peft", None)
    assert la.adapter_names(loaded) == ["a", "b"] and la.active(loaded) == ["a", "b"]
    torch.testing.assert_close(loaded(x), trained(x))
    only_b = load_adapter(base(), tmp_path / "peft", None, active=["b"])
    la.set_active(trained, "b")
    torch.testing.assert_close(only_b(x), trained(x))


@pytest.mark.slow
def test_the_peft_export_of_a_run_that_adapted_only_the_backbone_is_refused_naming_its_checkpoints(
    tmp_path: Path,
) -> None:
    # adapter.module=backbone: the head trains beside the backbone and is only in the checkpoints, so an eval of
    # the export would test an untrained head (it gave other metrics than the run's, silently).
    run = tmp_path / "run"
    proc = run_app([*TRAIN, "adapter.module=backbone", f"hydra.run.dir={run}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = compose_app([f"ckpt_path={run / 'peft'}", *EVAL], tmp_path / "e1", config_name="eval")
    with pytest.raises(AdapterConfigError, match=r"adapted only 'backbone' .*\['head'\].*last\.ckpt"):
        evaluate(cfg)
    assert not (tmp_path / "e1" / "eval.json").exists()
    cfg = compose_app([f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", *EVAL], tmp_path / "e2", config_name="eval")
    assert evaluate(cfg)["test_metrics"] == pytest.approx(_test_metrics(run), rel=1e-6, abs=1e-7)
