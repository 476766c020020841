# The two commands of the README: `make run` and `make test`. Both create and use .venv in the repo root.
VENV := .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# Offline GPT-2 tokenizer files when the project sits beside the shared folder (tests, CI).
SHARED_TIKTOKEN := $(abspath ../shared/tiktoken_cache)
ifneq ($(wildcard $(SHARED_TIKTOKEN)),)
export TIKTOKEN_CACHE_DIR ?= $(SHARED_TIKTOKEN)
endif

.PHONY: install run demo test bench

$(STAMP): pyproject.toml
	test -x $(PYTHON) || python3 -m venv $(VENV)
	# torch first and pinned: a bare torch requirement would pull a multi-GB CUDA build.
	$(PYTHON) -m pip install --disable-pip-version-check -q torch==2.13.0
	$(PYTHON) -m pip install --disable-pip-version-check -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/scratchllm up

demo: $(STAMP)
	$(VENV)/bin/scratchllm demo

# the suite's layers (tests/conftest.py): unit needs no server, api runs on SQLite, integration on PostgreSQL
# and Redis with real workers. The API tests are CPU-bound (two processes for two cores); the integration
# tests mostly wait for worker processes, so three of them share the cores.
test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports
	$(VENV)/bin/python -m pytest tests/unit
	$(VENV)/bin/python -m pytest tests/api -m "not integration" -n 2 --dist worksteal
	$(VENV)/bin/python -m pytest tests/integration tests/api -m integration -n 3 --dist worksteal --durations=20

bench: $(STAMP)
	$(PYTHON) bench/bench_speed.py
