# Two commands on a fresh machine:
#   make run    set up .venv and run the daemon (vattnd start, default settings)
#   make test   set up .venv and run the test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup run test proto bench clean

$(VENV)/.installed: pyproject.toml setup.py client/vattn/_vmm.c
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q "$(TORCH)" -e '.[test,dev]'
	touch $@

setup: $(VENV)/.installed

run: setup
	$(VENV)/bin/vattnd start

test: setup
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

# Regenerate client/vattn/v1 from proto/ (a test fails when it is stale).
proto: setup
	$(VENV)/bin/python scripts/gen_proto.py

bench: setup
	$(VENV)/bin/python bench/bench_rpc.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info
