"""Passkey accuracy of one model on the demo's keys, for the demo's tests."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from demo.effect import far_accuracy
from demo.evaluate import PASSKEY_DEPTHS
from longlora_plugin.evaluation.models import ModelSpec, RopeOverride


def passkey_accuracy(
    model: str | Path,
    length: int,
    *,
    rope: RopeOverride | None = None,
    depths: Sequence[float] = PASSKEY_DEPTHS,
    trials: int = 10,
) -> float:
    """Fraction of keys found at ``length`` over ``depths`` x ``trials`` (the evaluation's
    seed 0, full attention, fp32 on the CPU, one thread: two pytest workers share the
    2-core machine). Asserts that every depth was scored."""
    torch.set_num_threads(1)
    return far_accuracy(ModelSpec("m", str(model), rope), length, depths, trials)
