"""An independent dense reference for S2-Attn, written from the semantics alone.

It builds the full ``[B, H, L, L]`` boolean mask token by token in Python-level tensor
logic (no shared code with the package) and runs plain matmul-softmax attention.
"""

from __future__ import annotations

import torch


def s2_allowed(
    position_ids: torch.Tensor,
    valid: torch.Tensor,
    heads: int,
    group: int,
    window: int | None = None,
) -> torch.Tensor:
    """``[B, H, L, L]`` bool: may query i attend key j in head h (the LongLoRA S2 rule)."""
    batch, length = position_ids.shape
    # document ids: a new document wherever positions do not continue by +1
    doc = torch.zeros(batch, length, dtype=torch.long)
    for b in range(batch):
        for i in range(1, length):
            doc[b, i] = doc[b, i - 1] + int(position_ids[b, i] != position_ids[b, i - 1] + 1)
    p = position_ids
    i_idx = torch.arange(length)[:, None]
    j_idx = torch.arange(length)[None, :]
    masks = []
    for h in range(heads):
        shift = 0 if h < heads // 2 else group // 2
        g = (p + shift) // group
        same_doc = doc[:, :, None] == doc[:, None, :]
        same_group = g[:, :, None] == g[:, None, :]
        earlier = p[:, None, :] <= p[:, :, None]
        causal = (j_idx <= i_idx)[None]
        m = same_doc & same_group & earlier & causal & valid[:, None, :]
        if window is not None:
            m &= (i_idx - j_idx < window)[None]
        masks.append(m)
    return torch.stack(masks, dim=1)


def dense_attention(query, key, value, allowed, scaling):
    """Matmul-softmax attention under ``allowed``; fully masked queries output zeros.
    query ``[B, H, L, D]``, key/value ``[B, Hkv, L, D]``; returns ``[B, L, H, D]``."""
    rep = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(rep, dim=1)
    value = value.repeat_interleave(rep, dim=1)
    scores = (query @ key.transpose(-1, -2)) * scaling
    scores = scores.masked_fill(~allowed, float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return (weights @ value).transpose(1, 2)
