"""Pydantic schema of the ``longlora:`` block of an Axolotl YAML.

:class:`LongLoRAArgs` is what :meth:`LongLoRAPlugin.get_input_args` hands to Axolotl;
Axolotl mixes it into its own config model, so it declares the single top-level key
``longlora`` and nothing else (in particular no ``extra="forbid"``, which would leak
into Axolotl's merged model). Everything *inside* the block forbids unknown keys.

:func:`parse_longlora` validates a raw block and turns pydantic's errors into one
``LongLoRAConfigError`` whose lines each name the key (``longlora.rope.factor``), the
value, and what is allowed.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

RopeType = Literal["linear", "dynamic", "yarn", "llama3", "none"]
TrainableKind = Literal["embed", "norm", "lm_head"]

ROPE_TYPES: tuple[str, ...] = ("linear", "dynamic", "yarn", "llama3", "none")
TRAINABLE_KINDS: tuple[str, ...] = ("embed", "norm", "lm_head")
DEFAULT_GROUP_SIZE_RATIO = 0.25


class LongLoRAConfigError(ValueError):
    """A ``longlora:`` block (or its combination with the rest of the config) is invalid."""


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class LongLoRARopeConfig(BaseModel):
    """``longlora.rope``: RoPE position interpolation applied when the model is loaded."""

    model_config = ConfigDict(extra="forbid")

    type: RopeType = Field(
        default="linear",
        description=(
            "RoPE scaling written into the model config's rope_parameters: linear (position "
            "interpolation, the paper's choice), dynamic (NTK), yarn, llama3, or none "
            "(leave the model's RoPE untouched)."
        ),
    )
    factor: Literal["auto"] | float = Field(
        default="auto",
        description=(
            "Scaling factor: 'auto' = sequence_len / original context (no scaling when "
            "sequence_len <= original context), or a number >= 1."
        ),
    )
    original_max_position_embeddings: int | None = Field(
        default=None,
        description=(
            "Context length the base model was pre-trained with. Default: the base model "
            "config's rope_parameters.original_max_position_embeddings, else its "
            "max_position_embeddings."
        ),
    )

    @field_validator("type", mode="before")
    @classmethod
    def _check_type(cls, value: Any) -> Any:
        if value not in ROPE_TYPES:
            raise ValueError(f"is not a known RoPE type; allowed: {', '.join(ROPE_TYPES)}")
        return value

    @field_validator("factor", mode="before")
    @classmethod
    def _check_factor(cls, value: Any) -> Any:
        allowed = "allowed: 'auto' or a number >= 1"
        if isinstance(value, str):
            if value.strip().lower() == "auto":
                return "auto"
            try:
                value = float(value)
            except ValueError:
                raise ValueError(f"is neither 'auto' nor a number; {allowed}") from None
        if not _is_number(value):
            raise ValueError(f"is neither 'auto' nor a number; {allowed}")
        if not math.isfinite(value):
            raise ValueError(f"is not a finite number; {allowed}")
        if value < 1:
            raise ValueError(f"is < 1; {allowed}")
        return float(value)

    @field_validator("original_max_position_embeddings", mode="before")
    @classmethod
    def _check_original(cls, value: Any) -> Any:
        if value is None:
            return None
        if not _is_number(value) or int(value) != value or value < 1:
            raise ValueError("is not a positive integer; allowed: an integer >= 1 or null")
        return int(value)


EVAL_CONVENTIONS: tuple[str, ...] = ("window-mean", "sliding-window")


class LongLoRAEvalConfig(BaseModel):
    """``longlora.eval``: evaluation run once at the end of ``axolotl train`` (opt-in),
    with full attention, results in ``<output_dir>/longlora_eval/``."""

    model_config = ConfigDict(extra="forbid")

    ppl_lengths: list[int] = Field(
        default_factory=list,
        description="Context lengths (tokens) for perplexity; needs data. Empty: no perplexity.",
    )
    data: str | None = Field(
        default=None,
        description=(
            "Evaluation text: a .txt file, a directory of .txt files, a .jsonl file, or a "
            "dataset available locally (load_from_disk / load_dataset offline)."
        ),
    )
    text_field: str = Field(default="text", description="JSONL/dataset field holding the text.")
    split: str | None = Field(
        default=None, description="Dataset split (default: test, else validation, else train)."
    )
    max_docs: int | None = Field(default=None, description="Use only the first N documents.")
    conventions: list[Literal["window-mean", "sliding-window"]] = Field(
        default_factory=lambda: list(EVAL_CONVENTIONS),
        description=(
            "Perplexity conventions: window-mean (paper: token stream, every token scored) "
            "and/or sliding-window (YaRN-style: per document, new tokens only)."
        ),
    )
    stride: int = Field(default=256, description="Window stride in tokens (the paper uses 256).")
    max_windows: int | None = Field(
        default=32, description="Cap on windows per length and convention (null: all)."
    )
    batch_size: int = Field(default=1, description="Windows per forward pass.")
    passkey_lengths: list[int] = Field(
        default_factory=list,
        description="Prompt lengths (tokens) for passkey retrieval. Empty: no passkey test.",
    )
    passkey_depths: list[float] = Field(
        default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0],
        description="Key depths as fractions of the filler (0 = start, 1 = end).",
    )
    passkey_trials: int = Field(default=10, description="Passkeys per (length, depth) cell.")
    seed: int = Field(default=0, description="Seed of the passkeys.")

    @field_validator("ppl_lengths", "passkey_lengths", mode="before")
    @classmethod
    def _check_lengths(cls, value: Any) -> Any:
        if value is None:
            return []
        if isinstance(value, (int, str)) or not isinstance(value, (list, tuple)):
            raise ValueError("is not a list; allowed: a list of integers >= 2")
        if any(not _is_number(v) or int(v) != v or v < 2 for v in value):
            raise ValueError("contains a value that is not an integer >= 2")
        return [int(v) for v in value]

    @field_validator("passkey_depths", mode="before")
    @classmethod
    def _check_depths(cls, value: Any) -> Any:
        if not isinstance(value, (list, tuple)) or not value:
            raise ValueError("is not a non-empty list; allowed: numbers in [0, 1]")
        if any(not _is_number(v) or not 0 <= v <= 1 for v in value):
            raise ValueError("contains a value outside [0, 1]")
        return [float(v) for v in value]

    @field_validator("conventions", mode="before")
    @classmethod
    def _check_conventions(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)) or not value:
            raise ValueError(f"is not a non-empty list; allowed: {', '.join(EVAL_CONVENTIONS)}")
        bad = [v for v in value if v not in EVAL_CONVENTIONS]
        if bad:
            raise ValueError(f"contains {bad!r}; allowed: {', '.join(EVAL_CONVENTIONS)}")
        return list(dict.fromkeys(value))

    @field_validator("stride", "batch_size", "passkey_trials", mode="before")
    @classmethod
    def _check_positive(cls, value: Any) -> Any:
        if not _is_number(value) or int(value) != value or value < 1:
            raise ValueError("is not a positive integer; allowed: an integer >= 1")
        return int(value)

    @field_validator("max_windows", "max_docs", mode="before")
    @classmethod
    def _check_positive_or_null(cls, value: Any) -> Any:
        if value is None:
            return None
        if not _is_number(value) or int(value) != value or value < 1:
            raise ValueError("is not a positive integer; allowed: an integer >= 1")
        return int(value)

    @model_validator(mode="after")
    def _check_work(self) -> LongLoRAEvalConfig:
        if not self.ppl_lengths and not self.passkey_lengths:
            raise ValueError(
                "has neither ppl_lengths nor passkey_lengths; set at least one (or remove "
                "the block)"
            )
        if self.ppl_lengths and not self.data:
            raise ValueError(
                f"has ppl_lengths={self.ppl_lengths} but no data; set longlora.eval.data "
                "(a text file, directory, .jsonl or local dataset)"
            )
        return self


class LongLoRAConfig(BaseModel):
    """The ``longlora:`` block: which LongLoRA ingredients to apply and how."""

    model_config = ConfigDict(extra="forbid")

    s2_attn: bool = Field(
        default=True,
        description=(
            "Train with shifted sparse attention (S2-Attn); evaluation and inference keep "
            "full attention."
        ),
    )
    group_size: int | None = Field(
        default=None,
        description=(
            "S2-Attn group size G in tokens (2 <= G <= sequence_len). Set this or "
            "group_size_ratio, not both."
        ),
    )
    group_size_ratio: float | None = Field(
        default=None,
        description=(
            "S2-Attn group size as a fraction of sequence_len, in (0, 1]; "
            "G = int(ratio * sequence_len) for the whole run. Default 0.25 when neither "
            "group_size nor group_size_ratio is set."
        ),
    )
    trainable_params: list[TrainableKind] = Field(
        default_factory=lambda: ["embed", "norm"],
        description=(
            "Modules trained in full next to the LoRA weights (PEFT modules_to_save): any of "
            "embed, norm, lm_head. Ignored for full fine-tuning, where everything trains."
        ),
    )
    rope: LongLoRARopeConfig = Field(
        default_factory=LongLoRARopeConfig,
        description="RoPE position interpolation settings.",
    )
    eval: LongLoRAEvalConfig | None = Field(
        default=None,
        description=(
            "Opt-in evaluation (perplexity by length, passkey retrieval) run once at the "
            "end of axolotl train, with full attention; results in output_dir/longlora_eval/."
        ),
    )

    @field_validator("s2_attn", mode="before")
    @classmethod
    def _check_s2_attn(cls, value: Any) -> Any:
        if not isinstance(value, bool):
            raise ValueError("is not a boolean; allowed: true or false")
        return value

    @field_validator("group_size", mode="before")
    @classmethod
    def _check_group_size(cls, value: Any) -> Any:
        if value is None:
            return None
        if not _is_number(value) or int(value) != value:
            raise ValueError("is not an integer; allowed: an integer >= 2 and <= sequence_len")
        if value < 2:
            raise ValueError("is < 2; allowed: an integer >= 2 and <= sequence_len")
        return int(value)

    @field_validator("group_size_ratio", mode="before")
    @classmethod
    def _check_ratio(cls, value: Any) -> Any:
        if value is None:
            return None
        if not _is_number(value) or not math.isfinite(value):
            raise ValueError("is not a number; allowed: a number in (0, 1]")
        if not 0 < value <= 1:
            raise ValueError("is outside (0, 1]")
        return float(value)

    @field_validator("trainable_params", mode="before")
    @classmethod
    def _check_trainable(cls, value: Any) -> Any:
        if value is None:
            return []
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ValueError(f"is not a list; allowed: a list of {', '.join(TRAINABLE_KINDS)}")
        bad = [v for v in value if v not in TRAINABLE_KINDS]
        if bad:
            raise ValueError(
                f"contains unknown name(s) {', '.join(repr(b) for b in bad)}; "
                f"allowed: {', '.join(TRAINABLE_KINDS)}"
            )
        return list(dict.fromkeys(value))  # de-duplicate, keep order

    @model_validator(mode="after")
    def _check_group_exclusive(self) -> LongLoRAConfig:
        if self.group_size is not None and self.group_size_ratio is not None:
            raise ValueError(
                f"longlora.group_size={self.group_size} and "
                f"longlora.group_size_ratio={self.group_size_ratio} are both set; set only one"
            )
        return self

    @property
    def effective_group_size_ratio(self) -> float:
        """``group_size_ratio``, or the 0.25 default when neither size key is set."""
        if self.group_size_ratio is not None:
            return self.group_size_ratio
        return DEFAULT_GROUP_SIZE_RATIO

    def group_size_for(self, sequence_len: int) -> int:
        """The fixed group size G for a run: ``group_size`` or ``int(ratio * sequence_len)``."""
        if self.group_size is not None:
            return self.group_size
        return int(self.effective_group_size_ratio * sequence_len)


class LongLoRAArgs(BaseModel):
    """Input arguments that the LongLoRA plugin adds to Axolotl's config schema."""

    longlora: LongLoRAConfig | None = Field(
        default=None,
        description=(
            "LongLoRA settings (S2-Attn, trainable embeddings/norms, RoPE interpolation). "
            "Without this block the plugin does nothing."
        ),
    )


_MODELS_BY_PATH: dict[tuple[str, ...], type[BaseModel]] = {
    (): LongLoRAConfig,
    ("rope",): LongLoRARopeConfig,
    ("eval",): LongLoRAEvalConfig,
}


def _path(loc: tuple[Any, ...]) -> str:
    out = "longlora"
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def _format_error(err: dict[str, Any]) -> str:
    loc = tuple(err.get("loc", ()))
    kind = err.get("type", "")
    msg = str(err.get("msg", ""))
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if kind == "extra_forbidden":
        parent = _MODELS_BY_PATH.get(tuple(p for p in loc[:-1] if isinstance(p, str)))
        allowed = ", ".join(parent.model_fields) if parent else "see the documentation"
        return f"{_path(loc)}: unknown key; allowed keys: {allowed}"
    if not loc:  # model-level validator: message already names the keys
        return msg
    if kind in ("model_type", "dict_type", "model_attributes_type"):
        parent = _MODELS_BY_PATH.get(tuple(p for p in loc if isinstance(p, str)))
        allowed = ", ".join(parent.model_fields) if parent else ""
        return f"{_path(loc)}={err.get('input')!r} is not a mapping; allowed keys: {allowed}"
    return f"{_path(loc)}={err.get('input')!r} {msg}"


def parse_longlora(raw: Any) -> LongLoRAConfig:
    """Validate a raw ``longlora:`` block; raise :class:`LongLoRAConfigError` on bad input.

    ``raw`` may already be a :class:`LongLoRAConfig` (returned unchanged) or a mapping
    (including Axolotl's ``DictDefault``). Every problem found is reported, one per line.
    """
    if isinstance(raw, LongLoRAConfig):
        return raw
    if not isinstance(raw, dict):
        raise LongLoRAConfigError(
            f"longlora={raw!r} is not a mapping; allowed keys: "
            f"{', '.join(LongLoRAConfig.model_fields)}"
        )
    try:
        return LongLoRAConfig.model_validate(_plain(raw))
    except ValidationError as exc:
        lines = [_format_error(e) for e in exc.errors()]
        raise LongLoRAConfigError("invalid longlora config:\n  " + "\n  ".join(lines)) from None


def _plain(value: Any) -> Any:
    """Deep-copy mappings/lists into plain ``dict``/``list`` (drops DictDefault behaviour)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
