# Two commands on a fresh machine: `make test` and `make demo`. Both create .venv when needed.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# Offline, no telemetry: without AXOLOTL_DO_NOT_TRACK axolotl hangs at exit with no network.
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export WANDB_MODE := disabled
export AXOLOTL_DO_NOT_TRACK := 1
export DO_NOT_TRACK := 1
export TOKENIZERS_PARALLELISM := false
export PYTHONWARNINGS := ignore::DeprecationWarning

.PHONY: venv test lint demo bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, pinned to the CPU build: an unpinned resolve would pull a multi-GB CUDA build
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

lint: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: venv lint
	$(PY) -m pytest -q

# make demo TEXT=my.txt (or a directory of .txt files) trains on your text instead of Austen
demo: venv
	$(PY) -m longlora_plugin.demo $(if $(TEXT),--text "$(TEXT)") $(if $(HOLDOUT),--holdout "$(HOLDOUT)")

bench: venv
	$(PY) benchmarks/s2_attn_bench.py

clean:
	rm -rf $(VENV) outputs .pytest_cache
