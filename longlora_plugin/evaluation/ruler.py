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
import re
import string
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Literal

Kind = Literal["niah", "variable_tracking", "common_words_extraction", "freq_words_extraction"]
Haystack = Literal["repeat", "essay", "needle"]
NeedleType = Literal["words", "numbers", "uuids"]

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
# RULER's depths: np.round(np.linspace(0, 100, num=40)) percent
DEPTHS: tuple[float, ...] = tuple(round(100 * i / 39) / 100 for i in range(40))

TEMPLATES: dict[str, tuple[str, str, int]] = {  # kind -> (template, answer prefix, budget)
    "niah": (
        "Some special magic {type_needle_v} are hidden within the following text. Make sure "
        "to memorize it. I will quiz you about the {type_needle_v} afterwards.\n{context}\n"
        "What are all the special magic {type_needle_v} for {query} mentioned in the "
        "provided text?",
        " The special magic {type_needle_v} for {query} mentioned in the provided text are",
        128,
    ),
    "variable_tracking": (
        "Memorize and track the chain(s) of variable assignment hidden in the following "
        "text.\n\n{context}\nQuestion: Find all variables that are assigned the value {query} "
        "in the text above.",
        " Answer: According to the chain(s) of variable assignment in the text above, {num_v} "
        "variables are assgined the value {query}, they are: ",
        30,
    ),
    "common_words_extraction": (
        "Below is a numbered list of words. In these words, some appear more often than "
        "others. Memorize the ones that appear most often.\n{context}\nQuestion: What are the "
        "10 most common words in the above list?",
        " Answer: The top 10 words that appear most often in the list are:",
        120,
    ),
    "freq_words_extraction": (
        "Read the following coded text and track the frequency of each coded word. Find the "
        "three most frequently appeared coded words. {context}\nQuestion: Do not provide any "
        "explanation. Please ignore the dots '....'. What are the three most frequently "
        "appeared words in the above coded text?",
        " Answer: According to the coded text above, the three most frequently appeared words are:",
        50,
    ),
}


@dataclass(frozen=True)
class Task:
    """One RULER task (``scripts/synthetic.yaml``)."""

    name: str
    kind: Kind
    haystack: Haystack = "repeat"
    key_type: NeedleType = "words"
    value_type: NeedleType = "numbers"
    num_keys: int = 1
    num_values: int = 1
    num_queries: int = 1

    @property
    def tokens_to_generate(self) -> int:
        return TEMPLATES[self.kind][2]


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("niah_single_1", "niah", "repeat"),
        Task("niah_single_2", "niah", "essay"),
        Task("niah_single_3", "niah", "essay", value_type="uuids"),
        Task("niah_multikey_1", "niah", "essay", num_keys=4),
        Task("niah_multikey_2", "niah", "needle"),
        Task("niah_multikey_3", "niah", "needle", key_type="uuids", value_type="uuids"),
        Task("niah_multivalue", "niah", "essay", num_values=4),
        Task("niah_multiquery", "niah", "essay", num_queries=4),
        Task("vt", "variable_tracking"),  # 1 chain, 4 hops
        Task("cwe", "common_words_extraction"),  # 10 words x30 among words x3
        Task("fwe", "freq_words_extraction"),  # Zipf alpha 2.0
    )
}
VT_HOPS = 4
CWE_COMMON, CWE_COMMON_REPEATS, CWE_RARE_REPEATS = 10, 30, 3
FWE_ALPHA, FWE_WORD_LENGTH = 2.0, 6


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


@cache
def _wordlist(*names: str) -> tuple[str, ...]:
    """wonderwords' word lists (RULER's source of words), sorted and unique."""
    from importlib.resources import files

    words: set[str] = set()
    for name in names:
        words.update(files("wonderwords").joinpath("assets", name).read_text().split("\n"))
    return tuple(sorted(w.strip() for w in words if w.strip()))


def _random(kind: NeedleType, rng: random.Random) -> str:
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))  # RULER: 7 digits
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    adjectives, nouns = _wordlist("adjectivelist.txt"), _wordlist("nounlist.txt")
    return f"{rng.choice(adjectives)}-{rng.choice(nouns)}"


def sentences(text: str) -> list[str]:
    """``text`` split into sentences (after ., ! or ? followed by white space)."""
    return [s for s in re.split(r"(?<=[.!?])\s+", re.sub(r"\s+", " ", text).strip()) if s]


def _encode(tokenizer: Any, text: str, special: bool = False) -> list[int]:
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
    head_ids, tail_ids = _encode(tokenizer, head, special=bos), _encode(tokenizer, tail)
    insert_ids = [_encode(tokenizer, text + sep) for text in inserts]
    budget = n_prompt - len(head_ids) - len(tail_ids) - sum(map(len, insert_ids))
    if budget <= 0:
        fixed = n_prompt - budget
        raise ValueError(f"{n_prompt} prompt tokens: the task without haystack takes {fixed}")
    sep_ids = _encode(tokenizer, sep)
    pieces: list[list[int]] = []
    used = 0
    for unit in units:
        ids = _encode(tokenizer, unit + sep)
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


def _cycle(items: Sequence[str], start: int = 0) -> Iterator[str]:
    for i in itertools.count(start):
        yield items[i % len(items)]


def _frame(
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


def max_questions(task: Task | str) -> int:
    """How many samples one haystack of ``task`` can serve (:func:`build_samples`): the
    number of keyed needles for ``niah_multikey_1``, any number when the haystack is
    made of needles, else 1."""
    task = TASKS[task] if isinstance(task, str) else task
    if task.kind != "niah" or task.num_queries > 1 or task.num_values > 1:
        return 1
    return 1_000_000 if task.haystack == "needle" else task.num_keys


def _niah_frame(task: Task, chat, query: str) -> tuple[str, str]:
    template, prefix, _ = TEMPLATES["niah"]
    value_type = task.value_type
    if task.num_queries * task.num_values == 1:  # RULER's singular wording
        template, prefix = (
            t.replace("Some", "A").replace("are all", "is").replace("are", "is")
            for t in (template, prefix)
        )
        value_type = value_type[:-1]
    return _frame(template, prefix, chat, type_needle_v=value_type, query=query)


def _keys(task: Task, tokenizer: Any, rng: random.Random, count: int, questions: int, chat):
    """``count`` random keys; with several ``questions`` the keys are drawn so that every
    question (the frame's tail, which names the key) has the same number of tokens."""
    if questions == 1:
        return [_random(task.key_type, rng) for _ in range(count)]

    def tail_tokens(key: str) -> int:
        tail = _niah_frame(task, chat, key)[1]
        return len(
            _encode(tokenizer, tail if task.haystack == "essay" else tail.removeprefix("\n"))
        )

    keys = [_random(task.key_type, rng)]
    want, tries = tail_tokens(keys[0]), 0
    while len(keys) < count:
        key = _random(task.key_type, rng)
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
    values = [[_random(value_type, rng) for _ in range(task.num_values)] for _ in keys]
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
        units, sep = _cycle(essay, rng.randrange(len(essay))), " "
        depths = list(depths or [rng.choice(DEPTHS) for _ in needles])
    else:
        if task.haystack == "repeat":
            units = _cycle([NOISE])
        else:  # distractor needles with other keys
            units = (
                NEEDLE.format(
                    type_needle_v=task.value_type,
                    key=_random(task.key_type, rng),
                    value=_random(task.value_type, rng),
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
        prefix = ids[: len(ids) - len(_encode(tokenizer, tail))]
        for query in queries[1:]:
            other = _niah_frame(task, chat, query)[1].removeprefix(strip)
            prompts.append(prefix + _encode(tokenizer, other))
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
    head, tail = _frame(template, prefix, chat, query=value, num_v=VT_HOPS + 1)
    tail = tail.removeprefix("\n")
    noise = _cycle([NOISE])
    ids, positions = assemble(
        tokenizer, head, tail, noise, chain, depths, n_prompt, "\n", chat is None
    )
    return ids, names, positions, depths


def _tokens_per_unit(tokenizer: Any, units: Sequence[str], sep: str) -> float:
    sample = units[:50]
    return sum(len(_encode(tokenizer, u + sep)) for u in sample) / max(1, len(sample))


def _common_words(tokenizer: Any, length: int, n_prompt: int, rng: random.Random, chat):
    words = list(_wordlist("nounlist.txt", "adjectivelist.txt", "verblist.txt"))
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
    shot_head, shot_tail = _frame(template, prefix, None, query="")
    shot = shot_head + " ".join(example) + shot_tail + " "
    shot += " ".join(f"{i + 1}. {w}" for i, w in enumerate(example_answer))
    head, tail = _frame(template, prefix, None, query="")
    if chat is not None:  # RULER: the example is part of the user's message
        shot, tail = chat[0] + shot, tail.removesuffix(prefix) + chat[1] + prefix.lstrip()
    # As many rare words as fill the prompt (RULER grows the list until it is full): a
    # list sized to fit, then more rare words, numbered on, up to the exact length.
    fixed = len(_encode(tokenizer, shot + "\n" + head + tail, special=chat is None))
    per_item = _tokens_per_unit(tokenizer, example, " ") + 1  # numbers grow longer
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
    n_words = 0.9 * n_prompt / _tokens_per_unit(tokenizer, ranked[1:], " ")  # fits
    zeta = sum(k**-FWE_ALPHA for k in range(1, 10_000))
    listed = [
        w for k, w in enumerate(ranked, 1) for _ in range(int(n_words * k**-FWE_ALPHA / zeta))
    ]
    rng.shuffle(listed)
    template, prefix, _ = TEMPLATES["freq_words_extraction"]
    head, tail = _frame(template, prefix, chat, query="")
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
