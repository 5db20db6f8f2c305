# make demo: install into .venv (first time) and materialise every asset for the tiny source.
# make ui:   browse the demo's runs and assets in the Dagster UI (http://127.0.0.1:3000).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export DAGSTER_HOME ?= $(CURDIR)/.dagster

.PHONY: venv demo test ui clean-demo

venv: $(VENV)/.installed

# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e '.[dev]'
	touch $@

demo: venv
	$(BIN)/python -m pipelines.demo

test: venv
	$(BIN)/pytest -q
	$(BIN)/ruff check .

ui: venv
	mkdir -p $(DAGSTER_HOME)
	$(BIN)/dagster dev -w workspace.yaml

clean-demo:
	rm -rf .dagster featstore-data
