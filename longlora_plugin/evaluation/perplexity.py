"""Perplexity at a given context length, in two conventions (always say which).

``window-mean`` (the LongLoRA paper's): all documents are tokenized without special
tokens and joined into one stream, an EOS token after each document. Windows of
``length`` input tokens start every ``stride`` tokens (0, stride, 2*stride, ... while
``start + length + 1 <= len(stream)``); every token of a window is scored (its
``length`` next-token predictions), windows cross document boundaries and carry no
BOS. Perplexity = ``exp(mean over windows of the window's mean loss)``.

``sliding-window`` (YaRN-style, after Hugging Face's "perplexity of fixed-length
models"): per document, ``[BOS] + tokens``; windows of at most ``length`` tokens start
every ``min(stride, length)`` tokens and stop at the window that reaches the end; each
window scores only the tokens no earlier window scored (the rest is context), so every
token of the document except BOS is scored exactly once. Only documents of at least
``length`` tokens (BOS included) are used, so each of them is evaluated with up to
``length`` tokens of context. Perplexity = ``exp(total loss / scored tokens)``.

``max_windows`` caps the windows evaluated per length: window-mean takes that many
evenly spaced windows of the stream; sliding-window takes documents in order and stops
after that many windows (the last document may be scored only in part). Its defaults are
decided here, once, and differ by design: ``longlora eval ppl`` is the measurement and
scores every window unless told otherwise (:data:`DEFAULT_MAX_WINDOWS`); the
``longlora.eval`` block runs at the end of ``axolotl train``, on the training machine's
time, so it takes a bounded, evenly spaced sample (:data:`TRAINING_MAX_WINDOWS`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

import torch

from longlora_plugin.evaluation.loss import DEFAULT_CHUNK_TOKENS, IGNORE_INDEX, token_nll

Convention = Literal["window-mean", "sliding-window"]
WINDOW_MEAN, SLIDING_WINDOW = get_args(Convention)
CONVENTIONS: dict[str, str] = {
    WINDOW_MEAN: (
        "LongLoRA paper: flat token stream (documents joined with EOS, no BOS), windows of "
        "L tokens every `stride` tokens, every token scored, ppl = exp(mean window loss)"
    ),
    SLIDING_WINDOW: (
        "YaRN-style: per document with BOS, windows of at most L tokens every "
        "min(stride, L) tokens, only newly revealed tokens scored, documents >= L tokens, "
        "ppl = exp(total loss / scored tokens)"
    ),
}
DEFAULT_STRIDE = 256
DEFAULT_MAX_WINDOWS: int | None = None  # longlora eval ppl: every window
TRAINING_MAX_WINDOWS = 32  # longlora.eval.max_windows: a sample, after training


@dataclass
class PerplexityResult:
    """One (convention, length) measurement. ``ppl`` is ``None`` when no window fits."""

    convention: str
    length: int
    ppl: float | None
    mean_nll: float | None
    windows: int
    documents: int
    scored_tokens: int
    input_tokens: int
    seconds: float
    tokens_per_s: float
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Window:
    """One model input ``ids[begin:end]`` of token sequence ``sequence``. Input position
    ``p`` predicts ``ids[p + 1]``; the targets ``ids[j]`` with
    ``first_scored <= j < stop_scored`` are scored (``begin < first_scored``,
    ``stop_scored <= end + 1``), the other positions are context only."""

    sequence: int
    begin: int
    end: int
    first_scored: int
    stop_scored: int


@dataclass
class Windows:
    """The token sequences of one evaluation (``[stream]`` or one per used document, as
    int64 tensors) and the windows over them."""

    convention: str
    length: int
    sequences: list[torch.Tensor]
    windows: list[Window]
    documents: int

    def inputs(self, batch: Sequence[Window]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, targets)`` of a batch of equal-length windows."""
        ids, targets = [], []
        for w in batch:
            seq = self.sequences[w.sequence]
            ids.append(seq[w.begin : w.end])
            target = torch.full((w.end - w.begin,), IGNORE_INDEX, dtype=torch.long)
            first, stop = w.first_scored, w.stop_scored
            target[first - 1 - w.begin : stop - 1 - w.begin] = seq[first:stop]
            targets.append(target)
        return torch.stack(ids), torch.stack(targets)


def token_stream(tokenizer: Any, docs: Sequence[str]) -> list[int]:
    """Documents tokenized without special tokens, each followed by EOS (if the
    tokenizer has one), concatenated."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for doc in docs:
        stream.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        if eos is not None:
            stream.append(eos)
    return stream


def tokenize_documents(tokenizer: Any, docs: Sequence[str]) -> list[list[int]]:
    """Each document as ``[BOS] + tokens`` (no BOS if the tokenizer has none)."""
    bos = tokenizer.bos_token_id
    prefix = [bos] if bos is not None else []
    return [prefix + tokenizer(doc, add_special_tokens=False)["input_ids"] for doc in docs]


def window_mean_starts(
    n_tokens: int,
    length: int,
    stride: int = DEFAULT_STRIDE,
    max_windows: int | None = DEFAULT_MAX_WINDOWS,
) -> list[int]:
    """Window starts of the window-mean convention for a stream of ``n_tokens``: every
    ``stride`` tokens while ``start + length + 1 <= n_tokens``; with ``max_windows``,
    that many evenly spaced ones (first and last kept)."""
    if length < 1 or stride < 1:
        raise ValueError(f"length={length} and stride={stride} must be >= 1")
    starts = list(range(0, max(0, n_tokens - length), stride))
    if max_windows is not None and len(starts) > max_windows:
        if max_windows == 1:
            return starts[:1]
        last = len(starts) - 1
        picks = sorted({round(i * last / (max_windows - 1)) for i in range(max_windows)})
        starts = [starts[i] for i in picks]
    return starts


def sliding_spans(n_tokens: int, length: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, n_new)`` for the sliding-window convention over a document of
    ``n_tokens`` (BOS included): windows ``ids[begin:end]`` whose last ``n_new``
    positions are newly revealed. ``stride`` is capped at ``length``."""
    stride = min(stride, length)
    spans: list[tuple[int, int, int]] = []
    prev_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + length, n_tokens)
        spans.append((begin, end, end - prev_end))
        prev_end = end
        if end == n_tokens:
            break
    return spans


def build_windows(
    tokenizer: Any,
    docs: Sequence[str],
    *,
    convention: str,
    length: int,
    stride: int = DEFAULT_STRIDE,
    max_windows: int | None = DEFAULT_MAX_WINDOWS,
    stream: Sequence[int] | None = None,
    documents: Sequence[Sequence[int]] | None = None,
) -> Windows:
    """The windows :func:`evaluate` scores (see the module docstring). ``stream``
    (window-mean) and ``documents`` (sliding-window) reuse tokenizations from
    :func:`token_stream` / :func:`tokenize_documents` across lengths; pass them as int64
    tensors to share one copy between lengths."""
    if length < 2:
        raise ValueError(f"length={length} must be >= 2")
    if convention == WINDOW_MEAN:
        stream = token_stream(tokenizer, docs) if stream is None else stream
        starts = window_mean_starts(len(stream), length, stride, max_windows)
        # Window s predicts stream[s + 1 : s + L + 1]: every target exists since
        # s + L + 1 <= len(stream).
        windows = [Window(0, s, s + length, s + 1, s + length + 1) for s in starts]
        return Windows(
            convention, length, [torch.as_tensor(stream, dtype=torch.long)], windows, len(docs)
        )
    if convention != SLIDING_WINDOW:
        raise ValueError(f"convention={convention!r}; allowed: {', '.join(CONVENTIONS)}")
    documents = tokenize_documents(tokenizer, docs) if documents is None else documents
    sequences: list[torch.Tensor] = []
    windows = []
    for ids in documents:
        if len(ids) < length:
            continue
        if max_windows is not None and len(windows) >= max_windows:
            break
        sequences.append(torch.as_tensor(ids, dtype=torch.long))
        for begin, end, n_new in sliding_spans(len(ids), length, stride):
            # Scored: the newly revealed tokens ids[end - n_new : end] (BOS, at 0, has
            # nothing before it). The last input position would predict ids[end]:
            # unscored here, the next window reveals and scores it.
            first = max(end - n_new, begin + 1)
            windows.append(Window(len(sequences) - 1, begin, end, first, end))
            if max_windows is not None and len(windows) >= max_windows:
                break
    return Windows(convention, length, sequences, windows, len(sequences))


def batches(windows: Sequence[Window], batch_size: int) -> Iterator[list[Window]]:
    """Windows grouped by input length (no padding needed), ``batch_size`` at a time,
    in order of first appearance."""
    by_length: dict[int, list[Window]] = {}
    for window in windows:
        by_length.setdefault(window.end - window.begin, []).append(window)
    for group in by_length.values():
        for i in range(0, len(group), batch_size):
            yield group[i : i + batch_size]


def evaluate(
    model: Any,
    windows: Windows,
    *,
    batch_size: int = 1,
    chunk_tokens: int | None = DEFAULT_CHUNK_TOKENS,
    on_batch: Callable[[int], None] | None = None,
) -> PerplexityResult:
    """Score ``windows`` (from :func:`build_windows`) with ``model``.

    ``on_batch(n_windows)`` is called after each batch (progress bars).
    """
    window_losses: list[float] = []
    total_nll = 0.0
    scored = 0
    input_tokens = 0
    started = time.perf_counter()
    for batch in batches(windows.windows, batch_size):
        ids, targets = windows.inputs(batch)
        nll = token_nll(model, ids, targets, chunk_tokens=chunk_tokens).double()
        counts = (targets != IGNORE_INDEX).sum(dim=1)
        for row_sum, count in zip(nll.sum(dim=1).tolist(), counts.tolist(), strict=True):
            total_nll += row_sum
            scored += count
            window_losses.append(row_sum / max(count, 1))
        input_tokens += ids.numel()
        if on_batch is not None:
            on_batch(len(batch))
    seconds = time.perf_counter() - started
    note = ""
    if not windows.windows:
        mean_nll = None
        note = (
            f"no window: needs a token stream of more than {windows.length} tokens"
            if windows.convention == WINDOW_MEAN
            else f"no window: needs a document of at least {windows.length} tokens"
        )
    elif windows.convention == WINDOW_MEAN:
        mean_nll = sum(window_losses) / len(window_losses)
    else:
        mean_nll = total_nll / scored
    return PerplexityResult(
        convention=windows.convention,
        length=windows.length,
        ppl=math.exp(mean_nll) if mean_nll is not None else None,
        mean_nll=mean_nll,
        windows=len(windows.windows),
        documents=windows.documents,
        scored_tokens=scored,
        input_tokens=input_tokens,
        seconds=seconds,
        tokens_per_s=input_tokens / seconds if seconds > 0 else 0.0,
        note=note,
    )
