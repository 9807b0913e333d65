"""Tiny models trained in a test to retrieve: the positive case for the retrieval
evaluations (passkey, RULER), next to the same model untrained.

:func:`copy_tokenizer` builds a BPE tokenizer over a task's fixed texts that merges
across spaces (byte-level without the word-splitting regex) with one token per digit,
so long filler becomes few tokens and a prompt of ~100 tokens holds a real haystack.
:func:`train_copier` trains a 2-layer Llama with plain torch on ``(ids, labels)`` rows
(labels only on the answer) and returns it with its untrained twin (same init).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import torch

from longlora_plugin.evaluation.loss import IGNORE_INDEX


def copy_tokenizer(texts: Sequence[str], vocab_size: int = 1000):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "</s>", "<pad>", "<unk>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts) * 20, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )


def batch(tokenizer, rows: Sequence[tuple[list[int], list[int]]]):
    """Right-padded ``(input_ids, labels, attention_mask)`` of ``rows``."""
    width = max(len(r) for r, _ in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    labels = torch.full((len(rows), width), IGNORE_INDEX)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row, label) in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        labels[i, : len(label)] = torch.tensor(label)
        mask[i, : len(row)] = 1
    return ids, labels, mask


def train_copier(
    tokenizer,
    sample: Callable[[random.Random], tuple[list[int], list[int]]],
    *,
    steps: int,
    batch_size: int = 32,
    max_positions: int = 256,
    lr: float = 5e-3,
):
    """``(trained, untrained)`` tiny Llamas with the same init; the trained one has seen
    ``steps`` batches of ``sample(rng)`` rows (one-cycle lr)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    untrained = LlamaForCausalLM(config).eval()
    model = LlamaForCausalLM(config)
    model.load_state_dict(untrained.state_dict())
    model.train()
    optim = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optim, max_lr=lr, total_steps=steps, pct_start=0.1
    )
    rng = random.Random(0)
    for _ in range(steps):
        ids, labels, mask = batch(tokenizer, [sample(rng) for _ in range(batch_size)])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optim.zero_grad()
        loss.backward()
        optim.step()
        schedule.step()
    return model.eval(), untrained
