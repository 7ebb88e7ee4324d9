"""AdaLoRA in runs too short for its schedule (fast_dev_run, one epoch), and its rank heatmap's layout."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import lightning_adapters as la
from lightning_adapters.lightning.reports import heatmap_figure
from lightning_adapters.methods.adalora import AdaLoRASchedule, adalora_layers
from tests.helpers import tiny_llama


class LlamaLM(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = tiny_llama()

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        return self.model(input_ids=ids, labels=ids).loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=0.02)


def _data() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randint(0, 128, (8, 8), generator=g)), batch_size=4)


@pytest.mark.parametrize(
    ("schedule", "trainer_kw"),
    [
        ("epoch", {"fast_dev_run": True}),  # Lightning's smoke test: 1 step, max_epochs forced to 1
        ("epoch", {"max_epochs": 1}),  # tinit + tfinal = 0 + 1 >= 1 epoch
        ("step", {"max_steps": 2}),  # tinit + tfinal = 1 + 1 >= 2 steps
    ],
)
def test_a_run_too_short_for_the_schedule_trains_without_reallocation(schedule: str, trainer_kw: dict) -> None:
    config = la.AdaLoRAConfig(
        init_r=4,
        target_r=2,
        tinit=1 if schedule == "step" else 0,
        tfinal=1,
        schedule=schedule,
        deltaT=1,
        target_modules=["q_proj", "v_proj"],
    )
    module = LlamaLM()
    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[la.AdapterCallback(config, module="model", verbose=False)],
        **trainer_kw,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, _data())
    short = [str(w.message) for w in caught if "without rank reallocation" in str(w.message)]
    assert len(short) == 1 and "\n" not in short[0], short  # one one-line warning
    assert "tinit" in short[0] and "tfinal=1" in short[0]
    layers = adalora_layers(module.model)
    assert layers and all(layer.kept_rank == 4 for layer in layers.values())  # init_r kept everywhere
    # It trained: the singular values left their zero init (lora_E starts at 0 in AdaLoRA).
    assert any(layer.lora_E.abs().sum() > 0 for layer in layers.values())


def test_a_long_enough_run_still_reallocates() -> None:
    config = la.AdaLoRAConfig(
        init_r=4, target_r=2, tinit=0, tfinal=1, schedule="epoch", target_modules=["q_proj", "v_proj"]
    )
    module = LlamaLM()
    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        max_epochs=2,
        callbacks=[la.AdapterCallback(config, module="model", verbose=False)],
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, _data())
    assert not [w for w in caught if "without rank reallocation" in str(w.message)]
    kept = [layer.kept_rank for layer in adalora_layers(module.model).values()]
    assert sum(kept) == 2 * len(kept)  # the final budget: target_r per matrix on average


LONG = [
    f"model.backbone_with_a_rather_long_name.encoder.layer.{i}.attention.self.{p}_projection_of_the_block"
    for i in range(6)
    for p in ("query", "value")
]
NAME_SETS = {
    "long": LONG,
    "one_very_long": ["x" * 40 + "." + "a_module_name_that_goes_on_and_on_" * 4 + "q_proj"],
    "no_shared_prefix": ["encoder." + "e" * 70 + ".query", "decoder." + "d" * 90 + ".value"],
    "short": ["q", "v"],
}


@pytest.mark.parametrize("names", NAME_SETS.values(), ids=NAME_SETS.keys())
def test_rank_heatmap_keeps_title_names_and_colour_bar_on_the_canvas(names: list[str]) -> None:
    pytest.importorskip("matplotlib")
    model = la.inject(tiny_llama(), la.AdaLoRAConfig(init_r=4, target_r=2, target_modules=["q_proj", "v_proj"]))
    schedule = AdaLoRASchedule(model, la.config_of(model))
    schedule.names = names
    schedule.history = [
        {"t": t, "global_step": t, "budget": 0, "ranks": [(i + t) % 5 for i in range(len(names))]} for t in (1, 2)
    ]
    fig = heatmap_figure(schedule.report().heatmap)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    width, height = fig.bbox.width, fig.bbox.height  # pixels
    ax, cbar_ax = fig.axes
    artists = [ax.title, *ax.get_yticklabels(), *ax.get_xticklabels(), ax.xaxis.label, cbar_ax, cbar_ax.yaxis.label]
    for artist in artists:
        box = artist.get_window_extent(renderer)
        inside = box.x0 >= -1 and box.y0 >= -1 and box.x1 <= width + 1 and box.y1 <= height + 1
        assert inside, (artist, box.bounds, (width, height))
    # Every module is named in full: its tick label plus the shared prefix shown in the title.
    shown = [t.get_text() for t in ax.get_yticklabels()]
    title = ax.title.get_text()
    prefix = title.split("modules under ", 1)[1] if "modules under " in title else ""
    assert [prefix + s for s in shown] == names
