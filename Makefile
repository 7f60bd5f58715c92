# `make test` and `make demo` set everything up themselves on a fresh machine (a venv in .venv).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO_ARGS ?=

.PHONY: test demo setup clean-outputs

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

# The free enhancers the model is compared with (peers.py); the tests of that comparison need them.
$(VENV)/.peers: $(VENV)/.installed requirements-peers.txt
	$(PY) -m pip install --quiet -r requirements-peers.txt
	touch $@

setup: $(VENV)/.installed

test: $(VENV)/.installed $(VENV)/.peers
	$(PY) -m pytest -q tests

demo: $(VENV)/.installed
	$(PY) demo.py $(DEMO_ARGS)

clean-outputs:
	rm -rf outputs
