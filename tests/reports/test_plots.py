"""The reports' figures: one figure helper, one colour per method."""

from __future__ import annotations

import pytest

import lmedit.lifelong
from lmedit.reports.plots import new_figure, row_colors
from lmedit.reports.wise_table import UNEDITED


def test_row_colors_one_colour_per_method_and_grey_only_for_unedited() -> None:
    """The table plot colours by method, so a row missing from one panel (unedited has no Loc.) cannot shift colours."""
    pytest.importorskip("matplotlib")
    methods = ("FT-L", "FT-M", "ROME", "MEMIT", "AlphaEdit", "GRACE", "DEFER", "WISE")
    colors = row_colors(methods)
    assert len({colors[m] for m in methods}) == len(methods)
    assert all(colors[m] != (0.4980392156862745, 0.4980392156862745, 0.4980392156862745, 1.0) for m in methods)
    assert colors[UNEDITED] == "0.45"
    many = tuple(f"M{i}" for i in range(15))
    assert len(set(row_colors(many).values())) == 16


def test_there_is_one_figure_helper() -> None:
    pytest.importorskip("matplotlib")
    assert not hasattr(lmedit.lifelong, "new_figure")  # lifelong's curves are drawn here too
    figure = new_figure(2, 1)
    assert figure is not None and figure.get_size_inches().tolist() == [2, 1]
