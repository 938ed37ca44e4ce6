# Every target builds what it needs from scratch: a fresh clone needs only python3 (>= 3.11) and make.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help install demo test lint bench clean

help: ## list the targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) ## create .venv and install the package with its dev tools

demo: install ## run jobs/demo.yaml on the built-in simulator (no key, no network)
	$(BIN)/pipeline run jobs/demo.yaml --simulate --sim-latency 0.4
	@echo "report: $$($(BIN)/pipeline report jobs/demo.yaml)"

test: install ## run the whole test suite
	$(BIN)/pytest

lint: install ## ruff (lint + format check) and mypy
	$(BIN)/ruff check pipeline tests bench
	$(BIN)/ruff format --check pipeline tests bench
	$(BIN)/mypy pipeline

clean: ## remove the virtualenv and generated output
	rm -rf $(VENV) output/*/ *.egg-info

bench: install ## benchmark the real CLI on the simulator (minutes; prints a table, writes output/bench/latest.json)
	$(BIN)/python bench/bench.py
