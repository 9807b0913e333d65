"""Tiny models trained in a test to retrieve: the positive case for the retrieval
evaluations (passkey, RULER), next to the same model untrained.

:func:`copy_tokenizer` builds a BPE tokenizer over a task's fixed texts that merges
across spaces (byte-level without the word-splitting regex) with one token per digit,
so long filler becomes few tokens and a prompt of ~100 tokens holds a real haystack.
:func:`train_copier` trains a 2-layer Llama with plain torch on ``(ids, labels)`` rows
(labels only on the answer) and returns it with its untrained twin (same init).
:func:`niah_tokenizer` and :class:`NiahData` do the same for RULER's ``niah_single_1``,
:func:`passkey_tokenizer` and :class:`PasskeyData` for the passkey prompts. The trained
models the tests score are shipped: ``tests/support/retrievers.py`` trains them.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from longlora_plugin.evaluation import passkey as pk
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


def untrained_twin(config):
    """The Llama of ``config`` at the copiers' initialisation (seed 0), in eval mode."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def train_copier(
    tokenizer,
    sample: Callable[[random.Random], tuple[list[int], list[int]]],
    *,
    steps: int,
    batch_size: int = 32,
    max_positions: int = 256,
    lr: float = 5e-3,
    layers: int = 2,
    losses: list[float] | None = None,
):
    """``(trained, untrained)`` tiny Llamas (hidden size 64, ``layers`` layers) with the
    same init; the trained one has seen ``steps`` batches of ``sample(rng)`` rows
    (one-cycle lr; the loss is computed on the labelled positions only). Each step's loss
    is appended to ``losses`` when given."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    untrained = untrained_twin(config)
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
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        target = labels[:, 1:]
        keep = target != IGNORE_INDEX
        loss = F.cross_entropy(model.lm_head(hidden[:, :-1][keep]), target[keep])
        optim.zero_grad()
        loss.backward()
        optim.step()
        schedule.step()
        if losses is not None:
            losses.append(loss.item())
    return model.eval(), untrained


def niah_tokenizer(vocab_size: int = 2000):
    """:func:`copy_tokenizer` over the text of a RULER ``niah_single_1`` sample (cut into
    lines and at its key and value) and wonderwords' adjectives and nouns (RULER's keys):
    the template and a noise line are one token each, a key about 7 tokens."""
    from longlora_plugin.evaluation import ruler
    from longlora_plugin.evaluation.ruler_prompts import wordlist

    byte_level = copy_tokenizer([], vocab_size=300)
    sample = ruler.build_sample("niah_single_1", byte_level, 1200, "vocab")
    text = byte_level.decode(sample.input_ids, skip_special_tokens=True)
    key = re.search(r"for (\S+) is: ", text).group(1)
    pieces = {
        line
        for part in re.split(f"{re.escape(key)}|{sample.references[0]}", text)
        for line in part.splitlines(keepends=True)
    }
    words = wordlist("adjectivelist.txt") + wordlist("nounlist.txt")
    return copy_tokenizer(sorted(pieces) * 50 + list(words), vocab_size=vocab_size)


class NiahData:
    """Training rows for RULER's ``niah_single_1``: prompts built by ``ruler.build_sample``
    (``prompts`` seeds ``train/<i>``, lengths drawn from ``lengths``) with their 7 value
    digits (single tokens, nowhere else in the prompt) redrawn for every row, followed by
    the answer `` <value></s>``, labels on the answer only."""

    def __init__(self, tok, lengths: Sequence[int], prompts: int = 300):
        from longlora_plugin.evaluation import ruler

        self.tok = tok
        self.digits = [tok.convert_tokens_to_ids(str(d)) for d in range(10)]
        self.prompts: list[tuple[list[int], list[int]]] = []
        for i in range(prompts):
            length = random.Random(i).choice(lengths)
            try:
                ids = ruler.build_sample("niah_single_1", tok, length, f"train/{i}").input_ids
            except ValueError:  # a long key: no room for this length
                continue
            positions = [j for j, t in enumerate(ids) if t in self.digits]
            assert len(positions) == 7, positions
            self.prompts.append((ids, positions))
        self.space = tok(" ", add_special_tokens=False)["input_ids"]

    def sample(self, rng: random.Random) -> tuple[list[int], list[int]]:
        ids, positions = rng.choice(self.prompts)
        ids = list(ids)
        value = [rng.choice(self.digits) for _ in positions]
        for pos, digit in zip(positions, value, strict=True):
            ids[pos] = digit
        answer = [*self.space, *value, self.tok.eos_token_id]
        return ids + answer, [IGNORE_INDEX] * len(ids) + answer


def passkey_tokenizer():
    """The passkey texts as few tokens: the task line is one token, a filler sentence one
    or two, so prompts of 30-50 tokens already hold 10-30 filler tokens."""
    texts = [pk.TASK, pk.QUESTION, *pk.FILLER_SENTENCES, " ".join(pk.FILLER_SENTENCES)]
    return copy_tokenizer([*texts, pk.INFO.format(key="0123456789")])


class PasskeyData:
    """Training batches of real passkey prompts (``pk.build_prompt``) followed by the
    answer, labels on the answer only. Prompts are built once per (length, depth, key
    digit count) with a dummy key whose digit tokens are then replaced (digits are
    single tokens and appear nowhere else in the prompt)."""

    def __init__(self, tok, lengths: list[int], depths: list[float]):
        self.tok, self.lengths, self.depths = tok, lengths, depths
        self.digit = {str(d): tok.convert_tokens_to_ids(str(d)) for d in range(10)}
        self.templates: dict[tuple[int, float, int], list[int]] = {}

    def sample(self, rng: random.Random) -> tuple[list[int], list[int]]:
        key = str(rng.randint(*pk.KEY_RANGE))
        spec = (rng.choice(self.lengths), rng.choice(self.depths), len(key))
        if spec not in self.templates:
            self.templates[spec] = pk.build_prompt(
                self.tok, spec[0], spec[1], "1" * len(key)
            ).input_ids
        ids = list(self.templates[spec])
        positions = [i for i, t in enumerate(ids) if t in self.digit.values()]
        assert len(positions) == 2 * len(key)
        for n, pos in enumerate(positions):
            ids[pos] = self.digit[key[n % len(key)]]
        answer = self.tok(" " + key, add_special_tokens=False)["input_ids"]
        return ids + answer, [IGNORE_INDEX] * len(ids) + answer
