# agentd — `make help` lists the targets.
# Run as root on Debian or Ubuntu: the targets install what they need.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# OS packages: systemd-python builds against libsystemd; bubblewrap and
# systemd-container serve the sandbox and the systemd tests.
APT_PACKAGES := libsystemd-dev pkg-config python3-venv python3-dev gcc
STAMP  := $(VENV)/.installed

.PHONY: help deps venv proto demo test test-fast lint typecheck check bench clean

help: ## List the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

deps: ## Install the OS packages (apt-get) that the build needs
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing OS packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

$(STAMP): pyproject.toml | deps
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

venv: $(STAMP) ## Create .venv and install the project with its dev tools

proto: $(STAMP) ## Regenerate the committed gRPC stubs from proto/
	$(PY) -m grpc_tools.protoc -I proto --python_out=proto --grpc_python_out=proto \
	  --mypy_out=proto --mypy_grpc_out=proto \
	  --plugin=protoc-gen-mypy=$(VENV)/bin/protoc-gen-mypy \
	  --plugin=protoc-gen-mypy_grpc=$(VENV)/bin/protoc-gen-mypy_grpc \
	  proto/agentd/v1/agentd.proto

demo: $(STAMP) ## Start a dev daemon, launch a rogue agent, kill it with a signed command
	bash demo/demo.sh

test: $(STAMP) ## Run lint, type checks and the whole test suite (needs root)
	$(VENV)/bin/ruff check daemon agentctl tests benchmarks
	$(VENV)/bin/mypy
	$(VENV)/bin/pytest

test-fast: $(STAMP) ## Tests that need no root
	$(VENV)/bin/pytest -m "not root"

lint: $(STAMP) ## ruff
	$(VENV)/bin/ruff check daemon agentctl tests benchmarks

typecheck: $(STAMP) ## mypy --strict on daemon/ and agentctl/
	$(VENV)/bin/mypy

bench: $(STAMP) ## Kill-latency benchmark (prints a table, writes benchmarks/results/)
	$(PY) benchmarks/kill_latency.py

clean: ## Remove the virtualenv and caches
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache build *.egg-info
