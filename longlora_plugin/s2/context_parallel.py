"""Context parallelism for S2-Attn: one row split across the ranks of a process group.

Rank ``r`` of ``P`` holds tokens ``[r*C, (r+1)*C)`` of every row (``C = L / P``,
:meth:`ContextParallel.shard`). Training outside Axolotl, per step::

    cp, dp = context_parallel_groups(P)
    enable_s2_attn(model, group_size=G, context_parallel=cp)
    loss = model(**cp.shard(batch), num_items_in_batch=n_tokens_of_the_whole_batch).loss
    loss.backward()
    reduce_gradients(trainable_parameters, cp, dp)

How the ranks attend across chunk boundaries (each sends later ranks only the keys and
values their S2 groups need) is :mod:`longlora_plugin.s2.halo_exchange`; gathering the
group's micro-batches of whole rows (what the Axolotl adapter splits) is
:mod:`longlora_plugin.s2.row_gather`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class ContextParallel:
    """A context-parallel group: the ranks that split each row (``group``: a
    ``torch.distributed`` process group, None for the default one). ``sent_bytes``
    records the bytes this rank sends in each attention call (keys and values), and
    ``plan_bytes`` those of the per-forward all-gather of positions and padding."""

    group: Any = None
    sent_bytes: list[int] = field(default_factory=list)
    plan_bytes: list[int] = field(default_factory=list)

    @property
    def size(self) -> int:
        return dist.get_world_size(self.group)

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    def shard(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's part of a batch of whole rows (``[B, L]`` tensors): contiguous
        ``L / P``-token chunks of ``input_ids``, ``attention_mask`` and ``position_ids``
        (made ``0 .. L-1`` when absent: positions must be the row's, not the chunk's);
        ``labels`` add ``shift_labels`` (the next token's label, shifted over the whole
        row before it is cut: what the causal-LM loss scores when it is given) to the
        chunk of ``labels`` (which turns the loss on, and which token counters read).
        ``L`` must be a multiple of ``P``."""
        ids = batch["input_ids"]
        length, size, rank = ids.shape[1], self.size, self.rank
        if length % size:
            raise ValueError(
                f"context parallelism: the row length {length} is not a multiple of the "
                f"context-parallel size {size}; pad rows to a multiple of {size}"
            )
        out = dict(batch)
        if "position_ids" not in out:
            out["position_ids"] = torch.arange(length, device=ids.device)[None].expand_as(ids)
        if "labels" in out:
            shifted = torch.nn.functional.pad(out["labels"][:, 1:], (0, 1), value=-100)
            out["shift_labels"] = shifted
        chunk = length // size
        cut = slice(rank * chunk, (rank + 1) * chunk)
        return {
            k: v[:, cut].contiguous()
            if torch.is_tensor(v) and v.dim() == 2 and v.shape[1] == length
            else v
            for k, v in out.items()
        }


def context_parallel_groups(size: int) -> tuple[ContextParallel, Any]:
    """Split the default process group into context-parallel groups of ``size``
    consecutive ranks, crossed with data-parallel groups (the ranks at the same place in
    every CP group). Every rank must call it (``new_group`` is collective). Returns this
    rank's :class:`ContextParallel` and its data-parallel group."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if size < 1 or world % size:
        raise ValueError(
            f"context-parallel size {size} must be >= 1 and divide the {world} processes"
        )
    mine_cp = mine_dp = None
    for first in range(0, world, size):
        group = dist.new_group(list(range(first, first + size)))
        if first <= rank < first + size:
            mine_cp = group
    for offset in range(size):
        group = dist.new_group(list(range(offset, world, size)))
        if rank % size == offset:
            mine_dp = group
    return ContextParallel(mine_cp), mine_dp


def reduce_gradients(parameters, cp: ContextParallel, data_parallel: Any = None) -> None:
    """After ``backward`` on this rank's chunk (loss normalised by the whole row's token
    count, ``num_items_in_batch``): sum the gradients over the context-parallel group,
    which gives the row's gradient, then average them over ``data_parallel`` replicas."""
    replicas = dist.get_world_size(data_parallel) if data_parallel is not None else 1
    for param in parameters:
        if param.grad is None:
            continue
        dist.all_reduce(param.grad, group=cp.group)
        if replicas > 1:
            dist.all_reduce(param.grad, group=data_parallel)
            param.grad /= replicas
