"""What ``longlora validate`` reports about a validated config: resolved S2-Attn and RoPE
settings, the kernels S2 trains with, trainable parameters counted on the real PEFT model
built on the ``meta`` device, tokens per step, and the memory and time estimate of
:mod:`longlora_plugin.memory`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from longlora_plugin.axolotl.cfg import base_model_config, run_rope, sequence_len
from longlora_plugin.config import plain_data
from longlora_plugin.memory import (
    GIB,
    GPUS,
    MARGIN,
    ModelDims,
    Parallelism,
    TrainingShape,
    estimate_memory,
    step_seconds,
)
from longlora_plugin.memory_features import MemoryFeatures, suggestion


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


def build_report(
    cfg: Any,
    path: Path,
    *,
    world: int,
    gpu: str,
    notes: list[str],
    context_parallel: int = 1,
) -> Report:
    """The :class:`Report` of a config Axolotl validated (``world`` GPUs of type ``gpu``;
    ``context_parallel`` of them split each row)."""
    from longlora_plugin.config import parse_longlora

    source = str(cfg.get("base_model_config") or cfg.get("base_model"))
    base_config = base_model_config(cfg)
    text_config = (
        base_config.get_text_config() if hasattr(base_config, "get_text_config") else base_config
    )
    dims = ModelDims.from_config(text_config)
    seq_len = sequence_len(cfg)

    block = cfg.get("longlora")
    settings = parse_longlora(block) if block is not None else None
    group = None
    kernel_lines: list[str] = []
    if settings is None:
        s2_line = "S2-Attn: off (no longlora block)"
    elif not settings.s2_attn:
        s2_line = "S2-Attn: off (longlora.s2_attn: false); full attention in training"
    else:
        group = settings.group_size_for(seq_len)
        backend = cfg.get("attn_implementation") or "sdpa"
        s2_line = (
            f"S2-Attn: on, wraps {backend}, group size {group}, shift {group // 2} "
            f"({-(-seq_len // group)} groups per {seq_len}-token row); training only, "
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
    rope_lines = _rope_lines(cfg, base_config, settings)

    trainable, total = _count_parameters(cfg, base_config)
    modules_to_save = list(cfg.get("lora_modules_to_save") or [])
    lora_targets = list(cfg.get("lora_target_modules") or []) if cfg.get("adapter") else []
    if cfg.get("adapter") and cfg.get("lora_target_linear"):
        lora_targets.append("(all linear: lora_target_linear)")

    micro = int(cfg.get("micro_batch_size") or 1)
    accum = int(cfg.get("gradient_accumulation_steps") or 1)
    replicas = world // context_parallel
    sequences = micro * accum * replicas
    tokens = sequences * seq_len
    split = (
        f" ({replicas} context-parallel group{'s' * (replicas > 1)} of {context_parallel})"
        if context_parallel > 1
        else ""
    )
    batch_line = (
        f"micro batch {micro} x gradient accumulation {accum} x {world} GPUs{split} = "
        f"{sequences} sequences of {seq_len} tokens"
        + (" (packed rows; up to)" if cfg.get("sample_packing") else "")
    )

    memory_lines, time_line, peak, gpu_gib = _estimate_lines(
        cfg, dims, total, trainable, seq_len, group, world, gpu, sequences, context_parallel
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


def _rope_lines(cfg: Any, base_config: Any, settings: Any) -> list[str]:
    overrides = dict(cfg.get("overrides_of_model_config") or cfg.get("model_config") or {})
    if settings is None:
        return [f"RoPE: unchanged; model_config overrides: {overrides or 'none'}"]
    rope = run_rope(cfg, settings, base_config)
    lines = [rope.log_line().removeprefix("longlora: ")]
    params = overrides.get("rope_parameters")
    if params:
        lines.append(f"rope_parameters (written into model_config): {plain_data(params)}")
    else:
        lines.append(
            f"rope_parameters: unchanged {plain_data(getattr(base_config, 'rope_parameters', None))}"
        )
    base_max = getattr(base_config, "max_position_embeddings", None)
    new_max = overrides.get("max_position_embeddings", base_max)
    lines.append(f"max_position_embeddings: {base_max} -> {new_max}")
    return lines


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
    context_parallel: int = 1,
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
        features=MemoryFeatures.from_axolotl(cfg),
        context_parallel=context_parallel,
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
    margin = "fits" if peak * MARGIN <= gpu_gib else "DOES NOT FIT"
    lines = [
        f"memory estimate per GPU ({parallelism.label}, {gpu}, GiB): peak {peak:.1f} of "
        f"{gpu_gib:.0f} -> {fits}; x{MARGIN} {peak * MARGIN:.1f} -> {margin} with the margin "
        "(the estimate is a lower bound: the paper measured 1.2-1.4x it for 7B)",
    ]
    lines += [f"  {name}: {value / GIB:.2f}" for name, value in estimate.terms.items()]
    lines.append(
        f"  activations: {estimate.activations / GIB:.2f} = max(logits and loss "
        f"{estimate.logits / GIB:.2f}, recomputed layer {estimate.layer / GIB:.2f} + attention "
        f"{estimate.attention / GIB:.2f})"
    )
    term, size = estimate.dominant()
    lines.append(
        f"  dominant term: {term} {size / GIB:.2f} ({size / estimate.peak:.0%} of the peak); "
        "to shrink it: "
        + suggestion(
            term,
            shape.features,
            zero_stage=parallelism.zero_stage,
            offloaded=parallelism.offload_params,
        )
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
