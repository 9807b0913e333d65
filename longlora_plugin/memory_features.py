"""Axolotl's memory features in the estimate of :mod:`longlora_plugin.memory`: what each
one changes, which term then dominates, and the YAML a user can paste to shrink it.

Symbols as in :mod:`longlora_plugin.memory`; ``t = b * S`` tokens on one GPU (``S`` the
local length under context parallelism), ``q = L * (layer params - 2h)`` the decoder's
linear weights (what bitsandbytes quantises; embeddings, LM head and norms stay in ``w``).

Loss (the ``logits`` term; one cross-entropy option at a time, as Axolotl enforces)::

    plain                            t * V * (w + 12)   LM-head output, fp32 log-softmax,
                                                        fp32 gradients of its output and input
    chunked_cross_entropy (k chunks) t * V * (2w + 12/k) bf16 logits and their gradient stay
    cut_cross_entropy (plugin)       t * (h w + 4)      logits only in on-chip blocks: the
                                                        hidden states' gradient and the fp32 LSE
    liger_fused_linear_cross_entropy t * (h w + 4) + c * V * w
                                     Liger's chunk of c = next_pow2(ceil(t / ceil(V / h)))
                                     rows of logits (at most t), plus its precomputed input
                                     gradient and fp32 per-token loss

Other features::

    activation_offloading  checkpoints = min(L, 5) * t * h * w: the checkpointed layer inputs
                           live in CPU memory; TRL's OffloadActivations (what Axolotl uses)
                           keeps up to 5 in its forward stash on the GPU (``legacy``: 1)
    tiled_mlp (n shards)   the recomputed layer's four MLP intermediates 4 * t * I * w / n;
                           n = tiled_mlp_num_shards or Axolotl's ceil(S / 32768)
    load_in_4bit (QLoRA)   weights = (P - q) * w + q * (0.5 + 1/64 + 4/16384) bytes: NF4
                           with Axolotl's double quantisation (8-bit absmax per 64 weights,
                           fp32 per 256 blocks); 0.5 + 4/64 without it
    load_in_8bit           weights = (P - q) * w + q (the per-row fp32 scales not counted)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

LOSSES = ("plain", "chunked", "cce", "liger")
TILED_MLP_TOKENS_PER_SHARD = 32768  # Axolotl's default target (0.19 and 0.21)
OFFLOAD_STASH = 5  # TRL OffloadActivations' max_fwd_stash_size default
NF4_DOUBLE_QUANT = 0.5 + 1 / 64 + 4 / (64 * 256)
NF4_SINGLE_QUANT = 0.5 + 4 / 64
CCE_PLUGIN = "axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin"
LIGER_PLUGIN = "axolotl.integrations.liger.LigerPlugin"


@dataclass(frozen=True)
class MemoryFeatures:
    """The memory features a run turns on (defaults: none)."""

    loss: str = "plain"  # one of LOSSES
    loss_chunks: int = 8  # chunked_cross_entropy_num_chunks
    offload: str | None = None  # activation_offloading: "true", "legacy", "disk", ...
    tiled_mlp_shards: int | None = None  # None: off; 0: Axolotl's default by length
    weight_bits: int | None = None  # 4 or 8 (bitsandbytes); None: the training dtype
    double_quant: bool = True

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"loss={self.loss!r}; allowed: {', '.join(LOSSES)}")

    @classmethod
    def from_axolotl(cls, cfg: Any) -> MemoryFeatures:
        """From a validated Axolotl config (plugins must be listed for CCE and Liger)."""
        plugins = " ".join(str(p) for p in cfg.get("plugins") or [])
        if cfg.get("chunked_cross_entropy"):
            loss = "chunked"
        elif cfg.get("cut_cross_entropy") and "cut_cross_entropy" in plugins:
            loss = "cce"
        elif cfg.get("liger_fused_linear_cross_entropy") and "liger" in plugins:
            loss = "liger"
        else:
            loss = "plain"
        offload = cfg.get("activation_offloading")
        tiled = cfg.get("tiled_mlp")
        bits = 4 if cfg.get("load_in_4bit") else 8 if cfg.get("load_in_8bit") else None
        return cls(
            loss=loss,
            loss_chunks=int(cfg.get("chunked_cross_entropy_num_chunks") or 8),
            offload=None if not offload else "true" if offload is True else str(offload),
            tiled_mlp_shards=int(cfg.get("tiled_mlp_num_shards") or 0) if tiled else None,
            weight_bits=bits,
        )

    def describe(self) -> list[str]:
        """One assumption line per feature, for ``longlora validate``."""
        loss = {
            "plain": "loss computed on full fp32 logits (no chunked/fused cross-entropy)",
            "chunked": f"cross-entropy in {self.loss_chunks} chunks (chunked_cross_entropy)",
            "cce": "Cut Cross Entropy: logits never materialised",
            "liger": "Liger fused linear cross-entropy: logits in row chunks",
        }[self.loss]
        lines = [loss]
        if self.offload:
            lines.append(
                f"activation_offloading: {self.offload}: checkpointed layer inputs in CPU "
                f"memory, at most {self.stash} on the GPU"
            )
        if self.tiled_mlp_shards is not None:
            n = self.tiled_mlp_shards or f"ceil(S / {TILED_MLP_TOKENS_PER_SHARD})"
            lines.append(f"tiled_mlp: MLP intermediates in {n} shards")
        if self.weight_bits:
            lines.append(f"{self.weight_bits}-bit decoder linear weights (bitsandbytes)")
        return lines

    @property
    def stash(self) -> int:
        return 1 if self.offload == "legacy" else OFFLOAD_STASH


def logits_bytes(tokens: int, vocab: int, hidden: int, w: int, features: MemoryFeatures) -> float:
    """The loss's working set at the end of the forward pass (see the module docstring)."""
    if features.loss == "chunked":
        return float(tokens * vocab * (2 * w + 12 / features.loss_chunks))
    if features.loss == "cce":
        return float(tokens * (hidden * w + 4))
    if features.loss == "liger":
        inc = -(-vocab // hidden)
        chunk = min(tokens, 1 << (-(-tokens // inc) - 1).bit_length())  # next power of 2
        return float(tokens * (hidden * w + 4) + chunk * vocab * w)
    return float(tokens * vocab * (w + 12))


def checkpoint_bytes(layers: int, tokens: int, hidden: int, w: int, features: MemoryFeatures):
    """Checkpointed decoder-layer inputs held on the GPU."""
    on_gpu = min(layers, features.stash) if features.offload else layers
    return float(on_gpu * tokens * hidden * w)


def mlp_shards(local_len: int, features: MemoryFeatures) -> int:
    """Shards of the tiled MLP (1 without ``tiled_mlp``)."""
    if features.tiled_mlp_shards is None:
        return 1
    return features.tiled_mlp_shards or max(1, -(-local_len // TILED_MLP_TOKENS_PER_SHARD))


def quantised_params(num_layers: int, layer_params: int, hidden: int) -> int:
    """The decoder's linear weights (bitsandbytes quantises these, not the norms)."""
    return num_layers * (layer_params - 2 * hidden)


def weight_bytes(total: int, quantised: int, w: int, features: MemoryFeatures) -> float:
    """Bytes of the base model's weights (before any ZeRO-3 sharding)."""
    if features.weight_bits == 4:
        per = NF4_DOUBLE_QUANT if features.double_quant else NF4_SINGLE_QUANT
    elif features.weight_bits == 8:
        per = 1.0
    else:
        return float(total * w)
    return (total - quantised) * w + quantised * per


def suggestion(term: str, features: MemoryFeatures, *, zero_stage: int, offloaded: bool) -> str:
    """YAML that removes or shrinks the dominant ``term`` (names of MemoryEstimate.parts)."""
    cp = "`longlora.context_parallel: 2` (each row split over 2 GPUs; launch a multiple of 2)"
    if term == "logits and loss":
        if features.loss == "plain":
            return (
                "add `chunked_cross_entropy: true` (fp32 loss buffers in chunks; or the Cut "
                f"Cross Entropy plugin, `- {CCE_PLUGIN}` under `plugins:`, no logits at all)"
            )
        if features.loss == "chunked":
            return (
                "delete `chunked_cross_entropy: true` and add "
                f"`- {CCE_PLUGIN}` under `plugins:` (Cut Cross Entropy: no logits; needs "
                "Axolotl's fork of cut-cross-entropy and a GPU), or " + cp
            )
        return cp
    if term == "checkpoints":
        if not features.offload:
            return (
                "add `activation_offloading: true` (checkpointed layer inputs to CPU memory; "
                "needs `gradient_checkpointing: true`)"
            )
        return cp
    if term == "recomputed layer + attention":
        if features.tiled_mlp_shards is None:
            return "add `tiled_mlp: true` (the MLP's intermediates in sequence shards)"
        return cp
    if term == "weights":
        if zero_stage < 3:
            return "`deepspeed: example_configs/deepspeed/zero3.json` (weights sharded)"
        if not offloaded:
            return "`deepspeed: example_configs/deepspeed/zero3_offload.json` (weights on CPU)"
        return "`adapter: qlora` with `load_in_4bit: true` (4-bit base weights)"
    if term in ("optimizer", "gradients", "trainable copies", "comm buffers"):
        if zero_stage < 3:
            return "`deepspeed: example_configs/deepspeed/zero3.json` (sharded over the GPUs)"
        return "`deepspeed: example_configs/deepspeed/zero3_offload.json` (offloaded to CPU)"
    return "nothing in the config: the fixed CUDA context and workspaces"
