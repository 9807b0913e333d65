"""Shared pytest setup: offline/no-telemetry environment, Axolotl plugin-state reset,
tiny-model and dataset fixtures (helpers live in ``tests/support/tiny_models.py``)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from longlora_plugin.offline import OFFLINE_ENV
from tests.support.tiny_models import build_tiny_model, write_text_dataset

# Set before anything imports huggingface_hub/transformers/axolotl: they read these at
# import time. AXOLOTL_DO_NOT_TRACK=1 is mandatory offline (telemetry flush hangs).
os.environ.update(OFFLINE_ENV)


# The modules that cost the most worker time (``--durations=0`` of one leg on the 2-core
# machine, 2026-12-07: 296 / 351 / 114 / 82 / 60 s of the leg's 1134), scheduled first so
# that no worker is left with one of them while the other has nothing to do (the Makefile
# passes ``--no-loadscope-reorder``; xdist's own order puts modules with few tests last,
# and the effect test's module has two).
HEAVY_FIRST = (
    "tests/demo/test_extension_effect.py",
    "tests/axolotl/test_sharding.py",
    "tests/demo/test_demo.py",
    "tests/axolotl/test_memory_features.py",
    "tests/axolotl/test_plugin_train.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Move the :data:`HEAVY_FIRST` modules to the front, in that order; the rest keep
    their collection order (a stable sort)."""
    rank = {path: i for i, path in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))


def _reset_axolotl_plugins() -> None:
    """Empty Axolotl's PluginManager singleton in place.

    The instance is kept (not replaced): ``axolotl.loaders.*`` and ``axolotl.train``
    bind it to module-level ``PLUGIN_MANAGER`` at import time. Nothing is imported if
    Axolotl was never loaded in this process.
    """
    module = sys.modules.get("axolotl.integrations.base")
    if module is None:
        return
    manager = module.PluginManager.get_instance()
    manager.plugins.clear()
    manager.cfg = None


@pytest.fixture(autouse=True)
def offline_and_fresh_plugins(monkeypatch: pytest.MonkeyPatch):
    """Every test: offline/no-telemetry env vars, an empty Axolotl plugin registry, and
    the process environment given back afterwards. Axolotl's in-process config loading
    writes to ``os.environ`` (0.21's ``prepare_optim_env`` sets
    ``PARALLELISM_CONFIG_CP_SIZE`` for ``context_parallel_size``): left there, it would
    reach every later subprocess of the same pytest process."""
    saved = dict(os.environ)
    for key, value in OFFLINE_ENV.items():
        monkeypatch.setenv(key, value)
    _reset_axolotl_plugins()
    yield
    _reset_axolotl_plugins()
    if dict(os.environ) != saved:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory: pytest.TempPathFactory):
    """``make(arch="llama", **config_overrides) -> Path``: build (once per distinct
    arguments in the session) a tiny random-weight model directory with tokenizer."""
    cache: dict[tuple, Path] = {}

    def make(arch: str = "llama", **overrides) -> Path:
        key = (arch, tuple(sorted(overrides.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp(f"tiny-{arch}")
            cache[key] = build_tiny_model(out, arch=arch, **overrides)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_llama(tiny_model_factory) -> Path:
    """Tiny Llama (hidden 64, 2 layers, 4 heads / 2 KV heads, context 64)."""
    return tiny_model_factory("llama")


@pytest.fixture(scope="session")
def text_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """jsonl of 64 ``{"text": ...}`` documents, about 45-250 tiny-tokenizer tokens each."""
    return write_text_dataset(tmp_path_factory.mktemp("data") / "data.jsonl")
