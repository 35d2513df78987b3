# Set-up and entry points. Every target creates the virtual environment first if needed.
#   make demo   the offline SDCE demo (no network, ~10 min on 2 CPU cores)
#   make test   the test suite

VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	# torch first, pinned: on the CI machines this exact version is a local CPU wheel.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $@

demo: $(STAMP)
	$(PY) -m trainer.demo

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .cache outputs
