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
