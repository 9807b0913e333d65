"""S2-Attn as a transformers attention backend: registration, switching, per-call entry.

:func:`enable_s2_attn` registers, under a name of its own, an attention function with
``transformers.AttentionInterface`` and a mask builder with ``AttentionMaskInterface``
that wrap the backend the model was using (``sdpa``, ``eager`` or ``flash_attention_2``),
then switches the model to it with ``set_attn_implementation``. No model class is patched.

Registered names (``longlora_s2_<alias>_g<G>`` or ``..._r<ratio>``) contain none of the
substrings transformers dispatches on: ``flash`` (a flash-attention kernel to load),
``flex_attention``, ``/`` (a Hub kernel) and ``paged|``. The flash-attn wrapper's alias is
``fa2``. docs/s2-attn.md lists every place transformers inspects the name.

Contract of the attention function:

* ``module.training`` false: it calls the wrapped backend with exactly the arguments and
  mask the wrapped backend would have received (bit-identical outputs).
* ``module.training`` true: :func:`longlora_plugin.s2.attention.s2_attention` with the
  kernel :func:`~longlora_plugin.s2.kernels.select_kernel` picks.

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

from longlora_plugin.s2.attention import s2_attention
from longlora_plugin.s2.context_parallel import ContextParallel
from longlora_plugin.s2.halo_exchange import Plan, build_plan, s2_attention_cp
from longlora_plugin.s2.kernels import select_kernel
from longlora_plugin.s2.layout import KernelKind, Layout, build_layout

NAME_PREFIX = "longlora_s2"
DEFAULT_GROUP_SIZE_RATIO = 0.25  # the paper's G = L / 4
# wrapped backend -> the alias in registered names (no "flash": see the module docstring)
BACKEND_ALIASES: dict[str, str] = {"sdpa": "sdpa", "eager": "eager", "flash_attention_2": "fa2"}
SUPPORTED_BACKENDS: tuple[str, ...] = tuple(BACKEND_ALIASES)


@dataclass(frozen=True)
class S2Settings:
    """What one registered S2 backend does: the backend it wraps and how groups are sized."""

    backend: str
    group_size: int | None
    group_size_ratio: float
    context_parallel: int = 1  # ranks that split each row

    @property
    def name(self) -> str:
        size = (
            f"g{self.group_size}" if self.group_size is not None else f"r{self.group_size_ratio:g}"
        )
        split = f"_cp{self.context_parallel}" if self.context_parallel > 1 else ""
        return f"{NAME_PREFIX}_{BACKEND_ALIASES[self.backend]}_{size}{split}"

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
_CONTEXT_PARALLEL: dict[str, ContextParallel] = {}


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
    model: torch.nn.Module,
    *,
    group_size: int | None = None,
    group_size_ratio: float = DEFAULT_GROUP_SIZE_RATIO,
    context_parallel: ContextParallel | None = None,
) -> torch.nn.Module:
    """Switch ``model`` (a transformers model, possibly wrapped by PEFT, DDP, FSDP or
    DeepSpeed) to S2-Attn and return it.

    ``group_size`` fixes G in tokens; otherwise ``G = int(group_size_ratio * L)`` for the
    row length L of each batch. The backend the model uses now is the one wrapped;
    enabling twice re-wraps the original backend with the new settings.
    ``context_parallel``: each row is split across the ranks of this group
    (:mod:`longlora_plugin.s2.context_parallel`; batches from its ``shard``); L is then
    the whole row's length.
    """
    validate_group(group_size, group_size_ratio)
    base = unwrap_model(model)
    backend = wrapped_backend(base)
    if backend not in SUPPORTED_BACKENDS:
        raise ValueError(
            f"attn_implementation={backend!r} cannot be wrapped by S2-Attn; supported: {', '.join(SUPPORTED_BACKENDS)}"
        )
    if backend == "flash_attention_2":
        _require_flash_attn()
    split = context_parallel.size if context_parallel is not None else 1
    settings = S2Settings(backend, group_size, float(group_size_ratio), split)
    _register(settings)
    if context_parallel is not None:
        _CONTEXT_PARALLEL[settings.name] = context_parallel
    base.set_attn_implementation(settings.name)
    return model


def disable_s2_attn(model: torch.nn.Module) -> torch.nn.Module:
    """Switch ``model`` back to the backend S2-Attn wrapped (a no-op if S2 is not on)."""
    base = unwrap_model(model)
    backend = wrapped_backend(base)
    if backend != base.config._attn_implementation:
        base.set_attn_implementation(backend)
    return model


def wrapped_backend(model: torch.nn.Module) -> str:
    """The backend ``model`` runs under S2-Attn, or its current backend when S2 is off."""
    current = unwrap_model(model).config._attn_implementation
    settings = _REGISTERED.get(current)
    return settings.backend if settings else current


def s2_settings(model: torch.nn.Module) -> S2Settings | None:
    """The active S2 settings of ``model``, or None."""
    return _REGISTERED.get(unwrap_model(model).config._attn_implementation)


def unwrap_model(model: torch.nn.Module) -> PreTrainedModel:
    """The transformers model inside ``model``: through PEFT (``get_base_model``), DDP,
    FSDP1 and DeepSpeed engines (``.module``) and ``torch.compile`` (``._orig_mod``).
    FSDP2 keeps the model's own class. Raises ``TypeError`` for anything else."""
    current = model
    for _ in range(16):
        if isinstance(current, PreTrainedModel) and not hasattr(current, "get_base_model"):
            return current
        if hasattr(current, "get_base_model"):
            current = current.get_base_model()
            continue
        inner = getattr(current, "module", None) or getattr(current, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            break
        current = inner
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

    Carries the 2D padding mask (``padding``, ``[B, kv_len]`` or None) and a per-forward
    cache of S2 layouts, so the layout is computed once for all layers.
    """

    __slots__ = ("_builder", "_kwargs", "_built", "_mask", "layouts")

    def __init__(self, builder, kwargs: dict[str, Any]):
        self._builder = builder
        self._kwargs = kwargs
        self._built = False
        self._mask = None
        self.layouts: dict[tuple, Layout | Plan] = {}

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
    cp = _CONTEXT_PARALLEL.get(settings.name) if settings.context_parallel > 1 else None
    if cp is not None and not module.training:
        raise NotImplementedError(
            "S2-Attn with context parallelism runs in training mode only: a split row would "
            "need full attention across ranks; evaluate the model on one process"
        )
    if not module.training:
        if isinstance(attention_mask, DeferredMask):
            attention_mask = attention_mask.materialize()
        return _wrapped_function(settings.backend, module)(
            _as_backend(module, settings.backend), query, key, value, attention_mask, **kwargs
        )

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
    batch, _, length, _ = query.shape
    group = settings.resolve(length * settings.context_parallel)
    dropout = kwargs.get("dropout", 0.0)
    kernel = select_kernel(settings.backend, query.device, query.dtype, dropout)
    half_dtype = None
    if kernel.casts_to_half:
        from transformers.integrations.flash_attention import get_target_dtype

        half_dtype = get_target_dtype(query, module)
    if cp is not None:
        window = kwargs.get("sliding_window")
        plan = _cached_plan(
            cp, attention_mask, kwargs.get("position_ids"), padding, query, group, window
        )
        out = s2_attention_cp(
            cp,
            plan,
            kernel,
            query,
            key,
            value,
            scaling=kwargs.get("scaling"),
            dropout=dropout,
            window=window,
            half_dtype=half_dtype,
        )
        return out, None
    layout = _cached_layout(
        attention_mask, kwargs.get("position_ids"), padding, query, group, kernel.kind
    )
    out = s2_attention(
        kernel,
        query,
        key,
        value,
        layout,
        scaling=kwargs.get("scaling"),
        dropout=dropout,
        window=kwargs.get("sliding_window"),
        half_dtype=half_dtype,
    )
    return out, None


def _cached_layout(carrier, position_ids, padding, query, group: int, kind: KernelKind) -> Layout:
    """The batch's layout, built by the first layer and cached on the deferred mask."""
    cache = carrier.layouts if isinstance(carrier, DeferredMask) else None
    if cache is not None and (group, kind) in cache:
        return cache[(group, kind)]
    batch, _, length, _ = query.shape
    layout = build_layout(position_ids, padding, (batch, length), group, kind, query.device)
    if cache is not None:
        cache[(group, kind)] = layout
    return layout


def _cached_plan(cp, carrier, position_ids, padding, query, group: int, window) -> Plan:
    """The context-parallel plan of the batch, built by the first layer (one all-gather)
    and cached on the deferred mask."""
    cache = carrier.layouts if isinstance(carrier, DeferredMask) else None
    key = ("cp", group, window)
    if cache is not None and key in cache:
        return cache[key]
    batch, _, length, _ = query.shape
    plan = build_plan(cp, position_ids, padding, (batch, length), group, window, query.device)
    if cache is not None:
        cache[key] = plan
    return plan


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


def _as_backend(module, backend: str):
    """``module`` as the wrapped backend sees it. transformers' flash-attention forward
    loads its kernel by ``module.config._attn_implementation``, which is the S2 name
    here: it gets a view whose config reports ``flash_attention_2``."""
    if backend != "flash_attention_2":
        return module
    return _ModuleView(module, _ConfigView(module.config, backend))


class _ConfigView:
    """A model config that reports another ``_attn_implementation``; all else delegated."""

    __slots__ = ("_config", "_attn_implementation")

    def __init__(self, config, attn_implementation: str):
        object.__setattr__(self, "_config", config)
        object.__setattr__(self, "_attn_implementation", attn_implementation)

    def __getattr__(self, name: str):
        return getattr(self._config, name)


class _ModuleView:
    """An attention module seen with another ``config``; all else delegated."""

    __slots__ = ("_module", "config")

    def __init__(self, module, config):
        object.__setattr__(self, "_module", module)
        object.__setattr__(self, "config", config)

    def __getattr__(self, name: str):
        return getattr(self._module, name)
