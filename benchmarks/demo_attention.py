"""Where the demo's models attend: attention mass by query-key distance at 4x context.

For each model, ``--windows`` evenly spaced 512-token windows of the held-out text
(``outputs/demo/heldout.txt``), full (eager) attention, and the queries in the last
``--queries`` positions of each window. For each layer, the attention probability those
queries give to keys at distance 0-31, 32-63, ..., 480-511 tokens, averaged over heads,
queries and windows. Prints one markdown table per model and writes a PNG with one panel
per layer. Run after ``make demo``:

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.demo_attention \
        [--model NAME=PATH ... [--rope NAME=TYPE:FACTOR ...]] [--png outputs/demo/attention.png]

Default models: the demo's base, base + linear x4, base + YaRN x4, and the LongLoRA adapter.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from benchmarks.demo_windows import add_arguments, models_with_windows
from longlora_plugin.evaluation.report import pyplot


def distance_mass(model: torch.nn.Module, rows: torch.Tensor, queries: int, bin_size: int):
    """Attention mass per (layer, distance bin) for the last ``queries`` positions of
    ``rows`` (``[windows, length]``), averaged over windows, heads and queries."""
    length = rows.shape[1]
    with torch.no_grad():
        attentions = model(input_ids=rows, output_attentions=True).attentions
    positions = torch.arange(length)
    distance = positions[:, None] - positions[None, :]  # (query, key)
    n_bins = length // bin_size
    picked = distance[length - queries :].clamp(min=0) // bin_size  # (queries, keys)
    masses = []
    for probs in attentions:  # (windows, heads, query, key)
        last = probs[:, :, length - queries :].mean(dim=(0, 1))  # (queries, keys)
        mass = torch.zeros(n_bins).index_add_(0, picked.flatten(), last.flatten())
        masses.append(mass / queries)
    return torch.stack(masses)


def plot(results: dict[str, torch.Tensor], bin_size: int, path: Path) -> None:
    plt = pyplot()
    n_layers = next(iter(results.values())).shape[0]
    fig, axes = plt.subplots(1, n_layers, figsize=(3.2 * n_layers, 3), sharey=True)
    for layer, ax in enumerate(axes):
        for name, mass in results.items():
            starts = [i * bin_size for i in range(mass.shape[1])]
            ax.plot(starts, mass[layer].tolist(), marker="o", ms=3, label=name)
        ax.set_yscale("log")
        ax.set_title(f"layer {layer}")
        ax.set_xlabel("query-key distance (tokens)")
    axes[0].set_ylabel("attention mass")
    axes[-1].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser, windows=16)
    parser.add_argument("--queries", type=int, default=32, help="last positions used as queries")
    parser.add_argument("--bin", type=int, default=32, help="distance bin in tokens")
    parser.add_argument("--png", type=Path, default=Path("outputs/demo/attention.png"))
    args = parser.parse_args()
    if args.length % args.bin or not 0 < args.queries <= args.length:
        parser.error("--length must be a multiple of --bin and --queries in 1..--length")
    results: dict[str, torch.Tensor] = {}
    bins = range(0, args.length, args.bin)
    for item, rows in models_with_windows(args, attn_implementation="eager"):
        mass = distance_mass(item.model, rows[:, :-1], args.queries, args.bin)
        results[item.name] = mass
        print(f"\n{item.name}: attention mass of the last {args.queries} queries by distance")
        print("| layer | " + " | ".join(str(b) for b in bins) + " |")
        print("|---|" + "---:|" * len(bins))
        for layer, row in enumerate(mass):
            print(f"| {layer} | " + " | ".join(f"{v:.2f}" for v in row.tolist()) + " |")
    plot(results, args.bin, args.png)
    print(f"\nplot: {args.png}")


if __name__ == "__main__":
    main()
