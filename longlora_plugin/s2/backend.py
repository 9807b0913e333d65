"""S2-Attn as a transformers attention backend: registration, switching, per-call entry.

:func:`enable_s2_attn` registers, under a name of its own, an attention function with
``transformers.AttentionInterface`` and a mask builder with ``AttentionMaskInterface``
that wrap the backend the model was using (``sdpa``, ``eager`` or ``flash_attention_2``),
then switches the model to it with ``set_attn_implementation``. No model class is patched.

transformers finds the attention function by the name in the model config, so the name
is forced; it is derived from the settings (:attr:`S2Settings.name`), and transformers'
``AttentionInterface`` is the one registry: the function registered under a name carries
its :class:`S2Settings` (``function.s2_settings``), which :func:`s2_settings` reads back
from a model. The settings hold all of S2's state for the models that use them, the
context-parallel group included; per-forward state (the S2 layout) lives on the
:class:`DeferredMask` of that forward.

Registered names (``longlora_s2_<alias>_g<G>`` or ``..._r<ratio>``, then ``_cp<P>`` with
context parallelism) contain none of the substrings transformers dispatches on: ``flash``
(a flash-attention kernel to load), ``flex_attention``, ``/`` (a Hub kernel) and
``paged|``. The flash-attn wrapper's alias is ``fa2``. docs/s2-attn.md lists every place
transformers inspects the name.

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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from longlora_plugin.s2.attention import s2_attention
from longlora_plugin.s2.context_parallel import ContextParallel
from longlora_plugin.s2.group_size import (
    DEFAULT_GROUP_SIZE_RATIO,
    MIN_GROUP_SIZE,
    group_size_for,
    validate_group,
)
from longlora_plugin.s2.halo_exchange import Plan, build_plan, s2_attention_cp
from longlora_plugin.s2.kernels import select_kernel
from longlora_plugin.s2.layout import KernelKind, Layout, build_layout

NAME_PREFIX = "longlora_s2"
# wrapped backend -> the alias in registered names (no "flash": see the module docstring)
BACKEND_ALIASES: dict[str, str] = {"sdpa": "sdpa", "eager": "eager", "flash_attention_2": "fa2"}
SUPPORTED_BACKENDS: tuple[str, ...] = tuple(BACKEND_ALIASES)


@dataclass(frozen=True)
class S2Settings:
    """What one registered S2 backend does: the backend it wraps, how groups are sized
    (:mod:`~longlora_plugin.s2.group_size`) and, with context parallelism, the group of
    ranks that split each row."""

    backend: str
    group_size: int | None
    group_size_ratio: float
    context_parallel: ContextParallel | None = field(default=None, compare=False)
    shift: bool = True  # False: short attention without the shift (an ablation only)

    @property
    def ranks(self) -> int:
        """Ranks that split each row (1 without context parallelism)."""
        return self.context_parallel.size if self.context_parallel is not None else 1

    @property
    def name(self) -> str:
        size = (
            f"g{self.group_size}" if self.group_size is not None else f"r{self.group_size_ratio:g}"
        )
        split = f"_cp{self.ranks}" if self.ranks > 1 else ""
        short = "" if self.shift else "_noshift"
        return f"{NAME_PREFIX}_{BACKEND_ALIASES[self.backend]}_{size}{split}{short}"

    def resolve(self, length: int) -> int:
        """Group size G for rows of ``length`` tokens."""
        group = group_size_for(length, self.group_size, self.group_size_ratio)
        if self.group_size is None and group < MIN_GROUP_SIZE:
            raise ValueError(
                f"S2-Attn: group_size_ratio={self.group_size_ratio} on rows of {length} "
                f"tokens gives group size {group}; it must be >= {MIN_GROUP_SIZE} (use longer "
                "rows or set group_size)"
            )
        return group


def enable_s2_attn(
    model: torch.nn.Module,
    *,
    group_size: int | None = None,
    group_size_ratio: float = DEFAULT_GROUP_SIZE_RATIO,
    context_parallel: ContextParallel | None = None,
    shift: bool = True,
) -> torch.nn.Module:
    """Switch ``model`` (a transformers model, possibly wrapped by PEFT, DDP, FSDP or
    DeepSpeed) to S2-Attn and return it.

    ``group_size`` fixes G in tokens; otherwise ``G = int(group_size_ratio * L)`` for the
    row length L of each batch. The backend the model uses now is the one wrapped;
    enabling twice re-wraps the original backend with the new settings.
    ``context_parallel``: each row is split across the ranks of this group
    (:mod:`longlora_plugin.s2.context_parallel`; batches from its ``shard``); L is then
    the whole row's length. ``shift=False`` gives every head the unshifted groups: the
    paper's "short attention" ablation, no information flows between groups (not with
    context parallelism).
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
    if context_parallel is not None and context_parallel.size == 1:
        context_parallel = None  # one rank holds whole rows: plain S2
    if context_parallel is not None and not shift:
        raise ValueError("S2-Attn without the shift is not implemented with context parallelism")
    settings = S2Settings(backend, group_size, float(group_size_ratio), context_parallel, shift)
    _register(settings)
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
    settings = _registered(current)
    return settings.backend if settings else current


def s2_settings(model: torch.nn.Module) -> S2Settings | None:
    """The active S2 settings of ``model``, or None."""
    return _registered(unwrap_model(model).config._attn_implementation)


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


def _registered(name: str | None) -> S2Settings | None:
    """The settings of the S2 function registered under ``name``, or None."""
    try:
        function = ALL_ATTENTION_FUNCTIONS[name]
    except KeyError:  # "eager" lives in each model's file, not in the registry
        return None
    return getattr(function, "s2_settings", None)


def _register(settings: S2Settings) -> None:
    """Register the functions of ``settings`` under its name; a name already registered
    keeps its functions unless the context-parallel group changed."""
    registered = _registered(settings.name)
    if registered is not None and registered.context_parallel is settings.context_parallel:
        return
    wrapped_mask = ALL_MASK_ATTENTION_FUNCTIONS[settings.backend]

    def attention(module, query, key, value, attention_mask, **kwargs):
        return s2_attention_forward(settings, module, query, key, value, attention_mask, **kwargs)

    def mask(**kwargs):
        return DeferredMask(wrapped_mask, kwargs)

    attention.s2_settings = settings
    AttentionInterface.register(settings.name, attention)
    AttentionMaskInterface.register(settings.name, mask)


class DeferredMask:
    """The wrapped backend's attention mask, built on first request and then cached.

    Carries the 2D padding mask (``padding``, ``[B, kv_len]`` or None) and the forward's
    S2 layouts (``layouts``, by group size and kernel kind) or context-parallel plans
    (``plans``, by group size and sliding window), so each is computed once for all layers.
    """

    __slots__ = ("_builder", "_kwargs", "_built", "_mask", "layouts", "plans")

    def __init__(self, builder, kwargs: dict[str, Any]):
        self._builder = builder
        self._kwargs = kwargs
        self._built = False
        self._mask = None
        self.layouts: dict[tuple[int, KernelKind], Layout] = {}
        self.plans: dict[tuple[int, int | None], Plan] = {}

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
    cp = settings.context_parallel
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
    group = settings.resolve(length * settings.ranks)
    dropout = kwargs.get("dropout", 0.0)
    kernel = select_kernel(settings.backend, query.device, query.dtype, dropout)
    half_dtype = None
    if kernel.casts_to_half:
        from transformers.integrations.flash_attention import get_target_dtype

        half_dtype = get_target_dtype(query, module)
    position_ids, window = kwargs.get("position_ids"), kwargs.get("sliding_window")
    deferred = attention_mask if isinstance(attention_mask, DeferredMask) else None
    options = {
        "scaling": kwargs.get("scaling"),
        "dropout": dropout,
        "window": window,
        "half_dtype": half_dtype,
    }
    if cp is not None:
        plan = _per_forward(
            deferred.plans if deferred is not None else None,
            (group, window),
            lambda: build_plan(
                cp, position_ids, padding, (batch, length), group, window, query.device
            ),
        )
        return s2_attention_cp(cp, plan, kernel, query, key, value, **options), None
    kind = kernel.kind
    layout = _per_forward(
        deferred.layouts if deferred is not None else None,
        (group, kind),
        lambda: build_layout(
            position_ids,
            padding,
            (batch, length),
            group,
            kind,
            query.device,
            shifts=None if settings.shift else (0, 0),
        ),
    )
    return s2_attention(kernel, query, key, value, layout, **options), None


T = TypeVar("T")


def _per_forward(cache: dict[Any, T] | None, key: Any, build: Callable[[], T]) -> T:
    """``build()`` once per forward: the first layer builds it, the others find it in
    ``cache`` (a :class:`DeferredMask`'s; None without one: built on every call)."""
    if cache is None:
        return build()
    if key not in cache:
        cache[key] = build()
    return cache[key]


def _wrapped_function(backend: str, module):
    if backend != "eager":
        return ALL_ATTENTION_FUNCTIONS[backend]
    # transformers keeps "eager" in each model's file, not in the interface registry.
    cls = type(module)
    function = getattr(sys.modules[cls.__module__], "eager_attention_forward", None)
    if function is None:
        raise NotImplementedError(f"{cls.__name__} has no eager_attention_forward to wrap")
    return function


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
