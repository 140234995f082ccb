"""The numbers a matplotlib figure draws, as one long table (the CSV beside each figure).

:func:`figure_table` reads them back from the figure's artists, so every figure of the book
gets its data without each chapter writing it by hand: lines (and the step outlines of
histograms), bars, scatter points and heatmap cells. One row per drawn value:

========  ===============================================================================
panel     the axes' title, or ``panel N`` when it has none
kind      ``line``, ``bar``, ``point`` or ``cell``
series    the legend label of the line, bar group or point set (empty when there is none)
x, y      positions in data units; on a categorical axis (bars, heatmaps) the tick label
value     the colour value of a heatmap cell or a coloured point (empty otherwise)
x_axis    the x axis label
y_axis    the y axis label
========  ===============================================================================

Text annotations, legends and colour bars are not data and are left out.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

COLUMNS = ("panel", "kind", "series", "x", "y", "value", "x_axis", "y_axis")


def figure_table(figure) -> pd.DataFrame:
    """Every value the figure's axes draw, one row each (see the module docstring).

    Examples
    --------
    >>> import matplotlib.figure
    >>> figure = matplotlib.figure.Figure()
    >>> axis = figure.subplots()
    >>> _ = axis.plot([1, 2], [10, 20], label="loss")
    >>> _ = axis.bar(["a", "b"], [3, 4], label="count")
    >>> figure_table(figure)[["kind", "series", "x", "y"]].to_dict("list")
    {'kind': ['line', 'line', 'bar', 'bar'], 'series': ['loss', 'loss', 'count', 'count'], \
'x': [1.0, 2.0, 'a', 'b'], 'y': [10.0, 20.0, 3.0, 4.0]}
    """
    rows: list[dict[str, Any]] = []
    panels = [axis for axis in figure.axes if not _is_colorbar(axis)]
    for index, axis in enumerate(panels):
        panel = axis.get_title() or f"panel {index + 1}"
        start = len(rows)
        rows += _line_rows(axis)
        rows += _bar_rows(axis)
        rows += _collection_rows(axis)
        for row in rows[start:]:
            row.update(panel=panel, x_axis=axis.get_xlabel(), y_axis=axis.get_ylabel())
    return pd.DataFrame(rows, columns=list(COLUMNS))


def _is_colorbar(axis) -> bool:
    return axis.get_label() == "<colorbar>"


def _label(artist) -> str:
    label = artist.get_label() or ""
    return "" if label.startswith("_") else label  # "_child3" and the like are not names


def _tick_labels(axis, which: str) -> dict[float, str]:
    """Tick position → text on a categorical axis (seaborn's bars and heatmaps), else {}."""
    from matplotlib.category import StrCategoryFormatter
    from matplotlib.ticker import FixedFormatter

    side = axis.xaxis if which == "x" else axis.yaxis
    if not isinstance(side.get_major_formatter(), FixedFormatter | StrCategoryFormatter):
        return {}
    ticks = side.get_majorticklocs()
    texts = [label.get_text() for label in
             (axis.get_xticklabels() if which == "x" else axis.get_yticklabels())]
    return {round(float(tick), 6): text for tick, text in zip(ticks, texts, strict=False)
            if text}


def _position(value: float, labels: dict[float, str]) -> Any:
    if labels:
        return labels.get(round(float(value), 6), float(value))
    return float(value)


def _line_rows(axis) -> list[dict[str, Any]]:
    rows = []
    for line in axis.get_lines():
        if line.get_transform() != axis.transData:
            continue  # axhline/axvline and other reference marks in axes coordinates
        x, y = (np.asarray(values, dtype=float) for values in line.get_data(orig=False))
        series = _label(line)
        rows += [{"kind": "line", "series": series, "x": float(a), "y": float(b)}
                 for a, b in zip(x, y, strict=True) if np.isfinite(a) and np.isfinite(b)]
    return rows


def _bar_rows(axis) -> list[dict[str, Any]]:
    from matplotlib.container import BarContainer

    x_labels, y_labels = _tick_labels(axis, "x"), _tick_labels(axis, "y")
    rows = []
    for container in axis.containers:
        if not isinstance(container, BarContainer):
            continue
        horizontal = getattr(container, "orientation", "vertical") == "horizontal"
        series = _label(container)
        for bar in container.patches:
            if horizontal:
                centre = bar.get_y() + bar.get_height() / 2
                x, y = float(bar.get_x() + bar.get_width()), _position(centre, y_labels)
            else:
                centre = bar.get_x() + bar.get_width() / 2
                x, y = _position(centre, x_labels), float(bar.get_y() + bar.get_height())
            if isinstance(x, float) and not np.isfinite(x) or \
                    isinstance(y, float) and not np.isfinite(y):
                continue  # seaborn draws NaN-height bars for missing combinations
            rows.append({"kind": "bar", "series": series, "x": x, "y": y})
    return rows


def _collection_rows(axis) -> list[dict[str, Any]]:
    from matplotlib.collections import PathCollection, QuadMesh

    rows = []
    for collection in axis.collections:
        if isinstance(collection, QuadMesh):
            rows += _cell_rows(axis, collection)
        elif isinstance(collection, PathCollection):
            offsets = np.asarray(collection.get_offsets(), dtype=float)
            colours = collection.get_array()
            series = _label(collection)
            for index, (x, y) in enumerate(offsets):
                value = (float(colours[index]) if colours is not None and
                         len(colours) == len(offsets) else None)
                rows.append({"kind": "point", "series": series, "x": float(x), "y": float(y),
                             "value": value})
    return rows


def _cell_rows(axis, mesh) -> list[dict[str, Any]]:
    """Heatmap cells: centre of each cell (or its row and column labels) and its value."""
    values = np.ma.asarray(mesh.get_array())
    corners = mesh.get_coordinates()  # (n_rows + 1, n_columns + 1, 2)
    n_rows, n_columns = corners.shape[0] - 1, corners.shape[1] - 1
    values = values.reshape(n_rows, n_columns)
    centres = (corners[:-1, :-1] + corners[1:, 1:]) / 2
    x_labels, y_labels = _tick_labels(axis, "x"), _tick_labels(axis, "y")
    rows = []
    for row in range(n_rows):
        for column in range(n_columns):
            if np.ma.is_masked(values[row, column]):
                continue
            x, y = centres[row, column]
            rows.append({"kind": "cell", "series": _label(mesh),
                         "x": _position(x, x_labels), "y": _position(y, y_labels),
                         "value": float(values[row, column])})
    return rows
