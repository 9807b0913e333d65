"""``longlora eval ppl``, ``longlora eval passkey`` and ``longlora eval ruler``.

Models: ``--model NAME=PATH`` (repeatable; PATH a model directory, a merged model or an
Axolotl adapter output directory) and ``--rope [NAME=]TYPE:FACTOR`` to load a model
with a RoPE scaling it was not trained with ("interpolation only"; without ``NAME`` it
applies to every model). Each run writes ``ppl``, ``passkey`` or ``ruler`` ``.{json,md,png}``
into ``--out`` and prints the markdown table.
"""

from __future__ import annotations

import argparse
import logging
import sys
import typing
from typing import TYPE_CHECKING, Any

from longlora_plugin.evaluation.dtypes import DTYPE_CHOICES
from longlora_plugin.evaluation.loss import DEFAULT_CHUNK_TOKENS
from longlora_plugin.evaluation.passkey import DEFAULT_DEPTHS, DEFAULT_TRIALS
from longlora_plugin.evaluation.perplexity import DEFAULT_MAX_WINDOWS, DEFAULT_STRIDE, Convention
from longlora_plugin.evaluation.ruler_tasks import (
    DEFAULT_RELATIVE,
    DEFAULT_SAMPLES,
    RULER_THRESHOLD,
    TASKS,
)

if TYPE_CHECKING:
    from longlora_plugin.evaluation.models import ModelSpec


def _number_list(text: str, cast: type, allowed, kind: str, rule: str) -> list:
    """Parse ``"a,b,c"`` with ``cast``; every value must satisfy ``allowed``."""
    try:
        values = [cast(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of {kind}"
        ) from None
    if not values or not all(allowed(v) for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: {rule}")
    return values


def _ints(text: str) -> list[int]:
    return _number_list(text, int, lambda v: v >= 2, "integers", "lengths must be integers >= 2")


def _floats(text: str) -> list[float]:
    return _number_list(text, float, lambda v: 0 <= v <= 1, "numbers", "depths must be in [0, 1]")


def _tasks(text: str) -> list[str]:
    if text == "all":
        return list(TASKS)
    names = [t for t in text.replace(" ", "").split(",") if t]
    unknown = [t for t in names if t not in TASKS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"{text!r}: unknown task(s) {unknown}; allowed: all, {', '.join(TASKS)}"
        )
    return names


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be in (0, 1]")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 1")
    return value


def model_specs(models: list[str], ropes: list[str] | None) -> list[ModelSpec]:
    """``--model`` and ``--rope`` values -> specs; raise ``ValueError`` on bad input
    (duplicate names, a ``--rope`` naming no model)."""
    from longlora_plugin.evaluation.models import ModelSpec, RopeOverride

    specs = [ModelSpec.parse(m) for m in models]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"--model names must be unique, got {names}")
    for text in ropes or []:
        name, sep, value = text.rpartition("=")
        rope = RopeOverride.parse(value)
        targets = [s for s in specs if not sep or s.name == name]
        if sep and not targets:
            raise ValueError(f"--rope {text!r}: no --model named {name!r} (models: {names})")
        specs = [ModelSpec(s.name, s.path, rope) if s in targets else s for s in specs]
    return specs


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        action="append",
        required=True,
        metavar="NAME=PATH",
        help="model to evaluate (repeatable): a model dir, merged dir or adapter output dir",
    )
    parser.add_argument(
        "--rope",
        action="append",
        metavar="[NAME=]TYPE:FACTOR",
        help="load NAME (every model without NAME=) with this RoPE scaling, e.g. linear:4",
    )
    parser.add_argument("--lengths", type=_ints, required=True, help="comma-separated token counts")
    parser.add_argument("--out", required=True, help="output directory (JSON, markdown, PNG)")
    parser.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES)
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    parser.add_argument(
        "--attn-implementation",
        default=None,
        help="e.g. sdpa, flash_attention_2 (default: the model's)",
    )
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_parser(subparsers: Any) -> None:
    """Register ``eval`` with its ``ppl`` and ``passkey`` subcommands."""
    parser = subparsers.add_parser(
        "eval",
        help="perplexity by context length and passkey retrieval",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="eval_command", required=True)

    ppl = sub.add_parser("ppl", help="perplexity at several context lengths (both conventions)")
    _common(ppl)
    ppl.add_argument("--data", required=True, help=".txt file, directory, .jsonl or local dataset")
    ppl.add_argument("--text-field", default="text", help="JSONL/dataset text field (default text)")
    ppl.add_argument("--split", default=None, help="dataset split (default test/validation/train)")
    ppl.add_argument("--max-docs", type=_positive, default=None, help="use the first N documents")
    ppl.add_argument(
        "--convention",
        choices=["both", *typing.get_args(Convention)],
        default="both",
        help="window-mean (paper) and/or sliding-window (YaRN-style); default both",
    )
    ppl.add_argument(
        "--stride",
        type=_positive,
        default=DEFAULT_STRIDE,
        help=f"window stride (default {DEFAULT_STRIDE})",
    )
    ppl.add_argument(
        "--max-windows",
        type=_positive,
        default=DEFAULT_MAX_WINDOWS,
        help="cap on windows per length (default: all)",
    )
    ppl.add_argument("--batch-size", type=_positive, default=1, help="windows per forward pass")
    ppl.add_argument(
        "--loss-chunk",
        type=_positive,
        default=DEFAULT_CHUNK_TOKENS,
        help=f"positions per lm_head chunk (default {DEFAULT_CHUNK_TOKENS})",
    )
    ppl.set_defaults(func=run)

    passkey = sub.add_parser("passkey", help="passkey retrieval at lengths x depths")
    _common(passkey)
    depths = ",".join(f"{d:g}" for d in DEFAULT_DEPTHS)
    passkey.add_argument(
        "--depths", type=_floats, default=list(DEFAULT_DEPTHS), help=f"default {depths}"
    )
    passkey.add_argument(
        "--trials",
        type=_positive,
        default=DEFAULT_TRIALS,
        help=f"keys per cell (default {DEFAULT_TRIALS})",
    )
    passkey.add_argument("--seed", type=int, default=0)
    passkey.set_defaults(func=run)

    ruler = sub.add_parser("ruler", help="RULER's synthetic tasks at several lengths")
    _common(ruler)
    ruler.add_argument(
        "--tasks", type=_tasks, default=list(TASKS), help="comma-separated, or all (default)"
    )
    ruler.add_argument(
        "--samples",
        type=_positive,
        default=DEFAULT_SAMPLES,
        help=f"samples per task and length (default {DEFAULT_SAMPLES})",
    )
    ruler.add_argument(
        "--questions-per-haystack",
        type=_positive,
        default=1,
        help="ask up to this many questions about each haystack and prefill it once, where "
        "the task allows it (niah_multikey_*); default 1, RULER's independent samples",
    )
    ruler.add_argument(
        "--data",
        default=None,
        help="text for the essay haystack (.txt, directory, .jsonl or dataset); without it "
        "the essay tasks are skipped",
    )
    ruler.add_argument("--text-field", default="text", help="JSONL/dataset text field")
    ruler.add_argument(
        "--threshold",
        type=float,
        default=RULER_THRESHOLD,
        help=f"effective-length threshold (default {RULER_THRESHOLD}, RULER's)",
    )
    ruler.add_argument(
        "--relative",
        type=_fraction,
        default=DEFAULT_RELATIVE,
        help="relative rule: this fraction of the model's own score at its original "
        f"context (default {DEFAULT_RELATIVE})",
    )
    ruler.add_argument(
        "--chat-template", action="store_true", help="wrap prompts in the model's chat template"
    )
    ruler.add_argument("--seed", type=int, default=0)
    ruler.set_defaults(func=run)


def _load_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "dtype": args.dtype,
        "device": args.device,
        "attn_implementation": args.attn_implementation,
        "trust_remote_code": args.trust_remote_code,
    }


def _usage_error(err: Exception) -> int:
    print(f"longlora eval: error: {err}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    """Entry point of ``longlora eval ppl``, ``passkey`` and ``ruler``."""
    commands = {"ppl": _run_ppl, "passkey": _run_passkey, "ruler": _run_ruler}
    return commands[args.eval_command](args)


def _run_ppl(args: argparse.Namespace) -> int:
    from longlora_plugin.evaluation import perplexity, runner
    from longlora_plugin.evaluation.texts import load_texts

    logging.basicConfig(level=logging.WARNING)
    try:
        specs = model_specs(args.model, args.rope)
        docs = load_texts(
            args.data, text_field=args.text_field, split=args.split, max_docs=args.max_docs
        )
    except ValueError as err:  # bad --model/--rope, unreadable --data
        return _usage_error(err)
    conventions = list(perplexity.CONVENTIONS) if args.convention == "both" else [args.convention]
    payload = runner.run_ppl(
        runner.load_models(specs, **_load_kwargs(args)),
        docs,
        lengths=args.lengths,
        conventions=conventions,
        stride=args.stride,
        max_windows=args.max_windows,
        batch_size=args.batch_size,
        chunk_tokens=args.loss_chunk,
        data=str(args.data),
        progress=not args.no_progress,
    )
    return _save(payload, args.out)


def _run_passkey(args: argparse.Namespace) -> int:
    from longlora_plugin.evaluation import runner

    logging.basicConfig(level=logging.WARNING)
    try:
        specs = model_specs(args.model, args.rope)
    except ValueError as err:
        return _usage_error(err)
    payload = runner.run_passkey(
        runner.load_models(specs, **_load_kwargs(args)),
        lengths=args.lengths,
        depths=args.depths,
        trials=args.trials,
        seed=args.seed,
        progress=not args.no_progress,
    )
    return _save(payload, args.out)


def _run_ruler(args: argparse.Namespace) -> int:
    from longlora_plugin.evaluation import ruler_eval, runner
    from longlora_plugin.evaluation.ruler_prompts import sentences
    from longlora_plugin.evaluation.texts import load_texts

    logging.basicConfig(level=logging.WARNING)
    tasks = args.tasks
    try:
        specs = model_specs(args.model, args.rope)
        docs = load_texts(args.data, text_field=args.text_field) if args.data else []
    except ValueError as err:
        return _usage_error(err)
    essay = [s for doc in docs for s in sentences(doc)]
    if not essay:
        dropped = [t for t in tasks if TASKS[t].haystack == "essay"]
        tasks = [t for t in tasks if t not in dropped]
        if dropped:
            print(f"longlora eval ruler: no --data: essay tasks skipped: {', '.join(dropped)}")
        if not tasks:
            return _usage_error(ValueError("--tasks: every task given needs --data"))
    payload = ruler_eval.run(
        runner.load_models(specs, **_load_kwargs(args)),
        lengths=args.lengths,
        tasks=tasks,
        samples=args.samples,
        questions_per_haystack=args.questions_per_haystack,
        seed=args.seed,
        essay=essay,
        data=str(args.data or ""),
        chat_template=args.chat_template,
        threshold=args.threshold,
        relative=args.relative,
        progress=not args.no_progress,
    )
    return _save(payload, args.out)


def _save(payload: dict, out: str) -> int:
    """Write a run's JSON, table and plot into ``out``, say where; exit code 0."""
    from longlora_plugin.evaluation import runner

    paths = runner.save(payload, out)
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
