"""``plugins: [longlora_plugin.plugin.LongLoRAPlugin]``: the plugin's longer spelling, kept
so configs that use it keep working. The class is :mod:`longlora_plugin.axolotl.plugin_hooks`'s;
``longlora_plugin.LongLoRAPlugin`` is the documented name."""

from longlora_plugin.axolotl.plugin_hooks import LongLoRAPlugin

__all__ = ["LongLoRAPlugin"]
