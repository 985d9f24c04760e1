"""Figures: what a bar chart shows as its error bars."""

import numpy as np
import pandas as pd
from matplotlib.collections import LineCollection

from roentgen_lib import figures


def interval_lines(fig) -> list[tuple[float, float, float]]:
    """(x, low, high) of every vertical interval line on the figure's axes, sorted by x."""
    ax = fig.axes[0]
    segments = [seg for c in ax.collections if isinstance(c, LineCollection) for seg in c.get_segments()]
    return sorted((float(s[0][0]), float(s[0][1]), float(s[1][1])) for s in segments)


def test_bars_of_single_shares_show_their_intervals_on_the_right_bars():
    rows = pd.DataFrame({"finding": ["effusion", "pneumothorax", "effusion", "pneumothorax"],
                         "model": ["a", "a", "b", "b"], "value": [0.9, 0.5, 0.7, np.nan],
                         "ci low": [0.8, 0.3, 0.5, np.nan], "ci high": [0.95, 0.7, 0.85, np.nan]})
    lines = interval_lines(figures.fig_metric_bars(rows, "finding", "model", "side correct"))
    # model a left of model b within each finding; the missing share draws no bar and no line
    assert [(low, high) for _, low, high in lines] == [(0.8, 0.95), (0.5, 0.85), (0.3, 0.7)]
    assert lines[0][0] < lines[1][0] < lines[2][0]


def test_bars_over_seeds_keep_the_spread_and_draw_no_interval_lines():
    rows = pd.DataFrame({"finding": ["ptx"] * 4, "training": ["real", "real", "both", "both"], "value": [0.5, 0.6, 0.9, 0.8],
                         "ci low": [0.4] * 4, "ci high": [0.95] * 4})
    fig = figures.fig_metric_bars(rows, "finding", "training", "AUROC")
    assert interval_lines(fig) == [] and len(fig.axes[0].lines) >= 2  # seaborn's standard-deviation bars


def test_confusion_heatmaps_keep_the_order_of_asks_and_readings_and_show_counts():
    table = pd.DataFrame({"finding": ["ptx"] * 12, "question": ["side"] * 6 + ["size"] * 6,
                          "asked": (["left"] * 3 + ["right"] * 3) + (["small"] * 3 + ["large"] * 3),
                          "read": ["left", "right", "not found"] * 2 + ["small", "large", "not found"] * 2,
                          "images": [3, 1, 0, 0, 2, 2, 0, 1, 3, 0, 4, 0]})
    fig = figures.fig_confusion(table, "m")
    side, size = fig.axes
    assert [t.get_text() for t in side.get_yticklabels()] == ["left", "right"]
    assert [t.get_text() for t in side.get_xticklabels()] == ["left", "right", "not found"]
    assert [t.get_text() for t in side.texts] == ["3", "1", "0", "0", "2", "2"]
    assert [t.get_text() for t in size.texts] == ["0", "1", "3", "0", "4", "0"]
