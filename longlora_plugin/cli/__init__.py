"""``longlora`` console script (also ``python -m longlora_plugin``).

One module per command in this package, each with ``add_parser(subparsers)``, which
registers the command's parser, and ``run(args)``, which the parser's ``func`` points at
(called with the parsed ``argparse.Namespace``, returning an exit code).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# module path -> one-line help; each module defines add_parser(subparsers)
COMMANDS: dict[str, str] = {
    "longlora_plugin.cli.eval": "eval ppl / eval passkey: perplexity by context length, passkey retrieval",
    "longlora_plugin.cli.validate": "validate a config offline; resolved settings and memory estimate",
    "longlora_plugin.cli.smollm2": "smollm2: convert SmolLM2-135M-Instruct (PyPI GGUF) to a local HF model",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="longlora", description="LongLoRA for Axolotl: tools around training."
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS:
        importlib.import_module(module).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
