# agentd — `make help` lists the targets.
# Run as root on Debian or Ubuntu: the targets install what they need.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# OS packages: systemd-python builds against libsystemd; bubblewrap (bwrap)
# builds agents' sandboxes and libseccomp2 compiles their seccomp filter
# (pyseccomp loads it); systemd-container serves the systemd tests; nftables
# (nft) and iproute2 (ip) build allowlist agents' network namespaces.
APT_PACKAGES := libsystemd-dev pkg-config python3-venv python3-dev gcc systemd-container \
                bubblewrap libseccomp2 openssh-client nftables iproute2
STAMP  := $(VENV)/.installed

.PHONY: help deps venv proto demo test test-fast lint typecheck check bench bench-smoke clean \
        install uninstall

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

test: $(STAMP) ## Run lint, type checks, the whole test suite and bench-smoke (needs root)
	$(VENV)/bin/ruff check daemon agentctl tests benchmarks
	$(VENV)/bin/mypy
	$(VENV)/bin/pytest
	$(PY) benchmarks/smoke.py

test-fast: $(STAMP) ## Tests that need no root
	$(VENV)/bin/pytest -m "not root"

lint: $(STAMP) ## ruff
	$(VENV)/bin/ruff check daemon agentctl tests benchmarks

typecheck: $(STAMP) ## mypy --strict on daemon/ and agentctl/
	$(VENV)/bin/mypy

bench: $(STAMP) ## Every benchmark at full size (tables; JSON in benchmarks/results/; minutes)
	$(PY) benchmarks/kill_latency.py
	$(PY) benchmarks/lease_precision.py
	$(PY) benchmarks/estop.py
	$(PY) benchmarks/sampler_cost.py
	$(PY) benchmarks/tripwire_throughput.py
	$(PY) benchmarks/launch_latency.py
	$(PY) benchmarks/stop_under_load.py
	$(PY) benchmarks/idle_scale.py
	$(PY) benchmarks/egress.py

# A check, not a measurement: one repetition each, no time asserted.
bench-smoke: $(STAMP) ## Every benchmark once at its smallest size; fails if one crashes or leaks
	$(PY) benchmarks/smoke.py

# Deployment. The service's virtualenv is built on the OS's interpreter
# (/usr/bin/python3), not on whichever python3 comes first in PATH (often a
# pyenv under /root): a system service must not depend on one user's
# toolchain. `make install PYTHON=...` still overrides it. The sysusers.d and
# tmpfiles.d directories are variables because /usr is read-only in the
# systemd tests' container; /etc/sysusers.d and /etc/tmpfiles.d work as well.
OPT         ?= /opt/agentd
UNITDIR     ?= /etc/systemd/system
SYSUSERSDIR ?= /usr/lib/sysusers.d
TMPFILESDIR ?= /usr/lib/tmpfiles.d
CONFDIR     ?= /etc/agentd
# sd_booted(3): systemd is the running init if this directory exists.
SYSTEMD_RUNNING = test -d /run/systemd/system

install: PYTHON := /usr/bin/python3
install: deps ## Install the daemon as a systemd service (/opt/agentd, agentd.service, /etc/agentd)
	$(PYTHON) -m venv $(OPT)/venv
	$(OPT)/venv/bin/pip install -q .
	install -D -m 0644 systemd/agentd.service $(UNITDIR)/agentd.service
	install -D -m 0644 systemd/agentd.sysusers $(SYSUSERSDIR)/agentd.conf
	install -D -m 0644 systemd/agentd.tmpfiles $(TMPFILESDIR)/agentd.conf
	install -d -m 0755 $(CONFDIR)
	test -e $(CONFDIR)/agentd.toml || install -m 0644 systemd/agentd.toml $(CONFDIR)/agentd.toml
	test -e $(CONFDIR)/trusted_keys || install -m 0600 /dev/null $(CONFDIR)/trusted_keys
	systemd-sysusers $(SYSUSERSDIR)/agentd.conf
	systemd-tmpfiles --create $(TMPFILESDIR)/agentd.conf
	@if $(SYSTEMD_RUNNING); then systemctl daemon-reload; \
	else echo "systemd is not running: skipped systemctl daemon-reload"; fi
	@echo "installed. Add keys to $(CONFDIR)/trusted_keys, then: systemctl enable --now agentd"

uninstall: ## Remove what `make install` put in place (keeps /etc/agentd, /var/lib/agentd, /var/log/agentd)
	@if $(SYSTEMD_RUNNING); then systemctl disable --now agentd.service || true; fi
	rm -f $(UNITDIR)/agentd.service $(SYSUSERSDIR)/agentd.conf $(TMPFILESDIR)/agentd.conf
	rm -rf $(OPT)
	@if $(SYSTEMD_RUNNING); then systemctl daemon-reload; fi

clean: ## Remove the virtualenv and caches
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache build *.egg-info
