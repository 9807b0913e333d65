"""S2-Attn's training-time attention: one decoder layer's call, given its batch layout.

Contract of :func:`s2_attention`: ``query [B, H, L, D]``, ``key, value [B, H_kv, L, D]``
-> ``[B, L, H, D]``. For query head ``h < H // 2`` token ``i`` attends ``j`` iff both are
in the same document, ``p(j) <= p(i)`` and ``p(j) // G == p(i) // G``; heads
``h >= H // 2`` use ``(p + G // 2) // G``. Padding keys are never attended, padding
queries output zeros, a sliding window is respected, nothing wraps around.
"""

from __future__ import annotations

import torch

from longlora_plugin.s2.kernels import Kernel
from longlora_plugin.s2.layout import Layout, Piece, Segments


def s2_attention(
    kernel: Kernel,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: Layout,
    *,
    scaling: float | None,
    dropout: float,
    window: int | None,
    half_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """S2-Attn of one layer with ``kernel`` over ``layout`` (built for ``kernel.kind``).

    ``half_dtype``: cast q/k/v to it first (flash-attn takes only fp16/bf16)."""
    if half_dtype is not None and query.dtype != half_dtype:
        query, key, value = (x.to(half_dtype) for x in (query, key, value))
    if kernel.kind == "varlen":
        return _run_varlen(kernel, query, key, value, layout, scaling, dropout, window)
    outputs = []
    for (first, last), half in zip(head_halves(query.shape[1]), range(2), strict=True):
        if first == last:
            continue
        q = query[:, first:last]
        k, v = (
            kv_for_heads(x, first, last, queries_per_kv(query, key), dim=1) for x in (key, value)
        )
        if layout.pieces is not None:
            out = _run_pieces(kernel, q, k, v, layout.pieces[half], scaling, dropout, window)
        else:
            out = _run_buckets(kernel, q, k, v, layout.segments[half], scaling, dropout, window)
        outputs.append(out)
    return torch.cat(outputs, dim=2) if len(outputs) > 1 else outputs[0]


def head_halves(heads: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Query-head ranges ``[first, last)`` of the unshifted and the shifted half."""
    return (0, heads // 2), (heads // 2, heads)


def queries_per_kv(query: torch.Tensor, key: torch.Tensor) -> int:
    return query.shape[1] // key.shape[1]


def kv_for_heads(states: torch.Tensor, first: int, last: int, n_rep: int, dim: int):
    """Key/value heads (along ``dim``) serving query heads ``[first, last)``; when the
    half splits a GQA group, one kv head per query head."""
    if first % n_rep == 0 and last % n_rep == 0:
        return states.narrow(dim, first // n_rep, (last - first) // n_rep)
    index = torch.arange(first, last, device=states.device) // n_rep
    return states.index_select(dim, index)


def _run_pieces(kernel, q, k, v, pieces: tuple[Piece, ...], scaling, dropout, window):
    """Every row one unpadded document: whole groups reshaped into the batch dimension;
    returns ``[B, L, h, D]``."""
    batch, heads, _, dim = q.shape

    def grouped(x: torch.Tensor, piece: Piece) -> torch.Tensor:
        rows = x.transpose(1, 2)[:, piece.start : piece.start + piece.length * piece.count]
        rows = rows.reshape(batch * piece.count, piece.length, x.shape[1], dim)
        return rows.transpose(1, 2)

    outputs = []
    for piece in pieces:
        out = kernel.run(
            grouped(q, piece),
            grouped(k, piece),
            grouped(v, piece),
            scaling=scaling,
            dropout=dropout,
            window=window,
        )
        outputs.append(out.transpose(1, 2).reshape(batch, piece.count * piece.length, heads, dim))
    return torch.cat(outputs, dim=1) if len(outputs) > 1 else outputs[0]


def _flat(x: torch.Tensor) -> torch.Tensor:
    """``[B, H, L, D]`` -> ``[B * L, H, D]`` (a view when the memory is ``B, L, H, D``)."""
    batch, heads, length, dim = x.shape
    return x.transpose(1, 2).reshape(batch * length, heads, dim)


def _run_buckets(kernel, q, k, v, segments: Segments, scaling, dropout, window):
    """Packing or padding on a padded kernel: segments batched by length; ``[B, L, h, D]``."""
    batch, heads, length, dim = q.shape
    qf, kf, vf = _flat(q), _flat(k), _flat(v)
    result = qf.new_zeros(batch * length, heads, dim)
    if not segments.buckets:  # every token is padding
        return (result + _zero_from(qf, kf, vf)).view(batch, length, heads, dim)
    parts, dests = [], []
    for bucket in segments.buckets:
        index = bucket.gather
        out = kernel.run(
            qf[index].transpose(1, 2),
            kf[index].transpose(1, 2),
            vf[index].transpose(1, 2),
            scaling=scaling,
            dropout=dropout,
            window=window,
        )
        parts.append(out.transpose(1, 2).reshape(-1, heads, dim)[bucket.keep])
        dests.append(bucket.dest)
    result = result.index_copy(0, torch.cat(dests), torch.cat(parts))
    return result.view(batch, length, heads, dim)


def _run_varlen(kernel, query, key, value, layout: Layout, scaling, dropout, window):
    """Varlen kernels: the real tokens packed as ``[T, H, D]``, both head halves in one
    call when they have equal query and kv head counts; returns ``[B, L, H, D]``."""
    batch, heads, length, dim = query.shape
    qf, kf, vf = _flat(query), _flat(key), _flat(value)
    if layout.token_index is not None:
        qf, kf, vf = (x.index_select(0, layout.token_index) for x in (qf, kf, vf))
    if layout.num_tokens == 0:  # every token is padding
        return query.new_zeros(batch, length, heads, dim) + _zero_from(qf, kf, vf)
    n_rep = queries_per_kv(query, key)
    parts = [
        (qf[:, first:last], *(kv_for_heads(x, first, last, n_rep, dim=1) for x in (kf, vf)))
        for first, last in head_halves(heads)
        if first < last
    ]
    segments = layout.segments
    if (
        len(parts) == 2
        and parts[0][0].shape[1:] == parts[1][0].shape[1:]
        and (parts[0][1].shape[1:] == parts[1][1].shape[1:])
    ):
        joined = (torch.cat(tensors, dim=0) for tensors in zip(*parts, strict=True))
        out = kernel.run(
            *joined,
            layout.joined.cu_seqlens,
            layout.joined.max_seqlen,
            scaling=scaling,
            dropout=dropout,
            window=window,
        )
        outs = [out[: layout.num_tokens], out[layout.num_tokens :]]
    else:
        halves = segments if len(parts) == 2 else segments[1:]
        outs = [
            kernel.run(
                q,
                k,
                v,
                half.cu_seqlens,
                half.max_seqlen,
                scaling=scaling,
                dropout=dropout,
                window=window,
            )
            for (q, k, v), half in zip(parts, halves, strict=True)
        ]
    out = torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]
    if layout.token_index is not None:
        full = out.new_zeros(batch * length, heads, dim)
        out = full.index_copy(0, layout.token_index, out)
    return out.view(batch, length, heads, dim)


def _zero_from(*tensors: torch.Tensor) -> torch.Tensor:
    """A zero that depends on ``tensors`` (an empty slice's sum): outputs with no
    attention to compute still give their inputs zero gradients rather than none, so
    data-parallel gradient reduction sees every parameter."""
    return sum(x.flatten()[:0].sum() for x in tensors)
