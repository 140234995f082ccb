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
