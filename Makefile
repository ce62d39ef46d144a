# Set-up is part of every target: a fresh clone needs only Python 3.10+ and make.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: up test setup clean

up: $(STAMP)  ## start the cluster on embedded Ray with the demo model; OpenAI API on :8000
	$(BIN)/splitserve up $(UP_ARGS)

test: $(STAMP)  ## run the whole test suite
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

setup: $(STAMP)

# torch is pinned to the CPU build first: an unpinned torch would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .hypothesis
