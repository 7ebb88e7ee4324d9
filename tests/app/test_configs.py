"""Every option of every config group composes; bad method values fail while Hydra composes."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from lightning_adapters.app.store import minilm_dir, rank_fields
from lightning_adapters.errors import AdapterConfigError
from lightning_adapters.registry import available_methods, spec_for_config
from lightning_adapters.train import CONFIG_DIR, method_config, rank_of
from tests.app.conftest import compose_app, run_app

GROUPS = sorted(p.name for p in Path(CONFIG_DIR).iterdir() if p.is_dir())
OPTIONS = [(g, f.stem) for g in GROUPS for f in sorted((Path(CONFIG_DIR) / g).glob("*.yaml"))]


def extra_overrides(group: str, option: str, tmp_path: Path) -> list[str]:
    """Values an option leaves for the user to give (``???``)."""
    if (group, option) == ("model", "hf"):
        return [f"model.backbone.name_or_path={minilm_dir()}"]
    if (group, option) == ("data", "tsv"):
        path = tmp_path / "ratings.tsv"
        path.write_text("text\tscore\n" + "".join(f"word {i}\t{i % 5 - 2}\n" for i in range(40)))
        return [f"data.path={path}", "data.skip_header=true"]
    return []


def test_every_group_has_options() -> None:
    expected = {"method", "target", "model", "data", "strategy", "precision", "logger", "callbacks", "trainer"}
    assert expected | {"experiment", "hparams_search"} <= set(GROUPS)
    names = {g: {o for gg, o in OPTIONS if gg == g} for g in GROUPS}
    assert {"attention_qv", "attention_all", "mlp", "all_linear", "conv"} <= names["target"]
    assert {"auto", "ddp", "fsdp", "fsdp2"} <= names["strategy"]
    assert {"32-true", "bf16-mixed", "bf16-true"} <= names["precision"]
    assert {"wandb", "csv", "none"} <= names["logger"]


def test_every_registered_method_has_a_preset() -> None:
    presets = {f.stem for f in (Path(CONFIG_DIR) / "method").glob("*.yaml")}
    missing = sorted(set(available_methods()) - presets)
    assert not missing, f"registered methods without configs/method/<name>.yaml: {missing}"


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_option_composes_and_resolves(group: str, option: str, tmp_path: Path) -> None:
    if group == "method" and option not in available_methods():
        pytest.skip(f"method {option!r} is not registered in this checkout")
    cfg = compose_app([f"{group}={option}", *extra_overrides(group, option, tmp_path)], tmp_path)
    app = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    plain = OmegaConf.to_container(app, resolve=True)  # every interpolation resolves
    assert plain["paths"]["output_dir"] == str(tmp_path)
    config = method_config(cfg.get("method"), head="head")
    if group == "method":
        assert spec_for_config(config).name == option
        assert config.to_dict() == type(config)(**config.to_dict()).to_dict()  # a plain, valid dataclass


def test_default_config_is_the_real_job(tmp_path: Path) -> None:
    cfg = compose_app([], tmp_path)
    config = method_config(cfg.method, head="head")
    assert type(config).__name__ == "LoRAConfig"
    assert config.target_modules == ["query", "value", "q_proj", "v_proj"]
    assert config.modules_to_save == ["head"]
    assert Path(cfg.model.backbone.name_or_path, "model.safetensors").is_file()
    assert Path(cfg.data.path).name == "vader_lexicon.txt"
    assert cfg.trainer.accelerator == "auto" and cfg.trainer.precision == "32-true"
    assert list(cfg.logger) == ["wandb"] and cfg.logger.wandb.log_model is False


@pytest.mark.parametrize(
    "override",
    ["method.r=abc", "method.alpha=[1,2]", "method.use_dora=maybe", "method.rr=3", "method.rank_pattern=5"],
)
def test_wrongly_typed_or_unknown_method_value_fails_at_compose(override: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigCompositionException) as err:
        compose_app([override], tmp_path)
    assert override.split("=")[0] in str(err.value)


def test_added_key_is_refused_before_training(tmp_path: Path) -> None:
    cfg = compose_app(["+method.rr=3"], tmp_path)  # `+` bypasses the schema's struct check
    with pytest.raises(AdapterConfigError, match="rr"):
        method_config(cfg.method)


def test_value_the_config_refuses_names_the_field(tmp_path: Path) -> None:
    cfg = compose_app(["method.r=0"], tmp_path)  # well typed, but not a rank
    with pytest.raises(AdapterConfigError, match="r must be an integer > 0"):
        method_config(cfg.method)


@pytest.mark.parametrize(
    ("method", "message"),
    [
        ("adalora", r"init_r must be an integer > 0, got 0 \(method\.r=0 sets target_r=0, init_r=0 for adalora; give "),
        (
            "boft",
            r"boft_block_num=0 \(method\.r=0 sets boft_block_num=0, boft_block_size=0 for boft; give method\.r an",
        ),
        (
            "llama_adapter",
            r"adapter_len must be an integer > 0, got 0 \(method\.r=0 sets adapter_len=0 for llama_adapter",
        ),
    ],
)
def test_a_refused_method_r_names_the_field_it_set_and_the_value_given(method: str, message: str, tmp_path) -> None:
    cfg = compose_app([f"method={method}", "method.r=0"], tmp_path)
    with pytest.raises(AdapterConfigError, match=message):
        method_config(cfg.method)


@pytest.mark.parametrize("method", ["adalora", "boft", "llama_adapter", "oft", "lora"])
def test_method_r_is_meaningful_for_every_preset(method: str, tmp_path: Path) -> None:
    if method not in available_methods():
        pytest.skip(f"{method} not registered")
    cfg = compose_app([f"method={method}", "method.r=4"], tmp_path)
    config = method_config(cfg.method)
    assert rank_of(config) == 4
    if method == "adalora":
        assert (config.target_r, config.init_r) == (4, 6) == (rank_fields("adalora", 4)["target_r"], 6)
    if method == "boft":
        assert (config.boft_block_num, config.boft_block_size) == (4, 0)
    if method == "llama_adapter":
        assert config.adapter_len == 4


def test_wrong_type_on_the_command_line_stops_before_training(tmp_path: Path) -> None:
    proc = run_app(["method.r=abc", f"hydra.run.dir={tmp_path}"], cwd=tmp_path, timeout=120)
    assert proc.returncode != 0
    assert "Error merging override method.r=abc" in proc.stderr
    assert "could not be converted to Integer" in proc.stderr
    assert not (tmp_path / "summary.json").exists() and "Epoch" not in proc.stdout + proc.stderr
