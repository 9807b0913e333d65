"""The LongLoRA paper's ablations in miniature, on the CPU demo's base model and extension.

Run after one ``make demo`` (it needs ``outputs/demo/base``, ``novels.jsonl``,
``retrieval.jsonl`` and ``heldout.txt`` there). Every row trains the demo's
``example_configs/quickstart-cpu.yml`` with a few keys changed, through ``axolotl train``
with the plugin, from the same base model on the same data, one after the other in this
run (so the time ratios compare like with like), then evaluates with full attention:

* passkey accuracy at 1x, 2x and 4x the base context, mean over depths 0 / 0.25 / 0.5 /
  0.75 / 1 (10 keys each, the evaluation's seed 0): a model trained with S2-Attn retrieves
  up to about its group size G with full attention, so the trained length alone would hide
  the difference between rows;
* window-mean perplexity on the held-out novel at 1x, 2x and 4x the base context;
* training seconds per step relative to the full-attention row.

Rows (the paper's counterparts: Table 2 for the trainable parts, Table 6 for attention):
full-attention LoRA+ (the upper bound), S2-Attn LoRA+ (LongLoRA), short attention without
the shift, plain LoRA, LoRA + norm, LoRA + embed, and interpolation only (no training).
The :data:`SEARCH` rows (the recipe search in docs/demo.md) run only when named:
``--only NAME --steps 400``.
Prints a table, writes ``benchmarks/results/demo_ablations.json`` and a plot
``docs/img/demo-ablations.png`` (``--out`` / ``--png`` elsewhere); ``--seed S`` trains every
row with the config's seed set to S and records it as ``NAME@seedS`` (the CI effect test's
spread over seeds: ``--only s2 --steps 250 --seed S --out
benchmarks/results/effect_spread.json``); ``--base DIR`` extends another base model (a
``python -m demo.pretrain --out DIR`` one) on the demo's data, its rows' adapters under
``outputs/ablations/<DIR's name>/`` (docs/demo.md, "A stronger base model")::

    .venv/bin/python -m benchmarks.demo_ablations [--only NAME ...] [--steps N] [--seed S] [--base DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from longlora_plugin.offline import OFFLINE_ENV

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "example_configs" / "quickstart-cpu.yml"
OUT = Path("outputs/ablations")
RESULTS = REPO / "benchmarks" / "results" / "demo_ablations.json"
PLOT = REPO / "docs" / "img" / "demo-ablations.png"
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
TRIALS = 10

# name -> (description, changes to the shipped config; a "longlora" dict is merged into
# its block; None = no training, the base model with the config's interpolation)
ROWS: dict[str, tuple[str, dict[str, Any] | None]] = {
    "full": ("full-attention LoRA+ (upper bound)", {"longlora": {"s2_attn": False}}),
    "s2": ("S2-Attn LoRA+ (LongLoRA, the demo's config)", {}),
    "short": ("short attention, no shift", {"longlora": {"shift": False}}),
    "lora": ("plain LoRA (no embeddings, no norms)", {"longlora": {"trainable_params": []}}),
    "lora-norm": ("LoRA + norm", {"longlora": {"trainable_params": ["norm"]}}),
    "lora-embed": ("LoRA + embed", {"longlora": {"trainable_params": ["embed"]}}),
    "interpolation": ("interpolation only, no training", None),
}
# The recipe search behind the shipped config (docs/demo.md), run with --only NAME
# --steps 400 (the search's length; the shipped config trains 800 steps, the "s2" row).
ONE_PLUGIN = ["longlora_plugin.LongLoRAPlugin"]  # Axolotl's token-mean loss
SEARCH: dict[str, tuple[str, dict[str, Any]]] = {
    "quarter": ("G = L/4 (the paper's)", {"longlora": {"group_size_ratio": 0.25}}),
    "lr5e-4": ("lr 5e-4", {"learning_rate": 0.0005}),
    "quarter-lr5e-4": (
        "G = L/4, lr 5e-4",
        {"learning_rate": 0.0005, "longlora": {"group_size_ratio": 0.25}},
    ),
    "quarter-token-mean-lr5e-4": (
        "G = L/4, token-mean loss, lr 5e-4",
        {"learning_rate": 0.0005, "plugins": ONE_PLUGIN, "longlora": {"group_size_ratio": 0.25}},
    ),
    "full-lr5e-4": (
        "full attention, lr 5e-4",
        {"learning_rate": 0.0005, "longlora": {"s2_attn": False}},
    ),
    "full-token-mean-lr5e-4": (
        "full attention, token-mean loss, lr 5e-4",
        {"learning_rate": 0.0005, "plugins": ONE_PLUGIN, "longlora": {"s2_attn": False}},
    ),
    "embed-lr0.1": (
        "embeddings and norms at 0.1x the learning rate (Axolotl's embedding_lr_scale)",
        {"embedding_lr_scale": 0.1},
    ),
    "three-quarters": ("G = 3L/4", {"longlora": {"group_size_ratio": 0.75}}),
    "yarn": (
        "YaRN x4 instead of linear",
        {"longlora": {"rope": {"type": "yarn", "factor": "auto"}}},
    ),
    "no-interpolation": (
        "no RoPE interpolation (positions 256-1023 learned directly)",
        {"longlora": {"rope": {"type": "none"}}},
    ),
    "previous": (
        "the previous recipe: YaRN, G = L/4, token-mean loss, lr 5e-4",
        {
            "learning_rate": 0.0005,
            "plugins": ONE_PLUGIN,
            "longlora": {"group_size_ratio": 0.25, "rope": {"type": "yarn", "factor": "auto"}},
        },
    ),
}


def row_dir(name: str, base: Path | None = None) -> Path:
    """Where a row's adapter goes: ``outputs/ablations/<name>``, under ``<base dir name>/``
    for another base model."""
    return OUT / name if base is None else OUT / base.name / name


def row_config(
    name: str,
    changes: dict[str, Any],
    steps: int | None,
    seed: int | None = None,
    base: Path | None = None,
) -> Path:
    """The demo config with ``changes`` applied (and ``max_steps`` / ``seed`` / another
    ``base_model`` when given), written beside its adapter (:func:`row_dir`) as ``.yml``."""
    cfg = yaml.safe_load(CONFIG.read_text())
    for key, value in changes.items():
        cfg[key] = {**cfg[key], **value} if key == "longlora" else value
    cfg["output_dir"] = str(row_dir(name, base))
    cfg["dataset_prepared_path"] = str(OUT / "prepared")
    if base is not None:  # its own tokenizer: its own tokenized copy of the data
        cfg["base_model"] = str(base)
        cfg["dataset_prepared_path"] = str(OUT / f"prepared-{base.name}")
    if steps:
        cfg["max_steps"] = steps
    if seed is not None:
        cfg["seed"] = seed
    path = row_dir(name, base).with_suffix(".yml")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def train(
    name: str,
    changes: dict[str, Any],
    env: dict[str, str],
    steps: int | None,
    seed: int | None = None,
    base: Path | None = None,
) -> tuple[float, int]:
    """Train one row; returns Axolotl's ``train_runtime`` per step (seconds) and the
    steps trained."""
    config = row_config(name, changes, steps, seed, base)
    log = row_dir(name, base).with_suffix(".log")
    with log.open("w") as fh:
        subprocess.run(
            [sys.executable, "-m", "axolotl.cli.train", str(config)],
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            check=True,
        )
    text = log.read_text(errors="replace")
    runtime = float(re.findall(r"'train_runtime': '?([0-9.]+)", text)[-1])
    trained = yaml.safe_load(config.read_text())["max_steps"]
    return runtime / trained, trained


def evaluate(name: str, path: Path, rope: Any, lengths: list[int]) -> dict[str, Any]:
    """Passkey and perplexity at ``lengths`` of one model."""
    from longlora_plugin.evaluation import perplexity as pp
    from longlora_plugin.evaluation.models import ModelSpec
    from longlora_plugin.evaluation.runner import load_models, run_passkey, run_ppl
    from longlora_plugin.evaluation.texts import load_texts

    spec = ModelSpec(name, str(path), rope)
    found = run_passkey(
        load_models([spec], dtype="float32", device="cpu"),
        lengths=lengths,
        depths=DEPTHS,
        trials=TRIALS,
    )
    ppl = run_ppl(
        load_models([spec], dtype="float32", device="cpu"),
        load_texts("outputs/demo/heldout.txt"),
        lengths=lengths,
        conventions=(pp.WINDOW_MEAN,),
        max_windows=100,
        batch_size=8,
        data="outputs/demo/heldout.txt",
    )
    passkey: dict[str, dict[str, float]] = {}
    for r in found["results"]:
        passkey.setdefault(str(r["length"]), {})[str(r["depth"])] = r["accuracy"]
    return {
        "passkey": passkey,
        "ppl": {str(r["length"]): r["ppl"] for r in ppl["results"]},
    }


def _mean(values: Any) -> float:
    values = list(values)
    return sum(values) / len(values)


def table(results: dict[str, Any], lengths: list[int]) -> str:
    """The markdown table of :data:`RESULTS`: passkey (mean of depths) and perplexity at
    each length, steps, seconds per step and the ratio to the full-attention row."""
    full = results.get("full", {}).get("seconds_per_step")
    lines = [
        "| row | "
        + " | ".join(f"passkey {n}" for n in lengths)
        + " | "
        + " | ".join(f"ppl {n}" for n in lengths)
        + " | steps | s/step | vs full |",
        "|---|" + "---:|" * (2 * len(lengths) + 3),
    ]
    for row in results.values():
        passkey = " | ".join(f"{_mean(row['passkey'][str(n)].values()):.2f}" for n in lengths)
        ppl = " | ".join(f"{row['ppl'][str(n)]:.2f}" for n in lengths)
        step = row.get("seconds_per_step")
        ratio = f"{step / full:.2f}x" if step and full else "-"
        lines.append(
            f"| {row['description']} | {passkey} | {ppl} | {row.get('steps') or '-'} | "
            f"{f'{step:.2f}' if step else '-'} | {ratio} |"
        )
    return "\n".join(lines)


def plot(results: dict[str, Any], lengths: list[int], path: Path) -> None:
    """Passkey accuracy at each length and perplexity at the longest, per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = [row["description"] for row in results.values()]
    ppl = [r["ppl"][str(lengths[-1])] for r in results.values()]
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.6 * len(names) + 1.5), sharey=True)
    y = np.arange(len(names))
    height = 0.8 / len(lengths)
    for i, n in enumerate(lengths):
        accuracy = [_mean(r["passkey"][str(n)].values()) for r in results.values()]
        axes[0].barh(y + (i - (len(lengths) - 1) / 2) * height, accuracy, height, label=f"{n}")
    axes[0].set_yticks(y, names)
    axes[0].set_xlim(0, 1)
    axes[0].set_xlabel("passkey accuracy (mean over depths)")
    axes[0].legend(title="tokens", loc="lower right")
    axes[1].barh(y, ppl, color="tab:gray")
    axes[1].set_xlabel(f"perplexity at {lengths[-1]} tokens (held-out novel)")
    axes[0].invert_yaxis()
    fig.suptitle(
        f"LongLoRA ablations in miniature (CPU demo model, {lengths[0]} -> {lengths[-1]} tokens)"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only",
        nargs="+",
        choices=sorted({**ROWS, **SEARCH}),
        help="run these rows only (the SEARCH rows run only when named)",
    )
    parser.add_argument("--steps", type=int, help="max_steps of every trained row")
    parser.add_argument(
        "--seed",
        type=int,
        help="the config's seed for every trained row (default: the config's); the rows "
        "are then recorded as NAME@seedN, so several seeds of one row sit side by side",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="the results JSON")
    parser.add_argument("--png", type=Path, default=PLOT, help="the plot")
    parser.add_argument(
        "--base",
        type=Path,
        help="extend this base model instead of the demo's outputs/demo/base (a `python -m "
        "demo.pretrain --out DIR` model; the demo's data is still needed); use with --out",
    )
    args = parser.parse_args()
    if args.base is not None and (args.out == RESULTS or args.png == PLOT):
        parser.error(
            f"--base {args.base}: give --out and --png too; the defaults ({RESULTS.name}, "
            f"{PLOT.name}) hold the demo base model's rows, which this run would replace"
        )
    base = args.base or Path("outputs/demo/base")
    if not (base / "config.json").is_file():
        hint = "run `make demo` first" if args.base is None else "--base: no model there"
        raise SystemExit(f"{hint}: {base}/config.json is missing")
    from demo.pipeline import Lengths, interpolation_type
    from longlora_plugin.evaluation.models import RopeOverride

    lengths = Lengths.from_model(base, CONFIG)
    env = {**os.environ, **OFFLINE_ENV}
    env.setdefault("OMP_NUM_THREADS", "2")
    import torch

    torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    for name in args.only or list(ROWS):
        description, changes = {**ROWS, **SEARCH}[name]
        key = name if args.seed is None or changes is None else f"{name}@seed{args.seed}"
        print(f"== {key}: {description}", flush=True)
        started = time.perf_counter()
        row: dict[str, Any] = {"description": description, "changes": changes}
        if changes is None:
            rope = RopeOverride(interpolation_type(CONFIG), lengths.factor)
            row.update(evaluate(name, base, rope, lengths.eval_lengths))
        else:
            row["seconds_per_step"], row["steps"] = train(
                key, changes, env, args.steps, args.seed, args.base
            )
            row.update(evaluate(key, row_dir(key, args.base), None, lengths.eval_lengths))
            if args.seed is not None:
                row["seed"], row["description"] = args.seed, f"{description}, seed {args.seed}"
        if args.base is not None:
            row["base"] = str(args.base)
        row["seconds"] = round(time.perf_counter() - started)
        results[key] = row
        results["_measured"] = {
            "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "threads": env["OMP_NUM_THREADS"],
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    known = [name for name in {**ROWS, **SEARCH} if name in results]
    seeded = sorted(k for k in results if k not in known and not k.startswith("_"))
    ordered = {name: results[name] for name in known + seeded}
    print(table(ordered, lengths.eval_lengths))
    plot(ordered, lengths.eval_lengths, args.png)
    print(f"{args.out}, {args.png}")


if __name__ == "__main__":
    main()
