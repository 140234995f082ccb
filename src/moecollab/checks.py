"""A constraint on one parameter's value, as the runner checks it before anything runs.

Kept apart from :mod:`moecollab.stages` so that an estimator can state its own rules with it
(:mod:`moecollab.hsdl_params`) and the stage table can reuse them, with no import cycle.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Check:
    """A constraint on one parameter's value: a numeric range, a set of choices, or a pattern.

    Examples
    --------
    >>> Check(low=0, high=1, high_open=True).problem(1.0)
    'must be in [0, 1)'
    >>> Check(choices=("cpu", "cuda", "auto")).problem("gpu")
    "must be one of 'cpu', 'cuda', 'auto'"
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[Any, ...] | None = None
    each: bool = False  # apply to every element of a list value
    pattern: str | None = None    # a regular expression a string value must match in full
    pattern_text: str = ""        # how messages name what ``pattern`` allows

    def describe(self) -> str:
        if self.pattern is not None:
            return self.pattern_text
        if self.choices is not None:
            return "one of " + ", ".join(repr(choice) for choice in self.choices)
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {_number(self.low)}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {_number(self.high)}"
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"in {left}{_number(self.low)}, {_number(self.high)}{right}"

    def problem(self, value: Any) -> str | None:
        """A short description of what is wrong with ``value``, or None when it is allowed."""
        values = value if self.each and isinstance(value, list) else [value]
        for item in values:
            if self.pattern is not None:
                if not isinstance(item, str) or not re.fullmatch(self.pattern, item):
                    return f"must be {self.describe()}"
                continue
            if self.choices is not None:
                if item not in self.choices:
                    return f"must be {self.describe()}"
                continue
            if isinstance(item, bool) or not isinstance(item, int | float) or math.isnan(item):
                return f"must be a number {self.describe()}"
            too_low = self.low is not None and (item <= self.low if self.low_open
                                                else item < self.low)
            too_high = self.high is not None and (item >= self.high if self.high_open
                                                  else item > self.high)
            if too_low or too_high:
                prefix = "every element must be" if self.each else "must be"
                return f"{prefix} {self.describe()}"
        return None


def _number(value: float | None) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)
