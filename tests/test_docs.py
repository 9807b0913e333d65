"""The README's config reference lists every key the schema accepts, and no other."""

from __future__ import annotations

import re
import typing
from pathlib import Path

from pydantic import BaseModel

from longlora_plugin.config import LongLoRAConfig

README = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")


def _schema_keys(model: type[BaseModel], prefix: str) -> set[str]:
    """Leaf keys of ``model``: a field whose type is (optionally) a nested pydantic model
    contributes that model's keys under ``prefix.field``, any other field itself."""
    keys: set[str] = set()
    for name, field in model.model_fields.items():
        nested = [
            t
            for t in (field.annotation, *typing.get_args(field.annotation))
            if isinstance(t, type) and issubclass(t, BaseModel)
        ]
        if nested:
            keys |= _schema_keys(nested[0], f"{prefix}.{name}")
        else:
            keys.add(f"{prefix}.{name}")
    return keys


def test_config_reference_matches_the_schema():
    keys = _schema_keys(LongLoRAConfig, "longlora")
    assert "longlora.rope.factor" in keys and "longlora.eval.ppl_lengths" in keys
    documented = set(re.findall(r"^\| `(longlora\.[a-z0-9_.]+)` \|", README, flags=re.MULTILINE))
    assert documented == keys


def test_readme_commands_exist_in_the_makefile():
    makefile = (Path(__file__).parents[1] / "Makefile").read_text(encoding="utf-8")
    for target in re.findall(r"^make (\w+)", README, flags=re.MULTILINE):
        assert re.search(rf"^{target}:", makefile, flags=re.MULTILINE), target
