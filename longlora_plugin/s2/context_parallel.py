"""S2-Attn with context parallelism: one row split across the ranks of a process group.

Rank ``r`` of ``P`` holds tokens ``[r*C, (r+1)*C)`` of every row (``C = L / P``). The rule
is S2-Attn's, on the row's absolute positions (``position_ids``, which every rank passes
for its own tokens): a query attends only inside its *segment* (same document, same
group of its head half, real tokens). A rank therefore needs, per head half, only the
keys and values of the segment its first token continues: its *halo*, the
``need = r*C - (start of that segment)`` tokens before its chunk, at most ``G - 1`` (and at
most ``window - 1`` with a sliding window), 0 when the chunk starts a segment. With
unpacked rows and ``C`` a multiple of ``G`` the unshifted half needs nothing and the
shifted half ``G / 2`` tokens; with ``C < G`` a halo spans several earlier ranks.

Per layer, each rank sends to each later rank the part of its keys and values that rank's
halos cover, for the key/value heads of each half, in one ``all_to_all_single`` from
torch's functional collectives (``all_to_all_single_autograd``, the documented successor
of ``torch.distributed.nn.functional``): gradients of halo keys and values travel back
to their owners in the backward pass. Bytes sent per rank and layer:
``2 * B * D * bytes_per_element * sum_h (kv heads of half h) * (halo tokens of half h it
serves)``; ring attention sends ``2 * B * D * bytes * H_kv * C * (P - 1)``.

Locally, each half attends over ``[halo | chunk]``: the halo's queries are zeros and their
outputs are dropped (they receive no gradient), so the chunk's outputs are exactly those
of single-process S2. The plan (global positions and padding, all-gathered once per
forward pass, and every rank's halo sizes) is computed by the first layer and shared.

Training only: in eval mode a split row would need full attention across ranks, which
this path does not do (evaluate the model on one process).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed._functional_collectives import all_to_all_single_autograd

from longlora_plugin.s2.attention import head_halves, kv_for_heads, queries_per_kv, s2_attention
from longlora_plugin.s2.kernels import Kernel
from longlora_plugin.s2.layout import KernelKind, Layout, build_layout, segment_starts


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


@dataclass(frozen=True)
class Plan:
    """Who needs what in one forward pass. ``needs[h][r]``: halo tokens rank ``r``
    needs for head half ``h``; ``positions``/``valid``: the whole rows (``valid`` None
    when no token is padding)."""

    rank: int
    size: int
    chunk: int
    group_size: int
    needs: tuple[tuple[int, ...], tuple[int, ...]]
    positions: torch.Tensor
    valid: torch.Tensor | None
    layouts: dict[tuple[int, KernelKind], Layout] = field(default_factory=dict)

    def layout(self, half: int, kind: KernelKind) -> Layout:
        """The layout of ``[halo | chunk]`` of ``half``, both sub-halves on its shift."""
        if (half, kind) not in self.layouts:
            need, start = self.needs[half][self.rank], self.rank * self.chunk
            cut = slice(start - need, start + self.chunk)
            positions = self.positions[:, cut]
            valid = None if self.valid is None else self.valid[:, cut]
            shift = (0, self.group_size // 2)[half]
            self.layouts[(half, kind)] = build_layout(
                positions,
                valid,
                tuple(positions.shape),
                self.group_size,
                kind,
                positions.device,
                shifts=(shift, shift),
            )
        return self.layouts[(half, kind)]

    def sends(self, half: int) -> list[tuple[int, int]]:
        """Per destination rank, the ``[lo, hi)`` range of this rank's chunk it needs."""
        start, end = self.rank * self.chunk, (self.rank + 1) * self.chunk
        ranges = []
        for dest in range(self.size):
            first = dest * self.chunk
            lo, hi = max(start, first - self.needs[half][dest]), min(end, first)
            ranges.append((lo - start, hi - start) if dest > self.rank and lo < hi else (0, 0))
        return ranges

    def receives(self, half: int) -> list[int]:
        """Per source rank, how many halo tokens of ``half`` it sends here."""
        first = self.rank * self.chunk
        lo = first - self.needs[half][self.rank]
        return [
            max(0, min(first, (src + 1) * self.chunk) - max(lo, src * self.chunk))
            if src < self.rank
            else 0
            for src in range(self.size)
        ]


def halo_needs(
    positions: torch.Tensor,
    valid: torch.Tensor | None,
    group_size: int,
    shift: int,
    chunk: int,
    window: int | None = None,
) -> tuple[int, ...]:
    """Halo tokens each rank needs for the heads whose groups are ``(p + shift) // G``:
    the distance from its chunk's first token back to the start of that token's
    segment (the maximum over rows; 0 when that token is padding), capped at
    ``window - 1``."""
    batch, length = positions.shape
    boundary = segment_starts(positions, valid, group_size, shift)
    index = torch.arange(length, device=positions.device).expand(batch, length)
    segment_start = torch.cummax(torch.where(boundary, index, 0), dim=1).values
    firsts = torch.arange(0, length, chunk, device=positions.device)
    need = firsts - segment_start[:, firsts]
    if valid is not None:
        need = need * valid[:, firsts]
    if window is not None:
        need = need.clamp(max=window - 1)
    return tuple(int(n) for n in need.max(0).values.tolist())


def build_plan(
    cp: ContextParallel,
    position_ids: torch.Tensor | None,
    padding: torch.Tensor | None,
    shape: tuple[int, int],
    group_size: int,
    window: int | None,
    device: torch.device,
) -> Plan:
    """Gather every rank's positions and padding (one all-gather each) and compute the
    halos. ``position_ids`` must be the row's positions of this rank's tokens."""
    batch, chunk = shape
    if position_ids is None:
        raise ValueError(
            "context parallelism needs position_ids: each rank must pass its tokens' "
            "positions in the whole row (ContextParallel.shard does)"
        )
    local = torch.stack(
        [
            position_ids.expand(batch, chunk).to(torch.long),
            torch.ones(batch, chunk, dtype=torch.long, device=device)
            if padding is None
            else padding[:, -chunk:].to(torch.long),
        ]
    )
    parts = [torch.empty_like(local) for _ in range(cp.size)]
    dist.all_gather(parts, local.contiguous(), group=cp.group)
    cp.plan_bytes.append(local.numel() * local.element_size() * (cp.size - 1))
    whole = torch.cat(parts, dim=2)
    positions, valid = whole[0], whole[1].to(torch.bool)
    valid = None if bool(valid.all()) else valid
    needs = tuple(
        halo_needs(positions, valid, group_size, shift, chunk, window)
        for shift in (0, group_size // 2)
    )
    return Plan(cp.rank, cp.size, chunk, group_size, needs, positions, valid)  # type: ignore[arg-type]


def exchange_halos(
    cp: ContextParallel, plan: Plan, halves: list[tuple[torch.Tensor, torch.Tensor] | None]
) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
    """Send each later rank the keys and values of its halos, receive this rank's;
    ``halves[h]`` = ``(key, value)`` ``[B, h_kv, C, D]`` of half ``h`` (None: no heads).
    Returns each half's halo ``(key, value)`` ``[B, h_kv, need, D]``. Differentiable."""
    pieces: list[list[torch.Tensor]] = [[] for _ in range(plan.size)]
    expect: list[list[tuple[int, tuple[int, ...]]]] = [[] for _ in range(plan.size)]
    for half, kv in enumerate(halves):
        if kv is None:
            continue
        for dest, (lo, hi) in enumerate(plan.sends(half)):
            for x in kv:
                pieces[dest].append(x[:, :, lo:hi].reshape(-1))
        for src, count in enumerate(plan.receives(half)):
            for x in kv:
                shape = (x.shape[0], x.shape[1], count, x.shape[3])
                expect[src].append((half, shape))
    send_sizes = [sum(p.numel() for p in dest) for dest in pieces]
    recv_sizes = [sum(math.prod(s) for _, s in src) for src in expect]
    reference = next(kv[0] for kv in halves if kv is not None)
    cp.sent_bytes.append(sum(send_sizes) * reference.element_size())
    halos: list[list[list[torch.Tensor]]] = [[[], []] for _ in halves]
    if sum(plan.needs[0]) + sum(plan.needs[1]) == 0:  # every rank starts a segment
        received = reference.new_zeros(0)
    else:
        send = torch.cat([p for dest in pieces for p in dest])
        group = cp.group if cp.group is not None else dist.group.WORLD
        received = all_to_all_single_autograd(send, recv_sizes, send_sizes, group)
    offset = 0
    for src in expect:
        for n, (half, shape) in enumerate(src):
            size = math.prod(shape)
            halos[half][n % 2].append(received[offset : offset + size].view(shape))
            offset += size
    out: list[tuple[torch.Tensor, torch.Tensor] | None] = []
    for half, kv in enumerate(halves):
        if kv is None:
            out.append(None)
            continue
        out.append(
            tuple(
                torch.cat(parts, dim=2) if parts else x[:, :, :0]
                for parts, x in zip(halos[half], kv, strict=True)
            )
        )
    return out


def s2_attention_cp(
    cp: ContextParallel,
    plan: Plan,
    kernel: Kernel,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    scaling: float | None,
    dropout: float,
    window: int | None,
    half_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """S2-Attn of this rank's chunk (``query [B, H, C, D]``, ``key, value [B, H_kv, C,
    D]`` -> ``[B, C, H, D]``), equal to the chunk's rows of single-process S2."""
    if half_dtype is not None and query.dtype != half_dtype:
        query, key, value = (x.to(half_dtype) for x in (query, key, value))
    n_rep = queries_per_kv(query, key)
    ranges = head_halves(query.shape[1])
    halves = [
        None
        if first == last
        else tuple(kv_for_heads(x, first, last, n_rep, dim=1) for x in (key, value))
        for first, last in ranges
    ]
    halos = exchange_halos(cp, plan, halves)
    outputs = []
    for half, (first, last) in enumerate(ranges):
        if first == last:
            continue
        k, v = halves[half]
        halo_k, halo_v = halos[half]
        q = query[:, first:last]
        need = halo_k.shape[2]
        # concatenated even when empty: the received buffer must stay in every rank's
        # graph, or a rank that needs no halo skips the backward all-to-all and the
        # others wait for it forever
        q = torch.cat([q.new_zeros(*q.shape[:2], need, q.shape[3]), q], dim=2)
        k, v = torch.cat([halo_k, k], dim=2), torch.cat([halo_v, v], dim=2)
        out = s2_attention(
            kernel,
            q,
            k,
            v,
            plan.layout(half, kernel.kind),
            scaling=scaling,
            dropout=dropout,
            window=window,
        )
        outputs.append(out[:, need:])
    return torch.cat(outputs, dim=2) if len(outputs) > 1 else outputs[0]
