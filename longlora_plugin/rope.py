"""RoPE position interpolation for LongLoRA (transformers 5 ``rope_parameters``).

No Axolotl import: this module only reads a ``transformers`` config and computes the
``rope_parameters`` dict a model must be loaded with to reach ``sequence_len``.

transformers 5 facts this relies on (``transformers/modeling_rope_utils.py``):

* ``config.rope_parameters`` replaces ``rope_scaling``; overriding it replaces the whole
  dict, so the new dict is the base model's dict (``rope_theta``,
  ``partial_rotary_factor``, ...) with ``rope_type``/``factor`` changed.
* Required keys: linear and dynamic need ``factor``; yarn needs ``factor`` and
  ``original_max_position_embeddings``; llama3 needs ``factor``,
  ``original_max_position_embeddings``, ``low_freq_factor``, ``high_freq_factor`` and
  ``rope_theta``.
* For llama3/yarn/longrope a *top-level* ``config.original_max_position_embeddings``
  (Phi-3 keeps one) overrides the dict's value at every ``standardize_rope_params``
  call, so it is overridden too.
* dynamic NTK treats ``config.max_position_embeddings`` as the pre-training length
  and only scales beyond it, so for dynamic ``max_position_embeddings`` must stay the
  original context; for the other types it is raised to the target length (what
  Axolotl does anyway after loading).
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

LOG = logging.getLogger("longlora_plugin")

RopeType = Literal["linear", "dynamic", "yarn", "llama3", "none"]
"""``longlora.rope.type``: a transformers RoPE type to scale with, or ``none``."""
SCALED_TYPES: tuple[str, ...] = tuple(t for t in get_args(RopeType) if t != "none")
LLAMA3_DEFAULTS: dict[str, float] = {"low_freq_factor": 1.0, "high_freq_factor": 4.0}


class RopeConfigError(ValueError):
    """The base model or the requested RoPE settings cannot be combined."""


@dataclass(frozen=True)
class RopeResolution:
    """Outcome of :func:`resolve_rope`.

    ``rope_type``/``factor`` describe the RoPE the model will run with (the base
    model's own type and factor, 1.0 if none, when nothing is changed). ``original``
    is the pre-training context, ``target`` the training ``sequence_len``.
    ``rope_parameters`` is the complete dict to load the model with, or ``None`` when
    the base model's RoPE is left unchanged; ``config_overrides`` holds every config
    attribute to override (``rope_parameters`` included), empty when unchanged.
    """

    rope_type: str
    factor: float
    original: int
    target: int
    rope_parameters: dict[str, Any] | None = None
    config_overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def scaled(self) -> bool:
        """True when the model config is changed."""
        return self.rope_parameters is not None

    def log_line(self) -> str:
        """The INFO line users and tests grep for."""
        return (
            f"longlora: RoPE {self.rope_type} factor {float(self.factor)} "
            f"(original {self.original}, target {self.target})"
        )

    def apply_to_config_dict(self, config_dict: dict[str, Any]) -> dict[str, Any]:
        """Return a copy of a ``config.json`` dict with ``config_overrides`` merged in."""
        out = dict(config_dict)
        out.update({k: _copy(v) for k, v in self.config_overrides.items()})
        out.pop("rope_scaling", None)  # legacy alias; rope_parameters is authoritative
        return out


def load_base_config(
    name_or_path: str, *, trust_remote_code: bool = False, revision: str | None = None
) -> Any:
    """Load only the config of ``name_or_path`` (a local directory or a Hub id already in
    the cache when offline); no weights are read."""
    from transformers import AutoConfig

    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if revision:
        kwargs["revision"] = revision
    return AutoConfig.from_pretrained(name_or_path, **kwargs)


def existing_rope_parameters(config: Any) -> dict[str, Any] | None:
    """The base model's flat ``rope_parameters`` dict (a copy), or ``None`` without RoPE.

    Raises :class:`RopeConfigError` for per-layer-type dicts (e.g. Gemma 3), whose
    layers use different RoPE settings and are not supported.
    """
    params = getattr(config, "rope_parameters", None)
    if not params:
        theta = getattr(config, "rope_theta", None)
        return {"rope_type": "default", "rope_theta": theta} if theta else None
    if not isinstance(params, dict):
        return None
    layer_types = getattr(config, "layer_types", None) or ()
    if layer_types and set(params).issubset(set(layer_types)):
        raise RopeConfigError(
            f"model type {getattr(config, 'model_type', '?')!r} has per-layer-type "
            f"rope_parameters ({', '.join(sorted(params))}); longlora.rope supports one "
            "RoPE for all layers: set longlora.rope.type: none and configure "
            "model_config.rope_parameters yourself"
        )
    out = _copy(params)
    if "rope_theta" not in out and getattr(config, "rope_theta", None):
        out["rope_theta"] = config.rope_theta
    out.setdefault("rope_type", out.pop("type", "default"))
    if out.get("rope_theta") is None:
        return None
    return out


def original_context(config: Any, explicit: int | None = None) -> int | None:
    """Pre-training context length: ``explicit``, else ``rope_parameters``'
    ``original_max_position_embeddings``, else a top-level
    ``config.original_max_position_embeddings`` (Phi-3), else
    ``config.max_position_embeddings``; ``None`` if the config has none of them."""
    if explicit:
        return int(explicit)
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and params.get("original_max_position_embeddings"):
        return int(params["original_max_position_embeddings"])
    for attr in ("original_max_position_embeddings", "max_position_embeddings"):
        value = getattr(config, attr, None)
        if value:
            return int(value)
    return None


def resolve_rope(
    config: Any,
    *,
    rope_type: str,
    factor: float | str,
    sequence_len: int,
    original_max_position_embeddings: int | None = None,
) -> RopeResolution:
    """Compute the RoPE a LongLoRA run uses.

    ``factor`` is ``"auto"`` (``sequence_len / original``; no change, logged, when
    ``sequence_len <= original``) or a number >= 1 (1 means no change). ``rope_type``
    ``"none"`` leaves the model's RoPE untouched. Raises :class:`RopeConfigError` when
    scaling is requested for a model without rotary embeddings or without a known
    context length.
    """
    existing = None
    if rope_type != "none":
        existing = existing_rope_parameters(config)
        if existing is None:
            raise RopeConfigError(
                f"longlora.rope.type={rope_type!r} needs a model with rotary position "
                f"embeddings, but model type {getattr(config, 'model_type', '?')!r} has no "
                "rope_parameters/rope_theta in its config; set longlora.rope.type: none"
            )
    else:
        existing = _quiet_existing(config)
    original = original_context(config, original_max_position_embeddings)
    if original is None:
        if rope_type == "none":
            original = 0
        else:
            raise RopeConfigError(
                "cannot tell the base model's context length (no max_position_embeddings "
                "in its config); set longlora.rope.original_max_position_embeddings"
            )
    unchanged = RopeResolution(
        rope_type=existing["rope_type"] if existing else "none",
        factor=float(existing.get("factor") or 1.0) if existing else 1.0,
        original=original,
        target=int(sequence_len),
    )
    if rope_type == "none":
        return unchanged
    if factor == "auto":
        if sequence_len <= original:
            LOG.info(
                "longlora: sequence_len %d <= original context %d: no RoPE interpolation "
                "(factor auto)",
                sequence_len,
                original,
            )
            return unchanged
        value = sequence_len / original
    else:
        value = float(factor)
        if value == 1.0:
            LOG.info("longlora: rope.factor 1: RoPE left unchanged")
            return unchanged

    assert existing is not None
    if existing["rope_type"] not in ("default", rope_type):
        LOG.warning(
            "longlora: base model already uses RoPE %s (%s); replacing it with %s factor %s",
            existing["rope_type"],
            {k: v for k, v in existing.items() if k != "rope_theta"},
            rope_type,
            value,
        )
    params = dict(existing)
    params["rope_type"] = rope_type
    params["factor"] = value
    overrides: dict[str, Any] = {}
    if rope_type in ("yarn", "llama3"):
        params["original_max_position_embeddings"] = original
        if getattr(config, "original_max_position_embeddings", None) is not None:
            overrides["original_max_position_embeddings"] = original
    if rope_type == "llama3":
        for key, default in LLAMA3_DEFAULTS.items():
            params.setdefault(key, default)
    current_max = getattr(config, "max_position_embeddings", None)
    if rope_type == "dynamic":
        if current_max != original:
            overrides["max_position_embeddings"] = original
    else:
        wanted = max(int(current_max or 0), int(sequence_len), math.ceil(original * value))
        if wanted != current_max:
            overrides["max_position_embeddings"] = wanted
    overrides["rope_parameters"] = params
    _check_accepted(config, overrides, rope_type)
    return RopeResolution(
        rope_type=rope_type,
        factor=value,
        original=original,
        target=int(sequence_len),
        rope_parameters=_copy(params),
        config_overrides=overrides,
    )


def _check_accepted(config: Any, overrides: dict[str, Any], rope_type: str) -> None:
    """Raise :class:`RopeConfigError` if the model's config class rejects the overrides
    (e.g. Phi-3 only accepts ``longrope``); transformers would otherwise fail only when
    the trained model is saved."""
    validate = getattr(config, "validate", None)
    if validate is None:
        return
    trial = copy.deepcopy(config)
    for key, value in overrides.items():
        setattr(trial, key, _copy(value))
    try:
        validate_rope = getattr(trial, "validate_rope", None)
        if validate_rope is not None:
            validate_rope()
        trial.validate()
    except Exception as err:  # noqa: BLE001 - any rejection is reported the same way
        cause = getattr(err, "__cause__", None) or err
        raise RopeConfigError(
            f"longlora.rope.type={rope_type!r}: model type "
            f"{getattr(config, 'model_type', '?')!r} rejects rope_parameters "
            f"{overrides['rope_parameters']}: {cause}; choose another longlora.rope.type "
            "or none"
        ) from err


def _quiet_existing(config: Any) -> dict[str, Any] | None:
    try:
        return existing_rope_parameters(config)
    except RopeConfigError:
        return None


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value
