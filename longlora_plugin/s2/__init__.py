"""Shifted sparse attention (S2-Attn), the first of LongLoRA's three ingredients.

``backend`` registers it with transformers and switches models to it; ``attention``
computes one layer's call; ``layout`` places the groups of a batch; ``kernels`` holds the
causal kernels it runs on; ``context_parallel`` (the process groups, sharding and gradient
reduction), ``halo_exchange`` (the attention of one rank's chunk) and ``row_gather`` split
each row across ranks. Nothing here imports Axolotl.
"""

from longlora_plugin.s2.backend import (
    SUPPORTED_BACKENDS,
    S2Settings,
    disable_s2_attn,
    enable_s2_attn,
    s2_settings,
    unwrap_model,
    wrapped_backend,
)

__all__ = [
    "SUPPORTED_BACKENDS",
    "S2Settings",
    "disable_s2_attn",
    "enable_s2_attn",
    "s2_settings",
    "unwrap_model",
    "wrapped_backend",
]
