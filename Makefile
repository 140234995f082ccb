# Thin wrappers around the runner; `make help` lists the targets.
PYTHON  ?= python3
PROFILE ?= default
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
export HF_HUB_OFFLINE = 1
export HF_DATASETS_OFFLINE = 1
export TOKENIZERS_PARALLELISM = false
export MPLBACKEND = Agg

.PHONY: help install study smoke test e2e book pdf lint bench reference clean browser
TEX_PACKAGES := texlive-xetex latexmk texlive-latex-extra texlive-fonts-recommended \
                fonts-freefont-otf texlive-plain-generic poppler-utils
BROWSER_PACKAGES := chromium chromium-driver
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_INSTALL := $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends

help:  ## list targets
	@grep -E '^[a-z]+:.*##' Makefile | sed 's/:.*## */\t/'

$(STAMP): requirements.txt constraints.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -c constraints.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)  ## create .venv with the pinned dependencies

study: $(STAMP)  ## run every stage of PROFILE (default) and build the book
	$(PY) -m moecollab run --profile $(PROFILE)
	$(PY) -m moecollab book --profile $(PROFILE)

smoke: $(STAMP)  ## the whole path at tiny sizes, then the book from it
	$(PY) -m moecollab run --profile smoke
	$(PY) -m moecollab book --profile smoke

test: $(STAMP) browser  ## ruff, then the test suite (smoke profile, strict book build, browser)
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m pytest

e2e: $(STAMP)  ## the long end-to-end runs: a second smoke run from scratch, three real profiles
	$(PY) -m pytest -m e2e

book: $(STAMP)  ## rebuild the book from PROFILE's executed notebooks
	$(PY) -m moecollab book --profile $(PROFILE)

pdf: $(STAMP)  ## the book as a PDF handout, _build/latex/moecollab.pdf (installs TeX if missing)
	@command -v xelatex >/dev/null && command -v latexmk >/dev/null || \
	  { $(SUDO) apt-get update -q && \
	    $(APT_INSTALL) $(TEX_PACKAGES); }
	$(PY) -m moecollab book --profile $(PROFILE) --pdf

browser:  ## a headless browser for the book test (Debian's chromium, chromium-driver if missing)
	@command -v chromedriver >/dev/null && \
	  { command -v chromium || command -v chromium-browser || command -v google-chrome; } \
	    >/dev/null || \
	  { $(SUDO) apt-get update -q && $(APT_INSTALL) $(BROWSER_PACKAGES); }

lint: $(STAMP)  ## ruff only
	$(PY) -m ruff check src tests benchmarks

bench: $(STAMP)  ## benchmarks that print ratios side by side; records them for the book's appendix
	@for script in benchmarks/bench_*.py; do echo "== $$script"; $(PY) $$script --record || exit 1; done

reference: $(STAMP)  ## DeepSeek-MoE's own code (transformers 4.x side venv in .reference/) vs its conversion
	$(PY) tests/reference/side_env.py
	$(PY) -m pytest -m slow tests/test_deepseek_v1.py

clean:  ## remove the book build (artifacts and .venv are kept)
	rm -rf _build book/notebooks
