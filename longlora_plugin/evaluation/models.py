"""Load a model for evaluation, always with full attention.

A model is named by :class:`ModelSpec` (``NAME=PATH`` on the command line) and an
optional :class:`RopeOverride` (``linear:4``). :func:`load_eval_model` recognises

* an **adapter output directory** (it holds ``adapter_config.json``): the base model
  named by ``base_model_name_or_path`` is loaded with the ``config.json`` that Axolotl
  saves into the output directory (it carries the training run's ``rope_parameters``),
  then the PEFT adapter (LoRA plus trained embeddings/norms) is applied;
* any other **model directory** (a base model, a merged model, a full fine-tune): loaded
  as it is, RoPE from its ``config.json``.

With a :class:`RopeOverride` the RoPE is replaced at load time (``rope_parameters`` merged
into the model's own, keeping ``rope_theta``): a base model with a RoPE override is the
paper's "interpolation only, no training" baseline (kind ``interpolation-only``).

S2-Attn is a training-time approximation: a model that has it switched on is switched
back to the backend it wraps.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from longlora_plugin.evaluation.dtypes import resolve_dtype
from longlora_plugin.rope import SCALED_TYPES, original_context, resolve_rope
from longlora_plugin.s2 import unwrap_model

LOG = logging.getLogger("longlora_plugin")

TOKENIZER_FILES: tuple[str, ...] = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


@dataclass(frozen=True)
class RopeOverride:
    """A RoPE scaling to load a model with: ``rope_type`` in linear/dynamic/yarn/llama3,
    ``factor`` >= 1."""

    rope_type: str
    factor: float

    @classmethod
    def parse(cls, text: str) -> RopeOverride:
        """Parse ``TYPE:FACTOR`` (e.g. ``linear:4``); raise ``ValueError`` otherwise."""
        rope_type, sep, factor = text.partition(":")
        if not sep or rope_type not in SCALED_TYPES:
            raise ValueError(
                f"--rope {text!r}: expected TYPE:FACTOR with TYPE one of {', '.join(SCALED_TYPES)}"
            )
        try:
            value = float(factor)
        except ValueError:
            raise ValueError(f"--rope {text!r}: factor {factor!r} is not a number") from None
        if not math.isfinite(value) or value < 1:
            raise ValueError(f"--rope {text!r}: factor must be a number >= 1")
        return cls(rope_type, value)

    def __str__(self) -> str:
        return f"{self.rope_type}:{self.factor:g}"


@dataclass(frozen=True)
class ModelSpec:
    """What to evaluate: a display ``name``, a ``path`` and an optional RoPE override."""

    name: str
    path: str
    rope: RopeOverride | None = None

    @classmethod
    def parse(cls, text: str) -> ModelSpec:
        """Parse ``NAME=PATH`` or a bare ``PATH`` (named after its last component)."""
        name, sep, path = text.partition("=")
        if not sep:
            path, name = text, Path(text.rstrip("/")).name
        if not name or not path:
            raise ValueError(f"--model {text!r}: expected NAME=PATH")
        return cls(name, path)


@dataclass
class EvalModel:
    """A loaded model ready for evaluation (``eval()`` mode, full attention).

    ``original_length`` is the pre-training context; ``scaled_length`` the context the
    RoPE is stretched to (``None`` without scaling); ``trained_length`` equals
    ``scaled_length`` for a model trained at that length (adapter, merged or fine-tuned
    directory whose config carries the scaling) and is ``None`` for interpolation only.
    """

    name: str
    model: Any
    tokenizer: Any
    kind: str
    path: str
    base_model: str | None = None
    rope_parameters: dict[str, Any] | None = None
    original_length: int | None = None
    scaled_length: int | None = None
    trained_length: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def info(self) -> dict[str, Any]:
        """JSON-serialisable description (everything except the model and tokenizer)."""
        return {
            "name": self.name,
            "kind": self.kind,
            "path": self.path,
            "base_model": self.base_model,
            "rope_parameters": self.rope_parameters,
            "original_length": self.original_length,
            "scaled_length": self.scaled_length,
            "trained_length": self.trained_length,
            "dtype": str(next(self.model.parameters()).dtype).replace("torch.", ""),
            "device": str(self.device),
            "attn_implementation": unwrap_model(self.model).config._attn_implementation,
            **self.extra,
        }


def resolve_device(device: str | None) -> torch.device:
    """``None``/``auto``: ``cuda`` when available, else ``cpu``."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def is_adapter_dir(path: str | Path) -> bool:
    """True for a PEFT adapter directory (``adapter_config.json`` present)."""
    return (Path(path) / "adapter_config.json").is_file()


def load_eval_model(
    spec: ModelSpec,
    *,
    dtype: str = "auto",
    device: str | None = None,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
) -> EvalModel:
    """Load ``spec`` for evaluation (see the module docstring). The returned model is in
    ``eval()`` mode on ``device`` with full attention."""
    from transformers import AutoConfig, AutoModelForCausalLM

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    path = spec.path
    adapter = is_adapter_dir(path)
    base_path: str | None = None
    if adapter:
        adapter_config = json.loads((Path(path) / "adapter_config.json").read_text("utf-8"))
        base_path = adapter_config.get("base_model_name_or_path")
        if not base_path:
            raise ValueError(f"{path}/adapter_config.json names no base_model_name_or_path")
        base_config = AutoConfig.from_pretrained(base_path, trust_remote_code=trust_remote_code)
        original = original_context(base_config)
        if (Path(path) / "config.json").is_file():
            config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        else:
            LOG.warning(
                "longlora eval: %s has no config.json (saved by Axolotl with the training "
                "RoPE); using the base model's RoPE",
                path,
            )
            config = base_config
    else:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        original = _original_of_scaled(config)
    if spec.rope is not None:
        resolution = resolve_rope(
            config,
            rope_type=spec.rope.rope_type,
            factor=spec.rope.factor,
            sequence_len=math.ceil((original or 0) * spec.rope.factor),
            original_max_position_embeddings=original,
        )
        for key, value in resolution.config_overrides.items():
            setattr(config, key, value)
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(base_path or path, config=config, **kwargs)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, path)
    model = ensure_full_attention(model.to(dev)).eval()

    rope = getattr(unwrap_model(model).config, "rope_parameters", None)
    scaled = scaled_length(unwrap_model(model).config, original)
    if spec.rope is not None and not adapter:
        kind = "interpolation-only"
    else:
        kind = "adapter" if adapter else "model"
    return EvalModel(
        name=spec.name,
        model=model,
        tokenizer=load_tokenizer(path, base_path, trust_remote_code=trust_remote_code),
        kind=kind,
        path=str(path),
        base_model=base_path,
        rope_parameters=dict(rope) if isinstance(rope, dict) else None,
        original_length=original,
        scaled_length=scaled,
        trained_length=scaled if kind != "interpolation-only" else None,
        extra={"rope_override": str(spec.rope)} if spec.rope else {},
    )


def from_loaded(
    name: str,
    model: Any,
    tokenizer: Any,
    *,
    path: str = "",
    original_length: int | None = None,
    trained_length: int | None = None,
) -> EvalModel:
    """Wrap an already loaded model (e.g. at the end of training) for evaluation:
    switches it to full attention and ``eval()`` mode (the caller restores ``train()``
    if needed)."""
    model = ensure_full_attention(model).eval()
    config = unwrap_model(model).config
    rope = getattr(config, "rope_parameters", None)
    original = original_length or _original_of_scaled(config)
    scaled = scaled_length(config, original)
    return EvalModel(
        name=name,
        model=model,
        tokenizer=tokenizer,
        kind="trained (in memory)",
        path=path,
        rope_parameters=dict(rope) if isinstance(rope, dict) else None,
        original_length=original,
        scaled_length=scaled,
        trained_length=trained_length or scaled,
    )


def ensure_full_attention(model: Any) -> Any:
    """Switch off S2-Attn if it is on (S2 is training-only); return ``model``."""
    from longlora_plugin.s2 import disable_s2_attn, s2_settings

    if s2_settings(model) is not None:
        disable_s2_attn(model)
    return model


def load_tokenizer(path: str, base_path: str | None = None, *, trust_remote_code: bool = False):
    """The tokenizer saved in ``path`` if any, else the base model's."""
    from transformers import AutoTokenizer

    source = path
    if base_path and not any((Path(path) / f).is_file() for f in TOKENIZER_FILES):
        source = base_path
    return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)


def rope_factor(config: Any) -> float:
    """The RoPE scaling factor of ``config`` (1.0 without scaling)."""
    params = getattr(config, "rope_parameters", None)
    if not isinstance(params, dict) or params.get("rope_type") not in SCALED_TYPES:
        return 1.0
    return float(params.get("factor") or 1.0)


def scaled_length(config: Any, original: int | None) -> int | None:
    """Context the RoPE is scaled to, or ``None`` without scaling: ``max_position_embeddings``
    (raised to the target when the model was set up), at least ``original * factor``."""
    factor = rope_factor(config)
    if factor <= 1.0 or not original:
        return None
    target = math.ceil(original * factor)
    params = config.rope_parameters
    if params.get("rope_type") == "dynamic":
        return target
    return max(target, int(getattr(config, "max_position_embeddings", 0) or 0))


def _original_of_scaled(config: Any) -> int | None:
    """Pre-training context of a (possibly scaled) model directory: ``rope_parameters``'
    ``original_max_position_embeddings``; for dynamic NTK ``max_position_embeddings``;
    for other scaled types ``max_position_embeddings / factor`` (LongLoRA raises
    ``max_position_embeddings`` to ``original * factor``)."""
    params = getattr(config, "rope_parameters", None)
    factor = rope_factor(config)
    if isinstance(params, dict) and params.get("original_max_position_embeddings"):
        return int(params["original_max_position_embeddings"])
    if factor > 1.0 and params.get("rope_type") != "dynamic":
        max_pos = getattr(config, "max_position_embeddings", None)
        return round(max_pos / factor) if max_pos else None
    return original_context(config)
