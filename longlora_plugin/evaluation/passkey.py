"""Passkey retrieval in the LongLoRA paper's format (from Landmark Attention).

Prompt (lines joined with ``\\n``)::

    There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. I will quiz you about the important information there.
    <filler before>
    The pass key is N. Remember it. N is the pass key.
    <filler after>
    What is the pass key? The pass key is

The filler repeats "The grass is green. The sky is blue. The sun is yellow. Here we go.
There and back again." sentence by sentence. :func:`build_prompt` chooses how many
filler sentences go before and after the key line so that the prompt (tokenized with
special tokens, i.e. with BOS when the tokenizer adds one) has ``length`` tokens and
the fraction of filler tokens before the key line is ``depth`` (0 = right after the
task line, 1 = right before the question). Filler comes in whole sentences, so both
are met within one filler sentence: ``|n_tokens - length| <= tolerance`` with
``tolerance`` = the token count of the longest filler sentence (:func:`tolerance`),
and the key line starts within ``tolerance`` tokens of the requested depth.

:func:`retrieve` decodes greedily with the KV cache (``model.generate``) exactly as
many tokens as ``" N"`` has and counts an exact match of the stripped text.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any

import torch

TASK = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and "
    "memorize them. I will quiz you about the important information there."
)
FILLER_SENTENCES: tuple[str, ...] = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)
INFO = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
KEY_RANGE: tuple[int, int] = (1, 50000)
DEFAULT_DEPTHS: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
DEFAULT_TRIALS = 10  # the paper's trials per length


@dataclass
class PasskeyPrompt:
    """A built prompt. ``key_position`` is the token index where the key line starts;
    ``depth`` the requested and ``actual_depth`` the achieved fraction of filler tokens
    before it."""

    text: str
    input_ids: list[int]
    passkey: str
    length: int
    depth: float
    key_position: int
    actual_depth: float

    @property
    def n_tokens(self) -> int:
        return len(self.input_ids)


def filler(n_sentences: int) -> str:
    """The first ``n_sentences`` filler sentences (cycling), joined by spaces."""
    return " ".join(FILLER_SENTENCES[i % len(FILLER_SENTENCES)] for i in range(n_sentences))


def compose(passkey: str, n_before: int, n_after: int) -> tuple[str, str]:
    """``(prompt, text before the key line)`` with the given filler sentence counts."""
    before = f"{TASK}\n{filler(n_before)}\n"
    return f"{before}{INFO.format(key=passkey)}\n{filler(n_after)}\n{QUESTION}", before


def tolerance(tokenizer: Any) -> int:
    """Tokens of the longest filler sentence (with its leading space): the bound on
    ``|n_tokens - length|`` and on the key position error."""
    return max(len(_encode(tokenizer, " " + s, special=False)) for s in FILLER_SENTENCES)


def min_length(tokenizer: Any, passkey: str = "50000") -> int:
    """Tokens of a prompt without filler: the shortest length that can be built."""
    return len(_encode(tokenizer, compose(passkey, 0, 0)[0]))


def build_prompt(tokenizer: Any, length: int, depth: float, passkey: str) -> PasskeyPrompt:
    """The prompt with about ``length`` tokens and the key line at ``depth`` (see the
    module docstring). Raises ``ValueError`` for a depth outside [0, 1] or a length
    shorter than the prompt without filler."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth} is outside [0, 1]")
    fixed = len(_encode(tokenizer, compose(passkey, 0, 0)[0]))
    if length < fixed:
        raise ValueError(
            f"length={length} is shorter than the prompt without filler ({fixed} tokens)"
        )
    budget = length - fixed
    # Cumulative filler tokens for n sentences (approximation; corrected below by
    # tokenizing the real prompt).
    per_sentence = [len(_encode(tokenizer, " " + s, special=False)) for s in FILLER_SENTENCES]
    cumulative = [0]
    while cumulative[-1] < budget + max(per_sentence):
        cumulative.append(cumulative[-1] + per_sentence[(len(cumulative) - 1) % len(per_sentence)])
    n_before = min(range(len(cumulative)), key=lambda n: abs(cumulative[n] - depth * budget))
    remaining = budget - cumulative[n_before]
    n_after = min(range(len(cumulative)), key=lambda n: abs(cumulative[n] - remaining))

    def count(after: int) -> int:
        return len(_encode(tokenizer, compose(passkey, n_before, after)[0]))

    n = count(n_after)
    for step in (1, -1):  # move the suffix one sentence at a time while it gets closer
        while n_after + step >= 0:
            trial = count(n_after + step)
            if abs(trial - length) >= abs(n - length):
                break
            n_after, n = n_after + step, trial
    text, before = compose(passkey, n_before, n_after)
    ids = _encode(tokenizer, text)
    key_position = len(_encode(tokenizer, before))
    start = len(_encode(tokenizer, f"{TASK}\n"))
    filler_tokens = max(1, len(ids) - fixed)
    return PasskeyPrompt(
        text=text,
        input_ids=ids,
        passkey=passkey,
        length=length,
        depth=depth,
        key_position=key_position,
        actual_depth=min(1.0, max(0.0, (key_position - start) / filler_tokens)),
    )


def trial_passkey(seed: int, length: int, depth: float, trial: int) -> str:
    """The passkey (1..50000) of one trial: deterministic in its arguments, so every
    model sees the same keys."""
    return str(random.Random(f"{seed}/{length}/{depth}/{trial}").randint(*KEY_RANGE))


@dataclass
class Retrieval:
    """One trial's outcome."""

    length: int
    depth: float
    trial: int
    passkey: str
    answer: str
    correct: bool
    n_tokens: int
    actual_depth: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.inference_mode()
def retrieve(model: Any, tokenizer: Any, prompt: PasskeyPrompt) -> tuple[str, bool]:
    """Greedy decoding (KV cache) of as many tokens as ``" " + passkey`` has;
    returns ``(stripped answer, exact match)``."""
    n_new = len(_encode(tokenizer, " " + prompt.passkey, special=False))
    device = next(model.parameters()).device
    ids = torch.tensor([prompt.input_ids], dtype=torch.long, device=device)
    from transformers import GenerationConfig

    eos = tokenizer.eos_token_id
    config = GenerationConfig(
        max_new_tokens=n_new,
        do_sample=False,
        num_beams=1,
        use_cache=True,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
    )
    out = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config
    )
    answer = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
    return answer, answer == prompt.passkey


def _encode(tokenizer: Any, text: str, *, special: bool = True) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])
