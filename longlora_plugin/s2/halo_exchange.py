"""S2-Attn with context parallelism: the halo exchange and the attention of one rank's chunk
(the group and its batches: :mod:`longlora_plugin.s2.context_parallel`).

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

import torch
import torch.distributed as dist
from torch.distributed._functional_collectives import all_to_all_single_autograd

from longlora_plugin.s2.attention import head_halves, kv_for_heads, queries_per_kv, s2_attention
from longlora_plugin.s2.context_parallel import ContextParallel
from longlora_plugin.s2.kernels import Kernel
from longlora_plugin.s2.layout import KernelKind, Layout, build_layout, segment_starts


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
