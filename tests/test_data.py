"""Tests of moecollab.data: corpus loading and validation, MCQ items, the dictd/WordNet parsers
and the rebuild of the committed corpus from the Debian packages."""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from moecollab.data import (
    DATA_DIR,
    DOMAINS,
    SPLITS,
    CorpusError,
    load_corpus,
    load_general_text,
    make_mcq_items,
    normalise_headword,
    split_of_headword,
)
from moecollab.data import build_corpus as builder
from moecollab.data.mcq import (
    MAX_DEFINITION_CHARS,
    is_mcq_eligible,
    normalise_definition,
    shorten_definition,
)

# --------------------------------------------------------------------------------------------
# Synthetic corpora
# --------------------------------------------------------------------------------------------


def _headword_in(split: str, stem: str) -> str:
    """A made-up headword whose hash falls in ``split``."""
    for number in range(10_000):
        headword = f"{stem}{number}"
        if split_of_headword(headword) == split:
            return headword
    raise AssertionError("no headword found")  # pragma: no cover


def _rows(domains=DOMAINS, splits=SPLITS) -> list[dict[str, str]]:
    rows = []
    for domain in domains:
        for split in splits:
            headword = _headword_in(split, f"{domain}term")
            rows.append({
                "entry_id": f"gcide-{domain}-{split}",
                "headword": headword,
                "domain": domain,
                "source": "gcide",
                "split": split,
                "text": f"{headword}: a thing studied in {domain}.",
                "definition": f"a thing studied in {domain}.",
            })
    return rows


def _write_corpus(path: Path, lines: list[str | dict]) -> Path:
    payload = "".join((line if isinstance(line, str) else json.dumps(line)) + "\n"
                      for line in lines)
    path.write_bytes(gzip.compress(payload.encode("utf-8")))
    return path


def test_synthetic_corpus_loads(tmp_path):
    corpus = load_corpus(_write_corpus(tmp_path / "corpus.jsonl.gz", _rows()))
    assert list(corpus.columns) == [
        "entry_id", "headword", "domain", "source", "split", "text", "definition"
    ]
    assert len(corpus) == len(DOMAINS) * len(SPLITS)
    # A folder works too, and a subset keeps only the requested domains.
    subset = load_corpus(tmp_path, domains=["law", "history"])
    assert set(subset["domain"]) == {"law", "history"}


def test_malformed_line_is_named(tmp_path):
    lines: list[str | dict] = list(_rows())
    lines.insert(16, '{"entry_id": "broken",')
    path = _write_corpus(tmp_path / "corpus.jsonl.gz", lines)
    with pytest.raises(CorpusError, match=r"corpus .*corpus.jsonl.gz line 17: malformed JSON"):
        load_corpus(path)


def test_missing_field_is_named(tmp_path):
    rows = _rows()
    del rows[3]["definition"]
    path = _write_corpus(tmp_path / "corpus.jsonl.gz", rows)
    with pytest.raises(CorpusError, match=r"line 4: missing required field\(s\) definition"):
        load_corpus(path)


def test_unknown_value_is_named(tmp_path):
    rows = _rows()
    rows[0]["split"] = "dev"
    path = _write_corpus(tmp_path / "corpus.jsonl.gz", rows)
    with pytest.raises(CorpusError, match=r"split 'dev' is not one of train, validation, test"):
        load_corpus(path)


def test_missing_domain_is_named(tmp_path):
    rows = [row for row in _rows() if row["domain"] != "law"]
    path = _write_corpus(tmp_path / "corpus.jsonl.gz", rows)
    with pytest.raises(CorpusError, match=r"corpus is missing domain 'law' \(have: biology, "):
        load_corpus(path)
    # Not asking for law is fine.
    assert "law" not in set(load_corpus(path, domains=["biology"])["domain"])


def test_empty_split_is_named(tmp_path):
    rows = [row for row in _rows() if (row["domain"], row["split"]) != ("law", "test")]
    path = _write_corpus(tmp_path / "corpus.jsonl.gz", rows)
    with pytest.raises(CorpusError, match=r"corpus split 'test' of domain 'law' is empty"):
        load_corpus(path)


def test_unknown_domain_name_lists_allowed(tmp_path):
    path = _write_corpus(tmp_path / "corpus.jsonl.gz", _rows())
    with pytest.raises(CorpusError, match=r"unknown domain 'psychology'; allowed: biology, "):
        load_corpus(path, domains=["law", "psychology"])


def test_missing_file_names_the_builder(tmp_path):
    with pytest.raises(CorpusError, match=r"not found; build it with .*build_corpus"):
        load_corpus(tmp_path / "nothing.jsonl.gz")


def test_corpus_error_is_a_value_error():
    assert issubclass(CorpusError, ValueError)


def test_split_of_headword_is_stable_and_normalised():
    assert split_of_headword("Bill of exchange") == split_of_headword(" bill_of   EXCHANGE ")
    assert normalise_headword(" Bill_of  Exchange") == "bill of exchange"
    splits = Counter(split_of_headword(f"word{number}") for number in range(20_000))
    assert abs(splits["train"] / 20_000 - 0.8) < 0.02
    assert abs(splits["validation"] / 20_000 - 0.1) < 0.01


# --------------------------------------------------------------------------------------------
# The committed corpus
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_corpus() -> pd.DataFrame:
    return load_corpus()


def test_real_corpus_has_every_domain_and_split(real_corpus):
    sizes = real_corpus.groupby(["domain", "split"]).size()
    for domain in DOMAINS:
        assert sizes[domain].sum() >= 800, domain
        for split in SPLITS:
            assert sizes.get((domain, split), 0) > 0, (domain, split)
    assert real_corpus["entry_id"].is_unique
    assert set(real_corpus["source"]) == {"gcide", "foldoc", "wordnet"}


def test_real_corpus_splits_are_disjoint_by_headword(real_corpus):
    keys = real_corpus["headword"].map(normalise_headword)
    splits_per_headword = real_corpus.groupby(keys)["split"].nunique()
    assert splits_per_headword.max() == 1
    assert (real_corpus["split"] == real_corpus["headword"].map(split_of_headword)).all()


def test_general_text_holds_train_headwords_only():
    texts = load_general_text()
    assert len(texts) > 10_000
    with gzip.open(DATA_DIR / "general.jsonl.gz", "rt", encoding="utf-8") as stream:
        headwords = {json.loads(line)["headword"] for line in stream}
    assert {split_of_headword(headword) for headword in headwords} == {"train"}


def test_data_files_fit_the_size_budget():
    total = sum((DATA_DIR / name).stat().st_size
                for name in ("corpus.jsonl.gz", "general.jsonl.gz"))
    assert total <= 8_000_000


# --------------------------------------------------------------------------------------------
# Multiple-choice items
# --------------------------------------------------------------------------------------------

_WORDS = ("amber basalt cobalt dolomite emerald feldspar garnet hematite iolite jasper kyanite "
          "lazurite magnetite nephrite olivine pyrite quartz rutile spinel topaz").split()


def _mcq_corpus(n_per_pool: int = 40) -> pd.DataFrame:
    rows = []
    for domain in ("chemistry", "law"):
        for number in range(n_per_pool):
            first, second = _WORDS[number % 20], _WORDS[(number * 7 + 3) % 20]
            rows.append({
                "entry_id": f"{domain}-{number:03d}",
                "headword": f"Term{domain}{number}",
                "domain": domain,
                "split": "train",
                "definition": f"A {domain} notion combining {first} with {second} number "
                              f"{number}.",
            })
    # Two headwords sharing one definition (synonyms) and one headword with two senses.
    rows.append({**rows[0], "entry_id": "chemistry-dup", "headword": "Synonym"})
    rows.append({**rows[1], "entry_id": "chemistry-sense2",
                 "definition": "A second sense of the first chemistry term, quite different."})
    return pd.DataFrame(rows)


def test_mcq_items_are_well_formed():
    corpus = _mcq_corpus()
    items = make_mcq_items(corpus, n_choices=4, seed=0)
    assert list(items.columns) == [
        "item_id", "domain", "split", "term", "question", "choices", "answer", "entry_id"
    ]
    assert items["item_id"].is_unique
    by_id = corpus.set_index("entry_id")
    owners = corpus.groupby(corpus["definition"].map(normalise_definition))
    for item in items.itertuples():
        assert len(item.choices) == 4
        normalised = [normalise_definition(choice) for choice in item.choices]
        assert len(set(normalised)) == 4, item.choices
        entry = by_id.loc[item.entry_id]
        assert item.term == entry["headword"]
        assert item.choices[item.answer] == shorten_definition(entry["definition"])
        assert item.term in item.question
        for position, choice in enumerate(item.choices):
            if position == item.answer:
                continue
            owner_rows = owners.get_group(normalise_definition(choice))
            assert set(owner_rows["domain"]) == {item.domain}
            assert set(owner_rows["split"]) == {item.split}
            assert item.term not in set(owner_rows["headword"])


def test_mcq_answer_positions_are_balanced():
    items = make_mcq_items(_mcq_corpus(n_per_pool=200), n_choices=4, seed=3)
    for _, pool in items.groupby(["domain", "split"]):
        counts = pool["answer"].value_counts().reindex(range(4), fill_value=0)
        assert counts.max() - counts.min() <= 1, counts.to_dict()


def test_mcq_is_deterministic_for_a_seed():
    corpus = _mcq_corpus()
    first = make_mcq_items(corpus, seed=7)
    again = make_mcq_items(corpus.sample(frac=1.0, random_state=1), seed=7)
    pd.testing.assert_frame_equal(first, again)
    other = make_mcq_items(corpus, seed=8)
    assert not first["choices"].equals(other["choices"])


def test_mcq_max_items_and_n_choices():
    items = make_mcq_items(_mcq_corpus(), n_choices=3, max_items_per_domain_split=5)
    assert items.groupby("domain").size().to_dict() == {"chemistry": 5, "law": 5}
    assert items["choices"].map(len).eq(3).all()
    with pytest.raises(ValueError, match=r"n_choices must be an int >= 2; got 1"):
        make_mcq_items(_mcq_corpus(), n_choices=1)


def test_mcq_eligibility_rules():
    assert is_mcq_eligible("Elaiometer", "An apparatus for determining the amount of oil.")
    assert not is_mcq_eligible("Acidimeter", "An instrument used in acidimetry of solutions.")
    assert not is_mcq_eligible("sperm whale", "a large whale with a cavity in its head")
    assert not is_mcq_eligible("Gneiss", "A layered rock.")  # under four words
    assert shorten_definition("(economics) the study of scarce goods") == (
        "the study of scarce goods")
    long_definition = "word " * 200
    shortened = shorten_definition(long_definition)
    assert len(shortened) <= MAX_DEFINITION_CHARS and shortened.endswith("word...")


def test_mcq_on_the_real_corpus(real_corpus):
    law = real_corpus[real_corpus["domain"] == "law"]
    items = make_mcq_items(law, n_choices=4, seed=0)
    assert len(items) > 1000
    assert set(items["split"]) == set(SPLITS)
    assert items["choices"].map(lambda c: len({normalise_definition(x) for x in c})).eq(4).all()
    shares = items["answer"].value_counts(normalize=True)
    assert (shares - 0.25).abs().max() < 0.01


# --------------------------------------------------------------------------------------------
# Parsers
# --------------------------------------------------------------------------------------------


def _dictd_number(value: int) -> str:
    digits = ""
    while True:
        digits = builder.DIGITS[value % 64] + digits
        value //= 64
        if value == 0:
            return digits


def test_dictd_base64_numbers():
    assert builder.dictd_int("A") == 0
    assert builder.dictd_int("B") == 1
    assert builder.dictd_int("BA") == 64
    assert builder.dictd_int("/") == 63
    assert builder.dictd_int("r5iN") == ((43 * 64 + 57) * 64 + 34) * 64 + 13
    for value in (0, 5, 64, 4095, 123_456_789):
        assert builder.dictd_int(_dictd_number(value)) == value
    with pytest.raises(ValueError, match="not a dictd base-64 number"):
        builder.dictd_int("a-b")


def test_read_dictd_articles_deduplicates_keys(tmp_path):
    articles = ["00-database-info\n   About this file.\n",
                "Alpha \\Al\"pha\\, n. (Math.)\n   The first of something, in order.\n",
                "Beta \\Be\"ta\\, n.\n   The second of something, in order.\n"]
    blob = "".join(articles).encode("utf-8")
    offsets, position = [], 0
    for article in articles:
        offsets.append((position, len(article.encode("utf-8"))))
        position += len(article.encode("utf-8"))
    index_lines = [
        f"00-database-info\t{_dictd_number(offsets[0][0])}\t{_dictd_number(offsets[0][1])}",
        f"alpha\t{_dictd_number(offsets[1][0])}\t{_dictd_number(offsets[1][1])}",
        f"Alpha\t{_dictd_number(offsets[1][0])}\t{_dictd_number(offsets[1][1])}",
        f"beta\t{_dictd_number(offsets[2][0])}\t{_dictd_number(offsets[2][1])}",
    ]
    (tmp_path / "toy.index").write_text("\n".join(index_lines) + "\n")
    (tmp_path / "toy.dict.dz").write_bytes(gzip.compress(blob))
    read = list(builder.read_dictd_articles(tmp_path / "toy.index", tmp_path / "toy.dict.dz"))
    assert read == articles[1:]


GCIDE_ARTICLE = """\
Acid \\Ac"id\\, n. [L. acidus sour.
   Cf. {Acute}.]
   1. A sour substance.
      [1913 Webster]

   2. (Chem.) One of a class of compounds, generally but not
      always distinguished by their sour taste. --Ure.
      [1913 Webster]

   Note: In certain cases, sulphur may take the place of oxygen.
         [1913 Webster]

            He was stern and his face as acid as ever. --A.
                                                  Trollope.
      [1913 Webster]

   3. (Zo["o]l.)
      (a) A small sour-smelling animal of the northern woods.
      (b) See {Acetous}.
      [1913 Webster]

   Syn. -- Sour; tart; sharp.
        [1913 Webster]

   {Acid test} (Metal.), a test for gold by means of nitric acid.
      [1913 Webster]

   {Acid of sugar}. Same as {Oxalic acid}.
      [1913 Webster]
"""


def test_parse_gcide_article_units_labels_and_drops():
    senses = builder.parse_gcide_article(GCIDE_ARTICLE)
    by_definition = {sense.definition: sense for sense in senses}
    assert set(by_definition) == {
        "A sour substance.",
        "One of a class of compounds, generally but not always distinguished by their sour "
        "taste.",
        "A small sour-smelling animal of the northern woods.",
        "a test for gold by means of nitric acid.",
    }
    chem = by_definition["One of a class of compounds, generally but not always distinguished "
                         "by their sour taste."]
    assert chem.headword == "Acid" and chem.label == "Chem."
    assert chem.text.startswith("Acid: One of a class")
    assert chem.text.endswith("Note: In certain cases, sulphur may take the place of oxygen.")
    assert "Trollope" not in " ".join(sense.text for sense in senses)  # quotation dropped
    assert "Sour; tart" not in " ".join(sense.text for sense in senses)  # Syn. dropped
    # The lettered sub-sense inherits its parent's label; the phrase has its own.
    assert by_definition["A small sour-smelling animal of the northern woods."].label == 'Zo["o]l.'
    phrase = by_definition["a test for gold by means of nitric acid."]
    assert (phrase.headword, phrase.label) == ("Acid test", "Metal.")
    assert by_definition["A sour substance."].label is None


def test_header_label_applies_to_the_whole_entry():
    article = ("Aciculite \\A*cic\"u*lite\\, n. (Min.)\n   Needle ore of the mines. --Brande.\n"
               "   [1913 Webster]\n")
    (sense,) = builder.parse_gcide_article(article)
    assert (sense.headword, sense.label, sense.definition) == (
        "Aciculite", "Min.", "Needle ore of the mines.")


def test_cross_references_are_dropped():
    assert builder.is_cross_reference("See under Adventure.")
    assert builder.is_cross_reference("Same as Olein.")
    assert builder.is_cross_reference("Pl. of Datum.")
    assert not builder.is_cross_reference("A seed of the ash tree.")
    article = "Olein \\O\"le*in\\, n. (Chem.)\n   Same as {Triolein}.\n   [1913 Webster]\n"
    assert builder.parse_gcide_article(article) == []


@pytest.mark.parametrize(
    ("label", "domain"),
    [
        ("Zo[\"o]l.", "biology"), ("Bot.", "biology"), ("Chem.", "chemistry"),
        ("Physiol. Chem.", "chemistry"), ("Med.", "medicine"), ("Anat.", "medicine"),
        ("Law", "law"), ("O. Eng. Law", "law"), ("Lawn Tennis", None),
        ("Eccl. Hist.", "history"), ("Her.", "history"), ("Herpetol.", "biology"),
        ("Eccl.", "philosophy"), ("R. C. Ch.", "philosophy"), ("Math.", "mathematics"),
        ("Geom.", "mathematics"), ("Computers", "computer_science"), ("Arch.", "engineering"),
        ("Archery", None), ("Mach.", "engineering"), ("Physics", "physics"),
        ("Astron.", "physics"), ("Naut.", None), ("Mus.", None), ("Polit. Econ.", None),
        ("Chem. & Physics", "chemistry"), ("Naut. & Law", "law"), ("Com. & Law", "law"),
    ],
)
def test_label_to_domain(label, domain):
    assert builder.domain_of_label(label) == domain


def test_label_normalisation_and_accent_codes():
    assert builder.normalise_label(" Zo[\"o]l. ") == "zool"
    assert builder.normalise_label("Chem.  &  Physics.") == "chem. & physics"
    assert builder.fold_accent_codes("caf['e], [ae]ther, pi[~n]on, Ar[=a]b") == (
        "cafe, aether, pinon, Arab")


def test_parse_foldoc_article():
    article = ("Amdahl's Law\n\n   <parallel> (Named after {Gene Amdahl}) If F is the fraction "
               "of a\n   calculation that is sequential, the speedup is bounded.\n\n"
               "   {(http://example.org/)}.\n\n   (2002-10-16)\n")
    sense = builder.parse_foldoc_article(article)
    assert sense.headword == "Amdahl's Law"
    assert sense.label == "parallel"
    assert sense.definition == ("(Named after Gene Amdahl) If F is the fraction of a "
                                "calculation that is sequential, the speedup is bounded.")
    assert "2002" not in sense.text and "http" not in sense.text
    assert builder.parse_foldoc_article("ANSI\n\n   <body> See {American National "
                                        "Standards Institute}.\n\n   (1995-01-01)\n") is None


def test_wordnet_topics_map_through_hypernyms():
    lines = [
        "  1 This software and database is being provided to you",
        "00000001 03 n 01 discipline 0 000 | a branch of knowledge",
        "00000002 09 n 01 law 0 001 @ 00000001 n 0000 | the collection of rules",
        "00000003 09 n 01 criminal_law 0 001 @ 00000002 n 0000 | the body of law of crimes",
        "00000004 10 n 02 summons 0 process 0 002 @ 00000001 n 0000 ;c 00000003 n 0000 "
        "| (law) a writ issued by authority of law; \"he got a summons\"",
        "00000005 05 n 01 aardvark 0 000 | nocturnal burrowing mammal of Africa",
        "00000006 04 n 01 dripping 0 001 @ 00000001 n 0000 | fat from roasting meat",
    ]
    synsets = {s.key: s for s in map(builder.parse_wordnet_line, lines) if s is not None}
    assert len(synsets) == 6
    assert builder.topic_domain("00000003n", synsets) == "law"
    labelled = dict((sense.headword, (domain, sense))
                    for domain, sense in builder.wordnet_senses(synsets))
    assert set(labelled) == {"summons", "aardvark"}  # lexfile 05 = noun.animal -> biology
    domain, summons = labelled["summons"]
    assert domain == "law"
    assert summons.definition == "a writ issued by authority of law"
    assert "(law)" not in summons.text
    assert labelled["aardvark"][0] == "biology"


def test_missing_package_gives_one_clear_line(monkeypatch):
    if shutil.which("dpkg") is None:
        pytest.skip("dpkg not available: not a Debian system")
    monkeypatch.setattr(builder, "SOURCE_FILES", {"no-such-package-moecollab": ("x.index",)})
    with pytest.raises(builder.BuildError,
                       match=r"package no-such-package-moecollab is not installed .*apt-get "
                             r"install -y --no-install-recommends no-such-package-moecollab"):
        builder.locate_sources()


# --------------------------------------------------------------------------------------------
# Rebuild from the installed packages
# --------------------------------------------------------------------------------------------


def _installed(package: str) -> bool:
    if shutil.which("dpkg-query") is None:
        return False
    result = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package],
                            capture_output=True, text=True, check=False)
    return result.returncode == 0 and "install ok installed" in result.stdout


@pytest.mark.slow
def test_rebuild_matches_committed_hashes():
    for package in builder.PACKAGES:
        if not _installed(package):
            pytest.skip(f"{package} not installed: apt-get install -y "
                        f"--no-install-recommends {' '.join(builder.PACKAGES)}")
    assert builder.check_corpus(DATA_DIR) == []


def test_check_names_hand_edited_files(tmp_path, monkeypatch):
    data_copy = tmp_path / "data"
    shutil.copytree(DATA_DIR, data_copy)
    committed = json.loads((data_copy / "PROVENANCE.json").read_text())
    # Stand in for the (slow) rebuild: it reproduces the committed provenance exactly.
    monkeypatch.setattr(builder, "build_corpus", lambda out_dir: committed)
    assert builder.check_corpus(data_copy) == []
    with open(data_copy / "README.md", "a") as stream:
        stream.write("edited by hand\n")
    (problem,) = builder.check_corpus(data_copy)
    assert problem.startswith("file README.md: PROVENANCE.json says ")
