# dc-broker: `make demo` and `make test` set themselves up (a .venv with the project and its test tools).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck unit install-test systemd-test test-packages bench fuzz clean

# An editable install (hatchling: a static .pth naming broker/ and client/, the import packages
# dc_broker and dc_token beneath them) with the dev IdP extra and the test tools.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[dev,test]'
	@touch $(STAMP)

demo: $(STAMP)
	bash docs/demo.sh

lint: $(STAMP)
	$(BIN)/ruff check broker client tests bench
	$(BIN)/ruff format --check broker client tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

# the Debian packages the tests need (systemd-nspawn, dbus, gnome-keyring), before pytest, never
# inside a test; waits for another process's dpkg/apt lock instead of failing (.ci/packages)
test-packages:
	bash .ci/packages

# in parallel worker processes (most tests wait on real processes and clocks, not on the CPU), one
# file per worker at a time, so a file's module fixtures (a booted container among them) are set up
# once (xdist_group groups nothing under pytest 9, so --dist loadgroup cannot do it), then the few
# tests that assert a latency bound (marker `alone`) with nothing beside them
JOBS ?= 4
unit: $(STAMP) test-packages
	$(BIN)/python -m pytest -q -n $(JOBS) --dist loadfile --no-loadscope-reorder -m "not alone"
	$(BIN)/python -m pytest -q -m alone

# the wheel as a user installs it (also part of `make unit`: tests/test_install.py, marker `install`)
install-test: $(STAMP)
	$(BIN)/python -m pytest -q -m install

# the units under a real systemd booted in a throwaway container (tests/systemd/, marker `systemd`;
# also part of `make unit`). Needs root and systemd-nspawn (test-packages installs systemd-container).
systemd-test: $(STAMP) test-packages
	$(BIN)/python -m pytest -q -m systemd

test: lint typecheck unit

bench: $(STAMP)
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache bench/results dist build
