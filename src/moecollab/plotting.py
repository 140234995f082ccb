"""Every figure of the book, drawn with seaborn on a new figure and returned (never shown).

Styling happens inside ``with _style():`` blocks, so importing this module changes no global
matplotlib state.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

FIGURE_DPI = 110  # keeps executed notebooks small


@contextmanager
def _style():
    with sns.axes_style("whitegrid"), sns.plotting_context("notebook", font_scale=0.9), \
            plt.rc_context({"figure.dpi": FIGURE_DPI, "savefig.dpi": FIGURE_DPI}):
        yield


def training_curves(steps: Sequence[int], train_loss: Sequence[float],
                    eval_steps: Sequence[int], validation_loss: Sequence[float],
                    balance_loss: Sequence[float] | None = None,
                    starved_experts: Sequence[int] | None = None):
    """Next-token loss on training batches (smoothed) and on validation text, per step; with
    ``balance_loss``, a second panel of it, and of ``starved_experts`` (counted at
    ``eval_steps``) on its right-hand axis."""
    with _style():
        n_panels = 2 if balance_loss is not None else 1
        figure, axes = plt.subplots(1, n_panels, figsize=(5.2 * n_panels, 3.4), squeeze=False)
        window = max(1, len(train_loss) // 50)
        smoothed = pd.Series(train_loss).rolling(window, min_periods=1).mean()
        axes[0, 0].plot(steps, train_loss, color="0.8", linewidth=0.6, label="train (batch)")
        axes[0, 0].plot(steps, smoothed, color="C0", label=f"train (mean of {window})")
        axes[0, 0].plot(eval_steps, validation_loss, "o-", color="C3", markersize=3,
                        label="validation")
        axes[0, 0].set(xlabel="step", ylabel="cross-entropy (nats/token)",
                       title="Language-model loss")
        axes[0, 0].legend(frameon=False)
        if balance_loss is not None:
            axes[0, 1].plot(steps, pd.Series(balance_loss).rolling(window, min_periods=1).mean(),
                            color="C2")
            axes[0, 1].axhline(1.0, color="0.5", linestyle="--", linewidth=0.8)
            axes[0, 1].set(xlabel="step", ylabel="per-layer balance loss (1 = even)",
                           title="Router balance")
            if starved_experts is not None:
                right = axes[0, 1].twinx()
                right.plot(eval_steps, starved_experts, "s-", color="C4", markersize=3)
                right.set_ylabel("starved experts (validation text)", color="C4")
                right.set_ylim(bottom=0)
                right.grid(False)   # the left axis's grid is enough
        figure.tight_layout()
    return figure


def field_accuracy(table: pd.DataFrame, chance: float | None = None):
    """Accuracy per field: bars for ``table["trained"]``, markers for ``table["control"]``
    where the table has that column; the index names the fields."""
    with _style():
        figure, axis = plt.subplots(figsize=(7.5, 3.4))
        positions = np.arange(len(table))
        axis.bar(positions, table["trained"], color="C0", label="trained")
        if "control" in table:
            axis.plot(positions, table["control"], "D", color="C3", markersize=5,
                      label="untrained control")
        if chance is not None:
            axis.axhline(chance, color="0.4", linestyle=":", linewidth=1, label="chance")
        axis.set_xticks(positions, [str(name).replace("_", " ") for name in table.index],
                        rotation=30, ha="right")
        axis.set(ylim=(0, 1.18), yticks=np.linspace(0, 1, 6), ylabel="accuracy",
                 title="Field cloze accuracy, held-out items")
        axis.legend(frameon=False, loc="upper center", ncols=3)
        figure.tight_layout()
    return figure


def router_load(share: np.ndarray, min_share: float = 0.2, title: str = "Router load"):
    """Heatmap of each expert's share of its layer's selections (1 = the uniform share)."""
    with _style():
        n_layers, n_experts = share.shape
        figure, axis = plt.subplots(figsize=(min(12, 0.45 * n_experts + 2), 0.5 * n_layers + 1.4))
        sns.heatmap(share, ax=axis, cmap="viridis", vmin=0, vmax=max(2.0, float(share.max())),
                    annot=n_experts <= 32, fmt=".1f", annot_kws={"fontsize": 6},
                    cbar_kws={"label": "share / uniform share"})
        starved = np.argwhere(share < min_share)
        for layer, expert in starved:
            axis.add_patch(plt.Rectangle((expert, layer), 1, 1, fill=False, edgecolor="red",
                                         linewidth=1.5))
        axis.set(xlabel="expert", ylabel="layer", title=title)
        figure.tight_layout()
    return figure


def domain_similarity_pair(trained: np.ndarray, control: np.ndarray, domains: Sequence[str]):
    """The domain × domain cosine of expert usage, trained model beside the untrained control."""
    with _style():
        figure, axes = plt.subplots(1, 2, figsize=(11, 4.6))
        low = float(min(trained.min(), control.min()))
        for axis, matrix, name in ((axes[0], trained, "trained"), (axes[1], control,
                                                                    "untrained control")):
            sns.heatmap(matrix, ax=axis, vmin=low, vmax=1, cmap="mako", square=True,
                        xticklabels=domains, yticklabels=domains, annot=len(domains) <= 10,
                        fmt=".2f", annot_kws={"fontsize": 6}, cbar=axis is axes[1])
            off = matrix[~np.eye(len(domains), dtype=bool)]
            axis.set_title(f"{name}: mean off-diagonal {off.mean():.3f}")
            axis.tick_params(labelsize=7)
        figure.tight_layout()
    return figure


def mutual_information_bars(trained: Sequence[float], control: Sequence[float]):
    """Expert–domain mutual information per layer, trained model beside the control."""
    with _style():
        table = pd.DataFrame({
            "layer": list(range(len(trained))) * 2,
            "bits": list(trained) + list(control),
            "model": ["trained"] * len(trained) + ["untrained control"] * len(control)})
        figure, axis = plt.subplots(figsize=(5.5, 3.2))
        sns.barplot(table, x="layer", y="bits", hue="model", ax=axis,
                    palette=["C0", "0.6"])
        axis.set(ylabel="mutual information (bits)", title="Expert–domain mutual information")
        axis.legend(frameon=False)
        figure.tight_layout()
    return figure


def corpus_sizes(summary: pd.DataFrame):
    """Entries per domain and split (``summary`` has domain, split, entries)."""
    with _style():
        figure, axis = plt.subplots(figsize=(7, 3.2))
        sns.barplot(summary, x="domain", y="entries", hue="split", ax=axis)
        axis.tick_params(axis="x", rotation=35, labelsize=8)
        axis.set(xlabel="", title="Corpus entries per domain and split")
        axis.legend(frameon=False)
        figure.tight_layout()
    return figure


def message_figure(message: str):
    """A small figure that only states why there is nothing to plot."""
    with _style():
        figure, axis = plt.subplots(figsize=(6, 1.2))
        axis.text(0.5, 0.5, message, ha="center", va="center", fontsize=10)
        axis.set_axis_off()
    return figure


def _lift_limit(values: np.ndarray, max_lift: float | None) -> float:
    """Symmetric log-scale limit for lift: the largest of x and 1/x, rounded up to a power of 2."""
    if max_lift is not None:
        return float(max_lift)
    positive = values[np.isfinite(values) & (values > 0)]
    if positive.size == 0:
        return 2.0
    spread = float(max(positive.max(), 1.0 / positive.min()))
    return float(2.0 ** np.clip(np.ceil(np.log2(spread)), 1, 6))


def coactivation_heatmap(lift_block: np.ndarray, layer: int, *, max_lift: float | None = None,
                         title: str | None = None):
    """Lift between the experts of ``layer`` (rows) and ``layer + 1`` (columns), as paper Fig. 2.

    The colour scale is logarithmic and centred at 1 (independence): red above, blue below.
    Pairs that never meet get the lowest colour; blank cells are experts that never fire.
    ``lift_block`` is :func:`moecollab.coactivation.adjacent_layer_lift`.
    """
    from matplotlib.colors import LogNorm

    with _style():
        block = np.asarray(lift_block, dtype=float)
        limit = _lift_limit(block, max_lift)
        shown = np.where(np.isnan(block), np.nan, np.clip(block, 1.0 / limit, limit))
        n_rows, n_cols = block.shape
        side = min(11.0, 0.22 * max(n_rows, n_cols) + 2.5)
        figure, axis = plt.subplots(figsize=(side + 1.2, side))
        ticks = [2.0**power for power in range(-int(np.log2(limit)), int(np.log2(limit)) + 1)]
        sns.heatmap(shown, ax=axis, cmap="vlag", norm=LogNorm(vmin=1.0 / limit, vmax=limit),
                    mask=np.isnan(shown), square=True, xticklabels=n_cols <= 32,
                    yticklabels=n_rows <= 32,
                    cbar_kws={"label": "lift (log scale, 1 = independent)", "ticks": ticks,
                              "format": "%g", "shrink": 0.8})
        axis.set(xlabel=f"expert of layer {layer + 1}", ylabel=f"expert of layer {layer}",
                 title=title or f"Co-activation lift, layers {layer} → {layer + 1}")
        axis.tick_params(labelsize=6)
        figure.tight_layout()
    return figure


def lift_distribution(real_lifts: np.ndarray, null_lifts: np.ndarray,
                      labels: Sequence[str] = ("observed", "shuffled null")):
    """Cross-layer lift of the real routing against a null: histogram and ECDF of log2 lift.

    Inputs are :func:`moecollab.coactivation.cross_layer_lift_values`. Pairs that never meet
    (lift 0) have no logarithm; their share is given in the legend.
    """
    with _style():
        frames = []
        for values, label in zip((real_lifts, null_lifts), labels, strict=True):
            values = np.asarray(values, dtype=float)
            values = values[np.isfinite(values)]
            never = float((values == 0).mean()) if values.size else 0.0
            frames.append(pd.DataFrame({
                "log2 lift": np.log2(values[values > 0]),
                "routing": f"{label} ({never:.1%} never together)"}))
        table = pd.concat(frames, ignore_index=True)
        figure, axes = plt.subplots(1, 2, figsize=(10.5, 3.6))
        palette = ["C3", "0.55"]
        sns.histplot(table, x="log2 lift", hue="routing", ax=axes[0], stat="density",
                     common_norm=False, element="step", bins=60, palette=palette)
        sns.ecdfplot(table, x="log2 lift", hue="routing", ax=axes[1], palette=palette,
                     legend=False)
        for axis in axes:
            axis.axvline(0.0, color="0.3", linestyle="--", linewidth=0.8)
        axes[0].set(title="Cross-layer pairs: lift distribution")
        axes[1].set(ylabel="share of pairs", title="ECDF (0 = independent)")
        if axes[0].get_legend() is not None:
            sns.move_legend(axes[0], "upper left", frameon=False, title=None, fontsize=7)
        figure.tight_layout()
    return figure


def _expert_set_labels(table: pd.DataFrame) -> list[str]:
    """``L0·E3 + L1·E5`` labels for pair or triplet tables from ``coactivation.top_*``."""
    members = [name for name in "abc" if f"layer_{name}" in table.columns]
    return [" + ".join(f"L{int(row[f'layer_{name}'])}·E{int(row[f'expert_in_layer_{name}'])}"
                       for name in members) for _, row in table.iterrows()]


def top_pairs_bars(pairs_df: pd.DataFrame, n: int = 15, value: str = "count"):
    """The ``n`` top pairs (or triplets) of :func:`moecollab.coactivation.top_pairs` as bars.

    Bars show ``value`` (``count``, ``p_joint``, ``p_b_given_a`` or ``lift``); the lift is
    written at the end of each bar.
    """
    with _style():
        table = pairs_df.head(n).reset_index(drop=True)
        names = _expert_set_labels(table)
        figure, axis = plt.subplots(figsize=(7.5, 0.3 * max(len(table), 1) + 1.4))
        sns.barplot(x=table[value].to_numpy(), y=names, ax=axis, color="C0", orient="h")
        if "lift" in table.columns and value != "lift":
            for position, (bar_value, lift) in enumerate(zip(table[value], table["lift"],
                                                             strict=True)):
                axis.text(bar_value, position, f"  lift {lift:.2f}", va="center", fontsize=7)
            axis.set_xlim(0, float(table[value].max()) * 1.25 if len(table) else 1)
        kind = "triplets" if "layer_c" in table.columns else "pairs"
        axis.set(xlabel=value, ylabel="", title=f"Top {len(table)} co-activated expert {kind}")
        axis.tick_params(axis="y", labelsize=7)
        figure.tight_layout()
    return figure


def clustered_similarity(similarity: np.ndarray, domains: Sequence[str], order: Sequence[int],
                         title: str = "Domain similarity of expert usage"):
    """Domain × domain cosine of expert usage, rows and columns in a clustered ``order``.

    ``order`` is :func:`moecollab.coactivation.cluster_order` of ``similarity``.
    """
    with _style():
        order = np.asarray(order, dtype=int)
        matrix = np.asarray(similarity, dtype=float)[np.ix_(order, order)]
        names = [domains[index] for index in order]
        size = min(9.0, 0.45 * len(names) + 3.0)
        figure, axis = plt.subplots(figsize=(size + 1.0, size))
        off = matrix[~np.eye(len(names), dtype=bool)]
        sns.heatmap(matrix, ax=axis, cmap="mako", vmin=float(off.min()) if off.size else 0,
                    vmax=1, square=True, xticklabels=names, yticklabels=names,
                    annot=len(names) <= 12, fmt=".2f", annot_kws={"fontsize": 6},
                    cbar_kws={"label": "cosine similarity", "shrink": 0.8})
        axis.set_title(f"{title}\nmean off-diagonal {off.mean():.3f}" if off.size else title)
        axis.tick_params(labelsize=7)
        figure.tight_layout()
    return figure


def load_balance_plot(balance_df: pd.DataFrame, control_df: pd.DataFrame | None = None,
                      labels: Sequence[str] = ("trained", "untrained control")):
    """Per-layer routing balance, optionally beside a control.

    Normalised entropy (1 = even) and the largest and smallest expert share (1 = the uniform
    share), from :func:`moecollab.coactivation.load_balance`.
    """
    with _style():
        figure, axes = plt.subplots(1, 2, figsize=(10.5, 3.4))
        tables = [(balance_df, labels[0], "C0")]
        if control_df is not None:
            tables.append((control_df, labels[1], "0.55"))
        width = 0.8 / len(tables)
        for index, (table, label, colour) in enumerate(tables):
            layers = table["layer"].to_numpy()
            axes[0].bar(layers + (index - (len(tables) - 1) / 2) * width,
                        table["normalised_entropy"], width=width, color=colour, label=label)
            axes[1].plot(layers, table["max_share"], "o-", color=colour, label=f"{label}: max")
            axes[1].plot(layers, table["min_share"], "s--", color=colour, label=f"{label}: min")
        axes[0].axhline(1.0, color="0.3", linestyle="--", linewidth=0.8)
        axes[0].set(xlabel="layer", ylabel="entropy / log2(n_experts)", ylim=(0, 1.2),
                    title="Routing entropy (1 = even)")
        axes[0].legend(frameon=False, fontsize=7, loc="upper center", ncol=2)
        axes[1].axhline(1.0, color="0.3", linestyle="--", linewidth=0.8)
        axes[1].set(xlabel="layer", ylabel="share / uniform share",
                    title="Most and least used expert")
        axes[1].legend(frameon=False, fontsize=7)
        for axis in axes:
            axis.xaxis.get_major_locator().set_params(integer=True)
        figure.tight_layout()
    return figure


def routing_weight_histogram(weights: np.ndarray):
    """Distribution of applied routing weights by rank within the token's top-k.

    ``weights`` has shape (n_tokens, n_layers, top_k); ranks are by weight, largest first.
    """
    with _style():
        ranked = -np.sort(-weights, axis=-1)
        top_k = ranked.shape[-1]
        table = pd.DataFrame({"weight": ranked.reshape(-1, top_k).ravel(),
                              "rank": np.tile(np.arange(1, top_k + 1), ranked.size // top_k)})
        figure, axis = plt.subplots(figsize=(6, 3.2))
        sns.histplot(table, x="weight", hue="rank", bins=50, element="step", stat="density",
                     common_norm=False, ax=axis, palette="viridis")
        axis.set(xlabel="routing weight applied", title="Routing weights by rank in the top-k")
        figure.tight_layout()
    return figure


def hsdl_loss_curves(loss_history: dict[str, Sequence[float]]):
    """Each term of the HSDL objective per epoch (log scale)."""
    with _style():
        table = pd.DataFrame(loss_history)
        figure, axes = plt.subplots(1, len(table.columns), figsize=(3.0 * len(table.columns), 2.8))
        for axis, term in zip(np.atleast_1d(axes), table.columns, strict=True):
            axis.plot(np.arange(1, len(table) + 1), table[term], color="C0")
            axis.set(title=term, xlabel="epoch", yscale="log" if (table[term] > 0).all()
                     else "linear")
        figure.tight_layout()
    return figure


def hsdl_sweep(sweep: pd.DataFrame, x: str, metrics: Sequence[str] = (
        "l1_error", "active_atoms", "mean_atom_size", "nonzeros_per_code")):
    """Fit metrics against one swept setting (``sweep`` has a column ``x`` and the metrics)."""
    with _style():
        figure, axes = plt.subplots(1, len(metrics), figsize=(3.0 * len(metrics), 2.8))
        for axis, metric in zip(np.atleast_1d(axes), metrics, strict=True):
            sns.lineplot(sweep, x=x, y=metric, marker="o", ax=axis)
            axis.set(title=metric.replace("_", " "), ylabel="")
            if sweep[x].min() > 0 and sweep[x].max() / sweep[x].min() > 8:
                axis.set_xscale("log", base=2)
        figure.tight_layout()
    return figure


def atom_heatmaps(dictionary: np.ndarray, n_experts: int, atom_ids: Sequence[int],
                  labels: Sequence[str] | None = None):
    """Atoms drawn as layers × experts grids (expert weight in [0, 1])."""
    with _style():
        n_layers = dictionary.shape[1] // n_experts
        n_columns = min(3, len(atom_ids))
        n_rows = int(np.ceil(len(atom_ids) / n_columns))
        figure, axes = plt.subplots(n_rows, n_columns, squeeze=False,
                                    figsize=(3.6 * n_columns, 0.35 * n_layers * n_rows + 1.2))
        for index, axis in enumerate(axes.ravel()):
            if index >= len(atom_ids):
                axis.set_axis_off()
                continue
            atom = atom_ids[index]
            sns.heatmap(dictionary[atom].reshape(n_layers, n_experts), ax=axis, vmin=0, vmax=1,
                        cmap="rocket_r", cbar=False, xticklabels=False)
            axis.set(title=labels[index] if labels else f"atom {atom}", xlabel="expert",
                     ylabel="layer")
        figure.tight_layout()
    return figure


def coverage_plot(fractions: Sequence[float], curves: dict[str, Sequence[float]],
                  paper_point: tuple[float, float] | None = (0.10, 0.60)):
    """Coverage@k% (share of atoms whose strongest experts are among the top k% co-activated
    sets) for several dictionaries and baselines; the paper's ~60% at 10% as a marker."""
    with _style():
        figure, axis = plt.subplots(figsize=(5.6, 3.6))
        for index, (name, values) in enumerate(curves.items()):
            style = "--" if "random" in name else "-"
            axis.plot(np.asarray(fractions) * 100, np.asarray(values) * 100, style,
                      color=f"C{index}", label=name)
        if paper_point is not None:
            axis.plot(paper_point[0] * 100, paper_point[1] * 100, "k*", markersize=10,
                      label="paper (about 60% at 10%)")
        axis.set(xlabel="top k% of co-activated sets", ylabel="atoms covered (%)",
                 xscale="log", title="Coverage of atoms by frequent co-activations")
        axis.legend(frameon=False, fontsize=7)
        figure.tight_layout()
    return figure


# ---- atoms and their tokens (04_annotation) ---------------------------------------------------


def _atom_names(labels, n_atoms: int) -> list[str]:
    """One label per atom from a sequence, a mapping atom -> label or None."""
    if labels is None:
        return [""] * n_atoms
    if isinstance(labels, pd.DataFrame):  # label_atoms output
        labels = dict(zip(labels["atom"].astype(int), labels["label"].astype(str), strict=True))
    if hasattr(labels, "get") and not isinstance(labels, pd.Series):
        return [str(labels.get(atom, "")) for atom in range(n_atoms)]
    names = [str(name) for name in labels]
    if len(names) != n_atoms:
        raise ValueError(f"labels must have one entry per atom ({n_atoms}); got {len(names)}")
    return names


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def atom_tree(hierarchy: np.ndarray, labels1=None, labels2=None,
              sizes1: Sequence[float] | None = None, sizes2: Sequence[float] | None = None, *,
              max_parents: int = 16, max_children: int = 3, child_ratio: float = 0.05,
              label_width: int = 42, edge_labels: bool | None = None,
              title: str | None = None):
    """The level-1 → level-2 atom tree: largest level-1 atoms left, their children right.

    Parameters
    ----------
    hierarchy : ndarray, shape (K1, K2)
        ``HSDL.hierarchy_codes_[0]``: how much of each level-2 atom each level-1 atom uses.
    labels1, labels2 : sequence of str (length K1, K2), mapping atom -> str, DataFrame or None
        Atom labels; a DataFrame is :func:`moecollab.annotation.label_atoms` output.
    sizes1, sizes2 : sequence of float, length K1 and K2, optional
        Tokens per atom; level-1 atoms are shown largest first (by total hierarchy weight when
        not given) and marker areas follow the sizes.
    max_parents : int, default=16
        Level-1 atoms shown (the largest); the title says how many there are.
    max_children : int, default=3
        Children drawn per level-1 atom, strongest first.
    child_ratio : float, default=0.05
        A level-2 atom is a child when its weight exceeds this share of the row's largest
        (as in :func:`moecollab.annotation.assign_atoms`).
    label_width : int, default=42
        Characters of a label before it is cut with "…".
    edge_labels : bool, optional
        Write each edge's relative weight on it; by default only when there are at most 24
        edges (more would overlap; the width still shows the weight).
    title : str, optional

    Notes
    -----
    A level-2 atom shared by several level-1 atoms is drawn once, placed at the mean height of
    its parents, so shared sub-patterns show as converging edges. Edge width and the number on
    each edge are the hierarchy weight relative to the parent's strongest child (1 = strongest).
    Level-1 colours match :func:`moecollab.colours.atom_colours` (as in the HTML passages).
    """
    from moecollab.colours import atom_colours

    hierarchy = np.asarray(hierarchy, dtype=float)
    if hierarchy.ndim != 2:
        raise ValueError(f"hierarchy must have shape (K1, K2); got {hierarchy.shape}")
    if max_parents < 1 or max_children < 1:
        raise ValueError(f"max_parents and max_children must be >= 1; got {max_parents!r}, "
                         f"{max_children!r}")
    n_atoms1, n_atoms2 = hierarchy.shape
    names1, names2 = _atom_names(labels1, n_atoms1), _atom_names(labels2, n_atoms2)
    size1 = (np.asarray(sizes1, dtype=float) if sizes1 is not None else hierarchy.sum(axis=1))
    size2 = np.asarray(sizes2, dtype=float) if sizes2 is not None else None
    parents = [int(a) for a in np.argsort(-size1, kind="stable") if size1[a] > 0][:max_parents]

    row_max = hierarchy.max(axis=1)
    edges = []  # (parent, child, relative weight)
    for parent in parents:
        if row_max[parent] <= 0:
            continue
        relative = hierarchy[parent] / row_max[parent]
        for child in np.argsort(-relative, kind="stable")[:max_children]:
            if relative[child] > child_ratio and hierarchy[parent, child] > 0:
                edges.append((parent, int(child), float(relative[child])))

    parent_y = {parent: float(len(parents) - 1 - index) for index, parent in enumerate(parents)}
    pull: dict[int, list[tuple[float, float]]] = {}
    for parent, child, weight in edges:
        pull.setdefault(child, []).append((parent_y[parent], weight))
    children = sorted(pull, key=lambda c: (-np.average([y for y, _ in pull[c]],
                                                       weights=[w for _, w in pull[c]]), c))
    n_rows = max(len(parents), len(children), 1)
    # Both columns span the same height, so a short column is spread out, not bunched at the top.
    parent_y = {parent: y * (n_rows - 1) / max(len(parents) - 1, 1)
                for parent, y in parent_y.items()}
    child_y = {child: float(len(children) - 1 - index) * (n_rows - 1) / max(len(children) - 1, 1)
               for index, child in enumerate(children)}

    def marker_area(values: np.ndarray, atoms: list[int]) -> np.ndarray:
        if values is None or not atoms:
            return np.full(len(atoms), 60.0)
        chosen = values[atoms]
        return 20.0 + 180.0 * np.sqrt(chosen / max(float(values.max()), 1e-12))

    colours = atom_colours(parents)
    if edge_labels is None:
        edge_labels = len(edges) <= 24
    with _style():
        figure, axis = plt.subplots(figsize=(11.0, 0.34 * n_rows + 1.3))
        for parent, child, weight in edges:
            y0, y1 = parent_y[parent], child_y[child]
            axis.plot([0, 1], [y0, y1], color=colours[parent]["background"],
                      linewidth=0.4 + 3.6 * weight, alpha=0.7, solid_capstyle="round", zorder=1)
            if edge_labels:
                axis.text(0.78, y0 + 0.78 * (y1 - y0), f"{weight:.2f}", fontsize=6, ha="center",
                          va="center", color="0.25", zorder=3,
                          bbox={"boxstyle": "round,pad=0.1", "facecolor": "white",
                                "edgecolor": "none", "alpha": 0.8})
        axis.scatter([0.0] * len(parents), [parent_y[p] for p in parents],
                     s=marker_area(size1, parents),
                     c=[colours[p]["background"] for p in parents], edgecolor="0.2",
                     linewidth=0.6, zorder=2)
        axis.scatter([1.0] * len(children), [child_y[c] for c in children],
                     s=marker_area(size2, children), color="0.75", edgecolor="0.2",
                     linewidth=0.6, zorder=2)
        for parent in parents:
            count = f" ({int(size1[parent]):,})" if sizes1 is not None else ""
            text = _shorten(f"A{parent}{count} {names1[parent]}".rstrip(), label_width)
            axis.text(-0.04, parent_y[parent], text, ha="right", va="center", fontsize=7)
        for child in children:
            count = f" ({int(size2[child]):,})" if size2 is not None else ""
            text = _shorten(f"B{child}{count} {names2[child]}".rstrip(), label_width)
            axis.text(1.04, child_y[child], text, ha="left", va="center", fontsize=7)
        axis.set_xlim(-1.15, 2.15)
        axis.set_ylim(-0.8, n_rows - 0.2)
        axis.set_axis_off()
        shown = (f"the {len(parents)} largest of {n_atoms1} level-1 atoms"
                 if len(parents) < n_atoms1 else f"all {n_atoms1} level-1 atoms")
        axis.set_title(title or f"Level-1 atoms (A, left) → level-2 atoms (B, right): {shown}, "
                       f"≤ {max_children} children each\nedge width = hierarchy weight / the "
                       "parent's strongest"
                       + ("; (n) = tokens" if sizes1 is not None or size2 is not None else ""),
                       fontsize=9)
        figure.tight_layout()
    return figure


def atom_domain_heatmap(enrichment: pd.DataFrame, significant: pd.DataFrame | None = None, *,
                        row_labels=None, max_abs: float | None = None,
                        title: str = "Domain enrichment of each atom"):
    """Atoms × domains log-odds of domain enrichment, diverging around 0 (= the overall share).

    Parameters
    ----------
    enrichment : DataFrame, index atoms, columns domains
        :func:`moecollab.annotation.enrichment_matrix` (``log_odds`` by default).
    significant : DataFrame of bool, same shape, optional
        Cells marked ``*`` (e.g. ``enrichment_matrix(statistics, "significant")``).
    row_labels : sequence of str, mapping atom -> str or DataFrame, optional
        Replaces the atom ids on the rows (e.g. labels from ``label_atoms``).
    max_abs : float, optional
        Colour limit (symmetric); default the largest finite absolute value, at least 1.
    title : str
    """
    values = enrichment.astype(float)
    finite = values.to_numpy()[np.isfinite(values.to_numpy())]
    limit = float(max_abs) if max_abs is not None else max(
        1.0, float(np.abs(finite).max()) if finite.size else 1.0)
    n_rows, n_cols = values.shape
    annotate = n_rows <= 40 and n_cols <= 14
    annotation = None
    if annotate:
        marks = (significant.reindex_like(values).fillna(False).astype(bool).to_numpy()
                 if significant is not None else np.zeros(values.shape, dtype=bool))
        annotation = np.array([[("" if not np.isfinite(v) else f"{v:.1f}") + ("*" if m else "")
                                for v, m in zip(row, mark_row, strict=True)]
                               for row, mark_row in zip(values.to_numpy(), marks, strict=True)])
    if isinstance(row_labels, pd.DataFrame):  # label_atoms output
        row_labels = dict(zip(row_labels["atom"].astype(int), row_labels["label"].astype(str),
                              strict=True))
    if row_labels is None:
        names = [str(atom) for atom in values.index]
    elif hasattr(row_labels, "get"):
        names = [_shorten(f"{atom} {row_labels.get(atom, '')}".rstrip(), 40)
                 for atom in values.index]
    else:
        names = [_shorten(str(name), 40) for name in row_labels]
    with _style():
        figure, axis = plt.subplots(figsize=(min(14.0, 0.7 * n_cols + 4.5),
                                             min(16.0, 0.28 * n_rows + 1.6)))
        sns.heatmap(values, ax=axis, cmap="vlag", center=0, vmin=-limit, vmax=limit,
                    annot=annotation if annotate else False, fmt="", annot_kws={"fontsize": 6},
                    yticklabels=names, xticklabels=[str(c) for c in values.columns],
                    cbar_kws={"label": "log-odds vs overall share (0 = as overall)",
                              "shrink": 0.8})
        axis.set(xlabel="domain", ylabel="atom",
                 title=title + ("\n* significant enrichment (Bonferroni)"
                                if significant is not None and annotate else ""))
        axis.tick_params(labelsize=7)
        axis.tick_params(axis="x", rotation=35)
        figure.tight_layout()
    return figure


def purity_vs_random(observed, random_mean, random_std, *, labels: Sequence[str] | None = None,
                     title: str = "Domain purity of atoms\nvs random atoms of the same sizes"):
    """Observed domain purity beside the purity of random atoms (mean ± std).

    Parameters
    ----------
    observed, random_mean, random_std : float or sequence of float
        One value per group (e.g. per level), from :func:`moecollab.annotation.domain_purity`
        and :func:`moecollab.annotation.random_purity`.
    labels : sequence of str, optional
        Group names (default "level 1", "level 2", …).
    title : str
    """
    observed = np.atleast_1d(np.asarray(observed, dtype=float))
    random_mean = np.atleast_1d(np.asarray(random_mean, dtype=float))
    random_std = np.atleast_1d(np.asarray(random_std, dtype=float))
    if not observed.shape == random_mean.shape == random_std.shape:
        raise ValueError("observed, random_mean and random_std must have the same length; got "
                         f"{observed.shape}, {random_mean.shape}, {random_std.shape}")
    labels = list(labels) if labels is not None else [f"level {i + 1}"
                                                       for i in range(len(observed))]
    positions = np.arange(len(observed))
    with _style():
        figure, axis = plt.subplots(figsize=(1.6 * len(observed) + 2.8, 3.2))
        axis.bar(positions - 0.18, observed, width=0.36, color="C0", label="HSDL atoms")
        axis.bar(positions + 0.18, random_mean, width=0.36, color="0.7",
                 yerr=random_std, capsize=3, label="random atoms (mean ± std)")
        for x, value in zip(positions - 0.18, observed, strict=True):
            axis.text(x, value, f"{value:.2f}", ha="center", va="bottom", fontsize=7)
        for x, value, spread in zip(positions + 0.18, random_mean, random_std, strict=True):
            axis.text(x, value + spread, f"{value:.2f}", ha="center", va="bottom", fontsize=7)
        axis.set_xticks(positions, labels)
        axis.set(ylim=(0, 1.3), ylabel="size-weighted largest domain share", title=title)
        axis.set_yticks(np.linspace(0, 1, 6))
        axis.legend(frameon=False, fontsize=7, loc="upper center", ncol=2)
        figure.tight_layout()
    return figure


def mask_overlap(jaccard: pd.DataFrame, title: str = "Overlap of kept experts (Jaccard)"):
    """Jaccard similarity between the kept-expert sets of several methods."""
    with _style():
        size = 0.55 * len(jaccard) + 2.2
        figure, axis = plt.subplots(figsize=(size + 1, size))
        sns.heatmap(jaccard, ax=axis, vmin=0, vmax=1, cmap="mako", annot=True, fmt=".2f",
                    annot_kws={"fontsize": 7}, square=True)
        axis.set(title=title, xlabel="", ylabel="")
        axis.tick_params(labelsize=8)
        figure.tight_layout()
    return figure


def kept_per_layer(kept: pd.DataFrame, top_k: int | None = None):
    """Experts kept in each layer by each method (``kept``: layer, method, kept)."""
    with _style():
        figure, axis = plt.subplots(figsize=(7, 3.4))
        sns.barplot(kept, x="layer", y="kept", hue="method", ax=axis)
        if top_k is not None:
            axis.axhline(top_k, color="0.3", linestyle=":", linewidth=1, label=f"top-k = {top_k}")
        axis.set(ylabel="experts kept", title="Experts kept per layer")
        axis.legend(frameon=False, fontsize=7, ncols=2)
        figure.tight_layout()
    return figure


def accuracy_vs_ratio(table: pd.DataFrame, *, value: str = "value",
                      unpruned: str = "unpruned", random_method: str = "random",
                      chance: float | None = None, ylabel: str = "accuracy",
                      title: str = "Accuracy after pruning"):
    """Accuracy of each pruning method over pruning ratios (the paper's main comparison).

    Parameters
    ----------
    table : DataFrame
        Columns ``method``, ``prune_ratio`` (fraction of experts pruned, e.g. 0.25) and
        ``value``; several rows per (method, ratio) are averaged. Rows of ``random_method``
        (one per seed) also draw their min–max spread as a band; rows of ``unpruned`` (any
        ratio) draw a horizontal line at their mean.
    value : str, default "value"
    unpruned, random_method : str
        Method names of the unpruned model and of random pruning.
    chance : float, optional
        A dotted line at the chance level (e.g. 0.25 for four choices).
    ylabel, title : str
    """
    missing = sorted({"method", "prune_ratio", value} - set(table.columns))
    if missing:
        raise ValueError(f"table lacks column(s) {', '.join(missing)}")
    methods = [name for name in dict.fromkeys(table["method"]) if name != unpruned]
    ratios = sorted(table.loc[table["method"] != unpruned, "prune_ratio"].unique())
    with _style():
        figure, axis = plt.subplots(figsize=(7.2, 3.6))
        palette = sns.color_palette("tab10", max(len(methods), 1))
        for color, method in zip(palette, methods, strict=False):
            rows = table[table["method"] == method]
            stats = rows.groupby("prune_ratio")[value].agg(["mean", "min", "max", "size"])
            stats = stats.sort_index()
            percent = 100 * stats.index.to_numpy(dtype=float)
            is_random = method == random_method and bool((stats["size"] > 1).any())
            label = f"{method} (mean, min–max of {int(stats['size'].max())})" if is_random \
                else method
            sns.lineplot(x=percent, y=stats["mean"].to_numpy(), ax=axis, color=color,
                         marker="o", label=label, linestyle="--" if is_random else "-")
            if is_random:
                axis.fill_between(percent, stats["min"], stats["max"], color=color, alpha=0.2,
                                  linewidth=0)
        reference = table.loc[table["method"] == unpruned, value]
        if len(reference):
            axis.axhline(float(reference.mean()), color="0.25", linewidth=1.0,
                         label=f"{unpruned} ({float(reference.mean()):.3f})")
        if chance is not None:
            axis.axhline(chance, color="0.6", linestyle=":", linewidth=1.0, label="chance")
        if ratios:
            axis.set_xticks([100 * float(ratio) for ratio in ratios])
        axis.set(xlabel="experts pruned (%)", ylabel=ylabel, title=title)
        axis.legend(frameon=False, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        figure.tight_layout()
    return figure


def domain_drop_heatmap(matrix: pd.DataFrame, *, vmax: float | None = None,
                        title: str = "Relative change after domain-specific pruning"):
    """Relative accuracy change, calibration domain × evaluated domain (the paper's Fig. 9).

    Parameters
    ----------
    matrix : DataFrame
        Rows: the domain whose data chose the pruned experts; columns: the evaluated domain;
        values: ``(acc_pruned - acc_unpruned) / acc_unpruned`` as fractions (see
        :func:`moecollab.evaluation.relative_drop`). Cells where the two domains agree are
        outlined.
    vmax : float, optional
        Colour limit (symmetric around 0); default the largest absolute value.
    title : str
    """
    from matplotlib.ticker import PercentFormatter

    values = matrix.astype(float)
    finite = np.abs(values.to_numpy())[np.isfinite(values.to_numpy())]
    limit = vmax if vmax is not None else max(float(finite.max()) if finite.size else 0.0, 1e-3)
    n_rows, n_cols = values.shape
    with _style():
        figure, axis = plt.subplots(figsize=(0.95 * n_cols + 2.6, 0.6 * n_rows + 1.8))
        sns.heatmap(values, ax=axis, cmap="RdBu", center=0.0, vmin=-limit, vmax=limit,
                    annot=True, fmt=".1%", annot_kws={"fontsize": 7}, linewidths=0.5,
                    linecolor="white",
                    cbar_kws={"label": "relative change vs unpruned",
                              "format": PercentFormatter(1.0)})
        columns = [str(column) for column in values.columns]
        for row, domain in enumerate(str(index) for index in values.index):
            if domain in columns:
                axis.add_patch(plt.Rectangle((columns.index(domain), row), 1, 1, fill=False,
                                         edgecolor="0.1", linewidth=1.4))
        axis.set(xlabel="evaluated on", ylabel="experts chosen with", title=title)
        axis.tick_params(axis="x", rotation=35)
        axis.tick_params(axis="y", rotation=0)
        figure.tight_layout()
    return figure


def results_bars(table: pd.DataFrame, *, value: str = "value", stderr: str | None = "stderr",
                 task: str = "task", method: str = "method", ylabel: str = "accuracy",
                 title: str = "Accuracy per task"):
    """Grouped bars: one group per task, one bar per method, ± standard error where known.

    Parameters
    ----------
    table : DataFrame
        One row per (method, task) with ``value`` (and optionally ``stderr``); repeated rows
        are averaged (e.g. random seeds).
    value, stderr, task, method : str
        Column names; ``stderr=None`` draws no error bars.
    ylabel, title : str
    """
    missing = sorted({task, method, value} - set(table.columns))
    if missing:
        raise ValueError(f"table lacks column(s) {', '.join(missing)}")
    task_names = list(dict.fromkeys(table[task]))
    method_names = list(dict.fromkeys(table[method]))
    means = table.groupby([method, task], sort=False)[value].mean()
    errors = (table.groupby([method, task], sort=False)[stderr].mean()
              if stderr is not None and stderr in table.columns else None)
    positions = np.arange(len(task_names))
    width = 0.8 / max(len(method_names), 1)
    with _style():
        figure, axis = plt.subplots(figsize=(max(4.5, 0.35 * len(task_names)
                                                 * len(method_names) + 2.5), 3.6))
        palette = sns.color_palette("tab10", max(len(method_names), 1))
        for rank, (color, name) in enumerate(zip(palette, method_names, strict=False)):
            heights = [means.get((name, task_name), np.nan) for task_name in task_names]
            yerr = ([errors.get((name, task_name), np.nan) for task_name in task_names]
                    if errors is not None else None)
            offset = (rank - (len(method_names) - 1) / 2) * width
            axis.bar(positions + offset, heights, width=width, color=color, label=name,
                     yerr=yerr, capsize=2, error_kw={"linewidth": 0.8})
        axis.set_xticks(positions, task_names)
        axis.tick_params(axis="x", rotation=30 if len(task_names) > 4 else 0)
        axis.margins(y=0.15)  # room for the legend above the bars
        axis.set(ylabel=ylabel, title=title)
        axis.legend(frameon=False, fontsize=7, ncol=min(len(method_names), 4))
        figure.tight_layout()
    return figure
