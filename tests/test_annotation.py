"""Tests of moecollab.annotation on a planted corpus whose right answers are known: three
domains with their own vocabularies, level-1 codes planted so that atom 0 handles law words,
atom 1 chemistry words and atom 2 the digits of finance text, and shared filler tokens with
all-zero codes (unassigned)."""

import re

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from moecollab import plotting
from moecollab.annotation import (
    UNASSIGNED,
    assign_atoms,
    atom_colours,
    atom_experts,
    atom_statistics,
    domain_purity,
    enrichment_matrix,
    label_atoms,
    pick_passages,
    piece_kinds,
    random_purity,
    recognisable_atoms,
    render_passages_html,
)

matplotlib.use("Agg")

VOCABULARY = {
    "law": [" writ", " court", " suit", " plaintiff", " statute"],
    "chem": [" acid", " reacts", " molecule", " ion", " bond"],
    "finance": [str(digit) for digit in range(10)],
}
PLANTED_ATOM = {"law": 0, "chem": 1, "finance": 2}
FILLER = [" the", " <b>", " &"]  # in every domain, all-zero codes
SUB_ATOM_OF = {" writ": 0, " court": 0, " suit": 1, " plaintiff": 1, " statute": 1,
               " acid": 2, " reacts": 2, " molecule": 3, " ion": 3, " bond": 3}
N_SEQUENCES, SEQ_LEN = 12, 30


@pytest.fixture(scope="module")
def corpus():
    """Tokens, planted level-1/level-2 codes, the hierarchy and the planted answers."""
    rng = np.random.default_rng(0)
    rows = []
    for domain_index, domain in enumerate(VOCABULARY):
        for sequence in range(N_SEQUENCES):
            for position in range(SEQ_LEN):
                own = rng.random() < 0.7
                piece = rng.choice(VOCABULARY[domain] if own else FILLER)
                rows.append((str(piece), domain_index * N_SEQUENCES + sequence, position, domain,
                             PLANTED_ATOM[domain] if own else UNASSIGNED))
    tokens = pd.DataFrame(rows, columns=["text_piece", "sequence_index", "position", "domain",
                                         "planted"])
    n_tokens = len(tokens)
    planted = tokens["planted"].to_numpy()
    level1 = np.zeros((n_tokens, 4))
    assigned = planted != UNASSIGNED
    level1[assigned] = 0.1 * rng.random((assigned.sum(), 4))  # weak codes on other atoms
    level1[assigned, planted[assigned]] = 0.5 + 0.5 * rng.random(assigned.sum())
    hierarchy = np.zeros((4, 6))
    hierarchy[0, [0, 1]] = [1.0, 0.5]
    hierarchy[1, [2, 3]] = [0.8, 1.0]
    hierarchy[2, [4, 5]] = [1.0, 0.9]
    hierarchy[0, 5] = 0.01  # below child_ratio: not a child of atom 0
    planted_sub = np.array([SUB_ATOM_OF.get(piece, 4 if p == 2 else UNASSIGNED)
                            for piece, p in zip(tokens["text_piece"], planted, strict=True)])
    level2 = np.zeros((n_tokens, 6))
    level2[assigned] = 0.05 * rng.random((assigned.sum(), 6))
    level2[assigned, planted_sub[assigned]] = 0.6
    level2[planted == 0, 5] = 2.0  # strongest overall, but not a child of atom 0
    return {"tokens": tokens, "level1": level1, "level2": level2, "hierarchy": hierarchy,
            "planted": planted, "planted_sub": planted_sub}


@pytest.fixture(scope="module")
def assignment(corpus):
    return assign_atoms(corpus["level1"], corpus["hierarchy"], level2_codes=corpus["level2"])


@pytest.fixture(scope="module")
def statistics(corpus, assignment):
    return atom_statistics(assignment, corpus["tokens"], n_top=5, context=3)


@pytest.fixture(scope="module")
def labels(statistics):
    return label_atoms(statistics)


# ---- assignment -------------------------------------------------------------------------------


def test_assign_atoms_recovers_planted_atoms_and_counts_unassigned(corpus, assignment):
    np.testing.assert_array_equal(assignment["atom"], corpus["planted"])
    n_filler = int((corpus["planted"] == UNASSIGNED).sum())
    assert assignment.attrs["n_unassigned"] == n_filler > 0
    assert (assignment.loc[assignment["atom"] == UNASSIGNED, "strength"] == 0).all()
    assert (assignment.loc[assignment["atom"] >= 0, "strength"] >= 0.5).all()


def test_sub_atoms_are_argmax_among_children_only(corpus, assignment):
    np.testing.assert_array_equal(assignment["sub_atom"], corpus["planted_sub"])
    assert 5 not in set(assignment.loc[assignment["atom"] == 0, "sub_atom"])
    assert assignment.attrs["n_sub_unassigned"] == assignment.attrs["n_unassigned"]


def test_default_level2_codes_compose_the_hierarchy(corpus):
    table = assign_atoms(corpus["level1"], corpus["hierarchy"])
    # level-2 code = level-1 code @ hierarchy, so the biggest child of the row wins.
    expected = np.select([table["atom"] == 0, table["atom"] == 1, table["atom"] == 2],
                         [0, 3, 4], UNASSIGNED)
    assert (table["sub_atom"] == expected).mean() > 0.95  # weak off-atom codes may tip a few
    assert set(table.loc[table["atom"] == 0, "sub_atom"]) <= {0, 1}
    no_level2 = assign_atoms(corpus["level1"])
    assert (no_level2["sub_atom"] == UNASSIGNED).all()


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"child_ratio": 1.5}, "child_ratio"),
    ({"hierarchy": np.ones((3, 2))}, "hierarchy"),
    ({"level2_codes": np.ones((2, 2))}, "level2_codes"),
])
def test_assign_atoms_errors_name_the_parameter(kwargs, match):
    with pytest.raises(ValueError, match=match):
        assign_atoms(np.ones((4, 2)), **kwargs)


# ---- statistics and labels --------------------------------------------------------------------


def test_sizes_and_top_tokens(corpus, statistics):
    sizes = statistics.sizes.set_index("atom")["n_tokens"]
    planted = pd.Series(corpus["planted"]).value_counts()
    assert sizes.to_dict() == planted.to_dict()
    assert statistics.n_unassigned == planted[UNASSIGNED]
    for domain, atom in PLANTED_ATOM.items():
        top = statistics.top_tokens.loc[statistics.top_tokens["atom"] == atom, "piece"]
        enriched = statistics.enriched_tokens.loc[statistics.enriched_tokens["atom"] == atom,
                                                  "piece"]
        assert len(top) == 5 and set(top) <= set(VOCABULARY[domain])
        assert len(enriched) == 5 and set(enriched) <= set(VOCABULARY[domain])
    assert (statistics.enriched_tokens["z"] > 0).all()


def test_domain_enrichment_has_the_right_sign_and_significance(statistics):
    table = statistics.domain_enrichment.set_index(["atom", "domain"])
    for domain, atom in PLANTED_ATOM.items():
        own = table.loc[(atom, domain)]
        assert own["log_odds"] > 0 and own["z"] > 3 and own["significant"]
        assert own["atom_share"] == pytest.approx(1.0)
        for other in set(VOCABULARY) - {domain}:
            row = table.loc[(atom, other)]
            assert row["log_odds"] < 0 and row["z"] < 0 and not row["significant"]
            assert row["p_value"] == pytest.approx(1.0)
    matrix = enrichment_matrix(statistics)
    assert matrix.shape == (3, 3) and (np.diag(matrix.loc[[0, 1, 2], list(VOCABULARY)]) > 0).all()


def test_labels_name_domain_and_tokens(statistics, labels):
    by_atom = labels.set_index("atom")
    for domain, atom in PLANTED_ATOM.items():
        label = by_atom.loc[atom, "label"]
        assert label.startswith(domain + " · ")
        assert by_atom.loc[atom, "domain"] == domain
        named = by_atom.loc[atom, "tokens"]
        assert len(named) == 3 and set(named) <= set(VOCABULARY[domain])
        for piece in named:
            assert f"'{piece.strip()}'" in label
        assert 0.5 < by_atom.loc[atom, "confidence"] <= 1.0
    assert "digits" in by_atom.loc[2, "label"] and by_atom.loc[2, "kind"] == "digit"
    assert by_atom.loc[0, "kind"] == ""  # word-initial is not named beside a domain


def test_labels_lead_with_what_dominates_and_flag_weak_fields():
    # Atom 0 is morphology ('ing', 's', 'ed') with a slight excess of law; atom 1 is plain law
    # words; atom 2 mixes every field. Law is significantly over-represented in atom 0 (39%
    # against 25% overall) but weakly: the token kind leads and the field is flagged as weak.
    rng = np.random.default_rng(0)
    fields = ["law", "chem", "bio", "art"]
    rows = []
    for _ in range(400):  # atom 0
        field = "law" if rng.random() < 0.19 else fields[rng.integers(4)]
        rows.append((0, rng.choice(["ing", "s", "ed"]), field))
    for _ in range(150):  # atom 1
        rows.append((1, rng.choice([" court", " statute", " writ"]), "law"))
    for _ in range(600):  # atom 2
        rows.append((2, rng.choice([" the", " of", " a", " it"]), fields[rng.integers(1, 4)]))
    atoms = np.array([row[0] for row in rows])
    tokens = pd.DataFrame({"text_piece": [row[1] for row in rows],
                           "domain": [row[2] for row in rows]})
    labels = label_atoms(atom_statistics(atoms, tokens, n_examples=0)).set_index("atom")
    morphology = labels.loc[0]
    assert morphology["leads"] == "kind" and morphology["kind"] == "continuation"
    assert morphology["label"].startswith("sub-word continuations · ")
    assert morphology["field_strength"] == "weak"
    assert morphology["label"].endswith(" · weak law enrichment")
    assert labels.loc[1, "leads"] == "field" and labels.loc[1, "field_strength"] == "strong"
    assert labels.loc[1, "label"].startswith("law · ")
    # Whole words of every field: word position leads the label, but says nothing
    # recognisable about the atom.
    assert labels.loc[2, "kind"] == "word_initial"
    assert recognisable_atoms(labels.reset_index()).tolist() == [True, True, False]
    with pytest.raises(ValueError, match="strong_field_excess"):
        label_atoms(atom_statistics(atoms, tokens, n_examples=0), strong_field_excess=1.5)


def test_token_mix_and_piece_kinds(statistics):
    mix = statistics.token_mix.set_index("atom")
    assert mix.loc[2, "digit_share"] == 1.0
    assert mix.loc[0, "word_initial_share"] == 1.0
    kinds = piece_kinds([" the", "ing", "2024", "...", " \n", "</s>", "(the"])
    assert kinds.tolist() == ["word_initial", "continuation", "digit", "punctuation",
                              "whitespace", "special", "punctuation"]


def test_labels_without_domain_use_the_token_mix():
    tokens = pd.DataFrame({"text_piece": ["ing", "ed", ",", "."] * 30,
                           "domain": np.repeat(["a", "b", "c"], 40)})
    atoms = np.tile([0, 0, 1, 1], 30)
    found = label_atoms(atom_statistics(atoms, tokens, n_examples=0)).set_index("atom")
    assert found.loc[0, "label"].startswith("sub-word continuations · ")
    assert found.loc[1, "label"].startswith("punctuation · ")
    assert (found["domain"] == "").all()
    mixed = label_atoms(atom_statistics(np.zeros(120, int), tokens, n_examples=0))
    assert mixed.loc[0, "label"].startswith("mixed · ")
    assert mixed.loc[0, "confidence"] < 0.5
    # A kind that fills every atom (plain words) describes none of them.
    words = pd.DataFrame({"text_piece": [" a", " b", " c", " d"] * 30,
                          "domain": np.repeat(["a", "b", "c"], 40)})
    plain = label_atoms(atom_statistics(np.tile([0, 0, 1, 1], 30), words, n_examples=0))
    assert plain["label"].str.startswith("mixed · ").all() and (plain["kind"] == "").all()


def test_contexts_mark_the_token_in_its_text(corpus, statistics):
    tokens = corpus["tokens"]
    contexts = statistics.contexts
    assert set(contexts["atom"]) == {0, 1, 2}
    assert (contexts.groupby("atom").size() == 3).all()
    for row in contexts.itertuples():
        piece = row.piece.strip()
        assert f"⟦{piece}⟧" in row.context
        sequence = tokens[tokens["sequence_index"] == row.sequence_index].set_index("position")
        window = range(max(row.position - 3, 0), min(row.position + 4, SEQ_LEN))
        text = "".join(sequence.loc[p, "text_piece"] if p != row.position
                       else row.piece.replace(piece, f"⟦{piece}⟧") for p in window)
        assert text in row.context
        assert row.context.startswith("… ") == (row.position > 3)
        assert row.context.endswith(" …") == (row.position < SEQ_LEN - 4)


def test_atom_experts_maps_columns_to_layers():
    dictionary = np.array([[0.0, 0.2, 0.0, 0.9, 0.5, 0.0], [0.0] * 6])
    table = atom_experts(dictionary, n_experts=3, top=2)
    assert table[["atom", "layer", "expert", "weight"]].to_numpy().tolist() == [
        [0, 1, 0, 0.9], [0, 1, 1, 0.5]]
    uneven = atom_experts(dictionary, n_experts=[2, 4], top=3)
    assert uneven[["layer", "expert"]].to_numpy().tolist() == [[1, 1], [1, 2], [0, 1]]
    with pytest.raises(ValueError, match="n_experts"):
        atom_experts(dictionary, n_experts=4)


# ---- purity -----------------------------------------------------------------------------------


def test_planted_purity_is_one_and_far_above_random(corpus, assignment):
    domains = corpus["tokens"]["domain"]
    assert domain_purity(assignment, domains) == pytest.approx(1.0)
    baseline = random_purity(assignment, domains, n_repeats=50, random_state=0)
    assert baseline["mean"] < 0.45 and baseline["std"] < 0.05
    assert baseline == random_purity(assignment, domains, n_repeats=50, random_state=0)
    level2 = domain_purity(assignment, domains, atom_column="sub_atom")
    assert level2 == pytest.approx(1.0)


# ---- rendering --------------------------------------------------------------------------------


def test_pick_passages_draws_per_domain(corpus, assignment):
    tokens = corpus["tokens"]
    passages = pick_passages(tokens, assignment, n_per_domain=2, length=10, random_state=0)
    assert len(passages) == 6
    domain_of = tokens.groupby("sequence_index")["domain"].first()
    assert [domain_of[p[0]] for p in passages] == ["law"] * 2 + ["chem"] * 2 + ["finance"] * 2
    assert all(end - start == 10 and 0 <= start and end <= SEQ_LEN for _, start, end in passages)
    assert passages == pick_passages(tokens, assignment, n_per_domain=2, length=10,
                                     random_state=0)


def test_html_colours_every_token_and_escapes(corpus, assignment, labels):
    tokens = corpus["tokens"]
    passages = pick_passages(tokens, assignment, n_per_domain=2, length=20, random_state=1)
    page = render_passages_html(tokens, assignment, labels, passages)
    spans = re.findall(r'<span data-atom="(-?\d+)" style="background:(#[0-9a-f]{6});'
                       r'color:(#[0-9a-f]{6});[^"]*" title="([^"]*)">([^<]*)</span>', page)
    assert len(spans) == 20 * len(passages)
    colours = atom_colours([-1, 0, 1, 2])
    expected_text = []
    for sequence_index, start, end in passages:
        window = tokens[(tokens["sequence_index"] == sequence_index)
                        & tokens["position"].between(start, end - 1)]
        expected_text += window["text_piece"].tolist()
        expected_atoms = assignment.loc[window.index, "atom"].tolist()
        assert expected_atoms  # passages are aligned with the tokens table
    for atom, background, text_colour, title, _ in spans:
        assert background == colours[int(atom)]["background"]
        assert text_colour == colours[int(atom)]["color"]
        assert title.startswith("unassigned" if atom == "-1" else f"atom {atom}: ")
    shown = [text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
             for *_, text in spans]
    assert shown == expected_text
    assert "&lt;b&gt;" in page and " &amp;<" in page and " <b>" not in page
    assert "white-space:pre-wrap" in page and "Atoms shown" in page
    assert not re.search(r"<(script|link|img)|https?:", page)


def test_colours_have_readable_text_and_grey_unassigned():
    colours = atom_colours(range(-1, 25))
    assert colours[-1]["background"] == "#e6e6e6"
    assert colours[0]["background"] == colours[10]["background"]
    assert colours[0]["border"] != colours[10]["border"]  # the second cycle is underlined
    assert all(c["color"] in ("#000000", "#ffffff") for c in colours.values())


# ---- figures ----------------------------------------------------------------------------------


def test_figures_are_figures(corpus, assignment, statistics, labels):
    sizes1 = np.bincount(assignment.loc[assignment["atom"] >= 0, "atom"], minlength=4)
    sizes2 = np.bincount(assignment.loc[assignment["sub_atom"] >= 0, "sub_atom"], minlength=6)
    labels1 = dict(zip(labels["atom"], labels["label"], strict=True))
    figures = [
        plotting.atom_tree(corpus["hierarchy"], labels, None, sizes1, sizes2, max_parents=2),
        plotting.atom_tree(corpus["hierarchy"], labels1, [f"sub {i}" for i in range(6)]),
        plotting.atom_tree(np.random.default_rng(0).random((24, 48)), max_parents=16),
        plotting.atom_domain_heatmap(enrichment_matrix(statistics),
                                     enrichment_matrix(statistics, "significant"),
                                     row_labels=labels),
        plotting.purity_vs_random([1.0, 0.9], [0.4, 0.35], [0.01, 0.02]),
    ]
    try:
        assert all(isinstance(figure, Figure) for figure in figures)
        assert "the 2 largest of 4" in figures[0].axes[0].get_title()
    finally:
        for figure in figures:
            plt.close(figure)
