"""Text pieces of RULER prompts (:mod:`longlora_plugin.evaluation.ruler`): word lists,
random needle keys and values, sentences of a haystack text, the task template around
the haystack (optionally inside a chat template), and :func:`assemble`, which puts a
prompt together at an exact token length.
"""

from __future__ import annotations

import itertools
import random
import re
import uuid
from collections.abc import Iterator, Sequence
from functools import cache
from typing import Any

from longlora_plugin.evaluation.ruler_tasks import NeedleType


@cache
def wordlist(*names: str) -> tuple[str, ...]:
    """wonderwords' word lists (RULER's source of words), sorted and unique."""
    from importlib.resources import files

    words: set[str] = set()
    for name in names:
        words.update(files("wonderwords").joinpath("assets", name).read_text().split("\n"))
    return tuple(sorted(w.strip() for w in words if w.strip()))


def random_value(kind: NeedleType, rng: random.Random) -> str:
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))  # RULER: 7 digits
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    adjectives, nouns = wordlist("adjectivelist.txt"), wordlist("nounlist.txt")
    return f"{rng.choice(adjectives)}-{rng.choice(nouns)}"


def sentences(text: str) -> list[str]:
    """``text`` split into sentences (after ., ! or ? followed by white space)."""
    return [s for s in re.split(r"(?<=[.!?])\s+", re.sub(r"\s+", " ", text).strip()) if s]


def encode(tokenizer: Any, text: str, special: bool = False) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def assemble(
    tokenizer: Any,
    head: str,
    tail: str,
    units: Iterator[str],
    inserts: Sequence[str],
    depths: Sequence[float],
    n_prompt: int,
    sep: str,
    bos: bool = True,
) -> tuple[list[int], list[int]]:
    """``head`` (with the tokenizer's BOS unless ``bos`` is false), then haystack ``units`` with ``inserts``
    between them at ``depths`` (each unit and insert tokenized with ``sep`` after it),
    then ``tail``: exactly ``n_prompt`` tokens, the last unit cut to fit. An insert at
    depth d follows round(d * n) of the n units. Returns the ids and each insert's start
    index; raises ``ValueError`` when ``n_prompt`` is too short for the task."""
    head_ids, tail_ids = encode(tokenizer, head, special=bos), encode(tokenizer, tail)
    insert_ids = [encode(tokenizer, text + sep) for text in inserts]
    budget = n_prompt - len(head_ids) - len(tail_ids) - sum(map(len, insert_ids))
    if budget <= 0:
        fixed = n_prompt - budget
        raise ValueError(f"{n_prompt} prompt tokens: the task without haystack takes {fixed}")
    sep_ids = encode(tokenizer, sep)
    pieces: list[list[int]] = []
    used = 0
    for unit in units:
        ids = encode(tokenizer, unit + sep)
        if used + len(ids) > budget:  # cut the unit, but keep its separator
            room = budget - used
            ids = (ids[: max(0, room - len(sep_ids))] + sep_ids)[:room]
        pieces.append(ids)
        used += len(ids)
        if used == budget:
            break
    if used < budget:
        raise ValueError("the haystack text is too short for this length")
    order = sorted(range(len(inserts)), key=lambda i: depths[i])
    slots = {i: min(len(pieces), round(depths[i] * len(pieces))) for i in order}
    ids, positions = list(head_ids), [0] * len(inserts)
    pending = list(order)
    for index in range(len(pieces) + 1):
        while pending and slots[pending[0]] == index:
            positions[pending[0]] = len(ids)
            ids += insert_ids[pending.pop(0)]
        if index < len(pieces):
            ids += pieces[index]
    return ids + tail_ids, positions


def cycle(items: Sequence[str], start: int = 0) -> Iterator[str]:
    for i in itertools.count(start):
        yield items[i % len(items)]


def frame(
    template: str, prefix: str, chat: tuple[str, str] | None, **fields: Any
) -> tuple[str, str]:
    """The prompt text before and after ``{context}``: the task template, then the answer
    prefix (after the assistant turn's opening when ``chat`` = the chat template's text
    before and after the user message)."""
    head, _, tail = template.partition("{context}")
    head, tail, prefix = head.format(**fields), tail.format(**fields), prefix.format(**fields)
    if chat is None:
        return head, tail + prefix
    return chat[0] + head, tail + chat[1] + prefix.lstrip()


def chat_frame(tokenizer: Any) -> tuple[str, str]:
    """The tokenizer's chat template around one user message: (before, after), the
    latter ending where the assistant's answer starts."""
    marker = "\x00RULER\x00"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": marker}], tokenize=False, add_generation_prompt=True
    )
    before, _, after = text.partition(marker)
    return before, after


def tokens_per_unit(tokenizer: Any, units: Sequence[str], sep: str) -> float:
    """Mean tokens of a haystack unit with ``sep`` after it (over the first 50 units)."""
    sample = units[:50]
    return sum(len(encode(tokenizer, u + sep)) for u in sample) / max(1, len(sample))
