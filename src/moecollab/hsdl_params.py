"""HSDL's parameter rules, written once: the estimator checks them when it fits, and the runner
checks stage 03's parameters with them before anything runs (this module needs no torch).

Examples
--------
>>> check_hsdl_params({"n_atoms": (32, 16), "lr": 0.002})
>>> check_hsdl_params({"n_atoms": (4, 0)})
Traceback (most recent call last):
...
ValueError: n_atoms must be a non-empty tuple or list of positive ints; got (4, 0)
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

from moecollab.checks import Check

#: The estimator's numeric and choice rules, by parameter; the stage table shows and checks
#: stage 03's parameters of the same names with them.
RULES: dict[str, Check] = {
    "n_atoms": Check(low=1, each=True),
    "lambda_codes": Check(low=0),
    "lambda_recon": Check(low=0),
    "lambda_sparse": Check(low=0),
    "n_epochs": Check(low=1),
    "lr_halving_epochs": Check(low=1),
    "batch_size": Check(low=1),
    "n_init": Check(low=1),
    "lr": Check(low=0, low_open=True),
    "init": Check(choices=("nmf", "random")),
}
_COUNTS = ("n_epochs", "lr_halving_epochs", "batch_size", "n_init")
_WEIGHTS = ("lambda_codes", "lambda_recon", "lambda_sparse")


def check_hsdl_params(params: Mapping[str, Any]) -> None:
    """Raise ValueError, in one line, for the first of ``params`` that breaks HSDL's rules.

    ``params`` may hold any subset of HSDL's parameters (those absent are not checked), so the
    runner can check a profile's values before the estimator exists.
    """
    def present(name: str) -> bool:
        return name in params

    if present("n_atoms"):
        n_atoms = params["n_atoms"]
        if (not isinstance(n_atoms, tuple | list) or len(n_atoms) == 0
                or not all(_is_int(k) and k > 0 for k in n_atoms)):
            raise ValueError(
                f"n_atoms must be a non-empty tuple or list of positive ints; got {n_atoms!r}")
    for name in filter(present, _WEIGHTS):
        value = params[name]
        if not _is_real(value) or RULES[name].problem(value):
            raise ValueError(f"{name} must be a finite number >= 0; got {value!r}")
    for name in filter(present, _COUNTS):
        value = params[name]
        if not _is_int(value) or RULES[name].problem(value):
            raise ValueError(f"{name} must be a positive int; got {value!r}")
    if present("lr") and (not _is_real(params["lr"]) or RULES["lr"].problem(params["lr"])):
        raise ValueError(f"lr must be a finite number > 0; got {params['lr']!r}")
    if present("init") and RULES["init"].problem(params["init"]):
        raise ValueError(f"init must be 'nmf' or 'random'; got {params['init']!r}")
    if present("n_jobs"):
        n_jobs = params["n_jobs"]
        if n_jobs is not None and (not _is_int(n_jobs) or (n_jobs < 1 and n_jobs != -1)):
            raise ValueError(f"n_jobs must be None, -1 or a positive int; got {n_jobs!r}")
    if present("distributed") and params["distributed"] not in (True, False, "auto"):
        raise ValueError(
            f"distributed must be True, False or 'auto'; got {params['distributed']!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return (isinstance(value, numbers.Real) and not isinstance(value, bool)
            and math.isfinite(value))
