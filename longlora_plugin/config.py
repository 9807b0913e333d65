"""Pydantic schema of the ``longlora:`` block of an Axolotl YAML.

:class:`LongLoRAArgs` is what the plugin's ``get_input_args`` hands to Axolotl; Axolotl
mixes it into its own config model, so it declares the single top-level key ``longlora``
and nothing else (in particular no ``extra="forbid"``, which would leak into Axolotl's
merged model). Everything *inside* the block is strict and forbids unknown keys.

Constraints are declared on the types (``Literal``, ``Field(ge=...)``); each field's
type also carries an :class:`~longlora_plugin.config_messages.Allowed` text. :func:`parse_longlora` turns pydantic's
errors into one ``LongLoRAConfigError`` whose lines each name the key
(``longlora.rope.factor``), the value, why it is refused and what is allowed.
Enumerations come from the modules that implement them (RoPE types from
:mod:`~longlora_plugin.rope`, trainable kinds from :mod:`~longlora_plugin.trainable`,
perplexity conventions from :mod:`~longlora_plugin.evaluation.perplexity`), and so do the
evaluation defaults (``max_windows`` differs from ``longlora eval ppl``'s on purpose:
:mod:`~longlora_plugin.evaluation.perplexity` says why).
"""

from __future__ import annotations

import math
import typing
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from longlora_plugin.config_messages import Allowed, format_error
from longlora_plugin.evaluation.passkey import DEFAULT_DEPTHS, DEFAULT_TRIALS
from longlora_plugin.evaluation.perplexity import DEFAULT_STRIDE, TRAINING_MAX_WINDOWS, Convention
from longlora_plugin.rope import RopeType
from longlora_plugin.s2.group_size import DEFAULT_GROUP_SIZE_RATIO, MIN_GROUP_SIZE, group_size_for
from longlora_plugin.trainable import TrainableKind


class LongLoRAConfigError(ValueError):
    """A ``longlora:`` block (or its combination with the rest of the config) is invalid."""


def _choices(kind: Any) -> str:
    return ", ".join(typing.get_args(kind))


def _unique(values: list) -> list:
    return list(dict.fromkeys(values))


def _none_as_empty(value: Any) -> Any:
    return [] if value is None else value


def _factor(value: Any) -> Any:
    """``"auto"`` (any case), or a finite number >= 1 (numeric strings accepted)."""
    if isinstance(value, str):
        if value.strip().lower() == "auto":
            return "auto"
        try:
            value = float(value)
        except ValueError:
            raise ValueError("is neither 'auto' nor a number") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError("is neither 'auto' nor a number")
    if not math.isfinite(value):
        raise ValueError("is not a finite number")
    if value < 1:
        raise ValueError("is < 1")
    return float(value)


PositiveInt = Annotated[int, Field(ge=1), Allowed("an integer >= 1")]
OptionalPositiveInt = Annotated[int | None, Field(ge=1), Allowed("an integer >= 1 or null")]
Length = Annotated[int, Field(ge=2), Allowed("a list of integers >= 2")]
Lengths = Annotated[
    list[Length], BeforeValidator(_none_as_empty), Allowed("a list of integers >= 2")
]
Depth = Annotated[float, Field(ge=0, le=1), Allowed("numbers in [0, 1]", "[0, 1]")]
GroupSize = Annotated[
    int, Field(ge=MIN_GROUP_SIZE), Allowed(f"an integer >= {MIN_GROUP_SIZE} and <= sequence_len")
]
Ratio = Annotated[float, Field(gt=0, le=1), Allowed("a number in (0, 1]", "(0, 1]")]
Factor = Annotated[
    Literal["auto"] | float, BeforeValidator(_factor), Allowed("'auto' or a number >= 1")
]
Boolean = Annotated[bool, Allowed("true or false")]
RopeChoice = Annotated[RopeType, Allowed(_choices(RopeType))]
TrainableKinds = Annotated[
    list[Annotated[TrainableKind, Allowed(f"a list of {_choices(TrainableKind)}")]],
    BeforeValidator(_none_as_empty),
    AfterValidator(_unique),
    Allowed(f"a list of {_choices(TrainableKind)}"),
]
Conventions = Annotated[
    list[Annotated[Convention, Allowed(_choices(Convention))]],
    Field(min_length=1),
    AfterValidator(_unique),
    Allowed(f"a non-empty list of {_choices(Convention)}"),
]

STRICT = ConfigDict(extra="forbid", strict=True)


class LongLoRARopeConfig(BaseModel):
    """``longlora.rope``: RoPE position interpolation applied when the model is loaded."""

    model_config = STRICT

    type: RopeChoice = Field(
        default="linear",
        description=(
            "RoPE scaling written into the model config's rope_parameters: linear (position "
            "interpolation, the paper's choice), dynamic (NTK), yarn, llama3, or none "
            "(leave the model's RoPE untouched)."
        ),
    )
    factor: Factor = Field(
        default="auto",
        description=(
            "Scaling factor: 'auto' = sequence_len / original context (no scaling when "
            "sequence_len <= original context), or a number >= 1."
        ),
    )
    original_max_position_embeddings: OptionalPositiveInt = Field(
        default=None,
        description=(
            "Context length the base model was pre-trained with. Default: the base model "
            "config's rope_parameters.original_max_position_embeddings, else its "
            "max_position_embeddings."
        ),
    )


class LongLoRAEvalConfig(BaseModel):
    """``longlora.eval``: evaluation run once at the end of ``axolotl train`` (opt-in),
    with full attention, results in ``<output_dir>/longlora_eval/``."""

    model_config = STRICT

    ppl_lengths: Lengths = Field(
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
    max_docs: OptionalPositiveInt = Field(
        default=None, description="Use only the first N documents."
    )
    conventions: Conventions = Field(
        default_factory=lambda: list(typing.get_args(Convention)),
        description=(
            "Perplexity conventions: window-mean (paper: token stream, every token scored) "
            "and/or sliding-window (YaRN-style: per document, new tokens only)."
        ),
    )
    stride: PositiveInt = Field(
        default=DEFAULT_STRIDE, description="Window stride in tokens (the paper uses 256)."
    )
    max_windows: OptionalPositiveInt = Field(
        default=TRAINING_MAX_WINDOWS,
        description="Cap on windows per length and convention (null: all).",
    )
    batch_size: PositiveInt = Field(default=1, description="Windows per forward pass.")
    passkey_lengths: Lengths = Field(
        default_factory=list,
        description="Prompt lengths (tokens) for passkey retrieval. Empty: no passkey test.",
    )
    passkey_depths: Annotated[
        list[Depth], Field(min_length=1), Allowed("a non-empty list of numbers in [0, 1]")
    ] = Field(
        default_factory=lambda: list(DEFAULT_DEPTHS),
        description="Key depths as fractions of the filler (0 = start, 1 = end).",
    )
    passkey_trials: PositiveInt = Field(
        default=DEFAULT_TRIALS, description="Passkeys per (length, depth) cell."
    )
    seed: Annotated[int, Allowed("an integer")] = Field(
        default=0, description="Seed of the passkeys."
    )
    every_n_steps: OptionalPositiveInt = Field(
        default=None,
        description=(
            "Also evaluate during training, every N optimizer steps (main process, full "
            "attention, then back to S2-Attn): perplexity (with data) and RULER's "
            "niah_single_1 at the original and the trained context, into "
            "progress.json/png. Null: only at the end."
        ),
    )
    progress_samples: PositiveInt = Field(
        default=4, description="Needle samples per length in each evaluation during training."
    )

    @model_validator(mode="after")
    def _check_work(self) -> LongLoRAEvalConfig:
        if not self.ppl_lengths and not self.passkey_lengths and not self.every_n_steps:
            raise ValueError(
                "longlora.eval has neither ppl_lengths, passkey_lengths nor every_n_steps; "
                "set at least one (or remove the block)"
            )
        if self.ppl_lengths and not self.data:
            raise ValueError(
                f"longlora.eval has ppl_lengths={self.ppl_lengths} but no data; set "
                "longlora.eval.data (a text file, directory, .jsonl or local dataset)"
            )
        return self


class LongLoRAConfig(BaseModel):
    """The ``longlora:`` block: which LongLoRA ingredients to apply and how."""

    model_config = STRICT

    s2_attn: Boolean = Field(
        default=True,
        description=(
            "Train with shifted sparse attention (S2-Attn); evaluation and inference keep "
            "full attention."
        ),
    )
    group_size: GroupSize | None = Field(
        default=None,
        description=(
            f"S2-Attn group size G in tokens ({MIN_GROUP_SIZE} <= G <= sequence_len). "
            "Set this or group_size_ratio, not both."
        ),
    )
    group_size_ratio: Ratio | None = Field(
        default=None,
        description=(
            "S2-Attn group size as a fraction of sequence_len, in (0, 1]; "
            "G = int(ratio * sequence_len) for the whole run. Default "
            f"{DEFAULT_GROUP_SIZE_RATIO} when neither group_size nor group_size_ratio is set."
        ),
    )
    shift: Boolean = Field(
        default=True,
        description=(
            "For ablations only: false gives every head the same unshifted groups (the "
            "paper's 'short attention', no flow between groups, worse at long lengths). "
            "Needs s2_attn and context_parallel 1."
        ),
    )
    context_parallel: PositiveInt = Field(
        default=1,
        description=(
            "S2-Attn context parallelism: split each row over this many processes, which "
            "exchange only the keys and values of S2 groups crossing a chunk boundary "
            "(docs/s2-attn.md). 1: off. It must divide the number of processes; DDP or "
            "DeepSpeed ZeRO averages over the context-parallel groups. Needs s2_attn."
        ),
    )
    trainable_params: TrainableKinds = Field(
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

    @model_validator(mode="after")
    def _check_group_exclusive(self) -> LongLoRAConfig:
        if self.group_size is not None and self.group_size_ratio is not None:
            raise ValueError(
                f"longlora.group_size={self.group_size} and "
                f"longlora.group_size_ratio={self.group_size_ratio} are both set; set only one"
            )
        if not self.shift and (not self.s2_attn or self.context_parallel > 1):
            raise ValueError(
                f"longlora.shift=false needs longlora.s2_attn: true and context_parallel: 1 "
                f"(got s2_attn={self.s2_attn}, context_parallel={self.context_parallel}); "
                "it only switches S2-Attn's shifted half off"
            )
        return self

    @property
    def effective_group_size_ratio(self) -> float:
        """``group_size_ratio``, or the default when neither size key is set."""
        if self.group_size_ratio is not None:
            return self.group_size_ratio
        return DEFAULT_GROUP_SIZE_RATIO

    def group_size_for(self, sequence_len: int) -> int:
        """The fixed group size G for a run (:func:`~longlora_plugin.s2.group_size.group_size_for`
        on rows of ``sequence_len`` tokens)."""
        return group_size_for(sequence_len, self.group_size, self.effective_group_size_ratio)


class LongLoRAArgs(BaseModel):
    """Input arguments that the LongLoRA plugin adds to Axolotl's config schema."""

    longlora: LongLoRAConfig | None = Field(
        default=None,
        description=(
            "LongLoRA settings (S2-Attn, trainable embeddings/norms, RoPE interpolation). "
            "Without this block the plugin does nothing."
        ),
    )


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
    block = plain_data(raw)
    try:
        return LongLoRAConfig.model_validate(block)
    except ValidationError as exc:
        lines = [format_error(e, block, LongLoRAConfig) for e in exc.errors()]
        raise LongLoRAConfigError("invalid longlora config:\n  " + "\n  ".join(lines)) from None


def plain_data(value: Any) -> Any:
    """Deep copy of mappings (keys as ``str``) and lists as plain ``dict``/``list``:
    drops Axolotl's ``DictDefault`` behaviour, safe to print, dump or mutate."""
    if isinstance(value, dict):
        return {str(k): plain_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_data(v) for v in value]
    return value
