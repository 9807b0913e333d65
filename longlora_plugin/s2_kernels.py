"""Causal attention kernels for S2-Attn segments, one per wrapped backend.

Each padded kernel takes ``q [N, h, l, D]`` and ``k, v [N, h_kv, l, D]`` (``h`` a multiple
of ``h_kv``) and returns ``[N, h, l, D]``: causal attention inside each of the ``N``
sequences, restricted to a sliding window when one is given and shorter than ``l``.
Right padding of a sequence is harmless: a causal query never sees later keys.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import repeat_kv


class PaddedKernel(Protocol):
    def __call__(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        *,
        scaling: float | None,
        dropout: float,
        window: int | None,
    ) -> torch.Tensor: ...


def causal_band(length: int, window: int | None, device: torch.device) -> torch.Tensor:
    """``[length, length]`` bool, True where query ``i`` may attend key ``j``:
    ``0 <= i - j`` and, with a window, ``i - j < window`` (transformers' sliding window)."""
    offsets = torch.arange(length, device=device)
    distance = offsets[:, None] - offsets[None, :]
    allowed = distance >= 0
    if window is not None:
        allowed &= distance < window
    return allowed


def sdpa_kernel(query, key, value, *, scaling, dropout, window):
    """PyTorch SDPA with ``is_causal=True`` (no mask tensor) unless a window bites."""
    length = query.shape[-2]
    mask = (
        causal_band(length, window, query.device)
        if window is not None and window < length
        else None
    )
    return F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=mask,
        is_causal=mask is None,
        dropout_p=dropout,
        scale=scaling,
        enable_gqa=query.shape[-3] != key.shape[-3],
    )


def eager_kernel(query, key, value, *, scaling, dropout, window):
    """Matmul-softmax attention as transformers' eager backend computes it (fp32 softmax)."""
    n_rep = query.shape[-3] // key.shape[-3]
    key, value = repeat_kv(key, n_rep), repeat_kv(value, n_rep)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    allowed = causal_band(query.shape[-2], window, query.device)
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=True)
    return torch.matmul(weights, value)


PADDED_KERNELS: dict[str, PaddedKernel] = {"sdpa": sdpa_kernel, "eager": eager_kernel}


def flash_varlen_kernel(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    scaling: float | None,
    dropout: float,
    window: int | None,
) -> torch.Tensor:
    """flash-attn's varlen causal kernel on packed tokens ``[T, h, D]`` (imported lazily)."""
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func(
        query,
        key,
        value,
        cu_seqlens_q=cu_seqlens,
        cu_seqlens_k=cu_seqlens,
        max_seqlen_q=max_seqlen,
        max_seqlen_k=max_seqlen,
        dropout_p=dropout,
        softmax_scale=scaling,
        causal=True,
        window_size=(window - 1, 0) if window is not None else (-1, -1),
    )
