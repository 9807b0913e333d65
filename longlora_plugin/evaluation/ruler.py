"""RULER-style synthetic long-context tasks, generated offline at exact token lengths.

RULER (Hsieh et al., 2024; github.com/hsiehjackson/RULER) defines 13 tasks; this module
builds the 11 that need no downloaded data set (all but the two QA tasks), with RULER's
prompt templates, task parameters and scoring, from any tokenizer:

* templates and generation budgets: ``scripts/data/synthetic/constants.py``;
* the task list and parameters: ``scripts/synthetic.yaml``;
* needles, haystacks and depths: ``scripts/data/synthetic/niah.py``; variable chains:
  ``variable_tracking.py``; word lists: ``common_words_extraction.py`` and
  ``freq_words_extraction.py``;
* scoring (:mod:`longlora_plugin.evaluation.ruler_eval`):
  ``scripts/eval/synthetic/constants.py``.

Length: RULER counts the prompt plus the tokens the model may generate. Here a sample of
length N has exactly ``N - tokens_to_generate`` prompt tokens (BOS included): the prompt
is assembled from separately tokenized pieces (head, haystack units, needles, question),
and the last haystack unit is cut at the token that makes the length exact. Needles go
between haystack units at their depth (the fraction of haystack units before them); as in
RULER, each sample draws its depths from 40 evenly spaced values in [0, 1] for text
haystacks and uniformly for the others, unless ``depths`` are given.

Haystacks: ``repeat`` (RULER's noise sentences), ``needle`` (distractor needles with other
keys) and ``essay``, which RULER fills with Paul Graham's essays and this module with the
sentences of any text (``--data``).

Questions per haystack (:func:`build_samples`): where a haystack holds several keyed
needles and one of them is queried (``niah_multikey_*``), one haystack can serve several
samples, each asking about another of its keys, so that the evaluation prefills it once
(:func:`longlora_plugin.evaluation.ruler_eval.answer_all`). The queried keys are then
drawn with equally long questions (in tokens), so every sample keeps the exact length.
"""

from __future__ import annotations

import itertools
import random
import string
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from longlora_plugin.evaluation.ruler_prompts import (
    assemble,
    cycle,
    encode,
    frame,
    random_value,
    tokens_per_unit,
    wordlist,
)
from longlora_plugin.evaluation.ruler_tasks import (
    CWE_COMMON,
    CWE_COMMON_REPEATS,
    CWE_RARE_REPEATS,
    DEPTHS,
    FWE_ALPHA,
    FWE_WORD_LENGTH,
    NEEDLE,
    NOISE,
    TASKS,
    TEMPLATES,
    VT_HOPS,
    Task,
    max_questions,
)


@dataclass
class Sample:
    """A prompt of exactly ``length - tokens_to_generate`` tokens and its references.
    ``needle_positions``: token index where each inserted needle starts."""

    task: str
    length: int
    input_ids: list[int]
    references: list[str]
    tokens_to_generate: int
    needle_positions: list[int] = field(default_factory=list)
    depths: list[float] = field(default_factory=list)
    prefix_length: int = 0  # leading tokens shared with the other samples of its haystack


def _niah_frame(task: Task, chat, query: str) -> tuple[str, str]:
    template, prefix, _ = TEMPLATES["niah"]
    value_type = task.value_type
    if task.num_queries * task.num_values == 1:  # RULER's singular wording
        template, prefix = (
            t.replace("Some", "A").replace("are all", "is").replace("are", "is")
            for t in (template, prefix)
        )
        value_type = value_type[:-1]
    return frame(template, prefix, chat, type_needle_v=value_type, query=query)


def _keys(task: Task, tokenizer: Any, rng: random.Random, count: int, questions: int, chat):
    """``count`` random keys; with several ``questions`` the keys are drawn so that every
    question (the frame's tail, which names the key) has the same number of tokens."""
    if questions == 1:
        return [random_value(task.key_type, rng) for _ in range(count)]

    def tail_tokens(key: str) -> int:
        tail = _niah_frame(task, chat, key)[1]
        return len(encode(tokenizer, tail if task.haystack == "essay" else tail.removeprefix("\n")))

    keys = [random_value(task.key_type, rng)]
    want, tries = tail_tokens(keys[0]), 0
    while len(keys) < count:
        key = random_value(task.key_type, rng)
        tries += 1
        if key not in keys and tail_tokens(key) == want:
            keys.append(key)
        elif tries > 200 * count:
            raise ValueError(f"no {count} keys with equally long questions for this tokenizer")
    return keys


def _niah(
    task: Task, tokenizer: Any, n_prompt: int, rng: random.Random, essay, depths, chat, questions
):
    value_type = task.value_type
    num_keys = max(task.num_keys, task.num_queries, questions)
    keys = _keys(task, tokenizer, rng, num_keys, questions, chat)
    values = [[random_value(value_type, rng) for _ in range(task.num_values)] for _ in keys]
    needles = [
        NEEDLE.format(type_needle_v=value_type, key=k, value=v)
        for k, vs in zip(keys, values, strict=True)
        for v in vs
    ]
    rng.shuffle(needles)
    queried = rng.sample(range(num_keys), max(task.num_queries, questions))
    if questions == 1:
        names = [keys[i] for i in queried]
        queries = [names[0] if len(names) == 1 else ", ".join(names[:-1]) + ", and " + names[-1]]
        refs = [[v for i in queried for v in values[i]]]
    else:  # one question per queried key, each a sample of the task
        queries = [keys[i] for i in queried]
        refs = [list(values[i]) for i in queried]
    head, tail = _niah_frame(task, chat, queries[0])
    if task.haystack == "essay":
        if not essay:
            raise ValueError(f"{task.name}: an essay haystack needs text (--data)")
        units, sep = cycle(essay, rng.randrange(len(essay))), " "
        depths = list(depths or [rng.choice(DEPTHS) for _ in needles])
    else:
        if task.haystack == "repeat":
            units = cycle([NOISE])
        else:  # distractor needles with other keys
            units = (
                NEEDLE.format(
                    type_needle_v=task.value_type,
                    key=random_value(task.key_type, rng),
                    value=random_value(task.value_type, rng),
                )
                for _ in itertools.count()
            )
        sep, tail = "\n", tail.removeprefix("\n")
        depths = list(depths or [rng.random() for _ in needles])
    bos = chat is None
    ids, positions = assemble(tokenizer, head, tail, units, needles, depths, n_prompt, sep, bos)
    prompts = [ids]
    if questions > 1:
        strip = "\n" if task.haystack != "essay" else ""
        prefix = ids[: len(ids) - len(encode(tokenizer, tail))]
        for query in queries[1:]:
            other = _niah_frame(task, chat, query)[1].removeprefix(strip)
            prompts.append(prefix + encode(tokenizer, other))
    return prompts, refs, positions, depths


def _variable_tracking(tokenizer: Any, n_prompt: int, rng: random.Random, depths, chat):
    names: list[str] = []
    while len(names) < VT_HOPS + 1:
        name = "".join(rng.choices(string.ascii_uppercase, k=5))
        if name not in names:
            names.append(name)
    value = str(rng.randint(10000, 99999))
    chain = [f"VAR {names[0]} = {value}"]
    chain += [f"VAR {names[j + 1]} = VAR {names[j]}" for j in range(VT_HOPS)]
    depths = sorted(depths or [rng.random() for _ in chain])
    template, prefix, _ = TEMPLATES["variable_tracking"]
    head, tail = frame(template, prefix, chat, query=value, num_v=VT_HOPS + 1)
    tail = tail.removeprefix("\n")
    noise = cycle([NOISE])
    ids, positions = assemble(
        tokenizer, head, tail, noise, chain, depths, n_prompt, "\n", chat is None
    )
    return ids, names, positions, depths


def _common_words(tokenizer: Any, length: int, n_prompt: int, rng: random.Random, chat):
    words = list(wordlist("nounlist.txt", "adjectivelist.txt", "verblist.txt"))
    short = length < 4096  # RULER: max_seq_length < 4096
    common_repeats, rare_repeats = (6, 1) if short else (CWE_COMMON_REPEATS, CWE_RARE_REPEATS)

    def numbered(n_words: int, common_x: int, rare_x: int) -> tuple[list[str], list[str]]:
        chosen = rng.sample(words, n_words)
        common, rare = chosen[:CWE_COMMON], chosen[CWE_COMMON:]
        listed = common * common_x + rare * rare_x
        rng.shuffle(listed)
        return [f"{i + 1}. {w}" for i, w in enumerate(listed)], common

    example, example_answer = numbered(20, 3, 1) if short else numbered(40, 10, 3)
    template, prefix, _ = TEMPLATES["common_words_extraction"]
    shot_head, shot_tail = frame(template, prefix, None, query="")
    shot = shot_head + " ".join(example) + shot_tail + " "
    shot += " ".join(f"{i + 1}. {w}" for i, w in enumerate(example_answer))
    head, tail = frame(template, prefix, None, query="")
    if chat is not None:  # RULER: the example is part of the user's message
        shot, tail = chat[0] + shot, tail.removesuffix(prefix) + chat[1] + prefix.lstrip()
    # As many rare words as fill the prompt (RULER grows the list until it is full): a
    # list sized to fit, then more rare words, numbered on, up to the exact length.
    fixed = len(encode(tokenizer, shot + "\n" + head + tail, special=chat is None))
    per_item = tokens_per_unit(tokenizer, example, " ") + 1  # numbers grow longer
    items = (n_prompt - fixed) / per_item - CWE_COMMON * common_repeats
    if items < CWE_COMMON:
        need = fixed + int((CWE_COMMON * (common_repeats + 1)) * per_item)
        raise ValueError(f"the list of common and rare words needs about {need} prompt tokens")
    rare = min(len(words) // 2, max(1, int(items / rare_repeats)))
    listed, answer = numbered(CWE_COMMON + rare, common_repeats, rare_repeats)
    taken = {item.split(" ", 1)[1] for item in listed}
    extra = [w for w in words if w not in taken]
    rng.shuffle(extra)
    more = (f"{i}. {w}" for i, w in enumerate(extra, len(listed) + 1))
    units = itertools.chain(listed, more)
    head = shot + "\n" + head
    ids, _ = assemble(tokenizer, head, tail, units, [], [], n_prompt, " ", chat is None)
    return ids, answer


def _frequent_words(tokenizer: Any, n_prompt: int, rng: random.Random, chat):
    size = max(4, n_prompt // 50)  # RULER: vocab_size = max_seq_length // 50
    vocab: set[str] = set()
    while len(vocab) < size:
        vocab.add("".join(rng.choices(string.ascii_lowercase, k=FWE_WORD_LENGTH)))
    ranked = sorted(vocab)
    rng.shuffle(ranked)
    ranked[0] = "..."  # the most frequent "word" is noise
    n_words = 0.9 * n_prompt / tokens_per_unit(tokenizer, ranked[1:], " ")  # fits
    zeta = sum(k**-FWE_ALPHA for k in range(1, 10_000))
    listed = [
        w for k, w in enumerate(ranked, 1) for _ in range(int(n_words * k**-FWE_ALPHA / zeta))
    ]
    rng.shuffle(listed)
    template, prefix, _ = TEMPLATES["freq_words_extraction"]
    head, tail = frame(template, prefix, chat, query="")
    rare = itertools.cycle(ranked[len(ranked) // 2 :])  # the exact length: rare words
    units = itertools.chain(listed, rare)
    ids, _ = assemble(tokenizer, head, tail, units, [], [], n_prompt, " ", chat is None)
    return ids, ranked[1:4]


def build_sample(
    task: Task | str,
    tokenizer: Any,
    length: int,
    seed: int | str,
    *,
    essay: Sequence[str] = (),
    depths: Sequence[float] | None = None,
    chat: tuple[str, str] | None = None,
) -> Sample:
    """One sample of ``task`` with exactly ``length - tokens_to_generate`` prompt tokens;
    deterministic in ``(task, length, seed)`` and the tokenizer. ``essay``: the sentences
    of the essay haystack; ``depths`` overrides the needles' random depths; ``chat``
    wraps the prompt in a chat template (:func:`chat_frame`)."""
    return build_samples(task, tokenizer, length, seed, essay=essay, depths=depths, chat=chat)[0]


def build_samples(
    task: Task | str,
    tokenizer: Any,
    length: int,
    seed: int | str,
    *,
    questions: int = 1,
    essay: Sequence[str] = (),
    depths: Sequence[float] | None = None,
    chat: tuple[str, str] | None = None,
) -> list[Sample]:
    """``questions`` samples of ``task`` about one haystack, as :func:`build_sample`
    (which is the first of them with ``questions=1``): each asks about another keyed
    needle, all prompts have the same length and share their first ``prefix_length``
    tokens. ``questions`` is at most :func:`max_questions` of the task."""
    task = TASKS[task] if isinstance(task, str) else task
    if not 1 <= questions <= max_questions(task):
        raise ValueError(
            f"{task.name}: questions per haystack {questions} is not allowed; allowed: 1 to "
            f"{max_questions(task)} (several only where a haystack holds several keyed needles "
            "and one is queried)"
        )
    rng = random.Random(f"{task.name}/{length}/{seed}")
    n_prompt = length - task.tokens_to_generate
    positions: list[int] = []
    try:
        if task.kind == "niah":
            prompts, refs_each, positions, depths = _niah(
                task, tokenizer, n_prompt, rng, essay, depths, chat, questions
            )
            if questions > 1:
                shared = _shared_prefix(prompts)
                return [
                    Sample(
                        task.name,
                        length,
                        ids,
                        refs,
                        task.tokens_to_generate,
                        list(positions),
                        list(depths),
                        shared,
                    )
                    for ids, refs in zip(prompts, refs_each, strict=True)
                ]
            ids, refs = prompts[0], refs_each[0]
        elif task.kind == "variable_tracking":
            ids, refs, positions, depths = _variable_tracking(
                tokenizer, n_prompt, rng, depths, chat
            )
        elif task.kind == "common_words_extraction":
            ids, refs = _common_words(tokenizer, length, n_prompt, rng, chat)
        else:
            ids, refs = _frequent_words(tokenizer, n_prompt, rng, chat)
    except ValueError as err:
        raise ValueError(f"{task.name} at length {length}: {err}") from None
    return [
        Sample(
            task.name,
            length,
            ids,
            list(refs),
            task.tokens_to_generate,
            positions,
            list(depths or []),
        )
    ]


def _shared_prefix(prompts: Sequence[list[int]]) -> int:
    shared = min(map(len, prompts))
    for ids in prompts[1:]:
        shared = next((i for i in range(shared) if ids[i] != prompts[0][i]), shared)
    return shared


def shortest_length(
    task: Task | str, tokenizer: Any, *, limit: int = 4096, **kwargs: Any
) -> int | None:
    """The shortest length (prompt plus ``tokens_to_generate``) at which
    :func:`build_sample` can build ``task`` with ``tokenizer`` (seed ``"shortest"``), or
    None when even ``limit`` is too short. ``kwargs`` go to :func:`build_sample`."""
    task = TASKS[task] if isinstance(task, str) else task

    def fits(length: int) -> bool:
        try:
            build_sample(task, tokenizer, length, "shortest", **kwargs)
        except ValueError:
            return False
        return True

    low, high = task.tokens_to_generate + 1, limit
    if not fits(high):
        return None
    while low < high:  # the smallest length that fits
        middle = (low + high) // 2
        if fits(middle):
            high = middle
        else:
            low = middle + 1
    return high
