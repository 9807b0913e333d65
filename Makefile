# Two commands on a fresh machine: `make test` and `make demo`. Both create their venvs.
#
# `make test` runs the suite on both supported Axolotl lines, each in its own venv:
#   .venv        Axolotl 0.19, Python 3.11 (PYTHON), torch 2.13.0 CPU   (constraints/axolotl-0.19.txt)
#   .venv-ax021  Axolotl 0.21, Python 3.12 (PYTHON312), torch 2.14.1     (constraints/axolotl-0.21.txt)
SHELL := /bin/bash
PYTHON ?= python3
PYTHON312 ?= $(shell .ci/find-python 3.12)
VENV := .venv
VENV21 := .venv-ax021
PY := $(VENV)/bin/python
PY21 := $(VENV21)/bin/python

# Offline, no telemetry: without AXOLOTL_DO_NOT_TRACK axolotl hangs at exit with no network.
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export WANDB_MODE := disabled
export AXOLOTL_DO_NOT_TRACK := 1
export DO_NOT_TRACK := 1
export TOKENIZERS_PARALLELISM := false
export PYTHONWARNINGS := ignore::DeprecationWarning
# DeepSpeed (the dev extra: the sharding tests) builds from source; its CUDA ops are
# compiled on first use, never at install (a CPU machine has no CUDA toolkit).
export DS_BUILD_OPS := 0

# printed before each leg's tests
LEG_INFO := 'import importlib.metadata as m, platform; print("=== test leg: Axolotl", m.version("axolotl") + ", Python", platform.python_version() + ", torch", m.version("torch"))'

.PHONY: venv venv-0.21 test test-0.19 test-0.21 lint demo bench clean

# torch first, pinned: an unpinned resolve would pull another (multi-GB) build
$(VENV)/.installed: pyproject.toml constraints/axolotl-0.19.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints/axolotl-0.19.txt torch
	$(PY) -m pip install -q -c constraints/axolotl-0.19.txt -e '.[dev]'
	touch $@

$(VENV21)/.installed: pyproject.toml constraints/axolotl-0.21.txt
	test -x $(PY21) || $(PYTHON312) -m venv $(VENV21)
	$(PY21) -m pip install -q -c constraints/axolotl-0.21.txt torch
	$(PY21) -m pip install -q -c constraints/axolotl-0.21.txt -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

venv-0.21: $(VENV21)/.installed

lint: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: lint test-0.19 test-0.21

test-0.19: venv
	@$(PY) -c $(LEG_INFO)
	$(PY) -m pytest -q

# Without Python 3.12 the 0.21 leg cannot run: an error under CI, a plain notice elsewhere.
test-0.21:
ifeq ($(PYTHON312),)
	@if [ "$$CI" = "true" ]; then \
	  echo "ERROR: the Axolotl 0.21 test leg needs Python 3.12 (python3.12 on PATH or a pyenv 3.12.x; e.g. 'pyenv install 3.12'), or PYTHON312=/path/to/python3.12" >&2; exit 1; \
	fi
	@echo "=== test leg SKIPPED: Axolotl 0.21 (no Python 3.12 found: put python3.12 on PATH, install it with pyenv, or set PYTHON312=...)"
else
	$(MAKE) --no-print-directory venv-0.21
	@$(PY21) -c $(LEG_INFO)
	$(PY21) -m pytest -q
endif

# make demo TEXT=my.txt (or a directory of .txt files) trains on your text instead of Austen
demo: venv
	$(PY) -m demo $(if $(TEXT),--text "$(TEXT)") $(if $(HOLDOUT),--holdout "$(HOLDOUT)")

bench: venv
	$(PY) -m benchmarks.s2_attn_bench

clean:
	rm -rf $(VENV) $(VENV21) outputs .pytest_cache
