"""Answering and scoring RULER samples (:mod:`longlora_plugin.evaluation.ruler`), the run
over models, tasks and lengths (:func:`run`), and what it reports: scores per task and length, the average over tasks, the effective
length and the regression line.

Definitions, as in RULER (github.com/hsiehjackson/RULER):

* a sample's score is ``string_match_all`` (``scripts/eval/synthetic/constants.py``):
  the percentage of its reference strings found in the answer, case-insensitive; a cell
  (task, length) averages its samples, and a length's average is the mean over tasks;
* the **effective length** is the longest tested length up to which every tested length
  averages at least the threshold. RULER's threshold is Llama-2-7B's average at 4k,
  85.6 (``--threshold``); the relative rule takes a fraction (``--relative``, 0.9) of the
  model's own average at its original context (the longest tested length within it),
  and does not apply to a model that averages 0 there;
* the **regression line** sets each model's average at its original context next to the
  base model's at the same length (the first model of kind ``model``): extending the
  context must not cost short-context quality.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from longlora_plugin.evaluation import ruler, ruler_tasks
from longlora_plugin.evaluation.models import EvalModel
from longlora_plugin.evaluation.ruler import Sample
from longlora_plugin.evaluation.ruler_prompts import chat_frame
from longlora_plugin.evaluation.ruler_tasks import (
    DEFAULT_RELATIVE,
    DEFAULT_SAMPLES,
    RULER_THRESHOLD,
)
from longlora_plugin.evaluation.runner import progress_bar, release

LOG = logging.getLogger("longlora_plugin")


def string_match_all(prediction: str, references: Sequence[str]) -> float:
    """RULER's per-sample score: the percentage of ``references`` found in
    ``prediction`` (case-insensitive)."""
    text = prediction.lower()
    return 100.0 * sum(r.lower() in text for r in references) / len(references)


@dataclass
class Answer:
    """A sample's greedy answer, its score and timings. ``prefill_tokens`` counts the
    tokens this answer ran through the model before decoding (the whole prompt, or only
    its question when the haystack's prefill was reused)."""

    text: str
    score: float
    prefill_tokens: int
    prefill_seconds: float
    decode_seconds: float
    new_tokens: int
    prompt_tokens: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _greedy(model: Any, tokenizer: Any, out: Any, sample: Sample) -> tuple[str, int, float]:
    """Greedy continuation of the forward output ``out`` (its cache holds the prompt):
    up to ``tokens_to_generate`` tokens, stopping at EOS."""
    eos = {tokenizer.eos_token_id} - {None}
    generated: list[int] = []
    start = time.perf_counter()
    token = out.logits[0, -1].argmax()
    while len(generated) < sample.tokens_to_generate and int(token) not in eos:
        generated.append(int(token))
        out = model(input_ids=token.view(1, 1), past_key_values=out.past_key_values, use_cache=True)
        token = out.logits[0, -1].argmax()
    seconds = time.perf_counter() - start
    return tokenizer.decode(generated, skip_special_tokens=True), len(generated), seconds


def _ids(model: Any, ids: Sequence[int]) -> torch.Tensor:
    return torch.tensor([list(ids)], dtype=torch.long, device=next(model.parameters()).device)


@torch.inference_mode()
def answer(model: Any, tokenizer: Any, sample: Sample) -> Answer:
    """Greedy decoding with the KV cache: one prefill of the prompt (logits of its last
    token only), then up to ``tokens_to_generate`` tokens (stopping at EOS); scored with
    :func:`string_match_all`."""
    start = time.perf_counter()
    out = model(input_ids=_ids(model, sample.input_ids), use_cache=True, logits_to_keep=1)
    prefill = time.perf_counter() - start
    text, new, decode = _greedy(model, tokenizer, out, sample)
    n = len(sample.input_ids)
    return Answer(text, string_match_all(text, sample.references), n, prefill, decode, new, n)


@torch.inference_mode()
def answer_all(model: Any, tokenizer: Any, samples: Sequence[Sample]) -> list[Answer]:
    """:func:`answer` for samples about one haystack (:func:`ruler.build_samples`): their
    shared ``prefix_length`` tokens are prefilled once, then each sample's own tokens
    continue from that cache, which is cut back to the prefix after each answer. Greedy
    answers equal those of :func:`answer` up to floating-point summation order."""
    shared = min(s.prefix_length for s in samples)
    if len(samples) == 1 or shared == 0:
        return [answer(model, tokenizer, s) for s in samples]
    start = time.perf_counter()
    prefix = _ids(model, samples[0].input_ids[:shared])
    cache = model(input_ids=prefix, use_cache=True, logits_to_keep=1).past_key_values
    shared_seconds = time.perf_counter() - start
    answers = []
    for n, sample in enumerate(samples):
        start = time.perf_counter()
        ids = _ids(model, sample.input_ids[shared:])
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        prefill = time.perf_counter() - start + (shared_seconds if n == 0 else 0.0)
        text, new, decode = _greedy(model, tokenizer, out, sample)
        computed = len(sample.input_ids) - shared + (shared if n == 0 else 0)
        score = string_match_all(text, sample.references)
        answers.append(Answer(text, score, computed, prefill, decode, new, len(sample.input_ids)))
        cache.crop(shared - cache.get_seq_length())  # negative: drop the question and answer
    return answers


def averages(results: Sequence[dict[str, Any]], model: str) -> dict[int, float]:
    """Length -> mean score over the tasks that ``model`` was scored on."""
    by_length: dict[int, list[float]] = {}
    for row in results:
        if row["model"] == model:
            by_length.setdefault(row["length"], []).append(row["score"])
    return {n: sum(v) / len(v) for n, v in sorted(by_length.items())}


def effective_length(average: dict[int, float], threshold: float) -> int | None:
    """The longest length up to which every tested length averages >= ``threshold``
    (None when the shortest does not)."""
    longest = None
    for length, score in sorted(average.items()):
        if score < threshold:
            break
        longest = length
    return longest


def reference_length(average: dict[int, float], original: int | None) -> int | None:
    """The longest tested length within the model's original context."""
    within = [n for n in average if original is None or n <= original]
    return max(within) if within else None


def summarize(
    payload_models: Sequence[dict[str, Any]],
    results: Sequence[dict[str, Any]],
    threshold: float,
    relative: float,
) -> dict[str, Any]:
    """Per model: its averages, both effective lengths and the regression line."""
    base = next((m for m in payload_models if m["kind"] == "model"), None)
    base_average = averages(results, base["name"]) if base else {}
    summary: dict[str, Any] = {}
    for info in payload_models:
        average = averages(results, info["name"])
        at = reference_length(average, info.get("original_length"))
        own = average.get(at) if at is not None else None
        # a model that scores 0 at its own context has nothing to be relative to
        rule = relative * own if own else None
        summary[info["name"]] = {
            "average": average,
            "effective_length": effective_length(average, threshold),
            "relative_threshold": rule,
            "relative_effective_length": None if rule is None else effective_length(average, rule),
            "original_length_tested": at,
            "score_at_original": own,
            "base_score_at_original": base_average.get(at) if at is not None else None,
        }
    return summary


def run(
    models: Iterable[EvalModel],
    *,
    lengths: Sequence[int],
    tasks: Sequence[str] = tuple(ruler_tasks.TASKS),
    samples: int = DEFAULT_SAMPLES,
    questions_per_haystack: int = 1,
    seed: int = 0,
    essay: Sequence[str] = (),
    data: str = "",
    chat_template: bool = False,
    threshold: float = RULER_THRESHOLD,
    relative: float = DEFAULT_RELATIVE,
    progress: bool = True,
) -> dict[str, Any]:
    """RULER tasks x lengths for every model, ``samples`` samples per cell (the same
    samples for every model with the same tokenizer); returns the ``ruler`` payload
    described in :mod:`longlora_plugin.evaluation.report`. A cell whose task cannot be
    built at that length (prompt too short, no essay text) is skipped with a warning.
    ``questions_per_haystack`` > 1: tasks that allow it (:func:`ruler_tasks.max_questions`) ask
    up to that many questions about each haystack and prefill it once (:func:`answer_all`)."""
    unknown = [t for t in tasks if t not in ruler_tasks.TASKS]
    if unknown:
        raise ValueError(f"unknown RULER tasks {unknown}; allowed: {', '.join(ruler_tasks.TASKS)}")
    if questions_per_haystack < 1:
        raise ValueError(f"questions_per_haystack must be >= 1, got {questions_per_haystack}")
    infos: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    records: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    for item in models:
        infos.append(item.info())
        chat = chat_frame(item.tokenizer) if chat_template else None
        bar = progress_bar(
            f"ruler {item.name}", len(tasks) * len(lengths) * samples, "sample", progress
        )
        for task in tasks:
            for length in sorted(lengths):
                bar.set_postfix_str(f"{task} L={length}")
                per = min(questions_per_haystack, ruler_tasks.max_questions(task), samples)
                built_at = time.perf_counter()
                try:
                    groups = [
                        ruler.build_samples(
                            task,
                            item.tokenizer,
                            length,
                            f"{seed}/{i}",
                            questions=min(per, samples - i * per),
                            essay=essay,
                            chat=chat,
                        )
                        for i in range(-(-samples // per))
                    ]
                except ValueError as err:
                    LOG.warning("longlora eval ruler: %s: skipped", err)
                    skipped.append({"model": item.name, "task": task, "length": length})
                    bar.update(samples)
                    continue
                build_s = time.perf_counter() - built_at
                answers = []
                for group in groups:
                    for sample, got in zip(
                        group, answer_all(item.model, item.tokenizer, group), strict=True
                    ):
                        answers.append(got)
                        records.append(
                            {
                                "model": item.name,
                                "task": task,
                                "length": length,
                                "references": sample.references,
                                "depths": sample.depths,
                                **got.to_dict(),
                            }
                        )
                        bar.update(1)
                prefill_s = sum(a.prefill_seconds for a in answers)
                decode_s = sum(a.decode_seconds for a in answers)
                results.append(
                    {
                        "model": item.name,
                        "task": task,
                        "length": length,
                        "score": sum(a.score for a in answers) / len(answers),
                        "samples": len(answers),
                        "haystacks": len(groups),
                        "prefill_tokens_per_s": sum(a.prefill_tokens for a in answers) / prefill_s,
                        "prompt_tokens_per_s": sum(a.prompt_tokens for a in answers) / prefill_s,
                        "prefill_seconds": prefill_s,
                        "decode_seconds": decode_s,
                        "build_seconds": build_s,
                        "seconds": prefill_s + decode_s + build_s,
                    }
                )
        bar.close()
        del item
        release()
    return {
        "evaluation": "ruler",
        "settings": {
            "tasks": list(tasks),
            "lengths": sorted(lengths),
            "samples": samples,
            "questions_per_haystack": questions_per_haystack,
            "seed": seed,
            "essay_data": data or None,
            "chat_template": chat_template,
            "threshold": threshold,
            "relative": relative,
            "decoding": "greedy, KV cache, up to RULER's tokens_to_generate, stop at EOS",
            "scoring": "string_match_all (RULER), percent",
            "attention": "full",
        },
        "models": infos,
        "results": results,
        "summary": summarize(infos, results, threshold, relative),
        "samples": records,
        "skipped": skipped,
    }
