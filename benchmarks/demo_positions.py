"""Perplexity by position block inside 4x-long windows of the demo's held-out text.

Where does a model lose quality past the base context? For each model, ``--windows``
evenly spaced windows of ``--length`` tokens (default 512 = 4x the demo's base context)
from ``outputs/demo/heldout.txt``, full attention, per-token loss averaged over the
windows and reported per block of ``--block`` positions. Run after ``make demo``:

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.demo_positions \
        [--model NAME=PATH ... [--rope NAME=TYPE:FACTOR ...]]

Default models: the demo's base, base + linear x4, base + YaRN x4, and the LongLoRA adapter.
"""

from __future__ import annotations

import argparse

from benchmarks.demo_windows import add_arguments, models_with_windows
from longlora_plugin.evaluation.loss import token_nll


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser, windows=48)
    parser.add_argument("--block", type=int, default=64)
    args = parser.parse_args()
    blocks = range(0, args.length, args.block)
    print("| model | " + " | ".join(f"{a}-{a + args.block - 1}" for a in blocks) + " |")
    print("|---|" + "---:|" * len(blocks))
    for item, rows in models_with_windows(args):
        nll = token_nll(item.model, rows[:, :-1], rows[:, 1:]).mean(0)
        values = [float(nll[a : a + args.block].mean().exp()) for a in blocks]
        print(f"| {item.name} | " + " | ".join(f"{v:.1f}" for v in values) + " |", flush=True)


if __name__ == "__main__":
    main()
