"""Run the evaluations over several models and write their outputs.

Models come as an iterable of :class:`EvalModel` and are used one at a time (a lazy
iterable such as :func:`load_models` keeps one model in memory). Both the ``longlora
eval`` CLI and the plugin's end-of-training step call :func:`run_ppl`,
:func:`run_passkey` and :func:`save`.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from longlora_plugin.evaluation import passkey, perplexity, report
from longlora_plugin.evaluation.loss import DEFAULT_CHUNK_TOKENS
from longlora_plugin.evaluation.models import EvalModel, ModelSpec, load_eval_model

if TYPE_CHECKING:
    from longlora_plugin.config import LongLoRAEvalConfig

LOG = logging.getLogger("longlora_plugin")


def load_models(specs: Sequence[ModelSpec], **load_kwargs: Any) -> Iterator[EvalModel]:
    """Load ``specs`` one at a time (see :func:`load_eval_model` for ``load_kwargs``)."""
    for spec in specs:
        yield load_eval_model(spec, **load_kwargs)


def progress_bar(desc: str, total: int, unit: str, progress: bool) -> tqdm:
    """The progress bar of one model's evaluation (``progress`` false: none shown)."""
    return tqdm(total=total, desc=desc, unit=unit, disable=not progress)


def release() -> None:
    """Free the memory of a model that is no longer used."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_ppl(
    models: Iterable[EvalModel],
    docs: Sequence[str],
    *,
    lengths: Sequence[int],
    conventions: Sequence[str] = tuple(perplexity.CONVENTIONS),
    stride: int = perplexity.DEFAULT_STRIDE,
    max_windows: int | None = perplexity.DEFAULT_MAX_WINDOWS,
    batch_size: int = 1,
    chunk_tokens: int | None = DEFAULT_CHUNK_TOKENS,
    data: str = "",
    progress: bool = True,
) -> dict[str, Any]:
    """Perplexity of every model at every length in every convention; returns the
    payload described in :mod:`longlora_plugin.evaluation.report`."""
    for convention in conventions:
        if convention not in perplexity.CONVENTIONS:
            raise ValueError(
                f"convention={convention!r}; allowed: {', '.join(perplexity.CONVENTIONS)}"
            )
    infos: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    for item in models:
        infos.append(item.info())
        tok = item.tokenizer
        stream = documents = None  # tokenized once per model, shared by all lengths
        if perplexity.WINDOW_MEAN in conventions:
            stream = torch.tensor(perplexity.token_stream(tok, docs), dtype=torch.long)
        if perplexity.SLIDING_WINDOW in conventions:
            documents = [
                torch.tensor(d, dtype=torch.long) for d in perplexity.tokenize_documents(tok, docs)
            ]
        plans = [
            perplexity.build_windows(
                tok,
                docs,
                convention=convention,
                length=length,
                stride=stride,
                max_windows=max_windows,
                stream=stream,
                documents=documents,
            )
            for convention in conventions
            for length in sorted(lengths)
        ]
        bar = progress_bar(
            f"ppl {item.name}", sum(len(p.windows) for p in plans), "window", progress
        )
        for plan in plans:
            bar.set_postfix_str(f"{plan.convention} L={plan.length}")
            result = perplexity.evaluate(
                item.model,
                plan,
                batch_size=batch_size,
                chunk_tokens=chunk_tokens,
                on_batch=bar.update,
            )
            results.append({"model": item.name, **result.to_dict()})
        bar.close()
        del item, plans
        release()
    return {
        "evaluation": "perplexity",
        "conventions": {c: perplexity.CONVENTIONS[c] for c in conventions},
        "settings": {
            "data": data,
            "documents": len(docs),
            "lengths": sorted(lengths),
            "stride": stride,
            "max_windows": max_windows,
            "batch_size": batch_size,
            "loss_chunk_tokens": chunk_tokens,
            "attention": "full",
        },
        "models": infos,
        "results": results,
    }


def run_passkey(
    models: Iterable[EvalModel],
    *,
    lengths: Sequence[int],
    depths: Sequence[float] = passkey.DEFAULT_DEPTHS,
    trials: int = passkey.DEFAULT_TRIALS,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Passkey retrieval of every model at every (length, depth), ``trials`` keys each;
    returns the payload described in :mod:`longlora_plugin.evaluation.report`.
    Lengths too short for the prompt are skipped with a warning."""
    infos: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    records: list[dict[str, Any]] = []
    skipped: dict[str, list[int]] = {}
    for item in models:
        infos.append(item.info())
        shortest = passkey.min_length(item.tokenizer)
        usable = [n for n in sorted(lengths) if n >= shortest]
        for n in sorted(set(lengths) - set(usable)):
            skipped.setdefault(item.name, []).append(n)
            LOG.warning(
                "longlora eval: passkey length %d < %d tokens (prompt without filler): skipped",
                n,
                shortest,
            )
        bar = progress_bar(
            f"passkey {item.name}", len(usable) * len(depths) * trials, "trial", progress
        )
        for length in usable:
            for depth in depths:
                correct = 0
                for trial in range(trials):
                    key = passkey.trial_passkey(seed, length, depth, trial)
                    prompt = passkey.build_prompt(item.tokenizer, length, depth, key)
                    answer, ok = passkey.retrieve(item.model, item.tokenizer, prompt)
                    correct += ok
                    record = passkey.Retrieval(
                        length, depth, trial, key, answer, ok, prompt.n_tokens, prompt.actual_depth
                    )
                    records.append({"model": item.name, **record.to_dict()})
                    bar.update(1)
                results.append(
                    {
                        "model": item.name,
                        "length": length,
                        "depth": depth,
                        "correct": correct,
                        "trials": trials,
                        "accuracy": correct / trials,
                    }
                )
        bar.close()
        del item
        release()
    return {
        "evaluation": "passkey",
        "settings": {
            "lengths": sorted(lengths),
            "depths": list(depths),
            "trials": trials,
            "seed": seed,
            "decoding": "greedy, KV cache, len(' N') new tokens, exact match",
            "attention": "full",
        },
        "models": infos,
        "results": results,
        "trials": records,
        "skipped_lengths": skipped,
    }


def save(
    payload: dict[str, Any], out_dir: str | Path, echo: Callable[[str], None] | None = print
) -> dict[str, Path]:
    """Write ``<kind>.json``, ``<kind>.md`` and ``<kind>.png`` into ``out_dir`` (kind
    ``ppl``, ``passkey`` or ``ruler``); pass the markdown table to ``echo`` (stdout by
    default)."""
    out = Path(out_dir)
    if payload["evaluation"] == "perplexity":
        stem, table, plot = "ppl", report.ppl_table(payload), report.plot_ppl
    elif payload["evaluation"] == "ruler":
        stem, table, plot = "ruler", report.ruler_table(payload), report.plot_ruler
    else:
        stem, table, plot = "passkey", report.passkey_table(payload), report.plot_passkey
    paths = {
        "json": report.write_json(out / f"{stem}.json", payload),
        "png": plot(payload, out / f"{stem}.png"),
    }
    paths["md"] = out / f"{stem}.md"
    paths["md"].write_text(table, encoding="utf-8")
    if echo is not None:
        echo(table)
    return paths


def evaluate_trained(
    model: Any,
    tokenizer: Any,
    out_dir: str | Path,
    spec: LongLoRAEvalConfig,
    *,
    name: str = "trained",
    original_length: int | None = None,
    trained_length: int | None = None,
    echo: Callable[[str], None] | None = print,
) -> dict[str, dict[str, Path]]:
    """Evaluate an in-memory model as ``spec`` (a ``longlora.eval`` block) says: the
    end-of-training step. Full attention, ``eval()`` mode during the evaluation (the
    previous mode is restored). Writes ``ppl.*`` when ``spec.ppl_lengths`` is set and
    ``passkey.*`` when ``spec.passkey_lengths`` is set into ``out_dir``; returns the
    written paths by kind."""
    from longlora_plugin.evaluation.models import from_loaded
    from longlora_plugin.evaluation.texts import load_texts

    was_training = bool(getattr(model, "training", False))
    item = from_loaded(
        name,
        model,
        tokenizer,
        path=str(out_dir),
        original_length=original_length,
        trained_length=trained_length,
    )
    written: dict[str, dict[str, Path]] = {}
    try:
        if spec.ppl_lengths:
            docs = load_texts(
                str(spec.data), text_field=spec.text_field, split=spec.split, max_docs=spec.max_docs
            )
            payload = run_ppl(
                [item],
                docs,
                lengths=spec.ppl_lengths,
                conventions=spec.conventions,
                stride=spec.stride,
                max_windows=spec.max_windows,
                batch_size=spec.batch_size,
                data=str(spec.data),
            )
            written["ppl"] = save(payload, out_dir, echo=echo)
        if spec.passkey_lengths:
            payload = run_passkey(
                [item],
                lengths=spec.passkey_lengths,
                depths=spec.passkey_depths,
                trials=spec.passkey_trials,
                seed=spec.seed,
            )
            written["passkey"] = save(payload, out_dir, echo=echo)
    finally:
        model.train(was_training)
    return written
