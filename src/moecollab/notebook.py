"""Helpers for the stage notebooks: glueing values for the book, and a stage's handle.

A chapter opens its stage once (:func:`open_stage`) and then reads earlier stages' folders,
saves figures and tables, and records its claims through the handle, so its cells show the
analysis and not the bookkeeping of paths, files and glue names.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from . import artifacts

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


@dataclass(frozen=True)
class StageHandle:
    """One stage notebook's handle: its output folder, its inputs, and what it records.

    Made by :func:`open_stage`. Every method writes through :mod:`moecollab.artifacts`, so
    files are atomic and byte-stable, and glues with :func:`glue`, so the book shows them.
    """

    name: str
    profile: str
    artifacts_root: Path | None
    out: Path

    def input(self, stage: str) -> Path:
        """The verified folder of an earlier stage (a clear error naming the stage to run)."""
        return artifacts.load_stage(self.profile, stage, self.artifacts_root)

    @cached_property
    def routing_healthy(self) -> bool:
        """Stage 00's routing-health verdict: structure claims are judged only when it passed."""
        from . import claims

        return claims.routing_health_passed(
            artifacts.read_json(self.input("00_model") / "verdict.json"))

    def figure(self, glue_name: str, figure, file: str, *, data=None) -> None:
        """Save ``figure`` as ``file`` (PNG, with the CSV of its data beside it) and glue it.

        Returns nothing, so that a cell ending with it shows no path.
        """
        artifacts.save_figure(self.out / file, figure, data=data)
        glue(glue_name, figure)

    def table(self, file: str, table):
        """Write ``table`` as ``file`` (.csv or .parquet) and return it, for the cell to show."""
        artifacts.write_table(self.out / file, table)
        return table

    def write_json(self, file: str, obj: Any) -> None:
        """Write ``obj`` as ``file``, key-sorted JSON (returns nothing: no path on the page)."""
        artifacts.write_json(self.out / file, obj)

    def glue(self, **values: Any) -> None:
        """Glue several values for the chapter's text at once (not displayed in place)."""
        for name, value in values.items():
            glue(name, value)

    def record_claims(self, **verdicts) -> None:
        """Write the chapter's verdicts to ``claims.json`` and glue each one's text.

        A verdict recorded as ``coverage`` is written under that key and glued as
        ``claim_coverage_verdict`` and ``claim_coverage_reason``, for the chapter's prose.
        """

        for key, verdict in verdicts.items():
            glue(f"claim_{key}_verdict", verdict.verdict)
            glue(f"claim_{key}_reason", verdict.reason)
        self.write_json("claims.json", {key: verdict.__dict__ for key, verdict in verdicts.items()})


def open_stage(name: str, profile: str, artifacts_root: str | os.PathLike | None = None,
               output_dir: str | os.PathLike = "") -> StageHandle:
    """The handle of stage ``name``, with its output folder made.

    ``output_dir`` is where the runner wants this run's outputs (a temporary folder it moves
    into place when the stage succeeds); empty, as when a reader runs the notebook by hand, it
    is the stage's folder under ``artifacts_root``.

    Examples
    --------
    >>> import tempfile
    >>> root = Path(tempfile.mkdtemp())
    >>> stage = open_stage("02_coactivation", "demo", root)
    >>> stage.out == root / "demo" / "02_coactivation", stage.out.is_dir()
    (True, True)
    """
    root = Path(artifacts_root) if artifacts_root else None
    out = Path(output_dir) if output_dir else artifacts.stage_dir(profile, name, root)
    out.mkdir(parents=True, exist_ok=True)
    return StageHandle(name=name, profile=profile, artifacts_root=root, out=out)
