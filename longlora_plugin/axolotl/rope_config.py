"""The run's RoPE, written where Axolotl and transformers read it: ``model_config`` (the
overrides Axolotl applies when it loads the model) and a saved ``config.json``."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from longlora_plugin.axolotl.logs import info
from longlora_plugin.config import LongLoRAConfigError
from longlora_plugin.rope import RopeResolution

LOG = logging.getLogger("longlora_plugin")


def apply_model_config_overrides(cfg: Any, rope: RopeResolution) -> None:
    """Merge ``rope.config_overrides`` into ``model_config`` (alias
    ``overrides_of_model_config``), which Axolotl applies to the config it loads.

    A user-set ``rope_parameters`` that differs is an error; other user-set keys win.
    Calling twice with the same resolution is a no-op.
    """
    keys = [k for k in ("model_config", "overrides_of_model_config") if cfg.get(k) is not None]
    for key in keys or ["model_config"]:
        existing = dict(cfg.get(key) or {})
        for legacy in ("rope_parameters", "rope_scaling"):
            if legacy in existing and existing[legacy] != rope.rope_parameters:
                raise LongLoRAConfigError(
                    f"{key}.{legacy}={existing[legacy]!r} is set, and longlora.rope.type="
                    f"{rope.rope_type!r} would replace it with {rope.rope_parameters!r}; remove "
                    f"{key}.{legacy}, or set longlora.rope.type: none to keep yours"
                )
        merged = dict(existing)
        for name, value in rope.config_overrides.items():
            if name in existing and name != "rope_parameters" and existing[name] != value:
                LOG.warning(
                    "longlora: keeping %s.%s=%r (LongLoRA would set %r)",
                    key,
                    name,
                    existing[name],
                    value,
                )
                continue
            merged[name] = value
        cfg[key] = merged


def patch_config_json(path: Path, rope: RopeResolution) -> bool:
    """Merge ``rope.config_overrides`` into the ``config.json`` at ``path``; return
    whether the file changed. Idempotent."""
    if not path.is_file():
        return False
    data = json.loads(path.read_text(encoding="utf-8"))
    new = rope.apply_to_config_dict(data)
    if new == data:
        return False
    path.write_text(json.dumps(new, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    info("longlora: wrote rope_parameters %s into %s", rope.rope_parameters, path)
    return True


def check_model_rope(model: Any, rope: RopeResolution) -> None:
    """Warn when the built model does not carry the RoPE the plugin wrote."""
    if not rope.scaled:
        return
    params = getattr(getattr(model, "config", None), "rope_parameters", None) or {}
    if params.get("rope_type") != rope.rope_type or params.get("factor") != rope.factor:
        LOG.warning(
            "longlora: the model was built with rope_parameters %s, expected %s "
            "(was model_config overridden after the plugin's register?)",
            params,
            rope.rope_parameters,
        )
