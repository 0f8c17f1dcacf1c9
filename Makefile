# Every target installs first: `make serve` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: install test test-fast serve bench lint proto clean

install: $(STAMP)

# The CPU torch build is installed first and pinned (constraints.txt) so that nothing pulls a
# multi-GB CUDA build; then the package itself, editable, with its dev extras.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c constraints.txt torch
	$(PIP) install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

test: install
	$(PY) -m pytest -q

serve: install
	$(VENV)/bin/moe-runtime serve

bench: install
	$(PY) bench/engine_throughput.py
	$(PY) bench/kernels.py

lint: install
	$(VENV)/bin/ruff check moe_runtime kernels cluster tests bench

proto: install
	$(PY) -m grpc_tools.protoc -I proto --python_out=. --pyi_out=. --grpc_python_out=. \
	    proto/moe_runtime/v1/*.proto

clean:
	rm -rf $(VENV) build dist *.egg-info
