"""``longlora`` console script (also ``python -m longlora_plugin``).

One module per command in this package, each with ``add_parser(subparsers)``, which
registers the command's parser, and ``run(args)``, which the parser's ``func`` points at
(called with the parsed ``argparse.Namespace``, returning an exit code). Building the
parsers imports no heavy library (transformers, peft, Axolotl): a command imports them in
``run``, after its arguments are parsed, so ``--help`` prints only the usage.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import re
import sys

# module path -> one-line help; each module defines add_parser(subparsers)
COMMANDS: dict[str, str] = {
    "longlora_plugin.cli.eval": "eval ppl / eval passkey: perplexity by context length, passkey retrieval",
    "longlora_plugin.cli.validate": "validate a config offline; resolved settings and memory estimate",
    "longlora_plugin.cli.smollm2": "smollm2: convert SmolLM2-135M-Instruct (PyPI GGUF) to a local HF model",
}


# logger -> messages it logs at import that say nothing about the run: torchao's optional
# kernels for other GPU architectures (logged when transformers, peft or bitsandbytes
# import it) and torch's deprecation of register_constant() on Enums (torchao calls it)
KNOWN_NOISE: dict[str, re.Pattern[str]] = {
    "torchao": re.compile(r"Failed to load \S*torchao/_C_(mxfp8|cutlass_90a)[^/\s]*\.so: "),
    "torch.utils._pytree": re.compile(
        r"is an Enum subclass and is now natively supported by torch\.compile as an opaque "
        r"value type\. Calling register_constant\(\) on Enum subclasses is deprecated"
    ),
}


class _KnownNoise(logging.Filter):
    """Drops the records of one logger whose message matches its :data:`KNOWN_NOISE`
    pattern; every other record passes."""

    def __init__(self, pattern: re.Pattern[str]) -> None:
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def quiet_known_noise() -> None:
    """Filter :data:`KNOWN_NOISE` out of its loggers (before the libraries that log it
    are imported). Idempotent."""
    for name, pattern in KNOWN_NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _KnownNoise) for f in logger.filters):
            logger.addFilter(_KnownNoise(pattern))


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
    quiet_known_noise()
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
