"""Keeping the RoPE interpolation through ``axolotl merge-lora``.

Axolotl 0.21 calls the plugin's ``post_lora_merge`` after merging, which patches the
merged ``config.json`` (:func:`longlora_plugin.axolotl.rope_config.patch_config_json`).
Axolotl 0.19 has no hook after the merge and copies ``config.json`` from ``base_model``:
there the plugin points ``base_model`` at a staged mirror (:func:`stage_merge_base`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from axolotl.integrations.base import BasePlugin

from longlora_plugin.axolotl.logs import info
from longlora_plugin.rope import RopeResolution

MERGE_BASE_DIR = ".longlora_merge_base"


def has_merge_hook() -> bool:
    """True on Axolotl versions that call ``post_lora_merge`` after ``merge-lora``."""
    return hasattr(BasePlugin, "post_lora_merge")


def stage_merge_base(cfg: Any, rope: RopeResolution) -> Path:
    """Point ``cfg['base_model']`` at a directory that mirrors the base model (symlinks)
    but whose ``config.json`` carries the RoPE parameters.

    Why: Axolotl 0.19's memory-efficient ``merge-lora`` copies ``config.json`` from
    ``base_model`` into ``output_dir/merged`` and has no hook after the merge, so the
    merged model would silently lose the interpolation. The legacy merge path loads
    the same directory, so both paths produce a merged ``config.json`` with the RoPE.
    The directory is ``<output_dir>/.longlora_merge_base/<base model name>`` (the
    name is kept because Axolotl inspects it for model-family heuristics).
    """
    base = str(cfg.get("base_model"))
    source = _local_model_dir(cfg, base)
    output_dir = Path(cfg.get("output_dir") or "./model-out")
    staged = output_dir / MERGE_BASE_DIR / Path(base.rstrip("/")).name
    if staged.exists():
        shutil.rmtree(staged)
    staged.mkdir(parents=True)
    for entry in source.iterdir():
        if entry.name == "config.json":
            continue
        _link_or_copy(entry.resolve(), staged / entry.name)
    config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    (staged / "config.json").write_text(
        json.dumps(rope.apply_to_config_dict(config), indent=2, sort_keys=True) + "\n",
        encoding="utf-8",
    )
    if not cfg.get("base_model_config"):
        cfg["base_model_config"] = str(staged)
    cfg["base_model"] = str(staged)
    info(
        "longlora: merge-lora: using %s (mirror of %s with rope_parameters %s) as base_model "
        "so that the merged config.json keeps the RoPE interpolation",
        staged,
        source,
        rope.rope_parameters,
    )
    return staged


def _local_model_dir(cfg: Any, name: str) -> Path:
    path = Path(name)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    revision = cfg.get("revision_of_model") or cfg.get("model_revision")
    return Path(snapshot_download(name, revision=revision))


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.symlink(src, dst, target_is_directory=src.is_dir())
    except OSError:
        if src.is_dir():
            shutil.copytree(src, dst)
        else:
            shutil.copy2(src, dst)
