"""Test stand-in for flash-attn 2: its documented Python API in plain torch, on CPU.

Dense attention per sequence with flash-attn's conventions: ``[B, S, H, D]`` (or packed
``[T, H, D]`` with ``cu_seqlens``), fewer kv heads than query heads (GQA), causal masks
aligned to the bottom right when queries are fewer than keys, ``window_size=(left,
right)``. Only tests import it (tests/support/pretend_flash_attn.py puts it on the path).
"""

from __future__ import annotations

import torch

__version__ = "2.8.3"


def _attend(q, k, v, scale, causal, window_size):
    """``q [Sq, H, D]``, ``k, v [Sk, Hkv, D]`` -> ``[Sq, H, D]``."""
    sq, sk = q.shape[0], k.shape[0]
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    i = torch.arange(sq)[:, None] + (sk - sq)  # bottom-right alignment
    j = torch.arange(sk)[None, :]
    allowed = torch.ones(sq, sk, dtype=torch.bool)
    left, right = window_size
    if causal:
        right = 0
    if left >= 0:
        allowed &= i - j <= left
    if right >= 0:
        allowed &= j - i <= right
    scores = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * scale
    weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)
    return torch.einsum("hqk,khd->qhd", weights, v.float()).to(q.dtype)


def flash_attn_func(
    q,
    k,
    v,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    assert not dropout_p and not softcap and alibi_slopes is None and not return_attn_probs
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    return torch.stack(
        [_attend(q[b], k[b], v[b], scale, causal, window_size) for b in range(q.shape[0])]
    )


def flash_attn_varlen_func(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
    block_table=None,
):
    assert not dropout_p and not softcap and alibi_slopes is None and not return_attn_probs
    assert cu_seqlens_q.dtype == torch.int32 and cu_seqlens_k.dtype == torch.int32
    assert int(max_seqlen_q) == int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
    assert int(max_seqlen_k) == int((cu_seqlens_k[1:] - cu_seqlens_k[:-1]).max())
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    out = torch.empty_like(q)
    q_bounds, k_bounds = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    spans = zip(q_bounds[:-1], q_bounds[1:], k_bounds[:-1], k_bounds[1:], strict=True)
    for qa, qb, ka, kb in spans:
        out[qa:qb] = _attend(q[qa:qb], k[ka:kb], v[ka:kb], scale, causal, window_size)
    return out


def flash_attn_with_kvcache(*args, **kwargs):
    raise NotImplementedError("the flash-attn stand-in has no kv-cache kernel")
