"""Colours of dictionary atoms, shared by the HTML passages and the figures.

Its own module so that :mod:`moecollab.plotting` (imported by every chapter) does not import
:mod:`moecollab.annotation`: a stage's cache key covers the package modules its notebook
imports, and an edit to annotation should only re-run the annotation stage.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

UNASSIGNED = -1  # atom id of a token whose code is all zero (moecollab.annotation uses it too)
_UNASSIGNED_COLOUR = "#e6e6e6"
_BORDER_STYLES = ("none", "solid", "dashed", "dotted")  # one per cycle through the palette


def _relative_luminance(colour: str) -> float:
    channels = np.array([int(colour[i:i + 2], 16) / 255 for i in (1, 3, 5)])
    linear = np.where(channels <= 0.03928, channels / 12.92, ((channels + 0.055) / 1.055) ** 2.4)
    return float(linear @ [0.2126, 0.7152, 0.0722])


def _text_colour(background: str) -> str:
    """Black or white, whichever has the larger WCAG contrast ratio on ``background``."""
    luminance = _relative_luminance(background)
    return "#000000" if (luminance + 0.05) / 0.05 >= 1.05 / (luminance + 0.05) else "#ffffff"


def _hex(colour: object) -> str:
    from matplotlib.colors import to_hex

    return to_hex(colour)


def atom_colours(atoms: Sequence[int], palette: Sequence[object] | str | None = None
                 ) -> dict[int, dict[str, str]]:
    """Background, text colour and border style of each atom, as used in the HTML.

    Parameters
    ----------
    atoms : sequence of int
        Atom ids; ``-1`` (unassigned) gets light grey.
    palette : sequence of colours, seaborn palette name or None
        Default: seaborn's ten-colour ``"colorblind"`` palette. Atom ``a`` gets colour
        ``a % n_colours``; each further cycle through the palette adds an underline style
        (solid, dashed, dotted) so that atoms sharing a colour stay apart.

    Returns
    -------
    dict of int to dict
        ``background`` and ``color`` (hex; the text colour with the larger WCAG contrast) and
        ``border`` (a CSS ``border-bottom`` value or ``"none"``).

    Examples
    --------
    >>> colours = atom_colours([0, 10, -1], palette=["#000000", "#ffffff"] * 5)
    >>> colours[0]["color"], colours[10]["border"], colours[-1]["background"]
    ('#ffffff', '2px solid #ffffff', '#e6e6e6')
    """
    import seaborn as sns

    if palette is None:
        palette = "colorblind"
    colours = [_hex(c) for c in (sns.color_palette(palette) if isinstance(palette, str)
                                 else palette)]
    if not colours:
        raise ValueError("palette must hold at least one colour; got an empty palette")
    result = {}
    for atom in atoms:
        atom = int(atom)
        if atom == UNASSIGNED:
            background, border = _UNASSIGNED_COLOUR, "none"
        else:
            background = colours[atom % len(colours)]
            style = _BORDER_STYLES[(atom // len(colours)) % len(_BORDER_STYLES)]
            text = _text_colour(background)
            border = "none" if style == "none" else f"2px {style} {text}"
        result[atom] = {"background": background, "color": _text_colour(background),
                        "border": border}
    return result
