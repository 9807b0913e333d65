"""LongLoRA for Axolotl: S2-Attn, trainable embeddings/norms and RoPE position interpolation.

The S2-Attn core (:func:`enable_s2_attn`, :func:`disable_s2_attn`) does not import Axolotl;
``LongLoRAPlugin`` (the Axolotl adapter) does. Both are imported on first access, so that
importing a submodule (the ``longlora`` console script, ``--help``) loads neither
transformers nor Axolotl.
"""

__all__ = ["enable_s2_attn", "disable_s2_attn", "LongLoRAPlugin"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in ("enable_s2_attn", "disable_s2_attn"):
        from longlora_plugin import s2

        return getattr(s2, name)
    if name == "LongLoRAPlugin":
        from longlora_plugin.axolotl.plugin_hooks import LongLoRAPlugin

        return LongLoRAPlugin
    raise AttributeError(f"module 'longlora_plugin' has no attribute {name!r}")
