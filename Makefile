# The two commands of the README: `make run` and `make test`.
# Both install into .venv, start a local Kafka (unless KAFKA_BOOTSTRAP_SERVERS
# names one) and stop what they started.

SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
KAFKA := deploy/kafka/kafka.sh

# `make test` runs its own broker on other ports than `make run`, so both can run at once.
TEST_KAFKA_ENV := KAFKA_PORT=19092 KAFKA_CONTROLLER_PORT=19093 KAFKA_STATE_DIR=$(CURDIR)/.kafka-test
BENCH_KAFKA_ENV := KAFKA_PORT=19192 KAFKA_CONTROLLER_PORT=19193 KAFKA_STATE_DIR=$(CURDIR)/.kafka-bench
BENCH_STATE_KAFKA_ENV := KAFKA_PORT=19292 KAFKA_CONTROLLER_PORT=19293 KAFKA_STATE_DIR=$(CURDIR)/.kafka-bench-state

.PHONY: install run test lint unit schemas promtool chromium kafka-up kafka-down clean bench bench-state fuzz

install: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "Python 3.11 is required ($(PYTHON) not found)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip==25.3
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $@

run: install
	@deploy/run-demo.sh

test: install chromium
	@status=0; user_broker=$${KAFKA_BOOTSTRAP_SERVERS:-}; \
	$(TEST_KAFKA_ENV) $(KAFKA) start || exit 1; \
	export KAFKA_BOOTSTRAP_SERVERS=$${KAFKA_BOOTSTRAP_SERVERS:-$$($(TEST_KAFKA_ENV) $(KAFKA) bootstrap)}; \
	TRIALWATCH_REQUIRE_KAFKA=1 TRIALWATCH_REQUIRE_BROWSER=1 $(BIN)/pytest || status=$$?; \
	$(MAKE) --no-print-directory lint || status=$$?; \
	if [ -z "$$user_broker" ]; then env -u KAFKA_BOOTSTRAP_SERVERS $(TEST_KAFKA_ENV) $(KAFKA) stop; fi; \
	if [ $$status -eq 0 ]; then echo "make test: all green"; else echo "make test: FAILED ($$status)"; fi; \
	exit $$status

lint: install promtool
	$(BIN)/ruff check service tests benchmarks
	$(BIN)/ruff format --check service tests benchmarks
	$(BIN)/mypy
	$(BIN)/trialwatch schemas --check
	cd deploy/prometheus && promtool check config prometheus.yml && promtool test rules rules_test.yml

# promtool comes with Debian's prometheus package; the service it may start is not wanted.
promtool:
	@command -v promtool >/dev/null || { \
	  echo "installing promtool (Debian package prometheus)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null \
	  && { systemctl stop prometheus 2>/dev/null || pkill -x prometheus || true; }; }

# The DSMB page tests drive Debian's chromium headless over the DevTools protocol.
chromium:
	@command -v chromium >/dev/null || { \
	  echo "installing chromium (Debian package chromium)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; }

unit: install
	$(BIN)/pytest tests/unit

schemas: install
	$(BIN)/trialwatch schemas

# $(call with_bench_broker,KAFKA_ENV,COMMAND): COMMAND with KAFKA_BOOTSTRAP_SERVERS set, to
# yours if you set it, else to a broker started with KAFKA_ENV and stopped after.
with_bench_broker = user_broker=$${KAFKA_BOOTSTRAP_SERVERS:-}; \
	$(1) $(KAFKA) start || exit 1; \
	export KAFKA_BOOTSTRAP_SERVERS=$${KAFKA_BOOTSTRAP_SERVERS:-$$($(1) $(KAFKA) bootstrap)}; \
	$(2); status=$$?; \
	if [ -z "$$user_broker" ]; then env -u KAFKA_BOOTSTRAP_SERVERS $(1) $(KAFKA) stop; fi; \
	exit $$status

# Throughput figures (not a test): a fresh broker of its own, a generated
# cohort, the raw aiokafka ceiling and one worker. BENCH_SUBJECTS=1000 by default.
bench: install
	@$(call with_bench_broker,$(BENCH_KAFKA_ENV),$(BIN)/python benchmarks/throughput.py --subjects $${BENCH_SUBJECTS:-1000})

# Per-event cost and subject-state size as one subject's history grows, the
# recovery of a partition of 1,000 subjects of 2,000 events (in-process, then
# through a worker on a fresh broker of its own) and the replay rate of the
# 1,000-subject seed cohort (issue 11).
bench-state: install
	@$(call with_bench_broker,$(BENCH_STATE_KAFKA_ENV),$(BIN)/python benchmarks/state_growth.py)

# The whole fuzz suite (not a test target: minutes, not seconds). Every surface
# (decode → engine → worker shell, HL7, FHIR, MLLP, DSMB API) at FUZZ_INPUTS
# inputs; per surface: inputs, accepted, refused by reason, exceptions (must be
# 0), largest output record. `make test` runs 3,000 of each (tests/fuzz).
fuzz: install
	$(BIN)/python -m tests.fuzz --inputs $${FUZZ_INPUTS:-100000} --seed $${FUZZ_SEED:-0}

kafka-up:
	@$(KAFKA) start

kafka-down:
	@$(KAFKA) stop

clean:
	rm -rf $(VENV) .kafka .kafka-test .kafka-bench .kafka-bench-state trialwatch-data .mypy_cache .ruff_cache .pytest_cache
