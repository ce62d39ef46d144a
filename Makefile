# Set-up is part of every target: a fresh clone needs only Python 3.10+ and make.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: serve test setup bench-engine clean

serve: $(STAMP)  ## start splitserve on the embedded default (demo model)
	$(BIN)/splitserve generate --model demo --chat --prompt "Tell me about disaggregated serving."

test: $(STAMP)  ## run the whole test suite
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

setup: $(STAMP)

# torch is pinned to the CPU build first: an unpinned torch would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

bench-engine: $(STAMP)
	$(BIN)/splitserve bench engine

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .hypothesis
