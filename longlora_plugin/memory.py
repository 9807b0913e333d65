"""Per-GPU memory and step-time estimate for a LongLoRA training run (no weights loaded).

Everything is computed from the base model's config and the run's settings; nothing is
measured. Symbols: ``P`` parameters of the base model, ``T`` trainable parameters (LoRA
weights plus the PEFT ``modules_to_save`` copies of embeddings/norms/LM head), ``N``
data-parallel ranks, ``b`` micro batch, ``S`` sequence length, ``G`` S2-Attn group size,
``L`` decoder layers, ``h`` hidden size, ``I`` MLP intermediate size, ``Hq``/``Hkv``
query/key-value heads of size ``d``, ``V`` vocabulary, ``w`` bytes per weight/activation
element (2 for bf16/fp16, 4 for fp32).

Memory per GPU (bytes)::

    weights     = w * P                       ZeRO-3 / FSDP full shard: / N (+ 2 gathered layers);
                                              parameter offload: only the 2 gathered layers
    trainable   = w * T                       LoRA A/B and the modules_to_save copies (PEFT keeps
                                              the frozen original next to the trained copy); / N with ZeRO-3
    gradients   = w * T                       / N with ZeRO-2/3 (+ 2 reduce buckets of h*h elements)
    optimizer   = 12 * T                      fp32 master copy + AdamW m and v; / N with ZeRO-1/2/3;
                                              0 on the GPU with optimizer offload
    (with S2-Attn context parallelism over c GPUs, S below is the local S / c in every
    activation term: checkpoints, layer, attention and logits)
    checkpoints = L * b * S * h * w           gradient checkpointing keeps each decoder layer's input
                                              (without it: every layer's activations, L * layer)
    layer       = b * S * (8h + w (5h + 3 Hkv d + 4I))
                                              tensors one decoder layer saves for backward while it is
                                              recomputed: the RMSNorms' fp32 inputs and outputs, q (+RoPE),
                                              k/v (+RoPE), attention output, the four MLP intermediates
    attention   = flash / memory-efficient SDPA: b * S * Hq * 4 (log-sum-exp), i.e. O(S)
                  eager (scores materialised):   b * Hq * S * S_eff * (3w + 4), S_eff = S for full
                                              attention, G with S2-Attn (S/G groups of G x G)
    logits      = b * S * V * (w + 12)        at the start of the backward pass: the LM-head output
                                              (w), the fp32 log-softmax the cross-entropy saves (4), the
                                              fp32 gradients of its output and input (4 + 4)
    (Axolotl's memory features -- chunked/cut/Liger cross-entropy, activation offloading, tiled
    MLP, 4/8-bit weights -- change weights, checkpoints, layer and logits as
    :mod:`longlora_plugin.memory_features` documents)
    overhead    = 1 GiB                       CUDA context, cuBLAS/NCCL workspaces

    peak = weights + trainable + gradients + optimizer + checkpoints
           + max(logits, layer + attention) + overhead

The last two activation terms do not coincide: the logits peak at the end of the forward
pass, the recomputed layer during the backward pass. Allocator fragmentation is not
modelled, so the estimate is a lower bound of what ``nvidia-smi`` shows: the paper's
measured peaks for Llama-2 7B are 1.2-1.4x this estimate (``docs/configs.md``), so
``longlora validate`` also prints ``MARGIN`` x the peak.

Time per optimizer step: forward FLOPs per sequence are counted as in the paper
(``2 * P_matmul * S`` for the linear layers, ``P_matmul`` = ``P`` without the embedding
lookup, plus ``4 * L * S * S_eff * Hq * d`` for attention); a causal kernel does half of the
attention work. Training costs ``k_lin = 3`` linear forwards with LoRA and gradient
checkpointing (forward, recomputation, input gradients; +1 for weight gradients in full
fine-tuning, -1 without checkpointing) and ``k_attn = 4`` attention forwards (forward,
recomputation, backward ~ 2x). Step time = FLOPs per GPU / (peak bf16 FLOP/s * MFU) with
MFU 0.47, calibrated on the paper's 7B LongLoRA 8k run (5.2 h for 1000 steps on 8 A100).
``tests/test_memory.py`` and ``docs/configs.md`` compare it with the paper's measured
numbers (``tests/support/paper.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from longlora_plugin import memory_features as mf
from longlora_plugin.memory_features import MemoryFeatures
from longlora_plugin.s2.group_size import DEFAULT_GROUP_SIZE_RATIO, group_size_for

GIB = 1024**3
OVERHEAD_BYTES = 1 * GIB
DEFAULT_MFU = 0.47
MARGIN = 1.4  # the paper's measured 7B peaks are up to 1.4x the estimate

# name -> (memory GiB, dense bf16 peak FLOP/s)
GPUS: dict[str, tuple[float, float]] = {
    "a100-80gb": (80.0, 312e12),
    "a100-40gb": (40.0, 312e12),
    "h100-80gb": (80.0, 989e12),
    "h200-141gb": (141.0, 989e12),
    "l40s-48gb": (48.0, 362e12),
    "a10g-24gb": (24.0, 125e12),
    "rtx4090-24gb": (24.0, 165e12),
}


@dataclass(frozen=True)
class ModelDims:
    """The numbers of a decoder-only transformer the estimate needs."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tied_embeddings: bool = False
    sliding_window: int | None = None

    @classmethod
    def from_config(cls, config: Any) -> ModelDims:
        """From a transformers config object or a ``config.json`` dict."""

        def get(name: str, default: Any = None) -> Any:
            if isinstance(config, dict):
                return config.get(name, default)
            return getattr(config, name, default)

        heads = int(get("num_attention_heads"))
        hidden = int(get("hidden_size"))
        return cls(
            vocab_size=int(get("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(get("intermediate_size")),
            num_layers=int(get("num_hidden_layers")),
            num_heads=heads,
            num_kv_heads=int(get("num_key_value_heads") or heads),
            head_dim=int(get("head_dim") or hidden // heads),
            tied_embeddings=bool(get("tie_word_embeddings", False)),
            sliding_window=get("sliding_window"),
        )

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def layer_params(self) -> int:
        """One decoder layer of a Llama-style model (no biases): attention, gated MLP, 2 norms."""
        h, d = self.hidden_size, self.head_dim
        attn = h * self.num_heads * d * 2 + h * self.num_kv_heads * d * 2
        return attn + 3 * h * self.intermediate_size + 2 * h

    @property
    def total_params(self) -> int:
        head = 0 if self.tied_embeddings else self.embedding_params
        return self.embedding_params + head + self.num_layers * self.layer_params + self.hidden_size

    def lora_params(self, r: int, modules: tuple[str, ...] = ("q", "k", "v", "o")) -> int:
        """LoRA A and B (r * (in + out)) on the named attention projections of every layer."""
        h, q, kv = (
            self.hidden_size,
            self.num_heads * self.head_dim,
            self.num_kv_heads * self.head_dim,
        )
        shapes = {"q": (h, q), "k": (h, kv), "v": (h, kv), "o": (q, h)}
        return self.num_layers * sum(r * sum(shapes[m]) for m in modules)


@dataclass(frozen=True)
class Parallelism:
    """How the run is spread over GPUs: ZeRO stage (0 = plain DDP) and offloading."""

    world_size: int = 8
    zero_stage: int = 0
    offload_optimizer: bool = False
    offload_params: bool = False
    label: str = "DDP"

    @classmethod
    def from_axolotl(cls, cfg: Any, world_size: int) -> Parallelism:
        """From an Axolotl config's ``deepspeed`` (path or dict) / ``fsdp_config``."""
        ds = cfg.get("deepspeed")
        if isinstance(ds, str):
            import json
            from pathlib import Path

            ds = json.loads(Path(ds).read_text(encoding="utf-8"))
        if isinstance(ds, dict):
            zero = ds.get("zero_optimization") or {}
            stage = int(zero.get("stage", 0))
            opt = _offloaded(zero.get("offload_optimizer"))
            par = _offloaded(zero.get("offload_param"))
            extra = [n for n, on in (("optimizer", opt), ("parameter", par)) if on]
            label = f"DeepSpeed ZeRO-{stage}" + (
                f" with {' and '.join(extra)} offload to CPU" if extra else ""
            )
            return cls(world_size, stage, opt, par, label)
        fsdp = cfg.get("fsdp_config")
        if fsdp:
            fsdp = dict(fsdp)
            reshard = fsdp.get("reshard_after_forward", fsdp.get("fsdp_reshard_after_forward"))
            stage = 2 if reshard is False or str(reshard).upper() == "SHARD_GRAD_OP" else 3
            offload = bool(fsdp.get("offload_params", fsdp.get("fsdp_offload_params", False)))
            version = cfg.get("fsdp_version") or fsdp.get("fsdp_version") or 1
            label = f"FSDP{version} ({'full shard' if stage == 3 else 'shard grad/optimizer'})"
            if offload:
                label += " with CPU offload"
            return cls(world_size, stage, offload, offload, label)
        return cls(world_size, 0, False, False, "DDP" if world_size > 1 else "single GPU")


def _offloaded(section: Any) -> bool:
    return isinstance(section, dict) and str(section.get("device", "none")).lower() not in (
        "none",
        "",
    )


@dataclass(frozen=True)
class TrainingShape:
    """What one GPU processes per micro step."""

    sequence_len: int
    micro_batch_size: int = 1
    group_size: int | None = None  # S2-Attn group; None = full attention
    gradient_checkpointing: bool = True
    bytes_per_element: int = 2  # bf16
    full_finetune: bool = False
    features: MemoryFeatures = MemoryFeatures()  # Axolotl's memory features turned on
    context_parallel: int = 1  # GPUs that split each row (S2-Attn context parallelism)

    @property
    def local_len(self) -> int:
        """Tokens of a row on one GPU: ``ceil(S / context_parallel)``."""
        return -(-self.sequence_len // self.context_parallel)


@dataclass
class MemoryEstimate:
    """Per-GPU memory terms in bytes (see the module docstring for the formula)."""

    terms: dict[str, float]
    logits: float
    layer: float
    attention: float
    attention_alternatives: dict[str, float]
    parallelism: Parallelism
    assumptions: list[str] = field(default_factory=list)

    @property
    def activations(self) -> float:
        return max(self.logits, self.layer + self.attention)

    @property
    def peak(self) -> float:
        return sum(self.terms.values()) + self.activations

    def dominant(self) -> tuple[str, float]:
        """The largest term, the activations named by whichever of their two peaks wins."""
        active = (
            ("logits and loss", self.logits)
            if self.logits >= self.layer + self.attention
            else ("recomputed layer + attention", self.layer + self.attention)
        )
        return max([*self.terms.items(), active], key=lambda item: item[1])

    def gib(self, value: float | None = None) -> float:
        return (self.peak if value is None else value) / GIB


def attention_bytes(
    dims: ModelDims, shape: TrainingShape, *, flash: bool, group_size: int | None
) -> float:
    """Attention working set of one layer: O(S) for flash / memory-efficient kernels,
    materialised scores (S x S_eff per head) otherwise."""
    b, s, w = shape.micro_batch_size, shape.local_len, shape.bytes_per_element
    if flash:
        return b * s * dims.num_heads * 4.0
    s_eff = min(group_size or shape.sequence_len, shape.sequence_len)
    return float(b * dims.num_heads * s * s_eff * (3 * w + 4))


def estimate_memory(
    dims: ModelDims,
    shape: TrainingShape,
    parallelism: Parallelism,
    *,
    trainable_params: int,
    total_params: int | None = None,
    flash: bool = True,
) -> MemoryEstimate:
    """Per-GPU peak memory estimate (bytes) for one training run."""
    n = max(1, parallelism.world_size)
    w = shape.bytes_per_element
    p = total_params if total_params is not None else dims.total_params
    t = p if shape.full_finetune else trainable_params
    b, s, h = shape.micro_batch_size, shape.local_len, dims.hidden_size
    stage = parallelism.zero_stage

    feats = shape.features
    quantised = mf.quantised_params(dims.num_layers, dims.layer_params, h)
    gathered = 2 * mf.weight_bytes(dims.layer_params, quantised // dims.num_layers, w, feats)
    if stage >= 3 and parallelism.offload_params:
        weights = float(gathered)
    elif stage >= 3:
        weights = mf.weight_bytes(p, quantised, w, feats) / n + gathered
    else:
        weights = mf.weight_bytes(p, quantised, w, feats)
    extra_copies = 0.0 if shape.full_finetune else float(w * t)
    if stage >= 3:
        extra_copies /= n
    gradients = w * t / (n if stage >= 2 else 1)
    buffers = 2.0 * w * h * h if stage >= 2 else 0.0
    optimizer = 0.0 if parallelism.offload_optimizer else 12.0 * t / (n if stage >= 1 else 1)

    mlp = 4 * dims.intermediate_size / mf.mlp_shards(s, feats)
    layer = b * s * (8 * h + w * (5 * h + 3 * dims.num_kv_heads * dims.head_dim + mlp))
    attention = attention_bytes(dims, shape, flash=flash, group_size=shape.group_size)
    if shape.gradient_checkpointing:
        checkpoints = mf.checkpoint_bytes(dims.num_layers, b * s, h, w, feats)
    else:
        checkpoints = float((dims.num_layers - 1) * (layer + attention))
    logits = mf.logits_bytes(b * s, dims.vocab_size, h, w, feats)

    alternatives = {
        f"{kind}, {mode}": attention_bytes(
            dims, shape, flash=kind == "flash", group_size=group if mode == "S2" else None
        )
        for kind in ("flash", "eager")
        for mode, group in (
            ("full", None),
            ("S2", group_size_for(s, shape.group_size, DEFAULT_GROUP_SIZE_RATIO)),
        )
    }
    terms = {
        "weights": weights,
        "trainable copies": extra_copies,
        "gradients": gradients,
        "optimizer": optimizer,
        "comm buffers": buffers,
        "checkpoints": checkpoints,
        "overhead": float(OVERHEAD_BYTES),
    }
    assumptions = [
        f"{'bf16/fp16' if w == 2 else 'fp32'} weights and activations, AdamW (fp32 master + 2 moments)",
        f"{parallelism.label}, {n} data-parallel ranks"
        if shape.context_parallel == 1
        else f"{parallelism.label} over all {n} ranks ({n // shape.context_parallel} "
        f"data-parallel x {shape.context_parallel} context-parallel)",
        "gradient checkpointing of every decoder layer"
        if shape.gradient_checkpointing
        else "no gradient checkpointing",
        "flash/memory-efficient attention (O(S))"
        if flash
        else "eager attention (materialised scores)",
        *feats.describe(),
        "1 GiB CUDA context and workspaces; allocator fragmentation not modelled",
    ]
    if shape.context_parallel > 1:
        assumptions.append(
            f"context parallelism: each row split over {shape.context_parallel} GPUs "
            f"({shape.local_len} tokens each; activation terms per GPU use that length; "
            "the S2 halo of at most one group's keys and values per layer is not counted)"
        )
    return MemoryEstimate(
        terms=terms,
        logits=logits,
        layer=float(layer),
        attention=attention,
        attention_alternatives=alternatives,
        parallelism=parallelism,
        assumptions=assumptions,
    )


def forward_flops_per_sequence(
    dims: ModelDims, sequence_len: int, group_size: int | None, *, causal: bool = False
) -> tuple[float, float]:
    """``(linear, attention)`` forward FLOPs of one sequence, counted as in the paper
    (``causal=False``: full S x S_eff score matrices; ``causal=True``: half of it)."""
    p_matmul = dims.total_params - dims.embedding_params
    linear = 2.0 * p_matmul * sequence_len
    s_eff = min(group_size or sequence_len, sequence_len)
    attention = 4.0 * dims.num_layers * sequence_len * s_eff * dims.num_heads * dims.head_dim
    return linear, attention / 2 if causal else attention


def step_seconds(
    dims: ModelDims,
    shape: TrainingShape,
    *,
    sequences_per_step: int,
    world_size: int,
    peak_flops: float,
    mfu: float = DEFAULT_MFU,
) -> float:
    """Estimated seconds per optimizer step (see the module docstring)."""
    linear, attention = forward_flops_per_sequence(
        dims, shape.sequence_len, shape.group_size, causal=True
    )
    k_lin = 3 + (1 if shape.full_finetune else 0) - (0 if shape.gradient_checkpointing else 1)
    k_attn = 4 - (0 if shape.gradient_checkpointing else 1)
    per_sequence = k_lin * linear + k_attn * attention
    per_gpu = per_sequence * math.ceil(sequences_per_step / max(1, world_size))
    return per_gpu / (peak_flops * mfu)
