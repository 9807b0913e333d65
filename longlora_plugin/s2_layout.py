"""Where S2-Attn's groups fall in a batch: pure tensor bookkeeping, no attention.

Vocabulary (LongLoRA, Chen et al. 2024): a row is split into *groups* of ``G`` tokens;
the first half of the query heads attend causally inside groups ``p // G``, the second
half inside groups shifted by ``s = G // 2``, i.e. ``(p + s) // G``. ``p`` is a token's
position inside its *document* (documents restart where ``position_ids`` break the
``+1`` progression, as in sample packing). The shifted heads see a short first group and
never wrap around.

A *segment* is a maximal run of tokens of one row that share document and group and are
not padding: attention under S2 is exactly causal attention inside each segment (plus
any sliding window), so every backend only needs the segments.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RegularPiece:
    """``count`` consecutive groups of ``length`` tokens starting at row offset ``start``."""

    start: int
    length: int
    count: int


def regular_pieces(
    length: int, group_size: int, shift: int, first_position: int = 0
) -> list[RegularPiece]:
    """Groups of one unpadded document of ``length`` tokens whose positions start at
    ``first_position``: at most a partial head group, a run of full groups, a partial tail."""
    pieces: list[RegularPiece] = []
    start = 0
    head = group_size - (first_position + shift) % group_size
    if head < group_size:
        head = min(head, length)
        pieces.append(RegularPiece(0, head, 1))
        start = head
    full = (length - start) // group_size
    if full:
        pieces.append(RegularPiece(start, group_size, full))
        start += full * group_size
    if start < length:
        pieces.append(RegularPiece(start, length - start, 1))
    return pieces


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

    @property
    def length(self) -> int:
        return self.gather.shape[1]


@dataclass(frozen=True)
class Segments:
    """All segments of a batch for one head half, as flat ``starts``/``lengths`` (row-major)
    plus ``buckets`` for padded kernels and ``cu_seqlens`` for varlen kernels."""

    starts: torch.Tensor
    lengths: torch.Tensor
    buckets: tuple[Bucket, ...]
    token_index: torch.Tensor
    """Flat indices of the tokens that belong to a segment, in row-major order."""

    @property
    def cu_seqlens(self) -> torch.Tensor:
        """int32 cumulative segment lengths over ``token_index`` (varlen kernels' layout)."""
        zero = self.lengths.new_zeros(1)
        return torch.cat([zero, self.lengths.cumsum(0)]).to(torch.int32)


def document_starts(position_ids: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` bool: True where a document starts (row start, or ``p[i] != p[i-1] + 1``)."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return starts


def segments(
    position_ids: torch.Tensor,
    valid: torch.Tensor | None,
    group_size: int,
    shift: int,
) -> Segments:
    """Segments of a ``[B, L]`` batch for the heads whose groups are ``(p + shift) // G``.

    ``valid`` (``[B, L]`` bool or None) marks non-padding tokens; padding tokens belong to
    no segment, so they are never attended and their outputs are left to the caller.
    """
    batch, length = position_ids.shape
    group = torch.div(position_ids + shift, group_size, rounding_mode="floor")
    boundary = document_starts(position_ids)
    boundary[:, 1:] |= group[:, 1:] != group[:, :-1]
    if valid is not None:
        boundary[:, 1:] |= valid[:, 1:] != valid[:, :-1]
    flat = boundary.reshape(-1)
    starts = flat.nonzero().squeeze(1)
    ends = torch.cat([starts[1:], starts.new_tensor([batch * length])])
    lengths = ends - starts
    if valid is None:
        token_index = torch.arange(batch * length, device=position_ids.device)
    else:
        real = valid.reshape(-1)[starts]
        starts, lengths = starts[real], lengths[real]
        token_index = valid.reshape(-1).nonzero().squeeze(1)
    return Segments(starts, lengths, _buckets(starts, lengths), token_index)


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
