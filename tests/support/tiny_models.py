"""Tiny random-weight models and text datasets for offline tests.

Built locally (no Hugging Face Hub access) from the demo's tokenizer and config builders
(:mod:`demo.tiny_models`). Contract of :func:`build_tiny_model`: the returned directory
loads with ``AutoConfig``/``AutoModelForCausalLM``/``AutoTokenizer`` offline, its
``config.json`` has ``vocab_size == len(tokenizer)`` (so Axolotl never resizes the
embeddings), float32 weights, and a small ``max_position_embeddings`` (default 64) so
that RoPE interpolation to 128-512 tokens is meaningful.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from demo.tiny_models import build_tokenizer, sample_text, tiny_config

# What `axolotl train` needs on a CPU: no mixed precision (bf16 "auto" turns on fp16 and
# the loss goes to nan), a CPU attention backend, the LoRA kernels off (they need CUDA),
# no dataset/dataloader worker processes for tiny data.
CPU_AXOLOTL: dict[str, Any] = {
    "bf16": False,
    "fp16": False,
    "attn_implementation": "sdpa",
    "lora_mlp_kernel": False,
    "lora_qkv_kernel": False,
    "lora_o_kernel": False,
    "lora_embedding_kernel": False,
    "dataset_num_proc": 1,
    "dataloader_num_workers": 0,
    "dataloader_pin_memory": False,
}

# A short, seeded training run of a tiny model (the tests' `axolotl train` configs).
TRAIN_SHORT: dict[str, Any] = {
    **CPU_AXOLOTL,
    "gradient_accumulation_steps": 1,
    "max_steps": 3,
    "learning_rate": 1e-3,
    "optimizer": "adamw_torch",
    "lr_scheduler": "constant",
    "weight_decay": 0.0,
    "logging_steps": 1,
    "save_strategy": "no",
    "seed": 42,
}
# LoRA r4 on the attention projections.
LORA_R4: dict[str, Any] = {
    "adapter": "lora",
    "lora_r": 4,
    "lora_alpha": 8,
    "lora_dropout": 0.0,
    "lora_target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
}


def build_tiny_model(
    out_dir: str | Path,
    arch: str = "llama",
    seed: int = 0,
    **config_overrides: Any,
) -> Path:
    """Build and save a tiny random-weight model plus tokenizer into ``out_dir``.

    Returns ``out_dir`` as a ``Path``. Weights are float32 and reproducible for
    a given ``seed`` and config. ``config_overrides`` go to :func:`tiny_config`.
    """
    import torch
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out)
    config = tiny_config(arch, vocab_size=len(tokenizer), **config_overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(str(out))
    return out


def write_text_dataset(
    path: str | Path,
    n_docs: int = 64,
    min_words: int = 20,
    max_words: int = 110,
    seed: int = 1,
) -> Path:
    """Write a jsonl file of ``{"text": ...}`` documents of varying length.

    With the tiny tokenizer one word is about 2 tokens, so the default range
    gives documents of about 45-250 tokens (all fit ``sequence_len`` 256). Use it with Axolotl as
    ``{path: <file>, ds_type: json, type: completion}``.
    """
    rng = random.Random(seed)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w", encoding="utf-8") as fh:
        for _ in range(n_docs):
            fh.write(json.dumps({"text": sample_text(rng, rng.randint(min_words, max_words))}))
            fh.write("\n")
    return p
