"""Combinations of the ``longlora`` block with the rest of the Axolotl config that are
refused, each with a message naming the key, the value and what is allowed."""

from __future__ import annotations

import os
from importlib.metadata import PackageNotFoundError, version
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from longlora_plugin.axolotl.cfg import (
    attention_implementation,
    base_model_config,
    fsdp_version,
    zero_stage,
)
from longlora_plugin.config import LongLoRAConfig, LongLoRAConfigError
from longlora_plugin.s2 import SUPPORTED_BACKENDS
from longlora_plugin.s2.group_size import MIN_GROUP_SIZE

# The first DeepSpeed release whose ZeRO-3 hooks serve PEFT's ModulesToSaveWrapper
# (DeepSpeed issue #7615, fixed by PR #8144).
ZERO3_MODULES_TO_SAVE_DEEPSPEED = "0.19.3"


def check_combinations(cfg: Any, settings: LongLoRAConfig, sequence_len: int) -> None:
    """Reject settings that conflict with the rest of the raw Axolotl config."""
    if cfg.get("s2_attention"):
        raise LongLoRAConfigError(
            f"s2_attention={cfg.get('s2_attention')!r} is Axolotl's removed S2-Attn; "
            "remove it: longlora.s2_attn provides S2-Attn"
        )
    explicit_group = settings.group_size is not None or settings.group_size_ratio is not None
    if settings.s2_attn or explicit_group:
        group = settings.group_size_for(sequence_len)
        if settings.group_size is not None:
            if group > sequence_len:
                raise LongLoRAConfigError(
                    f"longlora.group_size={group} is larger than sequence_len={sequence_len}; "
                    f"allowed: {MIN_GROUP_SIZE} <= group_size <= sequence_len"
                )
        elif group < MIN_GROUP_SIZE:
            ratio = settings.effective_group_size_ratio
            raise LongLoRAConfigError(
                f"longlora.group_size_ratio={ratio} gives group size int({ratio} * "
                f"{sequence_len}) = {group} with sequence_len={sequence_len}; the group size "
                f"must be >= {MIN_GROUP_SIZE}: raise the ratio or set longlora.group_size"
            )
    adapter = cfg.get("adapter")
    if adapter and cfg.get("unfrozen_parameters"):
        raise LongLoRAConfigError(
            f"unfrozen_parameters={list(cfg.get('unfrozen_parameters'))!r} cannot be combined "
            f"with adapter={adapter!r}: Axolotl applies it after wrapping and freezes the "
            "LoRA weights; remove it and list embed/norm/lm_head in "
            "longlora.trainable_params instead"
        )
    stage, fsdp = zero_stage(cfg), fsdp_version(cfg)  # the DeepSpeed JSON is read once
    if adapter and settings.trainable_params and fsdp == 2:
        raise LongLoRAConfigError(
            f"fsdp_config (FSDP2) with adapter={adapter!r} and longlora.trainable_params="
            f"{settings.trainable_params}: Axolotl's final FSDP2 LoRA save "
            "(axolotl/integrations/expert_parallel/shard.py, save_fsdp2_lora_adapter) gathers "
            "only lora_* parameters and then fails on the embeddings and norms PEFT trains "
            "in full (KeyError ...modules_to_save.default.weight), after the whole run; use "
            "DeepSpeed ZeRO-2 or ZeRO-3 (deepspeed: example_configs/deepspeed/zero3.json), or "
            "longlora.trainable_params: [] (plain LoRA, which extends context poorly: "
            "docs/configs.md)"
        )
    if adapter and settings.trainable_params and stage == 3:
        _check_deepspeed_serves_modules_to_save(cfg, settings)
    every = settings.eval.every_n_steps if settings.eval is not None else None
    if every and (stage == 3 or fsdp):
        raise LongLoRAConfigError(
            f"longlora.eval.every_n_steps={every} with a sharded model ("
            + ("DeepSpeed ZeRO-3" if stage == 3 else "FSDP")
            + "): the evaluation during training runs on the main process alone, which "
            "does not hold the whole model; remove every_n_steps (the evaluation at the "
            "end, or `longlora eval`, still works) or use DDP/ZeRO-2"
        )
    if settings.s2_attn:
        _check_axolotl_ring_attention(cfg, settings)
        _check_torch_compile(cfg)
    if settings.context_parallel > 1:
        _check_context_parallel(cfg, settings, fsdp)
    impl, key = attention_implementation(cfg)
    if settings.s2_attn and impl is not None:
        backends = SUPPORTED_BACKENDS
        if impl not in backends:
            raise LongLoRAConfigError(
                f"{key}={cfg.get(key)!r}: longlora.s2_attn wraps only {', '.join(backends)}; "
                "change attn_implementation or set longlora.s2_attn: false"
            )
        if impl == "flash_attention_2" and not cfg.get("merge_lora") and _axolotl_picks_fa4(cfg):
            raise LongLoRAConfigError(
                f"{key}={cfg.get(key)!r} on this GPU: Axolotl's model loader switches it to "
                "flash_attention_4 by itself when FlashAttention-4 (flash_attn.cute) is "
                "installed and usable, and longlora.s2_attn does not wrap flash_attention_4; "
                "use attn_implementation: sdpa (PyTorch's FlashAttention-2 kernels on CUDA), "
                "uninstall flash-attn-4, or set longlora.s2_attn: false"
            )


def _axolotl_picks_fa4(cfg: Any) -> bool:
    """Whether Axolotl's ``ModelLoader._resolve_flash_attention_4`` (0.19 and 0.21) would
    turn ``flash_attention_2`` into ``flash_attention_4``: with no ring attention, when its
    ``fa4_usable`` says so for the base model (an SM90/100/110 GPU, ``flash_attn.cute``,
    FA4's head-dim limits). False wherever that check does not exist or has no CUDA."""
    if _axolotl_context_parallel(cfg) is not None:
        return False
    try:
        from axolotl.monkeypatch.attention.flash_attn_4 import fa4_usable
    except ImportError:
        return False
    if not fa4_usable():  # no CUDA, no FA4 or the wrong GPU: no model config needed
        return False
    try:
        model_config = base_model_config(cfg)
    except (OSError, ValueError):
        return True
    return bool(fa4_usable(model_config))


def _check_context_parallel(cfg: Any, settings: LongLoRAConfig, fsdp: int | None) -> None:
    """``longlora.context_parallel > 1``: S2-Attn on, a process count it divides, data
    parallelism by DDP or DeepSpeed (not FSDP). (Axolotl's ring attention is refused with
    S2-Attn whatever ``context_parallel`` is: :func:`_check_axolotl_ring_attention`.)"""
    size = settings.context_parallel
    key = f"longlora.context_parallel={size}"
    if not settings.s2_attn:
        raise LongLoRAConfigError(
            f"{key} with longlora.s2_attn: false: context parallelism splits S2-Attn's "
            "groups over processes; turn s2_attn on or set context_parallel: 1"
        )
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1:  # one process may be merge-lora or preprocess: checked at training
        check_context_parallel_world(size, world)
    if fsdp:
        raise LongLoRAConfigError(
            f"{key} with FSDP (fsdp_config): the split training step accumulates "
            "gradients through accelerate's no_sync, which is run and tested with DDP and "
            "DeepSpeed ZeRO-3 only; use deepspeed: example_configs/deepspeed/zero3.json"
        )
    every = settings.eval.every_n_steps if settings.eval is not None else None
    if every:
        raise LongLoRAConfigError(
            f"{key} with longlora.eval.every_n_steps={every}: the evaluation during "
            "training has not been run with split rows; use val_set_size with eval_steps "
            "(Axolotl's evaluation, whole rows per rank, tested), or evaluate after "
            "training (`longlora eval`)"
        )
    if cfg.get("rl"):
        raise LongLoRAConfigError(
            f"{key} with rl={cfg.get('rl')!r}: only the language-modelling loss of "
            "supervised training is split; remove one of them"
        )


def _axolotl_context_parallel(cfg: Any) -> tuple[str, int] | None:
    """``(key, size)`` of Axolotl's own (ring attention) context parallelism as the user
    wrote it, when it splits rows (size > 1); ``context_parallel_size`` wins over the
    deprecated ``sequence_parallel_degree``, as in Axolotl's ``check_context_parallel_size``."""
    for key in ("context_parallel_size", "sequence_parallel_degree"):
        value = cfg.get(key)
        if value:
            try:
                size = int(value)
            except (TypeError, ValueError):
                return None  # Axolotl's validation names the bad value
            return (key, size) if size > 1 else None
    return None


def _check_axolotl_ring_attention(cfg: Any, settings: LongLoRAConfig) -> None:
    """S2-Attn with Axolotl's ring context parallelism: refused, whatever
    ``longlora.context_parallel`` is. Ring attention patches transformers' flash path; S2
    calls the varlen kernel itself, so each rank would attend only inside its own chunk
    of the row (silently wrong, nothing fails)."""
    theirs = _axolotl_context_parallel(cfg)
    if theirs is None:
        return
    key, size = theirs
    raise LongLoRAConfigError(
        f"longlora.s2_attn: true (longlora.context_parallel={settings.context_parallel}) "
        f"with Axolotl's {key}={size} (ring attention): S2-Attn calls the attention kernel "
        "itself and bypasses the ring, so each rank would attend only inside its own chunk "
        f"of the row; remove {key} and use either longlora.context_parallel: P (S2-Attn's "
        "own context parallelism, which exchanges the keys and values of the groups crossing "
        "a chunk boundary; launch a multiple of P processes) or longlora.s2_attn: false "
        f"(full attention; Axolotl's {key} then splits the rows)"
    )


def _check_torch_compile(cfg: Any) -> None:
    """S2-Attn with ``torch_compile`` (``true`` or ``auto``, which Axolotl turns on for
    torch >= 2.5.1): refused. Axolotl hands it to the Trainer, which compiles the whole
    model with Inductor after setting ``torch._dynamo.config.suppress_errors = True``, so a
    compile failure falls back to eager without an error. S2 builds its group layout from
    the values of ``position_ids`` on the host in every forward: graph breaks in each
    layer. Compiled outside Axolotl it gave the eager loss on CPU; through Axolotl's
    Trainer it has not run (docs/configs.md)."""
    value = cfg.get("torch_compile")
    if value is True or value == "auto":
        raise LongLoRAConfigError(
            f"torch_compile={value!r} with longlora.s2_attn: true: not verified: S2-Attn "
            "reads position_ids on the host to place its groups in every forward, so "
            "torch.compile breaks each decoder layer's graph there, and Axolotl sets "
            "torch._dynamo's suppress_errors, which turns a compile failure into a silent "
            "fallback to eager; S2 has not trained compiled under Axolotl. Remove "
            "torch_compile (S2's attention kernels are compiled kernels already), or set "
            "longlora.s2_attn: false"
        )


def check_context_parallel_world(size: int, world: int) -> None:
    """Raise unless ``longlora.context_parallel`` divides the run's process count."""
    if world % size:
        raise LongLoRAConfigError(
            f"longlora.context_parallel={size} does not divide the {world} process(es) of "
            "this run; allowed: a divisor of the process count (launch e.g. `axolotl train "
            f"cfg.yml --launcher torchrun -- --nproc_per_node {size}`), or 1"
        )


def check_eval_data(settings: LongLoRAConfig) -> None:
    """Fail before training when ``longlora.eval.data`` is a local path that does not
    exist (a dataset name is only checked when the evaluation loads it)."""
    data = settings.eval.data if settings.eval is not None else None
    if not data:
        return
    path = Path(data)
    looks_local = path.suffix in (".txt", ".md", ".json", ".jsonl") or data.startswith(
        (".", "/", "~")
    )
    if looks_local and not path.expanduser().exists():
        raise LongLoRAConfigError(
            f"longlora.eval.data={data!r} does not exist; allowed: a .txt file, a directory "
            "of .txt files, a .jsonl file or a dataset available locally"
        )


def require_flash_attn(impl: str | None, key: str, value: Any) -> None:
    """Raise when the training backend is ``flash_attention_2`` and flash-attn is missing;
    ``key``/``value``: the config entry that asked for it, as the user wrote it."""
    if impl == "flash_attention_2" and find_spec("flash_attn") is None:
        raise LongLoRAConfigError(
            f"{key}={value!r} needs the flash-attn package, which is not installed; "
            "install it (pip install 'longlora-plugin[flash-attn]', CUDA only) or use "
            "attn_implementation: sdpa"
        )


def _check_deepspeed_serves_modules_to_save(cfg: Any, settings: LongLoRAConfig) -> None:
    """ZeRO-3 with embeddings/norms trained in full needs DeepSpeed >= 0.19.3: before it,
    the first forward fails on PEFT's wrappers of those modules."""
    from packaging.version import Version

    try:
        installed = version("deepspeed")
    except PackageNotFoundError:
        return  # Axolotl says that DeepSpeed is missing
    if Version(installed) < Version(ZERO3_MODULES_TO_SAVE_DEEPSPEED):
        raise LongLoRAConfigError(
            f"deepspeed={cfg.get('deepspeed')!r} (ZeRO-3) with longlora.trainable_params="
            f"{settings.trainable_params} needs deepspeed>={ZERO3_MODULES_TO_SAVE_DEEPSPEED}; "
            f"installed: {installed}, whose ZeRO-3 hooks fail in the first forward on the PEFT "
            'wrappers of the modules trained in full ("object has no attribute '
            "'ds_grads_remaining'\", DeepSpeed issue #7615); upgrade it (pip install "
            f"'deepspeed>={ZERO3_MODULES_TO_SAVE_DEEPSPEED}') or use ZeRO-2"
        )
