"""LongLoRA for Axolotl: S2-Attn, trainable embeddings/norms and RoPE position interpolation.

The S2-Attn core (:func:`enable_s2_attn`, :func:`disable_s2_attn`) does not import Axolotl;
``LongLoRAPlugin`` (the Axolotl adapter) is imported on first access.
"""

from longlora_plugin.s2 import disable_s2_attn, enable_s2_attn

__all__ = ["enable_s2_attn", "disable_s2_attn", "LongLoRAPlugin"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "LongLoRAPlugin":
        from longlora_plugin.axolotl.plugin import LongLoRAPlugin

        return LongLoRAPlugin
    raise AttributeError(f"module 'longlora_plugin' has no attribute {name!r}")
