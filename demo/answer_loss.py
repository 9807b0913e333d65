"""The demo's extension loss: the pre-training loss (:mod:`demo.pretrain`) inside ``axolotl
train``, as a second Axolotl plugin next to LongLoRA's.

Axolotl averages the loss over every labelled token of a batch. In the demo's mix the
retrieval documents label only their answer (a few tokens) and the novels label every
token, so the answers are ~0.5% of the extension's signal where they were half of the
pre-training's. This plugin gives the extension the pre-training's loss again: the mean
loss over the novel tokens plus the mean loss over the answer tokens of the batch.

A row is an *answer row* when fewer than half of its tokens up to its last labelled one
are labelled (an ``input_output`` retrieval document: its prompt is unlabelled), a *text
row* otherwise (a ``completion`` novel piece, labelled from its first token; padding after
it does not count). It is a demo recipe, not part of LongLoRA: it knows the demo's two dataset types.
Contract: gradient accumulation 1 (the demo's); with more, each micro-batch would weigh the
same whatever its token counts. Refused at trainer creation, naming the key: gradient
accumulation, ``sample_packing`` and the fused-loss features in :data:`REFUSED`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from axolotl.integrations.base import BasePlugin

IGNORE = -100
# Axolotl keys that would make the loss silently wrong (packing) or leave it no logits
REFUSED = ("sample_packing", "cut_cross_entropy", "liger_fused_linear_cross_entropy")


def answer_weighted_loss(outputs: Any, labels: torch.Tensor, **_: Any) -> torch.Tensor:
    """Mean next-token loss over the text rows' tokens plus mean loss over the answer rows'
    tokens (either term is left out when the batch has no such row)."""
    logits = outputs["logits"] if isinstance(outputs, dict) else outputs.logits
    targets = labels[:, 1:]
    per_token = F.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), targets, ignore_index=IGNORE, reduction="none"
    )
    labelled = targets != IGNORE
    positions = torch.arange(targets.shape[1], device=targets.device)
    span = torch.where(labelled, positions + 1, 0).amax(dim=1)  # up to the last label
    answer_rows = labelled.sum(dim=1) < 0.5 * span
    terms = []
    for rows in (~answer_rows, answer_rows):
        mask = labelled & rows[:, None]
        if mask.any():
            terms.append(per_token[mask].mean())
    if not terms:  # nothing labelled: a zero that still reaches every parameter
        return logits.sum() * 0.0
    return torch.stack(terms).sum()


class AnswerWeightedLossPlugin(BasePlugin):
    """Sets :func:`answer_weighted_loss` as the trainer's ``compute_loss_func``."""

    def post_trainer_create(self, cfg: Any, trainer: Any) -> None:
        if cfg.gradient_accumulation_steps not in (None, 1):
            raise ValueError(
                f"gradient_accumulation_steps: {cfg.gradient_accumulation_steps}: the demo's "
                "answer-weighted loss supports 1 only (raise micro_batch_size instead)"
            )
        for key in REFUSED:  # packed rows mix both kinds; fused losses return no logits
            if cfg.get(key):
                raise ValueError(
                    f"{key}: {cfg.get(key)!r}: the demo's answer-weighted loss needs unpacked "
                    f"rows and the model's logits; set {key}: false or drop the plugin"
                )
        trainer.compute_loss_func = answer_weighted_loss
        print("demo: answer-weighted loss (mean over text tokens + mean over answers)", flush=True)
