# whist-backend. The two commands for a fresh machine:
#   make run    runs the whole system on this machine (Ctrl-C stops it)
#   make test   runs the whole test suite
# Both install what they need (Debian packages, the Python virtualenv) idempotently.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

# Build output lives outside the clone so a fresh clone on the same machine builds warm.
export CARGO_TARGET_DIR ?= $(HOME)/.cache/whist-backend-target
CARGO ?= cargo
VENV := .venv
PYTHON ?= python3
STAMPS := $(CARGO_TARGET_DIR)/whist-stamps
# Debian packages as PACKAGE:COMMAND; setup-system installs a package only when its command is
# missing. PostgreSQL's server binaries are what devstack needs; the rest serve
# `make check-artifacts`. OPTIONAL_APT_PACKAGES are installed where the distribution has them
# (Debian has packer 1.6; without it the Packer check reports a skip).
APT_PACKAGES := postgresql:initdb shellcheck:shellcheck apparmor:apparmor_parser prometheus:promtool \
                jq:jq curl:curl iproute2:ip iptables:iptables packer:packer
OPTIONAL_APT_PACKAGES := packer
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# What must run as root (the host service, and devstack's --system, which starts host services)
# runs through sudo for another user, with --preserve-env so the variables the target and the
# caller set (.devstack/env, WHIST_LOG=debug ...) still reach it.
SUDO_ENV := $(if $(SUDO),$(SUDO) --preserve-env)

.PHONY: help setup setup-system setup-python setup-image build run run-stack chaos test check check-artifacts fmt clippy bench schema \
        run_host_service run_host_service_localdev run_host_service_localdevwithdb run_host_service_dev \
        run_scaling_service run_scaling_service_localdev run_scaling_service_localdevwithdb run_scaling_service_dev \
        run_scaling_service_simulation compare render-dashboard

help:
	@echo "make run     run the whole system: the stack, the scaling service, a host service per launched instance; Ctrl-C stops it"
	@echo "make run-stack  the stack alone (PostgreSQL, GraphQL, moto, fake IMDS and Auth0)"
	@echo "make chaos   the reliability suite in full; rewrites the figures in docs/reliability.md"
	@echo "make test    run the whole test suite (installs what it needs)"
	@echo "make check   cargo fmt --check + clippy -D warnings + make test"
	@echo "make bench   print the benchmarks' figures"
	@echo "make compare every scaling algorithm on every trace of the corpus; rewrites the table in docs/scaling-service.md"
	@echo "make schema  regenerate schema.graphql from the migrations"
	@echo "make render-dashboard  draw the dashboard's host health row over the alert tests' recorded scenario"
	@echo "make run_host_service_localdevwithdb   a host service against the stack (make run-stack first; as root, through sudo)"
	@echo "make run_host_service[_localdev]       the same without the database: a json_transport request starts its mandelbox"
	@echo "make run_host_service_dev              a host service on a dev EC2 host (HASURA_GRAPHQL_URL, HASURA_ADMIN_SECRET set)"
	@echo "make run_scaling_service[_localdevwithdb]  the scaling service against the stack, launching into its moto"
	@echo "make run_scaling_service_localdev      the same with an in-memory cloud (hosts never boot)"
	@echo "make run_scaling_service_dev           the scaling service against the dev deployment (HASURA_*, AUTH0_*, AWS credentials set)"
	@echo "make run_scaling_service_simulation    the default algorithm against a demand trace (.simulation/)"

setup: setup-system setup-python setup-image

setup-system:
	@missing=(); optional=(); \
	for entry in $(APT_PACKAGES); do \
	  package=$${entry%%:*}; tool=$${entry#*:}; \
	  if command -v "$$tool" >/dev/null || [ -x "/usr/sbin/$$tool" ] || [ -x "/sbin/$$tool" ]; then continue; fi; \
	  if [ "$$tool" = initdb ] && ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then continue; fi; \
	  case " $(OPTIONAL_APT_PACKAGES) " in *" $$package "*) optional+=("$$package") ;; *) missing+=("$$package") ;; esac; \
	done; \
	available() { apt-cache policy "$$1" 2>/dev/null | grep 'Candidate: [0-9]' >/dev/null; }; \
	if [ $${#missing[@]} -eq 0 ]; then \
	  for package in "$${optional[@]}"; do available "$$package" && missing+=("$$package"); done; \
	  [ $${#missing[@]} -eq 0 ] && exit 0; \
	  optional=(); \
	fi; \
	$(SUDO) apt-get update -qq; \
	for package in "$${optional[@]}"; do \
	  if available "$$package"; then missing+=("$$package"); else echo "$$package is not available from apt: its check will be skipped"; fi; \
	done; \
	echo "installing $${missing[*]}"; \
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends "$${missing[@]}"

setup-python: $(VENV)/.installed

$(VENV)/.installed: devstack/python/requirements.txt
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -r devstack/python/requirements.txt
	@touch $@

# The mandelbox test image (a static stub FROM scratch): no registry is reachable, so it is built
# locally whenever the stub's sources change.
setup-image: $(STAMPS)/mandelbox-image

$(STAMPS)/mandelbox-image: devstack/mandelbox/Dockerfile devstack/mandelbox/build-image.sh $(wildcard devstack/mandelbox/src/*.rs)
	@command -v docker >/dev/null || { echo "Docker is required (the host service's tests run mandelboxes on it)"; exit 1; }
	devstack/mandelbox/build-image.sh
	@mkdir -p $(STAMPS) && touch $@

build:
	$(CARGO) build --workspace --all-targets

# The whole system: devstack, the scaling service launching hosts into moto, and a host service
# per launched instance (docs/walkthrough.md). `make run-stack` brings up the stack alone. The host
# services must be root, so devstack runs as root (through sudo for another user; it hands
# .devstack/env back to that user).
run: setup
	$(CARGO) build -p devstack -p host-service -p scaling-service --bins
	$(SUDO_ENV) $(CARGO_TARGET_DIR)/debug/whist-devstack up --system

run-stack: setup
	$(CARGO) build -p devstack
	$(CARGO_TARGET_DIR)/debug/whist-devstack up

# The operational artefacts (host-setup/, scaling-service/deploy/, docs/observability/):
# shellcheck, systemd-analyze, apparmor_parser, packer, promtool and consistency with the code.
# Prints "N passed, M failed".
check-artifacts: setup-system setup-python
	host-setup/check.sh

# The artefacts' checks and the doc tests first, so the run closes with the test runner's summary
# of the whole suite.
test: setup check-artifacts
	$(CARGO) build -q --workspace --bins
	$(CARGO) test -q --workspace --doc
	@if $(CARGO) nextest --version >/dev/null 2>&1; then \
	  $(CARGO) nextest run --workspace --no-fail-fast; \
	else \
	  $(CARGO) test --workspace --no-fail-fast; \
	fi

# The dashboard's "Host health" row over the operator's scenario of alerts.test.yml, into
# docs/observability/dashboard-scenario.png: no Grafana here, so Debian's prometheus answers the
# panels' queries over the backfilled series and matplotlib (installed into the venv on first
# use) draws them (docs/operations.md, "Read the dashboards").
render-dashboard: setup-system setup-python
	@$(VENV)/bin/python -c 'import matplotlib' 2>/dev/null || $(VENV)/bin/pip install -q --disable-pip-version-check matplotlib==3.11.2
	$(VENV)/bin/python docs/observability/render.py docs/observability/dashboard-scenario.png "Host health"

fmt:
	$(CARGO) fmt --all -- --check

clippy:
	$(CARGO) clippy --workspace --all-targets -- -D warnings

check: fmt clippy test

# The reliability suite in full (`make test` runs its short form), then its figures into
# docs/reliability.md: the table is the suite's output, never typed by hand.
CHAOS_REPORT := $(CARGO_TARGET_DIR)/chaos-report
chaos: setup
	$(CARGO) build -q --workspace --bins
	rm -rf $(CHAOS_REPORT)
	WHIST_CHAOS=full WHIST_CHAOS_REPORT_DIR=$(CHAOS_REPORT) $(CARGO) nextest run -p devstack --test chaos --no-fail-fast
	$(CARGO_TARGET_DIR)/debug/whist-devstack chaos-report $(CHAOS_REPORT) docs/reliability.md

# Each benchmark prints its figures; docs/performance.md records them with the goals. Every
# command names --workspace, so features resolve once for the whole workspace and each dependency
# builds once per profile (a `-p X` resolves X's features alone and rebuilds the crates under them).
bench: setup
	$(CARGO) build -q --release --workspace --bins
	$(CARGO) bench -q --workspace --bench subscription_delay
	$(CARGO) bench -q --workspace --bench spinup
	$(CARGO) bench -q --workspace --bench json_transport
	$(CARGO) bench -q --workspace --bench profiles
	$(CARGO) bench -q --workspace --bench decision
	$(CARGO) bench -q --workspace --bench assign
	$(CARGO) bench -q --workspace --bench sessions

schema:
	$(CARGO) run -q -p devstack --bin whist-devstack -- print-schema > schema.graphql.new
	mv schema.graphql.new schema.graphql

# The services against the local stack: start `make run-stack` first, in another terminal. The host
# service takes the stack's default identity (its fake IMDS) and keeps its files in .devstack/whist.
# It runs as root (it refuses anything else), through sudo for another user (SUDO_ENV). The
# variants are the original's: `_localdev` (no database: a json_transport request
# starts its mandelbox), `_localdevwithdb` (the stack's database), `_dev` (a dev host: real IMDS,
# the Hasura named by HASURA_GRAPHQL_URL and HASURA_ADMIN_SECRET, readable logs).
HOST_SERVICE_LOCAL := WHIST_ROOT=$(CURDIR)/.devstack/whist WHIST_GPU_OVERRIDE=2 WHIST_OPS_ADDR=127.0.0.1:4679
HOST_SERVICE_BIN := $(CARGO_TARGET_DIR)/debug/whist-host-service
NEED_STACK := test -f .devstack/env || { echo "start the stack first, in another terminal: make run-stack"; exit 1; }
NEED_HASURA := test -n "$${HASURA_GRAPHQL_URL:-}" -a -n "$${HASURA_ADMIN_SECRET:-}" || \
  { echo "set HASURA_GRAPHQL_URL (https://...) and HASURA_ADMIN_SECRET to the dev deployment's"; exit 1; }

run_host_service_localdevwithdb:
	@$(NEED_STACK)
	$(CARGO) build -p host-service --bin whist-host-service
	. .devstack/env && $(SUDO_ENV) env APP_ENV=localdevwithdb $(HOST_SERVICE_LOCAL) $(HOST_SERVICE_BIN)

run_host_service_localdev:
	@$(NEED_STACK)
	$(CARGO) build -p host-service --bin whist-host-service
	. .devstack/env && $(SUDO_ENV) env APP_ENV=localdev $(HOST_SERVICE_LOCAL) $(HOST_SERVICE_BIN)

# As in the original, `run_host_service` is the localdev variant.
run_host_service: run_host_service_localdev

run_host_service_dev:
	@$(NEED_HASURA)
	$(CARGO) build -p host-service --bin whist-host-service
	$(SUDO_ENV) env APP_ENV=dev WHIST_LOG_FORMAT=pretty $(HOST_SERVICE_BIN)

# The scaling service needs no root. `_localdevwithdb` launches hosts into the stack's moto (start
# the stack with `make run-stack`; `make run` runs this service itself), `_localdev` into an
# in-memory cloud whose hosts never boot, `_dev` into the AWS account of the caller's credentials
# (HASURA_GRAPHQL_URL, HASURA_ADMIN_SECRET, AUTH0_* set; see docs/scaling-service.md).
run_scaling_service_localdevwithdb:
	@$(NEED_STACK)
	. .devstack/env && APP_ENV=localdevwithdb $(CARGO) run -p scaling-service --bin whist-scaling-service

run_scaling_service_localdev:
	@$(NEED_STACK)
	. .devstack/env && APP_ENV=localdev WHIST_CLOUD=memory $(CARGO) run -p scaling-service --bin whist-scaling-service

run_scaling_service: run_scaling_service_localdevwithdb

run_scaling_service_dev:
	@$(NEED_HASURA)
	APP_ENV=dev WHIST_LOG_FORMAT=pretty $(CARGO) run -p scaling-service --bin whist-scaling-service

# The service's default algorithm (holdover) on the weekday trace, in simulated time:
# summary.json, timeline.csv and plot.svg in .simulation/.
run_scaling_service_simulation:
	$(CARGO) run -q -p scaling-service --bin whist-scaling-service -- simulate --trace scaling-service/simulation/traces/weekday.csv --out .simulation

# Every algorithm on every trace of the corpus; writes the table into docs/scaling-service.md
# and the frontier plots into docs/simulation/.
compare:
	$(CARGO) run -q -p scaling-service --bin whist-scaling-service -- compare --traces scaling-service/simulation/traces --out .simulation/compare --write-docs docs/scaling-service.md
