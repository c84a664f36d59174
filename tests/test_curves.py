"""ril_fast/curves.py on its own: which records' values each panel draws, what it draws them with, and what goes to
TensorBoard. curves.png's size and blank cells, and TensorBoard's events from a run, are in tests/test_metrics.py."""

import math

import pytest

from ril_fast import curves


def test_a_panel_draws_the_finite_numbers_of_its_keys_only():
    """``prefix/*`` takes the keys under ``prefix/`` (not the bare ``prefix`` nor a longer name); a value that is no
    number (a string) or not finite is left out, and a key left with no point is no series."""
    records = [{"step": 1, "eval_accuracy": 0.5, "eval_accuracy/shape": 0.25, "eval_accuracyx": 0.1},
               {"step": 2, "eval_accuracy/shape": "n/a", "eval_accuracy/color": math.nan},
               {"step": 3, "eval_accuracy/shape": 0.75, "eval_accuracy/color": math.inf}]
    assert curves._series(records, "eval_accuracy/*") == {"eval_accuracy/shape": ([1, 3], [0.25, 0.75])}
    assert curves._series(records, "eval_accuracy") == {"eval_accuracy": ([1], [0.5])}


def test_a_panel_of_several_series_has_a_legend_and_the_title_is_drawn(tmp_path, monkeypatch):
    """Two series in a panel get a legend (one does not); a title is the figure's; a missing folder is made."""
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    legends, titles = [], []
    real_legend, real_title = Axes.legend, Figure.suptitle
    monkeypatch.setattr(Axes, "legend", lambda self, *a, **k: legends.append(self.get_title()) or
                        real_legend(self, *a, **k))
    monkeypatch.setattr(Figure, "suptitle", lambda self, t, **k: titles.append(t) or real_title(self, t, **k))
    records = [{"step": s, "grad_norm": 1.0 + s, "disc_grad_norm": 2.0 * s, "loss": 0.1 * s} for s in range(1, 4)]
    path = curves.plot_curves(records, tmp_path / "new" / "c.png", title="run 7")
    assert path == tmp_path / "new" / "c.png" and path.is_file()
    assert legends == ["gradient norm (before clipping)"] and titles == ["run 7"]


def test_tensorboard_gets_each_finite_number_but_the_step():
    """``add_scalars`` logs ints and floats at the record's step; the step itself, booleans, strings and non-finite
    numbers are left out."""
    logged = []

    class Writer:
        def add_scalar(self, key, value, global_step):
            logged.append((key, value, global_step))

    curves.add_scalars(Writer(), {"step": 4, "loss": 0.5, "questions": 3, "resumed": True, "kl": math.nan,
                                  "lr": -math.inf, "phase": "rollout"})
    assert logged == [("loss", 0.5, 4), ("questions", 3, 4)]


@pytest.mark.parametrize("panels", [4, 5])
def test_the_grid_has_as_many_rows_as_the_panels_need(tmp_path, panels):
    """rows = ⌈panels / COLUMNS⌉: 4 panels are one row, 5 two."""
    from PIL import Image

    keys = [keys[0] for _, keys in curves.PANELS[:panels]]
    records = [{"step": s, **{k: float(s) for k in keys}} for s in (1, 2)]
    path = curves.plot_curves(records, tmp_path / "c.png")
    rows = -(-panels // curves.COLUMNS)
    assert Image.open(path).size == (curves.COLUMNS * 400, rows * 300)
