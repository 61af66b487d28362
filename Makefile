# `make test` and `make demo` do all of their own set-up on a fresh machine: they build .venv with the
# pinned stack of constraints/ci.txt and install this package into it. On a machine that already has
# torch/triton and no network (the GPU machine), run `REVSNN_SYSTEM_PYTHON=1 make test`: it uses the
# current interpreter and installs only this package (no dependencies, no build isolation).
PYTHON ?= python3
VENV ?= .venv
PYTEST_ARGS ?=
# Two pytest workers with one intra-op thread each: on a 2-core machine this is about twice as fast as one
# process with two threads (most kernel tests are Python-bound under Triton's interpreter).
PYTEST_WORKERS ?= 2

ifeq ($(REVSNN_SYSTEM_PYTHON),1)
PY := $(PYTHON)
STAMP := .system-python.stamp
else
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
endif

.PHONY: test demo setup bench clean

setup: $(STAMP)

$(VENV)/.installed: pyproject.toml constraints/ci.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip "setuptools>=77,<82" wheel
	$(VENV)/bin/python -m pip install -q -c constraints/ci.txt -e ".[test]"
	touch $@

.system-python.stamp: pyproject.toml
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

test: setup
	@workers=""; if $(PY) -c "import xdist" 2>/dev/null; then workers="-n $(PYTEST_WORKERS)"; fi; \
	echo "OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -q $$workers $(PYTEST_ARGS) tests"; \
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -q $$workers $(PYTEST_ARGS) tests

# Each demo run writes into its own new folder, runs/train/<YYYYmmdd-HHMMSS>-RevSResNet-digits.
demo: setup
	$(PY) -m revsnn_triton train

clean:
	rm -rf $(VENV) .system-python.stamp build *.egg-info
