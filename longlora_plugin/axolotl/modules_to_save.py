"""The embeddings and norms LongLoRA trains in full, added to ``lora_modules_to_save``
(PEFT ``modules_to_save``); the names come from :mod:`longlora_plugin.trainable`."""

from __future__ import annotations

import logging
from typing import Any

from longlora_plugin.axolotl.logs import info
from longlora_plugin.config import LongLoRAConfig

LOG = logging.getLogger("longlora_plugin")
LORA_ADAPTERS = ("lora", "qlora")


def add_trainable_modules(cfg: Any, settings: LongLoRAConfig, base_config: Any) -> None:
    """Add the architecture's embedding/norm/LM-head names to ``lora_modules_to_save``
    (LoRA/QLoRA only; full fine-tuning already trains everything)."""
    adapter = cfg.get("adapter")
    kinds = settings.trainable_params
    if not kinds:
        return
    if not adapter:
        info(
            "longlora: full fine-tune: %s already train; trainable_params is a no-op",
            ", ".join(kinds),
        )
        return
    if adapter not in LORA_ADAPTERS:
        LOG.warning(
            "longlora: trainable_params (%s) use PEFT modules_to_save, which adapter=%r "
            "does not take; ignored",
            ", ".join(kinds),
            adapter,
        )
        return
    from longlora_plugin.trainable import find_trainable_modules

    found = find_trainable_modules(
        base_config, kinds, trust_remote_code=cfg.get("trust_remote_code") is True
    )
    existing = list(cfg.get("lora_modules_to_save") or [])
    cfg["lora_modules_to_save"] = existing + [n for n in found.names if n not in existing]
    for note in found.notes:
        info("longlora: %s", note)
    if found.ensure_weight_tying:
        if cfg.get("peft_ensure_weight_tying") is None:
            cfg["peft_ensure_weight_tying"] = True
        elif cfg.get("peft_ensure_weight_tying") is False:
            LOG.warning(
                "longlora: the model ties its input and output embeddings but "
                "peft_ensure_weight_tying=false: the trained copies will drift apart"
            )
    info(
        "longlora: training %s in full: lora_modules_to_save=%s",
        ", ".join(kinds),
        cfg["lora_modules_to_save"],
    )
    _warn_embedding_lr_reaches_norms(cfg, kinds)


def _warn_embedding_lr_reaches_norms(cfg: Any, kinds: list[str]) -> None:
    """Axolotl gives ``embedding_lr_scale`` / ``embedding_lr`` to every parameter whose
    name ends in ``modules_to_save.default.weight`` (its optimizer mixin, 0.19 and 0.21),
    so the norms trained in full get it too: say so, with the way out."""
    keys = [k for k in ("embedding_lr_scale", "embedding_lr") if cfg.get(k) is not None]
    if not keys or "norm" not in kinds:
        return
    key = keys[0]
    LOG.warning(
        "longlora: %s=%r also applies to the norms longlora.trainable_params trains in "
        "full: Axolotl gives it to every modules_to_save weight, not only the embeddings; "
        "to keep the norms at learning_rate, remove %s or drop norm from trainable_params",
        key,
        cfg.get(key),
        key,
    )
