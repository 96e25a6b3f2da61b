# plcbridge: `make run` starts the demo gateway, `make test` runs the whole suite.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CERTS := var/dev-certs

.PHONY: run test lint typecheck venv deps-run deps-test certs bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

# Debian packages, installed only when missing and only as root: mosquitto is the broker
# of the demo and the tests; socat and faketime serve the serial-line and clock tests.
RUN_TOOLS := /usr/sbin/mosquitto:mosquitto /usr/bin/mosquitto_sub:mosquitto-clients
TEST_TOOLS := $(RUN_TOOLS) /usr/bin/socat:socat /usr/bin/faketime:faketime

define install_missing
	@missing=""; \
	for entry in $(1); do \
		[ -x "$${entry%%:*}" ] || missing="$$missing $${entry##*:}"; \
	done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ]; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
		else \
			echo "missing Debian packages:$$missing; run: sudo apt-get install$$missing" >&2; \
			exit 1; \
		fi; \
	fi
endef

deps-run:
	$(call install_missing,$(RUN_TOOLS))

deps-test:
	$(call install_missing,$(TEST_TOOLS))

certs: venv
	$(PY) -m devstack.dev_certs $(CERTS)

run: venv deps-run certs
	$(PY) -m devstack.demo

lint: venv
	$(PY) -m ruff check common processes cli devstack token_server tests bench

typecheck: venv
	$(PY) -m mypy

# Two workers, because most tests wait on real processes rather than compute. Each run gets
# its own short temporary folder: pytest-xdist adds a level to the paths, and the runtime
# folders of the gateways under test must stay within the Unix socket path limit.
test: venv deps-test certs lint typecheck
	$(PY) -m pytest -q -n 2 --basetemp="$$(mktemp -d /tmp/pbt-XXXXXX)"

bench: venv deps-run certs
	$(PY) bench/run_all.py

clean:
	rm -rf var .pytest_cache .mypy_cache .ruff_cache
