"""Helpers for the stage notebooks."""

from __future__ import annotations

from typing import Any

import numpy as np

GLUE_PREFIX = "application/papermill.record/"  # myst_nb.glue's prefix for values not displayed
DATA_ATTRIBUTE = "moecollab_data_file"  # set on a figure by artifacts.save_figure


def glue(name: str, value: Any, display: bool = False) -> None:
    """``myst_nb.glue`` that stores figures as PNG images and numbers as plain numbers.

    - A matplotlib figure is stored as ``image/png`` drawn here, whatever matplotlib backend
      the kernel runs: ``myst_nb.glue`` asks IPython's formatters, which store only the text
      ``<Figure size …>`` when ``MPLBACKEND=Agg`` kept the inline backend off. The figure is
      then closed, so the inline backend does not show it a second time. When
      :func:`moecollab.artifacts.save_figure` saved it with its data, the CSV's name goes into
      the output's metadata, for the book to link under the figure.
    - numpy scalars are stored as Python numbers: ``{glue:text}`key:.2f``` formats the text
      form, and ``np.float64(0.5)`` (numpy 2's repr) cannot be formatted, ``0.5`` can.
    - Strings are stored without the quotes of their repr.
    """
    from IPython.core.formatters import format_display_data
    from IPython.display import display as ipython_display

    if _is_figure(value):
        bundle, metadata = figure_bundle(value)
    else:
        if isinstance(value, np.generic):
            value = value.item()
        if isinstance(value, str):
            value = _PlainText(value)
        bundle, metadata = format_display_data(value)
    prefix = "" if display else GLUE_PREFIX
    metadata["scrapbook"] = {"name": name, "mime_prefix": prefix}
    ipython_display({prefix + mime: data for mime, data in bundle.items()}, raw=True,
                    metadata=metadata)
    if _is_figure(value):
        import matplotlib.pyplot as plt

        plt.close(value)


def figure_bundle(figure) -> tuple[dict[str, str], dict[str, Any]]:
    """The MIME bundle of a figure (``image/png`` in base64, ``text/plain``) and its metadata.

    Drawn at the figure's own dpi with a tight bounding box, as Jupyter's inline backend does,
    and without the PNG's "Software" entry so that re-runs give identical bytes. The text form
    names the figure by its panels' titles instead of matplotlib's ``<Figure size …>`` repr, so
    a reader of a source notebook, or a page where the image cannot show, sees what it is.

    Examples
    --------
    >>> import matplotlib.figure
    >>> figure = matplotlib.figure.Figure(figsize=(2, 1))
    >>> axis = figure.subplots()
    >>> _ = axis.plot([0, 1]), axis.set_title("Loss")
    >>> bundle, metadata = figure_bundle(figure)
    >>> sorted(bundle), bundle["text/plain"]
    (['image/png', 'text/plain'], 'Figure: Loss')
    """
    from IPython.core.pylabtools import print_figure

    titles = [axis.get_title() for axis in figure.get_axes() if axis.get_title()]
    description = "; ".join(([figure.get_suptitle()] if figure.get_suptitle() else []) + titles)
    bundle = {"image/png": print_figure(figure, "png", base64=True,
                                        metadata={"Software": None}),
              "text/plain": f"Figure: {description}" if description else "Figure"}
    data_file = getattr(figure, DATA_ATTRIBUTE, None)
    metadata = {"moecollab": {"data": data_file}} if data_file else {}
    return bundle, metadata


def _is_figure(value: Any) -> bool:
    # Checked by name so that glueing a number does not import matplotlib.
    return any(cls.__module__.startswith("matplotlib.figure") and cls.__name__ == "Figure"
               for cls in type(value).__mro__)


class _PlainText:
    """A string whose text/plain form is itself (no quotes), for glueing."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text
