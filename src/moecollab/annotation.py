"""Which tokens each collaboration pattern handles, and what to call it (paper Fig. 5).

A token's level-1 atom is the argmax of its level-1 HSDL code; its level-2 atom is the argmax of
its level-2 code among that atom's children (``METHOD.md`` §4). Per atom this module counts
tokens, ranks its top and enriched tokens, finds example contexts, tests domain enrichment and
describes the token mix; from these it builds an automatic label with a confidence, measures how
pure atoms are against chance, and renders text with every token coloured by its atom.

All functions take the token table of a :class:`moecollab.trace.RoutingTrace` (one row per
token, in the row order of the routing matrix) and the assignment table of :func:`assign_atoms`,
aligned row by row.
"""

from __future__ import annotations

import html
import logging
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats

from . import layout
from .colours import UNASSIGNED, atom_colours

logger = logging.getLogger(__name__)

__all__ = [
    "UNASSIGNED",
    "AtomStatistics",
    "assign_atoms",
    "atom_colours",
    "atom_experts",
    "atom_statistics",
    "domain_purity",
    "enrichment_matrix",
    "label_atoms",
    "recognisable_atoms",
    "pick_passages",
    "piece_kinds",
    "random_purity",
    "render_passages_html",
]


_BLOCK_ROWS = 65_536  # rows per block when masking level-2 codes, bounds the temporary copy
_SPECIAL_PIECE = re.compile(r"^\s*(<\|[^<>|]*\|>|</?s>|<unk>|<pad>|\[[A-Z]+\])\s*$")


# ---- assignment -------------------------------------------------------------------------------


def assign_atoms(
    level1_codes: np.ndarray,
    hierarchy: np.ndarray | None = None,
    *,
    level2_codes: np.ndarray | None = None,
    child_ratio: float = 0.05,
    min_strength: float = 0.0,
) -> pd.DataFrame:
    """Each token's level-1 atom and, within it, its level-2 atom.

    Parameters
    ----------
    level1_codes : ndarray, shape (n_tokens, K1)
        Level-1 codes (``HSDL.transform(X)[0]``).
    hierarchy : ndarray, shape (K1, K2), optional
        How each level-1 atom is composed of level-2 atoms (``HSDL.hierarchy_codes_[0]``). The
        *children* of level-1 atom ``a`` are the level-2 atoms ``j`` with
        ``hierarchy[a, j] > child_ratio * hierarchy[a].max()`` (and ``> 0``).
    level2_codes : ndarray, shape (n_tokens, K2), optional
        Level-2 codes (``HSDL.transform(X)[1]``); by default ``level1_codes @ hierarchy``, which
        is what ``HSDL.transform`` returns. Without ``hierarchy`` every level-2 atom counts as a
        child of every level-1 atom; without both, ``sub_atom`` is ``UNASSIGNED`` throughout.
    child_ratio : float, default=0.05
        Relative weight, in ``[0, 1)``, above which a level-2 atom is a child (see ``hierarchy``).
    min_strength : float, default=0.0
        A token whose largest level-1 code is ``<= min_strength`` is unassigned (``0`` makes
        exactly the all-zero codes unassigned).

    Returns
    -------
    DataFrame, one row per token, in the order of ``level1_codes``
        ``atom`` (int, ``UNASSIGNED = -1`` when unassigned), ``strength`` (its level-1 code),
        ``sub_atom`` (int, ``-1`` when the token is unassigned, its atom has no children or
        all children have a zero code) and ``sub_strength`` (its level-2 code). ``attrs`` holds
        ``n_unassigned`` and ``n_sub_unassigned``.

    Examples
    --------
    Three tokens, two level-1 atoms with children {0, 1} and {2}; the third token's code is 0:

    >>> codes = np.array([[0.9, 0.1], [0.0, 0.5], [0.0, 0.0]])
    >>> hierarchy = np.array([[1.0, 0.5, 0.0], [0.0, 0.0, 1.0]])
    >>> level2 = np.array([[0.2, 0.7, 0.9], [0.3, 0.0, 0.4], [0.0, 0.0, 0.0]])
    >>> table = assign_atoms(codes, hierarchy, level2_codes=level2)
    >>> table[["atom", "sub_atom"]].to_numpy().tolist()  # token 0: 2 is not a child of atom 0
    [[0, 1], [1, 2], [-1, -1]]
    >>> table.attrs["n_unassigned"]
    1
    """
    level1_codes = _as_2d(level1_codes, "level1_codes")
    n_tokens, n_atoms1 = level1_codes.shape
    if not 0 <= child_ratio < 1:
        raise ValueError(f"child_ratio must be in [0, 1); got {child_ratio!r}")
    if hierarchy is not None:
        hierarchy = _as_2d(hierarchy, "hierarchy")
        if hierarchy.shape[0] != n_atoms1:
            raise ValueError(
                f"hierarchy must have shape (K1={n_atoms1}, K2); got {hierarchy.shape}"
            )
    if level2_codes is None and hierarchy is not None:
        level2_codes = level1_codes @ hierarchy
    if level2_codes is not None:
        level2_codes = _as_2d(level2_codes, "level2_codes")
        if level2_codes.shape[0] != n_tokens:
            raise ValueError(
                f"level2_codes must have {n_tokens} rows like level1_codes; "
                f"got shape {level2_codes.shape}"
            )
        if hierarchy is not None and level2_codes.shape[1] != hierarchy.shape[1]:
            raise ValueError(
                f"level2_codes has {level2_codes.shape[1]} atoms but hierarchy has "
                f"{hierarchy.shape[1]}"
            )

    atom = level1_codes.argmax(axis=1) if n_atoms1 else np.zeros(n_tokens, dtype=int)
    strength = level1_codes[np.arange(n_tokens), atom] if n_atoms1 else np.zeros(n_tokens)
    assigned = strength > min_strength
    atom = np.where(assigned, atom, UNASSIGNED).astype(np.int64)
    strength = np.where(assigned, strength, 0.0)

    sub_atom = np.full(n_tokens, UNASSIGNED, dtype=np.int64)
    sub_strength = np.zeros(n_tokens)
    if level2_codes is not None and level2_codes.shape[1]:
        if hierarchy is None:
            children = np.ones((n_atoms1, level2_codes.shape[1]), dtype=bool)
        else:
            row_max = hierarchy.max(axis=1, keepdims=True)
            children = (hierarchy > child_ratio * row_max) & (hierarchy > 0)
        for start in range(0, n_tokens, _BLOCK_ROWS):
            rows = slice(start, start + _BLOCK_ROWS)
            block_atom = atom[rows]
            mask = children[np.maximum(block_atom, 0)] & (block_atom >= 0)[:, None]
            masked = np.where(mask, level2_codes[rows], -np.inf)
            best = masked.argmax(axis=1)
            best_value = masked[np.arange(len(best)), best]
            found = best_value > 0
            sub_atom[rows] = np.where(found, best, UNASSIGNED)
            sub_strength[rows] = np.where(found, best_value, 0.0)

    table = pd.DataFrame({"atom": atom, "strength": strength, "sub_atom": sub_atom,
                          "sub_strength": sub_strength})
    table.attrs["n_unassigned"] = int((atom == UNASSIGNED).sum())
    table.attrs["n_sub_unassigned"] = int((sub_atom == UNASSIGNED).sum())
    logger.info("assigned %d tokens: %d without a level-1 atom, %d without a level-2 atom",
                n_tokens, table.attrs["n_unassigned"], table.attrs["n_sub_unassigned"])
    return table


def _as_2d(values: np.ndarray, name: str) -> np.ndarray:
    if hasattr(values, "toarray"):  # scipy sparse
        values = values.toarray()
    array = np.asarray(values)
    if not np.issubdtype(array.dtype, np.floating):  # float32 codes stay float32: no copy
        array = array.astype(np.float64)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-d array; got shape {array.shape}")
    return array


def _atom_ids(assignment: pd.DataFrame | np.ndarray | Sequence[int],
              atom_column: str) -> np.ndarray:
    if isinstance(assignment, pd.DataFrame):
        if atom_column not in assignment.columns:
            raise ValueError(f"atom_column {atom_column!r} is not a column of assignment; "
                             f"columns are {list(assignment.columns)}")
        return assignment[atom_column].to_numpy(dtype=np.int64)
    return np.asarray(assignment, dtype=np.int64)


# ---- token kinds ------------------------------------------------------------------------------


def _piece_kind(piece: str) -> str:
    stripped = piece.strip()
    if not stripped:
        return "whitespace"
    if _SPECIAL_PIECE.match(piece):
        return "special"
    if stripped.isdigit():
        return "digit"
    if not any(char.isalnum() for char in stripped):
        return "punctuation"
    if piece[0].isspace():
        return "word_initial"
    if unicodedata.category(piece[0]).startswith(("P", "S")):
        return "punctuation"  # "(the" or "'s": a mark before letters starts no new word here
    return "continuation"


def piece_kinds(pieces: Sequence[str] | pd.Series) -> np.ndarray:
    """What kind of text each byte-level piece is.

    Parameters
    ----------
    pieces : sequence of str, length n_tokens
        Decoded token pieces; byte-level tokenizers put the space before a word into its piece.

    Returns
    -------
    ndarray of str, shape (n_tokens,)
        ``whitespace`` (spaces or line breaks only), ``special`` (``<|endoftext|>``, ``</s>``,
        …), ``digit`` (digits only), ``punctuation`` (no letter or digit, or a leading mark),
        ``word_initial`` (a space then letters: starts a word) or ``continuation`` (letters
        without a leading space: continues a word).

    Examples
    --------
    >>> piece_kinds([" court", "ing", "42", ", ", "\\n", "<|endoftext|>"]).tolist()
    ['word_initial', 'continuation', 'digit', 'punctuation', 'whitespace', 'special']
    """
    series = pd.Series(pieces, dtype=object).fillna("").astype(str)
    unique = series.unique()
    kinds = {piece: _piece_kind(piece) for piece in unique}
    return series.map(kinds).to_numpy(dtype=object).astype(str)


_KINDS = ("word_initial", "continuation", "digit", "punctuation", "whitespace", "special")


# ---- statistics -------------------------------------------------------------------------------


@dataclass
class AtomStatistics:
    """What :func:`atom_statistics` found, one table per question; every table has ``atom``.

    Attributes
    ----------
    sizes : DataFrame
        Per atom (unassigned included as ``atom = -1``): ``n_tokens`` and ``share`` of all
        tokens.
    top_tokens : DataFrame
        Per atom its ``n_top`` most frequent pieces: ``rank``, ``piece``, ``count``, ``share``
        (of the atom's tokens).
    enriched_tokens : DataFrame
        Per atom its ``n_top`` most enriched pieces (``z`` of the log-odds ratio, see
        :func:`atom_statistics`): ``rank``, ``piece``, ``count``, ``share``, ``total_count``,
        ``log_odds``, ``z``.
    contexts : DataFrame
        Per atom up to ``n_examples`` contexts: ``row`` (token row), ``sequence_index``,
        ``position``, ``piece``, ``strength``, ``context`` (the token marked ``⟦…⟧``).
    domain_enrichment : DataFrame
        Per atom and domain: ``count``, ``atom_share`` (of the atom's tokens in the domain),
        ``overall_share`` (of all assigned tokens), ``log_odds``, ``z``, ``p_value``
        (one-sided hypergeometric, enrichment), ``p_adjusted`` (Bonferroni over every atom and
        domain) and ``significant`` (``p_adjusted < alpha`` and ``log_odds > 0``). Empty without
        a ``domain`` column.
    token_mix : DataFrame
        Per atom the share of each :func:`piece_kinds` kind: ``word_initial_share``,
        ``continuation_share``, ``digit_share``, ``punctuation_share``, ``whitespace_share``,
        ``special_share``.
    n_tokens : int
        Tokens analysed.
    n_unassigned : int
        Tokens without an atom.
    """

    sizes: pd.DataFrame
    top_tokens: pd.DataFrame
    enriched_tokens: pd.DataFrame
    contexts: pd.DataFrame
    domain_enrichment: pd.DataFrame
    token_mix: pd.DataFrame
    n_tokens: int
    n_unassigned: int


def _log_odds(count_in: np.ndarray, size_in: np.ndarray, count_out: np.ndarray,
              size_out: np.ndarray, pseudo_count: float) -> tuple[np.ndarray, np.ndarray]:
    """Smoothed log-odds ratio (in vs out) and its z-score (log-odds over its standard error)."""
    a = count_in + pseudo_count
    b = size_in - count_in + pseudo_count
    c = count_out + pseudo_count
    d = size_out - count_out + pseudo_count
    log_odds = np.log(a / b) - np.log(c / d)
    return log_odds, log_odds / np.sqrt(1 / a + 1 / b + 1 / c + 1 / d)


def atom_statistics(
    assignment: pd.DataFrame | np.ndarray,
    tokens: pd.DataFrame,
    *,
    atom_column: str = "atom",
    n_top: int = 10,
    context: int = 3,
    n_examples: int = 3,
    min_count: int = 3,
    pseudo_count: float = 0.5,
    alpha: float = 0.01,
) -> AtomStatistics:
    """Sizes, top and enriched tokens, contexts, domain enrichment and token mix of each atom.

    Parameters
    ----------
    assignment : DataFrame from :func:`assign_atoms`, or ndarray of int, shape (n_tokens,)
        Atom of each token row (``-1`` = unassigned).
    tokens : DataFrame, n_tokens rows in the same order
        ``RoutingTrace.tokens``: ``text_piece`` (else ``token_id`` is shown), and for contexts
        ``sequence_index`` and ``position``, for enrichment ``domain``.
    atom_column : str, default="atom"
        Column of ``assignment`` to use (``"sub_atom"`` for level 2).
    n_top : int, default=10
        Tokens listed per atom.
    context : int, default=3
        Tokens shown on either side of an example.
    n_examples : int, default=3
        Example contexts per atom: the strongest-coded tokens, one per distinct piece.
    min_count : int, default=3
        Fewest occurrences in the atom for a piece to be listed as enriched.
    pseudo_count : float, default=0.5
        Added to every cell of the 2 × 2 tables behind the log-odds ratios.
    alpha : float, default=0.01
        Significance level of the Bonferroni-adjusted domain enrichment.

    Returns
    -------
    AtomStatistics

    Notes
    -----
    *Token enrichment* compares the piece's odds inside the atom with its odds in the rest of
    the analysed text (every other token, unassigned ones included): ``log((a/b) / (c/d))``
    with ``a`` its count in the atom, ``b`` the atom's other tokens, ``c`` and ``d`` the same
    outside, each plus ``pseudo_count``; ``z`` divides by the usual standard error
    ``sqrt(1/a + 1/b + 1/c + 1/d)``. Ranking by ``z`` (as Monroe et al.'s "fightin' words")
    favours pieces that are both specific and frequent. *Domain enrichment* uses the same
    log-odds for the domain's share of the atom against its share of the other assigned tokens,
    and a one-sided hypergeometric p-value for drawing at least ``count`` tokens of the domain.

    Examples
    --------
    >>> tokens = pd.DataFrame({"text_piece": [" the", " writ", " acid", " writ"],
    ...                        "sequence_index": [0, 0, 1, 1], "position": [0, 1, 0, 1],
    ...                        "domain": ["law", "law", "chem", "chem"]})
    >>> found = atom_statistics(np.array([-1, 0, 1, 0]), tokens, min_count=1)
    >>> found.sizes.to_dict("list")
    {'atom': [-1, 0, 1], 'n_tokens': [1, 2, 1], 'share': [0.25, 0.5, 0.25]}
    >>> found.contexts.loc[found.contexts.atom == 1, "context"].item()
    ' ⟦acid⟧ writ'
    """
    atoms = _atom_ids(assignment, atom_column)
    if len(atoms) != len(tokens):
        raise ValueError(f"assignment has {len(atoms)} rows but tokens has {len(tokens)}")
    for name, value in (("n_top", n_top), ("n_examples", n_examples), ("min_count", min_count)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0; got {value!r}")
    if context < 0:
        raise ValueError(f"context must be >= 0; got {context!r}")
    if pseudo_count <= 0:
        raise ValueError(f"pseudo_count must be > 0; got {pseudo_count!r}")
    pieces = _pieces(tokens)
    n_tokens = len(atoms)

    size_values, size_counts = np.unique(atoms, return_counts=True)
    sizes = pd.DataFrame({"atom": size_values.astype(np.int64), "n_tokens": size_counts,
                          "share": size_counts / max(n_tokens, 1)})
    atom_sizes = dict(zip(size_values.tolist(), size_counts.tolist(), strict=True))

    frame = pd.DataFrame({"atom": atoms, "piece": pieces})
    assigned = frame[frame["atom"] != UNASSIGNED]
    counts = assigned.groupby(["atom", "piece"], sort=False).size().rename("count").reset_index()
    total = frame["piece"].value_counts()
    counts["atom_size"] = counts["atom"].map(atom_sizes)
    counts["share"] = counts["count"] / counts["atom_size"]
    counts["total_count"] = counts["piece"].map(total).to_numpy()
    counts["log_odds"], counts["z"] = _log_odds(
        counts["count"].to_numpy(float), counts["atom_size"].to_numpy(float),
        (counts["total_count"] - counts["count"]).to_numpy(float),
        (n_tokens - counts["atom_size"]).to_numpy(float), pseudo_count)

    top_tokens = _ranked(counts, ["count", "piece"], [False, True], n_top)
    top_tokens = top_tokens[["atom", "rank", "piece", "count", "share"]]
    enriched = counts[(counts["count"] >= min_count) & (counts["log_odds"] > 0)]
    enriched_tokens = _ranked(enriched, ["z", "piece"], [False, True], n_top)[
        ["atom", "rank", "piece", "count", "share", "total_count", "log_odds", "z"]]

    contexts = _contexts(assignment, atoms, tokens, pieces, atom_column, context, n_examples)
    domain_enrichment = _domain_enrichment(atoms, tokens, pseudo_count, alpha)

    kinds = piece_kinds(pieces)
    mix = pd.crosstab(atoms[atoms != UNASSIGNED], kinds[atoms != UNASSIGNED], normalize="index")
    mix = mix.reindex(columns=list(_KINDS), fill_value=0.0)
    mix.columns = [f"{kind}_share" for kind in _KINDS]
    token_mix = mix.rename_axis("atom").reset_index().rename_axis(None, axis=1)
    token_mix["atom"] = token_mix["atom"].astype(np.int64)

    return AtomStatistics(sizes=sizes, top_tokens=top_tokens, enriched_tokens=enriched_tokens,
                          contexts=contexts, domain_enrichment=domain_enrichment,
                          token_mix=token_mix, n_tokens=n_tokens,
                          n_unassigned=int((atoms == UNASSIGNED).sum()))


def _pieces(tokens: pd.DataFrame) -> np.ndarray:
    if "text_piece" in tokens.columns:
        return tokens["text_piece"].fillna("").astype(str).to_numpy(dtype=object)
    if "token_id" in tokens.columns:
        return tokens["token_id"].astype(str).to_numpy(dtype=object)
    raise ValueError("tokens needs a 'text_piece' or 'token_id' column; got columns "
                     f"{list(tokens.columns)}")


def _ranked(table: pd.DataFrame, by: list[str], ascending: list[bool], n_top: int) -> pd.DataFrame:
    ordered = table.sort_values(["atom", *by], ascending=[True, *ascending], kind="stable")
    top = ordered.groupby("atom", sort=True).head(n_top).copy()
    top["rank"] = top.groupby("atom").cumcount() + 1
    return top.reset_index(drop=True)


def _display_piece(piece: str) -> str:
    return piece.replace("\n", "↵").replace("\t", "⇥")


def _contexts(assignment: pd.DataFrame | np.ndarray, atoms: np.ndarray, tokens: pd.DataFrame,
              pieces: np.ndarray, atom_column: str, context: int,
              n_examples: int) -> pd.DataFrame:
    columns = ["atom", "row", "sequence_index", "position", "piece", "strength", "context"]
    if n_examples == 0 or not {"sequence_index", "position"} <= set(tokens.columns):
        if n_examples:
            logger.warning("no contexts: tokens lacks 'sequence_index' or 'position'")
        return pd.DataFrame(columns=columns)
    sequence = tokens["sequence_index"].to_numpy(np.int64)
    position = tokens["position"].to_numpy(np.int64)
    order = np.lexsort((position, sequence))
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    bounds = pd.DataFrame({"sequence": sequence, "position": position}).groupby("sequence")
    first_position = bounds["position"].min().to_dict()
    last_position = bounds["position"].max().to_dict()
    strength_column = "strength" if atom_column == "atom" else "sub_strength"
    if isinstance(assignment, pd.DataFrame) and strength_column in assignment.columns:
        strength = assignment[strength_column].to_numpy(float)
    else:
        strength = np.ones(len(atoms))
    candidates = pd.DataFrame({"atom": atoms, "row": np.arange(len(atoms)), "piece": pieces,
                               "strength": strength})
    candidates = candidates[candidates["atom"] != UNASSIGNED]
    candidates = candidates.sort_values(["atom", "strength", "row"],
                                        ascending=[True, False, True], kind="stable")
    chosen = candidates.drop_duplicates(["atom", "piece"]).groupby("atom").head(n_examples)
    records = []
    for atom, row, piece, value in chosen[["atom", "row", "piece", "strength"]].itertuples(
            index=False):
        centre = rank[row]
        window = order[max(centre - context, 0):centre + context + 1]
        same = window[(sequence[window] == sequence[row])
                      & (np.abs(position[window] - position[row]) <= context)]
        before = "".join(pieces[i] for i in same if position[i] < position[row])
        after = "".join(pieces[i] for i in same if position[i] > position[row])
        lead = piece[: len(piece) - len(piece.lstrip())]
        text = f"{before}{lead}⟦{piece.strip()}⟧{after}"
        if position[row] - context > first_position[sequence[row]]:
            text = ("…" if text[:1].isspace() else "… ") + text
        if position[row] + context < last_position[sequence[row]]:
            text = text + " …"
        records.append((int(atom), int(row), int(sequence[row]), int(position[row]), piece,
                        float(value), _display_piece(text)))
    return pd.DataFrame.from_records(records, columns=columns)


def _domain_enrichment(atoms: np.ndarray, tokens: pd.DataFrame, pseudo_count: float,
                       alpha: float) -> pd.DataFrame:
    columns = ["atom", "domain", "count", "atom_share", "overall_share", "log_odds", "z",
               "p_value", "p_adjusted", "significant"]
    if "domain" not in tokens.columns:
        return pd.DataFrame(columns=columns)
    keep = atoms != UNASSIGNED
    table = pd.crosstab(atoms[keep], tokens["domain"].astype(str).to_numpy()[keep])
    if table.empty:
        return pd.DataFrame(columns=columns)
    counts = table.to_numpy(float)
    atom_size = counts.sum(axis=1, keepdims=True)
    domain_size = counts.sum(axis=0, keepdims=True)
    n_assigned = counts.sum()
    log_odds, z = _log_odds(counts, atom_size, domain_size - counts, n_assigned - atom_size,
                            pseudo_count)
    # P(X >= count) when drawing atom_size tokens from all assigned tokens without replacement.
    p_value = scipy_stats.hypergeom.sf(counts - 1, n_assigned, domain_size, atom_size)
    p_adjusted = np.minimum(p_value * counts.size, 1.0)
    long = pd.DataFrame({
        "atom": np.repeat(table.index.to_numpy(np.int64), table.shape[1]),
        "domain": np.tile(table.columns.to_numpy(str), table.shape[0]),
        "count": counts.ravel().astype(np.int64),
        "atom_share": (counts / atom_size).ravel(),
        "overall_share": np.broadcast_to(domain_size / n_assigned, counts.shape).ravel(),
        "log_odds": log_odds.ravel(), "z": z.ravel(), "p_value": p_value.ravel(),
        "p_adjusted": p_adjusted.ravel()})
    long["significant"] = (long["p_adjusted"] < alpha) & (long["log_odds"] > 0)
    return long


def enrichment_matrix(statistics: AtomStatistics, value: str = "log_odds") -> pd.DataFrame:
    """Domain enrichment as an atoms × domains table (for :func:`plotting.atom_domain_heatmap`).

    Parameters
    ----------
    statistics : AtomStatistics
    value : str, default="log_odds"
        A column of ``statistics.domain_enrichment``: ``log_odds``, ``z``, ``atom_share``,
        ``significant``, …

    Returns
    -------
    DataFrame, index atom, one column per domain
    """
    table = statistics.domain_enrichment
    if value not in table.columns:
        raise ValueError(f"value must be a column of domain_enrichment {list(table.columns)}; "
                         f"got {value!r}")
    return table.pivot(index="atom", columns="domain", values=value).rename_axis(
        None, axis=1)


# ---- experts ----------------------------------------------------------------------------------


def atom_experts(dictionary: np.ndarray, n_experts: int | Sequence[int],
                 top: int = 5) -> pd.DataFrame:
    """The strongest experts of every atom, as (layer, expert, weight) rows.

    Parameters
    ----------
    dictionary : ndarray, shape (K, n_columns)
        ``HSDL.dictionaries_[l]``; column ``c`` is expert ``c % n_experts`` of MoE layer
        ``c // n_experts`` (``RoutingTrace.to_matrix``'s layout).
    n_experts : int or sequence of int
        Experts per MoE layer, or one count per layer when layers differ.
    top : int, default=5
        Experts listed per atom, strongest first (zero weights are left out).

    Returns
    -------
    DataFrame
        ``atom``, ``rank`` (1 = strongest), ``column``, ``layer``, ``expert``, ``weight``.

    Examples
    --------
    >>> dictionary = np.array([[0.1, 0.9, 0.0, 0.8], [0.7, 0.0, 0.0, 0.0]])
    >>> atom_experts(dictionary, n_experts=2, top=2).to_numpy().tolist()
    [[0.0, 1.0, 1.0, 0.0, 1.0, 0.9], [0.0, 2.0, 3.0, 1.0, 1.0, 0.8], [1.0, 1.0, 0.0, 0.0, 0.0, 0.7]]
    """
    dictionary = _as_2d(dictionary, "dictionary")
    if top < 1:
        raise ValueError(f"top must be >= 1; got {top!r}")
    offsets = layout.column_offsets(n_experts, n_columns=dictionary.shape[1])
    order = np.argsort(-dictionary, axis=1, kind="stable")[:, :top]
    records = []
    for atom, columns in enumerate(order):
        for rank, column in enumerate(columns, start=1):
            weight = float(dictionary[atom, column])
            if weight <= 0:
                break
            layer = int(np.searchsorted(offsets, column, side="right") - 1)
            records.append((atom, rank, int(column), layer, int(column - offsets[layer]),
                            weight))
    return pd.DataFrame.from_records(
        records, columns=["atom", "rank", "column", "layer", "expert", "weight"])


# ---- labels -----------------------------------------------------------------------------------


_MIX_PHRASES = {  # token-mix rules, checked in this order; the first whose share passes wins
    "digit": "digits",
    "punctuation": "punctuation",
    "whitespace": "whitespace and line breaks",
    "special": "special tokens",
    "word_initial": "word-initial pieces",
    "continuation": "sub-word continuations",
}


def _quote(piece: str) -> str:
    shown = piece.strip() or piece
    return "'" + _display_piece(shown).replace(" ", "␣") + "'"


def _excess(share: float, baseline: float) -> float:
    """How far ``share`` goes from ``baseline`` (chance, 0) to 1 (pure), clipped to [0, 1]."""
    if baseline >= 1.0:
        return 0.0
    return float(np.clip((share - baseline) / (1.0 - baseline), 0.0, 1.0))


def label_atoms(
    statistics: AtomStatistics,
    *,
    n_label_tokens: int = 3,
    mix_threshold: float = 0.6,
    min_excess: float = 0.5,
    strong_field_excess: float = 0.25,
    size_prior: float = 10.0,
) -> pd.DataFrame:
    """An automatic label and a confidence for every atom, led by what dominates it.

    Parameters
    ----------
    statistics : AtomStatistics
        From :func:`atom_statistics`.
    n_label_tokens : int, default=3
        Enriched pieces named in the label (the most frequent ones when none is enriched).
    mix_threshold : float, default=0.6
        Share of one token kind (or of digits and punctuation together) from which the label
        may name the kind.
    min_excess : float, default=0.5
        The kind is named only if its share also goes at least this far from its share among
        all assigned tokens towards 1 (``(share - overall) / (1 - overall)``), so a kind that
        fills every atom (word-initial pieces in plain text) names none.
    strong_field_excess : float, default=0.25
        A significantly enriched field is **strong** when its share of the atom goes at least
        this far from its share of all tokens towards 1; otherwise it is **weak**, and it never
        leads the label.
    size_prior : float, default=10.0
        Pseudo-size that shrinks the confidence of small atoms (see Notes).

    Returns
    -------
    DataFrame, one row per assigned atom
        ``atom``, ``n_tokens``, ``label``, ``confidence`` (in [0, 1]), ``leads`` (``field``,
        ``kind`` or ``mixed``: what the label starts with), ``domain`` (the dominant
        significantly enriched field, ``""`` if none), ``domain_share``, ``field_strength``
        (``strong``, ``weak`` or ``""``), ``kind`` (the token kind named, ``""`` if none) and
        ``tokens`` (the pieces named).

    Notes
    -----
    *Evidence* for a theme is how far it goes from chance (0) to certainty (1):
    ``(share - overall) / (1 - overall)``, for the field's share of the atom against its share
    of all assigned tokens, or for the token kind's. The field is the significantly enriched
    one with the largest share of the atom; the kind is the first of "digits", "punctuation",
    "whitespace and line breaks", "special tokens", "word-initial pieces", "sub-word
    continuations" (morphology: 'ing', 's', 'ed') and "digits and punctuation" that holds at
    least ``mix_threshold`` of the atom with evidence at least ``min_excess``.

    *Label* = ``" · "``-joined: the **leading theme**, the strong field or the kind, whichever
    has more evidence (the field on a tie, and always over word-initial pieces); the other one
    when present (a word-position kind is not added after a field: most text is
    word-initial); the top enriched pieces in quotes
    (``'␣'`` marks a space, ``↵`` a line break); and, when the field is weak, "weak <field>
    enrichment". With neither a strong field nor a kind the label starts with "mixed".

    *Confidence* = ``size_factor × (lead + coverage) / 2``, where ``lead`` is the leading
    theme's evidence (0 for "mixed"), ``coverage`` the share of the atom's tokens that are one
    of the named pieces, and ``size_factor = n / (n + size_prior)`` shrinks small atoms.

    Examples
    --------
    >>> tokens = pd.DataFrame({"text_piece": [" writ"] * 6 + ["7"] * 6,
    ...                        "domain": ["law"] * 6 + ["finance"] * 6})
    >>> found = atom_statistics(np.repeat([0, 1], 6), tokens, n_examples=0)
    >>> label_atoms(found, size_prior=0)[["label", "leads", "confidence"]].to_numpy().tolist()
    [["law · 'writ'", 'field', 1.0], ["finance · digits · '7'", 'field', 1.0]]
    """
    if not 0 < mix_threshold < 1:
        raise ValueError(f"mix_threshold must be in (0, 1); got {mix_threshold!r}")
    if not 0 <= min_excess <= 1:
        raise ValueError(f"min_excess must be in [0, 1]; got {min_excess!r}")
    if not 0 <= strong_field_excess <= 1:
        raise ValueError(f"strong_field_excess must be in [0, 1]; got {strong_field_excess!r}")
    if size_prior < 0:
        raise ValueError(f"size_prior must be >= 0; got {size_prior!r}")
    sizes = statistics.sizes[statistics.sizes["atom"] != UNASSIGNED]
    enriched = statistics.enriched_tokens
    top = statistics.top_tokens
    domains = statistics.domain_enrichment
    mix = statistics.token_mix.set_index("atom")
    weights = sizes.set_index("atom")["n_tokens"].reindex(mix.index).fillna(0).to_numpy(float)
    overall_mix = {name: float(np.average(mix[f"{name}_share"], weights=weights))
                   if weights.sum() else 0.0 for name in _MIX_PHRASES}
    overall_mix["digit_punctuation"] = overall_mix["digit"] + overall_mix["punctuation"]
    records = []
    for atom, n_tokens in sizes[["atom", "n_tokens"]].itertuples(index=False):
        atom_enriched = enriched[enriched["atom"] == atom]
        named = atom_enriched if len(atom_enriched) else top[top["atom"] == atom]
        named = named.head(n_label_tokens)
        coverage = float(named["count"].sum() / n_tokens) if n_tokens else 0.0

        domain, domain_share, field_evidence, strength = "", np.nan, 0.0, ""
        significant = domains[(domains["atom"] == atom) & domains["significant"]] \
            if len(domains) else domains
        if len(significant):
            best = significant.sort_values(["atom_share", "z"], ascending=False).iloc[0]
            domain, domain_share = str(best["domain"]), float(best["atom_share"])
            field_evidence = _excess(float(best["atom_share"]), float(best["overall_share"]))
            strength = "strong" if field_evidence >= strong_field_excess else "weak"

        kind, kind_evidence = "", 0.0
        if atom in mix.index:
            shares = {name: float(mix.loc[atom, f"{name}_share"]) for name in _MIX_PHRASES}
            shares["digit_punctuation"] = shares["digit"] + shares["punctuation"]
            for name, share in shares.items():
                excess = _excess(share, overall_mix[name])
                if share >= mix_threshold and excess >= min_excess:
                    kind, kind_evidence = name, excess
                    break
        phrase = ("digits and punctuation" if kind == "digit_punctuation"
                  else _MIX_PHRASES.get(kind, ""))

        # Word-initial pieces are most of any text: they never lead over a strong field.
        field_leads = strength == "strong" and (field_evidence >= kind_evidence
                                                or kind == "word_initial")
        if field_leads:
            leads, lead_evidence = "field", field_evidence
            # Word position says little beside a field: most text is word-initial.
            if kind in ("word_initial", "continuation"):
                kind, phrase = "", ""
            parts = [domain] + ([phrase] if phrase else [])
        elif kind:
            leads, lead_evidence = "kind", kind_evidence
            parts = [phrase] + ([domain] if strength == "strong" else [])
        else:
            leads, lead_evidence, parts = "mixed", 0.0, ["mixed"]
        quoted = ", ".join(_quote(piece) for piece in named["piece"])
        if quoted:
            parts.append(quoted)
        if strength == "weak":
            parts.append(f"weak {domain} enrichment")
        label = " · ".join(parts)
        size_factor = n_tokens / (n_tokens + size_prior) if n_tokens + size_prior else 0.0
        confidence = size_factor * (lead_evidence + coverage) / 2
        records.append((int(atom), int(n_tokens), label, float(np.clip(confidence, 0, 1)),
                        leads, domain, domain_share, strength, kind, list(named["piece"])))
    return pd.DataFrame.from_records(records, columns=[
        "atom", "n_tokens", "label", "confidence", "leads", "domain", "domain_share",
        "field_strength", "kind", "tokens"])


def recognisable_atoms(labels: pd.DataFrame) -> np.ndarray:
    """Which atoms a label describes as a recognisable group of tokens (the paper's claim 4).

    An atom is recognisable when its label leads with a strongly enriched field or with a
    token kind other than word-initial pieces (which are most of any text, so they describe
    nothing in particular).

    Parameters
    ----------
    labels : DataFrame
        From :func:`label_atoms`.

    Returns
    -------
    ndarray of bool, one per row of ``labels``
    """
    leads, kind = labels["leads"].to_numpy(), labels["kind"].to_numpy()
    return (leads == "field") | ((leads == "kind") & (kind != "word_initial"))


# ---- purity -----------------------------------------------------------------------------------


def _purity_counts(atoms: np.ndarray, domain_codes: np.ndarray, n_domains: int) -> float:
    if len(atoms) == 0:
        return float("nan")
    _, atom_index = np.unique(atoms, return_inverse=True)
    joint = np.bincount(atom_index * n_domains + domain_codes,
                        minlength=(atom_index.max() + 1) * n_domains)
    return float(joint.reshape(-1, n_domains).max(axis=1).sum() / len(atoms))


def _assigned_domains(assignment: pd.DataFrame | np.ndarray, domains: Sequence[str] | pd.Series,
                      atom_column: str) -> tuple[np.ndarray, np.ndarray, int]:
    atoms = _atom_ids(assignment, atom_column)
    domain_values = np.asarray(pd.Series(domains).astype(str))
    if len(domain_values) != len(atoms):
        raise ValueError(f"domains has {len(domain_values)} entries but assignment has "
                         f"{len(atoms)} rows")
    keep = atoms != UNASSIGNED
    codes, uniques = pd.factorize(domain_values[keep])
    return atoms[keep], codes.astype(np.int64), len(uniques)


def domain_purity(assignment: pd.DataFrame | np.ndarray, domains: Sequence[str] | pd.Series,
                  *, atom_column: str = "atom") -> float:
    """Mean over atoms, weighted by size, of the largest domain share (unassigned left out).

    Parameters
    ----------
    assignment : DataFrame from :func:`assign_atoms`, or ndarray of int, shape (n_tokens,)
    domains : sequence of str, length n_tokens
        Domain of each token.
    atom_column : str, default="atom"

    Returns
    -------
    float
        In ``[max domain share, 1]``; 1 when every atom holds one domain only. NaN when no
        token is assigned.

    Examples
    --------
    >>> domain_purity(np.array([0, 0, 0, 1, 1, -1]), ["a", "a", "b", "b", "b", "a"])
    0.8
    """
    atoms, codes, n_domains = _assigned_domains(assignment, domains, atom_column)
    return _purity_counts(atoms, codes, n_domains)


def random_purity(assignment: pd.DataFrame | np.ndarray, domains: Sequence[str] | pd.Series,
                  n_repeats: int = 100, random_state: int | np.random.Generator | None = None,
                  *, atom_column: str = "atom") -> dict[str, float]:
    """Domain purity of random atoms with the same sizes: assigned tokens shuffled among atoms.

    Parameters
    ----------
    assignment, domains, atom_column
        As in :func:`domain_purity`.
    n_repeats : int, default=100
        Random permutations.
    random_state : int, Generator or None
        Seeds a local generator.

    Returns
    -------
    dict
        ``mean``, ``std``, ``q05`` and ``q95`` of the purity over the permutations.

    Examples
    --------
    >>> atoms = np.repeat([0, 1], 50)
    >>> baseline = random_purity(atoms, ["a"] * 50 + ["b"] * 50, n_repeats=20, random_state=0)
    >>> 0.5 <= baseline["mean"] < 0.7
    True
    """
    if n_repeats < 1:
        raise ValueError(f"n_repeats must be >= 1; got {n_repeats!r}")
    atoms, codes, n_domains = _assigned_domains(assignment, domains, atom_column)
    rng = np.random.default_rng(random_state)
    values = np.array([_purity_counts(rng.permutation(atoms), codes, n_domains)
                       for _ in range(n_repeats)])
    return {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if n_repeats > 1
            else 0.0, "q05": float(np.quantile(values, 0.05)),
            "q95": float(np.quantile(values, 0.95))}


# ---- rendering --------------------------------------------------------------------------------


def pick_passages(tokens: pd.DataFrame, assignment: pd.DataFrame | np.ndarray, *,
                  domains: Sequence[str] | None = None, n_per_domain: int = 1,
                  length: int = 48, atom_column: str = "atom",
                  random_state: int | np.random.Generator | None = None,
                  ) -> list[tuple[int, int, int]]:
    """Random example windows of text, ``n_per_domain`` from each domain.

    Parameters
    ----------
    tokens : DataFrame with ``sequence_index``, ``position`` and ``domain``
    assignment : DataFrame from :func:`assign_atoms`, or ndarray of int, shape (n_tokens,)
        Windows are drawn among sequences with at least one assigned token.
    domains : sequence of str, optional
        Domains to draw from, in this order; default: every domain in order of appearance.
    n_per_domain : int, default=1
    length : int, default=48
        Tokens per window (shorter when the sequence is).
    atom_column : str, default="atom"
    random_state : int, Generator or None

    Returns
    -------
    list of (sequence_index, start, end)
        Token positions ``start <= position < end`` of one sequence.

    Examples
    --------
    >>> tokens = pd.DataFrame({"sequence_index": [0] * 4 + [1] * 4,
    ...                        "position": [0, 1, 2, 3] * 2, "domain": ["law"] * 4 + ["chem"] * 4})
    >>> pick_passages(tokens, np.zeros(8, int), length=3, random_state=0)
    [(0, 1, 4), (1, 1, 4)]
    """
    missing = {"sequence_index", "position", "domain"} - set(tokens.columns)
    if missing:
        raise ValueError(f"tokens lacks columns {sorted(missing)} needed to pick passages")
    if n_per_domain < 1 or length < 1:
        raise ValueError(f"n_per_domain and length must be >= 1; got {n_per_domain!r}, "
                         f"{length!r}")
    atoms = _atom_ids(assignment, atom_column)
    rng = np.random.default_rng(random_state)
    frame = pd.DataFrame({"sequence_index": tokens["sequence_index"].to_numpy(np.int64),
                          "position": tokens["position"].to_numpy(np.int64),
                          "domain": tokens["domain"].astype(str).to_numpy(),
                          "assigned": atoms != UNASSIGNED})
    spans = frame.groupby("sequence_index", sort=True).agg(
        domain=("domain", "first"), first=("position", "min"), last=("position", "max"),
        assigned=("assigned", "any"))
    spans = spans[spans["assigned"]]
    chosen_domains = list(domains) if domains is not None else list(
        pd.unique(frame["domain"]))
    passages = []
    for domain in chosen_domains:
        pool = spans[spans["domain"] == str(domain)]
        if pool.empty:
            logger.warning("no sequence of domain %r has an assigned token", domain)
            continue
        picked = rng.choice(len(pool), size=min(n_per_domain, len(pool)), replace=False)
        for index in sorted(picked):
            sequence_index = int(pool.index[index])
            first, last = int(pool["first"].iloc[index]), int(pool["last"].iloc[index])
            start = int(rng.integers(first, max(last - length + 1, first) + 1))
            passages.append((sequence_index, start, min(start + length, last + 1)))
    return passages


def _label_lookup(labels: pd.DataFrame | Mapping[int, str] | None) -> dict[int, str]:
    if labels is None:
        return {}
    if isinstance(labels, pd.DataFrame):
        return dict(zip(labels["atom"].astype(int), labels["label"].astype(str), strict=True))
    return {int(atom): str(label) for atom, label in labels.items()}


def render_passages_html(
    tokens: pd.DataFrame,
    assignment: pd.DataFrame | np.ndarray,
    labels: pd.DataFrame | Mapping[int, str] | None,
    passages: Sequence[tuple[int, int, int]],
    palette: Sequence[object] | str | None = None,
    *,
    atom_column: str = "atom",
) -> str:
    """Example passages with every token coloured by its atom, as a self-contained HTML string.

    Parameters
    ----------
    tokens : DataFrame with ``text_piece``, ``sequence_index``, ``position`` (and ``domain``)
    assignment : DataFrame from :func:`assign_atoms`, or ndarray of int, shape (n_tokens,)
    labels : DataFrame from :func:`label_atoms`, mapping atom -> label, or None
        Shown on hover (``title``) and in the legend.
    passages : sequence of (sequence_index, start, end)
        Token positions ``start <= position < end`` of a sequence, e.g. from
        :func:`pick_passages`.
    palette : sequence of colours, seaborn palette name or None
        See :func:`atom_colours`.
    atom_column : str, default="atom"

    Returns
    -------
    str
        ``<div>`` with one block per passage (each token a ``<span>`` with ``data-atom``, its
        colours inline and a ``title`` giving atom and label) and a legend of the atoms shown.
        Whitespace of the byte-level pieces is kept (``white-space: pre-wrap``); text is
        HTML-escaped; styles are inline attributes, so nothing external is loaded. Display it
        with ``IPython.display.HTML``.

    Examples
    --------
    >>> tokens = pd.DataFrame({"text_piece": ["a", " <b>"], "sequence_index": [0, 0],
    ...                        "position": [0, 1]})
    >>> page = render_passages_html(tokens, np.array([0, -1]), {0: "law"}, [(0, 0, 2)])
    >>> page.count('<span data-atom='), "&lt;b&gt;" in page
    (2, True)
    """
    atoms = _atom_ids(assignment, atom_column)
    if len(atoms) != len(tokens):
        raise ValueError(f"assignment has {len(atoms)} rows but tokens has {len(tokens)}")
    missing = {"sequence_index", "position"} - set(tokens.columns)
    if missing:
        raise ValueError(f"tokens lacks columns {sorted(missing)} needed to render passages")
    pieces = _pieces(tokens)
    sequence = tokens["sequence_index"].to_numpy(np.int64)
    position = tokens["position"].to_numpy(np.int64)
    domain = tokens["domain"].astype(str).to_numpy() if "domain" in tokens.columns else None
    label_of = _label_lookup(labels)
    by_sequence = pd.Series(np.arange(len(tokens))).groupby(sequence).indices

    blocks, shown = [], set()
    for sequence_index, start, end in passages:
        rows = np.asarray(by_sequence.get(int(sequence_index), []), dtype=np.int64)
        rows = rows[(position[rows] >= start) & (position[rows] < end)]
        rows = rows[np.argsort(position[rows], kind="stable")]
        shown.update(atoms[rows].tolist())
        blocks.append((int(sequence_index), int(start), int(end), rows))
    colours = atom_colours(sorted(shown), palette)

    def span(row: int) -> str:
        atom = int(atoms[row])
        colour = colours[atom]
        name = "unassigned" if atom == UNASSIGNED else f"atom {atom}"
        title = f"{name}: {label_of[atom]}" if atom in label_of else name
        style = (f"background:{colour['background']};color:{colour['color']};"
                 f"border-bottom:{colour['border']};border-radius:2px")
        return (f'<span data-atom="{atom}" style="{style}" title="{html.escape(title)}">'
                f"{html.escape(pieces[row])}</span>")

    parts = ['<div class="moe-atom-passages" style="font-family:system-ui,sans-serif;'
             'font-size:0.9em;line-height:1.7">']
    for sequence_index, start, end, rows in blocks:
        where = f"sequence {sequence_index}, tokens {start}–{end - 1}"
        if domain is not None and len(rows):
            where = f"{domain[rows[0]]} · {where}"
        parts.append(f'<div style="margin:0.2em 0;color:#555;font-size:0.85em">'
                     f"{html.escape(where)}</div>")
        parts.append('<div style="white-space:pre-wrap;font-family:ui-monospace,Menlo,'
                     'Consolas,monospace;border-left:3px solid #bbb;padding:0.3em 0.6em;'
                     'margin-bottom:0.6em">' + "".join(span(row) for row in rows) + "</div>")
    legend = []
    for atom in sorted(shown, key=lambda a: (a == UNASSIGNED, a)):
        colour = colours[atom]
        name = "unassigned" if atom == UNASSIGNED else f"atom {atom}"
        text = f"{name}: {label_of[atom]}" if atom in label_of else name
        legend.append(
            '<span style="display:inline-block;margin:0.1em 0.8em 0.1em 0">'
            f'<span style="display:inline-block;width:1.1em;height:1.1em;vertical-align:middle;'
            f"background:{colour['background']};border-bottom:{colour['border']};"
            f'margin-right:0.3em"></span>{html.escape(text)}</span>')
    parts.append('<div style="font-size:0.85em;margin-top:0.4em"><b>Atoms shown</b><br>'
                 + "".join(legend) + "</div></div>")
    return "".join(parts)
