"""Where the demo's extension retrieves: passkey with the inference attention limited.

A model trained with S2-Attn at group size G has only ever attended over keys less than G
tokens back. At inference it runs full attention (the paper's and this plugin's
contract), so at the trained length L > G every query also sees keys G..L-1 tokens back.
This benchmark asks what those keys do: it scores the same passkey grid as ``make demo``
(seed 0, greedy, exact match) with each query limited, through transformers'
``AttentionInterface``, to

* ``full``: every earlier key (what ``make demo`` scores);
* ``window:W``: the last W keys (itself included), as the sliding window of transformers;
* ``window:W+S``: the same plus the first S keys of the sequence (an attention sink, or,
  with S = W, as many keys as ``window:2W`` of which half lie far back);
* ``window:W@L1,L2,...`` (with or without ``+S``): the window on those decoder layers only
  (``layer_idx``, from 0), full attention on the others: which layer's far keys break
  the copy.

If the copy works inside a G-token window at L but not with full attention at L, the keys
beyond G (distances S2 training never showed) disturb it; if the sink column matches the
window column, losing the first tokens is not why. ``window:256+256`` against
``window:512`` tells the two readings apart: the same number of keys, but at 1024 half of
them lie 768-1023 tokens back, so if it fails where ``window:512`` works, the distance of
the keys disturbs the copy, not their number. Run after ``make demo``:

    OMP_NUM_THREADS=2 .venv/bin/python -m benchmarks.demo_reach \\
        [--model NAME=PATH ...] [--lengths 512,768,1024] [--attention full window:512 ...]

Writes ``benchmarks/results/demo_reach.json`` (``--out``) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from longlora_plugin.cli.eval import model_specs
from longlora_plugin.evaluation.models import load_eval_model
from longlora_plugin.evaluation.runner import run_passkey
from longlora_plugin.s2.backend import unwrap_model

DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
DEFAULT_MODELS = ["longlora=outputs/demo/longlora"]
DEFAULT_ATTENTION = ["full", "window:512", "window:512+4", "window:256", "window:256+256"]


WINDOW_SPEC = re.compile(r"window:([1-9][0-9]*)(?:\+([1-9][0-9]*))?(?:@([0-9]+(?:,[0-9]+)*))?")


def parse_attention(spec: str) -> tuple[int | None, int, frozenset[int] | None]:
    """``full`` -> ``(None, 0, None)``; ``window:W`` -> ``(W, 0, None)``; ``window:W+S``
    -> ``(W, S, None)``; ``window:W@1,3`` -> ``(W, 0, {1, 3})`` (None: every layer)."""
    if spec == "full":
        return None, 0, None
    match = WINDOW_SPEC.fullmatch(spec)
    if match is None:
        raise argparse.ArgumentTypeError(
            f"--attention {spec!r}: expected full, window:W, window:W+S or window:W@L1,L2 "
            "(W, S positive integers, L layer indices from 0)"
        )
    layers = frozenset(int(n) for n in match[3].split(",")) if match[3] else None
    return int(match[1]), int(match[2] or 0), layers


def limited_sdpa(window: int, sink: int, layers: frozenset[int] | None = None):
    """An attention function for ``AttentionInterface``: transformers' SDPA attention with
    a mask where a query at position i sees key j only if ``0 <= i - j < window`` or
    ``j < sink``, and-ed with the mask transformers passes (boolean or none), on the
    layers whose ``layer_idx`` is in ``layers`` (every layer when None); the other layers
    get plain SDPA with the mask transformers passes. Works with the KV cache (the queries
    are the last ``q_len`` positions of the keys)."""

    def attention(module, query, key, value, attention_mask, **kwargs):
        if layers is not None and module.layer_idx not in layers:
            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        q_len, k_len = query.shape[-2], key.shape[-2]
        query_pos = torch.arange(k_len - q_len, k_len, device=query.device)[:, None]
        key_pos = torch.arange(k_len, device=query.device)[None, :]
        distance = query_pos - key_pos
        allowed = ((distance >= 0) & ((distance < window) | (key_pos < sink)))[None, None]
        if attention_mask is not None:
            if attention_mask.dtype != torch.bool:
                raise ValueError(f"expected a boolean attention mask, got {attention_mask.dtype}")
            allowed = allowed & attention_mask[..., :k_len]
        return sdpa_attention_forward(module, query, key, value, allowed, **kwargs)

    return attention


def attention_spec(spec: str) -> str:
    """argparse ``type``: ``spec`` itself once :func:`parse_attention` accepts it."""
    parse_attention(spec)
    return spec


def set_attention(model: torch.nn.Module, spec: str) -> None:
    """Switch ``model`` (possibly a PEFT model) to the attention ``spec`` names."""
    window, sink, layers = parse_attention(spec)
    base = unwrap_model(model)
    if window is None:
        base.set_attn_implementation("sdpa")
        return
    on = "all" if layers is None else "_".join(str(n) for n in sorted(layers))
    name = f"demo_reach_window_{window}_sink_{sink}_layers_{on}"
    AttentionInterface.register(name, limited_sdpa(window, sink, layers))
    base.set_attn_implementation(name)


def reach(models: list[str], lengths: list[int], attention: list[str], trials: int) -> list[dict]:
    """One row per (model, attention, length): accuracy per depth and the mean."""
    rows: list[dict[str, Any]] = []
    for spec in model_specs(models, None):
        item = load_eval_model(spec, dtype="float32", device="cpu", attn_implementation="sdpa")
        for attn in attention:
            set_attention(item.model, attn)
            found = run_passkey([item], lengths=lengths, depths=DEPTHS, trials=trials)
            for length in sorted(lengths):
                cells = {
                    r["depth"]: r["accuracy"] for r in found["results"] if r["length"] == length
                }
                if not cells:
                    raise ValueError(f"no passkey cells at length {length} for {spec.name}")
                rows.append(
                    {
                        "model": spec.name,
                        "attention": attn,
                        "length": length,
                        "accuracy": cells,
                        "mean": round(sum(cells.values()) / len(cells), 3),
                    }
                )
    return rows


def table(rows: list[dict]) -> str:
    head = "| model | attention | length | " + " | ".join(f"depth {d:g}" for d in DEPTHS)
    lines = [head + " | mean |", "|---|---|---:|" + "---:|" * (len(DEPTHS) + 1)]
    for r in rows:
        cells = " | ".join(f"{r['accuracy'][d]:.2f}" for d in DEPTHS)
        lines.append(
            f"| {r['model']} | {r['attention']} | {r['length']} | {cells} | {r['mean']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", action="append", help="NAME=PATH (default: the demo's adapter)")
    parser.add_argument("--lengths", default="512,768,1024")
    parser.add_argument("--attention", nargs="+", type=attention_spec, default=DEFAULT_ATTENTION)
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/demo_reach.json"))
    args = parser.parse_args(argv)
    lengths = [int(n) for n in args.lengths.split(",")]
    start = time.time()
    rows = reach(args.model or DEFAULT_MODELS, lengths, args.attention, args.trials)
    print(table(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "benchmark": "demo_reach",
                "date": time.strftime("%Y-%m-%d"),
                "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
                "torch": torch.__version__,
                "seconds": round(time.time() - start),
                "rows": rows,
            },
            indent=1,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
