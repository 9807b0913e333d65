"""RULER's synthetic tasks as data: the 11 tasks that need no downloaded data set, their
prompt templates, generation budgets and parameters (RULER's
``scripts/data/synthetic/constants.py`` and ``scripts/synthetic.yaml``), and the run's
defaults. No torch, no tokenizer: the ``longlora eval ruler`` parser reads it.
:mod:`longlora_plugin.evaluation.ruler` builds the samples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

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


# the run's defaults (longlora_plugin.evaluation.ruler_eval.run, ``longlora eval ruler``)
RULER_THRESHOLD = 85.6  # Llama-2-7B's average at 4k in RULER's paper
DEFAULT_RELATIVE = 0.9
DEFAULT_SAMPLES = 5


def max_questions(task: Task | str) -> int:
    """How many samples one haystack of ``task`` can serve (:func:`build_samples`): the
    number of keyed needles for ``niah_multikey_1``, any number when the haystack is
    made of needles, else 1."""
    task = TASKS[task] if isinstance(task, str) else task
    if task.kind != "niah" or task.num_queries > 1 or task.num_values > 1:
        return 1
    return 1_000_000 if task.haystack == "needle" else task.num_keys
