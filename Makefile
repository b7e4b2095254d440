# Two entry points: `make run` (the default campaign) and `make test`.
# Both bootstrap everything on a fresh Debian machine as root.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
QEMU   := /usr/bin/qemu-img

.PHONY: run test lint typecheck pytest deps bytecode spec clean

run: deps
	$(VENV)/bin/qcow2lab run

test: deps lint typecheck pytest

deps: $(QEMU) $(STAMP) bytecode

# An editable install leaves the packages uncompiled, and with PYTHONDONTWRITEBYTECODE set
# (as on the project's machines) every command would compile them again: about 50 ms of each
# CLI start-up (tests/difftest/test_cli_startup.py). A regular pip install compiles at install
# time; this does the same, and costs a few ms when nothing changed.
bytecode: $(STAMP)
	@$(PY) -m compileall -q spec model impl difftest >/dev/null

$(QEMU):
	@command -v qemu-img >/dev/null 2>&1 || { \
	  echo "qemu-img missing: installing qemu-utils"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-utils; }

$(STAMP): pyproject.toml
	@python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || { \
	  echo "python3 with venv missing: installing python3-venv"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-venv python3-pip; }
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

lint:
	$(VENV)/bin/ruff check spec model impl difftest tests examples

typecheck:
	$(VENV)/bin/mypy

pytest:
	$(VENV)/bin/pytest -q -n 2

spec: deps
	$(VENV)/bin/qcow2lab spec > docs/spec.md

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
