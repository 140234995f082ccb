"""A set of keep-masks and what each one is: the contract between stages 05 and 06.

Stage 05 (pruning) adds every keep-mask it makes to a :class:`MaskSet` with the fields that say
what the mask is, and saves the set; stage 06 (evaluation) loads it and reads those fields from
the set's table. The mask's name is *made* from the fields (:func:`mask_name`) and is only a
key: nothing reads a method, a ratio, a seed or a field back out of a name.

The fields of stage 05's masks: ``method`` is ``caep``, ``caep_as_written``, a score method
(``frequency``, ``seer``, ``reap``, ``output_impact``) or its ``_global`` variant, ``random``
(with its ``seed``), or ``domain`` (CAEP calibrated on one ``field``); a CAEP ablation is
``caep`` with a ``variant`` such as ``k1=0.9``. Every mask has a ``prune_ratio``.

On disk a set is two files in one folder:

- ``masks.safetensors``: one uint8 array (0 or 1) of shape (n_moe_layers, n_experts) per mask,
  under the mask's name;
- ``masks.csv``: the catalogue, one row per mask. It keeps the layout it has always had: the
  ratio under ``ratio`` and the calibration field under ``domain`` (in results tables ``domain``
  is the evaluated field), the per-field CAEP masks under the method ``caep-domain`` and the CAEP
  ablations under ``caep-ablation``, and seeds written as floats.

Examples
--------
>>> import numpy as np
>>> mask_set = MaskSet()
>>> mask_set.add(np.array([[True, False], [True, True]]), method="random", prune_ratio=0.25,
...              seed=3, role="baseline")
'random-s3@0.25'
>>> mask_set.table[["name", "method", "prune_ratio", "seed", "kept"]].to_dict("records")
[{'name': 'random-s3@0.25', 'method': 'random', 'prune_ratio': 0.25, 'seed': 3, 'kept': 3}]
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from moecollab.artifacts import atomic_path, write_table

__all__ = ["CATALOGUE_FILE", "FIELDS", "MASKS_FILE", "EvaluationPlan", "MaskSet", "mask_label",
           "mask_name"]

MASKS_FILE = "masks.safetensors"
CATALOGUE_FILE = "masks.csv"
#: What a mask is; :func:`mask_name` makes its name from these.
FIELDS: tuple[str, ...] = ("method", "prune_ratio", "seed", "variant", "field")
#: Counts computed from the mask itself.
COUNTS: tuple[str, ...] = ("kept", "kept_share", "min_kept_in_a_layer", "kept_per_layer")
# masks.csv's headers and method labels where they differ from the table's (see the module
# docstring): the file's bytes stay as they were before the set existed.
_CSV_HEADERS = {"prune_ratio": "ratio", "field": "domain"}
_CSV_METHODS = {"domain": "caep-domain"}   # and "caep" with a variant: "caep-ablation"


def mask_label(method: str, *, seed: int | None = None, variant: str | None = None,
               field: str | None = None) -> str:
    """A mask's name without its ratio: ``method[-field][-s<seed>][[variant]]``.

    Examples
    --------
    >>> mask_label("random", seed=0), mask_label("domain", field="law")
    ('random-s0', 'domain-law')
    >>> mask_label("caep", variant="k1=0.9")
    'caep[k1=0.9]'
    """
    label = method
    if field is not None:
        label += f"-{field}"
    if seed is not None:
        label += f"-s{seed}"
    if variant is not None:
        label += f"[{variant}]"
    return label


def mask_name(method: str, prune_ratio: float, *, seed: int | None = None,
              variant: str | None = None, field: str | None = None) -> str:
    """The name of a keep-mask, made from what it is: ``<label>@<prune_ratio>``.

    Examples
    --------
    >>> mask_name("caep", 0.25), mask_name("random", 0.5, seed=3)
    ('caep@0.25', 'random-s3@0.5')
    >>> mask_name("domain", 0.5, field="law"), mask_name("caep", 0.25, variant="k1=0.9")
    ('domain-law@0.5', 'caep[k1=0.9]@0.25')
    """
    return f"{mask_label(method, seed=seed, variant=variant, field=field)}@{prune_ratio:g}"


@dataclass
class MaskSet:
    """Keep-masks by name, and a table saying what each one is.

    Attributes
    ----------
    masks : dict of str to ndarray of bool, shape (n_moe_layers, n_experts)
        ``True`` = keep; in the order the masks were added.
    table : DataFrame
        One row per mask, in the same order: ``name``; the fields ``method``, ``prune_ratio``
        (float), ``seed`` (nullable integer), ``variant`` and ``field`` (the calibration field
        of a per-field mask), missing where they do not apply; the details given to
        :meth:`add` (stage 05 gives ``role`` and ``scope``); and the counts ``kept``,
        ``kept_share``, ``min_kept_in_a_layer`` and ``kept_per_layer`` (space-separated).
    """

    masks: dict[str, np.ndarray] = field(default_factory=dict)
    table: pd.DataFrame = field(default_factory=lambda: _tidy(pd.DataFrame()))

    def add(self, keep_mask: np.ndarray, *, method: str, prune_ratio: float,
            seed: int | None = None, variant: str | None = None, field: str | None = None,
            **details: Any) -> str:
        """Add a keep-mask with what it is; return the name :func:`mask_name` gave it.

        ``details`` (such as ``role="baseline"``) become columns of :attr:`table`.
        """
        if not isinstance(method, str) or not method:
            raise ValueError(f"method must be a non-empty string; got {method!r}")
        if not isinstance(prune_ratio, numbers.Real) or not 0 <= prune_ratio < 1:
            raise ValueError(f"prune_ratio must be in [0, 1); got {prune_ratio!r}")
        if seed is not None and (not isinstance(seed, numbers.Integral) or seed < 0):
            raise ValueError(f"seed must be a non-negative integer or None; got {seed!r}")
        for key, value in (("variant", variant), ("field", field)):
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{key} must be a non-empty string or None; got {value!r}")
        clashes = sorted(set(details) & {"name", *FIELDS, *COUNTS})
        if clashes:
            raise ValueError(f"details may not set {', '.join(clashes)}: those columns are "
                             "the mask's name, fields and counts")
        keep_mask = np.asarray(keep_mask)
        if keep_mask.dtype != bool and not np.isin(keep_mask, (0, 1)).all():
            raise ValueError("a keep-mask must hold True/False (or 1/0); got values "
                             f"of dtype {keep_mask.dtype} beyond them")
        keep_mask = keep_mask.astype(bool)
        if keep_mask.ndim != 2 or (self.masks and keep_mask.shape != self.shape):
            expected = self.shape if self.masks else "(n_moe_layers, n_experts)"
            raise ValueError(f"a keep-mask must have shape {expected}; got {keep_mask.shape}")
        name = mask_name(method, prune_ratio, seed=seed, variant=variant, field=field)
        if name in self.masks:
            raise ValueError(f"mask {name!r} is already in the set")
        row = {"name": name, "method": method, "prune_ratio": float(prune_ratio),
               "seed": None if seed is None else int(seed), "variant": variant, "field": field,
               **details, **_counts(keep_mask)}
        self.masks[name] = keep_mask
        self.table = _tidy(pd.DataFrame([*self.table.to_dict("records"), row]))
        return name

    def find(self, method: str, prune_ratio: float, *, seed: int | None = None,
             variant: str | None = None, field: str | None = None) -> np.ndarray:
        """The keep-mask with these fields; a KeyError naming it if the set has none."""
        name = mask_name(method, prune_ratio, seed=seed, variant=variant, field=field)
        if name not in self.masks:
            raise KeyError(f"no mask {name!r} in the set")
        return self.masks[name]

    def at(self, prune_ratio: float) -> dict[str, np.ndarray]:
        """The masks at one ratio, by label (:func:`mask_label`: ``caep``, ``random-s0``, …)."""
        rows = self.table[np.isclose(self.table["prune_ratio"], prune_ratio)]
        return {_label(row): self.masks[row["name"]] for _, row in rows.iterrows()}

    def evaluation_plan(self, *, n_random: int, variant_ratios: Sequence[float] = ()
                        ) -> EvaluationPlan:
        """Which masks stage 06 evaluates, and as what, from the ``role`` stage 05 gave each.

        At every ratio of a ``method`` mask (CAEP): CAEP, each ``baseline`` method (random: its
        first ``n_random`` seeds), and the ``variant`` masks when the ratio is one of
        ``variant_ratios``; then every ``domain`` mask (CAEP calibrated on one field).
        """
        table = self.table
        if "role" not in table:
            raise ValueError("the mask set has no 'role' column: stage 05 gives every mask one")
        caep_rows = table[table["role"] == "method"]
        ratios = sorted(caep_rows["prune_ratio"].unique())
        caep = dict(zip(caep_rows["prune_ratio"], caep_rows["name"], strict=True))
        names, baselines = [], {}
        for ratio in ratios:
            at_ratio = table[table["prune_ratio"] == ratio]
            names.append(caep[ratio])
            baselines[ratio] = {}
            for row in at_ratio[at_ratio["role"] == "baseline"].itertuples():
                chosen = baselines[ratio].setdefault(row.method, [])
                if row.method != "random" or len(chosen) < n_random:
                    chosen.append(row.name)
            if any(math.isclose(ratio, chosen) for chosen in variant_ratios):
                names += at_ratio.loc[at_ratio["role"] == "variant", "name"].tolist()
            names += [name for group in baselines[ratio].values() for name in group]
        domain_rows = table[table["role"] == "domain"]
        domain = dict(zip(domain_rows["field"], domain_rows["name"], strict=True))
        names += list(domain.values())
        return EvaluationPlan(ratios=[float(r) for r in ratios],
                              caep={float(r): name for r, name in caep.items()},
                              baselines={float(r): b for r, b in baselines.items()},
                              domain=domain, names=names)

    @property
    def shape(self) -> tuple[int, int]:
        """(n_moe_layers, n_experts) of every mask; the set must hold at least one."""
        if not self.masks:
            raise ValueError("an empty mask set has no shape")
        return next(iter(self.masks.values())).shape

    def __getitem__(self, name: str) -> np.ndarray:
        return self.masks[name]

    def __contains__(self, name: object) -> bool:
        return name in self.masks

    def __iter__(self) -> Iterator[str]:
        return iter(self.masks)

    def __len__(self) -> int:
        return len(self.masks)

    def save(self, folder: str | os.PathLike) -> None:
        """Write ``masks.safetensors`` and ``masks.csv`` into ``folder`` (each atomically)."""
        from safetensors.numpy import save_file

        folder = Path(folder)
        with atomic_path(folder / MASKS_FILE) as tmp:
            save_file({name: mask.astype(np.uint8) for name, mask in self.masks.items()},
                      str(tmp))
        write_table(folder / CATALOGUE_FILE, _to_csv_layout(self.table))

    @classmethod
    def load(cls, folder: str | os.PathLike) -> MaskSet:
        """Read a set :meth:`save` wrote, checking that its two files agree.

        Raises
        ------
        FileNotFoundError
            A file is missing.
        ValueError
            The files name different masks, a mask is not a 0/1 array of the common
            (n_moe_layers, n_experts) shape, or the catalogue's counts do not match it.
        """
        from safetensors.numpy import load_file

        folder = Path(folder)
        for file_name in (MASKS_FILE, CATALOGUE_FILE):
            if not (folder / file_name).is_file():
                raise FileNotFoundError(f"no {file_name} in {folder}; run stage 05_pruning")
        stored = load_file(str(folder / MASKS_FILE))
        table = _from_csv_layout(pd.read_csv(folder / CATALOGUE_FILE), folder / CATALOGUE_FILE)
        names = table["name"].tolist()
        for found, where, missing in ((set(names) - set(stored), CATALOGUE_FILE, MASKS_FILE),
                                      (set(stored) - set(names), MASKS_FILE, CATALOGUE_FILE)):
            if found:
                raise ValueError(f"{where} in {folder} names {len(found)} mask(s) that "
                                 f"{missing} lacks: {', '.join(sorted(found)[:5])}")
        masks = {}
        for name in names:
            mask = stored[name]
            if mask.dtype not in (np.uint8, np.bool_) or not np.isin(mask, (0, 1)).all():
                raise ValueError(f"mask {name!r} in {folder / MASKS_FILE} must hold 0 or 1 as "
                                 f"uint8; got dtype {mask.dtype}")
            shape = next(iter(masks.values())).shape if masks else None
            if mask.ndim != 2 or (shape is not None and mask.shape != shape):
                raise ValueError(f"mask {name!r} in {folder / MASKS_FILE} has shape "
                                 f"{mask.shape}; every keep-mask must have the same shape "
                                 f"(n_moe_layers, n_experts){f', {shape}' if shape else ''}")
            masks[name] = mask.astype(bool)
        counted = pd.DataFrame([_counts(mask) for mask in masks.values()], columns=COUNTS)
        differ = (table[list(COUNTS)].astype(str).to_numpy()
                  != counted.astype(str).to_numpy()).any(axis=1)
        if differ.any():
            raise ValueError(f"{CATALOGUE_FILE} in {folder} does not count the experts that "
                             f"{MASKS_FILE} keeps for {', '.join(table['name'][differ][:5])}")
        return cls(masks=masks, table=table)


@dataclass(frozen=True)
class EvaluationPlan:
    """What stage 06 evaluates (:meth:`MaskSet.evaluation_plan`).

    Attributes
    ----------
    ratios : CAEP's pruning ratios, ascending
    caep : ratio -> the name of CAEP's mask
    baselines : ratio -> baseline method -> the names of its masks (random: one per seed)
    domain : calibration field -> the name of CAEP's mask calibrated on that field alone
    names : every mask to evaluate, in evaluation order
    """

    ratios: list[float]
    caep: dict[float, str]
    baselines: dict[float, dict[str, list[str]]]
    domain: dict[str, str]
    names: list[str]

    def methods(self, ratio: float) -> dict[str, list[str]]:
        """CAEP and every baseline at ``ratio``: method -> its masks' names."""
        return {"caep": [self.caep[ratio]], **self.baselines[ratio]}


def _counts(keep_mask: np.ndarray) -> dict[str, Any]:
    per_layer = keep_mask.sum(axis=1)
    return {"kept": int(keep_mask.sum()), "kept_share": float(keep_mask.mean()),
            "min_kept_in_a_layer": int(per_layer.min()),
            "kept_per_layer": " ".join(str(int(n)) for n in per_layer)}


def _label(row: pd.Series) -> str:
    missing = {key: None if pd.isna(row[key]) else row[key] for key in ("seed", "variant",
                                                                        "field")}
    return mask_label(row["method"], **missing)


def _tidy(table: pd.DataFrame) -> pd.DataFrame:
    """Columns in order (name, fields, details, counts) with one dtype each."""
    for column in ("name", *FIELDS, *COUNTS):
        if column not in table:
            table[column] = pd.Series(dtype=object)
    details = [c for c in table.columns if c not in {"name", *FIELDS, *COUNTS}]
    table = table[["name", *FIELDS, *details, *COUNTS]].copy()
    table["prune_ratio"] = table["prune_ratio"].astype(float)
    table["seed"] = pd.array([None if pd.isna(s) else int(s) for s in table["seed"]],
                             dtype="Int64")
    for column in ("variant", "field"):
        table[column] = table[column].astype(object).where(table[column].notna(), None)
    for column in ("kept", "min_kept_in_a_layer"):
        table[column] = table[column].astype("int64")
    table["kept_share"] = table["kept_share"].astype(float)
    table["kept_per_layer"] = table["kept_per_layer"].astype(str)
    return table


def _to_csv_layout(table: pd.DataFrame) -> pd.DataFrame:
    """masks.csv's layout: name, method, ratio, details, counts, seed, variant, domain."""
    details = [c for c in table.columns if c not in {"name", *FIELDS, *COUNTS}]
    csv = table[["name", "method", "prune_ratio", *details, *COUNTS, "seed", "variant",
                 "field"]].copy()
    is_ablation = (csv["method"] == "caep") & csv["variant"].notna()
    csv["method"] = csv["method"].replace(_CSV_METHODS).where(~is_ablation, "caep-ablation")
    csv["seed"] = csv["seed"].astype(float)   # a column with gaps: 0.0, 1.0, …
    return csv.rename(columns=_CSV_HEADERS)


def _from_csv_layout(csv: pd.DataFrame, path: Path) -> pd.DataFrame:
    table = csv.rename(columns={old: new for new, old in _CSV_HEADERS.items()})
    missing = [c for c in ("name", "method", "prune_ratio", *COUNTS) if c not in table]
    if missing:
        raise ValueError(f"{path} lacks the column(s) {', '.join(missing)}")
    duplicated = table["name"][table["name"].duplicated()].tolist()
    if duplicated:
        raise ValueError(f"{path} lists mask(s) twice: {', '.join(duplicated[:5])}")
    methods = {old: new for new, old in _CSV_METHODS.items()} | {"caep-ablation": "caep"}
    table["method"] = table["method"].replace(methods)
    bad_ratio = table["name"][~table["prune_ratio"].between(0, 1, inclusive="left")].tolist()
    if bad_ratio:
        raise ValueError(f"{path} gives a ratio outside [0, 1) for {', '.join(bad_ratio[:5])}")
    table = _tidy(table)
    made = [mask_name(row["method"], row["prune_ratio"],
                      **{key: None if pd.isna(row[key]) else row[key]
                         for key in ("seed", "variant", "field")})
            for _, row in table.iterrows()]
    wrong = [f"{name} (its fields make {expected})"
             for name, expected in zip(table["name"], made, strict=True) if name != expected]
    if wrong:
        raise ValueError(f"{path} names masks against their fields: {', '.join(wrong[:3])}")
    return table
