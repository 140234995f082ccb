"""How many experts a pruning ratio keeps: the one budget rule every method and check shares.

Kept free of torch so that the runner can check a plan before anything heavy is imported.
"""

from __future__ import annotations

import math
import numbers


def check_ratio(name: str, value: float, *, upper_open: bool = True) -> float:
    """``value`` as a float, or a ValueError naming ``name`` when it is outside [0, 1)."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise ValueError(f"{name} must be a number in [0, 1); got {value!r}")
    value = float(value)
    if not (0.0 <= value < 1.0 if upper_open else 0.0 <= value <= 1.0):
        interval = "[0, 1)" if upper_open else "[0, 1]"
        raise ValueError(f"{name} must be in {interval}; got {value!r}")
    return value


def n_kept(n_experts: int, prune_ratio: float) -> int:
    """Experts kept out of ``n_experts`` at ``prune_ratio``: ``floor((1 - prune_ratio) n)``.

    A tolerance of 1e-9 absorbs float error (``(1 - 0.3) * 10`` is 7, not 6).

    Examples
    --------
    >>> n_kept(64, 0.25), n_kept(6, 0.25), n_kept(10, 0.3)
    (48, 4, 7)
    """
    prune_ratio = check_ratio("prune_ratio", prune_ratio)
    return int(math.floor((1.0 - prune_ratio) * n_experts + 1e-9))


def n_kept_in_all(n_layers: int, n_experts: int, prune_ratio: float) -> int:
    """Experts every method of a comparison keeps in all: ``n_layers * n_kept(n_experts, r)``.

    The study's one budget: what a method that prunes the same number in every layer (REAP as
    its authors run it) can keep. Methods that rank over all layers keep the same total, so
    every method at a ratio keeps exactly the same number of experts. It equals
    ``n_kept(n_layers * n_experts, r)`` whenever ``(1 - r) * n_experts`` is whole.

    Examples
    --------
    >>> n_kept_in_all(4, 16, 0.25), n_kept_in_all(3, 10, 0.25), n_kept(30, 0.25)
    (48, 21, 22)
    """
    for name, value in (("n_layers", n_layers), ("n_experts", n_experts)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
            raise ValueError(f"{name} must be a positive int; got {value!r}")
    return int(n_layers) * n_kept(int(n_experts), prune_ratio)
