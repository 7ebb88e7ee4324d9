"""Contract of the Lightning report helpers and of the in-fit data init (surviving mutants of
``lightning_adapters/lightning/reports.py`` and ``data_init.py``).

``heatmap_figure`` is pinned through what a reader of the figure sees (data, colour scale, ticks, labels, title,
colour bar, dpi, layout) and through its sizing rule, written out here from its docstring: the figure starts at
``3 in + 0.25 in a column`` by ``1.5 in + 0.22 in a row`` (each capped at 16 in), is widened by the longest row
label and raised by 0.3 in, then grown at most three times by whatever its tight box sticks out plus 0.1 in.
``log_report`` is pinned per logger kind with recorder loggers and real files; ``initialize_in_fit`` with a
stand-in trainer and a recorder in place of ``initialize_from_data``.
"""

from __future__ import annotations

import csv
import io
import sys
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from lightning.pytorch.trainer.states import TrainerFn

import lightning_adapters as la
from lightning_adapters.lightning import data_init, reports
from lightning_adapters.methods.lora_data import default_forward
from lightning_adapters.schedules import Heatmap, ScheduleReport

matplotlib = pytest.importorskip("matplotlib")

from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.layout_engine import ConstrainedLayoutEngine  # noqa: E402
from matplotlib.transforms import Bbox  # noqa: E402

DPI = 80


def _heatmap(names: list[str], n_cols: int = 2, values: list[list[Any]] | None = None) -> Heatmap:
    if values is None:
        values = [[(i * n_cols + j) % 5 for j in range(n_cols)] for i in range(len(names))]
    return Heatmap(
        values=values,
        row_labels=names,
        column_labels=[f"s{10 * (j + 1)}" for j in range(n_cols)],
        vmax=6.0,
        title="kept rank",
        xlabel="optimizer step",
        colorbar="rank",
    )


def _label_inches(fig: Figure) -> float:
    """The longest row label's width in inches (a text's extent depends on its text, font size and dpi only)."""
    renderer = fig.canvas.get_renderer()
    return max(t.get_window_extent(renderer).width for t in fig.axes[0].get_yticklabels()) / fig.dpi


class _Sizes:
    """Records every ``Figure.set_size_inches`` and ``FigureCanvasAgg.draw`` call; scripts ``get_tightbbox``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, boxes: list[tuple[float, float, float, float]] | None):
        self.sizes: list[tuple[float, float]] = []
        self.draws = 0
        self.boxes_asked = 0
        set_size = Figure.set_size_inches

        def record_size(fig, w, h=None, forward=True):
            self.sizes.append((float(w), float(h)))
            return set_size(fig, w, h, forward)

        monkeypatch.setattr(Figure, "set_size_inches", record_size)
        if boxes is None:
            return
        # A scripted layout: drawing is skipped, and the k-th tight box is (x0, y0, w + dx1, h + dy1) of the current
        # size (the last one repeats).
        self.boxes = boxes

        def draw(canvas):
            self.draws += 1

        def tight(fig, renderer=None, *args, **kwargs):
            x0, y0, dx1, dy1 = self.boxes[min(self.boxes_asked, len(self.boxes) - 1)]
            self.boxes_asked += 1
            w, h = fig.get_size_inches()
            return Bbox.from_extents(x0, y0, w + dx1, h + dy1)

        monkeypatch.setattr(FigureCanvasAgg, "draw", draw)
        monkeypatch.setattr(Figure, "get_tightbbox", tight)


# ------------------------------------------------------------------------------------------------------------
# initialize_in_fit


class _Init:
    """Stands in for ``initialize_from_data``: records its arguments."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, list, Any, Any]] = []

    def __call__(self, model, batches, *, forward_fn=None, all_reduce=None):
        self.calls.append((model, list(batches), forward_fn, all_reduce))
        return model


def _fit(n_batches: int, rank: int = 0, world: int = 1, fn: str = "fit", defined: bool = True):
    loads = []

    def dataloader():
        loads.append(1)
        return iter([f"batch{i}" for i in range(n_batches)])

    source = SimpleNamespace(is_defined=lambda: defined, dataloader=dataloader)
    trainer = SimpleNamespace(
        state=SimpleNamespace(fn=TrainerFn(fn)),
        fit_loop=SimpleNamespace(_data_source=source),
        global_rank=rank,
        world_size=world,
    )
    pl_module = torch.nn.Module()
    pl_module._trainer = trainer
    return pl_module, loads


def _target(init_weights: Any = "corda") -> torch.nn.Module:
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    return la.inject(model, la.LoRAConfig(r=2, target_modules=["0", "2"], init_weights=init_weights))


@pytest.mark.parametrize(
    ("n_batches", "init_batches", "rank", "world", "mine", "all_reduce"),
    [
        (5, 3, 0, 1, ["batch0", "batch1", "batch2"], False),
        (2, 4, 0, 1, ["batch0", "batch1"], False),  # fewer batches than asked: all of them
        (7, 5, 0, 2, ["batch0", "batch2", "batch4"], True),
        (7, 5, 1, 2, ["batch1", "batch3"], True),
        (9, 7, 2, 3, ["batch2", "batch5"], True),
    ],
)
def test_each_rank_reads_its_share_of_the_first_init_batches(
    monkeypatch, n_batches, init_batches, rank, world, mine, all_reduce
) -> None:
    init = _Init()
    monkeypatch.setattr(data_init, "initialize_from_data", init)
    pl_module, loads = _fit(n_batches, rank, world)
    target = _target()
    config = SimpleNamespace(init_batches=init_batches)
    assert data_init.initialize_in_fit(pl_module, target, config) is True
    assert loads == [1]
    assert len(init.calls) == 1
    model, batches, forward_fn, reduce = init.calls[0]
    assert model is target and batches == mine and forward_fn is default_forward
    assert reduce is all_reduce


def test_the_module_hooks_convert_the_batches_and_run_the_forward(monkeypatch) -> None:
    init = _Init()
    monkeypatch.setattr(data_init, "initialize_from_data", init)
    pl_module, _ = _fit(4)
    seen = []
    pl_module.adapter_init_batch = lambda batch: ("converted", batch)
    pl_module.adapter_init_forward = lambda batch: seen.append(batch) or "out"
    target = _target()
    assert data_init.initialize_in_fit(pl_module, target, SimpleNamespace(init_batches=2)) is True
    ((model, batches, forward_fn, reduce),) = init.calls
    assert model is target and reduce is False
    assert batches == [("converted", "batch0"), ("converted", "batch1")]
    assert forward_fn(object(), ("converted", "batch0")) == "out"  # the module's forward, not the model
    assert seen == [("converted", "batch0")]


def test_hooks_that_are_not_callable_are_ignored(monkeypatch) -> None:
    init = _Init()
    monkeypatch.setattr(data_init, "initialize_from_data", init)
    pl_module, _ = _fit(3)
    pl_module.adapter_init_batch = "not a function"
    pl_module.adapter_init_forward = 3
    assert data_init.initialize_in_fit(pl_module, _target(), SimpleNamespace(init_batches=2)) is True
    ((_, batches, forward_fn, _),) = init.calls
    assert batches == ["batch0", "batch1"] and forward_fn is default_forward


@pytest.mark.parametrize("case", ["no trainer", "no data init", "validating", "no train data"])
def test_the_data_init_runs_only_in_a_fit_with_train_data_and_a_data_driven_init(monkeypatch, case: str) -> None:
    init = _Init()
    monkeypatch.setattr(data_init, "initialize_from_data", init)
    pl_module, loads = _fit(4, fn="validate" if case == "validating" else "fit", defined=case != "no train data")
    if case == "no trainer":
        pl_module = torch.nn.Module()
    target = _target(init_weights=True if case == "no data init" else "corda")
    assert data_init.initialize_in_fit(pl_module, target, SimpleNamespace(init_batches=2)) is False
    assert init.calls == [] and loads == []


def test_a_target_whose_data_init_already_ran_is_not_initialised_again(monkeypatch) -> None:
    target = _target()
    torch.manual_seed(0)
    la.initialize_from_data(target, [torch.randn(16, 6)])  # the real init: the layers no longer need data
    init = _Init()
    monkeypatch.setattr(data_init, "initialize_from_data", init)
    pl_module, loads = _fit(4)
    assert data_init.initialize_in_fit(pl_module, target, SimpleNamespace(init_batches=2)) is False
    assert init.calls == [] and loads == []


def test_the_in_fit_init_equals_the_direct_init_on_the_same_batches() -> None:
    torch.manual_seed(1)
    batches = [torch.randn(8, 6) for _ in range(3)]
    pl_module, _ = _fit(0)
    pl_module._trainer.fit_loop._data_source.dataloader = lambda: iter(batches)
    torch.manual_seed(2)
    got = _target()
    torch.manual_seed(2)
    want = _target()
    assert data_init.initialize_in_fit(pl_module, got, SimpleNamespace(init_batches=2)) is True
    la.initialize_from_data(want, batches[:2])
    got_state, want_state = la.adapter_state_dict(got), la.adapter_state_dict(want)
    assert got_state.keys() == want_state.keys() and len(got_state) > 0
    for k, v in want_state.items():
        assert torch.equal(got_state[k], v), k
    assert all(not torch.equal(v, torch.zeros_like(v)) for k, v in got_state.items() if "lora_B" in k)


# ------------------------------------------------------------------------------------------------------------
# heatmap_figure: what the figure shows.


def test_the_heatmap_figure_shows_the_values_on_a_fixed_scale_with_its_labels() -> None:
    names = ["backbone.enc.0.q", "backbone.enc.0.v", "backbone.enc.1.q"]
    # Integers (ranks) are drawn as float32 all the same; the scale is 0..vmax (6), not the data's range (1..5).
    values = [[1, 2], [3, 4], [5, 2]]
    rc = {"image.cmap": "gray", "image.interpolation": "bilinear", "image.aspect": "equal", "font.size": 11}
    with matplotlib.rc_context(rc):  # the figure's own settings, whatever the user's defaults
        fig = reports.heatmap_figure(_heatmap(names, values=values))
    assert isinstance(fig, Figure) and isinstance(fig.canvas, FigureCanvasAgg)
    assert fig.dpi == DPI
    assert isinstance(fig.get_layout_engine(), ConstrainedLayoutEngine)
    ax, cbar_ax = fig.axes  # the heatmap and its colour bar, nothing else
    assert ax.get_subplotspec().get_geometry() == (1, 1, 0, 0)
    (im,) = ax.images
    data = np.asarray(im.get_array())
    assert data.dtype == np.float32 and data.shape == (3, 2)
    assert np.array_equal(data, np.array(values, dtype=np.float32))
    assert im.get_clim() == (0.0, 6.0)
    assert im.get_cmap().name == "viridis"
    assert im.get_interpolation() == "nearest"
    assert ax.get_aspect() == "auto"
    # Rows: one tick a module, the shared prefix moved to the title.
    assert list(ax.get_yticks()) == [0, 1, 2]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0.q", "0.v", "1.q"]
    assert {t.get_fontsize() for t in ax.get_yticklabels()} == {6.0}
    assert list(ax.get_xticks()) == [0, 1]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["s10", "s20"]
    assert {t.get_fontsize() for t in ax.get_xticklabels()} == {7.0}
    assert ax.get_xlabel() == "optimizer step"
    assert ax.get_title() == "kept rank\nmodules under backbone.enc."
    assert ax.title.get_fontsize() == 9.0
    assert cbar_ax.get_ylabel() == "rank"
    assert ax.figure is fig and im.colorbar is not None and im.colorbar.ax is cbar_ax


@pytest.mark.parametrize(
    ("names", "labels", "title"),
    [
        (["model.layers.0.q_proj"], ["model.layers.0.q_proj"], "kept rank"),  # one row: no prefix, whole name
        (["m.a", "m.b"], ["a", "b"], "kept rank\nmodules under m."),  # two rows already share a prefix
        (["a.q", "b.q"], ["a.q", "b.q"], "kept rank"),  # nothing shared: the title alone
    ],
)
def test_the_shared_prefix_moves_to_the_title_only_for_two_rows_or_more(
    names: list[str], labels: list[str], title: str
) -> None:
    ax = reports.heatmap_figure(_heatmap(names, n_cols=1)).axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == labels
    assert ax.get_title() == title


@pytest.mark.parametrize(("n", "every"), [(11, 1), (13, 1), (22, 1), (24, 2), (25, 2), (36, 3), (37, 3)])
def test_the_column_ticks_are_every_column_then_every_n_over_12th(n: int, every: int) -> None:
    ax = reports.heatmap_figure(_heatmap(["m.a", "m.b"], n_cols=n)).axes[0]
    want = list(range(0, n, every))
    assert list(ax.get_xticks()) == want
    assert [t.get_text() for t in ax.get_xticklabels()] == [f"s{10 * (j + 1)}" for j in want]


# ------------------------------------------------------------------------------------------------------------
# heatmap_figure: its size.


@pytest.mark.parametrize(
    ("n_rows", "n_cols", "width", "height"),
    [
        (2, 2, 3.0 + 0.25 * 2, 1.5 + 0.22 * 2),
        (1, 1, 3.0 + 0.25 * 1, 1.5 + 0.22 * 1),
        pytest.param(3, 0, 3.0 + 0.25 * 1, 1.5 + 0.22 * 3, marks=pytest.mark.filterwarnings("ignore:Attempting")),
        (67, 53, 16.0, 16.0),  # 3 + 0.25 * 53 = 16.25 and 1.5 + 0.22 * 67 = 16.24: both capped at 16 in
    ],
)
def test_the_figure_starts_from_its_rows_and_columns_widened_by_the_longest_label(
    monkeypatch: pytest.MonkeyPatch, n_rows: int, n_cols: int, width: float, height: float
) -> None:
    names = [f"net.block{i}.{'attention' if i % 2 else 'mlp'}" for i in range(n_rows)]
    rec = _Sizes(monkeypatch, boxes=[(0.0, 0.0, 0.0, 0.0)])  # the layout fits at once
    fig = reports.heatmap_figure(_heatmap(names, n_cols=n_cols))
    labels = _label_inches(fig)
    assert labels > 0.2  # "attention" (or the whole name) is several characters wide
    assert rec.sizes == [pytest.approx((width + labels, height + 0.3), abs=1e-9)]
    assert rec.draws == 1 and rec.boxes_asked == 1
    assert tuple(fig.get_size_inches()) == pytest.approx((width + labels, height + 0.3), abs=1e-9)


@pytest.mark.filterwarnings("ignore:Attempting")
@pytest.mark.parametrize("n_cols", [0, 3])
def test_a_heatmap_without_rows_still_draws_at_its_base_size(monkeypatch: pytest.MonkeyPatch, n_cols: int) -> None:
    """No row labels to measure: no widening (a schedule of another method may report no modules)."""
    rec = _Sizes(monkeypatch, boxes=[(0.0, 0.0, 0.0, 0.0)])
    fig = reports.heatmap_figure(_heatmap([], n_cols=n_cols))
    base = (3.0 + 0.25 * max(1, n_cols), 1.5 + 0.22 * 1)
    assert rec.sizes == [pytest.approx((base[0], base[1] + 0.3), abs=1e-9)]
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == []


def test_the_figure_grows_by_what_sticks_out_plus_a_tenth_at_most_three_times(monkeypatch) -> None:
    # The tight box sticks out on all four sides every time: the figure grows three times, then stops anyway.
    rec = _Sizes(monkeypatch, boxes=[(-0.5, -0.25, 0.125, 0.0625)])
    fig = reports.heatmap_figure(_heatmap(["m.a", "m.b"]))
    first = (3.5 + _label_inches(fig), 1.94 + 0.3)
    want = [first]
    for _ in range(3):
        w, h = want[-1]
        want.append((w + (0.5 + 0.125) + 0.1, h + (0.25 + 0.0625) + 0.1))
    assert rec.sizes == [pytest.approx(s, abs=1e-9) for s in want]
    assert rec.draws == 3 and rec.boxes_asked == 3
    assert tuple(fig.get_size_inches()) == pytest.approx(want[-1], abs=1e-9)


@pytest.mark.parametrize(
    ("box", "grow"),
    [
        ((0.2, 0.3, 0.5, 0.0), (0.5, 0.0)),  # inside on the left and bottom: only the right overflow counts
        ((0.2, 0.3, 0.0, 0.5), (0.0, 0.5)),  # only the top overflow counts
        ((-0.75, 0.1, -0.2, -0.3), (0.75, 0.0)),  # only the left overflow counts
        ((0.1, -0.75, -0.2, -0.3), (0.0, 0.75)),  # only the bottom overflow counts
        ((-0.01, 0.0, 0.0, 0.0), (0.01, 0.0)),  # 0.01 in is not "less than 0.01": still grown
        ((0.0, -0.01, 0.0, 0.0), (0.0, 0.01)),
    ],
)
def test_one_side_sticking_out_grows_the_figure_once(monkeypatch, box, grow) -> None:
    rec = _Sizes(monkeypatch, boxes=[box, (0.0, 0.0, 0.0, 0.0)])
    fig = reports.heatmap_figure(_heatmap(["m.a", "m.b"]))
    first = (3.5 + _label_inches(fig), 1.94 + 0.3)
    second = (first[0] + grow[0] + 0.1, first[1] + grow[1] + 0.1)
    assert rec.sizes == [pytest.approx(first, abs=1e-9), pytest.approx(second, abs=1e-9)]
    assert rec.draws == 2 and rec.boxes_asked == 2


@pytest.mark.parametrize("box", [(-0.009, -0.009, 0.0, 0.0), (0.0, 0.0, 0.009, 0.009), (0.3, 0.3, -0.3, -0.3)])
def test_a_layout_within_a_hundredth_of_an_inch_is_kept(monkeypatch, box) -> None:
    rec = _Sizes(monkeypatch, boxes=[box, (-1.0, -1.0, 1.0, 1.0)])
    reports.heatmap_figure(_heatmap(["m.a", "m.b"]))
    assert len(rec.sizes) == 1 and rec.draws == 1 and rec.boxes_asked == 1


def test_a_real_layout_ends_with_everything_inside_the_image(monkeypatch) -> None:
    names = [f"model.encoder.layer.{i}.attention.self.{p}_projection_of_the_block" for i in range(3) for p in "qv"]
    rec = _Sizes(monkeypatch, boxes=None)
    fig = reports.heatmap_figure(_heatmap(names, n_cols=3))
    w0, h0 = rec.sizes[0]
    assert (w0, h0) == pytest.approx((3.75 + _label_inches(fig), 1.5 + 0.22 * 6 + 0.3), abs=1e-9)
    for (w, h), (w_next, h_next) in zip(rec.sizes, rec.sizes[1:]):
        assert w_next >= w + 0.1 - 1e-9 and h_next >= h + 0.1 - 1e-9  # every growth adds at least 0.1 in
    fig.canvas.draw()
    box = fig.get_tightbbox(fig.canvas.get_renderer())
    w, h = fig.get_size_inches()
    assert (w, h) == pytest.approx(rec.sizes[-1], abs=1e-9)
    assert box.x0 >= -0.01 and box.y0 >= -0.01 and box.x1 <= w + 0.01 and box.y1 <= h + 0.01


# ------------------------------------------------------------------------------------------------------------
# figure_to_array, report_figure, _common_prefix


def test_figure_to_array_is_the_drawn_rgb_pixels() -> None:
    fig = reports.heatmap_figure(_heatmap(["m.a", "m.b"]))
    image = reports.figure_to_array(fig)
    w, h = fig.get_size_inches()
    assert image.dtype == np.uint8 and image.shape == (round(h * DPI), round(w * DPI), 3)
    rgba = np.asarray(fig.canvas.buffer_rgba())
    assert np.array_equal(image, rgba[..., :3])
    assert image.flags["C_CONTIGUOUS"] and image.flags["OWNDATA"]  # a copy, not a view of the canvas buffer
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 10  # a drawn heatmap, not a blank canvas


def test_report_figure_is_none_without_a_heatmap_or_without_matplotlib(monkeypatch) -> None:
    report = ScheduleReport(table_key="t", columns=["a"], rows=[[1]], heatmap_key="h", heatmap=None)
    assert reports.report_figure(report) is None
    report.heatmap = _heatmap(["m.a", "m.b"])
    fig = reports.report_figure(report)
    assert isinstance(fig, Figure) and fig.axes[0].get_title() == "kept rank\nmodules under m."
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)  # import raises ModuleNotFoundError
    assert reports.report_figure(report) is None
    monkeypatch.undo()
    report.heatmap = _heatmap(["m.a", "m.b"], values=[[1.0, 2.0, 3.0]])  # 3 values for 2 x 2: not swallowed
    with pytest.raises(RuntimeError):
        reports.report_figure(report)


@pytest.mark.parametrize(
    ("names", "prefix"),
    [
        (["a.b.c"], "a.b."),
        (["a.b.c.d", "a.b.c.e", "a.b.x.f"], "a.b."),
        (["a.b.c", "a.x.c", "a.x.d"], "a."),
        (["p.q.r", "p.q.r"], "p.q."),
        (["a.b", "c.d", "a.b"], ""),
        (["x.y.z"] * 3, "x.y."),
    ],
)
def test_common_prefix_of_several_names(names: list[str], prefix: str) -> None:
    assert reports._common_prefix(names) == prefix


# ------------------------------------------------------------------------------------------------------------
# log_report: one logger kind at a time, the first that matches wins.


def _report(key: str = "adalora/ranks", heatmap_key: str = "adalora/rank/heatmap") -> ScheduleReport:
    return ScheduleReport(
        table_key=key,
        columns=["step", "budget", "note"],
        rows=[[10, 4.5, "warm"], [20, 2, "x y"]],
        heatmap_key=heatmap_key,
        heatmap=_heatmap(["m.a", "m.b"]),
    )


class _Recorder:
    """Records every call of the given methods: ``calls`` is a list of ``(method, args, kwargs)``."""

    def __init__(self, *methods: str, **attrs: Any) -> None:
        self.calls: list[tuple[str, tuple, dict]] = []
        for m in methods:
            setattr(self, m, self._record(m))
        for k, v in attrs.items():
            setattr(self, k, v)

    def _record(self, method: str):
        def call(*args, **kwargs):
            self.calls.append((method, args, kwargs))

        return call


_TABLE = "| step | budget | note |\n|---|---|---|\n| 10 | 4.5 | warm |\n| 20 | 2 | x y |"


@pytest.fixture(scope="module")
def fig() -> Figure:
    return reports.report_figure(_report())


def test_a_table_and_image_logger_gets_both_and_nothing_else(tmp_path, fig) -> None:
    experiment = _Recorder("add_image", "add_text")
    logger = _Recorder("log_table", "log_image", "log_metrics", experiment=experiment, log_dir=str(tmp_path / "d"))
    reports.log_report(logger, _report(), fig, step=7)
    (table, image) = logger.calls
    assert table == (
        "log_table",
        (),
        {"key": "adalora/ranks", "columns": ["step", "budget", "note"], "data": _report().rows, "step": 7},
    )
    method, args, kwargs = image
    assert (method, args, sorted(kwargs)) == ("log_image", (), ["images", "key", "step"])
    assert (kwargs["key"], kwargs["step"]) == ("adalora/rank/heatmap", 7)
    (array,) = kwargs["images"]
    assert np.array_equal(array, reports.figure_to_array(fig)) and array.shape[2] == 3
    assert experiment.calls == [] and not (tmp_path / "d").exists()
    logger.calls.clear()
    reports.log_report(logger, _report(), None, step=8)  # no figure: the table alone
    assert [(m, kw["step"]) for m, _, kw in logger.calls] == [("log_table", 8)]


@pytest.mark.parametrize("has", ["log_table", "log_image"])
def test_a_logger_with_only_one_of_table_and_image_is_not_a_table_logger(has: str, fig) -> None:
    experiment = _Recorder("add_image", "add_text")
    logger = _Recorder(has, experiment=experiment)
    reports.log_report(logger, _report(), fig, step=3)
    assert logger.calls == []
    assert [c[0] for c in experiment.calls] == ["add_image", "add_text"]


def test_an_image_experiment_gets_an_hwc_image_and_a_markdown_table_and_nothing_else(tmp_path, fig) -> None:
    experiment = _Recorder("add_image", "add_text")
    logger = _Recorder("log_metrics", experiment=experiment, log_dir=tmp_path / "d")
    reports.log_report(logger, _report(), fig, step=5)
    (image, text) = experiment.calls
    method, (key, array, step), kwargs = image
    assert (method, key, step, kwargs) == ("add_image", "adalora/rank/heatmap", 5, {"dataformats": "HWC"})
    assert np.array_equal(array, reports.figure_to_array(fig))
    assert text == ("add_text", ("adalora/ranks", _TABLE, 5), {})
    assert logger.calls == [] and not (tmp_path / "d").exists()
    experiment.calls.clear()
    reports.log_report(logger, _report(), None, step=6)  # no figure: the table alone
    assert experiment.calls == [("add_text", ("adalora/ranks", _TABLE, 6), {})]
    image_only = _Recorder("add_image")
    reports.log_report(_Recorder(experiment=image_only, log_dir=tmp_path / "e"), _report(), fig, step=1)
    assert [c[0] for c in image_only.calls] == ["add_image"] and not (tmp_path / "e").exists()


def _expected_png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


@pytest.mark.parametrize("as_path", [False, True])
def test_a_file_logger_writes_the_csv_and_the_png_into_its_log_dir(tmp_path, fig, as_path: bool) -> None:
    log_dir = tmp_path / "nested" / "logs"  # missing parents are made
    experiment = _Recorder("add_text")  # no add_image: not an image experiment
    logger = _Recorder("log_metrics", experiment=experiment, log_dir=log_dir if as_path else str(log_dir))
    report = _report(key="sched/adalora/ranks")
    reports.log_report(logger, report, fig, step=2)
    assert sorted(p.name for p in log_dir.iterdir()) == ["adalora_rank_heatmap.png", "sched_adalora_ranks.csv"]
    csv_bytes = b"step,budget,note\r\n10,4.5,warm\r\n20,2,x y\r\n"
    assert (log_dir / "sched_adalora_ranks.csv").read_bytes() == csv_bytes
    with open(log_dir / "sched_adalora_ranks.csv", newline="") as f:
        assert list(csv.reader(f)) == [["step", "budget", "note"], ["10", "4.5", "warm"], ["20", "2", "x y"]]
    assert (log_dir / "adalora_rank_heatmap.png").read_bytes() == _expected_png(fig)
    assert experiment.calls == [] and logger.calls == []
    # Again into the existing folder, with fewer rows and no figure: the csv is replaced, the png left as it was.
    report.rows = [[30, 1, "z"]]
    reports.log_report(logger, report, None, step=3)
    assert (log_dir / "sched_adalora_ranks.csv").read_bytes() == b"step,budget,note\r\n30,1,z\r\n"
    assert sorted(p.name for p in log_dir.iterdir()) == ["adalora_rank_heatmap.png", "sched_adalora_ranks.csv"]


def test_a_file_logger_without_a_figure_writes_only_the_csv(tmp_path) -> None:
    reports.log_report(_Recorder(log_dir=str(tmp_path)), _report(key="a/b"), None, step=0)
    assert [p.name for p in tmp_path.iterdir()] == ["a_b.csv"]


@pytest.mark.parametrize("log_dir", [None, 3, b"bytes-dir"])
def test_any_other_logger_gets_nothing_from_log_report(tmp_path, monkeypatch, fig, log_dir) -> None:
    monkeypatch.chdir(tmp_path)
    logger = _Recorder("log_metrics", experiment=SimpleNamespace(), log_dir=log_dir)
    reports.log_report(logger, _report(), fig, step=1)
    reports.log_report(object(), _report(), fig, step=1)  # no attribute at all
    assert logger.calls == [] and list(tmp_path.iterdir()) == []
