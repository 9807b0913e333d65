"""The README's config reference lists every key the schema accepts, and no other."""

from __future__ import annotations

import re
from pathlib import Path

from longlora_plugin.config import LongLoRAConfig, LongLoRARopeConfig

README = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")


def test_config_reference_matches_the_schema():
    keys = {f"longlora.{name}" for name in LongLoRAConfig.model_fields if name != "rope"}
    keys |= {f"longlora.rope.{name}" for name in LongLoRARopeConfig.model_fields}
    documented = set(re.findall(r"^\| `(longlora\.[a-z0-9_.]+)` \|", README, flags=re.MULTILINE))
    assert documented == keys


def test_readme_commands_exist_in_the_makefile():
    makefile = (Path(__file__).parents[1] / "Makefile").read_text(encoding="utf-8")
    for target in re.findall(r"^make (\w+)", README, flags=re.MULTILINE):
        assert re.search(rf"^{target}:", makefile, flags=re.MULTILINE), target
