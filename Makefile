# sglang-ha. `make up` brings up the stack (CPU demo with the simulator where no
# GPU is present); `make test` runs every test. Both install what is missing.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

VENV      ?= .venv
PY        := $(VENV)/bin/python
STACK     ?= $(shell scripts/detect-stack.sh)
PROJECT   ?= sglang-ha
# pair: one primary, the others standbys (the default); pool: every healthy node serves.
MODE      ?= pair
NODES     ?= 2
# `make up` writes compose/stack.generated.yaml for any other MODE or NODES
# (scripts/stack-nodes.sh); every compose command here adds it while it exists, so
# `make down`, `logs` and `ps` see the stack that `up` brought up.
STACK_OVERRIDE := compose/stack.generated.yaml
COMPOSE   = docker compose -p $(PROJECT) -f compose/$(STACK) $$([ ! -f $(STACK_OVERRIDE) ] || echo -f $(STACK_OVERRIDE))
PYTEST    := $(PY) -m pytest
TRIALS    ?= 3

.PHONY: help
help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

# --- set-up ------------------------------------------------------------------------
$(VENV)/.installed: pyproject.toml
	scripts/ensure-python.sh $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $@

.PHONY: venv docker secrets images
venv: $(VENV)/.installed  ## the Python virtualenv for tests and tools
docker:  ## Docker engine, Compose v2 and the base image (only what is missing)
	scripts/ensure-docker.sh
secrets: ## one secret file per value and service in compose/secrets/ (ROTATE=1: draw all again)
	scripts/secrets.sh $(if $(filter 1,$(ROTATE)),--rotate)
images: docker secrets  ## build the node, gateway and redis images
	$(COMPOSE) build

# --- the stack -----------------------------------------------------------------------
# The GPU stack downloads the model first (`make models`, with progress), so that
# `up` waits only for SGLang to load it (the node's healthcheck allows 900 s).
ifeq ($(STACK),compose.gpu.yaml)
UP_NEEDS  := models
UP_WAIT   ?= 1200
else
UP_NEEDS  :=
UP_WAIT   ?= 600
endif

.PHONY: up down logs ps status history rolling-restart verify models
up: docker secrets $(UP_NEEDS)  ## bring up the stack and wait until it is ready (MODE=pair|pool NODES=N)
	@NODES=$(NODES) scripts/detect-stack.sh --check $(STACK)
	@scripts/stack-nodes.sh $(MODE) $(NODES) $(STACK)
	@echo "==> building the images ($(STACK); the first build takes several minutes)"
	$(COMPOSE) build
	@echo "==> starting the containers; waiting until every one is healthy ('make logs' shows progress)"
	$(COMPOSE) up -d --wait --wait-timeout $(UP_WAIT) --remove-orphans
	@scripts/print-endpoints.sh $(PROJECT) $(STACK)
models: docker secrets  ## GPU stack: download MODEL_PATH into the model cache (progress shown)
	@scripts/detect-stack.sh --check $(STACK)
	$(COMPOSE) build node-1
	$(COMPOSE) run --rm --no-deps node-1 /etc/sglang-ha/download-model.sh
down:  ## stop the stack (keeps volumes)
	$(COMPOSE) down --remove-orphans
logs:  ## follow the stack's logs
	$(COMPOSE) logs -f --tail=100
ps:
	$(COMPOSE) ps
# The CLI runs inside a node container: these need Docker only. `docker exec`, not
# `docker compose exec -T`, which returned 0 whatever the command returned (Compose
# v2.40.3): a failed rolling restart must fail make.
CTL = id=$$($(COMPOSE) ps -q node-1); [ -n "$$id" ] || { echo "node-1 is not running: make up" >&2; exit 1; }; docker exec "$$id" sglang-ha
status:  ## roles, epoch and health of the running stack
	@$(CTL) status
history:  ## the HA event log, from the store
	@$(CTL) history

rolling-restart:  ## restart every engine, standbys first, no request failing
	@$(CTL) rolling-restart

verify: venv  ## the pre-production checklist against the running stack (DISRUPTIVE=1 for all)
	$(PY) -m ha_agent.ctl verify --project $(PROJECT) $(if $(DISRUPTIVE),--disruptive,)

# --- tests ---------------------------------------------------------------------------
.PHONY: test lint unit conformance test-integration failover-test
test: lint unit conformance test-integration  ## everything CI runs: lint, unit, conformance, integration + failover scenarios

lint: venv  ## ruff and mypy
	$(PY) -m ruff check ha_agent bench tests
	$(PY) -m ruff format --check ha_agent bench tests
	$(PY) -m mypy ha_agent bench tests/support tests/failover

unit: venv  ## unit tests (real Redis where a test needs one)
	scripts/ensure-test-tools.sh
	$(PYTEST) tests/unit -q

conformance: venv  ## SGLang's behaviours, same verdict through the gateway as direct (tests/conformance/verdicts.md)
	scripts/sglang-test-kits.sh $(PY) .cache/sglang-0.5.19
	$(PYTEST) tests/conformance -q

test-integration: venv docker secrets  ## the CPU stack in containers, driven from pytest (all faults once)
	scripts/ensure-test-tools.sh
	$(PYTEST) tests/integration -q

FAILOVER_OUT = reports/failover$(if $(filter pool,$(MODE)),-pool-$(NODES),$(if $(filter-out 2,$(NODES)),-$(NODES)))
failover-test: venv docker secrets  ## every fault, $(TRIALS) trials, against MODE/NODES: failover-report.json/.md/.png
	$(PY) -m tests.failover --trials $(TRIALS) --mode $(MODE) --nodes $(NODES) --out $(FAILOVER_OUT)

# Two-GPU hosts only: the GPU stack with a small model, the crash, freeze and NIC
# faults of the failover harness, report in reports/gpu-smoke/ (scripts/gpu-smoke.sh).
.PHONY: gpu-smoke
gpu-smoke: venv docker secrets  ## GPU hosts: real SGLang pair, crash/freeze/NIC faults, report
	scripts/gpu-smoke.sh

# --- alerts (promtool from Debian's prometheus package) ------------------------------
.PHONY: alerts-lint promtool
alerts-lint:  ## promtool check rules + check config (alert rules and scrape config)
	scripts/ensure-test-tools.sh
	promtool check rules prometheus/alerts/*.yaml
	promtool check config prometheus/prometheus.yml
promtool: alerts-lint  ## alerts-lint, then the alert rules' unit tests (prometheus/tests)
	promtool test rules prometheus/tests/*.yaml

# --- benchmark -------------------------------------------------------------------------
# Capacity (bench/capacity.py), path overhead (direct / Nginx / Nginx + relay) and
# failover against the article's
# Nginx and SGLang's router, in one run: bench/results/ and docs/benchmarks.md.
# The lock serialises load-generating runs on a shared host (timings stay honest).
.PHONY: bench
BENCH_TRIALS ?= 2
DOCKER_LOCK  ?= /tmp/sglang-ha-docker.lock
bench: venv docker secrets  ## every phase: capacity, gateway bars, overhead, failover vs baselines, pool; $(BENCH_TRIALS) trials (~40 min)
	flock $(DOCKER_LOCK) $(PY) -m bench --trials $(BENCH_TRIALS) --out bench/results

# The capacity table alone (bench/capacity.py, ~6 min): events/s, TTFT, ITL and CPU
# per event, direct / Nginx / SGLang's router / our gateway at 1 and N relay workers.
.PHONY: bench-capacity
bench-capacity: venv docker secrets  ## capacity: events/s and CPU per event per path (~6 min)
	flock $(DOCKER_LOCK) $(PY) -m bench --phases capacity --out bench/results

# The gateway's three bars in one run: CPU per streamed event against Nginx alone +
# SGLang's router (capacity), added latency at light load and relay-worker scaling
# (bench/gateway_bars.py, local processes against a fixed-rate synthetic engine).
.PHONY: bench-gateway
bench-gateway: venv docker secrets  ## the gateway's bars: CPU per event, light-load latency, worker scaling (~11 min)
	flock $(DOCKER_LOCK) $(PY) -m bench --phases capacity,light-latency,relay-scaling --out bench/results

# The pool phase alone (bench/pool.py): requests/s of the pair, a 2-node pool and
# SGLang's router over the same engines limited by their running slots, and failed
# requests on kill -9 and freeze.
.PHONY: bench-pool
bench-pool: venv docker secrets  ## pool vs pair vs SGLang's router, slot-limited engines (~10 min)
	flock $(DOCKER_LOCK) $(PY) -m bench --phases pool --trials $(BENCH_TRIALS) --out bench/results

.PHONY: clean
clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache reports
