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
                    balance_loss: Sequence[float] | None = None):
    """Next-token loss on training batches (smoothed) and on validation text, per step."""
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
