"""Set-up of the kernels that execute the stage notebooks (an IPython extension).

The runner starts every kernel with ``--ext=moecollab.kernel_setup``, which

- turns on matplotlib's inline backend even when ``MPLBACKEND`` (``Agg`` in the Makefile, CI
  and many shells) is set, so a figure a cell shows is stored as ``image/png``, as in Jupyter;
- summarises floods of warnings: the first warning from a given line of code is shown once per
  cell, the repeats are counted and reported in one line when the cell ends, so a solver that
  warns on every one of thousands of fits does not fill the executed notebook with megabytes;
- prints warnings with the file path inside its package (``sklearn/linear_model/x.py``), not
  the absolute path of this machine's environment.

Nothing here changes what a notebook computes.
"""

from __future__ import annotations

import linecache
import sys
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

WarningSource = tuple[type[Warning], str, int]  # category, file, line


def short_path(filename: str) -> str:
    """A file path without the machine-specific part before the package it belongs to.

    Examples
    --------
    >>> short_path("/home/me/.venv/lib/python3.11/site-packages/sklearn/utils/x.py")
    'sklearn/utils/x.py'
    >>> short_path("/opt/study/src/moecollab/hsdl.py")
    'moecollab/hsdl.py'
    >>> short_path("<ipython-input-3>")
    '<ipython-input-3>'
    """
    parts = Path(filename).parts
    for marker in ("site-packages", "dist-packages", "src"):
        if marker in parts[:-1]:
            index = len(parts) - 1 - parts[::-1].index(marker)
            return "/".join(parts[index + 1:])
    if not Path(filename).is_absolute():
        return filename
    try:
        return Path(filename).relative_to(Path.cwd()).as_posix()
    except ValueError:
        return Path(filename).name


class WarningSummary:
    """Shows the first warning of each source in a cell; counts the rest and reports them once.

    ``showwarning`` replaces :func:`warnings.showwarning`; ``report`` runs after every cell
    (IPython's ``post_run_cell`` event) and writes one line per source that repeated.
    """

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream
        self.repeats: Counter[WarningSource] = Counter()
        self.shown: set[WarningSource] = set()

    def showwarning(self, message, category, filename, lineno, file=None, line=None) -> None:
        source = (category, filename, lineno)
        if source in self.shown:
            self.repeats[source] += 1
            return
        self.shown.add(source)
        if line is None:
            line = linecache.getline(filename, lineno)
        text = warnings.formatwarning(message, category, short_path(filename), lineno, line)
        self._write(text, file)

    def report(self, *_: Any) -> None:
        for (category, filename, lineno), count in self.repeats.items():
            self._write(f"... and {count:,} more {category.__name__} from "
                        f"{short_path(filename)}:{lineno} in this cell (not shown)\n")
        self.repeats.clear()
        self.shown.clear()

    def _write(self, text: str, file: Any = None) -> None:
        stream = file or self.stream or sys.stderr
        try:
            stream.write(text)
        except (AttributeError, OSError):  # a closed or missing stream: drop it, as Python does
            pass


def load_ipython_extension(shell) -> None:
    """Called by IPython for ``--ext=moecollab.kernel_setup`` (or ``%load_ext``)."""
    shell.run_line_magic("matplotlib", "inline")
    summary = WarningSummary()
    warnings.showwarning = summary.showwarning
    shell.events.register("post_run_cell", summary.report)
