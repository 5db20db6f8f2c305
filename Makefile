# make demo: install into .venv (first time) and materialise every asset for the tiny source.
# make lock: pin every installed package in requirements.lock (after changing dependencies).
# make ui:   browse the demo's runs and assets in the Dagster UI (http://127.0.0.1:3000).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
LOCK := requirements.lock
export DAGSTER_HOME ?= $(CURDIR)/.dagster

.PHONY: venv lock demo test ui clean-demo

venv: $(VENV)/.installed

# Every version pinned by requirements.lock (torch's CPU build among them: an unpinned torch
# pulls a multi-GB CUDA build), so nothing is resolved. uv (itself pinned there) installs the
# ~200 wheels in parallel, about 6x faster than pip; it does not read pip's configuration, so the
# wheel folder pip is configured with (where torch's CPU build lies) is passed on. If uv cannot
# install (no index it can reach), pip does the same from the same lock.
FIND_LINKS ?= $(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null)

$(VENV)/.installed: pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c $(LOCK) uv
	$(BIN)/uv pip install -q --python $(BIN)/python -c $(LOCK) $(FIND_LINKS:%=--find-links %) \
		-e '.[dev]' || $(BIN)/pip install -c $(LOCK) -e '.[dev]'
	touch $@

# After changing dependencies in pyproject.toml: install them into .venv, run `make test`, then
# pin what the tests ran with.
lock: venv
	{ sed -n '1,2p' $(LOCK); $(BIN)/pip freeze --exclude-editable; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)

demo: venv
	$(BIN)/python -m pipelines.demo

# The tests on TEST_WORKERS processes (pytest-xdist), whole files at a time so that a file's
# module fixtures (a store, a model, the GPT-2-dims run) are built once, the files holding a
# `slow` test first (tests/conftest.py orders them; --no-loadscope-reorder keeps that order).
# TEST_WORKERS=0 runs them in this process, one after another.
TEST_WORKERS ?= 2

test: venv
	$(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder
	$(BIN)/ruff check .

ui: venv
	mkdir -p $(DAGSTER_HOME)
	$(BIN)/dagster dev -w workspace.yaml

clean-demo:
	rm -rf .dagster featstore-data
