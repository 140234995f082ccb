"""Helpers for the stage notebooks."""

from __future__ import annotations

from typing import Any

import numpy as np


def glue(name: str, value: Any, display: bool = False) -> None:
    """``myst_nb.glue`` that stores numpy scalars as plain Python numbers.

    Strings are stored without the quotes of their repr, so ``{glue}`` and ``{glue:text}``
    render them as plain text on any page. MyST-NB formats a glued number from its text form:
    ``np.float64(0.5)`` (numpy 2's repr) cannot be formatted with ``{glue:text}`key:.2f```,
    ``0.5`` can. Matplotlib figures are closed after glueing so the inline backend does not show
    them twice.
    """
    from myst_nb import glue as myst_glue

    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, str):
        value = _PlainText(value)
    myst_glue(name, value, display=display)
    if hasattr(value, "savefig"):
        import matplotlib.pyplot as plt

        plt.close(value)


class _PlainText:
    """A string whose text/plain form is itself (no quotes), for glueing."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text
