"""flash-attn's padding helpers (stand-in): between ``[B, S, ...]`` with a 2D mask and the
packed ``[T, ...]`` of the real tokens."""

from __future__ import annotations

import torch


def unpad_input(hidden_states, attention_mask, unused_mask=None):
    """-> (packed tokens, their flat indices, int32 cu_seqlens, max length, int32 lengths)."""
    mask = attention_mask.bool() if unused_mask is None else (attention_mask + unused_mask).bool()
    lengths = mask.sum(dim=-1, dtype=torch.int32)
    indices = mask.flatten().nonzero().flatten()
    cu_seqlens = torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    flat = hidden_states.reshape(-1, *hidden_states.shape[2:])
    return flat[indices], indices, cu_seqlens, int(lengths.max()), lengths


def pad_input(hidden_states, indices, batch, seqlen):
    """Scatter packed tokens back to ``[batch, seqlen, ...]`` (zeros elsewhere)."""
    out = hidden_states.new_zeros(batch * seqlen, *hidden_states.shape[1:])
    out[indices] = hidden_states
    return out.view(batch, seqlen, *hidden_states.shape[1:])
