# plcbridge: `make run` starts the demo gateway, `make test` runs the whole suite.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CERTS := var/dev-certs

.PHONY: run test check lint typecheck venv deps certs bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

# Debian's mosquitto is the broker of the demo and the tests; socat and faketime serve the
# serial-line and clock tests. Installed only when missing and when running as root.
deps:
	@missing=""; \
	for tool in /usr/sbin/mosquitto /usr/bin/mosquitto_sub /usr/bin/socat /usr/bin/faketime; do \
		[ -x "$$tool" ] || missing="$$missing $$tool"; \
	done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ]; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
				mosquitto mosquitto-clients socat faketime >/dev/null; \
		else \
			echo "missing:$$missing; run: sudo apt-get install mosquitto mosquitto-clients socat faketime" >&2; \
			exit 1; \
		fi; \
	fi

certs: venv
	$(PY) -m devstack.dev_certs $(CERTS)

run: venv deps certs
	$(PY) -m devstack.demo

lint: venv
	$(PY) -m ruff check common processes cli devstack tests bench

typecheck: venv
	$(PY) -m mypy

test: venv deps certs lint typecheck
	$(PY) -m pytest -q

bench: venv deps certs
	$(PY) bench/run_all.py

clean:
	rm -rf var .pytest_cache .mypy_cache .ruff_cache
