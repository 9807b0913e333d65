"""``longlora validate CONFIG [--model-config DIR]``: check a training config before any
GPU hour is spent on it.

Offline and without weights when ``--model-config`` names a directory holding the base
model's ``config.json`` (it becomes ``base_model_config``; ``base_model`` keeps its Hub id,
which Axolotl inspects for model-family heuristics). Steps:

1. Axolotl's own config loading, as ``axolotl train`` does it (the functions
   ``axolotl.cli.config.load_cfg`` calls): the plugins' ``register`` hooks (the LongLoRA
   plugin's checks and rewrites), schema validation against the *target* GPU's
   capabilities (``--gpu``, default the paper's A100 80GB), ``normalize_config`` (which
   loads the model config). A bad config fails here with the exception training would
   raise; its message is printed and the exit code is 1.
2. The resolved LongLoRA settings: S2-Attn group size and shift, RoPE type/factor and
   the ``rope_parameters`` the model will be loaded with, the modules trained in full.
3. Trainable parameters by kind, counted on the real PEFT model built on the ``meta``
   device from Axolotl's own LoRA config (no memory, no weights).
4. Tokens per optimizer step and a per-GPU memory and time estimate
   (:mod:`longlora_plugin.memory`) for the config's DeepSpeed/FSDP setup, with its
   assumptions.

Nothing is written: no ``output_dir``, no ``debug.log``, no prepared dataset; datasets are
validated as config entries only (they need not exist here).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from longlora_plugin.memory import (
    GIB,
    GPUS,
    ModelDims,
    Parallelism,
    TrainingShape,
    estimate_memory,
    step_seconds,
)

PLUGIN_NAMES = ("longlora_plugin.LongLoRAPlugin", "longlora_plugin.plugin.LongLoRAPlugin")
FLASH_BACKENDS = ("flash_attention_2", "flash_attention_3")
# GPU name -> Axolotl GPU capabilities used for schema validation.
COMPUTE_CAPABILITY = {
    "a100-80gb": "sm_80",
    "a100-40gb": "sm_80",
    "h100-80gb": "sm_90",
    "h200-141gb": "sm_90",
    "l40s-48gb": "sm_89",
    "a10g-24gb": "sm_86",
    "rtx4090-24gb": "sm_89",
}


class ValidationFailed(Exception):
    """The config would fail in training; ``str()`` is the message to show."""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``longlora validate``."""
    parser = subparsers.add_parser(
        "validate",
        help="validate a training config offline; print resolved LongLoRA settings and a memory estimate",
        description=(
            "Run Axolotl's config validation with the plugin (no weights; no network when "
            "--model-config is given), print the resolved LongLoRA settings, trainable "
            "parameters, tokens per optimizer step and a per-GPU memory/time estimate."
        ),
    )
    parser.add_argument("config", help="Axolotl YAML with the longlora plugin")
    parser.add_argument(
        "--model-config",
        metavar="DIR",
        help="directory with the base model's config.json (used instead of base_model's)",
    )
    parser.add_argument(
        "--gpus-per-node", type=int, default=8, help="GPUs per machine (default 8, the paper's)"
    )
    parser.add_argument("--nodes", type=int, default=1, help="machines (default 1)")
    parser.add_argument(
        "--gpu",
        choices=sorted(GPUS),
        default="a100-80gb",
        help="GPU type for capability checks and the estimate (default a100-80gb)",
    )
    parser.add_argument(
        "--local",
        action="store_true",
        help=(
            "check packages against this machine (by default a missing flash-attn is "
            "reported, not an error: validation usually runs away from the GPU machine)"
        ),
    )
    parser.set_defaults(func=main)
    return parser


def main(args: argparse.Namespace) -> int:
    """Entry point of ``longlora validate``; returns the exit code."""
    os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")
    if args.model_config:
        for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
            os.environ.setdefault(key, "1")
    try:
        report = validate(
            args.config,
            model_config=args.model_config,
            gpus_per_node=args.gpus_per_node,
            nodes=args.nodes,
            gpu=args.gpu,
            local=args.local,
        )
    except ValidationFailed as err:
        print(f"longlora validate: {args.config}: invalid config:\n{err}", file=sys.stderr)
        return 1
    print(report.render())
    return 0


# ---------------------------------------------------------------------- result
@dataclass
class Report:
    """Everything ``longlora validate`` prints."""

    config_path: str
    base_model: str
    model_source: str
    dims: ModelDims
    total_params: int
    longlora: bool
    s2_line: str
    kernel_lines: list[str]
    rope_lines: list[str]
    modules_to_save: list[str]
    lora_targets: list[str]
    trainable: dict[str, int]
    batch_line: str
    tokens_per_step: int
    memory_lines: list[str]
    time_line: str
    notes: list[str] = field(default_factory=list)
    peak_gib: float = 0.0
    gpu_gib: float = 0.0

    def render(self) -> str:
        d = self.dims
        out = [
            f"config: {self.config_path}: Axolotl validation passed",
            f"base model: {self.base_model} (config: {self.model_source})",
            f"  {d.num_layers} layers, hidden {d.hidden_size}, {d.num_heads} heads / "
            f"{d.num_kv_heads} kv heads of {d.head_dim}, vocab {d.vocab_size}, "
            f"{self.total_params:,} parameters"
            + (", tied embeddings" if d.tied_embeddings else "")
            + (f", sliding window {d.sliding_window}" if d.sliding_window else ""),
            "LongLoRA:"
            if self.longlora
            else "LongLoRA: no longlora block (the plugin does nothing)",
            f"  {self.s2_line}",
            *[f"    S2 kernel on {line}" for line in self.kernel_lines],
            *[f"  {line}" for line in self.rope_lines],
            f"  trained in full (PEFT modules_to_save): {self.modules_to_save or 'none'}",
            f"  LoRA target modules: {self.lora_targets or 'none (no adapter)'}",
            "trainable parameters:",
            *[f"  {kind}: {count:,}" for kind, count in self.trainable.items()],
            f"batch: {self.batch_line}",
            f"tokens per optimizer step: {self.tokens_per_step:,}",
            *self.memory_lines,
            self.time_line,
        ]
        out += [f"note: {n}" for n in self.notes]
        return "\n".join(out)


# ---------------------------------------------------------------------- core
def validate(
    config_path: str | Path,
    *,
    model_config: str | Path | None = None,
    gpus_per_node: int = 8,
    nodes: int = 1,
    gpu: str = "a100-80gb",
    local: bool = False,
) -> Report:
    """Validate ``config_path`` as ``axolotl train`` would; raise :class:`ValidationFailed`."""
    import yaml

    path = Path(config_path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise ValidationFailed(f"cannot read {path}: {err}") from err
    if not isinstance(raw, dict):
        raise ValidationFailed(f"{path} is not a YAML mapping of Axolotl keys")
    notes: list[str] = []
    world = max(1, gpus_per_node) * max(1, nodes)
    _check_outside_axolotl(raw, model_config, notes)
    if model_config:
        raw["base_model_config"] = str(Path(model_config))

    try:
        cfg = _axolotl_validate(raw, path, world=world, gpu=gpu, local=local, notes=notes)
    except ValidationFailed:
        raise
    except Exception as err:  # noqa: BLE001 - training would stop on any of them
        message = str(err) or type(err).__name__
        if not isinstance(err, ValueError):
            message = f"{type(err).__name__}: {message}"
        raise ValidationFailed(message) from err
    return _report(cfg, path, world=world, gpu=gpu, notes=notes)


def _check_outside_axolotl(raw: dict, model_config: Any, notes: list[str]) -> None:
    """Problems Axolotl would not report before training starts."""
    plugins = [str(p) for p in raw.get("plugins") or []]
    has_plugin = any(p in PLUGIN_NAMES or p.startswith("longlora_plugin") for p in plugins)
    if "longlora" in raw and not has_plugin:
        if not registered_by_entry_point():
            raise ValidationFailed(
                "longlora block present but plugins does not list "
                "longlora_plugin.LongLoRAPlugin: Axolotl would drop the block silently and "
                "train without LongLoRA; add `plugins: [longlora_plugin.LongLoRAPlugin]`"
            )
        notes.append(
            "plugins does not list longlora_plugin.LongLoRAPlugin: this Axolotl registers "
            "it through its installed entry point anyway; list it so that the config also "
            "works on Axolotl 0.19, which does not"
        )
    if model_config is not None:
        directory = Path(model_config)
        if not (directory / "config.json").is_file():
            raise ValidationFailed(f"--model-config {directory}: no config.json in that directory")
        if raw.get("base_model_config"):
            notes.append(
                f"base_model_config={raw['base_model_config']!r} replaced by --model-config "
                f"{directory}"
            )
    ds = raw.get("deepspeed")
    if isinstance(ds, str) and not Path(ds).is_file():
        raise ValidationFailed(
            f"deepspeed={ds!r}: no such file; Axolotl resolves the path from the working "
            f"directory ({Path.cwd()}): run from the repository root or give an absolute path"
        )


def registered_by_entry_point() -> bool:
    """True when the installed Axolotl registers this plugin without a ``plugins:`` entry
    (0.21+: every installed ``axolotl.plugins`` entry point; 0.19 has no such step)."""
    from axolotl.integrations import base

    builtin = getattr(base, "get_builtin_plugins", None)
    return builtin is not None and "longlora_plugin.LongLoRAPlugin" in builtin()


def _capabilities(gpu: str, world: int) -> tuple[dict, dict]:
    import torch

    cc = COMPUTE_CAPABILITY.get(gpu, "sm_80")
    capabilities = {
        "bf16": True,
        "fp8": cc >= "sm_89",
        "tf32": True,
        "n_gpu": world,
        "compute_capability": cc,
    }
    return capabilities, {"torch_version": str(torch.__version__).split("+", maxsplit=1)[0]}


def _axolotl_validate(
    raw: dict, path: Path, *, world: int, gpu: str, local: bool, notes: list[str]
) -> Any:
    """What ``axolotl.cli.config.load_cfg`` does, minus telemetry, the temporary YAML copy
    and ``output_dir/debug.log``, with the target GPU's capabilities."""
    from axolotl.cli.config import plugin_set_cfg, prepare_plugins
    from axolotl.utils.config import normalize_cfg_datasets, normalize_config, validate_config
    from axolotl.utils.dict import DictDefault

    cfg = DictDefault(raw)
    cfg.axolotl_config_path = str(path)
    _check_flash_attn(cfg, local, notes)
    prepare_plugins(cfg)
    capabilities, env_capabilities = _capabilities(gpu, world)
    try:
        cfg = validate_config(cfg, capabilities=capabilities, env_capabilities=env_capabilities)
    except Exception:
        if cfg.get("plugins"):
            from axolotl.integrations.base import PluginManager

            PluginManager.get_instance().on_config_validation_error(cfg)
        raise
    normalize_config(cfg)
    normalize_cfg_datasets(cfg)
    plugin_set_cfg(cfg)
    return cfg


def _check_flash_attn(cfg: Any, local: bool, notes: list[str]) -> None:
    """A missing flash-attn is an error with ``--local``, otherwise a note: validation
    usually runs away from the GPU machine, where flash-attn cannot be installed."""
    from importlib.util import find_spec

    from longlora_plugin.plugin import attention_implementation

    impl, key = attention_implementation(cfg)
    if impl not in FLASH_BACKENDS or find_spec("flash_attn") is not None:
        return
    if local:
        raise ValidationFailed(
            f"{key}={cfg.get(key)!r} needs the flash-attn package, which is not installed "
            "here (pip install 'longlora-plugin[flash-attn]', CUDA only); or use "
            "attn_implementation: sdpa"
        )
    notes.append(
        "flash-attn is not installed on this machine: the training machine needs it "
        "(pip install 'longlora-plugin[flash-attn]'); --local makes this an error"
    )


# ---------------------------------------------------------------------- report
def _report(cfg: Any, path: Path, *, world: int, gpu: str, notes: list[str]) -> Report:
    from longlora_plugin.config import parse_longlora
    from longlora_plugin.rope import load_base_config

    source = str(cfg.get("base_model_config") or cfg.get("base_model"))
    base_config = load_base_config(source, trust_remote_code=cfg.get("trust_remote_code") is True)
    text_config = (
        base_config.get_text_config() if hasattr(base_config, "get_text_config") else base_config
    )
    dims = ModelDims.from_config(text_config)
    sequence_len = int(cfg.get("sequence_len") or 512)

    block = cfg.get("longlora")
    settings = parse_longlora(block) if block is not None else None
    group = None
    kernel_lines: list[str] = []
    if settings is None:
        s2_line = "S2-Attn: off (no longlora block)"
    elif not settings.s2_attn:
        s2_line = "S2-Attn: off (longlora.s2_attn: false); full attention in training"
    else:
        group = settings.group_size_for(sequence_len)
        backend = cfg.get("attn_implementation") or "sdpa"
        s2_line = (
            f"S2-Attn: on, wraps {backend}, group size {group}, shift {group // 2} "
            f"({-(-sequence_len // group)} groups per {sequence_len}-token row); training only, "
            "evaluation and inference use full attention"
        )
        import torch

        from longlora_plugin.s2.kernels import describe_kernels

        dtype = (
            torch.bfloat16
            if cfg.get("bf16")
            else torch.float16
            if cfg.get("fp16")
            else torch.float32
        )
        kernel_lines = describe_kernels(backend, dtype)
        if cfg.get("sample_packing") and backend == "sdpa" and dtype == torch.bfloat16:
            notes.append(
                "Axolotl's warning 'sample_packing & torch sdpa with bf16 is unsupported' is "
                "about SDPA with a block-diagonal mask on pre-Hopper GPUs; S2-Attn training "
                "uses no mask (varlen kernel on CUDA), evaluation during training does"
            )
        window = dims.sliding_window
        if window and window < group:
            s2_line += (
                f"; sliding window {window} < group {group}: a token attends to at most "
                f"{window} earlier tokens, and only inside its group"
            )
    rope_lines = _rope_lines(cfg, base_config, settings, sequence_len)

    trainable, total = _count_parameters(cfg, base_config)
    modules_to_save = list(cfg.get("lora_modules_to_save") or [])
    lora_targets = list(cfg.get("lora_target_modules") or []) if cfg.get("adapter") else []
    if cfg.get("adapter") and cfg.get("lora_target_linear"):
        lora_targets.append("(all linear: lora_target_linear)")

    micro = int(cfg.get("micro_batch_size") or 1)
    accum = int(cfg.get("gradient_accumulation_steps") or 1)
    sequences = micro * accum * world
    tokens = sequences * sequence_len
    batch_line = (
        f"micro batch {micro} x gradient accumulation {accum} x {world} GPUs = {sequences} "
        f"sequences of {sequence_len} tokens"
        + (" (packed rows; up to)" if cfg.get("sample_packing") else "")
    )

    memory_lines, time_line, peak, gpu_gib = _estimate_lines(
        cfg, dims, total, trainable, sequence_len, group, world, gpu, sequences
    )
    return Report(
        config_path=str(path),
        base_model=str(cfg.get("base_model")),
        model_source=source,
        dims=dims,
        total_params=total,
        longlora=settings is not None,
        s2_line=s2_line,
        kernel_lines=kernel_lines,
        rope_lines=rope_lines,
        modules_to_save=modules_to_save,
        lora_targets=lora_targets,
        trainable=trainable,
        batch_line=batch_line,
        tokens_per_step=tokens,
        memory_lines=memory_lines,
        time_line=time_line,
        notes=notes,
        peak_gib=peak,
        gpu_gib=gpu_gib,
    )


def _rope_lines(cfg: Any, base_config: Any, settings: Any, sequence_len: int) -> list[str]:
    from longlora_plugin.rope import resolve_rope

    overrides = dict(cfg.get("overrides_of_model_config") or cfg.get("model_config") or {})
    if settings is None:
        return [f"RoPE: unchanged; model_config overrides: {overrides or 'none'}"]
    rope = resolve_rope(
        base_config,
        rope_type=settings.rope.type,
        factor=settings.rope.factor,
        sequence_len=sequence_len,
        original_max_position_embeddings=settings.rope.original_max_position_embeddings,
    )
    lines = [rope.log_line().removeprefix("longlora: ")]
    params = overrides.get("rope_parameters")
    if params:
        lines.append(f"rope_parameters (written into model_config): {_plain(params)}")
    else:
        lines.append(
            f"rope_parameters: unchanged {_plain(getattr(base_config, 'rope_parameters', None))}"
        )
    base_max = getattr(base_config, "max_position_embeddings", None)
    new_max = overrides.get("max_position_embeddings", base_max)
    lines.append(f"max_position_embeddings: {base_max} -> {new_max}")
    return lines


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def _count_parameters(cfg: Any, base_config: Any) -> tuple[dict[str, int], int]:
    """Trainable parameters by kind on the PEFT model Axolotl would build, on ``meta``."""
    import torch
    from torch import nn

    from longlora_plugin.trainable import build_meta_model, is_norm_module

    model = build_meta_model(base_config, trust_remote_code=cfg.get("trust_remote_code") is True)
    total = sum(p.numel() for p in model.parameters())
    if not cfg.get("adapter"):
        return {"all (full fine-tune)": total, "total trainable": total}, total
    from axolotl.loaders.adapter import _build_peft_lora_config
    from peft import get_peft_model
    from peft.utils.other import ModulesToSaveWrapper

    lora_config = _build_peft_lora_config(model, cfg)
    with torch.device("meta"):
        peft_model = get_peft_model(model, lora_config)
    counts = {"LoRA": 0, "embed": 0, "norm": 0, "lm_head": 0, "other": 0}
    seen: set[int] = set()
    inner = peft_model.get_base_model()
    input_embedding = inner.get_input_embeddings()
    for module in peft_model.modules():
        if not isinstance(module, ModulesToSaveWrapper):
            continue
        original = module.original_module
        if original is input_embedding or isinstance(original, nn.Embedding):
            kind = "embed"
        elif is_norm_module(original):
            kind = "norm"
        else:
            kind = "lm_head"
        for param in module.modules_to_save.parameters():
            if param.requires_grad and id(param) not in seen:
                seen.add(id(param))
                counts[kind] += param.numel()
    for name, param in peft_model.named_parameters():
        if param.requires_grad and id(param) not in seen:
            seen.add(id(param))
            counts["LoRA" if "lora_" in name else "other"] += param.numel()
    if not counts["other"]:
        del counts["other"]
    trainable = sum(counts.values())
    counts["total trainable"] = trainable
    return counts, total


def _estimate_lines(
    cfg: Any,
    dims: ModelDims,
    total: int,
    trainable: dict[str, int],
    sequence_len: int,
    group: int | None,
    world: int,
    gpu: str,
    sequences: int,
) -> tuple[list[str], str, float, float]:
    gpu_gib, peak_flops = GPUS[gpu]
    parallelism = Parallelism.from_axolotl(cfg, world)
    half = bool(cfg.get("bf16") or cfg.get("fp16") or cfg.get("bfloat16") or cfg.get("float16"))
    shape = TrainingShape(
        sequence_len=sequence_len,
        micro_batch_size=int(cfg.get("micro_batch_size") or 1),
        group_size=group,
        gradient_checkpointing=bool(cfg.get("gradient_checkpointing")),
        bytes_per_element=2 if half else 4,
        full_finetune=not cfg.get("adapter"),
        loss_chunks=(int(cfg.get("chunked_cross_entropy_num_chunks") or 8))
        if cfg.get("chunked_cross_entropy")
        else None,
    )
    backend = str(cfg.get("attn_implementation") or "sdpa")
    flash = backend != "eager"
    estimate = estimate_memory(
        dims,
        shape,
        parallelism,
        trainable_params=trainable["total trainable"],
        total_params=total,
        flash=flash,
    )
    peak = estimate.gib()
    fits = "fits" if peak <= gpu_gib else "DOES NOT FIT"
    lines = [
        f"memory estimate per GPU ({parallelism.label}, {gpu}, GiB): peak {peak:.1f} of "
        f"{gpu_gib:.0f} -> {fits} (a lower bound: the paper measured 1.2-1.4x this for 7B)",
    ]
    lines += [f"  {name}: {value / GIB:.2f}" for name, value in estimate.terms.items()]
    lines.append(
        f"  activations: {estimate.activations / GIB:.2f} = max(logits and loss "
        f"{estimate.logits / GIB:.2f}, recomputed layer {estimate.layer / GIB:.2f} + attention "
        f"{estimate.attention / GIB:.2f})"
    )
    alt = "; ".join(f"{k} {_size(v)}" for k, v in estimate.attention_alternatives.items())
    lines.append(f"  attention working set of one layer: {alt}")
    lines.append("  assumptions: " + "; ".join(estimate.assumptions))
    seconds = step_seconds(
        dims, shape, sequences_per_step=sequences, world_size=world, peak_flops=peak_flops
    )
    steps = cfg.get("max_steps")
    time_line = f"time estimate: {seconds:.1f} s per optimizer step"
    if steps:
        time_line += f", {seconds * int(steps) / 3600:.1f} h for max_steps {steps}"
    time_line += " (FLOP count at MFU 0.47, calibrated on the paper's 7B 8k run)"
    return lines, time_line, peak, gpu_gib


def _size(value: float) -> str:
    return f"{value / GIB:.1f} GiB" if value >= GIB / 10 else f"{value / 1024**2:.0f} MiB"
