"""The package's architecture holds: the LongLoRA core and the tools that do not need
Axolotl never import it (the Axolotl adapter does, lazily, when Axolotl loads it)."""

from __future__ import annotations

import subprocess
import sys

CORE = [
    "longlora_plugin",
    "longlora_plugin.s2",
    "longlora_plugin.s2.context_parallel",
    "longlora_plugin.rope",
    "longlora_plugin.trainable",
    "longlora_plugin.hookspecs",
    "longlora_plugin.config",
    "longlora_plugin.memory",
    "longlora_plugin.evaluation.runner",
    "longlora_plugin.cli",
]


def test_core_does_not_import_axolotl():
    code = (
        "import importlib, sys\n"
        f"for name in {CORE!r}: importlib.import_module(name)\n"
        "from longlora_plugin.cli import build_parser\n"
        "build_parser()\n"
        "bad = sorted(m for m in sys.modules if m == 'axolotl' or m.startswith('axolotl.'))\n"
        "assert not bad, bad[:5]\n"
        "import longlora_plugin\n"
        "assert longlora_plugin.LongLoRAPlugin.__module__ == 'longlora_plugin.axolotl.plugin'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
