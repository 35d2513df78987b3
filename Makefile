# Set-up and entry points. Every target creates the virtual environment first if needed.
#   make demo   the offline SDCE demo (no network, ~5 min on 2 CPU cores)
#   make test   the test suite
#   make xla-test  the XLA lane (torch_xla on the CPU; CI runs it too)

VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

XLA_VENV ?= .venv-xla

.PHONY: demo test xla-env xla-test clean

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

# The XLA lane: torch/torch_xla 2.9.0 on the CPU in their own environment (scripts/setup_xla_env.sh).
xla-env:
	XLA_VENV=$(XLA_VENV) bash scripts/setup_xla_env.sh

xla-test: xla-env
	PJRT_DEVICE=CPU $(XLA_VENV)/bin/python -m pytest tests/xla $(PYTEST_ARGS)

# The compose lane: the CPU stack of deploy/docker-compose.yml under a real Docker engine, a
# surrogate restart mid-training included (deploy/compose_test.py; needs no .venv).
.PHONY: compose-test
compose-test:
	python3 deploy/compose_test.py

clean:
	rm -rf $(VENV) $(XLA_VENV) .cache outputs
