"""The codes of every row at every HSDL level: the contract between stages 03 and 04.

Stage 03 (HSDL) encodes the routing matrix it fitted on with ``HSDL.transform`` and saves the
codes of each level (and those of the untrained control's fit) as :class:`HSDLCodes`; stage 04
(annotation) loads them, with the trace's token count, to assign every token to its atoms.

On disk the codes are one safetensors file, ``codes.safetensors`` (the control's
``control_codes.safetensors``), with one array per level under the key ``level1``,
``level2``, … of shape (n_rows, K_l), in the dtype ``transform`` gave (float32), and no
metadata: the bytes are those ``safetensors.numpy.save_file`` writes for that dictionary.

Examples
--------
>>> import numpy as np, pathlib, tempfile
>>> codes = HSDLCodes((np.ones((3, 4), np.float32), np.zeros((3, 2), np.float32)))
>>> path = pathlib.Path(tempfile.mkdtemp()) / CODES_FILE
>>> codes.save(path)
>>> loaded = HSDLCodes.load(path, n_tokens=3)
>>> loaded.n_levels, loaded.n_rows, loaded.level(2).shape
(2, 3, (3, 2))
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import InitVar, dataclass
from pathlib import Path

import numpy as np

from moecollab.artifacts import atomic_path

__all__ = ["CODES_FILE", "CONTROL_CODES_FILE", "HSDLCodes"]

CODES_FILE = "codes.safetensors"
#: The codes of the HSDL fitted on the untrained control model's routing of the same tokens.
CONTROL_CODES_FILE = "control_codes.safetensors"
_LEVEL_KEY = re.compile(r"level([1-9][0-9]*)")


@dataclass(frozen=True)
class HSDLCodes:
    """Codes of the same rows at every HSDL level.

    Attributes
    ----------
    levels : tuple of ndarray of float, level l of shape (n_rows, K_l)
        ``HSDL.transform(X)``: level 1 first; one row per row of ``X`` (a token, or a sample
        when stage 03 fits at sample level), the same rows at every level.

    source : str, default "HSDLCodes"
        What an error names as the codes' origin (:meth:`load` passes the file); not stored.

    Raises
    ------
    ValueError
        No levels, a level that is not a 2-D float array, or levels with different row counts.
    """

    levels: tuple[np.ndarray, ...]
    source: InitVar[str] = "HSDLCodes"

    def __post_init__(self, source: str) -> None:
        object.__setattr__(self, "levels", tuple(self.levels))
        # The one check of the levels, whether they were made or read from a file.
        _check_levels(self.levels, where=source)

    @property
    def n_levels(self) -> int:
        return len(self.levels)

    @property
    def n_rows(self) -> int:
        """Rows of every level: tokens, or samples for a sample-level fit."""
        return int(self.levels[0].shape[0])

    def level(self, number: int) -> np.ndarray:
        """The codes of level ``number`` (1-based, as in ``level1``), shape (n_rows, K_l)."""
        if isinstance(number, bool) or not isinstance(number, int) or not (
                1 <= number <= self.n_levels):
            raise ValueError(f"level must be an int in [1, {self.n_levels}]; got {number!r}")
        return self.levels[number - 1]

    def save(self, path: str | os.PathLike) -> None:
        """Write the codes as ``level1``, ``level2``, … to the safetensors file ``path``,
        atomically, with the bytes a plain ``save_file`` of that dictionary gives."""
        from safetensors.numpy import save_file

        with atomic_path(path) as tmp:
            save_file({f"level{number}": np.ascontiguousarray(codes)
                       for number, codes in enumerate(self.levels, start=1)}, str(tmp))

    @classmethod
    def load(cls, path: str | os.PathLike, *, n_tokens: int | None = None) -> HSDLCodes:
        """Read codes :meth:`save` wrote, checking what a reader relies on.

        Parameters
        ----------
        path : path
            The safetensors file (stage 03's ``CODES_FILE`` or ``CONTROL_CODES_FILE``).
        n_tokens : int, optional
            The tokens of the routing trace the codes are read with: the codes must have one
            row per token (a sample-level fit has one per sample and is refused).

        Raises
        ------
        FileNotFoundError
            No file at ``path``.
        ValueError
            Keys other than ``level1`` … ``levelL`` without gaps, a level that is not a 2-D
            float array, levels with different row counts, or (with ``n_tokens``) a row count
            other than the trace's tokens.
        """
        from safetensors.numpy import load_file

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no HSDL codes at {path}; run stage 03_hsdl")
        stored = load_file(str(path))
        numbers = sorted(int(match.group(1)) for key in stored
                         if (match := _LEVEL_KEY.fullmatch(key)))
        expected = [f"level{number}" for number in range(1, len(stored) + 1)]
        if len(numbers) != len(stored) or numbers != list(range(1, len(stored) + 1)):
            raise ValueError(f"{path} holds keys {sorted(stored)}; HSDL codes are stored under "
                             f"level1, level2, … without gaps (expected {expected})")
        codes = cls(tuple(stored[key] for key in expected), source=str(path))
        if n_tokens is not None and codes.n_rows != n_tokens:
            raise ValueError(
                f"{path} has {codes.n_rows:,} rows of codes but the trace has {n_tokens:,} "
                "tokens: stage 03 was fitted at sample level (or on another trace); token-level "
                "codes are needed (run 03_hsdl with level=token)")
        return codes


def _check_levels(levels: Sequence[np.ndarray], *, where: str) -> None:
    if not levels:
        raise ValueError(f"{where} has no levels; HSDL codes have at least level1")
    for number, codes in enumerate(levels, start=1):
        if not isinstance(codes, np.ndarray) or codes.ndim != 2 or not np.issubdtype(
                codes.dtype, np.floating):
            described = (f"{codes.dtype} of shape {codes.shape}" if isinstance(codes, np.ndarray)
                         else type(codes).__name__)
            raise ValueError(f"level{number} of {where} is {described}; HSDL codes are 2-D "
                             "float arrays of shape (n_rows, n_atoms)")
    rows = [codes.shape[0] for codes in levels]
    if len(set(rows)) > 1:
        counts = ", ".join(f"level{number}: {count}" for number, count in enumerate(rows, 1))
        raise ValueError(f"the levels of {where} have different row counts ({counts}); every "
                         "level codes the same rows")
