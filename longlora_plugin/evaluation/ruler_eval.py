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
  model's own average at its original context (the longest tested length within it);
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
from tqdm.auto import tqdm

from longlora_plugin.evaluation import ruler
from longlora_plugin.evaluation.models import EvalModel
from longlora_plugin.evaluation.ruler import Sample
from longlora_plugin.evaluation.runner import release

LOG = logging.getLogger("longlora_plugin")
RULER_THRESHOLD = 85.6  # Llama-2-7B's average at 4k in RULER's paper
DEFAULT_RELATIVE = 0.9
DEFAULT_SAMPLES = 5


def string_match_all(prediction: str, references: Sequence[str]) -> float:
    """RULER's per-sample score: the percentage of ``references`` found in
    ``prediction`` (case-insensitive)."""
    text = prediction.lower()
    return 100.0 * sum(r.lower() in text for r in references) / len(references)


@dataclass
class Answer:
    """A sample's greedy answer, its score and timings."""

    text: str
    score: float
    prefill_tokens: int
    prefill_seconds: float
    decode_seconds: float
    new_tokens: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.inference_mode()
def answer(model: Any, tokenizer: Any, sample: Sample) -> Answer:
    """Greedy decoding with the KV cache: one prefill of the prompt, then up to
    ``tokens_to_generate`` tokens (stopping at EOS); scored with :func:`string_match_all`."""
    device = next(model.parameters()).device
    ids = torch.tensor([sample.input_ids], dtype=torch.long, device=device)
    start = time.perf_counter()
    out = model(input_ids=ids, use_cache=True)
    prefill = time.perf_counter() - start
    eos = {tokenizer.eos_token_id} - {None}
    generated: list[int] = []
    start = time.perf_counter()
    token = out.logits[0, -1].argmax()
    while len(generated) < sample.tokens_to_generate and int(token) not in eos:
        generated.append(int(token))
        out = model(input_ids=token.view(1, 1), past_key_values=out.past_key_values, use_cache=True)
        token = out.logits[0, -1].argmax()
    decode = time.perf_counter() - start
    text = tokenizer.decode(generated, skip_special_tokens=True)
    score = string_match_all(text, sample.references)
    return Answer(text, score, len(sample.input_ids), prefill, decode, len(generated))


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
        summary[info["name"]] = {
            "average": average,
            "effective_length": effective_length(average, threshold),
            "relative_threshold": None if own is None else relative * own,
            "relative_effective_length": (
                None if own is None else effective_length(average, relative * own)
            ),
            "original_length_tested": at,
            "score_at_original": own,
            "base_score_at_original": base_average.get(at) if at is not None else None,
        }
    return summary


def run(
    models: Iterable[EvalModel],
    *,
    lengths: Sequence[int],
    tasks: Sequence[str] = tuple(ruler.TASKS),
    samples: int = DEFAULT_SAMPLES,
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
    built at that length (prompt too short, no essay text) is skipped with a warning."""
    unknown = [t for t in tasks if t not in ruler.TASKS]
    if unknown:
        raise ValueError(f"unknown RULER tasks {unknown}; allowed: {', '.join(ruler.TASKS)}")
    infos: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    records: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    for item in models:
        infos.append(item.info())
        chat = ruler.chat_frame(item.tokenizer) if chat_template else None
        bar = tqdm(
            total=len(tasks) * len(lengths) * samples,
            desc=f"ruler {item.name}",
            unit="sample",
            disable=not progress,
        )
        for task in tasks:
            for length in sorted(lengths):
                bar.set_postfix_str(f"{task} L={length}")
                try:
                    built = [
                        ruler.build_sample(
                            task, item.tokenizer, length, f"{seed}/{i}", essay=essay, chat=chat
                        )
                        for i in range(samples)
                    ]
                except ValueError as err:
                    LOG.warning("longlora eval ruler: %s: skipped", err)
                    skipped.append({"model": item.name, "task": task, "length": length})
                    bar.update(samples)
                    continue
                answers = []
                for sample in built:
                    answers.append(answer(item.model, item.tokenizer, sample))
                    records.append(
                        {
                            "model": item.name,
                            "task": task,
                            "length": length,
                            "references": sample.references,
                            "depths": sample.depths,
                            **answers[-1].to_dict(),
                        }
                    )
                    bar.update(1)
                prefill_s = sum(a.prefill_seconds for a in answers)
                results.append(
                    {
                        "model": item.name,
                        "task": task,
                        "length": length,
                        "score": sum(a.score for a in answers) / len(answers),
                        "samples": len(answers),
                        "prefill_tokens_per_s": sum(a.prefill_tokens for a in answers) / prefill_s,
                        "seconds": prefill_s + sum(a.decode_seconds for a in answers),
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
