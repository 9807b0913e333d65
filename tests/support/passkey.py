"""Passkey accuracy of one model on the demo's keys, for the demo's tests."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from demo.evaluate import PASSKEY_DEPTHS
from longlora_plugin.evaluation.models import ModelSpec, RopeOverride
from longlora_plugin.evaluation.runner import load_models, run_passkey


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
    found = run_passkey(
        load_models([ModelSpec("m", str(model), rope)], dtype="float32", device="cpu"),
        lengths=[length],
        depths=depths,
        trials=trials,
        progress=False,
    )
    rows = found["results"]
    assert len(rows) == len(depths) > 0
    return sum(r["correct"] for r in rows) / sum(r["trials"] for r in rows)
