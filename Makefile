# The two commands of the README: `make demo` and `make test`. Everything else serves them.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv bytecode demo test lint bench clean

$(STAMP): pyproject.toml
	@# libvirt-python builds against the system's libvirt, pip-nftables against libnftables:
	@# install them (and QEMU, nft, conntrack, bird2) if missing.
	@(pkg-config --exists libvirt && command -v nft && command -v conntrack && command -v bird) >/dev/null 2>&1 || bash .ci/setup-libvirt.sh
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# The project's bytecode, written ahead: where PYTHONDONTWRITEBYTECODE is set (as here) each
# `orch` process compiled every module it imports again, ~20 ms of `orch --help`'s 170, and
# the tests start hundreds of them. A module changed since is compiled as before.
bytecode: $(STAMP)
	$(PY) -m compileall -q orchestrator agents events schemas

demo: bytecode
	$(VENV)/bin/orch demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: lint bytecode
	$(PY) -m pytest -q -p no:cacheprovider

bench: bytecode
	$(PY) bench/fold.py

clean:
	rm -rf $(VENV) .orch *.egg-info
	find orchestrator agents events schemas -name __pycache__ -prune -exec rm -rf {} +
