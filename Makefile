# minitwit-ha — the README's commands. `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV    ?= .venv
PY      := $(VENV)/bin/python
PYTEST  := $(VENV)/bin/pytest
RUFF    := $(VENV)/bin/ruff
STACK   ?= prod
PROFILE ?= fast
RUNS    ?= 3
API     ?= realistic
# Debian packages the lab and the tests use (installed by `make setup-lab` when run as root).
LAB_PACKAGES := keepalived nftables iproute2 postgresql shellcheck openssh-server openssh-client sudo pgloader sqlite3 curl python3-venv \
  haproxy prometheus prometheus-node-exporter debootstrap systemd-container openssl gnupg
SHELL_SCRIPTS := $(wildcard scripts/mt-health scripts/*.sh scripts/ci/* .ci/run tests/lab/bin/*)

.PHONY: help setup setup-lab lint test test-fast test-integration plan demo drill twins lab-down clean

help:  ## list the commands
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | column -t -s $$'\t'

$(VENV)/.installed: requirements.txt requirements-dev.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

setup: $(VENV)/.installed  ## create .venv with the pinned Python packages (pulumi up uses it too)

setup-lab:  ## as root: install the lab's Debian packages and the keepalived_script user if missing
	@if [ "$$(id -u)" != 0 ]; then \
	  echo "setup-lab: not root; lab tests will skip (they need root, network namespaces and: $(LAB_PACKAGES))"; \
	else \
	  missing=$$(for p in $(LAB_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	  if [ -n "$$missing" ]; then \
	    echo "setup-lab: installing $$missing"; \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	  fi; \
	  id -u keepalived_script >/dev/null 2>&1 || useradd --system --no-create-home --home-dir /nonexistent \
	    --shell /usr/sbin/nologin keepalived_script; \
	fi

lint: setup  ## ruff and shellcheck
	$(RUFF) check .
	shellcheck $(SHELL_SCRIPTS)

test: setup-lab setup lint  ## everything: lint, unit, stack (mocks), database, lab and drill scenarios
	$(PYTEST) -q -n 2 -m "not lab and not integration"
	$(PYTEST) -q -m "lab and not integration"

test-fast: setup  ## the quick loop: no lab, no slow scenarios
	$(PYTEST) -q -n 2 -m "not lab and not slow and not integration"

test-integration: setup  ## opt-in end-to-end test on a real DigitalOcean account (needs DIGITALOCEAN_TOKEN, pulumi)
	$(PYTEST) -q -m integration tests/integration

plan: setup  ## offline plan of STACK (default prod) under mocks: plan/$(STACK).txt, no credentials needed
	$(PY) scripts/plan.py --stack $(STACK) --out plan/$(STACK).txt

demo: setup-lab setup  ## the pair failing over in the lab on this machine (root; no cloud account): drill-report.html
	$(PY) -m tests.lab demo --api $(API)

drill: setup-lab setup  ## failover drill (PROFILE=fast|tutorial, RUNS=3, API=realistic|ideal, TWINS=1 on droplet twins): drill-report.json/.html
	$(PY) -m tests.lab drill --profile $(PROFILE) --runs $(RUNS) --api $(API) --report drill-report.json $(if $(TWINS),--twins)

twins: setup-lab setup  ## the stack's commands on booted Debian 12 twins, applied 3 times: twin-report.json (root)
	$(PY) -m tests.twins run --report twin-report.json

lab-down:  ## tear the lab down if a run was interrupted
	$(PY) -m tests.lab down

clean:  ## remove caches and reports (keeps .venv)
	rm -rf .pytest_cache .ruff_cache plan drill-report* twin-report.json
	find . -name __pycache__ -prune -exec rm -rf {} +
