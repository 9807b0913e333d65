"""Where S2-Attn's groups fall in a batch: tensor bookkeeping, no attention.

Vocabulary (LongLoRA, Chen et al. 2024): a row is split into *groups* of ``G`` tokens;
the first half of the query heads attend causally inside groups ``p // G``, the second
half inside groups shifted by ``s = G // 2``, i.e. ``(p + s) // G``. ``p`` is a token's
position inside its *document* (documents restart where ``position_ids`` break the
``+1`` progression, as in sample packing). The shifted heads see a short first group and
never wrap around.

A *segment* is a maximal run of tokens of one row that share document and group and are
not padding: attention under S2 is exactly causal attention inside each segment (plus
any sliding window), so every kernel only needs the segments. A :class:`Layout` holds
them for both head halves in the form the chosen kernel takes; it is built once per
forward pass (all host synchronisation happens here) and shared by every layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

KernelKind = Literal["padded", "varlen"]


@dataclass(frozen=True)
class Piece:
    """``count`` consecutive groups of ``length`` tokens starting at row offset ``start``."""

    start: int
    length: int
    count: int


def regular_pieces(
    length: int, group_size: int, shift: int, first_position: int = 0
) -> tuple[Piece, ...]:
    """Groups of one unpadded document of ``length`` tokens whose positions start at
    ``first_position``: at most a partial first group, a run of full groups, a partial tail."""
    pieces: list[Piece] = []
    start = 0
    head = group_size - (first_position + shift) % group_size
    if head < group_size:
        head = min(head, length)
        pieces.append(Piece(0, head, 1))
        start = head
    full = (length - start) // group_size
    if full:
        pieces.append(Piece(start, group_size, full))
        start += full * group_size
    if start < length:
        pieces.append(Piece(start, length - start, 1))
    return tuple(pieces)


@dataclass(frozen=True)
class Bucket:
    """Segments padded on the right to a common length, ready for one batched kernel call.

    ``gather``: ``[n, length]`` flat token indices (``row * L + i``); slots past a
    segment's end repeat its first token and are never read back. ``keep``: flat indices
    into ``gather.view(-1)`` of the slots that hold real tokens; ``dest``: where their
    outputs go (``gather.view(-1)[keep]``).
    """

    gather: torch.Tensor
    keep: torch.Tensor
    dest: torch.Tensor


@dataclass(frozen=True)
class Segments:
    """The segments of one head half, in row-major order over the batch's real tokens.

    ``cu_seqlens`` (int32, ``[n + 1]``) and ``max_seqlen`` are what varlen kernels take;
    ``buckets`` (padded kernels only, else empty) index the flat ``[B * L]`` tokens.
    """

    cu_seqlens: torch.Tensor
    max_seqlen: int
    buckets: tuple[Bucket, ...] = ()


@dataclass(frozen=True)
class Layout:
    """Both head halves of one batch (index 0: unshifted, 1: shifted by ``group // 2``).

    Exactly one of ``pieces`` (every row one unpadded document starting at the same
    position, padded kernels) and ``segments`` is set. ``token_index`` holds the flat
    indices of the real (non-padding) tokens, or is None when every token is real;
    ``num_tokens`` counts them. ``joined`` is both halves' segments back to back (the
    shifted half's tokens after the unshifted half's), for one varlen call on both.
    """

    group: int
    pieces: tuple[tuple[Piece, ...], tuple[Piece, ...]] | None = None
    segments: tuple[Segments, Segments] | None = None
    token_index: torch.Tensor | None = None
    num_tokens: int = 0
    joined: Segments | None = None


def document_starts(position_ids: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` bool: True where a document starts (row start, or ``p[i] != p[i-1] + 1``)."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return starts


def build_layout(
    position_ids: torch.Tensor | None,
    padding: torch.Tensor | None,
    shape: tuple[int, int],
    group: int,
    kind: KernelKind,
    device: torch.device,
    shifts: tuple[int, int] | None = None,
) -> Layout:
    """The :class:`Layout` of a ``shape = (B, L)`` batch for a ``kind`` kernel.

    ``position_ids``: ``[B, L]`` or ``[1, L]`` (None: ``0 .. L-1``); ``padding``: the 2D
    attention mask (``[B, >= L]``, nonzero = real token) or None. ``shifts``: the two
    halves' shifts, ``(0, group // 2)`` unless given (context parallelism lays out one
    half at a time).
    """
    batch, length = shape
    if position_ids is None:
        position_ids = torch.arange(length, device=device)[None]
    position_ids = position_ids.expand(batch, length)
    valid = None
    if padding is not None:
        valid = padding[:, -length:].to(torch.bool)
        if bool(valid.all()):
            valid = None
    shifts = shifts or (0, group // 2)
    if kind == "padded" and valid is None and _regular(position_ids):
        first = int(position_ids[0, 0])
        pieces = tuple(regular_pieces(length, group, s, first) for s in shifts)
        return Layout(group, pieces=pieces, num_tokens=batch * length)  # type: ignore[arg-type]

    token_index = None if valid is None else valid.reshape(-1).nonzero().squeeze(1)
    halves = tuple(
        _segments(position_ids, valid, group, s, with_buckets=kind == "padded") for s in shifts
    )
    num_tokens = batch * length if token_index is None else int(token_index.numel())
    joined = None
    if kind == "varlen":
        first, second = halves
        joined = Segments(
            torch.cat([first.cu_seqlens, second.cu_seqlens[1:] + num_tokens]),
            max(first.max_seqlen, second.max_seqlen),
        )
    return Layout(
        group,
        segments=halves,  # type: ignore[arg-type]
        token_index=token_index,
        num_tokens=num_tokens,
        joined=joined,
    )


def _regular(position_ids: torch.Tensor) -> bool:
    """Every row one document (positions continue by +1) and all rows start alike."""
    continuous = (position_ids[:, 1:] == position_ids[:, :-1] + 1).all()
    aligned = (position_ids[:, 0] == position_ids[0, 0]).all()
    return bool(continuous & aligned)


def segment_starts(
    position_ids: torch.Tensor, valid: torch.Tensor | None, group_size: int, shift: int
) -> torch.Tensor:
    """``[B, L]`` bool: True where a segment (or a run of padding) starts, for the heads
    whose groups are ``(p + shift) // G``: a new document, a new group, or a change
    between real tokens and padding."""
    group = torch.div(position_ids + shift, group_size, rounding_mode="floor")
    boundary = document_starts(position_ids)
    boundary[:, 1:] |= group[:, 1:] != group[:, :-1]
    if valid is not None:
        boundary[:, 1:] |= valid[:, 1:] != valid[:, :-1]
    return boundary


def _segments(
    position_ids: torch.Tensor,
    valid: torch.Tensor | None,
    group_size: int,
    shift: int,
    *,
    with_buckets: bool,
) -> Segments:
    """Segments of a ``[B, L]`` batch for the heads whose groups are ``(p + shift) // G``.

    Padding tokens (``valid`` False) belong to no segment: never attended, never queried.
    """
    batch, length = position_ids.shape
    boundary = segment_starts(position_ids, valid, group_size, shift)
    starts = boundary.reshape(-1).nonzero().squeeze(1)
    ends = torch.cat([starts[1:], starts.new_tensor([batch * length])])
    lengths = ends - starts
    if valid is not None:
        real = valid.reshape(-1)[starts]
        starts, lengths = starts[real], lengths[real]
    cu_seqlens = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(torch.int32)
    max_seqlen = int(lengths.max()) if lengths.numel() else 0
    buckets = _buckets(starts, lengths) if with_buckets else ()
    return Segments(cu_seqlens, max_seqlen, buckets)


def _buckets(starts: torch.Tensor, lengths: torch.Tensor) -> tuple[Bucket, ...]:
    """Group segments by ``ceil(log2(length))`` so right padding wastes at most half a slot row."""
    if starts.numel() == 0:
        return ()
    order = torch.argsort(lengths, stable=True)
    starts, lengths = starts[order], lengths[order]
    keys = torch.ceil(torch.log2(lengths.double())).long()
    buckets = []
    for key in torch.unique_consecutive(keys).tolist():
        sel = keys == key
        b_starts, b_lengths = starts[sel], lengths[sel]
        width = int(b_lengths.max())
        offsets = torch.arange(width, device=starts.device)
        inside = offsets[None, :] < b_lengths[:, None]
        gather = torch.where(inside, b_starts[:, None] + offsets[None, :], b_starts[:, None])
        keep = inside.reshape(-1).nonzero().squeeze(1)
        buckets.append(Bucket(gather, keep, gather.reshape(-1)[keep]))
    return tuple(buckets)
