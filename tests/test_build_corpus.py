"""Tests of moecollab.build.corpus: the dictd/GCIDE/FOLDOC/WordNet parsers and the rebuild of the
committed corpus from the Debian packages."""

from __future__ import annotations

import ast
import gzip
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from moecollab.build import corpus as builder
from moecollab.data import DATA_DIR

PACKAGE = Path(builder.__file__).resolve().parents[1]   # src/moecollab

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


def test_the_study_never_imports_the_build_tools():
    # moecollab.build makes data/ once; the stages read what it wrote through moecollab.data.
    importers = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if (PACKAGE / "build") in path.parents:
            continue
        package = path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = package[:len(package) - node.level + 1] if node.level else ()
                names = [".".join((*base, *(node.module.split(".") if node.module else ())))]
                names += [f"{names[0]}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            if any(name == "moecollab.build" or name.startswith("moecollab.build.")
                   for name in names):
                importers.append(str(path.relative_to(PACKAGE)))
    assert importers == []
