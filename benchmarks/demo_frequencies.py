"""Which RoPE frequencies make a head attend where: attention logits split per frequency.

With rotary embeddings, a head's logit for query t and key s is a sum over the rotary
frequencies i of ``scaling * (q_a k_a + q_b k_b)``, the dot product of the (already
rotated) query and key in the plane of frequency i (transformers' ``rotate_half`` layout:
dimensions i and i + D/2). This benchmark captures the rotated queries and keys of the
chosen layers through transformers' ``AttentionInterface`` while a passkey prompt (the
``make demo`` grid's prompt and keys, seed 0) runs with the answer appended, and averages
each frequency's contribution over the key positions in distance bins, for the queries
that predict the answer.

It tells *why* a head attends far: a frequency whose contribution is negative at
distances up to S2-Attn's group size G and positive beyond it was used as a recency
signal that training calibrated only up to G (no training query saw a key further back),
and at full-attention inference it promotes the keys past its half-period. The summary
per head is the **far flip**: the largest rise of one frequency's mean contribution from
the ``near`` bin to the ``far`` bin (``--flip 128-512:512-1024`` by default). Each
frequency is labelled with its half-period in tokens under the model's RoPE (the
interpolation included), pi / inv_freq. Run after ``make demo``:

    OMP_NUM_THREADS=2 .venv/bin/python -m benchmarks.demo_frequencies \\
        [--model NAME=PATH ... [--rope NAME=TYPE:FACTOR ...]] [--layers 1] [--length 1024] \\
        [--plot-layers 1]

Writes ``benchmarks/results/demo_frequencies.json`` (``--out``: per head the table, the
far flip, and the attention mass per distance bin, the causal softmax of the summed
contributions), a heatmap per model and layer (``--png``), and prints the far flip of
every head.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from longlora_plugin.cli.eval import model_specs
from longlora_plugin.evaluation import passkey as pk
from longlora_plugin.evaluation.models import load_eval_model
from longlora_plugin.evaluation.report import pyplot
from longlora_plugin.s2.backend import unwrap_model

DEFAULT_MODELS = ["longlora=outputs/demo/longlora"]
DEFAULT_BINS = (0, 8, 128, 512, 1024)
CAPTURE = "demo_frequencies_capture"


@contextmanager
def captured_qk(model: torch.nn.Module, layers: set[int]) -> Iterator[dict[int, dict]]:
    """While inside, every forward of ``model`` (possibly a PEFT model) stores the rotated
    query and key states (``[B, H, L, D]`` / ``[B, Hkv, L, D]``), the ``scaling`` and the
    GQA ratio of each layer in ``layers`` in the yielded dict, keyed by ``layer_idx``;
    attention itself is transformers' SDPA. The model's attention is set back after."""
    store: dict[int, dict] = {}

    def attention(module, query, key, value, attention_mask, **kwargs):
        if module.layer_idx in layers:
            store[module.layer_idx] = {
                "query": query.detach(),
                "key": key.detach(),
                "scaling": kwargs.get("scaling") or query.shape[-1] ** -0.5,
                "groups": module.num_key_value_groups,
            }
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(CAPTURE, attention)
    base = unwrap_model(model)
    before = base.config._attn_implementation
    base.set_attn_implementation(CAPTURE)
    try:
        yield store
    finally:
        base.set_attn_implementation(before)


def frequency_logits(
    query: torch.Tensor, key: torch.Tensor, scaling: float, groups: int, positions: torch.Tensor
) -> torch.Tensor:
    """``[H, Q, L, D/2]``: for one row (``query [H, L, D]``, ``key [Hkv, L, D]``), the
    contribution of each rotary frequency to the logits of the queries at ``positions``
    against every key; summed over the last axis it is the attention logit."""
    key = key.repeat_interleave(groups, dim=0)
    half = query.shape[-1] // 2
    products = query[:, positions, None, :] * key[:, None, :, :] * scaling
    return products[..., :half] + products[..., half:]


def by_distance(
    contributions: torch.Tensor, positions: torch.Tensor, bins: tuple[int, ...]
) -> torch.Tensor:
    """``[H, D/2, bins - 1]``: the mean contribution over the (query, key) pairs whose
    distance (query position - key position, causal pairs only) lies in each bin."""
    length = contributions.shape[2]
    distance = positions[:, None] - torch.arange(length)[None, :]
    out = []
    for lo, hi in pairwise(bins):
        inside = ((distance >= lo) & (distance < hi)).to(contributions.dtype)
        count = inside.sum()
        summed = (contributions * inside[None, :, :, None]).sum(dim=(1, 2))
        out.append(summed / count if count else torch.full_like(summed, math.nan))
    return torch.stack(out, dim=-1)


def attention_mass(
    contributions: torch.Tensor, positions: torch.Tensor, bins: tuple[int, ...]
) -> torch.Tensor:
    """``[H, bins - 1]``: the attention probability (the causal softmax of the summed
    contributions) the queries at ``positions`` give to the keys in each distance bin,
    averaged over the queries."""
    logits = contributions.sum(-1)  # [H, Q, L]
    distance = positions[:, None] - torch.arange(logits.shape[-1])[None, :]
    probs = logits.masked_fill(distance < 0, float("-inf")).softmax(-1)
    return torch.stack(
        [
            (probs * ((distance >= lo) & (distance < hi))).sum(-1).mean(-1)
            for lo, hi in pairwise(bins)
        ],
        dim=-1,
    )


def bin_labels(bins: tuple[int, ...] | list[int]) -> list[str]:
    """``"lo-hi"`` for each distance bin (as ``--flip`` names them)."""
    return [f"{lo}-{hi}" for lo, hi in pairwise(bins)]


def far_flip(table: torch.Tensor, near: int, far: int) -> tuple[float, int]:
    """For one head's ``[D/2, bins - 1]`` table: the largest rise of a frequency's mean
    contribution from bin ``near`` to bin ``far``, and that frequency's index."""
    rise = table[:, far] - table[:, near]
    i = int(rise.argmax())
    return float(rise[i]), i


def half_periods(model: torch.nn.Module) -> list[float]:
    """pi / inv_freq of the model's rotary embedding (its interpolation included)."""
    rotary = unwrap_model(model).model.rotary_emb
    return [math.pi / f for f in rotary.inv_freq.float().tolist()]


def decompose(
    item: Any, layers: list[int], length: int, depth: float, trials: int, bins: tuple[int, ...]
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Per layer, the :func:`by_distance` table ``[H, D/2, bins - 1]`` and the
    :func:`attention_mass` ``[H, bins - 1]``, averaged over ``trials`` passkey prompts of
    ``length`` tokens with the key at ``depth`` and the answer appended; the queries are
    the positions that predict the answer's tokens."""
    tables: dict[int, torch.Tensor] = {}
    masses: dict[int, torch.Tensor] = {}
    with captured_qk(item.model, set(layers)) as store:
        for trial in range(trials):
            key = pk.trial_passkey(0, length, depth, trial)
            prompt = pk.build_prompt(item.tokenizer, length, depth, key)
            answer = item.tokenizer(" " + key, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([prompt.input_ids + answer])
            with torch.no_grad():
                item.model(input_ids=ids)
            n = ids.shape[1]
            positions = torch.arange(n - len(answer) - 1, n - 1)
            for layer in layers:
                got = store[layer]
                contributions = frequency_logits(
                    got["query"][0], got["key"][0], got["scaling"], got["groups"], positions
                )
                table = by_distance(contributions, positions, bins) / trials
                tables[layer] = tables.get(layer, 0) + table
                mass = attention_mass(contributions, positions, bins) / trials
                masses[layer] = masses.get(layer, 0) + mass
    return tables, masses


def plot(rows: list[dict], path: Path) -> None:
    """One panel per (model, layer, head): frequency x distance bin, one diverging colour
    scale for all panels so that models compare."""
    plt = pyplot()
    heads = max(len(r["table"]) for r in rows)
    fig, axes = plt.subplots(
        len(rows),
        heads,
        figsize=(2.6 * heads + 1, 3.0 * len(rows) + 0.6),
        squeeze=False,
        layout="constrained",
    )
    values = [abs(v) for r in rows for head in r["table"] for f in head for v in f if v is not None]
    scale = max(values, default=1.0) or 1.0
    for r, row in enumerate(rows):
        labels = bin_labels(row["bins"])
        for h, head in enumerate(row["table"]):
            ax = axes[r][h]
            cells = [[math.nan if v is None else v for v in f] for f in head]
            image = ax.imshow(cells, cmap="RdBu_r", vmin=-scale, vmax=scale, aspect="auto")
            ax.set_xticks(range(len(labels)), labels, rotation=45, fontsize=7)
            ax.set_yticks(
                range(len(row["half_periods"])),
                [f"{p:.0f}" for p in row["half_periods"]],
                fontsize=6,
            )
            ax.set_title(f"{row['model']}, layer {row['layer']}, head {h}", fontsize=8)
            if h == 0:
                ax.set_ylabel("frequency: half-period (tokens)", fontsize=7)
            if r == len(rows) - 1:
                ax.set_xlabel("query-key distance", fontsize=7)
    fig.colorbar(image, ax=axes, shrink=0.6, label="mean logit contribution")
    fig.suptitle("Attention logit per RoPE frequency and query-key distance (answer queries)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def _round(value: float) -> float | None:
    """4 decimals; a bin no (query, key) pair falls in (NaN) is null in the JSON."""
    return None if math.isnan(value) else round(value, 4)


def _bins(text: str) -> tuple[int, ...]:
    try:
        bins = tuple(int(v) for v in text.split(","))
    except ValueError:
        bins = ()
    if len(bins) < 2 or any(b >= c for b, c in pairwise(bins)) or bins[0] < 0:
        raise argparse.ArgumentTypeError(
            f"--bins {text!r}: expected increasing non-negative integers, at least two"
        )
    return bins


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", action="append", help="NAME=PATH (default: the demo's adapter)")
    parser.add_argument("--rope", action="append", help="NAME=TYPE:FACTOR, as in longlora eval")
    parser.add_argument("--layers", default="1", help="comma-separated layer indices")
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--depth", type=float, default=1.0)
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--bins", type=_bins, default=DEFAULT_BINS)
    parser.add_argument(
        "--flip",
        default="128-512:512-1024",
        help="NEAR:FAR, two of the bins: the far flip compares them",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("benchmarks/results/demo_frequencies.json")
    )
    parser.add_argument("--png", type=Path, default=Path("docs/img/demo-frequencies.png"))
    parser.add_argument(
        "--plot-layers", help="comma-separated layers to draw (default: every --layers)"
    )
    args = parser.parse_args(argv)
    labels = bin_labels(args.bins)
    near_label, _, far_label = args.flip.partition(":")
    if near_label not in labels or far_label not in labels:
        parser.error(f"--flip {args.flip!r}: both sides must be bins of --bins ({labels})")
    near, far = labels.index(near_label), labels.index(far_label)
    layers = [int(n) for n in args.layers.split(",")]
    drawn = [int(n) for n in args.plot_layers.split(",")] if args.plot_layers else layers
    start = time.time()
    rows: list[dict] = []
    for spec in model_specs(args.model or DEFAULT_MODELS, args.rope):
        item = load_eval_model(spec, dtype="float32", device="cpu", attn_implementation="sdpa")
        periods = half_periods(item.model)
        tables, masses = decompose(item, layers, args.length, args.depth, args.trials, args.bins)
        for layer in layers:
            table = tables[layer]
            flips = [far_flip(head, near, far) for head in table]
            rows.append(
                {
                    "model": spec.name,
                    "layer": layer,
                    "bins": list(args.bins),
                    "half_periods": [round(p, 1) for p in periods],
                    "table": [[[_round(v) for v in f] for f in head] for head in table.tolist()],
                    "attention_mass": [
                        [_round(v) for v in head] for head in masses[layer].tolist()
                    ],
                    "far_flip": [
                        {"rise": round(rise, 3), "frequency": i, "half_period": round(periods[i])}
                        for rise, i in flips
                    ],
                }
            )
            for h, (rise, i) in enumerate(flips):
                print(
                    f"{spec.name} layer {layer} head {h}: far flip {rise:+.2f} "
                    f"({near_label} -> {far_label}), frequency {i} "
                    f"(half-period {periods[i]:.0f} tokens)"
                )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "benchmark": "demo_frequencies",
                "date": time.strftime("%Y-%m-%d"),
                "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
                "torch": torch.__version__,
                "settings": {
                    "length": args.length,
                    "depth": args.depth,
                    "trials": args.trials,
                    "flip": args.flip,
                },
                "seconds": round(time.time() - start),
                "rows": rows,
            },
            indent=1,
        )
        + "\n"
    )
    plot([r for r in rows if r["layer"] in drawn], args.png)
    print(f"{args.out}, {args.png}")


if __name__ == "__main__":
    main()
