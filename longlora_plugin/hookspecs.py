"""pluggy extension points of longlora_plugin.

Another package adds architecture-specific knowledge without editing this one: it
implements a hook and declares an entry point in the group ``longlora_plugin``::

    # pyproject.toml of the other package
    [project.entry-points.longlora_plugin]
    my_arch = "my_package.longlora_hooks"

    # my_package/longlora_hooks.py
    from longlora_plugin.hookspecs import hookimpl

    @hookimpl
    def longlora_trainable_module_names(config, kind):
        if config.model_type == "my_arch" and kind == "norm":
            return ["ln_attn", "ln_mlp", "ln_final"]
        return None
"""

from __future__ import annotations

from typing import Any

import pluggy

PROJECT = "longlora_plugin"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class LongLoRAHookSpecs:
    """Hook specifications (signatures only)."""

    @hookspec
    def longlora_trainable_module_names(self, config: Any, kind: str) -> list[str] | None:
        """Return PEFT ``modules_to_save`` names for ``kind`` ("embed", "norm" or
        "lm_head") of the model described by ``config`` (a transformers config), or
        ``None`` to let the built-in derivation decide. Names are matched by PEFT as
        suffixes of module names. When any implementation returns names, the union of
        all returned names replaces the built-in derivation for that kind."""


_MANAGER: pluggy.PluginManager | None = None


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide pluggy manager, with entry points of group ``longlora_plugin``
    loaded on first use."""
    global _MANAGER
    if _MANAGER is None:
        manager = pluggy.PluginManager(PROJECT)
        manager.add_hookspecs(LongLoRAHookSpecs)
        manager.load_setuptools_entrypoints(PROJECT)
        _MANAGER = manager
    return _MANAGER


def names_from_hooks(config: Any, kind: str) -> list[str] | None:
    """Union (in call order) of the names hook implementations return for ``kind``,
    or ``None`` when no implementation returns any."""
    results = get_plugin_manager().hook.longlora_trainable_module_names(config=config, kind=kind)
    names = [name for result in results if result for name in result]
    return list(dict.fromkeys(names)) or None
