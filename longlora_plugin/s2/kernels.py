"""Causal attention kernels for S2-Attn segments, and which one a call uses.

Two kinds (see :func:`select_kernel`):

* *padded*: ``q [N, h, l, D]``, ``k, v [N, h_kv, l, D]`` (``h`` a multiple of ``h_kv``) ->
  ``[N, h, l, D]``, causal attention inside each of the ``N`` sequences, restricted to a
  sliding window when one is given and shorter than ``l``. Right padding of a sequence is
  harmless: a causal query never sees later keys. ``sdpa`` and ``eager``; the CPU path.
* *varlen*: packed tokens ``q [T, h, D]``, ``k, v [T, h_kv, D]`` plus ``cu_seqlens`` and
  ``max_seqlen`` -> ``[T, h, D]``, causal attention inside each span. flash-attn's
  ``flash_attn_varlen_func`` (backend ``flash_attention_2``) and PyTorch's own
  ``torch.nn.attention.varlen.varlen_attn`` (FlashAttention-2 kernels inside PyTorch,
  backend ``sdpa`` on CUDA in half precision): nothing to install.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import repeat_kv

from longlora_plugin.s2.layout import KernelKind

HALF_DTYPES = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Kernel:
    """A causal kernel of one ``kind``; ``name`` is what ``longlora validate`` prints."""

    name: str
    kind: KernelKind
    run: Callable[..., torch.Tensor]
    casts_to_half: bool = False


def causal_band(length: int, window: int | None, device: torch.device) -> torch.Tensor:
    """``[length, length]`` bool, True where query ``i`` may attend key ``j``:
    ``0 <= i - j`` and, with a window, ``i - j < window`` (transformers' sliding window)."""
    offsets = torch.arange(length, device=device)
    distance = offsets[:, None] - offsets[None, :]
    allowed = distance >= 0
    if window is not None:
        allowed &= distance < window
    return allowed


def sdpa_padded(query, key, value, *, scaling, dropout, window):
    """PyTorch SDPA with ``is_causal=True`` (no mask tensor) unless a window bites.

    With a mask, key/value heads are repeated instead of passing ``enable_gqa``: on CUDA
    only the math kernel takes a mask together with ``enable_gqa``, and it materialises
    the full score matrix.
    """
    length = query.shape[-2]
    mask = None
    if window is not None and window < length:
        mask = causal_band(length, window, query.device)
        n_rep = query.shape[-3] // key.shape[-3]
        key, value = repeat_kv(key, n_rep), repeat_kv(value, n_rep)
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


def eager_padded(query, key, value, *, scaling, dropout, window):
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


def flash_attn_varlen(query, key, value, cu_seqlens, max_seqlen, *, scaling, dropout, window):
    """flash-attn's ``flash_attn_varlen_func``, causal (imported lazily: CUDA only)."""
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


@functools.cache
def _torch_varlen_parameters() -> frozenset[str] | None:
    """Keyword parameters of ``torch.nn.attention.varlen.varlen_attn``; None before 2.10."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return frozenset(inspect.signature(varlen_attn).parameters)


def torch_varlen(query, key, value, cu_seqlens, max_seqlen, *, scaling, dropout, window):
    """PyTorch's ``varlen_attn``, causal. Before torch 2.12 it has no ``enable_gqa``, so
    key/value heads are repeated; releases with an ``is_causal`` flag get it set."""
    from torch.nn.attention.varlen import varlen_attn

    if dropout:
        raise ValueError("torch varlen_attn has no attention dropout")
    params = _torch_varlen_parameters() or frozenset()
    n_rep = query.shape[1] // key.shape[1]
    kwargs: dict = {"scale": scaling}
    if n_rep > 1:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            key = key.repeat_interleave(n_rep, dim=1)
            value = value.repeat_interleave(n_rep, dim=1)
    if "is_causal" in params:
        kwargs["is_causal"] = True
    kwargs["window_size"] = (window - 1, 0) if window is not None else (-1, 0)
    return varlen_attn(query, key, value, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **kwargs)


SDPA = Kernel("sdpa (is_causal, per group)", "padded", sdpa_padded)
EAGER = Kernel("eager (per group)", "padded", eager_padded)
FLASH_ATTN_VARLEN = Kernel("flash_attn_varlen_func", "varlen", flash_attn_varlen, True)
TORCH_VARLEN = Kernel("torch.nn.attention.varlen.varlen_attn", "varlen", torch_varlen)
PADDED: dict[str, Kernel] = {"sdpa": SDPA, "eager": EAGER}


def torch_varlen_usable(device: torch.device | str, dtype: torch.dtype, dropout: float) -> bool:
    """Whether PyTorch's varlen kernel can run S2 here: CUDA, fp16/bf16, no dropout,
    torch >= 2.10 with ``window_size``."""
    params = _torch_varlen_parameters()
    return (
        torch.device(device).type == "cuda"
        and dtype in HALF_DTYPES
        and not dropout
        and params is not None
        and "window_size" in params
    )


def select_kernel(backend: str, device, dtype: torch.dtype, dropout: float = 0.0) -> Kernel:
    """The kernel S2 uses for ``backend`` on inputs of this device and dtype.

    ``flash_attention_2``: flash-attn's varlen kernel (inputs cast to half precision as
    transformers' flash path does). ``sdpa``: PyTorch's varlen kernel where usable
    (:func:`torch_varlen_usable`), else SDPA per group. ``eager``: matmul-softmax per group.
    """
    if backend == "flash_attention_2":
        return FLASH_ATTN_VARLEN
    if backend == "sdpa" and torch_varlen_usable(device, dtype, dropout):
        return TORCH_VARLEN
    return PADDED[backend]


def describe_kernels(backend: str, dtype: torch.dtype) -> list[str]:
    """One line per device: the kernel S2 over ``backend`` trains with, for unpacked rows
    (one document each) and for packed or padded rows (``longlora validate`` prints them)."""
    lines = []
    for device in ("cuda", "cpu"):
        if backend == "flash_attention_2" and device == "cpu":
            lines.append("cpu: none (flash-attn needs CUDA)")
            continue
        kernel = select_kernel(backend, device, dtype if device == "cuda" else torch.float32)
        if kernel.kind == "varlen":
            how = f"{kernel.name}, both head halves in one call over cu_seqlens"
            lines.append(f"{device} ({_dtype_name(dtype)}): unpacked and packed rows: {how}")
        else:
            precision = _dtype_name(dtype) if device == "cuda" else "float32"
            lines.append(
                f"{device} ({precision}): unpacked rows: {kernel.name}, whole groups reshaped "
                f"into the batch; packed/padded rows: {kernel.name}, segments batched by length"
            )
    return lines


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
