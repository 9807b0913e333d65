"""Shifted sparse attention (S2-Attn) as a transformers attention backend.

:func:`enable_s2_attn` registers, under a name of its own, an attention function with
``transformers.AttentionInterface`` and a mask builder with ``AttentionMaskInterface``
that wrap the backend the model was using (``sdpa``, ``eager`` or ``flash_attention_2``),
then switches the model to it with ``set_attn_implementation``. No model class is patched.

Contract of the attention function:

* ``module.training`` false: it calls the wrapped backend with exactly the arguments and
  mask the wrapped backend would have received (bit-identical outputs).
* ``module.training`` true: for query head ``h < H // 2`` token ``i`` attends ``j`` iff
  both are in the same document, ``p(j) <= p(i)`` and ``p(j) // G == p(i) // G``; heads
  ``h >= H // 2`` use ``(p + G // 2) // G``. Documents come from ``position_ids``
  (a new one wherever ``p[i] != p[i-1] + 1``), padding keys are never attended, a
  sliding window is respected, nothing wraps around. Padding queries output zeros.

The mask builder returns a :class:`DeferredMask`: the wrapped builder runs only when a
full-attention (eval) call asks for the mask, so training never materialises an
``L x L`` mask; the S2 layout is computed once per forward and shared by all layers.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from longlora_plugin.s2_kernels import PADDED_KERNELS, flash_varlen_kernel
from longlora_plugin.s2_layout import RegularPiece, Segments, regular_pieces, segments

NAME_PREFIX = "longlora_s2"
SUPPORTED_BACKENDS = ("sdpa", "eager", "flash_attention_2")


@dataclass(frozen=True)
class S2Settings:
    """What one registered S2 backend does: the backend it wraps and how groups are sized."""

    backend: str
    group_size: int | None
    group_size_ratio: float

    @property
    def name(self) -> str:
        size = (
            f"g{self.group_size}" if self.group_size is not None else f"r{self.group_size_ratio:g}"
        )
        return f"{NAME_PREFIX}_{self.backend}_{size}"

    def resolve(self, length: int) -> int:
        """Group size G for rows of ``length`` tokens."""
        if self.group_size is not None:
            return self.group_size
        group = int(self.group_size_ratio * length)
        if group < 2:
            raise ValueError(
                f"S2-Attn: group_size_ratio={self.group_size_ratio} on rows of {length} tokens gives "
                f"group size {group}; it must be >= 2 (use longer rows or set group_size)"
            )
        return group


_REGISTERED: dict[str, S2Settings] = {}


def validate_group(group_size: int | None, group_size_ratio: float | None) -> None:
    """Raise ``ValueError`` naming the argument unless ``group_size >= 2`` (when given)
    and ``0 < group_size_ratio <= 1``."""
    if group_size is not None and (
        isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2
    ):
        raise ValueError(f"group_size={group_size!r} is invalid: it must be an integer >= 2")
    if group_size is None and (
        group_size_ratio is None
        or not isinstance(group_size_ratio, (int, float))
        or not 0 < group_size_ratio <= 1
    ):
        raise ValueError(f"group_size_ratio={group_size_ratio!r} is outside (0, 1]")


def enable_s2_attn(
    model: torch.nn.Module, *, group_size: int | None = None, group_size_ratio: float = 0.25
) -> torch.nn.Module:
    """Switch ``model`` (a transformers model, possibly PEFT-wrapped) to S2-Attn and return it.

    ``group_size`` fixes G in tokens; otherwise ``G = int(group_size_ratio * L)`` for the
    row length L of each batch. The backend the model uses now is the one wrapped;
    enabling twice re-wraps the original backend with the new settings.
    """
    validate_group(group_size, group_size_ratio)
    base = _pretrained(model)
    backend = wrapped_backend(base)
    if backend not in SUPPORTED_BACKENDS:
        raise ValueError(
            f"attn_implementation={backend!r} cannot be wrapped by S2-Attn; supported: {', '.join(SUPPORTED_BACKENDS)}"
        )
    if backend == "flash_attention_2":
        _require_flash_attn()
    settings = S2Settings(backend, group_size, float(group_size_ratio))
    _register(settings)
    base.set_attn_implementation(settings.name)
    return model


def disable_s2_attn(model: torch.nn.Module) -> torch.nn.Module:
    """Switch ``model`` back to the backend S2-Attn wrapped (a no-op if S2 is not on)."""
    base = _pretrained(model)
    backend = wrapped_backend(base)
    if backend != base.config._attn_implementation:
        base.set_attn_implementation(backend)
    return model


def wrapped_backend(model: torch.nn.Module) -> str:
    """The backend ``model`` runs under S2-Attn, or its current backend when S2 is off."""
    current = _pretrained(model).config._attn_implementation
    settings = _REGISTERED.get(current)
    return settings.backend if settings else current


def s2_settings(model: torch.nn.Module) -> S2Settings | None:
    """The active S2 settings of ``model``, or None."""
    return _REGISTERED.get(_pretrained(model).config._attn_implementation)


def _pretrained(model: torch.nn.Module) -> PreTrainedModel:
    if isinstance(model, PreTrainedModel) and not hasattr(model, "get_base_model"):
        return model
    if hasattr(model, "get_base_model"):
        return _pretrained(model.get_base_model())
    raise TypeError(f"expected a transformers PreTrainedModel, got {type(model).__name__}")


def _require_flash_attn() -> None:
    try:
        import flash_attn  # noqa: F401
    except ImportError as err:
        raise ImportError(
            "S2-Attn over flash_attention_2 needs the flash-attn package "
            "(pip install 'longlora-plugin[flash-attn]'); use sdpa or eager otherwise"
        ) from err


def _register(settings: S2Settings) -> None:
    if settings.name in _REGISTERED:
        return
    wrapped_mask = ALL_MASK_ATTENTION_FUNCTIONS[settings.backend]

    def attention(module, query, key, value, attention_mask, **kwargs):
        return s2_attention_forward(settings, module, query, key, value, attention_mask, **kwargs)

    def mask(**kwargs):
        return DeferredMask(wrapped_mask, kwargs)

    AttentionInterface.register(settings.name, attention)
    AttentionMaskInterface.register(settings.name, mask)
    _REGISTERED[settings.name] = settings


class DeferredMask:
    """The wrapped backend's attention mask, built on first request and then cached.

    Carries the 2D padding mask (``padding``, ``[B, kv_len]`` bool or None) and a per-forward
    cache of S2 layouts, so the layout is computed once for all layers.
    """

    __slots__ = ("_builder", "_kwargs", "_built", "_mask", "layouts")

    def __init__(self, builder, kwargs: dict[str, Any]):
        self._builder = builder
        self._kwargs = kwargs
        self._built = False
        self._mask = None
        self.layouts: dict[tuple[int, int], Any] = {}

    @property
    def padding(self) -> torch.Tensor | None:
        return self._kwargs.get("attention_mask")

    @property
    def has_custom_pattern(self) -> bool:
        """True when the model overlaid mask functions (or/and masks) S2 cannot honour."""
        return bool(self._kwargs.get("use_vmap"))

    def materialize(self):
        if not self._built:
            self._mask = self._builder(**self._kwargs)
            self._built = True
        return self._mask


def s2_attention_forward(settings: S2Settings, module, query, key, value, attention_mask, **kwargs):
    """AttentionInterface entry point: S2 while ``module.training``, the wrapped backend otherwise."""
    if not module.training:
        if isinstance(attention_mask, DeferredMask):
            attention_mask = attention_mask.materialize()
        return _wrapped_function(settings.backend, module)(
            module, query, key, value, attention_mask, **kwargs
        )

    batch, heads, length, _ = query.shape
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise NotImplementedError("S2-Attn does not support attention softcapping or sinks")
    padding = None
    if isinstance(attention_mask, DeferredMask):
        if attention_mask.has_custom_pattern:
            raise NotImplementedError(
                "S2-Attn cannot combine with the model's custom mask functions"
            )
        padding = attention_mask.padding
    elif attention_mask is not None:
        raise NotImplementedError(
            "S2-Attn needs the 2D padding mask; the model was given a prepared 4D attention mask"
        )
    group = settings.resolve(length)
    varlen = settings.backend == "flash_attention_2"
    layout = _layout(
        attention_mask,
        kwargs.get("position_ids"),
        padding,
        (batch, length),
        group,
        varlen,
        query.device,
    )
    window = kwargs.get("sliding_window")
    dropout = kwargs.get("dropout", 0.0)
    scaling = kwargs.get("scaling")
    n_rep = heads // key.shape[1]

    outputs = []
    for first, last, shift in ((0, heads // 2, 0), (heads // 2, heads, group // 2)):
        if first == last:
            continue
        q = query[:, first:last]
        k, v = _kv_for_heads(key, first, last, n_rep), _kv_for_heads(value, first, last, n_rep)
        half = layout[shift]
        if settings.backend == "flash_attention_2":
            out = _run_varlen(q, k, v, half, scaling=scaling, dropout=dropout, window=window)
        elif isinstance(half, list):
            out = _run_regular(
                PADDED_KERNELS[settings.backend], q, k, v, half, scaling, dropout, window
            )
        else:
            out = _run_segments(
                PADDED_KERNELS[settings.backend], q, k, v, half, scaling, dropout, window
            )
        outputs.append(out)
    return torch.cat(outputs, dim=2), None


_EAGER_FUNCTIONS: dict[type, Any] = {}


def _wrapped_function(backend: str, module):
    if backend != "eager":
        return ALL_ATTENTION_FUNCTIONS[backend]
    cls = type(module)
    if cls not in _EAGER_FUNCTIONS:
        # transformers keeps "eager" in each model's file, not in the interface registry.
        function = getattr(sys.modules[cls.__module__], "eager_attention_forward", None)
        if function is None:
            raise NotImplementedError(f"{cls.__name__} has no eager_attention_forward to wrap")
        _EAGER_FUNCTIONS[cls] = function
    return _EAGER_FUNCTIONS[cls]


def _layout(carrier, position_ids, padding, shape, group: int, varlen: bool, device=None):
    """``{shift: list[RegularPiece] | Segments}`` for both head halves, cached on the mask.

    Regular pieces (the reshape fast path) when every row is one unpadded document whose
    positions start alike and the kernel is not varlen; segments otherwise."""
    batch, length = shape
    cache = carrier.layouts if isinstance(carrier, DeferredMask) else None
    if cache is not None and group in cache:
        return cache[group]
    if position_ids is None:
        position_ids = torch.arange(length, device=device)[None]
    position_ids = position_ids.expand(batch, length)
    if padding is not None:
        padding = padding[:, -length:].to(torch.bool)
        if bool(padding.all()):
            padding = None
    regular = (
        not varlen
        and padding is None
        and bool((position_ids[:, 1:] == position_ids[:, :-1] + 1).all())
        and bool((position_ids[:, 0] == position_ids[0, 0]).all())
    )
    shifts = (0, group // 2)
    if regular:
        first = int(position_ids[0, 0])
        result = {s: regular_pieces(length, group, s, first) for s in shifts}
    else:
        result = {s: segments(position_ids, padding, group, s) for s in shifts}
    if cache is not None:
        cache[group] = result
    return result


def _kv_for_heads(states: torch.Tensor, first: int, last: int, n_rep: int) -> torch.Tensor:
    """Key/value heads serving query heads ``[first, last)``; when the half splits a GQA
    group, one kv head per query head."""
    if first % n_rep == 0 and last % n_rep == 0:
        return states[:, first // n_rep : last // n_rep]
    index = torch.arange(first, last, device=states.device) // n_rep
    return states.index_select(1, index)


def _run_regular(
    kernel, q, k, v, pieces: list[RegularPiece], scaling, dropout, window
) -> torch.Tensor:
    """Fast path: every row is one unpadded document; returns ``[B, L, h, D]``."""
    batch, heads, _, dim = q.shape

    def grouped(x: torch.Tensor, piece: RegularPiece) -> torch.Tensor:
        rows = x.transpose(1, 2)[:, piece.start : piece.start + piece.length * piece.count]
        rows = rows.reshape(batch * piece.count, piece.length, x.shape[1], dim)
        return rows.transpose(1, 2)

    outputs = []
    for piece in pieces:
        out = kernel(
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
    batch, heads, length, dim = x.shape
    return x.transpose(1, 2).reshape(batch * length, heads, dim)


def _run_segments(kernel, q, k, v, layout: Segments, scaling, dropout, window) -> torch.Tensor:
    """General path (packing, padding): segments batched by length; returns ``[B, L, h, D]``."""
    batch, heads, length, dim = q.shape
    qf, kf, vf = _flat(q), _flat(k), _flat(v)
    parts, dests = [], []
    for bucket in layout.buckets:
        index = bucket.gather
        out = kernel(
            qf[index].transpose(1, 2),
            kf[index].transpose(1, 2),
            vf[index].transpose(1, 2),
            scaling=scaling,
            dropout=dropout,
            window=window,
        )
        parts.append(out.transpose(1, 2).reshape(-1, heads, dim)[bucket.keep])
        dests.append(bucket.dest)
    result = qf.new_zeros(batch * length, heads, dim)
    if parts:
        result = result.index_copy(0, torch.cat(dests), torch.cat(parts))
    return result.view(batch, length, heads, dim)


def _run_varlen(q, k, v, layout: Segments, *, scaling, dropout, window) -> torch.Tensor:
    """flash-attn varlen path: one kernel call over all segments; returns ``[B, L, h, D]``."""
    batch, heads, length, dim = q.shape
    index = layout.token_index
    qf, kf, vf = _flat(q)[index], _flat(k)[index], _flat(v)[index]
    max_seqlen = int(layout.lengths.max()) if layout.lengths.numel() else 0
    out = flash_varlen_kernel(
        qf, kf, vf, layout.cu_seqlens, max_seqlen, scaling=scaling, dropout=dropout, window=window
    )
    result = out.new_zeros(batch * length, heads, dim).index_copy(0, index, out)
    return result.view(batch, length, heads, dim)
