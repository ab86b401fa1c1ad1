# conceptlab: `make book` builds the book, `make test` runs the tests, `make bench` the benchmarks.
# Each target first creates .venv (if missing) and installs the project into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
JOBS ?= all
# Chapters 2-7 run LANES at a time, each in its own process with one lane's threads (chapter 1 first, alone); the
# results are those of `make book LANES=1` to the last bit. `python -m conceptlab.bench lanes` measures the
# gain on your machine (1.28x for two planted CLIPs on this project's 2-core machine, 2026-11-29).
LANES ?= 2
# Cache compiled modules (__pycache__/, ignored by git) even where the environment turns caching off
# (PYTHONDONTWRITEBYTECODE): every chapter kernel, test worker and subprocess imports the package again,
# and pytest rewrites every test module's asserts in each worker without its cache (about 3 s a process).
export PYTHONDONTWRITEBYTECODE :=

.PHONY: install book notebooks html smoke test check bench lint format sync clean
.PHONY: lesson lab browser

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml constraints.txt | $(PY)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -c constraints.txt -e ".[all]"
	touch $(STAMP)

install: $(STAMP)

## Execute every chapter on its default parameters, then build the HTML book.
## `make book PARAMS=my.yml`: the book of your model and data (examples/my_model.yml), in _build/<my>/_build/html.
PARAMS ?=
book: $(if $(PARAMS),install,notebooks html)
	$(if $(PARAMS),$(PY) -m conceptlab.bookrun --params $(PARAMS) --out _build/$(basename $(notdir $(PARAMS))),@:)

notebooks: install
	$(PY) -m conceptlab.bookrun --chapters $(JOBS) --lanes $(LANES)

html: install
	$(VENV)/bin/jupyter-book build --all .

## Execute every chapter on its smoke parameters (seconds each).
smoke: install
	$(PY) -m conceptlab.bookrun --smoke --out _build/smoke

test: install browser
	$(PY) -m pytest -n 2 --dist worksteal

bench: install
	$(PY) -m conceptlab.bench

## The guardrails: ruff (lint and format) and mypy (basic mode) over the package.
lint: install
	$(VENV)/bin/ruff check src tests notebooks benchmarks
	$(VENV)/bin/ruff format --check src tests notebooks benchmarks
	$(VENV)/bin/mypy src/conceptlab

## Apply ruff's formatting (then `make sync` re-pairs the notebooks).
format: install
	$(VENV)/bin/ruff format src tests notebooks benchmarks
	$(VENV)/bin/jupytext --sync notebooks/*.py

## The quick check before a commit (<= 2 min): the guardrails and every test that is neither a notebook
## run nor marked slow (several processes, a whole chapter in-process). `make test` runs them all.
check: lint
	$(PY) -m pytest -q -n 2 --dist worksteal -m "not notebook and not slow"

## Re-pair notebooks after editing either twin.
sync: install
	$(VENV)/bin/jupytext --sync notebooks/*.py

## Teaching (README, "Teaching with the book"). Prepare a class once: build every artifact the
## lessons use and write executed lesson copies to lessons/ (lesson parameters: notebooks/lesson.yml).
lesson: install
	$(PY) -m conceptlab.bookrun --lesson --out lessons --lanes $(LANES)

## JupyterLab with the project's kernel registered, opened on notebooks/ (lesson copies in lessons/).
lab: install
	$(PY) -m ipykernel install --user --name conceptlab --display-name "Python (conceptlab)"
	$(VENV)/bin/jupyter lab --ServerApp.root_dir=. --LabApp.default_url=/lab/tree/notebooks \
	    $(if $(filter 0,$(shell id -u)),--allow-root)

## Chromium, its driver and MathJax from Debian's packages, for the browser tests (tests/test_book_browser.py).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ] || \
	    [ ! -f /usr/share/javascript/mathjax/MathJax.js ]; then \
	  $(SUDO) apt-get update && $(SUDO) apt-get install -y chromium chromium-driver libjs-mathjax; fi

clean:
	rm -rf _build book/chapters book/results
