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

# Each leg: two pytest-xdist workers (the machine's 2 cores) that take whole modules, so a
# module's shared training runs are paid once, in the order tests/conftest.py gives (the
# heaviest modules first; xdist would put modules with few tests last); the 15 slowest
# tests and the leg's wall time are printed. Budget: `make test` <= 30 min from a fresh
# clone (README).
PYTEST := -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=15
# wall time of a command, after its output; keeps its exit status
TIMED = start=$$(date +%s); $(1); rc=$$?; echo "=== $(2): $$(( $$(date +%s) - start )) s wall"; exit $$rc
# the 0.21 venv is built in the background while the 0.19 leg runs (pip is mostly I/O)
VENV21_BUILD := $(VENV21).build

# printed before each leg's tests
LEG_INFO := 'import importlib.metadata as m, platform; print("=== test leg: Axolotl", m.version("axolotl") + ", Python", platform.python_version() + ", torch", m.version("torch"))'

.PHONY: venv venv-0.21 test test-0.19 test-0.21 lint demo bench clean

# DeepSpeed compiles its CPU communication op (shared memory) the first time a process
# group starts, into ~/.cache/torch_extensions, again for each new venv path: ~1 min,
# done here so that no test pays it (the 0.21 venv builds in the background of leg 1).
DS_CPU_OP := 'from deepspeed.comm.torch import build_shm_op; build_shm_op()'

# torch first, pinned: an unpinned resolve would pull another (multi-GB) build
$(VENV)/.installed: pyproject.toml constraints/axolotl-0.19.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints/axolotl-0.19.txt torch
	$(PY) -m pip install -q -c constraints/axolotl-0.19.txt -e '.[dev]'
	DS_ACCELERATOR=cpu $(PY) -c $(DS_CPU_OP)
	touch $@

$(VENV21)/.installed: pyproject.toml constraints/axolotl-0.21.txt
	test -x $(PY21) || $(PYTHON312) -m venv $(VENV21)
	$(PY21) -m pip install -q -c constraints/axolotl-0.21.txt torch
	$(PY21) -m pip install -q -c constraints/axolotl-0.21.txt -e '.[dev]'
	DS_ACCELERATOR=cpu $(PY21) -c $(DS_CPU_OP)
	touch $@

venv: $(VENV)/.installed

venv-0.21: $(VENV21)/.installed

lint: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test:
ifneq ($(PYTHON312),)
	@rm -f $(VENV21_BUILD).log; ($(MAKE) --no-print-directory venv-0.21 > $(VENV21_BUILD).log 2>&1; echo $$? > $(VENV21_BUILD).rc) & echo $$! > $(VENV21_BUILD).pid
endif
	$(MAKE) --no-print-directory lint
	$(MAKE) --no-print-directory test-0.19
	$(MAKE) --no-print-directory test-0.21

test-0.19: venv
	@$(PY) -c $(LEG_INFO)
	@$(call TIMED,$(PY) $(PYTEST),test leg Axolotl 0.19)

# Without Python 3.12 the 0.21 leg cannot run: an error under CI, a plain notice elsewhere.
test-0.21:
ifeq ($(PYTHON312),)
	@if [ "$$CI" = "true" ]; then \
	  echo "ERROR: the Axolotl 0.21 test leg needs Python 3.12 (python3.12 on PATH or a pyenv 3.12.x; e.g. 'pyenv install 3.12'), or PYTHON312=/path/to/python3.12" >&2; exit 1; \
	fi
	@echo "=== test leg SKIPPED: Axolotl 0.21 (no Python 3.12 found: put python3.12 on PATH, install it with pyenv, or set PYTHON312=...)"
else
	@if [ -f $(VENV21_BUILD).pid ]; then \
	  pid=$$(cat $(VENV21_BUILD).pid); while kill -0 $$pid 2>/dev/null; do sleep 2; done; \
	  echo "=== background build of $(VENV21): exit $$(cat $(VENV21_BUILD).rc 2>/dev/null || echo '?')"; \
	  rm -f $(VENV21_BUILD).pid; \
	fi
	$(MAKE) --no-print-directory venv-0.21
	@$(PY21) -c $(LEG_INFO)
	@$(call TIMED,$(PY21) $(PYTEST),test leg Axolotl 0.21)
endif

# make demo TEXT=my.txt (or a directory of .txt files) trains on your text instead of Austen
demo: venv
	$(PY) -m demo $(if $(TEXT),--text "$(TEXT)") $(if $(HOLDOUT),--holdout "$(HOLDOUT)")

bench: venv
	$(PY) -m benchmarks.s2_attn_bench

clean:
	rm -rf $(VENV) $(VENV21) $(VENV21_BUILD).* outputs .pytest_cache
