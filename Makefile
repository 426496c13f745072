# Two commands do all the set-up on a fresh machine with only Python 3.10+:
#   make run    creates .venv, installs the package with its extras, runs the main job
#   make test   creates .venv, installs the package with its extras, runs the whole suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch==2.13.0 is a CPU build on local disk on our machines; the package accepts torch >= 2.4.
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: run test kernels bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test,torch,nvrtc,demo]"
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m cupy_localrel demo

# pytest exits 5 when it collected no test: that is a failure here, not a pass.
test: $(STAMP)
	$(PY) -m cupy_localrel kernels
	$(PY) -m pytest -q -p no:cacheprovider; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

kernels: $(STAMP)
	$(PY) -m cupy_localrel kernels

bench: $(STAMP)
	$(PY) -m benchmarks.run --quick

clean:
	rm -rf $(VENV) build dist *.egg-info
