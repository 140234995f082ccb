"""The smoke book as a reader sees it, opened in a real headless browser.

Debian's ``chromium`` with ``chromium-driver`` (``make test`` installs them when missing; on a
machine with Google Chrome and its chromedriver those work too), driven by selenium. Every
chapter page is loaded as a reader would open ``_build/html/index.html``; the book is the one
``tests/conftest.py`` builds for the other smoke tests, so this adds only the browser's time.

To check a book built by hand instead (the default profile's, after ``make study``)::

    MOECOLLAB_BOOK=_build/html .venv/bin/python -m pytest tests/test_book_in_browser.py

(``MOECOLLAB_ARTIFACTS`` names its artifacts folder when it is not ``artifacts``.)
"""

import os
import re
import shutil
from importlib.metadata import version
from pathlib import Path
from urllib.parse import unquote, urlparse

import nbformat
import pytest

from moecollab.stages import STAGES

ROOT = Path(__file__).resolve().parents[1]
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
RUN_INTERNAL = (".partial-", ".tmp.ipynb")
FIGURE_DIRECTIVE = re.compile(r"^(`{3,}|:{3,})\{glue:figure\}\s+(\S+)", re.MULTILINE)

FIGURES_ON_PAGE = """
return Array.from(document.querySelectorAll('figure')).map(figure => {
  const image = figure.querySelector('img');
  return {id: figure.id, src: image && image.getAttribute('src'),
          loaded: !!image && image.complete && image.naturalWidth > 0,
          data: Array.from(figure.querySelectorAll('a.download')).map(a => a.href)};
});
"""
TABLE_ROWS = """
return Array.from(document.querySelectorAll('table tbody tr')).map(row =>
  Array.from(row.cells).map(cell => cell.innerText.trim()));
"""
IMAGES_ON_PAGE = """
return Array.from(document.images).map(image =>
  ({src: image.getAttribute('src'), loaded: image.complete && image.naturalWidth > 0}));
"""


@pytest.fixture(scope="module")
def built_book(request) -> tuple[Path, Path]:
    """The book's index page and the artifacts folder it was built from."""
    given = os.environ.get("MOECOLLAB_BOOK")
    if given:
        artifacts = os.environ.get("MOECOLLAB_ARTIFACTS", str(ROOT / "artifacts"))
        return Path(given).resolve() / "index.html", Path(artifacts).resolve()
    return request.getfixturevalue("smoke_book"), request.getfixturevalue("smoke_artifacts")


@pytest.fixture(scope="module")
def browser():
    binary = os.environ.get("MOECOLLAB_BROWSER") or next(
        (shutil.which(name) for name in BROWSERS if shutil.which(name)), None)
    driver_path = shutil.which("chromedriver")
    if binary is None or driver_path is None:
        pytest.fail("the browser test needs chromium and chromedriver; `make browser` installs "
                    "Debian's chromium and chromium-driver", pytrace=False)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-dev-shm-usage", "--window-size=1400,2400"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def chapter_page(index: Path, stage) -> Path:
    return index.parent / "book" / "notebooks" / f"{stage.name}.html"


def local_file(url: str) -> Path:
    return Path(unquote(urlparse(url).path))


@pytest.mark.parametrize("stage", STAGES, ids=[stage.name for stage in STAGES])
def test_every_glued_figure_is_an_image_that_loaded_with_its_data_beside_it(
        browser, built_book, stage):
    index, _ = built_book
    glued = [key for _, key in FIGURE_DIRECTIVE.findall((ROOT / stage.notebook).read_text())]
    assert glued, f"{stage.name} glues no figure"
    browser.get(chapter_page(index, stage).as_uri())
    figures = browser.execute_script(FIGURES_ON_PAGE)
    shown = [figure for figure in figures if figure["src"]]
    assert len(shown) == len(glued), (glued, figures)
    for figure in shown:
        assert figure["loaded"], f"{stage.name}: {figure['src']} did not load"
        assert len(figure["data"]) == 1, f"{stage.name}: {figure['id']} links no data file"
        (data_link,) = figure["data"]
        assert data_link.endswith(".csv") and local_file(data_link).is_file(), figure
    for image in browser.execute_script(IMAGES_ON_PAGE):
        assert image["loaded"], f"{stage.name}: {image['src']} did not load"
    text = browser.execute_script("return document.body.innerText;")
    assert "<Figure size" not in text
    assert "Parameters of this run." in text


def test_no_page_shows_a_machine_path_a_run_internal_name_or_a_broken_image(
        browser, built_book):
    index, artifacts = built_book
    forbidden = (str(ROOT), str(artifacts), *RUN_INTERNAL)
    html = index.parent
    pages = [html / "index.html", *sorted((html / "book").rglob("*.html"))]
    for page in pages:  # what the browser renders
        browser.get(page.as_uri())
        name = page.relative_to(html)
        assert not [text for text in forbidden if text in browser.page_source], name
        text = browser.execute_script("return document.body.innerText;")
        assert "<Figure size" not in text, name
        for image in browser.execute_script(IMAGES_ON_PAGE):
            assert image["loaded"], f"{name}: {image['src']} did not load"
    downloads = sorted((html / "_sources").rglob("*.ipynb"))
    assert len(downloads) == len(STAGES)
    for path in [*downloads, html / "searchindex.js"]:  # what a reader downloads or searches
        content = path.read_text(errors="replace")
        assert not [text for text in forbidden if text in content], path.relative_to(html)


def test_each_chapter_downloads_as_a_clean_notebook(browser, built_book):
    index, _ = built_book
    for stage in STAGES:
        browser.get(chapter_page(index, stage).as_uri())
        links = browser.execute_script(
            "return Array.from(document.querySelectorAll('a')).map(a => a.href)"
            ".filter(href => href.endsWith('.ipynb'));")
        (download,) = {link for link in links if "_sources" in link}
        chapter = nbformat.read(local_file(download), as_version=4)
        tags = [tag for cell in chapter.cells for tag in cell.metadata.get("tags", [])]
        assert "injected-parameters" not in tags and "run-parameters" in tags


def test_the_status_page_lists_each_chapter_with_date_time_and_versions(browser, built_book):
    index, _ = built_book
    browser.get((index.parent / "book" / "status.html").as_uri())
    rows = browser.execute_script(TABLE_ROWS)
    by_first_cell = {row[0]: row for row in rows}
    for stage in STAGES:
        row = by_first_cell[f"{stage.name} · {stage.title}"]
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d", row[1]), row
        assert re.fullmatch(r"\d+ (s|min \d+ s|h \d+ min)", row[2]), row
        assert row[3] == f"{stage.name}.ipynb", row
    assert by_first_cell["torch"] == ["torch", version("torch")]
    assert "CPU cores" in browser.execute_script("return document.body.innerText;")
    notebooks = browser.execute_script(
        "return Array.from(document.querySelectorAll('a.download')).map(a => a.href);")
    assert len(notebooks) == len(STAGES)
    assert all(local_file(link).is_file() for link in notebooks)
