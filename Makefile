# Every target builds what it needs from scratch: a fresh clone needs only python3 (>= 3.11) and make.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
RUNTIME := $(VENV)/.runtime
DEV     := $(VENV)/.dev
# pip's output is kept in a log and shown only when the install fails.
PIP_QUIET = > $(VENV)/pip.log 2>&1 || { cat $(VENV)/pip.log; exit 1; }

.DEFAULT_GOAL := help
.PHONY: help install demo test lint bench clean

help: ## list the targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

$(RUNTIME): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing the runtime dependencies into $(VENV) (once)"
	@$(BIN)/pip install --disable-pip-version-check -e . $(PIP_QUIET)
	@touch $(RUNTIME)

$(DEV): $(RUNTIME)
	@echo "installing the development tools into $(VENV) (once)"
	@$(BIN)/pip install --disable-pip-version-check -e '.[dev]' $(PIP_QUIET)
	@touch $(DEV)

install: $(DEV) ## create .venv and install the package with its dev tools

demo: $(RUNTIME) ## run jobs/demo.yaml on the built-in simulator (no key, no network)
	$(BIN)/pipeline run jobs/demo.yaml --simulate --sim-latency 0.4
	@echo "report: $$($(BIN)/pipeline report jobs/demo.yaml)"

test: $(DEV) ## run the whole test suite
	$(BIN)/pytest

lint: $(DEV) ## ruff (lint + format check) and mypy
	$(BIN)/ruff check pipeline tests bench
	$(BIN)/ruff format --check pipeline tests bench
	$(BIN)/mypy pipeline

clean: ## remove the virtualenv and generated output
	rm -rf $(VENV) output/*/ *.egg-info

bench: $(DEV) ## benchmark the real CLI on the simulator (minutes; prints a table, writes output/bench/latest.json)
	$(BIN)/python bench/bench.py
