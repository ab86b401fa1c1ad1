# conceptlab: `make book` builds the book, `make test` runs the tests, `make bench` the benchmarks.
# Each target first creates .venv (if missing) and installs the project into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
JOBS ?= all

.PHONY: install book notebooks html smoke test bench lint sync clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml constraints.txt | $(PY)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -c constraints.txt -e ".[all]"
	touch $(STAMP)

install: $(STAMP)

## Execute every chapter on its default parameters, then build the HTML book.
book: notebooks html

notebooks: install
	$(PY) -m conceptlab.bookrun --chapters $(JOBS)

html: install
	$(VENV)/bin/jupyter-book build --all .

## Execute every chapter on its smoke parameters (seconds each).
smoke: install
	$(PY) -m conceptlab.bookrun --smoke --out _build/smoke

test: install
	$(PY) -m pytest

bench: install
	$(PY) -m conceptlab.bench

lint: install
	$(VENV)/bin/ruff check src tests notebooks

## Re-pair notebooks after editing either twin.
sync: install
	$(VENV)/bin/jupytext --sync notebooks/*.py

clean:
	rm -rf _build book/chapters book/results
