"""Shifted sparse attention (S2-Attn), the first of LongLoRA's three ingredients.

``group_size`` is the group-size rule (G from ``group_size`` or a ratio of the row
length, its bounds and default), which the schema and the Axolotl adapter import too;
``backend`` registers S2 with transformers (whose ``AttentionInterface`` is the one
registry: each registered function carries its ``S2Settings``, the context-parallel group
included) and switches models to it; ``attention`` computes one layer's call; ``layout``
places the groups of a batch; ``kernels`` holds the causal kernels it runs on;
``context_parallel`` (the process groups, sharding and gradient reduction),
``halo_exchange`` (the attention of one rank's chunk) and ``row_gather`` split each row
across ranks. Nothing here imports Axolotl.
"""

# imported on first access, so that the group-size rule (``s2.group_size``) is read
# without loading torch or transformers (``longlora validate``'s memory estimate)
_BACKEND = (
    "SUPPORTED_BACKENDS",
    "S2Settings",
    "disable_s2_attn",
    "enable_s2_attn",
    "s2_settings",
    "unwrap_model",
    "wrapped_backend",
)
__all__ = list(_BACKEND)


def __getattr__(name: str):
    if name in _BACKEND:
        from longlora_plugin.s2 import backend

        return getattr(backend, name)
    raise AttributeError(f"module 'longlora_plugin.s2' has no attribute {name!r}")
