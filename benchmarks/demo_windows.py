"""Shared by ``demo_positions.py`` and ``demo_attention.py``: which models, which windows.

Models are given as ``longlora eval`` takes them (``--model NAME=PATH``, ``--rope
NAME=TYPE:FACTOR``); the windows are the window-mean convention's, evenly spaced over the
held-out text's token stream (:mod:`longlora_plugin.evaluation.perplexity`).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

import torch

from longlora_plugin.cli.eval import model_specs
from longlora_plugin.evaluation.models import EvalModel, load_eval_model
from longlora_plugin.evaluation.perplexity import token_stream, window_mean_starts

# After `make demo`: the base model, the same weights with each interpolation and no
# training, and the LongLoRA adapter.
DEFAULT_MODELS = [
    "base=outputs/demo/base",
    "base+linear4=outputs/demo/base",
    "base+yarn4=outputs/demo/base",
    "longlora=outputs/demo/longlora",
]
DEFAULT_ROPES = ["base+linear4=linear:4", "base+yarn4=yarn:4"]


def add_arguments(parser: argparse.ArgumentParser, *, windows: int) -> None:
    parser.add_argument("--model", action="append", help="NAME=PATH (default: the demo's)")
    parser.add_argument("--rope", action="append", help="NAME=TYPE:FACTOR, as in longlora eval")
    parser.add_argument("--text", default="outputs/demo/heldout.txt")
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--windows", type=int, default=windows)


def models_with_windows(
    args: argparse.Namespace, *, attn_implementation: str | None = None
) -> Iterator[tuple[EvalModel, torch.Tensor]]:
    """Each model of ``args`` (loaded in turn, fp32 on the CPU) with ``[windows, length
    + 1]`` token rows of the held-out text (inputs ``[:, :-1]``, targets ``[:, 1:]``)."""
    text = Path(args.text).read_text(encoding="utf-8")
    if args.model:
        specs = model_specs(args.model, args.rope)
    else:
        specs = model_specs(DEFAULT_MODELS, DEFAULT_ROPES)
    for spec in specs:
        item = load_eval_model(
            spec, dtype="float32", device="cpu", attn_implementation=attn_implementation
        )
        ids = token_stream(item.tokenizer, [text])
        starts = window_mean_starts(len(ids), args.length, max_windows=args.windows)
        yield item, torch.tensor([ids[s : s + args.length + 1] for s in starts])
