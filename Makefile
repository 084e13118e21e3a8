# make test: create .venv if missing, install runtime + test deps (idempotent), run the hermetic CPU test suite.
# make demo: the loop on CPU with no downloads (a tiny random checkpoint, synthetic videos).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check

# torch first and pinned: the 2.13.0 CPU wheel is on disk here; an unpinned torch pulls a multi-GB CUDA build.
$(VENV)/.runtime: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -r requirements.txt
	touch $@

$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt
	$(PIP) -r requirements-dev.txt
	touch $@

test: $(VENV)/.dev
	$(PY) -m pytest -q tests

# the mini set (tiny random checkpoint + synthetic videos), then one forward and one generation
demo: $(VENV)/.runtime
	$(PY) data/demo/prepare.py --out=out/demo
	$(PY) model.py out/demo/model

.PHONY: test demo
