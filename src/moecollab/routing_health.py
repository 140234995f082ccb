"""Is a model's routing worth studying? Expert load, domain similarity and mutual information.

All functions take hard selections ``expert_ids`` of shape ``(n_tokens, n_layers, top_k)``
(what :func:`moecollab.capture.capture_routing` records) and, where needed, one domain label per
token. Each statistic should be read beside the same statistic for the untrained model of the
same architecture: token identity alone already separates domains through a random router.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from moecollab import layout


def expert_counts(expert_ids: np.ndarray, n_experts: int) -> np.ndarray:
    """Selections per expert in each layer, shape ``(n_layers, n_experts)``.

    Examples
    --------
    >>> ids = np.array([[[0, 1]], [[0, 2]]])    # 2 tokens, 1 layer, top-2
    >>> expert_counts(ids, 3).tolist()
    [[2, 1, 1]]
    """
    n_layers = expert_ids.shape[1]
    flat = expert_ids.transpose(1, 0, 2).reshape(n_layers, -1).astype(np.int64)
    offsets = layout.column_offsets(n_experts, n_layers=n_layers)[:-1, None]
    counts = np.bincount((flat + offsets).ravel(), minlength=n_layers * n_experts)
    return counts.reshape(n_layers, n_experts)


def layer_shares(counts: np.ndarray) -> np.ndarray:
    """Each layer's selection counts, shape ``(n_layers, n_experts)``, as shares of that layer's
    selections (float; a layer without selections stays all zero).

    Examples
    --------
    >>> layer_shares(np.array([[2, 1, 1], [0, 0, 0]])).tolist()
    [[0.5, 0.25, 0.25], [0.0, 0.0, 0.0]]
    """
    counts = np.asarray(counts, dtype=float)
    totals = counts.sum(axis=1, keepdims=True)
    return counts / np.where(totals == 0, 1, totals)


def expert_share(expert_ids: np.ndarray, n_experts: int) -> np.ndarray:
    """Each expert's share of its layer's selections relative to the uniform share (1 = even).

    Shape ``(n_layers, n_experts)``; a value of 0.2 means the expert gets a fifth of what it would
    under perfectly balanced routing.
    """
    counts = expert_counts(expert_ids, n_experts)
    return counts * n_experts / counts.sum(axis=1, keepdims=True)


def domain_usage(expert_ids: np.ndarray, token_domains: Sequence[str], n_experts: int,
                 domains: Sequence[str]) -> np.ndarray:
    """Per-domain expert-frequency vectors, shape ``(n_domains, n_layers · n_experts)``.

    Each row is the domain's selection counts, normalised to sum to one within every layer, and
    the layers are concatenated (column ``layer · n_experts + expert``).
    """
    token_domains = np.asarray(token_domains)
    return np.vstack([layer_shares(expert_counts(expert_ids[token_domains == domain],
                                                 n_experts)).ravel() for domain in domains])


def cosine_matrix(vectors: np.ndarray) -> np.ndarray:
    """Cosine similarity between rows.

    Examples
    --------
    >>> cosine_matrix(np.array([[1.0, 0.0], [1.0, 1.0]])).round(3).tolist()
    [[1.0, 0.707], [0.707, 1.0]]
    """
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    unit = vectors / np.where(norms == 0, 1, norms)
    return unit @ unit.T


def mean_off_diagonal(matrix: np.ndarray) -> float:
    mask = ~np.eye(matrix.shape[0], dtype=bool)
    return float(matrix[mask].mean())


def expert_domain_mutual_information(expert_ids: np.ndarray, token_domains: Sequence[str],
                                     n_experts: int) -> np.ndarray:
    """Mutual information in bits between a selection's expert and its token's domain, per layer.

    Every top-k selection counts once. Balance the token counts per domain first if domains
    differ in size, or the statistic mixes specialisation with class imbalance.

    Returns
    -------
    ndarray of float, shape (n_layers,)

    Examples
    --------
    >>> ids = np.array([[[0]], [[0]], [[1]], [[1]]])     # experts follow the domain exactly
    >>> expert_domain_mutual_information(ids, ["a", "a", "b", "b"], 2).tolist()
    [1.0]
    """
    labels, domain_index = np.unique(np.asarray(token_domains), return_inverse=True)
    information = []
    for layer in range(expert_ids.shape[1]):
        joint = np.zeros((len(labels), n_experts))
        np.add.at(joint, (np.repeat(domain_index, expert_ids.shape[2]),
                          expert_ids[:, layer, :].ravel().astype(np.int64)), 1)
        joint /= joint.sum()
        outer = joint.sum(axis=1, keepdims=True) @ joint.sum(axis=0, keepdims=True)
        nonzero = joint > 0
        information.append(float((joint[nonzero] * np.log2(joint[nonzero] / outer[nonzero]))
                                 .sum()))
    return np.array(information)


def health_summary(expert_ids: np.ndarray, token_domains: Sequence[str], n_experts: int,
                   domains: Sequence[str], min_share: float = 0.2) -> dict[str, object]:
    """The stage-00 checks in one dictionary: starved experts, domain cosine, mutual information."""
    share = expert_share(expert_ids, n_experts)
    similarity = cosine_matrix(domain_usage(expert_ids, token_domains, n_experts, domains))
    return {
        "n_starved_experts": int((share < min_share).sum()),
        "min_expert_share": float(share.min()),
        "max_expert_share": float(share.max()),
        "domain_cosine_mean": mean_off_diagonal(similarity),
        "domain_cosine_min": float(similarity[~np.eye(len(domains), dtype=bool)].min()),
        "mutual_information_bits": expert_domain_mutual_information(
            expert_ids, token_domains, n_experts).tolist(),
    }


def compare_with_control(trained: dict[str, object], control: dict[str, object]) -> pd.DataFrame:
    """A small table: each health statistic for the trained model beside the untrained control."""
    rows = []
    for key in ("n_starved_experts", "min_expert_share", "domain_cosine_mean",
                "domain_cosine_min"):
        rows.append({"statistic": key, "trained": trained[key], "control": control[key]})
    for layer, (mine, theirs) in enumerate(zip(trained["mutual_information_bits"],
                                               control["mutual_information_bits"],
                                               strict=True)):
        rows.append({"statistic": f"mutual_information_bits_layer{layer}",
                     "trained": mine, "control": theirs})
    table = pd.DataFrame(rows)
    table["ratio"] = table["trained"] / table["control"].replace(0, np.nan)
    return table


def verdict(trained: dict[str, object], control: dict[str, object], min_share: float = 0.2,
            information_ratio: float = 1.5) -> dict[str, object]:
    """Plain statements of what emerged in training and what did not, from the numbers.

    Returns a dictionary with boolean checks and ``text``: Markdown for the chapter.
    """
    starved = int(trained["n_starved_experts"])
    cosine_trained = float(trained["domain_cosine_mean"])
    cosine_control = float(control["domain_cosine_mean"])
    ratios = [mine / theirs if theirs > 0 else float("inf") for mine, theirs in
              zip(trained["mutual_information_bits"], control["mutual_information_bits"],
                  strict=True)]
    specific_layers = [layer for layer, ratio in enumerate(ratios) if ratio >= information_ratio]
    checks = {
        "no_starved_experts": starved == 0,
        "more_domain_specific_than_control": cosine_trained < cosine_control,
        "layers_with_mutual_information_above_control": specific_layers,
    }
    lines = []
    if starved == 0:
        lines.append(f"- **Load:** no expert is starved; the least-used expert gets "
                     f"{trained['min_expert_share']:.2f} of its uniform share "
                     f"(threshold {min_share}).")
    else:
        noun = "expert is" if starved == 1 else "experts are"
        lines.append(f"- **Load:** {starved} {noun} starved (below {min_share} of the "
                     "uniform share): read structure in their layers with care.")
    relation = "lower" if checks["more_domain_specific_than_control"] else "not lower"
    lines.append(f"- **Domain similarity:** mean cosine between fields is {cosine_trained:.3f}, "
                 f"{relation} than the untrained control's {cosine_control:.3f}.")
    ratio_text = ", ".join(f"layer {layer}: {ratio:.2f}×" for layer, ratio in enumerate(ratios))
    if specific_layers:
        lines.append(f"- **Mutual information** with the field is at least "
                     f"{information_ratio}× the control's in layers {specific_layers} "
                     f"({ratio_text}).")
    else:
        lines.append(f"- **Mutual information** with the field stays below "
                     f"{information_ratio}× the control's in every layer ({ratio_text}).")
    # Every layer must clear the bar: one field-specific layer does not make the model's
    # routing worth reading, and later chapters read all layers.
    every_layer = len(specific_layers) == len(ratios)
    checks["mutual_information_above_control_in_every_layer"] = every_layer
    healthy = (checks["no_starved_experts"] and checks["more_domain_specific_than_control"]
               and every_layer)
    lines.append("\n**Verdict:** " + (
        f"healthy: routing is balanced and, in every layer, at least {information_ratio}× as "
        "field-specific as the untrained control's; later chapters can read structure into "
        "it, always beside the control." if healthy else
        "not healthy: routing has starved experts, or is not clearly more field-specific than "
        f"the untrained control in every layer (at least {information_ratio}× its mutual "
        "information); later chapters report their structure claims as not judged, since "
        "what they find may reflect vocabulary, not learning."))
    # "healthy" is the verdict later stages read (moecollab.claims.routing_health_passed).
    return {**checks, "healthy": bool(healthy), "mutual_information_ratio": ratios,
            "text": "\n".join(lines)}
