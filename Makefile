# edgewise: `make demo`, `make test`, `make bench` each do their own set-up on a fresh
# Debian/Ubuntu machine with Python 3.11 (virtual environment in .venv).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
STAMP  := $(VENV)/.installed

.PHONY: setup demo test test-pg test-pg-db bench system-deps pg-deps clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[all,dev]'
	# Data only: the BasicMotions set ships inside aeon; --no-deps keeps aeon's numba/pandas pins out
	# (edgewise reads the .ts files itself and never imports aeon). See docs/dependencies.md.
	$(BIN)/python -m pip install -q --no-deps aeon==1.6.0
	touch $@

setup: $(STAMP)

# Real parts for the tests: Mosquitto (MQTT broker) and headless Chromium (dashboard).
system-deps:
	@if ! command -v mosquitto >/dev/null && ! test -x /usr/sbin/mosquitto || ! command -v chromium >/dev/null \
	    || ! test -e /usr/lib/softhsm/libsofthsm2.so; then \
		$(SUDO) apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends mosquitto chromium softhsm2; \
	fi

# PostgreSQL from Debian's packages for `make test-pg`: only the binaries are used (each test session
# starts a private cluster on a free loopback port: tests/pg.py), never the system service.
pg-deps:
	@if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
		$(SUDO) apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends postgresql; \
	fi

# The whole suite against PostgreSQL (docs/scale-out-postgres.md).
test-pg: setup system-deps pg-deps
	EDGEWISE_TEST_DB=postgresql $(BIN)/python -m pytest -q -p no:cacheprovider

# Only the tests that use a control-plane database (marker `db`, set by tests/conftest.py), on PostgreSQL.
test-pg-db: setup system-deps pg-deps
	EDGEWISE_TEST_DB=postgresql $(BIN)/python -m pytest -q -p no:cacheprovider -m "db and not slow"

demo: setup
	$(BIN)/edgewise demo

test: setup system-deps
	$(BIN)/python -m pytest -q -p no:cacheprovider
	$(MAKE) --no-print-directory test-pg-db   # the database-touching tests again, on PostgreSQL (docs/scale-out-postgres.md)

bench: setup system-deps
	$(BIN)/python -m pip install -q nncf==3.4.0   # comparison baseline only
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build dist src/*.egg-info
