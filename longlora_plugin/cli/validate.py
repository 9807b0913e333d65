"""``longlora validate CONFIG [--model-config DIR]``: check a training config before any
GPU hour is spent on it (:mod:`longlora_plugin.axolotl.validation` does the work)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from longlora_plugin.memory import GPUS


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``longlora validate``."""
    parser = subparsers.add_parser(
        "validate",
        help="validate a training config offline; print resolved LongLoRA settings and a memory estimate",
        description=(
            "Run Axolotl's config validation with the plugin (no weights; no network when "
            "--model-config is given), print the resolved LongLoRA settings, trainable "
            "parameters, tokens per optimizer step and a per-GPU memory/time estimate."
        ),
    )
    parser.add_argument("config", help="Axolotl YAML with the longlora plugin")
    parser.add_argument(
        "--model-config",
        metavar="DIR",
        help="directory with the base model's config.json (used instead of base_model's)",
    )
    parser.add_argument(
        "--gpus-per-node", type=int, default=8, help="GPUs per machine (default 8, the paper's)"
    )
    parser.add_argument("--nodes", type=int, default=1, help="machines (default 1)")
    parser.add_argument(
        "--gpu",
        choices=sorted(GPUS),
        default="a100-80gb",
        help="GPU type for capability checks and the estimate (default a100-80gb)",
    )
    parser.add_argument(
        "--context-parallel",
        type=int,
        default=None,
        metavar="P",
        help="estimate memory with each row split over P GPUs (S2-Attn context "
        "parallelism, docs/s2-attn.md); default: the config's longlora.context_parallel",
    )
    parser.add_argument(
        "--local",
        action="store_true",
        help=(
            "check packages against this machine (by default a missing flash-attn is "
            "reported, not an error: validation usually runs away from the GPU machine)"
        ),
    )
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Entry point of ``longlora validate``; returns the exit code."""
    os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")
    if args.model_config:
        for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
            os.environ.setdefault(key, "1")
    from longlora_plugin.axolotl.validation import ValidationFailed, validate

    try:
        report = validate(
            args.config,
            model_config=args.model_config,
            gpus_per_node=args.gpus_per_node,
            nodes=args.nodes,
            gpu=args.gpu,
            local=args.local,
            context_parallel=args.context_parallel,
        )
    except ValidationFailed as err:
        print(f"longlora validate: {args.config}: invalid config:\n{err}", file=sys.stderr)
        return 1
    print(report.render())
    return 0
