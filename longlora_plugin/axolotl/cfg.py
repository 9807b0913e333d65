"""Reading Axolotl's config (the raw YAML dict or the validated one) for LongLoRA."""

from __future__ import annotations

from typing import Any

from longlora_plugin.config import LongLoRAConfig, LongLoRAConfigError
from longlora_plugin.rope import RopeResolution, load_base_config, resolve_rope

AXOLOTL_DEFAULT_SEQUENCE_LEN = 512
# Axolotl's legacy boolean attention flags -> attn_implementation (utils/schemas/enums.py).
LEGACY_ATTN_FLAGS = {
    "xformers_attention": "xformers",
    "sage_attention": "sage",
    "flex_attention": "flex_attention",
    "flash_attention": "flash_attention_2",
    "sdp_attention": "sdpa",
    "eager_attention": "eager",
}


def sequence_len(cfg: Any) -> int:
    """The run's ``sequence_len`` (Axolotl's default when unset)."""
    value = cfg.get("sequence_len")
    return int(value) if value else AXOLOTL_DEFAULT_SEQUENCE_LEN


def attention_implementation(cfg: Any) -> tuple[str | None, str]:
    """``(backend, config key the user wrote)`` from ``attn_implementation`` or a legacy
    boolean flag (Axolotl's validation maps the flag onto ``attn_implementation``);
    ``(None, "attn_implementation")`` when unset (transformers' default)."""
    impl = cfg.get("attn_implementation")
    for flag, backend in LEGACY_ATTN_FLAGS.items():
        if cfg.get(flag) and (not impl or impl == backend):  # Axolotl maps the flag
            return backend, flag
    if impl:
        return str(impl), "attn_implementation"
    return None, "attn_implementation"


def base_model_config(cfg: Any) -> Any:
    """The base model's transformers config (``base_model_config``, else ``base_model``);
    no weights are read."""
    name = cfg.get("base_model_config") or cfg.get("base_model")
    if not name:
        raise LongLoRAConfigError("longlora needs base_model to be set")
    try:
        return load_base_config(
            str(name),
            trust_remote_code=cfg.get("trust_remote_code") is True,
            revision=cfg.get("revision_of_model") or cfg.get("model_revision"),
        )
    except (OSError, ValueError) as err:
        raise LongLoRAConfigError(
            f"longlora: cannot read the config of base_model={name!r} (needed for RoPE and "
            f"module names): {err}"
        ) from err


def run_rope(cfg: Any, settings: LongLoRAConfig, base_config: Any = None) -> RopeResolution:
    """The RoPE this run trains with, from ``longlora.rope`` and ``sequence_len``."""
    return resolve_rope(
        base_config if base_config is not None else base_model_config(cfg),
        rope_type=settings.rope.type,
        factor=settings.rope.factor,
        sequence_len=sequence_len(cfg),
        original_max_position_embeddings=settings.rope.original_max_position_embeddings,
    )


def zero_stage(cfg: Any) -> int | None:
    """The DeepSpeed ZeRO stage of the run (None without DeepSpeed, or when its JSON cannot
    be read from here: Axolotl reports that itself)."""
    if not cfg.get("deepspeed"):
        return None
    from longlora_plugin.memory import Parallelism

    try:
        return Parallelism.from_axolotl(cfg, 1).zero_stage
    except (OSError, ValueError):
        return None


def fsdp_version(cfg: Any) -> int | None:
    """The FSDP version of the run (None without FSDP): ``fsdp_version`` at the top level
    or in ``fsdp_config``; else 1 for the top-level ``fsdp`` list (FSDP1's form), and for
    ``fsdp_config`` alone the installed Axolotl's default (2 from 0.21, which removed
    FSDP1; 1 before)."""
    fsdp_config = cfg.get("fsdp_config") or {}
    if not fsdp_config and not cfg.get("fsdp"):
        return None
    version = (
        cfg.get("fsdp_version") or fsdp_config.get("fsdp_version") or fsdp_config.get("version")
    )
    if version is not None:
        return int(version)
    if cfg.get("fsdp"):  # the top-level FSDP1 list (0.21 rejects it with its own message)
        return 1
    from importlib.metadata import version as installed

    major, minor = (int(part) for part in installed("axolotl").split(".")[:2])
    return 2 if (major, minor) >= (0, 21) else 1
