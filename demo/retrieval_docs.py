"""Retrieval documents for the demo's training mix: passkey prompts and RULER niah prompts
with their answers, so that the base model learns to retrieve inside its own context and
LongLoRA keeps the same mix at the longer one.

* passkey: the evaluation's prompt (:mod:`longlora_plugin.evaluation.passkey`: task line,
  grass filler, key line, question) followed by `` <key>.``; the key and the filler
  before/after the key line are drawn from ``random.Random("train/passkey/<i>")``;
* niah: RULER's ``niah_single_1`` (:mod:`longlora_plugin.evaluation.ruler`) built with seed
  ``train/niah/<i>``, followed by the needle's value.

The evaluation draws its keys from seeds ``0/...`` (passkey ``trial_passkey(0, ...)``,
RULER ``0/<i>``): no evaluation prompt is a training document. Lengths are uniform
between the shortest prompt and the row length, so every depth and every length up to
the row is seen.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from longlora_plugin.evaluation import passkey as pk
from longlora_plugin.evaluation import ruler

NIAH_TASK = "niah_single_1"


def passkey_docs(tokenizer: Any, max_tokens: int, count: int) -> Iterator[tuple[str, str]]:
    """``count`` passkey documents ``(prompt, answer)`` of at most about ``max_tokens``
    tokens in all."""
    shortest = pk.min_length(tokenizer) + 8  # the key and the answer
    per_sentence = sum(
        len(tokenizer(" " + s, add_special_tokens=False)["input_ids"]) for s in pk.FILLER_SENTENCES
    ) / len(pk.FILLER_SENTENCES)
    for i in range(count):
        rng = random.Random(f"train/passkey/{i}")
        key = str(rng.randint(*pk.KEY_RANGE))
        sentences = int(rng.uniform(0, max(0, max_tokens - shortest)) / per_sentence)
        before = rng.randint(0, sentences)
        prompt, _ = pk.compose(key, before, sentences - before)
        yield prompt, f" {key}."


def niah_docs(tokenizer: Any, max_tokens: int, count: int) -> Iterator[tuple[str, str]]:
    """``count`` RULER ``niah_single_1`` documents ``(prompt, answer)`` of at most
    ``max_tokens`` prompt tokens."""
    budget = ruler.TASKS[NIAH_TASK].tokens_to_generate
    shortest = ruler.shortest_length(NIAH_TASK, tokenizer, limit=max_tokens + budget)
    if shortest is None:
        return
    made, i = 0, 0
    while made < count:
        i += 1
        length = random.Random(f"train/niah-length/{i}").randint(shortest, max_tokens + budget)
        try:
            sample = ruler.build_sample(NIAH_TASK, tokenizer, length, f"train/niah/{i}")
        except ValueError:  # this seed's key is longer than the shortest one: no haystack left
            continue
        made += 1
        prompt = tokenizer.decode(sample.input_ids, skip_special_tokens=True)
        yield prompt, f" {sample.references[0]}."


def write_mix(
    novels: Path, tokenizer: Any, max_tokens: int, share: float, out: Path
) -> dict[str, int]:
    """Write ``out`` (jsonl for Axolotl's ``input_output`` type): retrieval documents, half
    passkey, half niah, as many as make up ``share`` of the rows next to the novel
    documents of ``novels`` once Axolotl has cut those into ``max_tokens`` pieces. Only the
    answer is labelled, as in pre-training (:mod:`demo.pretrain`): the key's first
    occurrence cannot be predicted, and training on it teaches the digits' prior instead of
    the copy. Returns the counts."""
    novel_docs = [json.loads(line)["text"] for line in novels.read_text().splitlines()]
    novel_rows = sum(
        -(-len(tokenizer(d, add_special_tokens=False)["input_ids"]) // max_tokens)
        for d in novel_docs
    )
    n_retrieval = round(novel_rows * share / (1 - share))
    docs = [
        *passkey_docs(tokenizer, max_tokens, n_retrieval // 2),
        *niah_docs(tokenizer, max_tokens, n_retrieval - n_retrieval // 2),
    ]
    bos = tokenizer.bos_token or ""
    with out.open("w", encoding="utf-8") as fh:
        for prompt, answer in docs:
            segments = [{"text": bos + prompt, "label": False}, {"text": answer, "label": True}]
            fh.write(json.dumps({"segments": segments}) + "\n")
    return {"novel_rows": novel_rows, "retrieval_documents": len(docs)}
