"""Tiny tokenizers and model configs built offline: the demo's base model is built from
them, and so are the tests' tiny models (``tests/support/tiny_models.py``).

A byte-level BPE tokenizer trained with the ``tokenizers`` library on a given text (or a
small generated corpus of pseudo-English), and tiny transformers configs of the
architectures the project supports; no Hugging Face Hub access.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any

ARCHITECTURES: tuple[str, ...] = ("llama", "mistral", "qwen2", "qwen3", "phi3")


SPECIAL_TOKENS: dict[str, str] = {
    "bos_token": "<s>",
    "eos_token": "</s>",
    "pad_token": "<pad>",
    "unk_token": "<unk>",
}

# A fixed vocabulary of plain English words; sentences are drawn from it with a
# seeded RNG so every corpus and dataset is reproducible.
_WORD_TEXT = """
    the a an of to in on at by for with from into over under after before while
    river mountain forest city village harbor garden library market bridge tower
    road valley island desert meadow castle station museum school kitchen window
    old young quiet bright dark small large green blue red golden silver ancient
    walks runs reads writes sings builds finds keeps opens carries watches paints
    remembers follows crosses gathers counts listens travels returns discovers
    morning evening winter summer autumn spring night day story letter song map
    lamp stone river boat train cloud rain wind snow fire light shadow secret
    teacher farmer sailor painter baker doctor child traveler keeper stranger
    slowly quickly gently often never always again together alone far near
"""
_WORDS: tuple[str, ...] = tuple(_WORD_TEXT.split())


def sample_text(rng: random.Random, n_words: int) -> str:
    """Return ``n_words`` words of pseudo-English, split into sentences."""
    words: list[str] = []
    sentence_len = 0
    for _ in range(n_words):
        w = rng.choice(_WORDS)
        if sentence_len == 0:
            w = w.capitalize()
        words.append(w)
        sentence_len += 1
        if sentence_len >= rng.randint(6, 14):
            words[-1] += "."
            sentence_len = 0
    text = " ".join(words)
    return text if text.endswith(".") else text + "."


def corpus(n_sentences: int = 400, seed: int = 0) -> list[str]:
    """Small deterministic corpus used to train the tokenizer."""
    rng = random.Random(seed)
    return [sample_text(rng, rng.randint(8, 30)) for _ in range(n_sentences)]


def build_tokenizer(
    out_dir: str | Path | None = None,
    vocab_size: int = 512,
    texts: Iterable[str] | None = None,
) -> Any:
    """Train a byte-level BPE tokenizer on ``texts`` (default: the generated
    :func:`corpus`) and wrap it as a ``PreTrainedTokenizerFast``.

    Special tokens ``<s>``, ``</s>``, ``<pad>``, ``<unk>`` get ids 0-3; a
    post-processor prepends ``<s>`` to every encoded sequence. If ``out_dir``
    is given the tokenizer is saved there with ``save_pretrained``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [
        SPECIAL_TOKENS["bos_token"],
        SPECIAL_TOKENS["eos_token"],
        SPECIAL_TOKENS["pad_token"],
        SPECIAL_TOKENS["unk_token"],
    ]
    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus() if texts is None else texts, trainer=trainer)
    bos = SPECIAL_TOKENS["bos_token"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A",
        pair=f"{bos} $A {bos} $B",
        special_tokens=[(bos, tok.token_to_id(bos))],
    )
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)
    if out_dir is not None:
        hf_tok.save_pretrained(str(out_dir))
    return hf_tok


def tiny_config(arch: str = "llama", vocab_size: int = 512, **overrides: Any) -> Any:
    """Return a tiny transformers config for ``arch`` (see :data:`ARCHITECTURES`).

    Defaults: hidden 64, intermediate 128, 2 layers, 4 attention heads, 2 KV
    heads, head_dim 16, ``max_position_embeddings`` 64, default RoPE with
    theta 10000, untied embeddings, ``initializer_range`` 0.1 (large enough
    that RoPE and adapter differences show in the logits). Any keyword in
    ``overrides`` replaces the default.
    """
    from transformers import AutoConfig

    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose from {ARCHITECTURES}")
    kwargs: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        "initializer_range": 0.1,
        "tie_word_embeddings": False,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 2,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    }
    kwargs.update(overrides)
    kwargs.setdefault("head_dim", kwargs["hidden_size"] // kwargs["num_attention_heads"])
    if arch == "phi3":
        # Phi-3 keeps the pre-training length outside rope_parameters and
        # has no head_dim argument (it is derived).
        kwargs.setdefault("original_max_position_embeddings", kwargs["max_position_embeddings"])
        kwargs.pop("head_dim")
    if arch == "mistral":
        kwargs.setdefault("sliding_window", None)
    return AutoConfig.for_model(arch, **kwargs)
