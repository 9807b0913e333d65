"""Gathering a context-parallel group's micro-batches of whole rows, each padded so that
:meth:`~longlora_plugin.s2.context_parallel.ContextParallel.shard` can split it: how the
Axolotl adapter (:mod:`longlora_plugin.axolotl.split_training_step`) turns every rank's
own micro-batch into ``P`` sub-steps over split rows."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from longlora_plugin.s2.context_parallel import ContextParallel

# what a row is padded with at its end: ignored by the loss, masked out, or (positions)
# continued; causal attention never lets a token see one after it, so the row's real
# tokens are unchanged
_PAD_VALUES = {"labels": -100, "attention_mask": 0}


def _pad_row_end(key: str, value: torch.Tensor, extra: int) -> torch.Tensor:
    if extra == 0:
        return value
    if key == "position_ids":
        steps = torch.arange(1, extra + 1, device=value.device, dtype=value.dtype)
        return torch.cat([value, value[:, -1:] + steps], dim=1)
    return torch.nn.functional.pad(value, (0, extra), value=_PAD_VALUES.get(key, 0))


def gather_rows(batch: dict[str, Any], cp: ContextParallel) -> list[dict[str, torch.Tensor]]:
    """Every rank's batch of whole rows (``[B, L]`` tensors, ``L`` may differ between
    ranks, ``B`` may not), in group-rank order: each padded at the end to the group's
    longest ``L`` rounded up to a multiple of ``P`` (labels ``-100``, attention mask 0,
    positions continued), so that :meth:`ContextParallel.shard` can split any of them.
    Collective over ``cp.group``: a few all-gathers of token ids, no activations."""
    bad = [
        k
        for k, v in batch.items()
        if not (torch.is_tensor(v) and v.dim() == 2 and v.shape == batch["input_ids"].shape)
    ]
    if bad:
        raise ValueError(
            f"context parallelism splits [batch, tokens] tensors shaped like input_ids; the "
            f"batch also holds {', '.join(sorted(bad))}"
        )
    ids = batch["input_ids"]
    shape = torch.tensor(ids.shape, device=ids.device)
    shapes = [torch.empty_like(shape) for _ in range(cp.size)]
    dist.all_gather(shapes, shape, group=cp.group)
    rows = {int(s[0]) for s in shapes}
    if len(rows) > 1:
        raise ValueError(
            f"context parallelism: the ranks of a group got {sorted(rows)} rows in this "
            "micro-batch; every rank needs the same number (micro_batch_size, and "
            "dataloader_drop_last for a short last batch)"
        )
    longest = max(int(s[1]) for s in shapes)
    length = -(-longest // cp.size) * cp.size
    gathered: dict[str, list[torch.Tensor]] = {}
    for key in sorted(batch):
        local = _pad_row_end(key, batch[key], length - batch[key].shape[1]).contiguous()
        parts = [torch.empty_like(local) for _ in range(cp.size)]
        dist.all_gather(parts, local, group=cp.group)
        gathered[key] = parts
    return [{key: parts[j] for key, parts in gathered.items()} for j in range(cp.size)]
