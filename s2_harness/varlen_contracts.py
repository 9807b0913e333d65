"""The documented contracts of the two varlen kernels S2 calls, in plain torch on CPU.

``flash_attn_varlen_func`` (flash-attn) and ``varlen_attn`` (``torch.nn.attention.varlen``)
both need CUDA. These stand-ins check the arguments the way the real kernels take them and
compute the result densely per ``cu_seqlens`` span, so S2's plumbing (token order,
``cu_seqlens``, ``max_seqlen``, window, GQA) is tested on any machine.
"""

from __future__ import annotations

import torch


def dense_spans(q, k, v, cu_seqlens, scale, left: int, causal: bool) -> torch.Tensor:
    """Attention inside each span of packed ``[T, h, D]`` tokens: key ``j`` is allowed for
    query ``i`` when ``j <= i`` (causal) and ``i - j <= left`` (``left`` -1: unbounded)."""
    assert cu_seqlens.dtype == torch.int32 and cu_seqlens.dim() == 1
    out = torch.empty_like(q)
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    for a, b in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist(), strict=True):
        n = b - a
        i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
        allowed = torch.ones(n, n, dtype=torch.bool)
        if causal:
            allowed &= j <= i
        if left >= 0:
            allowed &= i - j <= left
        qs, ks, vs = (x[a:b].transpose(0, 1) for x in (q, k, v))
        scores = (qs @ ks.transpose(-1, -2)) * scale
        out[a:b] = (scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ vs).transpose(0, 1)
    return out


def _max_len(cu_seqlens: torch.Tensor) -> int:
    return int((cu_seqlens[1:] - cu_seqlens[:-1]).max())


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
    **_ignored,
):
    """flash-attn 2's varlen contract: ``[T, h, D]``, GQA by head ratio, a Python int
    ``max_seqlen``, ``window_size=(left, right)``."""
    assert torch.equal(cu_seqlens_q, cu_seqlens_k)
    assert int(max_seqlen_q) == _max_len(cu_seqlens_q) == int(max_seqlen_k)
    assert q.shape[1] % k.shape[1] == 0 and q.stride(-1) == 1
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    return dense_spans(q, k, v, cu_seqlens_q, scale, window_size[0], causal)


def varlen_attn(
    query,
    key,
    value,
    cu_seq_q,
    cu_seq_k,
    max_q,
    max_k,
    *,
    return_aux=None,
    scale=None,
    window_size=(-1, -1),
    enable_gqa=False,
):
    """torch's ``varlen_attn`` contract (2.12+): no dropout argument, ``enable_gqa`` needed
    for fewer kv heads, causal when the window's right side is 0."""
    assert return_aux is None
    assert torch.equal(cu_seq_q, cu_seq_k) and max_q == max_k == _max_len(cu_seq_q)
    if query.shape[1] != key.shape[1]:
        assert enable_gqa, "varlen_attn needs enable_gqa=True for fewer kv heads"
    scale = scale if scale is not None else query.shape[-1] ** -0.5
    return dense_spans(query, key, value, cu_seq_q, scale, window_size[0], window_size[1] == 0)
