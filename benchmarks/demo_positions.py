"""Perplexity by position block inside 4x-long windows of the demo's held-out text.

Where does a model lose quality past the base context? For each model, ``--windows``
evenly spaced windows of ``--length`` tokens (default 512 = 4x the demo's base context)
from ``outputs/demo/heldout.txt``, full attention, per-token loss averaged over the
windows and reported per block of ``--block`` positions. Run after ``make demo``:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/demo_positions.py \
        [--model NAME=PATH[@linear:4]] ...

Default models: the demo's base, base + linear x4, base + YaRN x4, and the LongLoRA adapter.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from longlora_plugin.evaluation.models import ModelSpec, RopeOverride, load_eval_model

DEFAULT_MODELS = (
    "base=outputs/demo/base",
    "base+linear4=outputs/demo/base@linear:4",
    "base+yarn4=outputs/demo/base@yarn:4",
    "longlora=outputs/demo/longlora",
)


def block_ppl(spec: ModelSpec, text: str, length: int, windows: int, block: int) -> list[float]:
    """Perplexity per block of ``block`` positions, pooled over ``windows`` windows."""
    item = load_eval_model(spec, dtype="float32", device="cpu")
    ids = item.tokenizer(text, add_special_tokens=False)["input_ids"]
    step = (len(ids) - length - 1) // windows
    rows = torch.tensor([ids[i * step : i * step + length + 1] for i in range(windows)])
    with torch.no_grad():
        logits = item.model(input_ids=rows[:, :-1]).logits
        nll = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), rows[:, 1:], reduction="none"
        ).mean(0)
    return [float(nll[a : a + block].mean().exp()) for a in range(0, length, block)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help="NAME=PATH or NAME=PATH@TYPE:FACTOR")
    parser.add_argument("--text", default="outputs/demo/heldout.txt")
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--windows", type=int, default=48)
    parser.add_argument("--block", type=int, default=64)
    args = parser.parse_args()
    text = Path(args.text).read_text(encoding="utf-8")
    blocks = range(0, args.length, args.block)
    print("| model | " + " | ".join(f"{a}-{a + args.block - 1}" for a in blocks) + " |")
    print("|---|" + "---:|" * len(blocks))
    for entry in args.model or DEFAULT_MODELS:
        spec_text, _, rope = entry.partition("@")
        spec = ModelSpec.parse(spec_text)
        if rope:
            spec = ModelSpec(spec.name, spec.path, RopeOverride.parse(rope))
        values = block_ppl(spec, text, args.length, args.windows, args.block)
        print(f"| {spec.name} | " + " | ".join(f"{v:.1f}" for v in values) + " |", flush=True)


if __name__ == "__main__":
    main()
