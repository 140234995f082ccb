"""The numbers a matplotlib figure draws, as one long table (the CSV beside each figure).

:func:`figure_table` reads them back from the figure's artists, so every figure of the book
gets its data without each chapter writing it by hand: lines (and the step outlines of
histograms), bars, scatter points and heatmap cells. One row per drawn value:

========  ===============================================================================
panel     the axes' title, or ``panel N`` when it has none
kind      ``line``, ``bar``, ``point``, ``cell`` or ``area outline`` (the corners of a
          filled area, as a step histogram draws it)
series    the legend label of the line, bar group, point set or area (empty when none)
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
    >>> line_axis, bar_axis = figure.subplots(1, 2)
    >>> _ = line_axis.plot([1, 2], [10, 20], label="loss")
    >>> _ = bar_axis.bar(["a", "b"], [3, 4], label="count")
    >>> for row in figure_table(figure)[["panel", "kind", "series", "x", "y"]].values:
    ...     print(*row)
    panel 1 line loss 1.0 10.0
    panel 1 line loss 2.0 20.0
    panel 2 bar count a 3.0
    panel 2 bar count b 4.0
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


def _rgb(colour) -> tuple[float, ...] | None:
    from matplotlib.colors import to_rgba

    colours = np.atleast_2d(np.asarray(colour, dtype=object))
    if colours.size == 0:
        return None
    try:
        return tuple(round(float(channel), 4) for channel in to_rgba(tuple(colours[0]))[:3])
    except (TypeError, ValueError):
        return None


def _legend_names(axis) -> dict[tuple[float, ...], str]:
    """Colour → label of the axes' legend entries (seaborn draws its legend from proxies)."""
    legend = axis.get_legend()
    if legend is None:
        return {}
    names = {}
    for handle, text in zip(legend.legend_handles, legend.texts, strict=False):
        colour = None
        if hasattr(handle, "get_facecolor"):
            colour = _rgb(handle.get_facecolor())
        if colour is None and hasattr(handle, "get_color"):
            colour = _rgb(handle.get_color())
        if colour is not None:
            names.setdefault(colour, text.get_text())
    return names


def _series(artist, colour, legend: dict[tuple[float, ...], str]) -> str:
    label = artist.get_label() or ""
    if label and not label.startswith("_"):  # "_child3" and the like are not names
        return label
    return legend.get(_rgb(colour), "") if colour is not None else ""


def _categories(axis, which: str) -> dict[float, str] | None:
    """Tick position → label on a categorical axis (bars, heatmaps); None on a numeric one."""
    from matplotlib.ticker import LogFormatter, ScalarFormatter

    side = axis.xaxis if which == "x" else axis.yaxis
    if isinstance(side.get_major_formatter(), ScalarFormatter | LogFormatter):
        return None
    labels = axis.get_xticklabels() if which == "x" else axis.get_yticklabels()
    return {float(tick): label.get_text() for tick, label in
            zip(side.get_majorticklocs(), labels, strict=False) if label.get_text()}


def _category(value: float, categories: dict[float, str] | None, *, exact: bool) -> Any:
    """The label of the category slot ``value`` falls in (bars sit beside their tick when
    grouped by hue), or of the tick exactly at ``value`` (heatmap cells); else the number."""
    value = float(value)
    if not categories:
        return value
    ticks = np.array(sorted(categories))
    nearest = float(ticks[np.argmin(np.abs(ticks - value))])
    half_slot = 1e-6 if exact else (np.diff(ticks).min() / 2 if len(ticks) > 1 else 0.5)
    return categories[nearest] if abs(nearest - value) < half_slot else value


def _line_rows(axis) -> list[dict[str, Any]]:
    legend = _legend_names(axis)
    rows = []
    for line in axis.get_lines():
        if line.get_transform() != axis.transData:
            continue  # axhline/axvline and other reference marks in axes coordinates
        x, y = (np.asarray(values, dtype=float) for values in line.get_data(orig=False))
        series = _series(line, line.get_color(), legend)
        rows += [{"kind": "line", "series": series, "x": float(a), "y": float(b)}
                 for a, b in zip(x, y, strict=True) if np.isfinite(a) and np.isfinite(b)]
    return rows


def _bar_rows(axis) -> list[dict[str, Any]]:
    from matplotlib.container import BarContainer

    legend = _legend_names(axis)
    x_categories, y_categories = _categories(axis, "x"), _categories(axis, "y")
    rows = []
    for container in axis.containers:
        if not isinstance(container, BarContainer) or not container.patches:
            continue
        horizontal = getattr(container, "orientation", "vertical") == "horizontal"
        series = _series(container, container.patches[0].get_facecolor(), legend)
        for bar in container.patches:
            if horizontal:
                length = bar.get_x() + bar.get_width()
                position = _category(bar.get_y() + bar.get_height() / 2, y_categories,
                                     exact=False)
                x, y = float(length), position
            else:
                length = bar.get_y() + bar.get_height()
                x = _category(bar.get_x() + bar.get_width() / 2, x_categories, exact=False)
                y = float(length)
            if np.isfinite(length):  # seaborn draws NaN bars for missing combinations
                rows.append({"kind": "bar", "series": series, "x": x, "y": y})
    return rows


def _collection_rows(axis) -> list[dict[str, Any]]:
    from matplotlib.collections import PathCollection, PolyCollection, QuadMesh

    legend = _legend_names(axis)
    rows = []
    for collection in axis.collections:
        if isinstance(collection, QuadMesh):
            rows += _cell_rows(axis, collection)
        elif isinstance(collection, PathCollection):
            offsets = np.asarray(collection.get_offsets(), dtype=float)
            colours = collection.get_array()
            series = _series(collection, collection.get_facecolor(), legend)
            for index, (x, y) in enumerate(offsets):
                value = (float(colours[index]) if colours is not None and
                         len(colours) == len(offsets) else None)
                rows.append({"kind": "point", "series": series, "x": float(x), "y": float(y),
                             "value": value})
        elif isinstance(collection, PolyCollection):  # filled areas: step histograms, bands
            series = _series(collection, collection.get_facecolor(), legend)
            for path in collection.get_paths():
                rows += [{"kind": "area outline", "series": series, "x": float(x),
                          "y": float(y)} for x, y in path.vertices
                         if np.isfinite(x) and np.isfinite(y)]
    return rows


def _cell_rows(axis, mesh) -> list[dict[str, Any]]:
    """Heatmap cells: the row and column labels (or centre) of each cell and its value."""
    values = np.ma.asarray(mesh.get_array())
    corners = mesh.get_coordinates()  # (n_rows + 1, n_columns + 1, 2)
    n_rows, n_columns = corners.shape[0] - 1, corners.shape[1] - 1
    values = values.reshape(n_rows, n_columns)
    centres = (corners[:-1, :-1] + corners[1:, 1:]) / 2
    x_categories, y_categories = _categories(axis, "x"), _categories(axis, "y")
    rows = []
    for row in range(n_rows):
        for column in range(n_columns):
            if np.ma.is_masked(values[row, column]):
                continue
            x, y = centres[row, column]
            rows.append({"kind": "cell", "series": "",
                         "x": _category(x, x_categories, exact=True),
                         "y": _category(y, y_categories, exact=True),
                         "value": float(values[row, column])})
    return rows
